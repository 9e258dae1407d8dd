"""The cheapest fixes for a training plan that does not fit, and the headroom of one that does.

Each fix changes one thing (checkpointing on, a smaller micro-batch made up by accumulation, a shorter
sequence, more GPUs of the same card) and is named only when the training plan with that change fits, by the
same split and the same count (TrainingLayout.margin). The searches return boundaries: the micro-batch and the
sequence length advised fit and the next larger do not; the GPU count fits and one fewer does not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from heavylift.hardware.gpus import MAX_GPU_COUNT, Device, parse_gpu_spec
from .advice import context_grid, does_not_fit_line, gb, gpu_spec_item
from .training import TrainingLayout, TrainingPlan


def _variant(lay: TrainingLayout, **change) -> TrainingLayout:
    return TrainingLayout(lay.arch, lay.scheme, replace(lay.training, **change))


def _largest(values: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of ascending `values` that fits, where the values that fit come first; None if none does."""
    lo, hi = 0, len(values)  # values[:lo] fit, values[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(values[mid]):
            lo = mid + 1
        else:
            hi = mid
    return values[lo - 1] if lo else None


def longest_seq_len(lay: TrainingLayout, devices: Sequence[Device], reserve: int) -> int | None:
    """The longest sequence below the one planned, of the advice's grid (multiples of
    ADVICE_CONTEXT_STEP_TOKENS), that fits; None when even the shortest does not."""
    grid = [s for s in context_grid(0, lay.training.seq_len) if s < lay.training.seq_len]
    return _largest(grid, lambda s: _variant(lay, seq_len=s).margin(devices, reserve) >= 0)


def largest_micro_batch(lay: TrainingLayout, devices: Sequence[Device], reserve: int) -> int | None:
    """The largest micro-batch below the one planned that fits; None when even 1 does not."""
    sizes = list(range(1, lay.training.micro_batch))
    return _largest(sizes, lambda b: _variant(lay, micro_batch=b).margin(devices, reserve) >= 0)


def fewest_gpus(lay: TrainingLayout, device: Device, reserve: int) -> int | None:
    """The fewest cards like `device` (as --gpus names them) that hold the step, up to MAX_GPU_COUNT."""
    item = gpu_spec_item(device)
    counts = list(range(1, MAX_GPU_COUNT + 1))
    fits = {}

    def holds(n: int) -> bool:
        if n not in fits:
            fits[n] = lay.margin(parse_gpu_spec(f"{n}x{item}"), reserve) >= 0
        return fits[n]

    if not holds(MAX_GPU_COUNT):
        return None
    # the counts that do not fit come first here: the largest that does not, plus one
    short = _largest(counts, lambda n: not holds(n))
    return 1 if short is None else short + 1


def _accumulation(planned: int, fitting: int) -> int:
    return -(-planned // fitting)


def advise_training(lay: TrainingLayout, plan: TrainingPlan) -> tuple[str, ...]:
    devices, reserve, work = plan.devices, plan.reserve_bytes, plan.training
    tight = plan.tightest
    if plan.fits:
        out = [f"fits: {gb(tight.free_bytes)} left on the fullest device ({tight.device.name} "
               f"(#{tight.device.index}))"]
        if work.grad_checkpointing:
            spare = _variant(lay, grad_checkpointing=False).margin(devices, reserve)
            if spare >= 0:
                out.append(f"--no-grad-checkpointing also fits, with {gb(spare)} to spare: no layer runs twice")
        return tuple(out)
    out = [does_not_fit_line(tight)]
    if not work.grad_checkpointing:
        spare = _variant(lay, grad_checkpointing=True).margin(devices, reserve)
        if spare >= 0:
            out.append(f"use --grad-checkpointing: fits with {gb(spare)} to spare (each layer's forward runs "
                       "again in the backward)")
    if work.micro_batch > 1:
        batch = largest_micro_batch(lay, devices, reserve)
        if batch is not None:
            steps = _accumulation(work.micro_batch, batch)
            out.append(f"use --micro-batch {batch} with {steps} gradient accumulation steps: the largest "
                       f"micro-batch that fits, {batch * steps} sequences per optimizer step")
    seq = longest_seq_len(lay, devices, reserve)
    if seq is not None:
        out.append(f"use --seq-len {seq}: the longest sequence that fits at micro-batch {work.micro_batch}")
    if devices[0].kind == "cuda":
        n = fewest_gpus(lay, devices[0], reserve)
        if n is not None and n > len(devices):
            out.append(f"use --gpus {n}x{gpu_spec_item(devices[0])}: the fewest of these that hold this step")
    if len(out) == 1:
        out.append(f"nothing tried fits: the frozen base alone takes {gb(sum(d.weights_bytes for d in plan.per_device))}; "
                   "add GPUs or pick a smaller model")
    return tuple(out)
