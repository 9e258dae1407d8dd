"""What the scheduler drives: a loaded model as slots that prefill a chunk at a time and decode together.

`EngineBackend` is the fast engine: every slot's KV cache preallocated, one batched decode step over the
slots in use, padded up to a batch bucket whose CUDA graphs are captured at start, and mixed steps whose
rows are decode tokens and a prompt's chunk (`step_tokens` rows at most). `TransformersBackend`
serves the families the engine does not run: each sequence gets its own static cache when it is admitted
and steps through transformers' forward on its own, more slowly but with the same results.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import torch

from heavylift.defaults import PREFILL_CHUNK_TOKENS, SERVE_MIXED_STEP_TOKENS
from heavylift.engine.model import token_scores
from heavylift.engine.weights import KIND_NAMES
from heavylift.runtime.loader import expected_int8_casts

# What a prefill yields: None after each chunk but the last, then (the last position's logits [1, vocab]
# float32, the prompt's scores or None; see Engine.prefill_steps).
PrefillSteps = Iterator["tuple[torch.Tensor, list | None] | None"]


# A mixed step's row: (slot, cache position, token).
Row = "tuple[int, int, int]"


class Backend(Protocol):
    slots: int
    step_tokens: int  # rows of a mixed step (`mixed`) at most; 0: the backend runs none

    def warm_up(self) -> None: ...

    def prefill(self, slot: int, ids: list[int], scores: int | None, chunk: int) -> PrefillSteps: ...

    def decode(self, tokens: Mapping[int, int]) -> torch.Tensor: ...

    def release(self, slot: int) -> None: ...

    def mixed(self, rows: "list[Row]") -> torch.Tensor: ...


def buckets(slots: int) -> list[int]:
    """The batch sizes decode steps are padded to: powers of two below `slots`, and `slots` itself."""
    sizes = {slots}
    size = 1
    while size < slots:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class EngineBackend:
    """The fast engine over `slots` sequences: a step runs the smallest bucket holding every slot in use
    (slots are handed out lowest first, so a bucket is rarely larger than the count in use)."""

    def __init__(self, engine) -> None:
        self.engine, self.slots = engine, engine.batch
        self.buckets = buckets(self.slots)
        engine.enable_ragged()
        # Host staging of each step's tokens and active rows, pinned where a GPU reads them: built once.
        pin = torch.cuda.is_available() and engine.embed.device.type == "cuda"
        # The active rows alternate between two buffers: a step's copy to the GPU is asynchronous, and the
        # next step, launched before this one ends, must not rewrite what it has yet to read.
        self._feed = torch.zeros(self.slots, dtype=torch.long, pin_memory=pin)
        self._actives = [torch.zeros(self.slots, dtype=torch.bool, pin_memory=pin) for _ in range(2)]
        self._steps = 0
        # A mixed step's rows, staged for an asynchronous copy: one set, rewritten only once the last mixed
        # step that read it has run (`_staged`).
        self._rows = dict(tokens=torch.zeros(self.slots, dtype=torch.long, pin_memory=pin),
                          slots=torch.zeros(self.slots, dtype=torch.long, pin_memory=pin),
                          positions=torch.zeros(self.slots, dtype=torch.int32, pin_memory=pin),
                          lengths=torch.zeros(self.slots, dtype=torch.int32, pin_memory=pin))
        self._staged = torch.cuda.Event() if pin else None
        self.step_tokens = min(SERVE_MIXED_STEP_TOKENS[KIND_NAMES[engine.layers[0].gate.kind]], self.slots)

    def warm_up(self) -> None:
        """Capture every bucket's graphs now (autotuning included), decode and mixed, with no row active
        (decode) or only padding rows (mixed, slot 0 freed again after): nothing advances."""
        for size in self.buckets:
            self.engine.decode(torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.bool))
        for size in self.buckets:
            self._mixed([], size)
        self.engine.free_slot(0)

    def prefill(self, slot: int, ids: list[int], scores: int | None, chunk: int) -> PrefillSteps:
        return self.engine.prefill_steps(ids, slot, scores, chunk)

    def decode(self, tokens: Mapping[int, int]) -> torch.Tensor:
        """One step of the sequences in `tokens` (slot: the token to feed); the logits, row = slot."""
        size = next(b for b in self.buckets if b > max(tokens))
        feed, active = self._feed[:size], self._active(size)
        for slot, token in tokens.items():
            feed[slot], active[slot] = token, True
        return self.engine.decode(feed, active)

    def _active(self, size: int) -> torch.Tensor:
        """This step's active-rows buffer, cleared."""
        self._steps += 1
        active = self._actives[self._steps % 2][:size]
        return active.zero_()

    def decode_on_device(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """`decode` fed from the device: tokens[i] goes to slots[i], with no wait for the host."""
        size = next(b for b in self.buckets if b > max(slots))
        active = self._active(size)
        active[slots] = True
        if slots == list(range(len(slots))) and size == len(slots):
            return self.engine.decode(tokens, active)
        feed = torch.zeros(size, dtype=torch.long, device=tokens.device)
        feed[torch.tensor(slots, device=tokens.device)] = tokens
        return self.engine.decode(feed, active)

    def mixed(self, rows: list[Row]) -> torch.Tensor:
        """One step of `rows` (slot, position, token): each writes its token's key and value at that position
        of its slot and sees the slot's cache up to it (Engine.mixed); the logits, row i = rows[i]."""
        return self._mixed(rows, next(b for b in self.buckets if b >= len(rows)))

    def _mixed(self, rows: list[Row], size: int) -> torch.Tensor:
        if self._staged is not None:
            self._staged.synchronize()
        logits = self.engine.mixed(*self._fill(rows, size))
        if self._staged is not None:
            self._staged.record()
        return logits

    def _fill(self, rows: list[Row], size: int) -> tuple[torch.Tensor, ...]:
        """The staging buffers holding `rows` padded to `size`: a padding row writes at the context's last
        position (no sequence reaches it) of the first row's slot, and sees 1 position."""
        tokens, slots, positions, lengths = (self._rows[k][:size] for k in ("tokens", "slots", "positions", "lengths"))
        n = len(rows)
        if n:
            slot, position, token = zip(*rows)
            tokens[:n], slots[:n] = torch.tensor(token), torch.tensor(slot)
            positions[:n] = torch.tensor(position, dtype=torch.int32)
            torch.add(positions[:n], 1, out=lengths[:n])
        tokens[n:], slots[n:] = 0, rows[0][0] if n else 0
        positions[n:], lengths[n:] = self.engine.context - 1, 1
        return tokens, slots, positions, lengths

    def release(self, slot: int) -> None:
        self.engine.free_slot(slot)


class TransformersBackend:
    """transformers' forward, one sequence at a time, each in a static cache of the plan's context
    allocated when it is admitted and dropped when it ends (the planner counts `slots` of them)."""

    step_tokens = 0  # no mixed steps: transformers steps each sequence on its own

    def __init__(self, session, slots: int) -> None:
        self.session, self.slots = session, slots
        self.model = session.model
        self.caches: dict[int, object] = {}

    def warm_up(self) -> None:
        pass

    def prefill(self, slot: int, ids: list[int], scores: int | None, chunk: int) -> PrefillSteps:
        self.caches[slot] = cache = self.session._static_cache(1)
        tokens = torch.tensor([ids], device=self.session.device)
        found = [] if scores is not None else None
        chunk = min(chunk, self.session.prefill_chunk or PREFILL_CHUNK_TOKENS)
        for start in range(0, len(ids), chunk):
            piece = tokens[:, start:start + chunk]
            last = start + chunk >= len(ids)
            with torch.inference_mode(), expected_int8_casts():
                if found is not None:
                    logits = self.model(input_ids=piece, cache=cache, use_cache=True).logits[0].float()
                    following = tokens[0, start + 1:start + 1 + piece.shape[1]]  # one fewer at the end
                    found += token_scores(logits[:len(following)], following, scores)
                    logits = logits[-1:]
                elif last:
                    logits = self.model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                else:
                    self.model.model(input_ids=piece, cache=cache, use_cache=True)
            if not last:
                yield None
        yield logits.float(), found

    def decode(self, tokens: Mapping[int, int]) -> torch.Tensor:
        rows = {}
        with torch.inference_mode(), expected_int8_casts():
            for slot, token in tokens.items():
                feed = torch.tensor([[token]], device=self.session.device)
                rows[slot] = self.model(input_ids=feed, cache=self.caches[slot], use_cache=True,
                                        logits_to_keep=1).logits[0, -1].float()
        first = next(iter(rows.values()))
        out = torch.zeros(max(rows) + 1, first.shape[-1], dtype=torch.float32, device=first.device)
        for slot, row in rows.items():
            out[slot] = row
        return out

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    def mixed(self, rows: list[Row]) -> torch.Tensor:
        raise NotImplementedError("transformers runs no mixed steps (step_tokens is 0)")


def backend_for(session, slots: int) -> Backend:
    """The engine where the session runs on it (its batch is the plan's, the slot count), else transformers."""
    if session.engine is not None:
        return EngineBackend(session.engine)
    return TransformersBackend(session, slots)
