"""from_pretrained as allocation programs: the order a checkpoint's tensors load in, transformers' allocator
warm-up, what each quantizer allocates to quantize a weight on arrival, an MoE layer's experts stacked and
quantized; and the caching-allocator state a device's load leaves, which the runtime's phases start from
(memory.py). Written from transformers 5.24 (core_model_loading, modeling_utils.caching_allocator_warmup),
bitsandbytes 0.50 and torchao 0.18; the replayed load peaks match an H100's to the megabyte
(bench/results/plan_validation_h100_2026-11-26.json, phases.load). Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

from .allocator import SMALL_REQUEST_BYTES, CachingAllocator, Program, block_size, live_sizes, one_round_each, run
from heavylift.model.architecture import QUANTIZABLE_ROLES, Architecture
from heavylift.defaults import EXPERT_ROW_CHUNK_ELEMENTS, FP8_ROW_MULTIPLE, LOAD_ROW_CHUNK_ELEMENTS
from .matmul_programs import BF16, BNB_4BIT_BLOCKSIZE, FP32, float8_rows
from heavylift.schemes import BNB_4BIT_CODE_ENTRIES, BNB_NESTED_BLOCKSIZE, BNB_NESTED_CODE_ENTRIES, SCHEMES
from .forward_program import Part

# transformers sizes the weights before loading them (modeling_utils.caching_allocator_warmup, from
# get_total_byte_count): a weight it quantizes on load at its quantizer's quantized_element_size (bitsandbytes
# 4-bit 0.5 bytes, LLM.int8 and torchao FP8 1: the scheme's nominal bits), every other tensor at its bf16 size.
# It allocates that much at once and frees it, so the weights then fill one cached segment.


@dataclass(frozen=True)
class Loaded:
    """One checkpoint tensor as from_pretrained brings it in: `numel` bf16 elements in `rows` output rows,
    quantized on arrival or kept as they are."""

    numel: int
    rows: int
    quantized: bool


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
    copy freed. What stays is what quant.Scheme counts as weights."""
    for t in tensors:
        w = p.alloc("bf16", BF16 * t.numel)
        if t.quantized and SCHEMES[quant].quantized:
            _quantize_on_load(p, quant, t.numel, t.rows)
            p.free(w)


def dense_load(p: Program, quant: str, tensors: Sequence[Loaded]) -> None:
    """from_pretrained of a dense model's tensors on one device: the allocator warm-up, then the tensors."""
    allocator_warmup(p, quant, tensors)
    load_tensors(p, quant, tensors)


def _quantize_on_load(p: Program, quant: str, numel: int, rows: int) -> None:
    """The quantizer's op on one arrived bf16 weight, its results kept: torchao's Float8Tensor.from_hp, on
    blocks of rows into the whole weight's storage (float8_load.py);
    Int8Params._quantize (an fp16 copy, then int8_vectorwise_quant's row scales and int8 rows); bitsandbytes'
    quantize_4bit (_quantize_4bit)."""
    if quant == "fp8":  # float8_load: torchao's from_hp on a block of rows at a time
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
        return
    if quant == "int8":
        f16 = p.alloc("weight_fp16", BF16 * numel)
        p.alloc("SCB", FP32 * rows)
        p.alloc("CB", numel)
        p.free(f16)
        return
    _quantize_4bit(p, quant, numel)


def _quantize_4bit(p: Program, quant: str, numel: int) -> None:
    """bitsandbytes' quantize_4bit, its results kept: the absmax, the packed nibbles, the code book; with
    double quantization the absmax shifted by its mean and quantize_blockwise'd, the dynamic code book copied
    to the GPU twice."""
    blocks = -(-numel // BNB_4BIT_BLOCKSIZE)
    absmax = p.alloc("absmax", FP32 * blocks)
    p.alloc("packed", -(-numel // 2))
    p.alloc("code", FP32 * BNB_4BIT_CODE_ENTRIES)
    if quant != "nf4-dq":
        return
    p.alloc("offset", FP32)
    shifted = p.alloc("absmax_shifted", FP32 * blocks)
    code = p.alloc("code2_tmp", FP32 * BNB_NESTED_CODE_ENTRIES)
    p.alloc("absmax2", FP32 * -(-blocks // BNB_NESTED_BLOCKSIZE))
    p.alloc("absmax_u8", blocks)
    p.alloc("code2", FP32 * BNB_NESTED_CODE_ENTRIES)
    p.free(code, shifted, absmax)


def expert_load(p: Program, arch: Architecture, quant: str) -> None:
    """One MoE layer's experts arriving through from_pretrained, which loads them one at a time (always for a
    quantized load; heavylift turns the thread pool off for bf16 MoE loads too): each expert's checkpoint
    tensors, their stacks (MergeModulelist) and gate and up concatenated (Concatenate; core_model_loading.py),
    the fused tensor set in its module and quantized when the next one arrives (experts.quantized_on_arrival).
    What the layer keeps is left allocated (later layers' tensors fit around it, as on the GPU)."""
    h, i, e = arch.hidden_size, arch.intermediate_size, arch.num_experts
    gates = [p.alloc("w1", BF16 * i * h) for _ in range(e)]
    ups = [p.alloc("w3", BF16 * i * h) for _ in range(e)]
    stacked = p.alloc("stack", BF16 * e * i * h)
    p.free(*gates)
    stacked_up = p.alloc("stack", BF16 * e * i * h)
    p.free(*ups)
    gate_up = p.alloc("gate_up_proj", BF16 * e * 2 * i * h)
    p.free(stacked, stacked_up)
    downs = [p.alloc("w2", BF16 * h * i) for _ in range(e)]
    down = p.alloc("down_proj", BF16 * e * h * i)
    p.free(*downs)
    _quantize_expert(p, quant, gate_up, e * 2 * i, h)
    _quantize_expert(p, quant, down, e * h, i)


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


def load_order(arch: Architecture, part: Part) -> LoadOrder | None:
    if not part.layers:
        return None

    def loaded(tensors) -> tuple[Loaded, ...]:
        ordered = sorted(tensors, key=lambda t: natural_key(t.name))
        return tuple(Loaded(t.numel, t.numel // t.shape[-1], t.role in QUANTIZABLE_ROLES) for t in ordered)

    wanted = {"model.embed_tokens.weight": part.first, "model.norm.weight": part.last, "lm_head.weight": part.last}
    globals_ = [t for t in arch.global_tensors() if wanted.get(t.name, False)]
    layer = [t for t in arch.layer_tensors(part.layers.start) if t.fused_into is None]
    return LoadOrder(loaded(t for t in globals_ if t.name != "model.norm.weight"), loaded(layer),
                      loaded(t for t in globals_ if t.name == "model.norm.weight"),
                      replace(arch, tensors=()) if arch.num_experts else None)


@lru_cache(maxsize=256)
def loaded_state(quant: str, order: LoadOrder, layers: int) -> tuple[CachingAllocator, int]:
    """The allocator of a device once from_pretrained has loaded its `layers` layers (dense_load,
    expert_load): the weights allocated, the warm-up segment and the temporaries cached around them; and the
    weights' bytes (which the allocator's count can exceed: a block it does not split is handed out whole).
    Every layer loads by the same program, which keeps its weights and frees what else it allocates; a dense
    model's layers load in the free block the tensors before them leave in the warm-up segment
    (_layers_in_free_block)."""
    a = CachingAllocator()
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
    for cached in (loaded_state, _load_program, _layer_run, _layers_in_free_block):
        cached.cache_clear()
