"""The prompt lengths a device's plan replays, and the worst of them.

What the caching allocator reserves is not monotone in the prompt length: at a shorter prompt a block that a
tensor frees can be just too small for a later request that the longest prompt's block holds, and that
request takes a segment of its own (docs/planner.md "Prompt lengths"). A device's plan (memory.runtime_terms
with every_prompt) replays the lengths `prompt_lengths` names and counts the worst. Pure: no torch.
"""

from __future__ import annotations

from math import gcd
from typing import Callable, Sequence

from heavylift.defaults import PREFILL_CHUNK_TOKENS, PROMPT_BAND_TOKENS, PROMPT_REFINE_COUNT, PROMPT_REFINE_TOKENS, \
    PROMPT_ROW_GRID, SDPA_MASK_ALIGNMENT
from heavylift.model.architecture import Architecture

# A device's replay at a prompt length: (prompt tokens, whole) -> (bytes held at the peak beyond the weights,
# bytes of them the runtime keeps from its start); without `whole`, of the prefill's last chunk alone, which
# is what differs between lengths (memory._reserve).
Replay = Callable[[int, bool], tuple[int, int]]


def prefill_chunk(tokens: int) -> int:
    """Tokens of one prefill step: heavylift prefills long prompts in chunks."""
    return min(tokens, PREFILL_CHUNK_TOKENS)


def longest_prompt(context: int, fast: bool, serve: bool) -> int:
    """The longest prompt a plan covers: the context (its last logits give the one token out), or on a server
    of heavylift's engine (`fast`) the context - 1 (a new sequence's prompt leaves room for one token out)."""
    return max(1, context - 1) if serve and fast else context


def prompt_lengths(arch: Architecture, fast: bool, context: int, batch: int, serve: bool,
                   chunk: int = 0) -> tuple[int, ...]:
    """The prompt lengths a device's plan replays, longest first: the longest it covers (longest_prompt), and the
    longest of each shape the runtime's program takes below it. On heavylift's engine (`fast`), whose replay is
    dear: the longest whose attention mask SDPA pads (a copy of the last chunk's mask, 512 MiB at 131,071 tokens)
    and the longest whose mask it does not (SDPA_MASK_ALIGNMENT). On transformers' forward: the longest of one
    prefill chunk and of two (every later count of chunks repeats their kinds), the longest within each sliding
    window, every length within PROMPT_BAND_TOKENS of the longest and every length whose last chunk holds a
    multiple of PROMPT_ROW_GRID rows (defaults.py says why), its chunks `chunk` tokens (0: prefill_chunk's)."""
    longest = longest_prompt(context, fast, serve)
    if fast:
        aligned = longest // SDPA_MASK_ALIGNMENT * SDPA_MASK_ALIGNMENT
        return tuple(sorted({longest, *(n for n in (longest - 1, aligned) if 0 < n < longest)}, reverse=True))
    chunk = min(longest, chunk) if chunk else prefill_chunk(longest)
    lengths = {longest, *(n for n in (chunk, 2 * chunk) if n < longest)}
    lengths |= {w for w in arch.layer_windows if w and w < longest}
    lengths |= set(range(max(1, longest - PROMPT_BAND_TOKENS + 1), longest + 1))
    rows = 1 if serve else batch  # a server on transformers prefills one sequence at a time
    step = PROMPT_ROW_GRID // gcd(PROMPT_ROW_GRID, rows)  # tokens from one such length to the next
    last = (longest - 1) // chunk * chunk  # where the longest prompt's last chunk starts
    lengths |= {start + t for start in {0, last} for t in range(step, chunk + 1, step) if start + t <= longest}
    return tuple(sorted(lengths, reverse=True))


def worst_prompt(lengths: Sequence[int], replay: Replay, fast: bool) -> tuple[int, tuple[int, int]]:
    """Of `lengths` (prompt_lengths, the longest first), the one at which the device holds the most, the longest
    among equals, with its replay. The longest is replayed whole, the others by their prefill's last chunk. On
    heavylift's engine (`fast`) that is exact: the rest of its run does not depend on the prompt. On
    transformers' forward, whose prompt ids and decode steps do, every length within PROMPT_REFINE_TOKENS of the
    PROMPT_REFINE_COUNT worst prefills is ranked too, and the worst few are replayed whole."""
    longest = lengths[0]
    whole = {longest: replay(longest, True)}
    prefill: dict[int, tuple[int, int]] = {}

    def ahead(p: int) -> tuple[int, int]:
        if p not in prefill:
            prefill[p] = replay(p, False)
        return prefill[p][0], p

    ranked = sorted(lengths[1:], key=ahead, reverse=True)
    if fast:
        if ranked and ahead(ranked[0])[0] > whole[longest][0]:
            whole[ranked[0]] = (prefill[ranked[0]][0], whole[longest][1])
    else:
        near = {q for p in ranked[:PROMPT_REFINE_COUNT]
                for q in range(max(1, p - PROMPT_REFINE_TOKENS), min(longest - 1, p + PROMPT_REFINE_TOKENS) + 1)}
        worst_few = sorted(near.union(ranked), key=ahead, reverse=True)[:PROMPT_REFINE_COUNT]
        whole.update((p, replay(p, True)) for p in worst_few)
    worst = max(whole, key=lambda p: (whole[p][0], p))
    return worst, whole[worst]
