"""The memory plan: for each precision, what every device holds, whether it fits, and how fast it can decode.

Pure: an Architecture and a tuple of Devices in, frozen dataclasses out. No torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

from heavylift.model.architecture import Architecture, Role
from heavylift.model.prequantized import keeps_stored
from heavylift.defaults import MAX_BATCH, MAX_CONTEXT_TOKENS, PCIE_BANDWIDTH_BYTES_S, PREFILL_MIN_ROWS
from heavylift.errors import InvalidArgumentError
from heavylift.hardware.gpus import KIND_CUDA, Device
from .memory import ENGINES, FAST, TRANSFORMERS, RuntimeTerms, kv_cache_bytes, prefill_chunk, runtime_terms
from .contract import plan_to_json
from .placement import Costs, Split, balance, fill_with_offload
from heavylift.schemes import KV_DTYPES, SCHEMES, Scheme
from .forward_program import Part
from .lora import Adapter


@dataclass(frozen=True)
class Workload:
    context: int  # tokens per sequence: prompt + generation
    batch: int
    kv_dtype: str = "bf16"
    reserve_bytes: int = 0  # headroom left free on every device
    allow_offload: bool = False
    engine: str = TRANSFORMERS  # the runtime the plan describes: memory.FAST (heavylift's engine) or TRANSFORMERS
    # A server of `batch` sequences (`heavylift serve`) instead of one run of them: the plan counts what the
    # server holds (memory.py's serve phases), and each SchemePlan how many sequences it can serve.
    serve: bool = False
    # A LoRA adapter over the base (run/serve --adapter): its weights join their layers' and its forward's
    # transients the devices' (lora.py); None without one.
    adapter: Adapter | None = None

    def __post_init__(self) -> None:
        for name, most in (("context", MAX_CONTEXT_TOKENS), ("batch", MAX_BATCH)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"--{name} must be a positive whole number, not {value!r}")
            if value > most:
                raise InvalidArgumentError(f"--{name} {value:,} is beyond any model or server (at most {most:,}); "
                                           f"pass a smaller --{name}")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidArgumentError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, not {self.kv_dtype!r}")
        if self.reserve_bytes < 0:
            raise InvalidArgumentError("--reserve must not be negative")
        if not isinstance(self.serve, bool):
            raise InvalidArgumentError(f"serve must be True or False, not {self.serve!r}")
        if self.adapter is not None and not isinstance(self.adapter, Adapter):
            raise InvalidArgumentError(f"adapter must be a planner.lora.Adapter, not {type(self.adapter).__name__}")
        if self.engine not in ENGINES:
            raise InvalidArgumentError(f"the plan's engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")


@dataclass(frozen=True)
class DevicePlan:
    device: Device
    layers: range  # decoder layers held; empty when the device is unused
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    capacity_bytes: int  # memory the plan may fill: the device's memory less the reserve
    adapter_bytes: int = 0  # the LoRA adapter's weights on this device, part of weights_bytes
    # Where a whole chunk would not fit (prefill_rows_to_fit): the engine's prefill runs this many tokens of a
    # chunk at a time through this device's layers; transformers' forward prefills every prompt in chunks of
    # this many tokens, the same on every device. 0: whole chunks.
    prefill_rows: int = 0
    # The prompt length whose run these figures count, the one at which the device holds the most of those
    # prompt_lengths.prompt_lengths names; 0 on a device that holds no layer (or keeps them in CPU RAM).
    worst_prompt_tokens: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes


def tightest(per_device: Sequence[DevicePlan]):
    """The device plan with the fewest bytes free among those holding layers (all of them when none does): the
    one advice speaks of. Any device plan with `layers` and `free_bytes` (a training plan's too)."""
    used = [d for d in per_device if d.layers] or list(per_device)
    return min(used, key=lambda d: d.free_bytes)


@dataclass(frozen=True)
class SchemePlan:
    quant: str
    per_device: tuple[DevicePlan, ...]
    offload: DevicePlan | None  # layers left in CPU RAM, only with allow_offload
    decode_tok_s_upper_bound: float
    advice: tuple[str, ...] = ()
    engine: str = TRANSFORMERS  # the runtime these figures describe: memory.FAST or TRANSFORMERS
    # With Workload.serve: the most sequences of the context a server holds at once beside the weights on
    # every device without offload, up to defaults.SERVE_MAX_SEQS (0: not even one); None when not serving.
    max_concurrent_sequences: int | None = None

    @property
    def fits(self) -> bool:
        return all(d.free_bytes >= 0 for d in self.per_device)

    @property
    def offload_bytes(self) -> int:
        return self.offload.weights_bytes + self.offload.kv_cache_bytes if self.offload else 0

    def _sum(self, field: str) -> int:
        parts = self.per_device + ((self.offload,) if self.offload else ())
        return sum(getattr(d, field) for d in parts)

    @property
    def weights_bytes(self) -> int:
        return self._sum("weights_bytes")

    @property
    def kv_cache_bytes(self) -> int:
        return self._sum("kv_cache_bytes")

    @property
    def activation_bytes(self) -> int:
        return self._sum("activation_bytes")

    @property
    def overhead_bytes(self) -> int:
        return self._sum("overhead_bytes")

    @property
    def total_bytes(self) -> int:
        return self._sum("total_bytes")

    @property
    def tightest(self) -> DevicePlan:
        return tightest(self.per_device)


class Layout:
    """Byte counts of one architecture under one scheme, computed once and reused by every search."""

    def __init__(self, arch: Architecture, scheme: Scheme, adapter: Adapter | None = None):
        self.arch, self.scheme, self.adapter = arch, scheme, adapter
        stored = keeps_stored(arch.prequantized, scheme.name)
        self.layer_adapter = tuple(adapter.layer_bytes(i) if adapter else 0 for i in range(arch.num_layers))
        self.layer_weights = tuple(w + a for w, a in zip(_layer_weights(arch, scheme, stored), self.layer_adapter))
        by_role = {r: scheme.weights_bytes((t for t in arch.global_tensors() if t.role == r), stored) for r in Role}
        self.embedding = by_role[Role.EMBEDDING]
        self.head = by_role[Role.NORM] + by_role[Role.LM_HEAD]
        self.weights_bytes = sum(self.layer_weights) + self.embedding + self.head

    def kv_cache_bytes(self, layers: range, work: Workload) -> int:
        return kv_cache_bytes(self.arch, layers, work.context, work.batch, KV_DTYPES[work.kv_dtype], work.engine)

    def terms(self, device: Device, work: Workload, part: Part, every_layer: bool = False,
              every_prompt: bool | None = None, prefill_rows: int = 0) -> RuntimeTerms:
        """The runtime terms of `part` on `device` (memory.runtime_terms), with what the adapter's LoRA forwards
        add to its transients (transformers runs an adapted model; the largest forward is a prefill chunk, of one
        sequence when serving); `prefill_rows` as DevicePlan has it."""
        t = runtime_terms(self.arch, self.scheme.name, work.engine, work.context, work.batch,
                          KV_DTYPES[work.kv_dtype], device, part, every_layer, work.serve, every_prompt, prefill_rows)
        if self.adapter is None or work.engine != TRANSFORMERS:
            return t
        rows = (1 if work.serve else work.batch) * (prefill_rows or prefill_chunk(work.context))
        return replace(t, transient_bytes=t.transient_bytes + self.adapter.transient_bytes(part.layers, rows))

    def costs(self, devices: Sequence[Device], work: Workload) -> tuple[Costs, tuple[int, ...]]:
        """Bytes per layer (weights + KV), with the embeddings and the head, and each device's fixed cost.

        A device's transients and buffers depend on whether it runs the model's start (embeddings, masks)
        and end (final norm, logits): device 0 is costed as the start, later devices as the middle, and
        what running the end adds travels with the last layer. device_plan recounts each device exactly.
        """
        kvb = KV_DTYPES[work.kv_dtype]
        arch, n = self.arch, self.arch.num_layers
        per_layer = tuple(w + kv_cache_bytes(arch, [i], work.context, work.batch, kvb, work.engine)
                          for i, w in enumerate(self.layer_weights))
        everything = range(n)

        def fixed(device: Device, first: bool, last: bool) -> int:
            t = self.terms(device, work, Part(everything, first, last))
            return t.transient_bytes + t.overhead_bytes

        if len(devices) == 1:
            device_fixed = (fixed(devices[0], True, True),)
            end = 0
        else:
            device_fixed = tuple(fixed(d, i == 0, False) for i, d in enumerate(devices))
            end = max(0, fixed(devices[-1], False, True) - fixed(devices[-1], False, False))
        capacities = tuple(d.memory_bytes - work.reserve_bytes for d in devices)
        return Costs(per_layer, self.embedding, self.head + end, device_fixed), capacities

    def margin(self, devices: Sequence[Device], work: Workload) -> int:
        """The fit test of a plan without offload, exactly as SchemePlan.fits counts it: the fewest bytes any
        device keeps free once its run of the balanced split is counted by device_plan. Negative when the
        plan does not fit; then some device is at least that many bytes over, and the count stops early: at
        the first device over, or before placing anything when the weights and KV cache alone exceed every
        device's capacity together (by the mean shortfall per device)."""
        capacities = tuple(d.memory_bytes - work.reserve_bytes for d in devices)
        short = sum(capacities) - self.weights_bytes - self.kv_cache_bytes(range(self.arch.num_layers), work)
        if short < 0:
            return short // len(devices)
        costs, _ = self.costs(devices, work)
        return self.fitting_chunk(devices, balance(costs, capacities).layers, capacities, work)[1]

    def fitting_chunk(self, devices: Sequence[Device], runs: Sequence[range], capacities: Sequence[int],
                      work: Workload) -> tuple[int, int]:
        """(the tokens of the chunks transformers' forward prefills in, 0 for whole ones; the fewest bytes then
        free on any device, as _least_free). Whole chunks where they fit on every device, and on the engine, whose
        devices take fewer rows each where they must (device_plan). On transformers, whose forward takes each
        chunk through every device, on GPUs where whole chunks do not fit: the longest of prefill_rows_to_fit
        that fits on all, if one does."""
        free = self._least_free(devices, runs, capacities, work)
        if free >= 0 or work.engine != TRANSFORMERS or any(d.kind != KIND_CUDA for d in devices):
            return 0, free
        for rows in prefill_rows_to_fit(work):
            fewer = self._least_free(devices, runs, capacities, work, rows)
            if fewer >= 0:
                return rows, fewer
        return 0, free

    def _least_free(self, devices: Sequence[Device], runs: Sequence[range], capacities: Sequence[int],
                    work: Workload, chunk: int = 0) -> int:
        """The fewest bytes free on any device holding these runs, or the first shortfall found (`chunk` as
        device_plan takes it). Each device is first counted at the longest prompt alone, which holds no more than
        the worst prompt length: a device over there is over."""
        for device, run, capacity in zip(devices, runs, capacities):
            free = self.device_plan(device, run, capacity, work, every_prompt=False, chunk=chunk).free_bytes
            if free < 0:
                return free
        least = None
        for device, run, capacity in zip(devices, runs, capacities):
            free = self.device_plan(device, run, capacity, work, chunk=chunk).free_bytes
            if free < 0:
                return free
            least = free if least is None else min(least, free)
        return least

    def split(self, devices: Sequence[Device], work: Workload) -> tuple[Split, tuple[int, ...]]:
        """The balanced split; with offload allowed and that split over on some device, the devices filled
        in order and the rest left in CPU RAM."""
        costs, capacities = self.costs(devices, work)
        balanced = balance(costs, capacities)
        if work.allow_offload and self.fitting_chunk(devices, balanced.layers, capacities, work)[1] < 0:
            return fill_with_offload(costs, capacities), capacities
        return balanced, capacities

    def device_plan(self, device: Device, run: range, capacity: int, work: Workload,
                    every_prompt: bool = True, chunk: int = 0) -> DevicePlan:
        """What `device` holds running layers `run`: at the worst prompt length (prompt_lengths.py), or
        without `every_prompt` at the longest prompt alone; where it would not fit with the engine prefilling
        whole chunks, with the fewest passes over a chunk that fit (prefill_rows_to_fit), if any do. On
        transformers, with prompts prefilled in chunks of `chunk` tokens (0: whole chunks)."""
        n = self.arch.num_layers
        if not run:
            return DevicePlan(device, run, 0, 0, 0, 0, capacity)
        has_first, has_last = 0 in run, n - 1 in run
        weights = (sum(self.layer_weights[i] for i in run) + (self.embedding if has_first else 0)
                   + (self.head if has_last else 0))
        adapter = sum(self.layer_adapter[i] for i in run)

        def planned(rows: int) -> DevicePlan:
            t = self.terms(device, work, Part(run, has_first, has_last), every_layer=True, every_prompt=every_prompt,
                           prefill_rows=rows)
            return DevicePlan(device, run, weights, t.kv_cache_bytes, t.transient_bytes, t.overhead_bytes, capacity,
                              adapter, prefill_rows=rows, worst_prompt_tokens=t.prompt_tokens)

        whole = planned(0 if work.engine == FAST else chunk)
        if whole.free_bytes >= 0 or work.engine != FAST or device.kind != KIND_CUDA:
            return whole
        for rows in prefill_rows_to_fit(work):
            fewer = planned(rows)
            if fewer.free_bytes >= 0:
                return fewer
        return whole

    def plan(self, devices: Sequence[Device], work: Workload) -> SchemePlan:
        split, capacities = self.split(devices, work)
        chunk = 0 if split.offloaded else self.fitting_chunk(devices, split.layers, capacities, work)[0]
        per_device = tuple(self.device_plan(d, r, c, work, chunk=chunk)
                           for d, r, c in zip(devices, split.layers, capacities))
        offload = None
        if split.offloaded:
            cpu = replace(devices[0], index=-1, name="cpu (offload)", kind="cpu",
                          bandwidth_bytes_s=PCIE_BANDWIDTH_BYTES_S)
            offload = self.device_plan(cpu, split.offloaded, 0, work, every_prompt=False)
            offload = replace(offload, activation_bytes=0, overhead_bytes=0, worst_prompt_tokens=0)
        return SchemePlan(self.scheme.name, per_device, offload, self.decode_upper_bound(per_device, offload, work),
                          engine=work.engine)

    def decode_upper_bound(self, per_device: Sequence[DevicePlan], offload: DevicePlan | None,
                           work: Workload) -> float:
        """Batch-1 tokens/s if every byte read per token moved at full bandwidth: each device reads its
        weights (a single row of an untied embedding table) and one sequence's KV cache at full context;
        offloaded layers cross PCIe every token."""
        seconds = 0.0
        for d in per_device + ((offload,) if offload else ()):
            if not d.layers:
                continue
            read = d.weights_bytes + d.kv_cache_bytes // work.batch
            if 0 in d.layers and not self.arch.tie_word_embeddings:
                read -= self.embedding
            seconds += read / d.device.bandwidth_bytes_s
        return 1.0 / seconds if seconds else 0.0


@dataclass(frozen=True)
class Plan:
    model: str
    architecture: Architecture
    devices: tuple[Device, ...]
    workload: Workload
    schemes: tuple[SchemePlan, ...]
    recommended: str | None
    warnings: tuple[str, ...] = ()  # what holds in memory but not for the model (make.workload_warnings)

    @property
    def context(self) -> int:
        return self.workload.context

    @property
    def batch(self) -> int:
        return self.workload.batch

    def scheme(self, quant: str) -> SchemePlan:
        for s in self.schemes:
            if s.quant == quant:
                return s
        raise KeyError(quant)

    @cached_property
    def _json(self) -> dict:
        return plan_to_json(self)

    def to_json(self) -> dict:
        """The plan as `heavylift plan --json` prints it (contract.py)."""
        return self._json


def prefill_rows_to_fit(work: Workload) -> list[int]:
    """The tokens of a prefill chunk a device too tight for a whole one may run through its layers at a time
    (on transformers, the chunk every device takes), most first: half the chunk, a quarter, ... down to
    PREFILL_MIN_ROWS."""
    chunk = prefill_chunk(work.context)
    rows, out = chunk // 2, []
    while rows >= PREFILL_MIN_ROWS:
        out.append(rows)
        rows //= 2
    return out


def _layer_weights(arch: Architecture, scheme: Scheme, as_stored: bool = False) -> tuple[int, ...]:
    """Each decoder layer's weights in `scheme`, weighed once per kind of layer: layers whose tensors have
    the same shapes, roles and fusing weigh the same."""
    weighed: dict[tuple, int] = {}
    out = []
    for i in range(arch.num_layers):
        tensors = arch.layer_tensors(i)
        fused: dict[str, int] = {}
        kind = tuple((t.shape, t.role, None if t.fused_into is None else fused.setdefault(t.fused_into, len(fused)),
                      t.keep_fp32, t.stored and tuple(s for _, s in t.stored)) for t in tensors)
        if kind not in weighed:
            weighed[kind] = scheme.weights_bytes(tensors, as_stored)
        out.append(weighed[kind])
    return tuple(out)


def layout(arch: Architecture, quant: str, adapter: Adapter | None = None) -> Layout:
    """The Layout of `arch` in the precision named `quant`, with `adapter`'s weights where one is given."""
    return Layout(arch, SCHEMES[quant], adapter)
