"""Memory a run needs besides its weights, per device: KV cache, fixed runtime buffers, and what the
caching allocator reserves for everything transient.

The transient part is not a formula: the run's allocation programs (forward_program.py: transformers'
forward with a static cache, or heavylift's engine) are replayed through the caching-allocator model
(allocator.py), phase by phase as heavylift.Session runs them (session.py calls empty_cache() before each
transformers prefill chunk, between the engine's sequences and before decoding), from the state the load
leaves: from_pretrained (load_program.py) puts the weights among cached blocks
of transformers' allocator warm-up and of the quantizers' temporaries, which later phases reuse or cannot.
Which engine runs is an input (`Workload.engine`): the plan
describes the one that runs. A server of `batch` sequences (`Workload.serve`) holds and runs otherwise than
one run of them: its phases are built apart (_engine_serve_phases, _transformers_serve_phases). Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial
from itertools import groupby
from typing import Iterable, Sequence

from .allocator import CachingAllocator, Program, block_size, live_sizes, peak_live, replay
from heavylift.model.architecture import Architecture
from heavylift.defaults import CUDA_CONTEXT_BYTES, DECODE_SPLITS_MAX, LLM_INT8_CONTEXT_BYTES, MiB
from .engine_program import decode_uses_kernels, engine_decode_step, engine_prefill
from .load_program import LoadOrder, clear_load_caches, expert_load, load_order, loaded_state
from .matmul_programs import BF16, FP32, INT32, INT64
from .forward_program import Part, Step, forward_precisions, sliding_kv, transformers_forward
from .prompt_lengths import longest_prompt, prefill_chunk, prompt_lengths, worst_prompt
from heavylift.schemes import BNB_4BIT, SCHEMES

# The two runtimes a plan can describe (heavylift.engine's --engine values, without "auto": the session
# resolves auto to one of these before planning; tests/planner/test_planner.py holds them to heavylift.engine's).
FAST, TRANSFORMERS = "fast", "transformers"
ENGINES = (FAST, TRANSFORMERS)

# cuBLAS takes a workspace from the caching allocator for every stream it runs on, kept for the
# process's life: 32 MiB on compute capability 9.0 (":4096:8"), else 8 MiB + 128 KiB (":4096:2:16:8";
# torch CublasHandlePool.cpp, getChosenWorkspaceSize). cuBLASLt shares it. Measured on the H100 runs of
# bench/results/plan_validation_h100_2026-11-26.json: the allocated peak is the tensors plus 32 MiB.
CUBLAS_WORKSPACE_HOPPER_BYTES = 32 * MiB
CUBLAS_WORKSPACE_BYTES = 8 * MiB + 128 * 1024
HOPPER = (9, 0)
# Decoder layers replayed per forward. On transformers every layer of a device repeats one allocation
# pattern and the allocator's blocks settle within the first two (Gemma 2's alternating windows included):
# two give the reserve of every layer in all 98 device-cases of bench/validate_plan.py's matrix. The engine
# keeps each chunk's blocks for the next, so its reserve can move with the layer count (up to 1.6% of its
# transient bytes in that matrix with four): a device's own plan replays all its layers; the searches for
# a split or for advice replay four.
SIMULATED_LAYERS = {TRANSFORMERS: 2, FAST: 4}
# Sampling a token (sampling.py Sampling.choose at temperature > 0): the logits in fp32, divided by the
# temperature, and their softmax; two fp32 [batch, vocab] copies live at once.
SAMPLING_FP32_COPIES = 2

# --- The fast engine's fixed buffers (engine/model.py, engine/ops.py) ---------------------------------
# The first decode step autotunes the Triton GEMV kernels on a side stream; triton.testing.do_bench
# clears the L2 cache with a 256 MiB buffer (backends/nvidia/driver.py get_empty_cache_for_benchmark),
# which the allocator keeps cached for that stream afterwards. The captured graph keeps a private pool
# for what the step allocates, the warm-up's side stream its own; cuBLAS takes a workspace in each.
TRITON_BENCH_BUFFER_BYTES = 256 * MiB


@dataclass(frozen=True)
class RuntimeTerms:
    """One device's memory besides its weights."""

    kv_cache_bytes: int
    transient_bytes: int  # what the allocator reserves beyond the KV cache and buffers at the run's peak
    buffer_bytes: int  # fixed allocations: cuBLAS workspaces, the engine's tables, decode buffers, pools
    context_bytes: int  # outside the allocator: CUDA context, cuBLAS handles, loaded kernels
    prompt_tokens: int = 0  # the prompt length these figures are of: the worst of prompt_lengths, or the longest

    @property
    def overhead_bytes(self) -> int:
        return self.buffer_bytes + self.context_bytes


def kv_bytes_per_token(arch: Architecture, kv_dtype_bytes: int) -> int:
    """Keys and values of one token in one layer (Architecture.kv_layout: DeepSeek-V3 caches its compressed
    latent and shared RoPE key, one 'head' of kv_lora_rank + qk_rope_head_dim channels)."""
    heads, key, value = arch.kv_layout
    return heads * (key + value) * kv_dtype_bytes


def kv_cache_bytes(arch: Architecture, layers: Iterable[int], context: int, batch: int, kv_dtype_bytes: int,
                   engine: str = TRANSFORMERS) -> int:
    """The static KV cache of these layers for `batch` sequences of `context` tokens.

    transformers' StaticCache gives a sliding-window layer min(window, context) positions
    (StaticSlidingWindowLayer); the engine gives every layer the full context.
    """
    per_token = kv_bytes_per_token(arch, kv_dtype_bytes)
    if engine == FAST:
        return sum(per_token * context * batch for _ in layers)
    return sum(per_token * min(context, arch.layer_windows[i] or context) * batch for i in layers)


def cublas_workspace_bytes(compute_capability: tuple[int, int] | None) -> int:
    """A device's cuBLAS workspace per stream; a card of unknown capability gets Hopper's larger one."""
    return CUBLAS_WORKSPACE_BYTES if compute_capability and tuple(compute_capability) != HOPPER \
        else CUBLAS_WORKSPACE_HOPPER_BYTES


def simulated_layers(arch: Architecture, layers: range, count: int) -> tuple[int, ...]:
    """The layers of a device replayed per forward: its first `count`, plus one of each kind beyond them (its
    window; where a family's layers differ otherwise, its attention type, MoE block and RoPE too)."""
    chosen = list(layers[:count])
    seen = {arch.layer_kind(i) for i in chosen}
    for i in layers[count:]:
        if arch.layer_kind(i) not in seen:
            chosen.append(i)
            seen.add(arch.layer_kind(i))
    return tuple(chosen)


class _Same:
    """An immutable object as a memo key, by identity: hashing an Architecture hashes its thousands of tensor
    specs, which would cost more than the replay the memo saves. The memo holding the key keeps the object
    alive, so its id is never another's."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.value is self.value


@lru_cache(maxsize=1024)
def _part_key(arch: _Same, part: Part) -> tuple[Architecture, range, LoadOrder | None]:
    """What the runtime terms of `part` depend on: the architecture without its tensor list (which the
    allocation programs never read), the first run of as many layers of the same kinds (a device's layers
    matter only by Architecture.layer_kind; whether it runs the model's start and end is known apart), and
    the order their checkpoint tensors load in."""
    shape = _shape(arch)
    kinds = [shape.layer_kind(i) for i in range(shape.num_layers)]
    n = len(part.layers)
    wanted = kinds[part.layers.start:part.layers.stop]
    start = next(s for s in range(part.layers.start + 1) if kinds[s:s + n] == wanted)
    return shape, range(start, start + n), load_order(arch.value, Part(range(start, start + n), part.first, part.last))


@lru_cache(maxsize=64)
def _shape(arch: _Same) -> Architecture:
    return replace(arch.value, tensors=())


@dataclass(frozen=True)
class _Device:
    """What of a device the runtime terms depend on."""

    cuda: bool
    compute_capability: tuple[int, int] | None
    native_fp8: bool


def runtime_terms(arch: Architecture, quant: str, engine: str, context: int, batch: int, kv_dtype_bytes: int,
                  device, part: Part, every_layer: bool = False, serve: bool = False,
                  every_prompt: bool | None = None, prefill_rows: int = 0) -> RuntimeTerms:
    """KV cache, transients, buffers and context of one device (a hardware.Device) running `part` of the
    model in scheme `quant` on `engine`; `every_layer` replays all its layers where the engine's reserve
    depends on them (a device's final plan); `every_prompt` (by default as `every_layer`) takes the worst of
    the prompt lengths prompt_lengths.prompt_lengths names, else the longest prompt alone (the searches for a
    split); `serve`: as a server of `batch` sequences (Workload.serve); `prefill_rows`: the engine's prefill
    runs that many tokens of a chunk at a time through the device's layers, transformers' forward prefills in
    chunks of that many tokens (0: whole chunks of prefill_chunk)."""
    key = _device_key(arch, quant, engine, context, batch, kv_dtype_bytes, device, part, every_layer, serve,
                      prefill_rows)
    return _terms(*key[:-1], every_layer if every_prompt is None else every_prompt, key[-1])


def bytes_at_prompt(arch: Architecture, quant: str, engine: str, context: int, batch: int, kv_dtype_bytes: int,
                    device, part: Part, prompt: int, every_layer: bool = False, serve: bool = False,
                    prefill_rows: int = 0) -> int:
    """What `device` holds beyond its weights at its peak (KV cache, buffers, transients, context) when the
    prompts are `prompt` tokens long: runtime_terms' figure for one prompt length (bench/prompt_sweep.py)."""
    key = _device_key(arch, quant, engine, context, batch, kv_dtype_bytes, device, part, every_layer, serve,
                      prefill_rows)
    reserved, _ = _reserve(key, _loaded(key), prompt)
    return reserved + _context_bytes(key[1], engine, key[6])


def _device_key(arch: Architecture, quant: str, engine: str, context: int, batch: int, kv_dtype_bytes: int, device,
                part: Part, every_layer: bool, serve: bool, prefill_rows: int) -> tuple:
    """What a device's runtime terms depend on, as _reserve takes it (its replays are cached by it): the shape of
    its part, the precision that allocates, the device's kind, its layers and how many of them are replayed, and
    the prefill's rows per pass (runtime_terms' prefill_rows)."""
    dev = _Device(device.kind == "cuda", tuple(device.compute_capability) if device.compute_capability else None,
                  bool(device.native_fp8))
    count = len(part.layers) if every_layer and engine == FAST else SIMULATED_LAYERS[engine]
    shape, layers, order = _part_key(_Same(arch), part)
    return (shape, allocating_twin(quant), engine, context, batch, kv_dtype_bytes, dev, layers.start, layers.stop,
            part.first, part.last, count, order, serve, prefill_rows)


@lru_cache(maxsize=None)
def allocating_twin(quant: str) -> str:
    """The first scheme that allocates exactly as `quant` does, whose runtime terms `quant` shares: one
    equal in every field but its names and, for bitsandbytes' 4-bit storage, its code book (NF4 or FP4: which
    value each of the same 16 float32 entries holds, the same bytes loaded and computed alike)."""
    def allocating(name: str):
        s = SCHEMES[name]
        return replace(s, name="", label="", code=None if s.storage == BNB_4BIT else s.code)

    return next(q for q in SCHEMES if allocating(q) == allocating(quant))


def clear_caches() -> None:
    """Forget every replayed program: the next plan computes its terms from scratch (bench/plan_speed.py)."""
    for cached in (_terms, _at_longest, _part_key, _shape, _cpu_load_peak):
        cached.cache_clear()
    clear_load_caches()


def _context_bytes(quant: str, engine: str, dev: _Device) -> int:
    if not dev.cuda:
        return 0
    return LLM_INT8_CONTEXT_BYTES if quant == "int8" and engine == TRANSFORMERS else CUDA_CONTEXT_BYTES


@lru_cache(maxsize=4096)
def _terms(arch: Architecture, quant: str, engine: str, context: int, batch: int, kvb: int, dev: _Device,
           start: int, stop: int, first: bool, last: bool, count: int, order: LoadOrder | None,
           serve: bool = False, every_prompt: bool = False, rows: int = 0) -> RuntimeTerms:
    """runtime_terms of a device by what they depend on (_part_key), at the longest prompt or, with
    `every_prompt`, at the worst of prompt_lengths; `rows` as runtime_terms' prefill_rows."""
    part = Part(range(start, stop), first, last)
    kv = kv_cache_bytes(arch, part.layers, context, batch, kvb, engine)
    if not part.layers:
        return RuntimeTerms(0, 0, 0, 0)
    key = (arch, quant, engine, context, batch, kvb, dev, start, stop, first, last, count, order, serve, rows)
    fast, loaded, longest = engine == FAST, _loaded(key), longest_prompt(context, engine == FAST, serve)

    def replay(prompt: int, whole: bool) -> tuple[int, int]:
        return _at_longest(*key) if whole and prompt == longest else _reserve(key, loaded, prompt, whole)

    lengths = prompt_lengths(arch, fast, context, batch, serve, rows) if every_prompt else (longest,)
    worst, (reserved, persistent) = worst_prompt(lengths, replay, fast)
    return RuntimeTerms(kv, max(0, reserved - persistent), persistent - kv, _context_bytes(quant, engine, dev), worst)


@lru_cache(maxsize=4096)
def _at_longest(*key) -> tuple[int, int]:
    """_reserve of a _terms key at the longest prompt, which its figures at the longest prompt alone and at the
    worst of every prompt length (Layout._least_free counts a device both ways) share."""
    return _reserve(key, _loaded(key), longest_prompt(key[3], key[2] == FAST, key[13]))


def _loaded(key: tuple) -> tuple[CachingAllocator, int] | None:
    """The allocator as the load of the device of a _terms key leaves it, and the weights' bytes in it (None
    on a CPU)."""
    quant, dev, start, stop, order = key[1], key[6], key[7], key[8], key[12]
    return loaded_state(quant, order, stop - start) if dev.cuda else None


def _reserve(key: tuple, loaded: tuple[CachingAllocator, int] | None, prompt: int,
             whole: bool = True) -> tuple[int, int]:
    """(what the device of a _terms key holds at its peak beyond the weights, what of it the runtime keeps from
    its start) for a run whose prompts are `prompt` tokens long, the load having left `loaded` (_loaded);
    without `whole`, of the prefill's last chunk alone (prompt_lengths.Replay)."""
    arch, quant, engine, context, batch, kvb, dev, start, stop, first, last, count, order, serve, rows = key
    part = Part(range(start, stop), first, last)
    build = partial(_phases(engine, serve), rows=rows) if rows else _phases(engine, serve)
    tensors, phases = build(arch, quant, context, batch, kvb, dev, part, simulated_layers(arch, part.layers, count),
                            prompt, whole)
    persistent = sum(block_size(n) for _, n in tensors if n > 0)
    if loaded is not None:
        # The runtime starts where the load left the allocator (_after_load); its reserve is the most the
        # device held at any point, weights included, less the weights.
        allocator, weights = loaded
        state = _after_load(allocator, tensors, engine)
        held = max(allocator.peak_reserved, state.peak_reserved,
                   *(replay(p, state).peak_reserved + other_pools for p, other_pools in phases))
        return held - weights, persistent
    return max(persistent + max(peak_live(p) for p, _ in phases), _cpu_load_peak(arch, quant, stop - start)), \
        persistent


def _phases(engine: str, serve: bool):
    """The builder of a runtime's kept tensors and phases: a run of `batch` sequences, or a server of them."""
    if engine == FAST:
        return _engine_serve_phases if serve else _engine_phases
    return _transformers_serve_phases if serve else _transformers_phases


def _after_load(loaded: CachingAllocator, tensors: list[tuple[str, int]], engine: str) -> CachingAllocator:
    """The allocator when the first phase starts: the engine allocates its tables and KV cache right after
    loading, into what the load left cached; then Session's _start_phase gives wholly free segments back,
    makes the cuBLAS workspace and empties the cache again (transformers allocates its StaticCache and the
    prompt's ids only after that)."""
    a = loaded.fork()
    runtime = [n for label, n in tensors if label != "cublas_workspace" and n > 0]
    workspace = [n for label, n in tensors if label == "cublas_workspace" and n > 0]
    if engine == FAST:
        _keep(a, runtime)
    a.empty_cache()
    _keep(a, workspace)
    a.empty_cache()
    if engine != FAST:
        _keep(a, runtime)
    return a


def _keep(a: CachingAllocator, sizes: list[int]) -> None:
    """Allocate tensors for good, in order (a run of one size at once: the layers' keys and values)."""
    for n, same in groupby(sizes):
        a.keep(n, len(list(same)))


@lru_cache(maxsize=256)
def _cpu_load_peak(arch: Architecture, quant: str, layers: int) -> int:
    """On a CPU (no caching allocator keeps blocks), what loading `layers` layers holds beyond their weights
    at its peak: each MoE layer's experts arriving and being quantized in turn (load_program.expert_load).
    Nothing for a dense model, whose tensors go to RAM and are quantized one at a time."""
    if not arch.num_experts:
        return 0
    p = Program()
    for _ in range(layers):
        expert_load(p, arch, quant)
    return peak_live(p) - sum(live_sizes(p))


def _kv_tensors(arch: Architecture, layers: Sequence[int], context: int, batch: int, kvb: int, engine: str
                ) -> list[tuple[str, int]]:
    heads, key, value = arch.kv_layout
    per_key, per_value = heads * key * kvb * batch, heads * value * kvb * batch
    out = []
    for i in layers:
        positions = context if engine == FAST else min(context, arch.layer_windows[i] or context)
        out += [("keys", per_key * positions), ("values", per_value * positions)]
    return out


def _sampling(p: Program, batch: int, vocab: int) -> None:
    """Sampling.choose on the last logits: fp32 copies, then the token ids."""
    copies = [p.alloc("sample", FP32 * batch * vocab) for _ in range(SAMPLING_FP32_COPIES)]
    tok = p.alloc("token", INT64 * batch)
    p.free(*copies)
    p.free(tok)


# --- transformers -------------------------------------------------------------------------------------

def _transformers_phases(arch: Architecture, quant: str, context: int, batch: int, kvb: int, dev: _Device,
                         part: Part, layers: Sequence[int], prompt: int | None = None, whole: bool = True,
                         rows: int = 0) -> tuple[list[tuple[str, int]], list[tuple[Program, int]]]:
    """Session.steps on transformers for prompts of `prompt` tokens (the context by default) in chunks of
    `rows` tokens (0: prefill_chunk's): (the tensors it
    keeps: cuBLAS workspace, the StaticCache, the prompt ids; the phases after them, each after empty_cache():
    every kind of prefill chunk, then a decode step of each kind, decode_positions; without `whole`, the last
    prefill chunk alone; for a block-FP8 checkpoint kept as stored, these once for each way its matmuls may
    run). A middle chunk like the last one, which adds only the logits, is left to the last."""
    prompt = context if prompt is None else prompt
    persistent = ([("cublas_workspace", cublas_workspace_bytes(dev.compute_capability))] if dev.cuda else []) \
        + _kv_tensors(arch, part.layers, context, batch, kvb, TRANSFORMERS) \
        + ([("prompt_ids", INT64 * batch * prompt)] if part.first and dev.cuda else [])
    kinds: dict[tuple, Step] = {}
    chunk = rows or prefill_chunk(context)
    windows = sorted({w for w in arch.layer_windows if w})
    for start in range(0, prompt, chunk):
        step = Step(batch, min(chunk, prompt - start), start, context)
        last = start + chunk >= prompt
        kinds.setdefault((step.tokens, start == 0, last, tuple(sliding_kv(w, step) for w in windows)), step)
    kinds = {k: v for k, v in kinds.items() if k[2] or ((k[1] or (k[0], False, True, k[3]) not in kinds) and whole)}
    phases = []
    for way in forward_precisions(arch, quant):  # a block-FP8 checkpoint kept as stored: each way it may run
        for (_, _, last, _), step in kinds.items():
            p = Program()
            transformers_forward(p, arch, way, step, part, layers, logits=last, native_fp8=dev.native_fp8)
            phases.append((p, 0))
        for position in decode_positions(windows, prompt, context) if whole else ():
            p = Program()
            previous = p.alloc("logits", BF16 * batch * arch.vocab_size) if part.last else None
            if part.last:
                _sampling(p, batch, arch.vocab_size)
            transformers_forward(p, arch, way, Step(batch, 1, position, context), part, layers, logits=True,
                                 native_fp8=dev.native_fp8)
            p.free(previous)
            phases.append((p, 0))
    return persistent, phases


def decode_positions(windows: Sequence[int], prompt: int, context: int) -> list[int]:
    """A position of each kind of decode step after a prompt of `prompt` tokens, to the cache's last one: a
    sliding layer's StaticCache rolls from its window's end on and writes in place before it (_cache_update),
    so a step before a window's end and one after it differ. The last position always (a prompt of the whole
    context decodes nothing, and the plan still counts a step)."""
    ends = sorted({min(w, context) - 1 for w in windows})
    return [end for end in ends if prompt <= end < context - 1] + [context - 1]


def _transformers_serve_phases(arch: Architecture, quant: str, context: int, batch: int, kvb: int, dev: _Device,
                               part: Part, layers: Sequence[int], prompt: int | None = None, whole: bool = True,
                               rows: int = 0) -> tuple[list[tuple[str, int]], list[tuple[Program, int]]]:
    """transformers serving up to `batch` sequences (Workload.serve), one forward at a time: each sequence
    keeps a StaticCache of its own at the context; the forwards are one sequence's, as Session.steps runs
    them at batch 1 (_transformers_phases of a `prompt`-token prompt in chunks of `rows`)."""
    persistent, phases = _transformers_phases(arch, quant, context, 1, kvb, dev, part, layers, prompt, whole, rows)
    others = _kv_tensors(arch, part.layers, context, 1, kvb, TRANSFORMERS) * (batch - 1)
    return persistent + others, phases


# --- heavylift's engine -------------------------------------------------------------------------------

def _engine_phases(arch: Architecture, quant: str, context: int, batch: int, kvb: int, dev: _Device,
                   part: Part, layers: Sequence[int], prompt: int | None = None, whole: bool = True,
                   rows: int = 0) -> tuple[list[tuple[str, int]], list[tuple[Program, int]]]:
    """Session.steps on the engine for prompts of `prompt` tokens (the context by default), `rows` tokens of a
    chunk at a time through the device's layers (0: the whole chunk): (the tensors it keeps: RoPE tables, the
    static KV cache, the cuBLAS workspace; its phases: one sequence's prefill, every chunk of it (the engine
    caches its blocks between them), after the earlier sequences' logits; then (but without `whole`), after
    empty_cache(), the decode buffers and a step, with what the warm-up side stream and the captured graph keep
    in their own pools)."""
    v = arch.vocab_size
    p = Program()
    if part.last:
        for _ in range(batch - 1):
            p.alloc("slot_logits", FP32 * v)
    prompt = context if prompt is None else prompt
    engine_prefill(p, arch, quant, prompt, prefill_chunk(prompt), layers, part, dev.native_fp8, dev.cuda, rows)
    if part.last:
        p.alloc("logits_cat", FP32 * batch * v)
    persistent = _engine_persistent(arch, quant, context, batch, kvb, dev, part)
    if not whole:
        return persistent, [(p, 0)]
    step = _decode_step(arch, quant, batch, dev, part, layers)
    return persistent, [(p, 0), (_decode_phase(arch, batch, part, _decode_buffers(arch, batch, part), step),
                             _graph_pools(quant, batch, batch, dev, part, step))]


def _engine_serve_phases(arch: Architecture, quant: str, context: int, batch: int, kvb: int, dev: _Device,
                         part: Part, layers: Sequence[int], prompt: int | None = None, whole: bool = True,
                         rows: int = 0
                         ) -> tuple[list[tuple[str, int]], list[tuple[Program, int]]]:
    """The engine serving up to `batch` sequences (Workload.serve): it keeps the KV cache of `batch` sequences,
    its decode buffers allocated once at `batch` (smaller batches are views of them) with each device's
    `active` [batch] bool, `positions` [batch] int32, `last` (one int32) and a mixed step's rows, `row_slots`
    [batch] int64 and `lengths` [batch] int32, and one pool for every captured graph, decode and mixed (the
    `batch` step's; the side stream also autotunes the Triton kernels of the one-sequence step). Its phases, on top of those:
    a new sequence's prefill (a prompt of `prompt` tokens, by default context - 1, the longest that leaves room
    for one token out) while the last decode step's fp32 logits [batch, vocab] stay live; then (but without
    `whole`) a decode step at `batch`."""
    buffers = _decode_buffers(arch, batch, part) + [("active", batch), ("positions", INT32 * batch), ("last", INT32),
                                                    ("row_slots", INT64 * batch), ("lengths", INT32 * batch)]
    p = Program()
    if part.last:
        p.alloc("logits", FP32 * batch * arch.vocab_size)
    prompt = max(1, context - 1) if prompt is None else prompt
    engine_prefill(p, arch, quant, prompt, prefill_chunk(prompt), layers, part, dev.native_fp8, dev.cuda, rows)
    step = _decode_step(arch, quant, batch, dev, part, layers)
    pools = _graph_pools(quant, batch, 1, dev, part, step)
    persistent = _engine_persistent(arch, quant, context, batch, kvb, dev, part) + buffers
    return persistent, [(p, pools)] + ([(_decode_phase(arch, batch, part, [], step), pools)] if whole else [])


def _engine_persistent(arch: Architecture, quant: str, context: int, batch: int, kvb: int, dev: _Device,
                       part: Part) -> list[tuple[str, int]]:
    """The tensors the engine keeps from its start: int8 row scales, RoPE tables, the static KV cache, the
    cache lengths and the cuBLAS workspace."""
    h, nh, nkv, d = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    # weights.from_linear shares every weight's storage but divides LLM.int8's row scales by 127: a new
    # fp32 scale per output row of each linear.
    scales = [("int8_scale", FP32 * n) for _ in part.layers for n in (nh * d, nkv * d, nkv * d, h,
              arch.intermediate_size, arch.intermediate_size, h)] if quant == "int8" else []
    return scales + [("rope_cos", BF16 * context * d // 2), ("rope_sin", BF16 * context * d // 2)] \
        + _kv_tensors(arch, part.layers, context, batch, kvb, FAST) + [("seq_len", INT32 * batch)] \
        + ([("cublas_workspace", cublas_workspace_bytes(dev.compute_capability))] if dev.cuda else [])


def _decode_buffers(arch: Architecture, batch: int, part: Part) -> list[tuple[str, int]]:
    """Engine._buffers(batch) on one device: the static inputs and outputs of a captured decode step."""
    h, nh, nkv, d, v = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size
    splits = DECODE_SPLITS_MAX
    buffers = [("hidden", BF16 * batch * h)] * 3 + [
        ("qkv", BF16 * batch * (nh + 2 * nkv) * d), ("q", BF16 * batch * nh * d), ("attn", BF16 * batch * nh * d),
        ("act", BF16 * batch * arch.intermediate_size), ("slots", INT32 * batch),
        ("o_part", FP32 * batch * nh * splits * d), ("m_part", FP32 * batch * nh * splits),
        ("l_part", FP32 * batch * nh * splits)]
    if part.first:
        buffers.append(("tokens", INT64 * batch))
    if part.last:
        buffers += [("final", BF16 * batch * h), ("logits", BF16 * batch * v)]
    return buffers


def _decode_step(arch: Architecture, quant: str, batch: int, dev: _Device, part: Part,
                 layers: Sequence[int]) -> Program:
    step = Program()
    engine_decode_step(step, arch, quant, batch, layers, part, dev.native_fp8)
    return step


def _decode_phase(arch: Architecture, batch: int, part: Part, buffers: list[tuple[str, int]],
                  step: Program) -> Program:
    """A decode step on the default stream: the previous logits sampled, `buffers` allocated (Engine._buffers
    on the first step; none where they already exist), the warm-up where it runs on this stream, and the
    new logits in fp32."""
    v = arch.vocab_size
    p = Program()
    previous = p.alloc("logits", FP32 * batch * v) if part.last else None
    if part.last:
        _sampling(p, batch, v)
    for label, n in buffers:
        p.alloc(label, n)
    if not part.first:  # the warm-up runs here on the default stream (its side stream is the first device's)
        p.extend(step)
    if part.last:
        p.alloc("logits", FP32 * batch * v)  # st["logits"].float()
        p.free(previous)
    return p


def _graph_pools(quant: str, batch: int, smallest: int, dev: _Device, part: Part, step: Program) -> int:
    """What the first decode steps leave in pools of their own, which the default stream never reuses: the
    captured graph's private pool (the `batch` step's), and on the first device the warm-up's side stream,
    where Triton autotunes with its L2-flush buffer when a step of `smallest` sequences runs its kernels."""
    if not dev.cuda:
        return 0
    workspace = cublas_workspace_bytes(dev.compute_capability)
    cublas = part.last or not decode_uses_kernels(quant, batch)  # lm_head's torch.mm, TorchOps' F.linear
    graph = replay(step).peak_reserved + (workspace if cublas else 0)
    if not part.first:
        return graph
    return 2 * graph + (TRITON_BENCH_BUFFER_BYTES if decode_uses_kernels(quant, smallest) else 0)
