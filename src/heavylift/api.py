"""The front doors: `heavylift.plan()` for any described GPUs, `heavylift.load()` for this machine.

Both take one path: resolve the model once, take the devices, decide each precision's runtime once
(runtimes.plan_runtimes) and plan once for it. load() then loads by that plan and never plans again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from .defaults import DEFAULT_BATCH, DEFAULT_CONTEXT_TOKENS, DEFAULT_RESERVE_BYTES, DEFAULT_TRAIN_QUANT
from .errors import GpuSpecError, InvalidArgumentError, PlanDoesNotFitError
from .hardware.gpus import Device, parse_bytes, parse_gpu_spec
from .model.prequantized import check_quant, check_stored_runs, installed_transformers
from .model.source import ModelSource, resolve_model
from .planner.fewest import Fewest, fewest_table
from .planner.make import make_plan, make_training_plan
from .planner.memory import FAST
from .planner.plan import Plan, SchemePlan, Workload
from .planner.runtimes import AUTO, Runtime, check_choice, plan_runtimes
from .planner.training import Training, TrainingPlan, check_trainable_quant
from .schemes import ALL, QUANT_CHOICES

BEST = "auto"  # --quant for load and run: the most faithful precision the plan fits


def resolve_devices(gpus: str | Sequence[Device] | None) -> tuple[Device, ...]:
    """A --gpus spec, devices already described, or (None) the devices of this machine."""
    if gpus is None:
        from .hardware.detect import detect_devices

        return tuple(detect_devices())
    if isinstance(gpus, str):
        return parse_gpu_spec(gpus)
    return tuple(gpus)


def resolve_quants(quant: str | Sequence[str]) -> tuple[str, ...]:
    names = QUANT_CHOICES if quant == ALL else ((quant,) if isinstance(quant, str) else tuple(quant))
    bad = [q for q in names if q not in QUANT_CHOICES]
    if bad or not names:
        raise InvalidArgumentError(f"--quant must be {ALL} or one of {', '.join(QUANT_CHOICES)}, not {bad[0] if bad else quant!r}")
    return names


def model_quants(model: str, arch, quants: tuple[str, ...], asked_all: bool) -> tuple[str, ...]:
    """The precisions of `quants` the model loads in: all of them, except those its family's code cannot run
    (families.Family.refuses) and, for a checkpoint stored quantized, those it does not accept
    (prequantized.ACCEPTED). `all` means the rest; naming another is refused in one line."""
    from .model.families import FAMILIES

    refused = FAMILIES[arch.model_type].refuses
    pre = arch.prequantized
    if asked_all:
        return tuple(q for q in quants if q not in refused and (pre is None or q in pre.accepted))
    for q in quants:
        check_quant(pre, q, model)
        if q in refused:
            rest = ", ".join(c for c in QUANT_CHOICES if c not in refused)
            raise InvalidArgumentError(f"{model} cannot run in {q}: {refused[q]}; use --quant {rest}")
    return quants


def _reserve_bytes(reserve: int | str) -> int:
    if not isinstance(reserve, str):
        return reserve
    try:
        return parse_bytes(reserve)
    except GpuSpecError as e:
        raise GpuSpecError(f"--reserve: {e}") from None


def _check_reserve(devices: Sequence[Device], reserve_bytes: int, asked: int | str) -> None:
    """A reserve that takes a device's whole memory leaves nothing to plan on: refuse it before planning."""
    for device in devices:
        if reserve_bytes >= device.memory_bytes:
            from .report.table import memory_label

            raise InvalidArgumentError(
                f"--reserve {asked} leaves nothing to plan on: {device.name} (#{device.index}) has "
                f"{memory_label(device.memory_bytes)}; reserve less than that")


@dataclass(frozen=True)
class Planned:
    """A model resolved once and planned once, with the runtime decided for each precision."""

    source: ModelSource
    plan: Plan
    runtimes: Mapping[str, Runtime]


def default_context(max_positions: int) -> int:
    """The context planned when none is asked for: DEFAULT_CONTEXT_TOKENS, or the model's own maximum when that
    is shorter (0: the config does not say)."""
    return min(DEFAULT_CONTEXT_TOKENS, max_positions) if max_positions else DEFAULT_CONTEXT_TOKENS


def _model_and_work(model: str, context: int | None, batch: int, quant, reserve, kv_dtype: str, allow_offload: bool,
                    engine: str, serve: bool, source: ModelSource | None = None
                    ) -> tuple[ModelSource, Workload, tuple[str, ...]]:
    """Check the arguments (before any I/O), then resolve the model (unless `source` is it, resolved already):
    its source, the workload with the context default_context gives it where none is asked for, and the
    precisions asked for."""
    check_choice(engine)
    work = Workload(context=DEFAULT_CONTEXT_TOKENS if context is None else context, batch=batch, kv_dtype=kv_dtype,
                    reserve_bytes=_reserve_bytes(reserve), allow_offload=allow_offload, serve=serve)
    quants = resolve_quants(quant)
    source = resolve_model(model) if source is None else source
    quants = model_quants(model, source.architecture, quants, quant == ALL)
    if context is None:
        work = replace(work, context=default_context(source.architecture.max_position_embeddings))
    return source, work, quants


def _front_door(model: str, gpus, here: bool, context: int | None, batch: int, quant, reserve, kv_dtype: str,
                allow_offload: bool, engine: str, serve: bool = False, adapter: Path | None = None,
                source: ModelSource | None = None) -> Planned:
    """Check the arguments, resolve the model, take the devices (`here`: this machine's, which --gpus only
    narrows; else the described ones), decide the runtimes, plan; with the LoRA adapter in the folder
    `adapter` checked against the model and counted (finetune.adapter.planned_adapter)."""
    source, work, quants = _model_and_work(model, context, batch, quant, reserve, kv_dtype, allow_offload, engine,
                                           serve, source)
    if adapter is not None:
        from .finetune.adapter import planned_adapter

        work = replace(work, adapter=planned_adapter(adapter, source.architecture, model))
    kernels = None  # described devices: a CUDA GPU is taken to run the engine's kernels
    if here:
        from .runtime.devices import kernels_reason, machine_devices

        devices = machine_devices(gpus)
        kernels = kernels_reason(devices)
    else:
        devices = resolve_devices(gpus)
    _check_reserve(devices, work.reserve_bytes, reserve)
    runtimes = plan_runtimes(source.config, source.architecture, devices, work, quants, engine, kernels)
    plan = make_plan(model, source.architecture, devices, work, quants, {q: r.name for q, r in runtimes.items()})
    return Planned(source, plan, runtimes)


def plan(model: str, gpus: str | Sequence[Device] | None = None, context: int | None = None,
         batch: int = DEFAULT_BATCH, quant: str | Sequence[str] = ALL,
         reserve: int | str = DEFAULT_RESERVE_BYTES,
         kv_dtype: str = "bf16", allow_offload: bool = False, engine: str = AUTO, serve: bool = False) -> Plan:
    """Plan `model` on `gpus` for every precision in `quant`, reading only config.json and headers, each
    for the runtime `heavylift run --engine ENGINE` would run it on (runtimes.plan_runtimes). `serve`: as a
    server of `batch` sequences, each precision saying how many it can serve (max_concurrent_sequences)."""
    return _front_door(model, gpus, False, context, batch, quant, reserve, kv_dtype, allow_offload, engine,
                       serve).plan


def plan_training(model: str, gpus: str | Sequence[Device] | None = None, quant: str = DEFAULT_TRAIN_QUANT,
                  training: Training = Training(), reserve: int | str = DEFAULT_RESERVE_BYTES, *,
                  source: ModelSource | None = None) -> TrainingPlan:
    """Plan one QLoRA fine-tuning step of `model` (`heavylift plan MODEL --train`): its base frozen in the 4-bit
    precision `quant`, LoRA adapters and the optimizer as `training` describes, on `gpus` (described, or None:
    this machine's), its layers split as an inference plan splits them. Per device the bytes at the step's
    peak, whether it fits, and advice. Reads only config.json and headers, as plan() does; `source`: `model`
    already resolved (model.source.resolve_model), not read again."""
    if not isinstance(training, Training):
        raise InvalidArgumentError(f"training must be a heavylift.Training, not {type(training).__name__}")
    check_trainable_quant(quant)
    reserve_bytes = _reserve_bytes(reserve)
    source = resolve_model(model) if source is None else source
    devices = resolve_devices(gpus)
    _check_reserve(devices, reserve_bytes, reserve)
    return make_training_plan(model, source.architecture, devices, quant, training, reserve_bytes)


def fewest(model: str, context: int | None = None, batch: int = DEFAULT_BATCH, quant: str | Sequence[str] = ALL,
           reserve: int | str = DEFAULT_RESERVE_BYTES, kv_dtype: str = "bf16", engine: str = AUTO,
           serve: bool = False) -> Fewest:
    """For each precision in `quant`, the fewest cards of each catalog GPU that hold `model` without offload
    (`heavylift plan --fewest`), beside the cards its weights alone fill; each precision planned for the
    runtime `heavylift plan --gpus Nx<card>` plans it for. Reads only config.json and headers."""
    source, work, quants = _model_and_work(model, context, batch, quant, reserve, kv_dtype, False, engine, serve)
    return fewest_table(model, source.config, source.architecture, work, quants, engine)


def _pick(plan: Plan, quant: str, allow_offload: bool) -> SchemePlan:
    """The scheme to load: `quant`, or (BEST) the plan's recommendation, else with --allow-offload the
    smallest that offloads; PlanDoesNotFitError with the plan's advice where it cannot fit."""
    chosen = plan.recommended if quant == BEST else quant
    if chosen is None and allow_offload:
        chosen = next((s.quant for s in reversed(plan.schemes) if s.offload), None)
    if chosen is None:
        raise PlanDoesNotFitError(f"{plan.model} does not fit in any precision: {'; '.join(plan.schemes[-1].advice)}")
    scheme = plan.scheme(chosen)
    if not scheme.fits and not scheme.offload:
        raise PlanDoesNotFitError(f"{plan.model} in {chosen} does not fit: {'; '.join(scheme.advice)}")
    return scheme


def prepare(model: str, quant: str = BEST, gpus: str | Sequence[Device] | None = None,
            context: int | None = None, batch: int = 1, allow_offload: bool = False,
            reserve: int | str = DEFAULT_RESERVE_BYTES, engine: str = AUTO, serve: bool = False,
            adapter: Path | None = None, *, source: ModelSource | None = None):
    """Plan `model` on this machine for the runtime that will run it and pick the precision, reading only
    config.json and headers: a runtime.prepared.Prepared, whose tokenizer and then weights load next.
    Refuses (one line) what cannot fit, before any download. `serve`: planned as a server of `batch`
    sequences (heavylift serve). `adapter`: a LoRA adapter folder applied over the base, checked against the
    model and counted in the plan. `source`: `model` already resolved (model.source.resolve_model), not read
    again."""
    if quant != BEST and quant not in QUANT_CHOICES:
        raise InvalidArgumentError(f"--quant must be {BEST} or one of {', '.join(QUANT_CHOICES)}, not {quant!r}")
    planned = _front_door(model, gpus, True, context, batch, ALL if quant == BEST else quant, reserve, "bf16",
                          allow_offload, engine, serve, adapter, source)
    scheme = _pick(planned.plan, quant, allow_offload)
    devices = planned.plan.devices
    native_fp8 = bool(devices) and all(d.kind == "cuda" and d.native_fp8 for d in devices)
    check_stored_runs(planned.source.architecture.prequantized, scheme.quant, native_fp8, installed_transformers())
    runtime = planned.runtimes[scheme.quant]
    if engine == FAST and runtime.name != FAST:  # among several precisions, the one picked is refused
        raise InvalidArgumentError(runtime.reason)
    from .runtime.prepared import Prepared

    return Prepared(planned.source, planned.plan, scheme, runtime, engine)


def load(model: str, quant: str = BEST, gpus: str | Sequence[Device] | None = None,
         context: int | None = None, batch: int = 1, allow_offload: bool = False,
         reserve: int | str = DEFAULT_RESERVE_BYTES, engine: str = AUTO):
    """Plan `model` on this machine for the runtime that will run it, stop before any download if it cannot
    fit, load it exactly as planned, and put the fast engine over it where it runs (`engine="auto"`), else
    transformers with the reason in `engine_note`: a runtime.session.Session (needs heavylift[run])."""
    return prepare(model, quant, gpus, context, batch, allow_offload, reserve, engine).load()
