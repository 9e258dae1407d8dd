"""make_plan: every requested precision planned on the devices, with its advice, and the one to recommend;
make_training_plan: one QLoRA training step planned on the devices, with its advice."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from heavylift.hardware.gpus import Device
from heavylift.model.architecture import Architecture
from heavylift.model.prequantized import stored_note
from heavylift.schemes import SCHEMES, fidelity_order
from .advice import advise, most_sequences
from .plan import Plan, Workload, layout
from .training import Training, TrainingLayout, TrainingPlan
from .training_advice import advise_training


def make_plan(model: str, arch: Architecture, devices: Sequence[Device], work: Workload,
              quants: Sequence[str], engines: Mapping[str, str] | None = None) -> Plan:
    """Plan every requested scheme, attach advice (and for a server, how many sequences it serves), and pick
    the most faithful scheme that fits. `engines` gives a scheme's runtime where it differs from the
    workload's (runtimes.planned_runtime per precision)."""
    devices = tuple(devices)
    layouts = {q: layout(arch, q, work.adapter) for q in quants}
    works = {q: replace(work, engine=(engines or {}).get(q, work.engine)) for q in quants}
    plans = {q: lay.plan(devices, works[q]) for q, lay in layouts.items()}
    native_fp8 = all(d.native_fp8 for d in devices)
    order = fidelity_order(native_fp8, all(d.bf16_supported for d in devices))
    fitting = [q for q in order if q in plans and plans[q].fits and not plans[q].offload]
    schemes = tuple(replace(plans[q], advice=advise(layouts[q], plans, devices, works[q], order),
                            max_concurrent_sequences=most_sequences(layouts[q], devices, works[q], plans[q])
                            if work.serve else None) for q in quants)
    runtimes = {w.engine for w in works.values()}
    if len(runtimes) == 1:  # the plan's workload names the runtime when every scheme has the same
        work = replace(work, engine=runtimes.pop())
    return Plan(model, arch, devices, work, schemes, fitting[0] if fitting else None, workload_warnings(arch, work))


def workload_warnings(arch: Architecture, work: Workload) -> tuple[str, ...]:
    """What holds in memory but not for the model: a context longer than the positions it was trained on; and
    what a checkpoint stored quantized needs to run as planned (prequantized.stored_note)."""
    notes = (stored_note(arch.prequantized),) if arch.prequantized else ()
    if 0 < arch.max_position_embeddings < work.context:  # 0: the config does not say
        return (f"--context {work.context:,} is longer than the {arch.max_position_embeddings:,} positions "
                f"{arch.model_type} was trained on (max_position_embeddings): memory is planned, but text past "
                "that length degrades",) + notes
    return notes


def make_training_plan(model: str, arch: Architecture, devices: Sequence[Device], quant: str, training: Training,
                       reserve_bytes: int = 0) -> TrainingPlan:
    """The training plan of `arch` with its base in the 4-bit scheme `quant` on `devices`, with its advice."""
    devices = tuple(devices)
    lay = TrainingLayout(arch, SCHEMES[quant], training)
    plan = TrainingPlan(model, arch, devices, quant, training, reserve_bytes, lay.device_plans(devices, reserve_bytes),
                        lay.trainable_params)
    return replace(plan, advice=advise_training(lay, plan))
