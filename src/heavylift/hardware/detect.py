"""What this machine has: NVIDIA GPUs (NVML, else nvidia-smi), else an Apple GPU, else the CPU.

Reads the driver's own counters and never initialises CUDA (no torch here): a CUDA context
would itself take hundreds of MiB of the memory being measured. Each source is split into
"run the command" and "parse its output" so the parsing is tested without the hardware.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess

from heavylift.defaults import GiB
from heavylift.errors import GpuSpecError
from .gpus import (
    GENERIC_GPU_BANDWIDTH_BYTES_S,
    KIND_CUDA,
    KIND_MPS,
    Device,
    bf16_supported,
    cpu_device,
    generic_device,
    gpu_catalog,
    lookup_gpu,
)

__all__ = ["detect_devices", "available_ram_bytes"]

NVIDIA_SMI_COMMAND = (
    "nvidia-smi",
    "--query-gpu=name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
)
# nvidia-smi answers in well under a second on a healthy driver; one that hangs for this long
# has a wedged driver, and waiting longer will not give a usable GPU.
NVIDIA_SMI_TIMEOUT_S = 10
NVIDIA_SMI_UNIT_BYTES = 1024**2  # with nounits, memory.total and memory.free are in MiB
# Memory other processes hold beyond which the plan fills free memory instead of the total. An
# idle datacenter GPU shows 0-10 MiB used, a desktop session a few hundred MiB; more than 1 GiB
# means another job, whose memory a plan must not count on.
BUSY_GPU_THRESHOLD_BYTES = 1 * GiB
SYSCTL_TIMEOUT_S = 5
# An Apple chip missing from the catalog: the 100 GB/s of a base M2 or M3, the low end of the
# line (Apple's chip pages), so speed estimates for an unknown chip err slow.
APPLE_FALLBACK_BANDWIDTH_BYTES_S = 100e9
MEMINFO_PATH = "/proc/meminfo"
MEMINFO_UNIT_BYTES = 1024  # /proc/meminfo says "kB" and means KiB (proc(5))


def detect_devices() -> tuple[Device, ...]:
    """This machine's NVIDIA GPUs, else its Apple GPU, else its CPU with the RAM available now."""
    nvidia = _detect_nvidia()
    if nvidia:
        return nvidia
    apple = _detect_apple()
    if apple is not None:
        return (apple,)
    return (cpu_device(available_ram_bytes()),)


# --- NVIDIA ---------------------------------------------------------------------------------


def _detect_nvidia() -> tuple[Device, ...]:
    rows = _query_nvml()
    if rows is not None:
        return tuple(_nvidia_device(index, *row) for index, row in enumerate(rows))
    text = _run_nvidia_smi()
    return _parse_nvidia_smi(text) if text is not None else ()


def _query_nvml() -> list[tuple[str, int, int]] | None:
    """(name, total bytes, free bytes) per GPU from NVML; None without pynvml or a driver."""
    try:
        import pynvml  # nvidia-ml-py, optional: the planner installs without it
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no NVIDIA driver here, so no NVIDIA GPUs to report
    try:
        return [_nvml_row(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _nvml_row(pynvml, index: int) -> tuple[str, int, int]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # nvidia-ml-py before 11.515 returns bytes
        name = name.decode()
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return name, int(memory.total), int(memory.free)


def _run_nvidia_smi() -> str | None:
    """nvidia-smi's CSV answer, or None where it is missing, fails or hangs (no usable GPU)."""
    try:
        done = subprocess.run(
            NVIDIA_SMI_COMMAND,
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _parse_nvidia_smi(text: str) -> tuple[Device, ...]:
    """Devices from `name, total MiB, free MiB` lines, numbered in nvidia-smi's order."""
    lines = [line for line in text.splitlines() if line.strip()]
    return tuple(_nvidia_device(index, *_smi_row(index, line)) for index, line in enumerate(lines))


def _smi_row(index: int, line: str) -> tuple[str, int, int]:
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 3 or not (fields[1].isdigit() and fields[2].isdigit()):
        raise GpuSpecError(
            f"nvidia-smi reports GPU {index} as {line.strip()!r}, without a memory size "
            "heavylift can read; describe the GPUs yourself, e.g. --gpus 2x48GB"
        )
    return fields[0], int(fields[1]) * NVIDIA_SMI_UNIT_BYTES, int(fields[2]) * NVIDIA_SMI_UNIT_BYTES


def _nvidia_device(index: int, name: str, total_bytes: int, free_bytes: int) -> Device:
    """A detected GPU: catalog figures where its name is known, generic ones otherwise."""
    busy = total_bytes - free_bytes > BUSY_GPU_THRESHOLD_BYTES
    usable = free_bytes if busy else total_bytes
    model = lookup_gpu(name)
    if model is None or model.kind != KIND_CUDA:
        card = generic_device(name, usable, index)
        return dataclasses.replace(card, total_bytes=total_bytes, free_bytes=free_bytes)
    return Device(
        index=index,
        name=name,
        kind=KIND_CUDA,
        # NVML's total includes ~0.5 GiB the driver keeps for itself; the catalog holds what
        # CUDA reports, where measured, and a plan cannot fill more than that.
        memory_bytes=min(usable, model.memory_bytes),
        total_bytes=total_bytes,
        bandwidth_bytes_s=model.bandwidth_bytes_s,
        native_fp8=model.native_fp8,
        bf16_supported=bf16_supported(KIND_CUDA, model.compute_capability),
        compute_capability=model.compute_capability,
        free_bytes=free_bytes,
    )


# --- Apple Silicon --------------------------------------------------------------------------


def _detect_apple() -> Device | None:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    chip = _sysctl("machdep.cpu.brand_string")  # e.g. "Apple M2 Ultra"
    memory = _sysctl("hw.memsize")  # bytes of unified memory
    if chip is None or memory is None or not memory.isdigit():
        return None
    return _apple_device(chip, int(memory))


def _sysctl(name: str) -> str | None:
    try:
        done = subprocess.run(
            ("sysctl", "-n", name), capture_output=True, text=True, timeout=SYSCTL_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _apple_device(chip: str, memory_bytes: int) -> Device:
    """The Apple GPU: this Mac's RAM times the share Metal lets the GPU wire by default."""
    model = lookup_gpu(chip)
    if model is not None and model.kind == KIND_MPS:
        fraction, bandwidth = model.usable_memory_fraction, model.bandwidth_bytes_s
    else:  # a chip the catalog lacks: its most cautious Apple share, a base chip's bandwidth
        apple = [m.usable_memory_fraction for m in gpu_catalog() if m.kind == KIND_MPS]
        fraction, bandwidth = min(apple), APPLE_FALLBACK_BANDWIDTH_BYTES_S
    return Device(
        index=0,
        name=chip,
        kind=KIND_MPS,
        memory_bytes=int(memory_bytes * fraction),
        total_bytes=memory_bytes,
        bandwidth_bytes_s=bandwidth,
        native_fp8=False,
        bf16_supported=True,
        compute_capability=None,
    )


# --- CPU ------------------------------------------------------------------------------------


def available_ram_bytes() -> int:
    """RAM the kernel could hand out now: MemAvailable, else what os.sysconf knows."""
    try:
        with open(MEMINFO_PATH, encoding="ascii") as meminfo:
            available = _parse_meminfo(meminfo.read())
    except OSError:
        available = None  # not Linux
    return available if available is not None else _sysconf_ram_bytes()


def _parse_meminfo(text: str) -> int | None:
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "MemAvailable:" and fields[1].isdigit():
            return int(fields[1]) * MEMINFO_UNIT_BYTES
    return None


def _sysconf_ram_bytes() -> int:
    names = getattr(os, "sysconf_names", {})
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # free pages where told, else all (macOS)
        if pages in names and "SC_PAGE_SIZE" in names:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    raise GpuSpecError(
        "cannot tell how much memory this machine has; describe the devices with --gpus instead"
    )
