"""The GPU catalog and the --gpus and --reserve grammars: text in, frozen Device records out.

Pure Python on purpose: the planner imports this without torch and without touching a GPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from importlib import resources

from heavylift.defaults import CPU_MEMORY_BANDWIDTH_BYTES_S, GB, GiB, MiB
from heavylift.errors import GpuSpecError

__all__ = ["Device", "GpuModel", "cpu_device", "find_gpu", "gpu_catalog", "lookup_gpu",
           "parse_bytes", "parse_gpu_spec"]

KIND_CUDA = "cuda"
KIND_MPS = "mps"
KIND_CPU = "cpu"

CATALOG_PACKAGE = "heavylift"
CATALOG_DIR = "data"
CATALOG_FILE = "gpus.json"

# Most GPUs one plan spreads a model over: 8 hosts of 8. A bigger count is almost surely a typo
# (80xH100 for 8xH100), and heavylift does not plan multi-host serving beyond that.
MAX_GPU_COUNT = 64
# bf16 tensor cores arrived with Ampere (sm_80); older cards emulate bf16 slowly or not at all.
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)
# A discrete card's memory belongs to the GPU entirely; only Apple's unified memory is shared.
DISCRETE_USABLE_MEMORY_FRACTION = 1.0
# A card given only by its size (--gpus 2x48GB), or detected but missing from the catalog: assume
# an RTX A6000-class card, 768 GB/s of GDDR6 (NVIDIA RTX A6000 datasheet). That sits between the
# L4's 300 GB/s and a 4090's 1008 GB/s, so decode-speed estimates are neither best nor worst case.
GENERIC_GPU_BANDWIDTH_BYTES_S = 768e9

SPEC_EXAMPLES = "4xA100-80GB, 8xRTX4090, 2x48GB or 1xH100,1xA100-40GB"
SIZE_EXAMPLES = "2GiB, 512MiB, 1.5G (G means GiB), 2GB (10^9 bytes) or a whole number of bytes"
# Driver and marketing names start with these; users leave them out ("RTX 4090", "H100").
IGNORED_NAME_PREFIXES = ("nvidia", "geforce")
# How many near names a "did you mean" offers, and how alike they must be (difflib ratio, 0-1).
SUGGESTIONS_SHOWN = 3
SUGGESTION_CUTOFF = 0.6

# One --gpus item: an optional count with "x" or "×", then a card name or size.
_ITEM = re.compile(r"(?:(-?\d+)\s*[x×]\s*)?(.*\S)", re.IGNORECASE | re.DOTALL)
# A size, in --reserve and as a generic --gpus card: a number and a unit (a card's unit is not optional).
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
# One rule for both: "GB" is decimal (10^9), "GiB" binary (2^30), bare letters binary (as `free -g` and
# `ls -h` mean them). Each unit with the spelling a generic card's name uses, so the name parses back.
_BYTE_UNITS = {
    "": (1, ""), "b": (1, "B"),
    "k": (1024, "KiB"), "kib": (1024, "KiB"), "kb": (10**3, "KB"),
    "m": (MiB, "MiB"), "mib": (MiB, "MiB"), "mb": (10**6, "MB"),
    "g": (GiB, "GiB"), "gib": (GiB, "GiB"), "gb": (GB, "GB"),
    "t": (1024 * GiB, "TiB"), "tib": (1024 * GiB, "TiB"), "tb": (10**12, "TB"),
}


@dataclass(frozen=True)
class GpuModel:
    """One catalog entry: a card's datasheet figures (see data/gpus.json for their sources)."""

    key: str  # canonical name, e.g. "H100-80GB"
    name: str  # name the driver reports, e.g. "NVIDIA H100 80GB HBM3"
    aliases: tuple[str, ...]
    memory_bytes: int  # total device memory as CUDA reports it, where known
    bandwidth_bytes_s: float  # datasheet memory bandwidth
    bf16_tflops: float | None  # dense, no sparsity; None where unpublished
    native_fp8: bool  # fp8 tensor cores: Ada, Hopper, Blackwell
    compute_capability: tuple[int, int] | None  # None for Apple
    kind: str  # KIND_CUDA or KIND_MPS
    usable_memory_fraction: float  # share of memory_bytes the GPU may use; 1.0 for discrete GPUs


@dataclass(frozen=True)
class Device:
    """One device a plan places layers on."""

    index: int  # position in the plan, 0-based
    name: str  # "H100-80GB" from a spec, or "NVIDIA H100 80GB HBM3" when detected
    kind: str  # KIND_CUDA, KIND_MPS or KIND_CPU
    memory_bytes: int  # bytes a plan may fill: total (x usable fraction), or free-now when busy
    total_bytes: int  # physical total, for display
    bandwidth_bytes_s: float
    native_fp8: bool
    bf16_supported: bool  # compute capability >= 8.0 for CUDA; True for cpu and mps
    compute_capability: tuple[int, int] | None
    free_bytes: int | None = None  # only when detected


@lru_cache(maxsize=1)
def gpu_catalog() -> tuple[GpuModel, ...]:
    """Every card in the bundled data/gpus.json, in file order."""
    path = resources.files(CATALOG_PACKAGE).joinpath(CATALOG_DIR).joinpath(CATALOG_FILE)
    entries = json.loads(path.read_text(encoding="utf-8"))["gpus"]
    return tuple(_model_from_entry(entry) for entry in entries)


def _model_from_entry(entry: dict) -> GpuModel:
    capability = entry["compute_capability"]
    return GpuModel(
        key=entry["key"],
        name=entry["name"],
        aliases=tuple(entry["aliases"]),
        memory_bytes=int(entry["memory_bytes"]),
        bandwidth_bytes_s=float(entry["bandwidth_bytes_s"]),
        bf16_tflops=float(entry["bf16_tflops"]) if entry["bf16_tflops"] is not None else None,
        native_fp8=bool(entry["native_fp8"]),
        compute_capability=tuple(capability) if capability is not None else None,
        kind=entry["kind"],
        usable_memory_fraction=float(
            entry.get("usable_memory_fraction", DISCRETE_USABLE_MEMORY_FRACTION)
        ),
    )


def _normalize(name: str) -> str:
    """Lower case without spaces, hyphens, underscores or a leading "nvidia" / "geforce"."""
    flat = re.sub(r"[\s_\-]+", "", name.lower())
    for prefix in IGNORED_NAME_PREFIXES:
        flat = flat.removeprefix(prefix)
    return flat


@lru_cache(maxsize=1)
def _name_index() -> dict[str, GpuModel]:
    """Every normalized key, driver name and alias, to its catalog entry."""
    index: dict[str, GpuModel] = {}
    for model in gpu_catalog():
        for name in (model.key, model.name, *model.aliases):
            index[_normalize(name)] = model
    return index


def lookup_gpu(name: str) -> GpuModel | None:
    """The catalog entry going by `name` (key, driver name or alias), or None."""
    return _name_index().get(_normalize(name))


def closest_gpu_keys(name: str) -> list[str]:
    """Catalog keys whose names start like `name` ("A100"), then those that look like it."""
    flat, names = _normalize(name), list(_name_index())
    starting = [known for known in names if flat and known.startswith(flat)]
    alike = difflib.get_close_matches(flat, names, n=len(names), cutoff=SUGGESTION_CUTOFF)
    keys = dict.fromkeys(_name_index()[known].key for known in starting + alike)
    return list(keys)[:SUGGESTIONS_SHOWN]


def _known_cards() -> str:
    return ", ".join(model.key for model in gpu_catalog())


def find_gpu(name: str) -> GpuModel:
    """The catalog entry going by `name`; GpuSpecError naming the nearest ones otherwise."""
    model = lookup_gpu(name)
    if model is not None:
        return model
    close = closest_gpu_keys(name)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known cards: {_known_cards()}"
    raise GpuSpecError(
        f"no GPU named {name!r} in heavylift's catalog ({hint}); "
        "for another card give its memory size instead, e.g. --gpus 2x48GiB (or 2x48GB: 48 x 10^9 bytes)"
    )


def bf16_supported(kind: str, compute_capability: tuple[int, int] | None) -> bool:
    """Whether bf16 runs at tensor-core speed: Ampere or newer; always for cpu and mps."""
    if kind != KIND_CUDA or compute_capability is None:
        return True
    return compute_capability >= BF16_MIN_COMPUTE_CAPABILITY


def device_from_model(model: GpuModel, index: int = 0) -> Device:
    """A catalog card as a plan's device, with the memory its GPU may use."""
    return Device(
        index=index,
        name=model.key,
        kind=model.kind,
        memory_bytes=int(model.memory_bytes * model.usable_memory_fraction),
        total_bytes=model.memory_bytes,
        bandwidth_bytes_s=model.bandwidth_bytes_s,
        native_fp8=model.native_fp8,
        bf16_supported=bf16_supported(model.kind, model.compute_capability),
        compute_capability=model.compute_capability,
    )


def generic_device(name: str, memory_bytes: int, index: int = 0) -> Device:
    """A CUDA card known only by its memory: A6000-class bandwidth, no fp8, bf16 assumed."""
    return Device(index=index, name=name, kind=KIND_CUDA, memory_bytes=memory_bytes,
                  total_bytes=memory_bytes, bandwidth_bytes_s=GENERIC_GPU_BANDWIDTH_BYTES_S,
                  native_fp8=False, bf16_supported=True, compute_capability=None)


def cpu_device(memory_bytes: int) -> Device:
    """The CPU as the one device of a plan, with `memory_bytes` of RAM to fill."""
    return Device(index=0, name="CPU", kind=KIND_CPU, memory_bytes=memory_bytes,
                  total_bytes=memory_bytes, bandwidth_bytes_s=CPU_MEMORY_BANDWIDTH_BYTES_S,
                  native_fp8=False, bf16_supported=True, compute_capability=None)


def _spec_error(spec: str, problem: str) -> GpuSpecError:
    return GpuSpecError(
        f"cannot read GPU spec {spec!r}: {problem}; expected items like {SPEC_EXAMPLES} "
        f"(known cards: {_known_cards()})"
    )


def _sized(text: str) -> tuple[Decimal, int, str] | None:
    """A number and a unit ("48GB", "1.5 gib"): the number, the unit's bytes and its spelling; else None."""
    found = _SIZE.fullmatch(text.strip())
    unit = _BYTE_UNITS.get(found.group(2).lower()) if found is not None else None
    return (Decimal(found.group(1)), *unit) if unit is not None else None


def _parse_card(spec: str, card: str) -> Device:
    """One card of an item: a generic size such as 48GB or 48GiB, or a catalog name."""
    size = _sized(card)
    if size is not None and size[2]:  # a bare number is a card's model number ("4090"), not a size
        number, unit, spelling = size
        if number * unit < 1:
            raise _spec_error(spec, f"a card of {card!r} has no memory to fill")
        return generic_device(f"{number}{spelling}", int(number * unit))
    model = lookup_gpu(card)
    if model is None:
        close = closest_gpu_keys(card)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise _spec_error(spec, f"no card named {card!r}{hint}")
    return device_from_model(model)


def _parse_item(spec: str, position: int, item: str) -> tuple[int, Device]:
    """How many cards one comma-separated item asks for, and which card."""
    found = _ITEM.fullmatch(item.strip())
    if found is None:
        raise _spec_error(spec, f"item {position} is empty")
    count = int(found.group(1)) if found.group(1) is not None else 1
    if count < 1:
        raise _spec_error(spec, f"item {position} asks for {count} cards; counts start at 1")
    return count, _parse_card(spec, found.group(2))


def parse_gpu_spec(spec: str) -> tuple[Device, ...]:
    """The devices a --gpus description names, numbered 0.. in spec order."""
    if not spec.strip():
        raise _spec_error(spec, "it is empty")
    items = [_parse_item(spec, at, item) for at, item in enumerate(spec.split(","), start=1)]
    total = sum(count for count, _ in items)
    if total > MAX_GPU_COUNT:
        raise _spec_error(spec, f"{total} cards; heavylift plans for at most {MAX_GPU_COUNT}")
    cards = [card for count, card in items for _ in range(count)]
    return tuple(dataclasses.replace(card, index=index) for index, card in enumerate(cards))


def parse_bytes(text: str) -> int:
    """A size such as "2GiB", "2GB" (2e9), "512MiB", "1.5G" (GiB) or "1048576" (bytes)."""
    if text.strip().startswith("-"):
        raise GpuSpecError(f"cannot read size {text!r}: it is negative; use {SIZE_EXAMPLES}")
    size = _sized(text)
    if size is None:
        raise GpuSpecError(f"cannot read size {text!r}: expected {SIZE_EXAMPLES}")
    value = size[0] * size[1]
    if size[1] == 1 and value != value.to_integral_value():
        raise GpuSpecError(f"cannot read size {text!r}: bytes come whole; use {SIZE_EXAMPLES}")
    return int(value.to_integral_value())
