"""The devices a run plans for and loads onto: this machine's, never a described set it lacks.

`heavylift plan --gpus` describes any machine; `heavylift run` plans for the one it runs on. Its --gpus
only selects and narrows: the first N of this machine's GPUs, each no larger than the description (a size
such as 40GB caps a card's memory; a card name must be the card that is there). The GPUs are those
torch can use (a CPU-only torch, or CUDA_VISIBLE_DEVICES, hides some); with none, the CPU and its RAM.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from heavylift.errors import GpuSpecError
from heavylift.hardware.gpus import KIND_CPU, KIND_CUDA, Device, cpu_device, lookup_gpu, parse_gpu_spec


def runtime_device(index: int) -> str:
    """The torch device that executes plan device `index`: its GPU, or the CPU on a machine without one."""
    return f"cuda:{index}" if torch.cuda.is_available() and index < torch.cuda.device_count() else KIND_CPU


def devices_here() -> tuple[Device, ...]:
    """This machine's GPUs that torch can use (NVML's figures, before CUDA starts), else its CPU."""
    from heavylift.hardware.detect import available_ram_bytes, detect_devices

    found = detect_devices()
    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [d for d in found if d.kind == KIND_CUDA][:usable]
    if gpus:
        return tuple(gpus)
    cpu = [d for d in found if d.kind == KIND_CPU]
    return tuple(cpu) or (cpu_device(available_ram_bytes()),)  # an Apple GPU: heavylift loads onto the CPU


def _same_card(wanted: Device, real: Device) -> bool:
    """Whether `wanted` (a --gpus card) can stand for `real`: the same catalog card, or a size (a card the
    catalog does not name, or the CPU's RAM) of the same kind no larger than the real one."""
    if wanted.kind != real.kind:
        return False
    named, there = lookup_gpu(wanted.name), lookup_gpu(real.name)
    if named is not None and wanted.kind == KIND_CUDA:
        return there is not None and named.key == there.key
    return wanted.memory_bytes <= real.memory_bytes


def _describe(devices: Sequence[Device]) -> str:
    if all(d.kind == KIND_CPU for d in devices):
        return "no GPU torch can use, only the CPU"
    names = [d.name for d in devices]
    return ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))


def machine_devices(gpus: str | Sequence[Device] | None) -> tuple[Device, ...]:
    """The devices a run plans for: this machine's, or the first of them narrowed by `gpus` (a --gpus
    spec or Devices); GpuSpecError (one line) where `gpus` describes devices this machine lacks."""
    here = devices_here()
    if gpus is None:
        return here
    wanted = parse_gpu_spec(gpus) if isinstance(gpus, str) else tuple(gpus)
    text = gpus if isinstance(gpus, str) else ",".join(d.name for d in wanted)
    if len(wanted) > len(here) or not all(_same_card(w, r) for w, r in zip(wanted, here)):
        raise GpuSpecError(f"--gpus {text} describes devices this machine lacks (it has {_describe(here)}); "
                           f"leave --gpus out to run on what is here, or plan for others with `heavylift plan --gpus {text}`")
    return tuple(dataclasses.replace(r, memory_bytes=min(r.memory_bytes, w.memory_bytes))
                 for w, r in zip(wanted, here))


def kernels_reason(devices: Sequence[Device]) -> str | None:
    """Why this process cannot run the fast engine's kernels on these devices (engine.device_reason on the
    torch devices they map to), or None."""
    from heavylift.engine import device_reason

    return device_reason([torch.device(runtime_device(d.index)) for d in devices])
