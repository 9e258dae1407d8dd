"""PyTorch's CUDA caching allocator as arithmetic: what a sequence of tensor allocations reserves.

A run's GPU memory is not the sum of its live tensors: freed blocks stay cached, and a request that no
cached block fits takes a new segment from the driver. `CachingAllocator` replays an allocation program
with the rules of c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default settings, no expandable
segments, one stream): sizes round up to 512 bytes; requests of up to 1 MiB come from 2 MiB segments,
up to 10 MiB from 20 MiB segments, larger ones from their own segment rounded up to 2 MiB; a request
takes the smallest cached block that fits (the lowest address among equals) and splits off the rest
when the rest is at least 512 bytes (small pool) or more than 1 MiB (large pool); a freed block merges
with free neighbours of its segment; `empty_cache` returns every wholly free segment.

A `Program` lists what a piece of code allocates and frees, in order; a loop of identical iterations (the
decoder layers of a device) is recorded once, and the replay renumbers it, skipping whole cycles once the
allocator's state repeats; so are rounds that free what they allocate (a weight quantized a block of rows at
a time), skipped once one reserves no segment.

Replayed over the transformers forward at full size (bench/results/plan_validation_h100_2026-11-26.json,
the bf16 cases run with a growing DynamicCache), it gives the measured max_memory_allocated to 9 MB and
max_memory_reserved to 0.7% (32k tokens x 8) or 20 MB (1k), from the tensors' shapes alone.
Pure Python: the planner runs it without torch.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Callable

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


def splits(rest: int, small: bool) -> bool:
    """Whether a block handed out for a request keeps only what the request needs, the rest staying cached."""
    return rest >= MIN_BLOCK_BYTES if small else rest > SMALL_REQUEST_BYTES


def segment_size(nbytes: int) -> int:
    """Bytes of the segment a request that no cached block fits reserves (get_allocation_size)."""
    if nbytes <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if nbytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-nbytes // LARGE_ROUNDING_BYTES) * LARGE_ROUNDING_BYTES


# A free block's sort key in its pool: its size above its address, so that the first key at or above
# `size << ADDRESS_BITS` is a request's best fit (the smallest block that fits, the lowest address among
# equals). Addresses stay below 2**64 bytes.
ADDRESS_BITS = 64
ADDRESS_MASK = (1 << ADDRESS_BITS) - 1

Block = tuple[int, int, bool]  # a block malloc hands out: (address, size, from the small pool)
Tensor = int  # a tensor of a Program, by its number there


class CachingAllocator:
    """One device's allocator on one stream: allocated and reserved bytes, and their peaks.

    Only free blocks and segments are recorded; an allocated block is known by the handle malloc returns.
    Blocks beside each other in a segment are never both free: a freed block merges with its free neighbours."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[int]] = {True: [], False: []}  # small pool or not -> its free blocks' keys, sorted
        self._free_at: dict[int, int] = {}  # a free block's address -> its size
        self._free_ending: dict[int, int] = {}  # a free block's end -> its address
        self._segments: dict[int, int] = {}  # a segment's address -> its size
        self._top = 0  # the next segment's address: segments lie end to end, in the order they are reserved
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0

    @classmethod
    def one_free_segment(cls, nbytes: int) -> "CachingAllocator":
        """An allocator holding one segment of `nbytes` (a multiple of the block granule), wholly free: the
        free block a device's warm-up segment leaves after the tensors at its start, to replay from and move
        onto that device (moved_onto)."""
        a = cls()
        a._segments[0] = a._top = a.reserved = a.peak_reserved = nbytes
        a._put(0, nbytes, False)
        return a

    def _put(self, address: int, size: int, small: bool) -> None:
        """Cache a free block."""
        self._free_at[address] = size
        self._free_ending[address + size] = address
        insort(self._pools[small], size << ADDRESS_BITS | address)

    def malloc(self, nbytes: int) -> Block:
        size = MIN_BLOCK_BYTES if nbytes <= MIN_BLOCK_BYTES else -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES
        small = size <= SMALL_REQUEST_BYTES
        pool = self._pools[small]
        i = bisect_left(pool, size << ADDRESS_BITS)
        if i < len(pool):  # the best cached fit
            key = pool.pop(i)
            address, have = key & ADDRESS_MASK, key >> ADDRESS_BITS
            del self._free_at[address], self._free_ending[address + have]
        else:  # a new segment
            address, have = self._top, segment_size(size)
            self._segments[address] = have
            self._top += have
            self.reserved += have
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = have - size
        if splits(rest, small):
            tail = address + size
            self._free_at[tail] = rest
            self._free_ending[tail + rest] = tail
            insort(pool, rest << ADDRESS_BITS | tail)
            have = size
        self.allocated += have
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return address, have, small

    def keep(self, nbytes: int, count: int) -> None:
        """`count` requests of `nbytes` in a row, kept for good: what as many mallocs do. A request that splits
        its block leaves the rest as the next one's best fit (smaller than every other block that fit it), so
        the next pieces come from that rest in one go, as long as it holds them."""
        size = block_size(nbytes)
        small = size <= SMALL_REQUEST_BYTES
        while count > 0:
            address, have, _ = self.malloc(nbytes)
            count -= 1
            at = address + have
            # The rest split off, if any: a cached block is never beside another in its segment.
            rest = None if at in self._segments else self._free_at.get(at)
            if not count or rest is None or rest < size:
                continue
            self._take(at, rest, small)
            taken = 0
            while count and rest >= size:
                piece = size if splits(rest - size, small) else rest
                at, rest, taken, count = at + piece, rest - piece, taken + piece, count - 1
            if rest:
                self._put(at, rest, small)
            self.allocated += taken
            self.peak_allocated = max(self.peak_allocated, self.allocated)

    def _take(self, address: int, size: int, small: bool) -> None:
        """Take a free block out of the cache."""
        del self._free_at[address], self._free_ending[address + size]
        pool = self._pools[small]
        del pool[bisect_left(pool, size << ADDRESS_BITS | address)]

    def free(self, block: Block) -> None:
        address, size, small = block
        self.allocated -= size
        pool, free_at, free_ending, segments = self._pools[small], self._free_at, self._free_ending, self._segments
        if address not in segments:  # not a segment's first block: merge with a free block before it
            before = free_ending.pop(address, None)
            if before is not None:
                del free_at[before]
                del pool[bisect_left(pool, (address - before) << ADDRESS_BITS | before)]
                address, size = before, size + address - before
        end = address + size
        if end not in segments:  # not the last block before the next segment: merge with a free one after
            after = free_at.pop(end, None)
            if after is not None:
                del free_ending[end + after]
                del pool[bisect_left(pool, after << ADDRESS_BITS | end)]
                size += after
        free_at[address] = size
        free_ending[address + size] = address
        insort(pool, size << ADDRESS_BITS | address)

    def copy(self) -> "CachingAllocator":
        """The same state, peaks included, to replay more on without touching this one."""
        twin = CachingAllocator()
        twin._pools = {small: list(pool) for small, pool in self._pools.items()}
        twin._free_at, twin._free_ending = dict(self._free_at), dict(self._free_ending)
        twin._segments, twin._top = dict(self._segments), self._top
        twin.allocated, twin.reserved = self.allocated, self.reserved
        twin.peak_allocated, twin.peak_reserved = self.peak_allocated, self.peak_reserved
        return twin

    def fork(self) -> "CachingAllocator":
        """A copy to replay more on, for a state whose live blocks all stay allocated (persistent tensors),
        its peaks starting from here."""
        twin = self.copy()
        twin.peak_allocated, twin.peak_reserved = self.allocated, self.reserved
        return twin

    def free_blocks(self) -> list[tuple[int, int, bool]]:
        """Every cached block as (address, size, from the small pool), by address."""
        return sorted((key & ADDRESS_MASK, key >> ADDRESS_BITS, small)
                      for small, pool in self._pools.items() for key in pool)

    def segments(self) -> dict[int, int]:
        """Every segment held, address -> size."""
        return dict(self._segments)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachingAllocator) and self._pools == other._pools \
            and self._segments == other._segments and self._top == other._top \
            and (self.allocated, self.reserved, self.peak_allocated, self.peak_reserved) \
            == (other.allocated, other.reserved, other.peak_allocated, other.peak_reserved)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def first_segment_tail(self) -> tuple[int, int]:
        """(the free block that ends the first segment, 0 when that segment ends allocated; the largest other
        cached block of the large pool)."""
        address = self._free_ending.get(self._segments.get(0, -1))
        tail = self._free_at[address] if address is not None else 0
        others = [key >> ADDRESS_BITS for key in self._pools[False][-2:] if key & ADDRESS_MASK != address]
        return tail, max(others, default=0)

    def moved_onto(self, start: "CachingAllocator") -> "CachingAllocator":
        """This state, reached from a wholly free first segment, moved onto `start`: an allocator whose only
        segment (at 0) holds allocated blocks up to its one free block, which runs to the segment's end. As
        if the same events had run on `start`: blocks of the first segment move up by the bytes start holds
        there, the free block that ends it ends at start's segment end instead, later segments follow start's.
        Exact when no request depended on the first segment's size, which the caller checks (the block ending
        it stayed larger than every other block and than what it handed out, so it was taken when nothing
        else fit, and always split)."""
        blocks = start.free_blocks()
        if len(blocks) != 1 or blocks[0][2] or start._segments != {0: blocks[0][0] + blocks[0][1]}:
            raise ValueError("start must hold one segment with allocated blocks up to one free block at its end")
        lead, rest, _ = blocks[0]
        end, own_end = lead + rest, self._segments[0]

        def moved(address: int) -> int:
            return address + lead if address < own_end else address - own_end + end

        twin = CachingAllocator()
        for is_small, pool in self._pools.items():
            for key in pool:
                address, size = key & ADDRESS_MASK, key >> ADDRESS_BITS
                at = moved(address)
                twin._put(at, end - at if address + size == own_end else size, is_small)
        twin._segments = {(moved(address) if address else 0): (size if address else end)
                          for address, size in self._segments.items()}
        twin._top = moved(self._top)
        twin.allocated, twin.reserved = self.allocated + start.allocated, self.reserved - own_end + end
        twin.peak_allocated = max(start.peak_allocated, self.peak_allocated + start.allocated)
        twin.peak_reserved = max(start.peak_reserved, self.peak_reserved - own_end + end)
        return twin

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): give back every segment that is wholly free."""
        for small, pool in self._pools.items():
            kept = []
            for key in pool:
                address, size = key & ADDRESS_MASK, key >> ADDRESS_BITS
                if self._segments.get(address) == size:
                    del self._segments[address], self._free_at[address], self._free_ending[address + size]
                    self.reserved -= size
                else:
                    kept.append(key)
            self._pools[small] = kept

    def play(self, program: "Program") -> None:
        """Run a program's events here: what it leaves allocated stays, for good. A free of a tensor the
        program never allocated (size 0) is skipped."""
        self._play(program._items, {}, 0)

    def _play(self, items: list[tuple], live: dict[Tensor, Block], offset: int) -> None:
        """Run events whose tensors are numbered `offset` below the numbers `live` knows them by."""
        malloc, release, pop = self.malloc, self.free, live.pop
        for item in items:
            kind = item[0]
            if kind == ALLOC:
                live[item[1] + offset] = malloc(item[2])
            elif kind == FREE:
                block = pop(item[1] + offset, None)
                if block is not None:
                    release(block)
            elif kind == EMPTY:
                self.empty_cache()
            elif kind == REPEAT:
                self._repeat(item, live, offset)
            else:
                self._rounds(item, live, offset)

    def _repeat(self, item: tuple, live: dict[Tensor, Block], offset: int) -> None:
        """Run a Program.repeat record: its iterations in turn, each the template renumbered. Once the
        allocator and the loop's live tensors (renumbered to the iteration) are as they were some iterations
        earlier, every later run of that many iterations leaves them so again and reaches the same peaks:
        those are skipped, their tensors renumbered, and only the remainder runs."""
        _, template, first, ids, times = item
        loop = first + offset  # live tensors numbered from here on belong to the loop
        seen: dict[tuple, int] = {}
        i = 1
        while i <= times:
            state = (tuple(self._pools[True]), tuple(self._pools[False]), self.allocated, self.reserved, self._top,
                     tuple(sorted((name - i * ids, block) for name, block in live.items() if name >= loop)))
            if state in seen:
                period = i - seen[state]
                skipped = (times - i + 1) // period * period
                moved = {name: live.pop(name) for name in [n for n in live if n >= loop]}
                live.update((name + skipped * ids, block) for name, block in moved.items())
                i += skipped
                seen.clear()
                if i > times:
                    break
            seen[state] = i
            self._play(template, live, offset + i * ids)
            i += 1


    def _rounds(self, item: tuple, live: dict[Tensor, Block], offset: int) -> None:
        """Run a Program.rounds record: its rounds in turn until one reserves no segment. That one left the
        allocator as it found it, so each later one would too, reaching the same peaks: they are skipped."""
        _, template, _, ids, times = item
        for i in range(1, times + 1):
            top = self._top
            self._play(template, live, offset + i * ids)
            if self._top == top:
                return


ALLOC, FREE, EMPTY, REPEAT, ROUNDS = "alloc", "free", "empty", "repeat", "rounds"
LOOPS = (REPEAT, ROUNDS)  # records of iterations kept once


class Program:
    """An ordered list of tensor allocations and frees, each tensor numbered: what a piece of code does to memory.

    `alloc` returns the tensor's number, so a program reads like the code it models:
    `h = p.alloc("h", 2 * t * hidden)` ... `p.free(h)`. `events` lists ("alloc", number, bytes, label),
    ("free", number) and ("empty",) in order; a loop of identical iterations is kept as one (`repeat`).
    """

    def __init__(self) -> None:
        self._items: list[tuple] = []  # events, and Program.repeat records in their place
        self._n = 0  # tensors numbered so far

    def alloc(self, label: str, nbytes: int) -> Tensor:
        self._n += 1
        if nbytes > 0:
            self._items.append((ALLOC, self._n, nbytes, label))
        return self._n

    def free(self, *names: Tensor | None) -> None:
        for name in names:
            if name is not None:
                self._items.append((FREE, name))

    def empty_cache(self) -> None:
        self._items.append((EMPTY,))

    def extend(self, other: "Program") -> None:
        """Append what `other` does, its tensors numbered after this program's."""
        self._items += _renumbered(other._items, self._n)
        self._n += other._n

    def repeat(self, times: int, step: Callable[[tuple], tuple], carried: tuple) -> tuple:
        """`times` iterations of `step` (a decoder layer, say), each given what the previous one passes on
        (`carried`: tensors, or None) and returning its own. When the second iteration frees only its own
        tensors and those the first passed on, and passes on what the first did renumbered, every later one
        would too: they are recorded once, as the second renumbered, for the replay to run or skip."""
        if times <= 0:
            return carried
        carried = step(carried)
        if times == 1:
            return carried
        first, start, previous = self._n + 1, len(self._items), carried
        carried = step(carried)
        ids, rest = self._n + 1 - first, times - 2
        template = self._items[start:]
        if rest and _renumbers(template, previous, carried, first, ids):
            self._items.append((REPEAT, template, first, ids, rest))
            self._n += ids * rest
            return tuple(None if c is None else c + ids * rest for c in carried)
        for _ in range(rest):
            carried = step(carried)
        return carried

    def rounds(self, times: int, step: Callable[[], None]) -> None:
        """`times` runs of `step` (a block of a weight's rows quantized), each freeing everything it allocates:
        recorded once, for the replay to run until one reserves no segment and skip the rest. A round that frees
        what it allocates leaves every cached block as it found it: each free block it carved from is whole
        again (blocks it hands out and takes back merge, and cached blocks are never beside each other), and
        the only change is the segments it reserved, now wholly free. So from the first round that reserves
        none, every later one starts where it started, and changes nothing, its peaks included."""
        if times <= 0:
            return
        first, start = self._n + 1, len(self._items)
        step()
        ids, template = self._n + 1 - first, self._items[start:]
        del self._items[start:]
        if not _frees_its_own(template, first):
            raise ValueError("a round must free every tensor it allocates and no other")
        self._items.append((ROUNDS, _renumbered(template, -ids), first, ids, times))
        self._n = first - 1 + ids * times

    def written_out(self) -> "Program":
        """The same program with every loop written out (`events`): replayed, it runs every iteration, where
        the replay of this one skips the iterations it proves change nothing."""
        out = Program()
        out._items, out._n = self.events, self._n
        return out

    @property
    def events(self) -> list[tuple]:
        """Every event in order, repeated iterations written out."""
        return [event for item in self._items for event in _iterations(item, item[4] if item[0] in LOOPS else 1)]


def _iterations(item: tuple, times: int) -> list[tuple]:
    """An event as a one-item list, or the first `times` iterations of a loop record (REPEAT, ROUNDS) written
    out, each one's tensors numbered after the last's."""
    if item[0] not in LOOPS:
        return [item]
    _, template, _, ids, _ = item
    return [event for i in range(1, times + 1) for event in _renumbered(template, i * ids)]


def _renumbered(items: list[tuple], by: int) -> list[tuple]:
    """Events and loop records with every tensor number `by` higher."""
    out = []
    for item in items:
        if item[0] in LOOPS:
            kind, template, first, ids, times = item
            out.append((kind, _renumbered(template, by), first + by, ids, times))
        elif item[0] == EMPTY:
            out.append(item)
        else:
            out.append((item[0], item[1] + by, *item[2:]))
    return out


def _frees_its_own(items: list[tuple], first: Tensor) -> bool:
    """Whether events, numbering their tensors from `first`, free every tensor they allocate and none older
    (a tensor of no bytes is numbered, never allocated, and its free is skipped)."""
    allocated = {item[1] for item in items if item[0] == ALLOC}
    freed = {item[1] for item in items if item[0] == FREE}
    return all(item[0] in (ALLOC, FREE) for item in items) and allocated <= freed \
        and min(freed, default=first) >= first


def _renumbers(template: list[tuple], previous: tuple, carried: tuple, first: int, ids: int) -> bool:
    """Whether an iteration (`template`, numbering its tensors from `first`) repeats renumbered: it passes on
    what the one before passed on `ids` numbers later, and touches no tensor older than that one's."""
    if len(previous) != len(carried) or any((p is None) != (c is None) or (c is not None and c - p != ids)
                                            for p, c in zip(previous, carried)):
        return False
    return all(item[0] not in LOOPS and (item[0] == EMPTY or item[1] >= first - ids) for item in template)


@dataclass(frozen=True)
class Replay:
    peak_allocated: int  # the most bytes live at once (torch.cuda.max_memory_allocated)
    peak_reserved: int  # the most bytes held from the driver at once (torch.cuda.max_memory_reserved)
    allocated: int  # live at the end


def run(program: Program, start: CachingAllocator | None = None) -> CachingAllocator:
    """Run a program through a fresh allocator, or a fork of `start` (persistent tensors already in place),
    and return it: what the program leaves allocated stays, for good."""
    a = start.fork() if start is not None else CachingAllocator()
    a.play(program)
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
    live: dict[Tensor, int] = {}
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
    """Of rounds that each allocate the same tensors and free them again (a long prompt prefilled a chunk at
    a time), the ones worth replaying: every full round after the second allocates what the second did on the
    blocks it freed, changing neither the peaks nor what stays cached, so the first two and the last stand for
    them all. Up to four rounds are all replayed."""
    return rounds if len(rounds) <= 4 else rounds[:2] + rounds[-1:]


def live_sizes(program: Program) -> list[int]:
    """The sizes of the tensors a program leaves allocated, in the order it allocated them."""
    live: dict[Tensor, int] = {}
    for event in one_round_each(program):
        if event[0] == ALLOC:
            live[event[1]] = event[2]
        elif event[0] == FREE:
            live.pop(event[1], None)
    return list(live.values())


def one_round_each(program: Program) -> list[tuple]:
    """A program's events with each run of rounds (Program.rounds) written out once: the rounds leave nothing
    allocated, and each allocates what the first did."""
    return [event for item in program._items
            for event in _iterations(item, item[4] if item[0] == REPEAT else 1)]
