"""The caching-allocator model, rule by rule, on sequences small enough to follow by hand."""

from __future__ import annotations

from heavylift.planner.allocator import CachingAllocator, Program, block_size, peak_live, persistent_state, replay, segment_size

MiB = 1 << 20


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
