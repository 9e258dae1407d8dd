"""PyTorch's CUDA caching allocator as arithmetic: what a sequence of tensor allocations reserves.

A run's GPU memory is not the sum of its live tensors: freed blocks stay cached, and a request that no
cached block fits takes a new segment from the driver. `CachingAllocator` replays an allocation program
with the rules of c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default settings, no expandable
segments, one stream): sizes round up to 512 bytes; requests of up to 1 MiB come from 2 MiB segments,
up to 10 MiB from 20 MiB segments, larger ones from their own segment rounded up to 2 MiB; a request
takes the smallest cached block that fits (the lowest address among equals) and splits off the rest
when the rest is at least 512 bytes (small pool) or more than 1 MiB (large pool); a freed block merges
with free neighbours of its segment; `empty_cache` returns every wholly free segment.

Replayed over the transformers forward at full size (bench/results/plan_validation_h100_2026-11-26.json,
the bf16 cases run with a growing DynamicCache), it gives the measured max_memory_allocated to 9 MB and
max_memory_reserved to 0.7% (32k tokens x 8) or 20 MB (1k), from the tensors' shapes alone.
Pure Python: the planner runs it without torch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from heavylift.defaults import ALLOCATION_GRANULE_BYTES

MIN_BLOCK_BYTES = ALLOCATION_GRANULE_BYTES  # kMinBlockSize: every block is a multiple of this
SMALL_REQUEST_BYTES = 1 << 20  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_SEGMENT_BYTES = 2 << 20  # kSmallBuffer: the small pool's segment size
LARGE_SEGMENT_BYTES = 20 << 20  # kLargeBuffer: segment for requests of 1-10 MiB
MIN_LARGE_ALLOC_BYTES = 10 << 20  # kMinLargeAlloc: from here a request gets a segment of its own
LARGE_ROUNDING_BYTES = 2 << 20  # kRoundLarge: such a segment rounds up to 2 MiB


def block_size(nbytes: int) -> int:
    """Bytes the allocator hands out for a request (round_size)."""
    return max(MIN_BLOCK_BYTES, -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)


def segment_size(nbytes: int) -> int:
    """Bytes of the segment a request that no cached block fits reserves (get_allocation_size)."""
    if nbytes <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if nbytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-nbytes // LARGE_ROUNDING_BYTES) * LARGE_ROUNDING_BYTES


class _Block:
    __slots__ = ("address", "size", "small", "free", "prev", "next")

    def __init__(self, address: int, size: int, small: bool, free: bool = True, prev: "_Block | None" = None,
                 nxt: "_Block | None" = None):
        self.address, self.size, self.small, self.free, self.prev, self.next = address, size, small, free, prev, nxt


# What a forked free block sees beside it where the original had an allocated block: never free, so never
# merged; the links the copy writes into it are never read.
_HELD = _Block(-1, 0, False, False)


class CachingAllocator:
    """One device's allocator on one stream: allocated and reserved bytes, and their peaks."""

    def __init__(self) -> None:
        # Free blocks per pool as (size, address, block), sorted: addresses are unique, so blocks never compare.
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        self._top = 0  # next segment address
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0

    def _insert(self, b: _Block) -> None:
        bisect.insort(self._free[b.small], (b.size, b.address, b))

    def _remove(self, b: _Block) -> None:
        pool = self._free[b.small]
        del pool[bisect.bisect_left(pool, (b.size, b.address))]

    def malloc(self, nbytes: int) -> _Block:
        size = MIN_BLOCK_BYTES if nbytes <= MIN_BLOCK_BYTES else -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES
        small = size <= SMALL_REQUEST_BYTES
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            seg = segment_size(size)
            block = _Block(self._top, seg, small)
            self._top += seg
            self.reserved += seg
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = block.size - size
        if rest >= MIN_BLOCK_BYTES if small else rest > SMALL_REQUEST_BYTES:
            tail = _Block(block.address + size, rest, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            bisect.insort(pool, (rest, tail.address, tail))
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: _Block) -> None:
        self.allocated -= block.size
        block.free = True
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free:
            self._remove(prev)
            prev.size += block.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            block = prev
        if nxt is not None and nxt.free:
            self._remove(nxt)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        self._insert(block)

    def fork(self) -> "CachingAllocator":
        """A copy to replay more on, for a state whose live blocks all stay allocated (persistent tensors):
        its free blocks are copied, each bounded by a stand-in (_HELD) where an allocated neighbour bounds
        it, so the copy splits, merges and empties segments as the original would, without touching it."""
        twin = CachingAllocator()
        twin._top, twin.allocated, twin.reserved = self._top, self.allocated, self.reserved
        twin.peak_allocated, twin.peak_reserved = self.allocated, self.reserved
        for small, pool in self._free.items():
            twin._free[small] = [(size, address, _Block(address, size, small, True, b.prev and _HELD, b.next and _HELD))
                                 for size, address, b in pool]
        return twin

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): give back every segment that is wholly free."""
        for small, pool in self._free.items():
            kept = [e for e in pool if e[2].prev is not None or e[2].next is not None]
            self.reserved -= sum(e[2].size for e in pool) - sum(e[2].size for e in kept)
            self._free[small] = kept


@dataclass
class Program:
    """An ordered list of tensor allocations and frees, each tensor named: what a piece of code does to memory.

    `alloc` returns the name, so a program reads like the code it models:
    `h = p.alloc("h", 2 * t * hidden)` ... `p.free(h)`.
    """

    events: list[tuple] = field(default_factory=list)
    _n: int = 0

    def alloc(self, label: str, nbytes: int) -> str:
        self._n += 1
        name = f"{label}#{self._n}"
        if nbytes > 0:
            self.events.append(("alloc", name, nbytes))
        return name

    def free(self, *names: str | None) -> None:
        for name in names:
            if name is not None:
                self.events.append(("free", name))

    def empty_cache(self) -> None:
        self.events.append(("empty",))

    def extend(self, other: "Program") -> None:
        self.events.extend(other.events)


@dataclass(frozen=True)
class Replay:
    peak_allocated: int  # the most bytes live at once (torch.cuda.max_memory_allocated)
    peak_reserved: int  # the most bytes held from the driver at once (torch.cuda.max_memory_reserved)
    allocated: int  # live at the end


def run(program: Program, start: CachingAllocator | None = None) -> CachingAllocator:
    """Run a program through a fresh allocator, or a fork of `start` (persistent tensors already in place),
    and return it: what the program leaves allocated stays, for good. A free of a tensor the program never
    allocated (size 0) is skipped."""
    a = start.fork() if start is not None else CachingAllocator()
    live: dict[str, _Block] = {}
    malloc, release, pop = a.malloc, a.free, live.pop
    for event in program.events:
        kind = event[0]
        if kind == "alloc":
            live[event[1]] = malloc(event[2])
        elif kind == "free":
            block = pop(event[1], None)
            if block is not None:
                release(block)
        else:
            a.empty_cache()
    return a


def replay(program: Program, start: CachingAllocator | None = None) -> Replay:
    """The peaks and end of a program run as `run` does."""
    a = run(program, start)
    return Replay(a.peak_allocated, a.peak_reserved, a.allocated)


def persistent_state(sizes) -> CachingAllocator:
    """An allocator holding these tensors for good, to fork phases from."""
    a = CachingAllocator()
    for n in sizes:
        if n > 0:
            a.malloc(n)
    return a


def peak_live(program: Program) -> int:
    """The most bytes live at once, each tensor rounded to its block: the program's allocated peak."""
    live: dict[str, int] = {}
    now = peak = 0
    for event in program.events:
        if event[0] == "alloc":
            live[event[1]] = block_size(event[2])
            now += live[event[1]]
            peak = max(peak, now)
        elif event[0] == "free" and event[1] in live:
            now -= live.pop(event[1])
    return peak


def replayed_rounds(rounds: list) -> list:
    """Of rounds that each allocate the same tensors and free them again (a long weight quantized a piece at
    a time, a long prompt prefilled a chunk at a time), the ones worth replaying: every full round after the
    second allocates what the second did on the blocks it freed, changing neither the peaks nor what stays
    cached, so the first two and the last stand for them all. Up to four rounds are all replayed."""
    return rounds if len(rounds) <= 4 else rounds[:2] + rounds[-1:]


def live_sizes(program: Program) -> list[int]:
    """The sizes of the tensors a program leaves allocated, in the order it allocated them."""
    live: dict[str, int] = {}
    for event in program.events:
        if event[0] == "alloc":
            live[event[1]] = event[2]
        elif event[0] == "free":
            live.pop(event[1], None)
    return list(live.values())
