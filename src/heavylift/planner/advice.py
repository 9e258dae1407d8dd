"""The cheapest fixes for a plan that does not fit, and the headroom of one that does.

Each piece of advice comes from planning the variation it names (another precision, a shorter context, a
smaller batch, more GPUs of the same card) with the same Layout and the same exact fit test as the plan it
advises on (Layout.margin: the balanced split, every device counted as its plan counts it), so applying the
advice gives a plan that fits without offload. Each search returns a boundary: the value advised fits, and
the next one past it does not (one GPU fewer; one sequence more; the next context of context_grid).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import replace
from decimal import ROUND_UP, Decimal
from typing import Callable, Mapping, Sequence

from heavylift.defaults import ADVICE_CONTEXT_STEP_TOKENS, GB, SERVE_MAX_SEQS, GiB
from heavylift.hardware.gpus import MAX_GPU_COUNT, Device, lookup_gpu, parse_bytes, parse_gpu_spec
from heavylift.model.architecture import QUANTIZABLE_ROLES
from heavylift.schemes import UNQUANTIZED_BYTES as BF16_BYTES
from .contract import device_id
from .memory import FAST, prefill_chunk
from .plan import DevicePlan, Layout, SchemePlan, Workload

# A card the catalog lacks is advised by its memory (--gpus 4x23.5GB) with at most this many decimals: ten
# resolve a single byte in GiB (1.07e9 bytes) and in GB.
GPU_SIZE_MAX_DECIMALS = 10


def gb(nbytes: float) -> str:
    """A size in an advice line, with its unit."""
    return f"{nbytes / GB:.1f} GB"


def does_not_fit_line(tight) -> str:
    """Advice's first line where a plan does not fit: its tightest device (plan.tightest) and by how much."""
    return (f"does not fit: {tight.device.name} (#{tight.device.index}) is {gb(-tight.free_bytes)} over its "
            f"{gb(tight.capacity_bytes)}")


def context_grid(above: int, up_to: int) -> list[int]:
    """The contexts advice names in (above, up_to]: the multiples of ADVICE_CONTEXT_STEP_TOKENS, then up_to."""
    step = ADVICE_CONTEXT_STEP_TOKENS
    return list(range((above // step + 1) * step, up_to, step)) + ([up_to] if up_to > above else [])


def next_context(context: int, ceiling: int) -> int:
    """The context after `context` in context_grid(0, ceiling): the next multiple of the step, or `ceiling`."""
    return min((context // ADVICE_CONTEXT_STEP_TOKENS + 1) * ADVICE_CONTEXT_STEP_TOKENS, ceiling)


def gpu_spec_item(device: Device) -> str:
    """How --gpus names a card like `device`: its catalog key, or else its memory size ("48GB", "24GiB"): the
    shortest decimal in GB or GiB that --gpus reads back as the same number of bytes."""
    model = lookup_gpu(device.name)
    if model is not None:
        return model.key
    spellings = []
    for unit, size in (("GB", GB), ("GiB", GiB)):
        exact = Decimal(device.memory_bytes) / size
        for places in range(GPU_SIZE_MAX_DECIMALS + 1):
            text = f"{exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_UP).normalize():f}{unit}"
            if parse_bytes(text) == device.memory_bytes:
                spellings.append(text)
                break
    return min(spellings, key=len)


class _Margins:
    """Layout.margin of each value of one variable, each computed once. A value known not to fit whose margin
    was never computed (a GPU count too small for the weights) is recorded as None."""

    def __init__(self, margin_of: Callable[[int], int], known: Mapping[int, int | None]):
        self._margin_of, self._known = margin_of, dict(known)

    def of(self, value: int) -> int | None:
        if value not in self._known:
            self._known[value] = self._margin_of(value)
        return self._known[value]

    def fits(self, value: int) -> bool:
        margin = self.of(value)
        return margin is not None and margin >= 0


def _edge(values: Sequence[int], margins: _Margins, good: int, bad: int) -> int:
    """Narrow the indices `good` (its value fits) and `bad` (its value does not) until they are adjacent, and
    return the fitting one. Each probe goes where the margin, interpolated linearly between the two ends,
    crosses zero; it bisects instead where an end's margin is unknown or the last two probes did not halve
    the bracket, so a margin far from linear costs at most three probes per halving."""
    widths: list[int] = []  # the bracket's width before each probe
    while abs(bad - good) > 1:
        width = abs(bad - good)
        at_good, at_bad = margins.of(values[good]), margins.of(values[bad])
        if at_good is None or at_bad is None or (len(widths) >= 2 and 2 * width > widths[-2]):
            probe = (good + bad) // 2
        else:
            offset = min(width - 1, max(1, width * at_good // (at_good - at_bad)))
            probe = good + offset if bad > good else good - offset
        widths.append(width)
        if margins.fits(values[probe]):
            good = probe
        else:
            bad = probe
    return good


def _largest(values: Sequence[int], margins: _Margins, guess: float | None = None) -> int | None:
    """The largest of ascending `values` that fits, read as fitting up to one point: the value returned fits
    and the next does not (or it is the last); None when the first does not fit. `guess`, where given, is a
    value expected to fit, probed before the first value so the bracket starts narrow."""
    last = len(values) - 1
    if margins.fits(values[last]):
        return values[last]
    bad = last
    if guess is not None and guess >= values[0]:
        at = min(last - 1, bisect_right(values, guess) - 1)
        if at >= 0 and margins.fits(values[at]):
            return values[_edge(values, margins, at, bad)]
        bad = max(at, 0)
    if not margins.fits(values[0]):
        return None
    return values[_edge(values, margins, 0, bad)] if bad > 0 else values[0]


def _shrunk(plan: SchemePlan, value: int) -> float | None:
    """Where a plan over its capacity would fit if its fullest device lost KV cache in proportion to `value`
    (its context or its batch): KV cache alone shrinks this linearly, and what else grows with them only
    moves the fit lower, so the value is usually one that fits. None when the plan offloads."""
    if plan.offload:
        return None
    tight = min(plan.per_device, key=lambda d: d.free_bytes)
    if tight.kv_cache_bytes <= 0:
        return None
    return value * (1 + tight.free_bytes / tight.kv_cache_bytes)


def longest_context(lay: Layout, devices: Sequence[Device], work: Workload, plan: SchemePlan) -> int | None:
    """The longest context of context_grid(0, work.context) below work.context that fits at work.batch, where
    `plan` (work's) does not fit."""
    margins = _Margins(lambda c: lay.margin(devices, replace(work, context=c)), {work.context: _least_free(plan)})
    return _largest(context_grid(0, work.context), margins, _shrunk(plan, work.context))


def room_for_context(lay: Layout, devices: Sequence[Device], work: Workload, margin: int, limit: int) -> int | None:
    """The longest context of context_grid(work.context, limit) that fits at work.batch, given that work
    fits with `margin` bytes to spare; None when none does."""
    margins = _Margins(lambda c: lay.margin(devices, replace(work, context=c)), {work.context: margin})
    found = _largest([work.context] + context_grid(work.context, limit), margins)
    return found if found != work.context else None


def largest_batch(lay: Layout, devices: Sequence[Device], work: Workload, plan: SchemePlan) -> int | None:
    """The largest batch below work.batch that fits at work.context, where `plan` (work's) does not fit."""
    margins = _Margins(lambda b: lay.margin(devices, replace(work, batch=b)), {work.batch: _least_free(plan)})
    return _largest(range(1, work.batch + 1), margins, _shrunk(plan, work.batch))


def most_sequences(lay: Layout, devices: Sequence[Device], work: Workload, plan: SchemePlan) -> int:
    """SchemePlan.max_concurrent_sequences: the most sequences of work.context a server (work.serve) holds at
    once, up to SERVE_MAX_SEQS: that many fit and one more does not; 0 when not even one fits. `plan` is
    work's (a server of work.batch sequences), whose margin is known. The first probe is where the KV cache
    alone would fill the fullest device; what else grows with the sequences moves the boundary a little
    lower, so the answer is usually that count or just below it."""
    margins = _Margins(lambda b: lay.margin(devices, replace(work, batch=b)), {work.batch: _least_free(plan)})
    counts, last = range(1, SERVE_MAX_SEQS + 1), SERVE_MAX_SEQS - 1
    guess = _shrunk(plan, work.batch)
    at = min(last, max(0, int(guess) - 1)) if guess else 0
    if not margins.fits(counts[at]):
        return counts[_edge(counts, margins, 0, at)] if at and margins.fits(counts[0]) else 0
    if at == last or not margins.fits(counts[at + 1]):
        return counts[at]
    return counts[last] if margins.fits(counts[last]) else counts[_edge(counts, margins, at + 1, last)]


def fewest_gpus(lay: Layout, device: Device, work: Workload) -> int | None:
    """The fewest cards like `device` (as `--gpus Nx{gpu_spec_item(device)}` gives them) that hold the model
    at this workload, up to the most --gpus accepts. Fewer than the weights and KV cache fill are not tried:
    they cannot fit. From there the count grows by 1, 2, 4, ... until one fits, then the bracket narrows."""
    item = gpu_spec_item(device)
    capacity = parse_gpu_spec(item)[0].memory_bytes - work.reserve_bytes
    if capacity <= 0:
        return None
    need = lay.weights_bytes + lay.kv_cache_bytes(range(lay.arch.num_layers), work)
    lowest = max(1, -(-need // capacity))
    if lowest > MAX_GPU_COUNT:
        return None
    margins = _Margins(lambda n: lay.margin(parse_gpu_spec(f"{n}x{item}"), work), {lowest - 1: None})
    bad, count = lowest - 1, lowest
    while not margins.fits(count):
        if count == MAX_GPU_COUNT:
            return None
        bad, count = count, min(MAX_GPU_COUNT, lowest + 2 * (count - lowest) + 1)
    counts = range(bad, count + 1)
    return counts[_edge(counts, margins, len(counts) - 1, 0)]


def _least_free(plan: SchemePlan) -> int | None:
    """The plan's Layout.margin without computing it again; None when it offloads (over by an unknown amount)."""
    return None if plan.offload else min(d.free_bytes for d in plan.per_device)


def prefill_rows_line(lay: Layout, d: DevicePlan, work: Workload) -> str:
    """What a device prefilling fewer tokens at a time than a chunk (DevicePlan.prefill_rows) costs: its layers
    run once per pass, and where the engine dequantizes its weights for the matmuls (ops.dense_linear: stored
    4-bit, INT8, FP8 without FP8 tensor cores), each pass after the first reads them as stored and writes them
    in bf16 again, a time no shorter than those bytes at the device's full memory bandwidth."""
    chunk = prefill_chunk(work.context)
    passes = -(-chunk // d.prefill_rows)
    line = (f"prefill: {device_id(d.device)} takes each {chunk}-token chunk through its {len(d.layers)} layers "
            f"{d.prefill_rows} tokens at a time to fit ({passes} passes")
    scheme = lay.scheme
    if not scheme.quantized or (scheme.name == "fp8" and d.device.native_fp8):
        return line + ")"
    seconds = (passes - 1) * _dequantized_seconds(lay, d)
    return f"{line}, the weights dequantized in each: at least +{seconds * 1e3:.0f} ms a chunk)"


def transformers_chunk_line(lay: Layout, plan: SchemePlan, work: Workload) -> str | None:
    """What prefilling in shorter chunks than prefill_chunk's on transformers (DevicePlan.prefill_rows, the
    same on every device) costs: a chunk's forward runs through every device's layers, and where they hold
    bitsandbytes' 4-bit weights (runtime/bnb_forward.py dequantizes a tile at a time) each chunk reads them as
    stored and writes them in bf16 again; None where the chunks are whole."""
    rows = min((d.prefill_rows for d in plan.per_device if d.prefill_rows), default=0)
    if not rows:
        return None
    chunk = prefill_chunk(work.context)
    chunks = -(-chunk // rows)
    line = (f"prefill: transformers takes prompts {rows} tokens at a time to fit, not {chunk} ({chunks} chunks "
            f"for {chunk} tokens")
    if not lay.scheme.four_bit:
        return line + ")"
    seconds = (chunks - 1) * sum(_dequantized_seconds(lay, d) for d in plan.per_device if d.layers)
    return f"{line}, the weights dequantized in each: at least +{seconds * 1e3:.0f} ms per {chunk} tokens)"


def _dequantized_seconds(lay: Layout, d: DevicePlan) -> float:
    """The least time `d` takes to dequantize its layers' stored weights once: read as stored and written in
    bf16 at the device's full memory bandwidth."""
    quantized = [t for i in d.layers for t in lay.arch.layer_tensors(i) if t.role in QUANTIZABLE_ROLES]
    moved = lay.scheme.weights_bytes(quantized) + BF16_BYTES * sum(t.numel for t in quantized)
    return moved / d.device.bandwidth_bytes_s


def _headroom(lay: Layout, plan: SchemePlan, devices: Sequence[Device], work: Workload) -> list[str]:
    tight = plan.tightest
    out = [f"fits: {gb(tight.free_bytes)} left on the fullest device ({tight.device.name}, #{tight.device.index})"]
    if plan.engine == FAST:
        out += [prefill_rows_line(lay, d, work) for d in plan.per_device if d.prefill_rows]
    elif line := transformers_chunk_line(lay, plan, work):
        out.append(line)
    limit = lay.arch.max_position_embeddings
    if limit > work.context:
        ctx = room_for_context(lay, devices, work, _least_free(plan), limit)
        if ctx is not None:
            out.append(f"room for --context {ctx} at batch {work.batch}"
                       + (" (the model's maximum)" if ctx == limit else ""))
    return out


def _offload_line(plan: SchemePlan) -> str:
    resident = [d for d in plan.per_device if d.layers]
    gpu_only = 1.0 / sum(d.weights_bytes / d.device.bandwidth_bytes_s for d in resident) if resident else 0.0
    return (f"offloads {gb(plan.offload_bytes)} to CPU RAM, read over PCIe every token: decode at most "
            f"{plan.decode_tok_s_upper_bound:.1f} tok/s (the GPU-resident part alone could do {gpu_only:.0f})")


def _nothing_fits_line(lay: Layout, devices: Sequence[Device], work: Workload) -> str:
    """Why not even the shortest context fits, and what is left to try."""
    capacity = sum(d.memory_bytes - work.reserve_bytes for d in devices)
    weights = lay.weights_bytes
    fix = "add GPUs" + ("" if work.allow_offload else " or pass --allow-offload to spill to CPU RAM (slow)")
    if weights > capacity:
        return f"the weights alone need {gb(weights)}, more than the {gb(capacity)} these devices hold; {fix}"
    return (f"even --context {context_grid(0, work.context)[0]} does not fit at batch {work.batch}: the weights "
            f"take {gb(weights)} of the {gb(capacity)} these devices hold, too little is left beside them for "
            f"the runtime; {fix}")


def advise(lay: Layout, plans: Mapping[str, SchemePlan], devices: Sequence[Device], work: Workload,
           order: Sequence[str]) -> tuple[str, ...]:
    quant = lay.scheme.name
    plan = plans[quant]
    if plan.fits and not plan.offload:
        return tuple(_headroom(lay, plan, devices, work))
    if plan.offload:
        out = [_offload_line(plan)]
    else:
        out = [does_not_fit_line(plan.tightest)]
    rank = order.index(quant) if quant in order else -1
    smaller = [q for q in order[rank + 1:] if q in plans and plans[q].fits and not plans[q].offload]
    if smaller:
        out.append(f"use --quant {smaller[0]}: fits with {gb(plans[smaller[0]].tightest.free_bytes)} to spare")
    ctx = longest_context(lay, devices, work, plan)
    if ctx is not None:
        out.append(f"use --context {ctx}: the longest context that fits in {quant} at batch {work.batch}")
    if work.batch > 1:
        batch = largest_batch(lay, devices, work, plan)
        if batch is not None:
            out.append(f"use --batch {batch}: the largest batch that fits in {quant} at context {work.context}")
    if devices[0].kind != "cpu":
        n = fewest_gpus(lay, devices[0], work)
        if n is not None and n > len(devices):
            out.append(f"use --gpus {n}x{gpu_spec_item(devices[0])}: the fewest of these that hold {quant} "
                       "at this context")
    if ctx is None and not smaller:
        out.append(_nothing_fits_line(lay, devices, work))
    return tuple(out)
