"""from_pretrained as allocation programs: the order a checkpoint's tensors load in, transformers' allocator
warm-up, what each quantizer allocates to quantize a weight on arrival, an MoE layer's experts stacked and
quantized; and the caching-allocator state a device's load leaves, which the runtime's phases start from
(memory.py). Written from transformers 5.24 (core_model_loading, modeling_utils.caching_allocator_warmup),
bitsandbytes 0.50 and torchao 0.18; the replayed load peaks match an H100's to the megabyte
(bench/results/plan_validation_h100_2026-11-26.json and plan_validation_families_h100_2026-12-06.json,
phases.load); tests/planner/test_load_trace.py holds the expert and block-FP8 programs to from_pretrained's
allocations event by event. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from math import gcd
from typing import Sequence

from .allocator import SMALL_REQUEST_BYTES, CachingAllocator, Program, Tensor, block_size, live_sizes, one_round_each, \
    run
from heavylift.model.architecture import QUANTIZABLE_ROLES, Architecture
from heavylift.model.tensors import FP8_ONLY_ROLES
from heavylift.defaults import EXPERT_ROW_CHUNK_ELEMENTS, FP8_ROW_MULTIPLE, LOAD_ROW_CHUNK_ELEMENTS
from .matmul_programs import BF16, BNB_4BIT_BLOCKSIZE, FP32, INT32, INT64, float8_rows
from heavylift.model.prequantized import MXFP4_BLOCK, MXFP4_CODES_PER_BYTE, stored_bytes
from heavylift.schemes import BNB_4BIT_CODE_ENTRIES, BNB_NESTED_BLOCKSIZE, BNB_NESTED_CODE_ENTRIES, SCHEMES
from .forward_program import Part

# integrations/mxfp4.py _convert_moe_packed_tensors decodes this many rows of 16 bytes (32 weights) at a time.
MXFP4_ROWS_PER_CHUNK = 32768 * 1024

# transformers sizes the weights before loading them (modeling_utils.caching_allocator_warmup, from
# get_total_byte_count): a weight it quantizes on load at its quantizer's quantized_element_size (bitsandbytes
# 4-bit 0.5 bytes, LLM.int8 and torchao FP8 1: the scheme's nominal bits), every other tensor at its bf16 size.
# It allocates that much at once and frees it, so the weights then fill one cached segment.


@dataclass(frozen=True)
class Loaded:
    """One checkpoint tensor as from_pretrained brings it in: `numel` bf16 elements in `rows` output rows,
    quantized on arrival or kept as they are; or, from a block-FP8 checkpoint, `stored` as its weight's and its
    scales' bytes, kept so (fp8) or dequantized to bf16 on arrival."""

    numel: int
    rows: int
    quantized: bool
    stored: tuple[int, int] = (0, 0)
    fp8_only: bool = False  # quantized by torchao's FP8 alone (model.tensors.FP8_ONLY_ROLES)


@dataclass(frozen=True)
class ExpertLoad:
    """One MoE layer's routed experts as a checkpoint holds them: `count` experts of `width` channels over
    `hidden`; one tensor per expert and projection stacked on load (Mixtral, Qwen 3 MoE, DeepSeek-V3), or
    already fused (`fused`: Llama 4, gpt-oss); stored in bf16, block FP8 (kept or dequantized) or MXFP4
    (dequantized)."""

    count: int
    hidden: int
    width: int
    fused: bool = False
    storage: str = ""  # "" (bf16), prequantized.BLOCK_FP8 or prequantized.MXFP4
    scale_bytes: int = 0  # block FP8: one expert projection's float32 block scales
    down_first: bool = False  # down_proj's checkpoint tensors sort first: transformers converts it first


@dataclass(frozen=True)
class LayerLoad:
    """One decoder layer's load: its checkpoint tensors outside the routed experts, and those experts."""

    tensors: tuple[Loaded, ...]
    experts: ExpertLoad | None


def natural_key(name: str) -> list[tuple]:
    """The order transformers loads checkpoint tensors in (core_model_loading.dot_natural_key): dotted parts
    compared in turn, numbers numerically and before words, a word's trailing digits as a number."""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        word = part.rstrip("0123456789")
        parts.append((1, word, int(part[len(word):])) if word != part else (1, word))
    return parts


def load_row_step(rows: int, k: int, multiple: int) -> int:
    """Rows of a weight [rows, k] quantized together on load (bnb_load.py): LOAD_ROW_CHUNK_ELEMENTS weights, in
    a multiple of `multiple` rows (at least that many), at most the whole weight."""
    return min(rows, max(1, LOAD_ROW_CHUNK_ELEMENTS // k // multiple) * multiple)


def allocator_warmup(p: Program, quant: str, tensors: Sequence[Loaded]) -> None:
    """transformers' caching_allocator_warmup: the weights' expected size allocated as one fp16 tensor and freed."""
    scheme = SCHEMES[quant]
    per_quantized = scheme.bits_per_weight / 8 if scheme.quantized else BF16
    warmup = sum(t.numel * (per_quantized if t.quantized else BF16) for t in tensors)
    p.free(p.alloc("warmup", int(warmup // 2) * 2))  # torch.empty(byte_count // 2, dtype=float16)


def load_tensors(p: Program, quant: str, tensors: Sequence[Loaded]) -> None:
    """from_pretrained's loop over checkpoint tensors, in load order (transformers 5.24 core_model_loading), one
    at a time (a load that quantizes is always sequential; a bf16 load's threads only reorder tensors that all
    stay): each copied to the GPU in bf16, a linear weight then quantized (_quantize_on_load) and its bf16
    copy freed; or, in a bitsandbytes precision, a linear weight read into CPU RAM and quantized onto the GPU a
    block of rows at a time (_quantize_rows). What stays is what quant.Scheme counts as weights."""
    for t in tensors:
        if t.stored != (0, 0):
            _stored_load(p, t, keep=quant == "fp8")
            continue
        if t.quantized and row_blocked(quant):
            _quantize_rows(p, quant, t.numel, t.rows)
            continue
        w = p.alloc("bf16", BF16 * t.numel)
        if (t.quantized and SCHEMES[quant].quantized) or (t.fp8_only and quant == "fp8"):
            _quantize_on_load(p, quant, t.numel, t.rows)
            p.free(w)


def _stored_load(p: Program, t: Loaded, keep: bool) -> None:
    """A block-FP8 weight and its scales arriving: kept, or dequantized to bf16 (_dequantized_fp8) and both
    freed when the converter lets go of them."""
    weight, scales = t.stored
    w = p.alloc("stored", weight)
    s = p.alloc("stored_scales", scales)
    if keep:
        return
    _dequantized_fp8(p, t.numel)  # kept: the dequantized weight
    p.free(w, s)


def _dequantized_fp8(p: Program, numel: int) -> str:
    """integrations/finegrained_fp8.py Fp8Dequantize._dequantize_one on one block-FP8 weight of `numel` weights:
    a float32 copy, times its float32 block scales (already float32: no copy), the product cast to bf16; the
    product and the float32 copy freed. Returns the bf16 weight."""
    wide = p.alloc("weight_fp32", FP32 * numel)
    product = p.alloc("scaled_fp32", FP32 * numel)
    out = p.alloc("bf16", BF16 * numel)
    p.free(product, wide)
    return out


def dense_load(p: Program, quant: str, tensors: Sequence[Loaded]) -> None:
    """from_pretrained of a dense model's tensors on one device: the allocator warm-up, then the tensors."""
    allocator_warmup(p, quant, tensors)
    load_tensors(p, quant, tensors)


def _quantize_on_load(p: Program, quant: str, numel: int, rows: int) -> None:
    """torchao's Float8Tensor.from_hp on one arrived bf16 weight, its results kept: on blocks of rows into the
    whole weight's storage (float8_load.py)."""
    k = numel // rows
    step = max(1, LOAD_ROW_CHUNK_ELEMENTS // k // FP8_ROW_MULTIPLE) * FP8_ROW_MULTIPLE
    if step >= rows or rows % FP8_ROW_MULTIPLE:
        float8_rows(p, rows, k)
        return
    piece = float8_rows(p, step, k)
    p.alloc("qdata", numel)
    p.alloc("scale", FP32 * rows)
    p.free(*piece)
    full, last = divmod(rows - step, step)  # the blocks after the first: 207 in a 405B MLP weight
    p.rounds(full, lambda: p.free(*float8_rows(p, step, k)))
    if last:
        p.free(*float8_rows(p, last, k))


def row_blocked(quant: str) -> bool:
    """Whether the loader quantizes this precision's weights from CPU RAM a block of rows at a time
    (runtime/bnb_load.py): bitsandbytes' 4-bit and LLM.int8."""
    scheme = SCHEMES[quant]
    return scheme.four_bit or scheme.code == "int8"


def _quantize_rows(p: Program, quant: str, numel: int, rows: int) -> None:
    """bnb_load.quantize_4bit_rows or quantize_int8_rows on one weight read into CPU RAM: its quantized storage
    allocated whole (NF4-DQ: the packed nibbles, the 8-bit absmax and its scales, then the fp32 absmax), then per
    block of rows (load_row_step) the block's bf16 (LLM.int8: fp16) copy on the GPU and the kernel's outputs for
    it, all freed before the next block; then the 4-bit code book and double quantization over the whole absmax
    (_nested_absmax_into)."""
    k = numel // rows
    if SCHEMES[quant].four_bit:
        blocks = -(-numel // BNB_4BIT_BLOCKSIZE)
        if quant == "nf4-dq":
            p.alloc("packed", -(-numel // 2))
            p.alloc("absmax_u8", blocks)
            p.alloc("absmax2", FP32 * -(-blocks // BNB_NESTED_BLOCKSIZE))
            absmax = p.alloc("absmax", FP32 * blocks)
        else:
            absmax = p.alloc("absmax", FP32 * blocks)
            p.alloc("packed", -(-numel // 2))

        def piece(n: int) -> None:  # the block's bf16 copy, quantize_4bit's absmax and packed nibbles
            block = p.alloc("rows_bf16", BF16 * n * k)
            amax = p.alloc("rows_absmax", FP32 * -(-n * k // BNB_4BIT_BLOCKSIZE))
            out = p.alloc("rows_packed", -(-n * k // 2))
            p.free(block, out, amax)

        multiple = BNB_4BIT_BLOCKSIZE // gcd(k, BNB_4BIT_BLOCKSIZE)
    else:
        p.alloc("CB", numel)
        p.alloc("SCB", FP32 * rows)

        def piece(n: int) -> None:  # the block's fp16 copy, int8_vectorwise_quant's row scales and int8 rows
            block = p.alloc("rows_fp16", BF16 * n * k)
            scales = p.alloc("rows_SCB", FP32 * n)
            out = p.alloc("rows_CB", n * k)
            p.free(block, out, scales)

        multiple = 1
    step = load_row_step(rows, k, multiple)
    full, last = divmod(rows, step)
    p.rounds(full, lambda: piece(step))
    if last:
        piece(last)
    if SCHEMES[quant].four_bit:
        p.alloc("code", FP32 * BNB_4BIT_CODE_ENTRIES)
        if quant == "nf4-dq":
            _nested_absmax_into(p, blocks, absmax)


def _nested_absmax_into(p: Program, blocks: int, absmax: Tensor) -> None:
    """quantize_4bit_rows' double quantization: the fp32 absmax shifted by its mean in place and
    quantize_blockwise'd, its 8-bit codes and their scales copied into the tensors allocated before the absmax;
    the op's own outputs and the fp32 absmax freed."""
    p.alloc("offset", FP32)
    a2 = p.alloc("absmax2_tmp", FP32 * -(-blocks // BNB_NESTED_BLOCKSIZE))
    q = p.alloc("absmax_u8_tmp", blocks)
    p.alloc("code2", FP32 * BNB_NESTED_CODE_ENTRIES)
    p.free(q, a2, absmax)


def _quantize_4bit(p: Program, quant: str, numel: int) -> None:
    """bitsandbytes' quantize_4bit, its results kept: the absmax, the packed nibbles, the code book; with
    double quantization, _nested_absmax."""
    blocks = -(-numel // BNB_4BIT_BLOCKSIZE)
    absmax = p.alloc("absmax", FP32 * blocks)
    p.alloc("packed", -(-numel // 2))
    p.alloc("code", FP32 * BNB_4BIT_CODE_ENTRIES)
    if quant == "nf4-dq":
        _nested_absmax(p, blocks, absmax)


def _nested_absmax(p: Program, blocks: int, absmax: Tensor) -> None:
    """quantize_4bit's double quantization of the fp32 absmax of `blocks` blocks: shifted by its mean and
    quantize_blockwise'd, the dynamic code book copied to the GPU twice; the fp32 absmax freed."""
    p.alloc("offset", FP32)
    shifted = p.alloc("absmax_shifted", FP32 * blocks)
    code = p.alloc("code2_tmp", FP32 * BNB_NESTED_CODE_ENTRIES)
    p.alloc("absmax2", FP32 * -(-blocks // BNB_NESTED_BLOCKSIZE))
    p.alloc("absmax_u8", blocks)
    p.alloc("code2", FP32 * BNB_NESTED_CODE_ENTRIES)
    p.free(code, shifted, absmax)


def expert_load(p: Program, arch: Architecture, quant: str, down_first: bool = False) -> None:
    """One MoE layer's experts arriving through from_pretrained, which loads them one at a time (always for a
    quantized load; heavylift turns the thread pool off for bf16 MoE loads too). Each fused tensor is one
    WeightConverter (core_model_loading.py), run in the order of its first checkpoint tensor (dot_natural_key:
    Mixtral's w1 before w2, gate and up first; Qwen 3 MoE's and DeepSeek-V3's down_proj before gate_proj,
    down first): its checkpoint tensors all arrive, then are stacked (MergeModulelist) and gate and up
    concatenated (Concatenate). The first fused tensor stays in bf16 while the second converts: it is set in
    its module and quantized only when the next one arrives (experts.quantized_on_arrival). What the layer
    keeps is left allocated (later layers' tensors fit around it, as on the GPU)."""
    h, i, e = arch.hidden_size, arch.intermediate_size, arch.num_experts

    def gate_up() -> tuple[str, int, int]:
        gates = [p.alloc("w1", BF16 * i * h) for _ in range(e)]
        ups = [p.alloc("w3", BF16 * i * h) for _ in range(e)]
        return _merged_gate_up(p, gates, ups, BF16 * e * i * h), e * 2 * i, h

    def down() -> tuple[str, int, int]:
        downs = [p.alloc("w2", BF16 * h * i) for _ in range(e)]
        return _stacked(p, downs, BF16 * e * h * i, "down_proj"), e * h, i

    for fused, rows, cols in [step() for step in ((down, gate_up) if down_first else (gate_up, down))]:
        _quantize_expert(p, quant, fused, rows, cols)


def _stacked(p: Program, tensors: list[str], nbytes: int, label: str = "stack") -> str:
    """MergeModulelist on one list of per-expert tensors: stacked into `nbytes`, the list freed (last first, as
    a Python list frees its items) when the op lets go of it."""
    stack = p.alloc(label, nbytes)
    p.free(*reversed(tensors))
    return stack


def _merged_gate_up(p: Program, gates: list[str], ups: list[str], stack_bytes: int) -> str:
    """MergeModulelist then Concatenate on the gate and up lists: the gates stacked, their list dropped by the
    next pop, the ups stacked, their list dropped when the op returns; the two stacks concatenated and freed."""
    stacked = _stacked(p, gates, stack_bytes)
    stacked_up = _stacked(p, ups, stack_bytes)
    fused = p.alloc("gate_up_proj", 2 * stack_bytes)
    p.free(stacked, stacked_up)
    return fused


def experts_load(p: Program, ex: ExpertLoad, quant: str) -> None:
    """One MoE layer's routed experts arriving (see expert_load); a checkpoint that fuses them sends the two
    stacked tensors as they are, each quantized when the next arrives (experts.quantized_on_arrival); a
    pre-quantized one first dequantizes them (_dequantized_fused) or keeps them stored."""
    h, i, e = ex.hidden, ex.width, ex.count
    if not ex.fused:
        if ex.storage:  # block FP8 per expert: stacked as stored, or each dequantized then stacked
            _stacked_fp8(p, ex, keep=quant == "fp8")  # the only precisions such a checkpoint takes: fp8, bf16
        else:
            expert_load(p, _Shape(h, i, e), quant, ex.down_first)
        return
    shapes = ((e * h, 2 * i), (e * i, h))  # gate_up [E, hidden, 2 x width], down [E, width, hidden]
    for rows, cols in reversed(shapes) if ex.down_first else shapes:
        if ex.storage:
            fused = _dequantized_fused(p, rows * cols)
        else:
            fused = p.alloc("fused_expert", BF16 * rows * cols)
        _quantize_expert(p, quant, fused, rows, cols)


@dataclass(frozen=True)
class _Shape:
    """What expert_load reads of an Architecture."""

    hidden_size: int
    intermediate_size: int
    num_experts: int


def _dequantized_fused(p: Program, numel: int) -> str:
    """integrations/mxfp4.py _convert_moe_packed_tensors on one fused expert tensor of `numel` weights: its
    blocks and scales arrive, the scales are widened to int32 and shifted, the output allocated, then each
    chunk of rows decoded (the low and the high nibbles as int32 indices, looked up in bf16: the lookup's
    make_info first copies int32 indices to int64, freed with the op) and the result transposed into a
    contiguous copy; the chunk's locals go with the function, the blocks and scales with the converter."""
    blocks, scales = numel // MXFP4_CODES_PER_BYTE, numel // MXFP4_BLOCK
    b = p.alloc("blocks", blocks)
    s = p.alloc("scales", scales)
    wide = p.alloc("scales_int32", INT32 * scales)
    shifted = p.alloc("scales_shifted", INT32 * scales)
    p.free(wide)
    out = p.alloc("dequantized", BF16 * numel)
    rows = scales  # one row of 16 bytes per scale
    for start in range(0, rows, MXFP4_ROWS_PER_CHUNK):
        codes = min(MXFP4_ROWS_PER_CHUNK, rows - start) * MXFP4_BLOCK // MXFP4_CODES_PER_BYTE
        for _ in range(2):  # the low nibbles, then the high ones
            masked = p.alloc("nibbles", codes)
            idx = p.alloc("nibble_idx", INT32 * codes)
            p.free(masked)
            wide_idx = p.alloc("nibble_idx_int64", INT64 * codes)
            looked_up = p.alloc("looked_up", BF16 * codes)
            p.free(wide_idx)
            p.free(looked_up, idx)
    result = p.alloc("transposed", BF16 * numel)
    p.free(shifted, out, b, s)
    return result


def _stacked_fp8(p: Program, ex: ExpertLoad, keep: bool) -> None:
    """Block-FP8 experts, one weight and one float32 scale tensor (`scale_bytes`) per expert and projection.
    Kept (FP8Experts holds weights and scales): the scales have converters of their own (the quantizer's
    update_weight_conversions copies each for `_scale_inv`), so each fused weight and then its scales are
    stacked, gate and up concatenated, as bf16 experts are. Dequantized: one converter per fused tensor
    collects every expert's weights, then their scales, per projection; Fp8Dequantize turns each weight into
    bf16 (_dequantized_fp8), the stored lists are freed as the op returns, and the bf16 lists are stacked."""
    h, i, e = ex.hidden, ex.width, ex.count
    elem = 1 if keep else BF16

    def arrive(projections: int, numel: int) -> list[list[str]]:
        """Each projection's expert weights as the converter materializes them; where not kept, with their
        scales (weights, then scales, per projection), dequantized, the stored ones freed in that order."""
        if keep:  # the scales come with their own converter (kept_scales)
            return [[p.alloc("stored", numel) for _ in range(e)] for _ in range(projections)]
        stored = [([p.alloc("stored", numel) for _ in range(e)], [p.alloc("stored_scales", ex.scale_bytes)
                                                                  for _ in range(e)]) for _ in range(projections)]
        out = [[_dequantized_fp8(p, numel) for _ in range(e)] for _ in range(projections)]
        for weights, scales in stored:
            p.free(*reversed(weights), *reversed(scales))
        return out

    def kept_scales(projections: int) -> None:
        scales = [[p.alloc("stored_scales", ex.scale_bytes) for _ in range(e)] for _ in range(projections)]
        if projections == 1:
            _stacked(p, scales[0], e * ex.scale_bytes, "down_proj_scale_inv")
        else:
            _merged_gate_up(p, *scales, e * ex.scale_bytes)

    def gate_up() -> None:
        _merged_gate_up(p, *arrive(2, i * h), elem * e * i * h)
        if keep:
            kept_scales(2)

    def down() -> None:
        (downs,) = arrive(1, h * i)
        _stacked(p, downs, elem * e * h * i, "down_proj")
        if keep:
            kept_scales(1)

    for step in (down, gate_up) if ex.down_first else (gate_up, down):  # expert_load's order
        step()


def _quantize_expert(p: Program, quant: str, source: str, rows: int, cols: int) -> None:
    """experts._quantize_one on one fused tensor: bitsandbytes' quantize_4bit (_quantize_4bit), or
    experts._quantize_rows a chunk at a time; the bf16 source freed once the quantized parameter replaces it."""
    n = rows * cols
    scheme = SCHEMES[quant]
    if scheme.four_bit:
        _quantize_4bit(p, quant, n)
    elif scheme.rowwise8:
        p.alloc("q", n)
        p.alloc("scale", FP32 * rows)
        chunk = min(rows, max(1, EXPERT_ROW_CHUNK_ELEMENTS // cols)) * cols
        f = p.alloc("rows_fp32", FP32 * chunk)
        a = p.alloc("rows_abs", FP32 * chunk)
        p.free(a)
        q8 = p.alloc("rows_8bit", chunk)
        p.free(q8, f)
    else:
        return  # bf16: kept as loaded
    p.free(source)


# --- A device's load ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadOrder:
    """A device's checkpoint tensors in the order from_pretrained loads them: the ones before its layers
    (lm_head, then the embedding), one layer's (every decoder layer of a supported family has the same), and
    the ones after (the final norm). An MoE model's (`experts`: its shape) load each layer's experts first,
    through their own program (expert_load), without the allocator warm-up (loader._moe_loading)."""

    before: tuple[Loaded, ...]
    layer: tuple[Loaded, ...]
    after: tuple[Loaded, ...]
    experts: Architecture | None = None
    # Each layer's own load, in order, where layers differ or their experts are not Mixtral's kind (the
    # families beyond Mixtral: dense and MoE layers, fused or pre-quantized experts); empty otherwise.
    layers: tuple[LayerLoad, ...] = ()


def load_order(arch: Architecture, part: Part) -> LoadOrder | None:
    if not part.layers:
        return None
    def loaded(tensors) -> tuple[Loaded, ...]:
        ordered = sorted(tensors, key=lambda t: natural_key(t.name))
        return tuple(_loaded(t) for t in ordered)

    wanted = {"model.embed_tokens.weight": part.first, "model.norm.weight": part.last, "lm_head.weight": part.last}
    globals_ = [t for t in arch.global_tensors() if wanted.get(t.name, False)]
    layer = [t for t in arch.layer_tensors(part.layers.start) if t.fused_into is None]
    layers = ()
    if _per_layer(arch):
        layers = tuple(_layer_load(arch, i, loaded) for i in part.layers)
    return LoadOrder(loaded(t for t in globals_ if t.name != "model.norm.weight"), loaded(layer),
                     loaded(t for t in globals_ if t.name == "model.norm.weight"),
                     replace(arch, tensors=()) if arch.num_experts else None, layers)


def _loaded(t) -> Loaded:
    """A TensorSpec as it arrives: a block-FP8 one with its stored bytes (weight, scales)."""
    rows = t.numel // t.shape[-1]
    if t.stored and t.fused_into is None and len(t.shape) == 2:
        return Loaded(t.numel, rows, True, (t.numel, stored_bytes(t) - t.numel))
    return Loaded(t.numel, rows, t.role in QUANTIZABLE_ROLES, fp8_only=t.role in FP8_ONLY_ROLES)


def _per_layer(arch: Architecture) -> bool:
    """Whether the layers load by their own programs (LoadOrder.layers): every family but Mixtral's MoE."""
    return arch.num_experts > 0 and arch.model_type != "mixtral" or arch.prequantized is not None


def _layer_load(arch: Architecture, i: int, loaded) -> LayerLoad:
    """Layer i's load: its tensors outside the routed experts, and the experts as the checkpoint holds them."""
    tensors = arch.layer_tensors(i)
    experts = None
    if arch.is_moe(i):
        routed = [t for t in tensors if t.role.value == "expert"]
        fused = all(t.fused_into is None for t in routed)
        pre = arch.prequantized
        first = next(t for t in routed if t.fused_into is not None) if not fused else None
        scale = (stored_bytes(first) - first.numel) if first is not None and first.stored else 0
        experts = ExpertLoad(arch.num_experts, arch.hidden_size, arch.expert_width, fused,
                             pre.method if pre else "", scale, _down_first(routed))
        tensors = [t for t in tensors if t.role.value != "expert"]
    return LayerLoad(loaded(t for t in tensors if t.fused_into is None), experts)


def _down_first(routed) -> bool:
    """Whether transformers converts a layer's down_proj before its gate_up_proj (per-expert tensors stacked, or
    fused ones as stored: Llama 4's, gpt-oss's down_proj_blocks): each fused tensor's converter runs in the
    load order of its first checkpoint tensor (core_model_loading.convert_and_load_state_dict_in_model
    keeps the converters in the order their first key arrives)."""
    first = min(routed, key=lambda t: natural_key(t.name))
    return (first.fused_into or first.name).endswith("down_proj")


@lru_cache(maxsize=256)
def loaded_state(quant: str, order: LoadOrder, layers: int) -> tuple[CachingAllocator, int]:
    """The allocator of a device once from_pretrained has loaded its `layers` layers (dense_load,
    expert_load): the weights allocated, the warm-up segment and the temporaries cached around them; and the
    weights' bytes (which the allocator's count can exceed: a block it does not split is handed out whole).
    Every layer loads by the same program, which keeps its weights and frees what else it allocates; a dense
    model's layers load in the free block the tensors before them leave in the warm-up segment
    (_layers_in_free_block)."""
    a = CachingAllocator()
    if order.layers:
        return _per_layer_state(quant, order, layers)
    if order.experts is None:
        warmup = Program()
        allocator_warmup(warmup, quant, order.before + order.layer * layers + order.after)
        a.play(warmup)
    before, after = _load_program(quant, order.before, None), _load_program(quant, order.after, None)
    layer = _load_program(quant, order.layer, order.experts)
    a.play(before)
    if order.experts is None and _in_one_free_block(a):
        free, _ = a.first_segment_tail()
        a = _layers_in_free_block(quant, order.layer, free, layers).moved_onto(a)
    else:
        for _ in range(layers):
            a.play(layer)
    a.play(after)
    weights = sum(block_size(n) for n in live_sizes(before) + live_sizes(after)) \
        + layers * sum(block_size(n) for n in live_sizes(layer))
    return a, weights


def _per_layer_state(quant: str, order: LoadOrder, layers: int) -> tuple[CachingAllocator, int]:
    """loaded_state for layers that load by their own programs (LoadOrder.layers): no allocator warm-up (an MoE
    load skips it: loader._moe_loading; a dense pre-quantized one counts the stored bytes, which the plan's
    weights are), the tensors before, each layer's experts and tensors in turn, the tensors after."""
    a = CachingAllocator()
    before, after = _load_program(quant, order.before, None), _load_program(quant, order.after, None)
    a.play(before)
    weights = sum(block_size(n) for n in live_sizes(before) + live_sizes(after))
    for layer in order.layers[:layers]:
        program = _layer_program(quant, layer)
        a.play(program)
        weights += sum(block_size(n) for n in live_sizes(program))
    a.play(after)
    return a, weights


@lru_cache(maxsize=256)
def _layer_program(quant: str, layer: LayerLoad) -> Program:
    p = Program()
    if layer.experts is not None:
        experts_load(p, layer.experts, quant)
    load_tensors(p, quant, layer.tensors)
    return p


def _in_one_free_block(a: CachingAllocator) -> bool:
    """Whether what a device loads next goes into one free block of the large pool that ends its only segment
    (the warm-up segment, the tensors before the layers kept at its start)."""
    blocks = a.free_blocks()
    return len(blocks) == 1 and not blocks[0][2] and a.segments() == {0: blocks[0][0] + blocks[0][1]}


# The warm-up segment of a _LayerRun: larger than any device's, so that its layers never run it short.
SHARED_SEGMENT_BYTES = 1 << 62


class _LayerRun:
    """One layer's load program replayed layer after layer in a warm-up segment too large to run short, with
    the allocator's state after each: every device that loads these layers starts from it.

    In a device's own warm-up segment a layer loads alike when the free block that ends the segment stays,
    all through the layer, larger than every other cached block and larger than any request it serves by
    more than the 1 MiB rest the large pool splits off: then it serves a request exactly when no other block
    fits, and always splits, whatever its size. A layer carves at most `need` bytes from it (a run of rounds,
    Program.rounds, counted once: a round that reserves no segment of the large pool leaves that pool as it
    found it), and a block it frees merges only within a block that was free when the layer began or within
    what it carved, so the free block suffices if it begins the layer larger than `need` plus the larger of
    `need` and the largest other block. Past the last layer that loads alike, the device replays its own."""

    def __init__(self, layer: Program):
        self.layer = layer
        sizes = [block_size(e[2]) for e in one_round_each(layer) if e[0] == "alloc"]
        # What one layer can carve from the large pool: each block, and the rest it may hand out unsplit.
        self.need = sum(n + SMALL_REQUEST_BYTES for n in sizes if n > SMALL_REQUEST_BYTES)
        segment = Program()
        segment.free(segment.alloc("warmup", SHARED_SEGMENT_BYTES))
        self.states = [run(segment).fork()]

    def state(self, layers: int) -> CachingAllocator:
        """The allocator after `layers` layers (not to be changed: replay on a copy)."""
        while len(self.states) <= layers:
            a = self.states[-1].copy()
            a.play(self.layer)
            self.states.append(a)
        return self.states[layers]

    def layers_alike(self, start: CachingAllocator, layers: int) -> int:
        """How many of a device's first `layers` layers load from `start` (_in_one_free_block) as here: its free
        block is as much smaller than ours as its warm-up segment, less what it holds at the start."""
        tail, _ = start.first_segment_tail()
        shortfall = SHARED_SEGMENT_BYTES - tail
        for i in range(layers):
            ours, other = self.state(i).first_segment_tail()
            if ours - shortfall <= self.need + max(other, self.need):
                return i
        return layers


@lru_cache(maxsize=256)
def _layers_in_free_block(quant: str, layer: tuple[Loaded, ...], free: int, layers: int) -> CachingAllocator:
    """The allocator once `layers` layers have loaded into a warm-up segment of `free` bytes, wholly free, to
    move onto a device (moved_onto: its tensors before the layers at the start of the segment): the layers
    that load there as in the _LayerRun taken from it, the rest replayed. Devices whose layers find the same
    free block share it: those costed as holding every layer do, whatever they hold before and after them,
    as far as the warm-up segment's rounding to 2 MiB takes it in."""
    layer_run = _layer_run(quant, layer)
    start = CachingAllocator.one_free_segment(free)
    shared = layer_run.layers_alike(start, layers)
    a = layer_run.state(shared).moved_onto(start)
    for _ in range(layers - shared):
        a.play(layer_run.layer)
    return a


@lru_cache(maxsize=64)
def _layer_run(quant: str, layer: tuple[Loaded, ...]) -> _LayerRun:
    return _LayerRun(_load_program(quant, layer, None))


@lru_cache(maxsize=256)
def _load_program(quant: str, tensors: tuple[Loaded, ...], experts: Architecture | None) -> Program:
    """The load of these checkpoint tensors, after a layer's experts (expert_load) for an MoE layer."""
    p = Program()
    if experts is not None:
        expert_load(p, experts, quant)
    load_tensors(p, quant, tensors)
    return p


def clear_load_caches() -> None:
    """Forget every load replayed and every load program built."""
    for cached in (loaded_state, _load_program, _layer_run, _layers_in_free_block, _layer_program):
        cached.cache_clear()
