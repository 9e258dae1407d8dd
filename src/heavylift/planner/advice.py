"""The cheapest fixes for a plan that does not fit, and the headroom of one that does.

Each piece of advice is found by re-planning a variation (another precision, a shorter context, a
smaller batch, more GPUs of the same kind) and is stated with the flag that applies it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Sequence

from heavylift.hardware.gpus import Device
from .plan import Layout, SchemePlan, Workload

MAX_GPUS_ADVISED = 64  # the largest GPU count the advice searches


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with ok(n), given ok is monotone decreasing; lo - 1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def longest_context(lay: Layout, devices: Sequence[Device], work: Workload, limit: int) -> int:
    return _largest(1, limit, lambda c: lay.fits(devices, replace(work, context=c)))


def largest_batch(lay: Layout, devices: Sequence[Device], work: Workload, limit: int) -> int:
    return _largest(1, limit, lambda b: lay.fits(devices, replace(work, batch=b)))


def fewest_gpus(lay: Layout, device: Device, work: Workload) -> int | None:
    for n in range(1, MAX_GPUS_ADVISED + 1):
        if lay.fits([replace(device, index=i) for i in range(n)], work):
            return n
    return None


def _headroom(lay: Layout, plan: SchemePlan, devices: Sequence[Device], work: Workload) -> list[str]:
    tight = plan.tightest
    out = [f"fits: {gb(tight.free_bytes)} left on the fullest device ({tight.device.name}, #{tight.device.index})"]
    limit = lay.arch.max_position_embeddings
    if limit > work.context:
        ctx = longest_context(lay, devices, work, limit)
        if ctx > work.context:
            out.append(f"room for --context {ctx} at batch {work.batch}"
                       + (" (the model's maximum)" if ctx == limit else ""))
    return out


def advise(lay: Layout, plans: Mapping[str, SchemePlan], devices: Sequence[Device], work: Workload,
           order: Sequence[str]) -> tuple[str, ...]:
    quant = lay.scheme.name
    plan = plans[quant]
    if plan.fits and not plan.offload:
        return tuple(_headroom(lay, plan, devices, work))
    out: list[str] = []
    if plan.offload:
        gpu_only = 1.0 / sum(d.weights_bytes / d.device.bandwidth_bytes_s for d in plan.per_device if d.layers) \
            if any(d.layers for d in plan.per_device) else 0.0
        out.append(f"offloads {gb(plan.offload_bytes)} to CPU RAM, read over PCIe every token: decode at most "
                   f"{plan.decode_tok_s_upper_bound:.1f} tok/s (the GPU-resident part alone could do {gpu_only:.0f})")
    else:
        over = -plan.tightest.free_bytes
        out.append(f"does not fit: {plan.tightest.device.name} (#{plan.tightest.device.index}) is "
                   f"{gb(over)} over its {gb(plan.tightest.capacity_bytes)}")
    rank = order.index(quant) if quant in order else -1
    smaller = [q for q in order[rank + 1:] if q in plans and plans[q].fits and not plans[q].offload]
    if smaller:
        out.append(f"use --quant {smaller[0]}: fits with {gb(plans[smaller[0]].tightest.free_bytes)} to spare")
    ctx = longest_context(lay, devices, work, work.context - 1)
    if ctx >= 1:
        out.append(f"use --context {ctx}: the longest context that fits in {quant} at batch {work.batch}")
    if work.batch > 1:
        batch = largest_batch(lay, devices, work, work.batch - 1)
        if batch >= 1:
            out.append(f"use --batch {batch}: the largest batch that fits in {quant} at context {work.context}")
    if devices[0].kind != "cpu":
        n = fewest_gpus(lay, devices[0], work)
        if n is not None and n > len(devices):
            out.append(f"use --gpus {n}x{devices[0].name}: the fewest of these that hold {quant} at this context")
    if ctx < 1 and not smaller:
        out.append(f"the weights alone need {gb(lay.scheme.weights_bytes(lay.arch.tensors))}; "
                   "add GPUs or pass --allow-offload to spill to CPU RAM (slow)")
    return tuple(out)
