"""The caching-allocator model, rule by rule, on sequences small enough to follow by hand."""

from __future__ import annotations

import pytest

from conftest import CountingAllocator

from heavylift.planner.allocator import (CachingAllocator, Program, block_size, peak_live, persistent_state, replay,
                                        run, segment_size)

KiB, MiB = 1 << 10, 1 << 20


def test_sizes_round_like_the_caching_allocator():
    assert [block_size(n) for n in (1, 512, 513, 10_000)] == [512, 512, 1024, 10_240]
    # up to 1 MiB: a 2 MiB small segment; up to 10 MiB: a 20 MiB one; beyond: its own, rounded to 2 MiB
    assert [segment_size(n) for n in (512, MiB, MiB + 512, 10 * MiB - 512, 10 * MiB, 11 * MiB + 1)] == [
        2 * MiB, 2 * MiB, 20 * MiB, 20 * MiB, 10 * MiB, 12 * MiB]


def test_a_cached_block_serves_a_smaller_request_and_splits():
    a = CachingAllocator()
    x = a.malloc(5 * MiB)  # a 20 MiB segment: 5 MiB used, a 15 MiB free tail
    y = a.malloc(5 * MiB)  # best fit: the tail; 10 MiB left
    assert (a.allocated, a.reserved) == (10 * MiB, 20 * MiB)
    a.free(x)
    a.free(y)  # merges with x and with the 10 MiB tail: one free 20 MiB block
    z = a.malloc(18 * MiB)
    assert (a.allocated, a.reserved) == (18 * MiB, 20 * MiB)  # 2 MiB rest > 1 MiB: split, not counted
    a.free(z)
    assert a.peak_reserved == 20 * MiB


def test_a_rest_of_one_mib_or_less_stays_with_the_block():
    a = CachingAllocator()
    a.malloc(11 * MiB)  # a 12 MiB segment; the 1 MiB rest is not split off (large pool: more than 1 MiB)
    assert (a.allocated, a.reserved) == (12 * MiB, 12 * MiB)


def test_a_request_larger_than_every_cached_block_takes_a_new_segment():
    a = CachingAllocator()
    x = a.malloc(40 * MiB)
    a.free(x)
    a.malloc(60 * MiB)  # the free 40 MiB block does not fit: 40 + 60 reserved
    assert (a.allocated, a.reserved) == (60 * MiB, 100 * MiB)
    a.empty_cache()  # the wholly free 40 MiB segment goes back
    assert a.reserved == 60 * MiB


def test_empty_cache_keeps_a_segment_with_a_live_block():
    a = CachingAllocator()
    x, y = a.malloc(4 * MiB), a.malloc(4 * MiB)  # one 20 MiB segment
    a.free(x)
    a.empty_cache()
    assert a.reserved == 20 * MiB
    a.free(y)
    a.empty_cache()
    assert a.reserved == 0


def test_replay_and_peak_live_of_a_program():
    p = Program()
    a = p.alloc("a", 30 * MiB)
    b = p.alloc("b", 30 * MiB)
    p.free(a)
    c = p.alloc("c", 20 * MiB)  # fits a's freed 30 MiB block: split, 10 MiB free
    p.free(b, c)
    d = p.alloc("d", 50 * MiB)  # nothing of 50 MiB is free: a new segment
    p.free(d)
    r = replay(p)
    assert (r.peak_allocated, r.peak_reserved, r.allocated) == (60 * MiB, 110 * MiB, 0)
    assert peak_live(p) == 60 * MiB


def test_a_fork_of_persistent_tensors_replays_like_the_whole_program():
    # Two 8 MiB tensors kept for good leave a 4 MiB free tail in their 20 MiB segment, which a 3 MiB
    # transient takes; then a 30 MiB one gets its own segment.
    p = Program()
    p.alloc("kept", 8 * MiB)
    p.alloc("kept", 8 * MiB)
    phase = Program()
    t = phase.alloc("t", 3 * MiB)
    u = phase.alloc("u", 30 * MiB)
    phase.free(t, u)
    whole = Program()
    whole.extend(p)
    whole.extend(phase)
    forked = replay(phase, persistent_state([8 * MiB, 8 * MiB]))
    assert replay(whole) == forked
    assert forked.peak_reserved == 20 * MiB + 30 * MiB


def _layer(p: Program, carried: tuple) -> tuple:
    """A decoder-like layer: its locals are rebound (the new one allocated before the old one is freed), so
    the allocator's blocks come back to where they were only every few layers (every 9, from the 16th)."""
    hidden, x, y = carried
    x2 = p.alloc("x", 3 * MiB)
    p.free(x)
    t = p.alloc("t", 5 * MiB)
    y2 = p.alloc("y", 2 * MiB)
    p.free(y)
    h2 = p.alloc("hidden", 4 * MiB)
    p.free(t, hidden)
    return h2, x2, y2


@pytest.mark.parametrize("layers", [1000, 1001, 1002])  # the cycle of 9 falls short of the end by different amounts
def test_a_repeated_layer_replays_like_every_layer_written_out_and_skips_its_cycles(layers):
    looped, written = Program(), Program()
    for p in (looped, written):
        p.alloc("kept", 7 * MiB)
    carried = looped.repeat(layers, lambda c: _layer(looped, c), (looped.alloc("hidden", 4 * MiB), None, None))
    looped.free(carried[0])
    carried = (written.alloc("hidden", 4 * MiB), None, None)
    for _ in range(layers):
        carried = _layer(written, carried)
    written.free(carried[0])
    assert looped.events == written.events  # the loop written out is the same program
    a, b = CountingAllocator(), CountingAllocator()
    a.play(looped)
    b.play(written)
    assert a == b  # free blocks, segments, counters and peaks; the last layer's locals still live
    assert b.requests == 2 + 4 * layers and a.requests < 4 * 40  # the cycles were skipped


def _looped_and_written(step, carried: tuple, times: int) -> tuple[Program, Program]:
    """The same loop through Program.repeat and written out, after a tensor allocated before it;
    `step(p, before, carried)` is one iteration."""
    looped, written = Program(), Program()
    for p in (looped, written):
        first = p.alloc("before", 96 * KiB)
        if p is looped:
            p.repeat(times, lambda c: step(p, first, c), carried)
        else:
            c = carried
            for _ in range(times):
                c = step(p, first, c)
    return looped, written


def test_a_loop_freeing_a_tensor_from_before_it_is_replayed_as_written():
    # Each iteration keeps a tensor for good and frees the one from before the loop (gone after the first):
    # renumbered, that free would take the tensor a previous iteration kept.
    def step(p: Program, before: int, carried: tuple) -> tuple:
        (x,) = carried
        new = p.alloc("x", 64 * KiB)
        p.alloc("kept", 32 * KiB)
        p.free(x, before)
        return (new,)

    looped, written = _looped_and_written(step, (None,), 6)
    assert looped.events == written.events
    assert replay(looped) == replay(written) and replay(looped).allocated == 64 * KiB + 6 * 32 * KiB


def test_a_loop_passing_on_what_it_did_not_renumber_is_replayed_as_written():
    # The second iteration passes on the first's tensor in another place than the first passed on its own:
    # the third frees it, the second freed nothing.
    def step(p: Program, before: int, carried: tuple) -> tuple:
        newest, older = carried
        new = p.alloc("x", 64 * KiB)
        p.free(older)
        return new, newest

    looped, written = _looped_and_written(step, (None, None), 6)
    assert looped.events == written.events
    assert replay(looped) == replay(written) and replay(looped).allocated == 96 * KiB + 2 * 64 * KiB


def test_a_state_moved_onto_a_smaller_warmup_segment_is_the_replay_there():
    # A program that keeps 8 MiB and frees a 4 MiB temporary, replayed in one free 100 MiB segment, then
    # moved onto a 40 MiB warm-up segment whose first 6 MiB hold an embedding: kept block at [6, 14), the
    # temporary merged back into the free block [14, 40); 14 MiB allocated, 40 reserved, the warm-up (a
    # 40 MiB tensor) the allocated peak.
    program = Program()
    program.alloc("kept", 8 * MiB)
    program.free(program.alloc("temporary", 4 * MiB))
    segment = Program()
    segment.free(segment.alloc("warmup", 100 * MiB))
    shared = run(segment).fork()
    shared.play(program)
    start = Program()
    start.free(start.alloc("warmup", 40 * MiB))
    start.alloc("embed", 6 * MiB)
    on_start = run(start)
    moved = shared.moved_onto(on_start)
    on_start.play(program)
    assert moved == on_start
    assert moved.free_blocks() == [(14 * MiB, 26 * MiB, False)] and moved.segments() == {0: 40 * MiB}
    assert (moved.allocated, moved.reserved, moved.peak_allocated, moved.peak_reserved) == (
        14 * MiB, 40 * MiB, 40 * MiB, 40 * MiB)


@pytest.mark.parametrize("nbytes", [300, 96 * KiB, 2816 * KiB, 3 * MiB, 7 * MiB, 12 * MiB])
def test_keeping_many_tensors_of_one_size_is_as_many_mallocs(nbytes):
    # Free blocks of assorted sizes in both pools, then 40 requests of one size kept for good. Requests of
    # 2.75 MiB carve a 9 MiB block three times, the third taking the last 3.5 MiB whole: its 0.75 MiB rest
    # is not split off.
    p = Program()
    held = [p.alloc("t", n) for n in (700, 5 * KiB, 200 * KiB, 3 * MiB + 300 * KiB, 9 * MiB, 25 * MiB, 13 * MiB)
            for _ in range(3)]
    p.free(*held[::2])
    one, many = run(p), run(p)
    for _ in range(40):
        one.malloc(nbytes)
    many.keep(nbytes, 40)
    assert many == one  # free blocks, segments, counters and peaks


def test_keeping_tensors_never_carves_the_next_segment():
    # A 20 MiB segment ends with a free 4 MiB block; the next one starts with a free 9 MiB block and has a
    # free 6 MiB block further on. Two 4 MiB requests take the 4 MiB block, then the front of the 6 MiB one.
    p = Program()
    a1, a2, a3 = p.alloc("a", 8 * MiB), p.alloc("a", 8 * MiB), p.alloc("a", 4 * MiB)
    b1, b2 = p.alloc("b", 9 * MiB), p.alloc("b", 5 * MiB)
    p.free(b1, a3)
    kept = run(p)
    kept.keep(4 * MiB, 2)
    assert kept.free_blocks() == [(20 * MiB, 9 * MiB, False), (38 * MiB, 2 * MiB, False)]
