"""Split a model's layers over devices so that every device keeps the largest equal margin.

Pure arithmetic on byte counts: layers are placed in order, each device taking a contiguous run;
the embeddings travel with the first layer and the head with the last. The margin is found by
binary search: for a given margin, filling devices greedily in order is the best any contiguous
split can do, so the largest margin for which the greedy fill places every layer is optimal.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from typing import Sequence


@dataclass(frozen=True)
class Costs:
    layer_bytes: tuple[int, ...]  # weights + KV cache of each layer
    first_bytes: int  # travels with layer 0: embeddings
    last_bytes: int  # travels with the last layer: final norm, lm_head, logits
    device_fixed: tuple[int, ...]  # each device's cost once it holds any layer: context, activations

    @cached_property
    def running_bytes(self) -> tuple[int, ...]:
        """The bytes of layers 0 to i - 1 with what travels with them, for i from 0 to n: a run's are a difference."""
        return tuple(accumulate((_unit(self, i) for i in range(len(self.layer_bytes))), initial=0))


@dataclass(frozen=True)
class Split:
    layers: tuple[range, ...]  # per device; empty when the device holds nothing
    offloaded: range  # layers left to CPU RAM (only when offload is allowed)


def _unit(costs: Costs, i: int) -> int:
    n = len(costs.layer_bytes)
    return costs.layer_bytes[i] + (costs.first_bytes if i == 0 else 0) + (costs.last_bytes if i == n - 1 else 0)


def _greedy(costs: Costs, capacities: Sequence[int], margin: int) -> tuple[list[range], int]:
    """Fill devices in order leaving `margin` bytes free on each; return the runs and layers placed. No layer
    costs less than nothing, so a device takes the longest run from where the last stopped that fits."""
    n, start, runs, running = len(costs.layer_bytes), 0, [], costs.running_bytes
    for cap, fixed in zip(capacities, costs.device_fixed):
        end = max(start, bisect_right(running, running[start] + cap - margin - fixed, start, n + 1) - 1)
        runs.append(range(start, end))
        start = end
    return runs, start


def fits_with_margin(costs: Costs, capacities: Sequence[int], margin: int) -> bool:
    return _greedy(costs, capacities, margin)[1] == len(costs.layer_bytes)


def balance(costs: Costs, capacities: Sequence[int]) -> Split:
    """The split with the largest smallest margin, negative when nothing fits."""
    n = len(costs.layer_bytes)
    lo = -(sum(_unit(costs, i) for i in range(n)) + max(costs.device_fixed, default=0) + 1)
    hi = max(capacities) + 1
    while hi - lo > 1:  # invariant: margin lo is feasible, margin hi is not
        mid = (lo + hi) // 2
        if fits_with_margin(costs, capacities, mid):
            lo = mid
        else:
            hi = mid
    runs, _ = _greedy(costs, capacities, lo)
    return Split(tuple(runs), range(n, n))


def fill_with_offload(costs: Costs, capacities: Sequence[int]) -> Split:
    """Fill the devices to capacity; whatever does not fit stays in CPU RAM."""
    runs, placed = _greedy(costs, capacities, 0)
    return Split(tuple(runs), range(placed, len(costs.layer_bytes)))
