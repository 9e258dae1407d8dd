"""The planner's allocation programs against what the code they model allocates, event by event.

transformers' forward (every family, sliding windows included) and heavylift's engine prefill run here
on the CPU under memtrace.Trace; the programs in heavylift.planner.forward_program and heavylift.planner.memory must list the
same allocations, of the same sizes, freed in the same order (LLM.int8's bitsandbytes ops traced as their CUDA
kernels allocate: memtrace.BNB_CUDA_ALLOCATIONS). The quantized matmuls that only run on a GPU are checked tensor
by tensor against the arithmetic of their source.
"""

from __future__ import annotations

import pytest
import torch

import heavylift
from heavylift.planner.allocator import Program, peak_live
from heavylift.model.architecture import architecture_from_config
from heavylift.model.catalog import find_model
from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.planner.memory import TRANSFORMERS, FAST, _kv_tensors, engine_prefill, runtime_terms
from heavylift.schemes import SCHEMES
from heavylift.planner.forward_program import Part, Step, linear, transformers_forward
from heavylift.planner.matmul_programs import dense_linear as engine_dense_linear, int8_quant_rows, int8_tile_rows

from conftest import save_tiny_checkpoint, save_tiny_tokenizer
from memtrace import Trace, canonical, first_difference

CONTEXT, BATCH, CHUNK, PROMPT = 48, 2, 16, 40  # prompt in chunks of 16, 16 and 8, then one decode step
MiB = 1 << 20


def _session(tmp_path, family: str, engine: str, quant: str = "bf16", **config):
    folder = tmp_path / family
    save_tiny_checkpoint(folder, family, vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, **config)
    save_tiny_tokenizer(folder)
    return heavylift.load(str(folder), quant=quant, context=CONTEXT, batch=BATCH, engine=engine)


def _traced_steps(session, trace: Trace, decode: bool) -> tuple:
    """The session's prefill of the test prompt under `trace`, then, with `decode`, one greedy decode step; what
    they return, kept alive by the caller as the program keeps it."""
    ids = torch.randint(0, 300, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with trace:
            logits, advance, cached = session.steps(ids)
        if not decode:
            return logits, advance, cached
        token = logits.argmax(dim=-1, keepdim=True)
        with trace:
            after = advance(token)
    return logits, advance, cached, after


def _forward_events(session, quant: str, decode: bool, mask_order: list[str] | None = None) -> list[tuple]:
    """The transformers forward program of what _traced_steps runs: the KV cache, each prefill chunk (logits on the
    last), then the decode step."""
    arch = session.plan.architecture
    every = range(arch.num_layers)
    part = Part(every, first=True, last=True)
    program = Program()
    for label, nbytes in _kv_tensors(arch, every, CONTEXT, BATCH, 2, TRANSFORMERS):
        program.alloc(label, nbytes)
    for start in range(0, PROMPT, CHUNK):
        step = Step(BATCH, min(CHUNK, PROMPT - start), start, CONTEXT)
        transformers_forward(program, arch, quant, step, part, every, logits=start + CHUNK >= PROMPT,
                             mask_order=mask_order)
    if decode:
        transformers_forward(program, arch, quant, Step(BATCH, 1, PROMPT, CONTEXT), part, every, logits=True,
                             mask_order=mask_order)
    return canonical(program.events)


@pytest.mark.parametrize("family, config", [
    ("llama", {}),  # the MLP in place (runtime/mlp_forward.py), as in mistral, qwen2, gemma2, qwen3 and gemma3_text
    ("llama", {"hidden_act": "gelu"}),  # no exact in-place form of the erf GELU: transformers' own MLP
    ("mistral", {"sliding_window": 8}),  # the first chunk already exceeds the window
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    ("mixtral", {}),
    ("phi3", {"sliding_window": 12}),
    ("gemma2", {}),  # eager attention, softcapping, alternating 16-token windows
    ("qwen3", {}),  # per-head q_norm and k_norm
    ("qwen3_moe", {}),  # a dense layer, then a sparse one
    ("gemma3_text", {}),  # q_norm and k_norm, a sliding layer then a full one, RoPE tables per layer type
    ("llama4_text", {}),  # a dense chunked RoPE layer, then an MoE full-attention NoPE layer
    ("deepseek_v3", {}),  # latent attention, a dense layer, then routed and shared experts
    ("gpt_oss", {}),  # eager attention with sinks, a sliding layer then a full one, biased experts
])
def test_transformers_programs_match_the_forward(tmp_path, monkeypatch, family, config):
    import heavylift.runtime.session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", CHUNK)
    session = _session(tmp_path, family, "transformers", **config)
    trace = Trace()
    *_, cached, after = _traced_steps(session, trace, decode=True)
    assert cached() == PROMPT + 1

    # Llama 4 builds a mask per layer type in the order of a Python set of their names, which string hashing
    # fixes per process: the program takes this process's order (a plan takes them sorted).
    order = list(set(session.model.config.layer_types)) if family == "llama4_text" else None
    planned, traced = _forward_events(session, "bf16", decode=True, mask_order=order), canonical(trace.events)
    assert planned == traced, first_difference(planned, traced)


def _without_cpu_tile_copies(events: list[tuple]) -> list[tuple]:
    """A trace less bitsandbytes' CPU dequantize_4bit outputs: its CPU backend has no out= variant, so each tile is
    written to a new tensor and copied in (ops._bnb_writer), where a GPU writes the tile buffer in place."""
    copies = {e[1] for e in events if e[0] == "alloc" and e[3].startswith("bitsandbytes.dequantize_4bit")}
    return [e for e in events if e[1] not in copies]


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq"])
def test_transformers_4bit_prefill_matches_the_forward(tmp_path, monkeypatch, quant):
    # Chunks of 16 tokens x 2 sequences: every matmul has more rows than bitsandbytes fuses, so each runs a
    # weight tile at a time (runtime/bnb_forward.py; the tiny weights fit in one tile).
    import heavylift.runtime.session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", CHUNK)
    session = _session(tmp_path, "llama", "transformers", quant)
    trace = Trace()
    steps = _traced_steps(session, trace, decode=False)  # noqa: F841 - its logits stay alive, as the program keeps them
    planned = _forward_events(session, quant, decode=False)
    traced = canonical(_without_cpu_tile_copies(trace.events))
    assert planned == traced, first_difference(planned, traced)


class _FilledAttentionTrace(Trace):
    """A Trace whose attention outputs hold values (Trace leaves them unset): which input columns LLM.int8 takes as
    outlier columns depends on them."""

    def flash(self, q, v):
        return super().flash(q, v).normal_()

    def _sdpa(self, q, k, v, *args, **kwargs):
        return super()._sdpa(q, k, v, *args, **kwargs).normal_()


# Whole weights; tiles of 24 rows of a 64-wide weight, 12 of 128; and x quantized 12 rows of a 64-wide x at a time,
# 6 of a 128-wide one.
@pytest.mark.parametrize("tile_rows, quant_rows", [(0, 0), (24, 0), (24, 12)])
def test_transformers_int8_prefill_and_decode_match_the_forward(tmp_path, monkeypatch, tile_rows, quant_rows):
    # LLM.int8 a weight tile at a time (runtime/bnb_forward.py): bitsandbytes' ops traced as their CUDA kernels
    # allocate (memtrace.BNB_CUDA_ALLOCATIONS). The plan counts every input column as an outlier column; a
    # threshold under every entry here makes them so.
    import bitsandbytes as bnb
    import heavylift.runtime.session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", CHUNK)
    if tile_rows:  # q 24, 24, 16 rows; k and v 24, 8; gate and up five of 24 and 8; down five of 12 and 4
        monkeypatch.setattr("heavylift.planner.matmul_programs.TRANSFORMERS_TILE_BYTES", 4 * 64 * tile_rows)
    if quant_rows:
        monkeypatch.setattr("heavylift.planner.matmul_programs.LLM_INT8_QUANT_BYTES", 2 * 64 * quant_rows)
    session = _session(tmp_path, "llama", "transformers", "int8")
    for m in session.model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.state.threshold = 1e-6
    trace = _FilledAttentionTrace()
    steps = _traced_steps(session, trace, decode=True)  # noqa: F841 - kept alive, as the program keeps them
    planned, traced = _forward_events(session, "int8", decode=True), canonical(trace.events)
    assert planned == traced, first_difference(planned, traced)


class TritonLikeOps:
    """What the engine's Triton kernels allocate during prefill: nothing; they write into their out buffers."""

    name = "triton-like"

    @staticmethod
    def rmsnorm(x, weight, eps, out):
        return out

    @staticmethod
    def rope_cache(qkv, positions, slots, cos, sin, k_cache, v_cache, heads, kv_heads, q_out, qk_norm=None, eps=0.0):
        return q_out


@pytest.mark.parametrize("family, config, mlp_bytes, rows", [
    ("llama", {}, None, 0),
    ("llama", {}, 5 * 2 * 128, 0),  # 5 rows of the 128-wide MLP: chunks of 16 in 4 pieces of 4 rows, the last of 8 in 2
    ("llama", {}, None, 6),  # chunks of 16 through the layers 6 tokens at a time: 6, 6 and 4; the last chunk 6 and 2
    ("mistral", {"sliding_window": 12}, None, 0),
    ("mistral", {"sliding_window": 12}, None, 6),  # passes that start inside and beyond the window
    ("qwen2", {}, None, 0),
    ("qwen3", {}, None, 0),
])
def test_engine_prefill_program_matches_the_engine(tmp_path, monkeypatch, family, config, mlp_bytes, rows):
    monkeypatch.setattr("heavylift.engine.model.PREFILL_CHUNK_TOKENS", CHUNK)
    if mlp_bytes:
        monkeypatch.setattr("heavylift.planner.engine_program.PREFILL_MLP_BYTES", mlp_bytes)
    session = _session(tmp_path, family, "fast", **config)
    session.engine.ops = TritonLikeOps
    if rows:
        session.engine.prefill_rows = {torch.device("cpu"): rows}
    ids = torch.randint(0, 300, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    trace = Trace()
    with torch.inference_mode(), trace:
        steps = session.steps(ids)  # noqa: F841 - its logits stay alive, as the program keeps them

    arch = session.plan.architecture
    program = Program()
    part = Part(range(arch.num_layers), first=True, last=True)
    logits = [engine_prefill(program, arch, "bf16", PROMPT, CHUNK, range(arch.num_layers), part, native_fp8=True,
                             cuda=False, rows=rows) for _ in range(BATCH)]
    program.alloc("logits", 4 * BATCH * arch.vocab_size)  # torch.cat of the rows
    program.free(*reversed(logits))  # the list of rows dies backwards
    planned, traced = canonical(program.events), canonical(trace.events)
    assert planned == traced, first_difference(planned, traced)


def _sizes(program: Program) -> list[int]:
    return [e[2] for e in program.events if e[0] == "alloc"]


def test_bitsandbytes_4bit_runs_a_weight_tile_at_a_time_beyond_four_rows():
    # Llama-3.1-405B's gate weight, 53248 x 16384, against 2048 rows on transformers (runtime/bnb_forward.py): one
    # 96 MiB tile of 3072 rows; y 2048 x 53248 x 2 = 218,103,808; per tile NF4-DQ's absmax of its blocks,
    # 3072 x 16384 / 64 x 4 bytes = 3,145,728 (17 tiles), the last tile's 1024 rows 1,048,576. bitsandbytes' own
    # forward would hold the whole weight in bf16, 1,744,830,464.
    tile, y = 3072 * 16384 * 2, 2048 * 53248 * 2
    p = Program()
    linear(p, "nf4-dq", 2048, 16384, 53248)
    assert _sizes(p) == [tile, y, 3_145_728, 1_048_576] and peak_live(p) == tile + y + 3_145_728
    p = Program()
    linear(p, "fp4", 5, 16384, 53248)  # five rows already
    assert _sizes(p) == [tile, 5 * 53248 * 2]
    p = Program()
    linear(p, "nf4", 4, 64, 32)  # up to 4 rows: bitsandbytes' fused kernel, only the output
    assert _sizes(p) == [256]
    p = Program()
    linear(p, "nf4", 4, 96, 32)  # but not over partial 64-weight blocks: the whole 32 x 96 weight is one tile
    assert _sizes(p) == [32 * 96 * 2, 256]


def test_llm_int8_counts_its_outlier_decomposition():
    # x [8, 64] @ W^T, W [32, 64] int8: fp16 copy 1024, row stats 32, int8 x 512, |x| 1024, outlier map 512,
    # columns with outliers (all 64 counted): any 64, indices 512; A[:, cols] 1024, CB[:, cols] 2048,
    # dequantized in fp32 8192 (the second product in place), bf16 4096; int32 product 1024, fp16 512, bf16
    # 512, + addmm 512. Most at once: stats, int8 x, indices (512 each) + A[:, cols] 1024 + fp32 8192 + bf16
    # 4096 = 14,848 (bitsandbytes' own dequantize holds a second fp32 copy: 20,992).
    p = Program()
    linear(p, "int8", 8, 64, 32)
    assert _sizes(p) == [1024, 32, 512, 1024, 512, 64, 512, 1024, 2048, 8192, 4096, 1024, 512, 512, 512]
    assert peak_live(p) == 14_848


def test_llm_int8_on_transformers_runs_a_weight_tile_at_a_time():
    # Llama-3.1-405B's down projection, 16384 x 53248, on a 2048-token chunk (runtime/bnb_forward.py), every column
    # an outlier column. x quantized 157 rows at a time (16 MiB of fp16 / 106,496 bytes a row): 13 blocks of 157
    # and one of 7, into int8 x 109,051,904 and row stats 8192 allocated whole, with the map of outlier columns
    # 53,248; per block its fp16 copy, row stats, int8 rows, |x|, the map, any, indices; then the indices 425,984.
    # A[:, cols] 218,103,808; the output 2048 x 16384 x 2 = 67,108,864. Tiles of 96 MiB / (53248 x 4 bytes) =
    # 472 rows rounded down to a multiple of 16, 464, 35 of them and one of 144: per tile CB[:, cols] 464 x 53248
    # = 24,707,072, its fp32 dequantize 98,828,288, in bf16 49,414,144, the int32, fp16 and bf16 products
    # 3,801,088, 1,900,544 and 1,900,544, and addmm's 1,900,544.
    assert int8_tile_rows(16384, 53248) == 464 and int8_quant_rows(2048, 53248) == 157

    def block(r: int) -> list[int]:
        return [2 * r * 53248, 4 * r, r * 53248, 2 * r * 53248, r * 53248, 53_248, 425_984]

    def tile(t: int) -> list[int]:
        return [t * 53248, 4 * t * 53248, 2 * t * 53248, 4 * 2048 * t, 2 * 2048 * t, 2 * 2048 * t, 2 * 2048 * t]

    quantize = [109_051_904, 8192, 53_248] + block(157) * 13 + block(7) + [425_984]
    p = Program()
    linear(p, "int8", 2048, 53248, 16384)
    assert _sizes(p) == quantize + [218_103_808, 67_108_864] + tile(464) * 35 + tile(144)
    # Most at once, at a tile's bf16 copy of its outlier columns: row stats, int8 x, indices, A[:, cols], the
    # output, the fp32 and bf16 copies: 0.54 GB, where bitsandbytes' own forward holds 2 x 3.49 GB of fp32 for the
    # whole weight and its quantize of the whole chunk 0.55 GB.
    assert peak_live(p) == 8192 + 109_051_904 + 425_984 + 218_103_808 + 67_108_864 + 98_828_288 + 49_414_144
    # A decode step of one row: quantized whole; the same tiles, the fp32 one as large.
    p = Program()
    linear(p, "int8", 1, 53248, 16384)
    assert peak_live(p) == 512 + 53_248 + 425_984 + 106_496 + 32_768 + 98_828_288 + 49_414_144


def test_llm_int8_tiles_are_whole_multiples_of_sixteen_rows():
    # cuBLASLt's int8 GEMM needs the int32 product's rows aligned: Gemma 2 9B's gate, 14336 x 3584, took tiles of
    # 9362 rows (128 MiB / (3584 x 4)) and failed on an H100. 96 MiB / (3584 x 4) is 7021 rows: 7008 taken, a
    # multiple of 16, and so is what is left.
    assert int8_tile_rows(14336, 3584) == 7008 and (14336 - 2 * 7008) % 16 == 0
    assert int8_tile_rows(16384, 3072) == 8192  # Phi-3-mini's fused gate_up: two tiles
    assert int8_tile_rows(3072, 8192) == 3072  # its down projection in one tile: the whole weight
    assert int8_tile_rows(64, 10**9) == 16  # at least one multiple, however wide the weight


def test_torchao_fp8_quantizes_activations_in_fp32():
    # |x| bf16 1024, row max 16, scale 16, fp32 scale 32; x in fp32, scaled, clamped (3 x 2048), fp8 512;
    # y 512. Most at once: fp32 scale (512) + 3 x 2048 + fp8 512 = 7168.
    p = Program()
    linear(p, "fp8", 8, 64, 32)
    assert _sizes(p) == [1024, 16, 16, 32, 2048, 2048, 2048, 512, 512] and peak_live(p) == 7168
    p = Program()
    linear(p, "fp8", 8, 64, 32, native_fp8=False)  # FP8 storage without FP8 tensor cores: weight dequantized
    assert _sizes(p) == [8192, 8192, 4096, 512]


def test_engine_prefill_dequantizes_a_tile_of_rows_at_a_time():
    # Llama-3.1-405B's gate weight, 53248 x 16384, against a 2048-token chunk: 128 MiB tiles of 4096 rows
    # (16384 x 2 bytes a row), 13 of them; y 2048 x 53248 x 2 = 218,103,808; per tile NF4-DQ's absmax of its
    # blocks, 4096 x 16384 / 64 blocks x 4 bytes = 4,194,304 (the whole weight's would be 54,525,952). The whole
    # weight in bf16 would be 1,744,830,464.
    tile, y = 4096 * 16384 * 2, 2048 * 53248 * 2
    p = Program()
    engine_dense_linear(p, "nf4-dq", 2048, 16384, 53248, native_fp8=True)
    assert _sizes(p) == [tile, y, 4_194_304] and peak_live(p) == tile + y + 4_194_304
    for quant in ("nf4", "int8"):  # no absmax to dequantize; INT8 rows cast and scaled in the tile
        p = Program()
        engine_dense_linear(p, quant, 2048, 16384, 53248, native_fp8=True)
        assert _sizes(p) == [tile, y]
    p = Program()  # FP8 without FP8 tensor cores: as INT8
    engine_dense_linear(p, "fp8", 2048, 16384, 53248, native_fp8=False)
    assert _sizes(p) == [tile, y]
    # A weight under a tile, 1024 x 4096: the tile is the whole weight, 8 MiB.
    p = Program()
    engine_dense_linear(p, "int8", 16, 4096, 1024, native_fp8=True)
    assert _sizes(p) == [1024 * 4096 * 2, 16 * 1024 * 2]


@pytest.mark.parametrize("model, context, batch, quant", [("llama3.1-8b", 32768, 8, "bf16"),
                                                           ("gemma2-9b", 8192, 1, "nf4"),
                                                           ("mixtral-8x7b", 8192, 1, "int8")])
def test_two_simulated_layers_give_every_layers_reserve_on_transformers(model, context, batch, quant):
    import heavylift.planner.memory as memory

    arch = architecture_from_config(find_model(model).config_dict())
    (gpu,) = parse_gpu_spec("1xH100")
    part = Part(range(arch.num_layers), True, True)
    quick = runtime_terms(arch, quant, TRANSFORMERS, context, batch, 2, gpu, part)
    memory._terms.cache_clear()
    saved = dict(memory.SIMULATED_LAYERS)
    try:
        memory.SIMULATED_LAYERS[TRANSFORMERS] = arch.num_layers
        assert runtime_terms(arch, quant, TRANSFORMERS, context, batch, 2, gpu, part) == quick
    finally:
        memory.SIMULATED_LAYERS.update(saved)
        memory._terms.cache_clear()


def test_engine_decode_pools_hold_benchmark_buffer_workspaces_and_dequantized_weights():
    import heavylift.planner.memory as memory
    from heavylift.planner.allocator import replay

    arch = architecture_from_config(find_model("llama3.1-8b").config_dict())
    dev = memory._Device(True, (9, 0), True)
    part = Part(range(arch.num_layers), True, True)
    shape, layers = arch, (0, 1, 2, 3)
    # bf16, one sequence: the Triton kernels take the step and allocate nothing; the graph's pool and the
    # warm-up's side stream each hold the embedding lookup's 2 MiB small segment and a 32 MiB cuBLAS
    # workspace (lm_head's torch.mm), and the side stream Triton's 256 MiB L2-flush buffer.
    _, phases = memory._engine_phases(shape, "bf16", 1024, 1, 2, dev, part, layers)
    assert phases[1][1] == 2 * (2 + 32) * MiB + 256 * MiB
    # NF4 for 80 sequences (past the batched kernel's 64): 4-bit weights go through TorchOps' dequantized
    # matmuls (the gate's bf16 copy is 14336 x 4096 x 2 bytes = 112 MiB) in both pools, and no Triton kernel
    # is autotuned.
    _, phases = memory._engine_phases(shape, "nf4", 1024, 80, 2, dev, part, layers)
    step = Program()
    memory.engine_decode_step(step, shape, "nf4", 80, layers, part, True)
    graph = replay(step).peak_reserved
    assert graph >= 112 * MiB and phases[1][1] == 2 * (graph + 32 * MiB)


# --- Loading -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama3.1-8b", "qwen2.5-7b", "gemma2-9b", "phi3-mini"])
def test_the_load_keeps_exactly_the_weights_the_plan_counts(model):
    from heavylift.planner.allocator import block_size, live_sizes
    from heavylift.schemes import SCHEMES
    from heavylift.planner.load_program import dense_load, load_order

    arch = architecture_from_config(find_model(model).config_dict())
    order = load_order(arch, Part(range(arch.num_layers), True, True))
    for quant in ("bf16", "fp8", "int8", "nf4", "nf4-dq", "fp4"):
        p = Program()
        dense_load(p, quant, order.before + order.layer * arch.num_layers + order.after)
        kept = sum(block_size(n) for n in live_sizes(p))
        assert kept == SCHEMES[quant].weights_bytes(arch.tensors), quant


def test_the_load_order_is_transformers_order():
    from transformers.core_model_loading import dot_natural_key

    from heavylift.planner.load_program import natural_key

    arch = architecture_from_config(find_model("qwen2.5-7b").config_dict())
    names = [t.name for t in arch.tensors] + ["model.layers.2.mlp.experts.10.w1", "model.layers.2.mlp.experts.9.w1"]
    assert sorted(names, key=natural_key) == sorted(names, key=dot_natural_key)


def test_quantizing_on_load_holds_the_quantizers_temporaries_and_bitsandbytes_a_block_of_rows(monkeypatch):
    from heavylift.planner.load_program import Loaded, dense_load

    def sizes(quant: str) -> list[int]:
        p = Program()
        dense_load(p, quant, [Loaded(64 * 128, 64, True)])  # a [64, 128] weight
        return _sizes(p)

    # The warm-up counts the weight at 1 byte per element for FP8 and LLM.int8, half a byte for 4-bit.
    # torchao FP8: bf16 16,384; |w| 16,384, row maxima and scales (64 x 2, 2, 4 -> 512 each); w in fp32,
    # scaled, clamped (3 x 32,768); float8 8,192.
    assert sizes("fp8") == [8192, 16384, 16384, 128, 128, 256, 32768, 32768, 32768, 8192]
    # LLM.int8 (bnb_load.quantize_int8_rows): the int8 rows and row scales (256) allocated whole; the weight in
    # one block of rows (64 x 128 <= LOAD_ROW_CHUNK_ELEMENTS): its fp16 copy, the block's scales and int8 rows.
    assert sizes("int8") == [8192, 8192, 256, 16384, 256, 8192]
    # NF4 with double quantization: the packed nibbles, the absmax bytes (128) and their nested scale, then the
    # 128 fp32 absmax, allocated whole; the block's bf16 copy, absmax and nibbles; the code book; the offset,
    # quantize_blockwise's own nested scale and bytes (copied into the kept ones) and the kept code book.
    assert sizes("nf4-dq") == [4096, 4096, 128, 4, 512, 16384, 512, 4096, 64, 4, 4, 128, 1024]
    # In blocks of 16 rows (2048 weights; a multiple of 64, as 4-bit blocks need): four of them.
    monkeypatch.setattr("heavylift.planner.load_program.LOAD_ROW_CHUNK_ELEMENTS", 2048)
    assert sizes("nf4") == [4096, 512, 4096] + [4096, 128, 1024] * 4 + [64]
    assert sizes("int8") == [8192, 8192, 256] + [4096, 64, 2048] * 4


def test_a_dense_plan_holds_what_the_load_leaves_cached():
    # Loading quantizes each weight through fp32 copies that later weights cannot fill exactly: the plan's
    # reserve is at least what the load reserved beyond the weights.
    from heavylift.planner.load_program import load_order, loaded_state

    arch = architecture_from_config(find_model("qwen2.5-7b").config_dict())
    (gpu,) = parse_gpu_spec("1xH100")
    part = Part(range(arch.num_layers), True, True)
    loaded, weights = loaded_state("fp8", load_order(arch, part), arch.num_layers)
    assert weights == SCHEMES["fp8"].weights_bytes(arch.tensors) and loaded.peak_reserved > weights
    terms = runtime_terms(arch, "fp8", FAST, 1024, 1, 2, gpu, part, every_layer=True)
    assert terms.kv_cache_bytes + terms.transient_bytes + terms.buffer_bytes >= loaded.peak_reserved - weights


def test_fp8_weights_quantize_on_load_a_block_of_rows_at_a_time(monkeypatch):
    import heavylift.planner.load_program as load_programs
    from heavylift.planner.load_program import Loaded, dense_load

    monkeypatch.setattr(load_programs, "LOAD_ROW_CHUNK_ELEMENTS", 16 * 128)
    p = Program()
    dense_load(p, "fp8", [Loaded(64 * 128, 64, True)])  # a [64, 128] weight in 4 pieces of 16 rows
    # Each piece through from_hp: |w| 4,096; row maxima and scales in bf16 (32 each) and fp32 (64); fp32 copies
    # 3 x 8,192; float8 2,048. The first is followed by the whole weight's float8 storage and fp32 scales.
    piece = [4096, 32, 32, 64, 8192, 8192, 8192, 2048]
    assert _sizes(p) == [8192, 16384] + piece + [8192, 256] + piece * 3
    # Most at once, in a later piece: the bf16 weight, the whole storage and scales (256 -> 512), the piece's
    # fp32 scales (512), its three fp32 copies and its float8 rows.
    assert peak_live(p) == 16384 + 8192 + 512 + 512 + 3 * 8192 + 2048


@pytest.mark.parametrize("model", ["llama3.1-8b", "gemma2-9b", "phi3-mini"])
def test_every_device_loads_its_layers_as_a_replay_of_its_whole_load(model):
    # loaded_state loads a dense model's layers once for every device of a precision, in a warm-up segment
    # no device runs short of, and replays only each device's last layers in its own: the allocator each
    # device is left with, peaks and free blocks included, is that of its load replayed event by event.
    from heavylift.planner.allocator import run
    from heavylift.planner.load_program import clear_load_caches, dense_load, load_order, loaded_state

    arch = architecture_from_config(find_model(model).config_dict())
    n = arch.num_layers
    parts = [Part(range(n), True, True), Part(range(0, n // 2), True, False), Part(range(n // 2, n), False, True),
             Part(range(3, 5), False, False), Part(range(n - 1, n), False, True)]
    for quant in SCHEMES:
        clear_load_caches()
        for part in parts:
            order = load_order(arch, part)
            whole = Program()
            dense_load(whole, quant, order.before + order.layer * len(part.layers) + order.after)
            assert loaded_state(quant, order, len(part.layers))[0] == run(whole), (quant, part)
