"""Work the planner skips, held to the work done in full: rounds of a weight quantized a block of rows at a
time (Program.rounds), a device's layers loaded as a shared replay of them (load_program.loaded_state), and
each device's run found by bisection in the split's search (placement._greedy)."""

from __future__ import annotations

import random

import pytest

from conftest import CountingAllocator

from heavylift.model.architecture import architecture_from_config
from heavylift.model.catalog import find_model
from heavylift.planner.allocator import Program, run
from heavylift.planner.forward_program import Part
from heavylift.planner.load_program import clear_load_caches, dense_load, expert_load, load_order, load_tensors, \
    loaded_state
from heavylift.planner.placement import Costs, _greedy, _unit
from heavylift.schemes import SCHEMES

MiB = 1 << 20


def _round(p: Program) -> None:
    """2, 12 and 10 MiB allocated, then freed in that order."""
    p.free(*[p.alloc("round", n * MiB) for n in (2, 12, 10)])


def test_rounds_replay_until_one_reserves_no_segment():
    # The first round reserves a 20 MiB segment (2 MiB, then 12 of the 18 left) and one of 10 MiB. The second
    # takes its 2 MiB from the 10 MiB segment (the smaller fit) and its 12 from the 20 MiB one, which leaves no
    # 10 MiB block: a third segment. The third takes the same blocks and reserves nothing, so the four after
    # it are skipped: 3 rounds of 3 requests instead of 7.
    looped, written = Program(), Program()
    looped.rounds(7, lambda: _round(looped))
    for _ in range(7):
        _round(written)
    assert looped.events == written.events
    skipping, every = CountingAllocator(), CountingAllocator()
    skipping.play(looped)
    every.play(looped.written_out())
    assert skipping == every  # free blocks, segments, counters and peaks
    assert (every.reserved, every.peak_allocated) == (40 * MiB, 24 * MiB)
    assert (skipping.requests, every.requests) == (3 * 3, 7 * 3)


def test_a_round_must_free_what_it_allocates():
    p = Program()
    with pytest.raises(ValueError, match="free every tensor"):
        p.rounds(3, lambda: p.alloc("kept", MiB))


def _load_written_out(arch, quant: str, part: Part) -> Program:
    """A device's load as from_pretrained runs it (loader.py), every FP8 block of rows written out: a dense
    model's tensors after the allocator warm-up; an MoE model's layers each after its experts."""
    order = load_order(arch, part)
    p = Program()
    if order.experts is None:
        dense_load(p, quant, order.before + order.layer * len(part.layers) + order.after)
    else:
        load_tensors(p, quant, order.before)
        for _ in part.layers:
            expert_load(p, order.experts, quant)
            load_tensors(p, quant, order.layer)
        load_tensors(p, quant, order.after)
    return p.written_out()


# Dense and MoE, full attention and sliding windows; 8B and 70B shapes quantize their weights in 4 to 56 blocks.
@pytest.mark.parametrize("model", ["llama3.1-8b", "mixtral-8x7b", "gemma2-9b", "phi3-mini", "qwen2.5-7b",
                                   "llama3.1-70b"])
def test_each_device_is_left_as_its_load_replayed_event_by_event(model):
    # loaded_state skips the FP8 blocks after the first that reserves nothing, and loads a dense model's layers
    # once for every device (_LayerRun, then in each free block the layers' warm-up segment leaves, shared by
    # the devices whose free blocks match): the allocator each device is left with, peaks and free blocks
    # included, is that of every event replayed. The model costed whole, as each kind of device, runs its
    # warm-up segment short.
    arch = architecture_from_config(find_model(model).config_dict())
    n = arch.num_layers
    parts = [Part(range(n), True, True), Part(range(n), True, False), Part(range(n), False, False),
             Part(range(n), False, True), Part(range(0, n // 2), True, False), Part(range(3, 5), False, False)]
    quants = ("fp8", "nf4-dq") if model == "llama3.1-70b" else tuple(SCHEMES)
    for quant in quants:
        clear_load_caches()
        for part in parts:
            loaded, _ = loaded_state(quant, load_order(arch, part), len(part.layers))
            assert loaded == run(_load_written_out(arch, quant, part)), (quant, part)


def _filled_layer_by_layer(costs: Costs, capacities: list[int], margin: int) -> tuple[list[range], int]:
    """Devices filled in order, one layer at a time while it fits with `margin` to spare."""
    n, start, runs = len(costs.layer_bytes), 0, []
    for cap, fixed in zip(capacities, costs.device_fixed):
        used, end = fixed, start
        while end < n and used + _unit(costs, end) <= cap - margin:
            used += _unit(costs, end)
            end += 1
        runs.append(range(start, end))
        start = end
    return runs, start


def test_each_device_takes_the_run_it_would_take_layer_by_layer():
    # Layers of 0 to 20 bytes, devices whose fixed cost alone may exceed what the margin leaves them.
    rng = random.Random(0)
    for _ in range(400):
        n, devices = rng.randint(1, 30), rng.randint(1, 5)
        costs = Costs(tuple(rng.choice((0, 1, 3, 7, 20)) for _ in range(n)), rng.randint(0, 9), rng.randint(0, 9),
                      tuple(rng.randint(0, 30) for _ in range(devices)))
        capacities = [rng.randint(0, 120) for _ in range(devices)]
        for margin in (-40, -1, 0, 2, 15, 60):
            assert _greedy(costs, capacities, margin) == _filled_layer_by_layer(costs, capacities, margin)
