"""`heavylift.plan()`: the planner's front door, from a model name and a GPU description."""

from __future__ import annotations

from typing import Sequence

from .defaults import DEFAULT_BATCH, DEFAULT_CONTEXT_TOKENS
from .errors import GpuSpecError, InvalidArgumentError
from .hardware.gpus import Device, parse_bytes, parse_gpu_spec
from .planner.memory import TRANSFORMERS
from .planner.make import make_plan
from .planner.plan import Plan, Workload
from .schemes import ALL, QUANT_CHOICES
from .planner.runtimes import AUTO, check_choice, described_devices_reason, planned_runtime
from .model.source import resolve_model


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


def _reserve_bytes(reserve: int | str) -> int:
    if not isinstance(reserve, str):
        return reserve
    try:
        return parse_bytes(reserve)
    except GpuSpecError as e:
        raise GpuSpecError(f"--reserve: {e}") from None


def plan(model: str, gpus: str | Sequence[Device] | None = None, context: int = DEFAULT_CONTEXT_TOKENS,
         batch: int = DEFAULT_BATCH, quant: str | Sequence[str] = ALL, reserve: int | str = 0,
         kv_dtype: str = "bf16", allow_offload: bool = False, engine: str = AUTO) -> Plan:
    """Plan `model` on `gpus` for every precision in `quant`, reading only config.json and headers, each
    for the runtime `heavylift run --engine ENGINE` would run it on (runtimes.planned_runtime)."""
    check_choice(engine)
    work = Workload(context=context, batch=batch, kv_dtype=kv_dtype, reserve_bytes=_reserve_bytes(reserve),
                    allow_offload=allow_offload)
    quants = resolve_quants(quant)
    source = resolve_model(model)
    devices = resolve_devices(gpus)
    return make_plan(model, source.architecture, devices, work, quants,
                     _runtimes(source.config, quants, engine, [d.kind for d in devices]))


def _runtimes(config, quants: Sequence[str], engine: str, kinds: Sequence[str]) -> dict[str, str]:
    """Each precision's runtime. --engine fast is refused (one line) only where no precision asked for can run
    on the engine; among several, one it cannot run (fp16) is planned on transformers, as auto would."""
    reason, all_cpu = described_devices_reason(kinds), all(k == "cpu" for k in kinds)
    engines, refusals = {}, []
    for q in quants:
        try:
            engines[q] = planned_runtime(config, q, engine, reason, all_cpu)
        except InvalidArgumentError as e:
            refusals.append(e)
            engines[q] = TRANSFORMERS
    if refusals and len(refusals) == len(quants):
        raise refusals[0]
    return engines
