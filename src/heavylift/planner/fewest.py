"""`heavylift plan --fewest`: for each precision, the fewest cards of each catalog GPU that hold a model.

Each count is advice.fewest_gpus: the same Layout and the same exact fit test (Layout.margin) as a plan on
`--gpus Nx<card>`, so planning that many of the card fits without offload and one fewer does not. Beside it,
the weights-only lower bound: the cards the weights alone fill. Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from heavylift.hardware.gpus import KIND_CUDA, Device, device_from_model, gpu_catalog
from heavylift.model.architecture import Architecture
from .advice import fewest_gpus
from .plan import Workload, layout
from .runtimes import plan_runtimes


@dataclass(frozen=True)
class FewestRow:
    """One precision: the runtime it is planned for (the same on every CUDA card), and per card (in
    Fewest.cards' order) the fewest cards that hold it (None: more than MAX_GPU_COUNT) and the weights-only
    lower bound (None: the reserve leaves the card nothing)."""

    quant: str
    engine: str
    counts: tuple[int | None, ...]
    weights_only: tuple[int | None, ...]


@dataclass(frozen=True)
class Fewest:
    model: str
    architecture: Architecture
    workload: Workload
    cards: tuple[Device, ...]  # one of each catalog CUDA card
    rows: tuple[FewestRow, ...]

    def to_json(self) -> dict[str, Any]:
        """The table as `heavylift plan --fewest --json` prints it (contract.py)."""
        from .contract import fewest_to_json

        return fewest_to_json(self)


def catalog_cards() -> tuple[Device, ...]:
    """One device of each catalog CUDA card, in catalog order. Apple's machines are left out: each is one
    device with its memory unified, not a card a host holds several of."""
    return tuple(device_from_model(m) for m in gpu_catalog() if m.kind == KIND_CUDA)


def weights_only(weights_bytes: int, card: Device, work: Workload) -> int | None:
    """The cards like `card` the weights alone fill: ceil(weights / the memory a plan may fill on one)."""
    capacity = card.memory_bytes - work.reserve_bytes
    return -(-weights_bytes // capacity) if capacity > 0 else None


def fewest_table(model: str, config: Mapping[str, Any], arch: Architecture, work: Workload, quants: Sequence[str],
                 engine: str, cards: Sequence[Device] | None = None) -> Fewest:
    """The fewest cards of each of `cards` (default: catalog_cards) that hold `model` in each of `quants`, each
    precision planned for the runtime `heavylift plan --gpus Nx<card> --engine ENGINE` plans it for (the cards
    are CUDA GPUs, and the runtime depends only on the devices' kinds: one choice serves every card). Each
    precision's Layout is built once and shared by every card; memory.py caches the replayed runtime terms
    across cards and counts."""
    cards = tuple(catalog_cards() if cards is None else cards)
    work = replace(work, allow_offload=False)  # the fewest cards that hold the model: nothing offloaded
    runtimes = plan_runtimes(config, arch, cards[:1], work, quants, engine)
    rows = []
    for quant in quants:
        lay, planned = layout(arch, quant), replace(work, engine=runtimes[quant].name)
        rows.append(FewestRow(quant, planned.engine, tuple(fewest_gpus(lay, card, planned) for card in cards),
                              tuple(weights_only(lay.weights_bytes, card, work) for card in cards)))
    return Fewest(model, arch, work, cards, tuple(rows))
