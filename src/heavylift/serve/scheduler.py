"""Continuous batching: requests join the running decode batch at the next step and leave it at once.

One worker thread owns the model. Each turn of its loop it takes cancellations, admits waiting requests
into free slots, then steps the model once. While streams decode on the engine, the oldest prompt still
prefilling rides inside their step: a mixed step carries every decoding stream's token and as many of the
prompt's next tokens as the step's budget leaves (Backend.step_tokens), so a prompt lengthens the streams'
steps a little instead of stalling them (chunked prefill). With no stream decoding past its first token
(an idle server, a burst of prompts), a prompt goes in standalone chunks of PREFILL_CHUNK_TOKENS (the
fastest first token) and decoding waits until the burst is in; a prompt that asks for its own scores,
and every prompt on transformers, goes in standalone chunks of `prefill_chunk` between decode steps. Each
sequence has its own sampling, stop strings and length; one that ends, fails or is cancelled frees its slot
before the next step. Events reach the asyncio side through each request's
queue (`Stream`), handed over with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from heavylift.defaults import PREFILL_CHUNK_TOKENS, SERVE_MIXED_MIN_PREFILL_TOKENS
from heavylift.errors import OutOfMemoryError
from heavylift.runtime.sampling import Sampling
from .backends import Backend, EngineBackend, backend_for
from .events import (LENGTH, STOP, Delta, Detokenizer, Done, Failed, PromptScores, QueueFullError, Request, Stats,
                     StoppingError, Stream, TokenScore, held_back)

log = logging.getLogger("heavylift.serve")

_NOT_STARTED = iter(())  # a sequence's prefill before its first chunk: the backend starts it in a guarded step
_MIXING = iter(())  # a sequence's prefill going in mixed steps (_Sequence.filled tokens of it are in)


@dataclass
class _Sequence:
    request: Request
    stream: Stream
    slot: int
    sampling: Sampling
    detokenizer: Detokenizer
    prefill: Iterator | None = None
    filled: int = 0  # prompt tokens in the cache, where the prompt goes in mixed steps
    token: int | None = None  # the token the next decode step feeds
    generated: int = 0
    text: str = ""  # generated text not yet sent: a possible start of a stop string
    generator: torch.Generator | None = None


class Scheduler:
    """Runs a Session's model for up to `max_seqs` sequences at once, with up to `max_queue` waiting; a
    prompt that arrives while others decode rides in their steps (the engine), or is prefilled in standalone
    chunks of `prefill_chunk` tokens between them (its own scores asked for, or transformers)."""

    def __init__(self, session, max_seqs: int, max_queue: int, backend: Backend | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS) -> None:
        self.session, self.max_queue, self.prefill_chunk = session, max_queue, prefill_chunk
        self.tokenizer = session.tokenizer
        self.context = session.plan.context
        self.backend = backend or backend_for(session, max_seqs)
        self.slots_total = self.backend.slots
        self._eos = session._eos_ids()
        self._lock = threading.Condition()
        self._waiting: deque[Stream] = deque()
        self._cancelled: set[Stream] = set()
        self._running: list[_Sequence] = []
        self._free = list(range(self.slots_total))
        self._stopping = False
        self._deadline: float | None = None
        self._ahead: tuple[list[_Sequence], torch.Tensor] | None = None  # a step launched before its turn
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once warmed up, or once warming up failed (`failure`)
        self.failure: BaseException | None = None
        self.prompt_tokens_total = self.generated_tokens_total = 0

    # -- the asyncio side --------------------------------------------------------------------------

    def start(self) -> None:
        if self.session.device.type == "cpu":
            # The model's CPU threads would take every core, and OpenMP's spin-waiting between operations
            # starves the event loop that sends the tokens (on 2 cores: 100x slower streams): leave it one.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
        self._thread = threading.Thread(target=self._work, name="heavylift-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Stream:
        """Queue a request (from the event loop's thread); QueueFullError when max_queue already wait."""
        if len(request.prompt) + request.max_tokens > self.context:
            raise ValueError(f"{len(request.prompt)} prompt tokens + {request.max_tokens} exceed {self.context}")
        stream = Stream(self._cancel, request, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise StoppingError("the server is shutting down; retry on another instance")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already wait (--max-queue {self.max_queue}); "
                                     "retry shortly")
            self._waiting.append(stream)
            self._lock.notify()
        return stream

    def stats(self) -> Stats:
        with self._lock:
            return Stats(len(self._running), len(self._waiting), self.slots_total - len(self._free),
                         self.slots_total, self.prompt_tokens_total, self.generated_tokens_total)

    def shutdown(self, drain_seconds: float) -> None:
        """Admit nothing more, fail what waits, give running sequences `drain_seconds`, cancel the rest."""
        with self._lock:
            self._stopping = True
            self._deadline = time.monotonic() + drain_seconds
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(drain_seconds + 30)

    def _cancel(self, stream: Stream) -> None:
        with self._lock:
            stream.cancelled = True
            self._cancelled.add(stream)
            self._lock.notify()

    # -- the worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            try:
                self.backend.warm_up()
            except torch.OutOfMemoryError:
                self.failure = OutOfMemoryError(
                    f"out of GPU memory preparing the decode steps of {self.slots_total} sequences; lower "
                    "--max-seqs or --context")
                return
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on `ready` (the server stops)
                self.failure = e
                return
            finally:
                self.ready.set()
            while True:
                try:
                    if not self._turn():
                        return
                except Exception:  # a fault of the scheduler itself: logged, and the loop goes on
                    log.exception("the scheduler's loop failed a turn")

    def _turn(self) -> bool:
        """One turn of the loop: False when the scheduler has stopped."""
        with self._lock:
            for stream in self._cancelled:
                self._drop_cancelled(stream)
            self._cancelled.clear()
            if self._stopping:
                while self._waiting:
                    self._waiting.popleft()._put(Failed("the server is shutting down; retry later", 503))
                if not self._running:
                    return False
                if time.monotonic() > self._deadline:
                    for seq in list(self._running):
                        self._end(seq, Failed("the server stopped before this request finished", 503))
                    return False
            while self._waiting and self._free:
                self._admit(self._waiting.popleft())
            if not self._running:
                self._lock.wait(timeout=0.5)
                return True
        prefilling = next((s for s in self._running if s.prefill is not None), None)
        if prefilling is not None and self._mixes(prefilling):
            if self._ahead is not None:  # its tokens first: the mixed step's rows sit where they leave off
                self._guarded(self._decoding(), self._decode_step)
            if prefilling in self._running:
                self._guarded(self._decoding() + [prefilling], self._mixed_step)
            return True
        if prefilling is not None:
            self._guarded([prefilling], self._prefill_chunk)
        decoding = self._decoding()
        if decoding and not self._burst():
            self._guarded(decoding, self._decode_step)
        return True

    def _decoding(self) -> list[_Sequence]:
        return [s for s in self._running if s.prefill is None and s.token is not None]

    def _streaming(self) -> bool:
        """Whether a stream has decoded past its first token (its first comes from its prefill)."""
        return any(s.prefill is None and s.generated >= 2 for s in self._running)

    def _burst(self) -> bool:
        """Whether prompts that arrived together are still going in (on a backend that runs mixed steps):
        another prompt waits to prefill and no stream has decoded yet. Their streams' first decode steps wait
        for every one of them, in standalone chunks: the fastest first tokens, and each stream's one longer
        gap is between its first two tokens. At most the slots' prompts, as nothing more is admitted."""
        return (bool(self.backend.step_tokens) and not self._streaming()
                and any(s.prefill is not None for s in self._running))

    def _mixes(self, seq: _Sequence) -> bool:
        """Whether `seq`'s prompt goes in mixed steps now: the backend runs them, the prompt wants no scores,
        and streams decode past their first token (or its prompt already started in mixed steps)."""
        if not self.backend.step_tokens or seq.request.echo_logprobs:
            return False
        return seq.prefill is _MIXING or (seq.prefill is _NOT_STARTED and self._streaming())

    def _admit(self, stream: Stream) -> None:
        r = stream.request
        self._free.sort()
        slot = self._free.pop(0)  # lowest first: keeps the decode bucket small
        sampling = Sampling(max(r.max_tokens, 1), r.temperature, r.top_p, r.top_k, r.seed)
        seq = _Sequence(r, stream, slot, sampling, Detokenizer(self.tokenizer), prefill=_NOT_STARTED)
        self._running.append(seq)
        self.prompt_tokens_total += len(r.prompt)

    def _drop_cancelled(self, stream: Stream) -> None:
        if stream in self._waiting:
            self._waiting.remove(stream)
        for seq in self._running:
            if seq.stream is stream:
                self._release(seq)
                return

    def _release(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        seq.prefill = None
        self.backend.release(seq.slot)
        self._free.append(seq.slot)

    def _end(self, seq: _Sequence, event) -> None:
        if seq in self._running:
            self._release(seq)
        seq.stream._put(event)

    def _guarded(self, seqs: list[_Sequence], step) -> None:
        """Run a step; an out-of-memory error fails the newest of its sequences (the others retry next
        turn), any other error fails them all: the server goes on either way."""
        try:
            step(seqs)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            victim = seqs[-1]
            context = len(victim.request.prompt) + victim.generated
            log.warning("out of GPU memory at %d tokens; failing that request", context)
            self._end(victim, Failed(f"out of GPU memory at {context} tokens in this request; retry it "
                                     "shorter or when fewer requests run", 503))
        except Exception:  # the server's fault, not the client's: logged in full, reported in one line
            log.exception("a generation step failed")
            for seq in seqs:
                self._end(seq, Failed("internal error while generating; see the server's log", 500))

    def _prefill_chunk(self, seqs: list[_Sequence]) -> None:
        seq = seqs[0]
        r = seq.request
        if seq.prefill is _NOT_STARTED:
            others = any(s.prefill is None for s in self._running)  # streams a long chunk would hold up
            seq.prefill = self.backend.prefill(seq.slot, list(r.prompt), (r.logprobs or 0) if r.echo_logprobs else None,
                                               self.prefill_chunk if others else PREFILL_CHUNK_TOKENS)
        result = next(seq.prefill)
        if result is None:
            return
        seq.prefill = None
        logits, scores = result
        if r.echo_logprobs:
            first = TokenScore(r.prompt[0], None)
            seq.stream._put(PromptScores((first,) + tuple(
                TokenScore(t, lp, top) for t, (lp, top) in zip(r.prompt[1:], scores))))
        if r.max_tokens == 0:
            self._end(seq, Done(LENGTH, len(r.prompt), 0))
            return
        self._choose([seq], logits)

    def _mixed_step(self, seqs: list[_Sequence]) -> None:
        """One mixed step: each decoding sequence's token (the first of `seqs`) and the next tokens of the
        last one's prompt, as many as the step's budget leaves (at least SERVE_MIXED_MIN_PREFILL_TOKENS, at
        most the engine's rows); the prompt's first token comes from its last row once it is all in."""
        *decoding, seq = seqs
        prompt = seq.request.prompt
        seq.prefill = _MIXING
        room = max(self.backend.step_tokens - len(decoding), SERVE_MIXED_MIN_PREFILL_TOKENS)
        chunk = prompt[seq.filled:seq.filled + min(room, self.slots_total - len(decoding))]
        rows = [(s.slot, len(s.request.prompt) + s.generated - 1, s.token) for s in decoding]
        rows += [(seq.slot, seq.filled + i, token) for i, token in enumerate(chunk)]
        logits = self.backend.mixed(rows)
        seq.filled += len(chunk)
        if seq.filled < len(prompt):
            if decoding:
                self._choose(decoding, logits[:len(decoding)])
            return
        seq.prefill = None
        if seq.request.max_tokens == 0:
            self._end(seq, Done(LENGTH, len(prompt), 0))
            seqs = decoding
        picked = list(range(len(decoding))) + ([len(rows) - 1] if len(seqs) > len(decoding) else [])
        self._choose(seqs, logits[picked])

    def _decode_step(self, seqs: list[_Sequence]) -> None:
        """One decode step of `seqs`, or, where the last turn launched the next step ahead, its results
        for those of its sequences still running (a newcomer joins on the next turn)."""
        if self._ahead is not None:
            members, logits = self._ahead
            self._ahead = None
            seqs = [s for s in members if s in self._running]
            if not seqs:
                return
        else:
            logits = self.backend.decode({s.slot: s.token for s in seqs})
        rows = [s.slot for s in seqs]
        self._choose(seqs, logits if rows == list(range(len(logits))) else logits[rows], ahead=True)

    def _can_look_ahead(self) -> bool:
        """Whether the next decode step may start before this one's tokens reach the host: the engine feeds
        them on the GPU, and nothing else is due before that step (a prompt to prefill, a request to
        admit, a cancellation, stopping)."""
        return (isinstance(self.backend, EngineBackend) and not self._stopping and not self._cancelled
                and not (self._waiting and self._free) and all(s.prefill is None for s in self._running))

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor, ahead: bool = False) -> None:
        """Each sequence's next token from its row of `logits`, then what it releases. With `ahead`, and
        where _can_look_ahead, the next step is launched on the chosen tokens before they are read back,
        so the host's work of this step (text, stop strings, the events) overlaps the GPU's of the next.
        A sequence that this step ends still rides in that step; its row is dropped."""
        tokens = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                if seq.generator is None and seq.sampling.seed is not None:
                    seq.generator = seq.sampling.generator(logits.device)
                tokens[i] = seq.sampling.choose(logits[i:i + 1], seq.generator)[0, 0]
        if ahead and self._can_look_ahead():
            host = torch.empty(len(seqs), dtype=tokens.dtype, pin_memory=tokens.is_cuda)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event() if tokens.is_cuda else None
            if copied is not None:
                copied.record()
            self._ahead = (seqs, self.backend.decode_on_device([s.slot for s in seqs], tokens))
            if copied is not None:
                copied.synchronize()  # the GIL is free meanwhile
            chosen = host.tolist()
        else:
            _wait(tokens)
            chosen = tokens.tolist()
        for i, seq in enumerate(seqs):
            score = None
            if seq.request.logprobs is not None:
                row = torch.log_softmax(logits[i].float(), dim=-1)
                top = torch.topk(row, seq.request.logprobs) if seq.request.logprobs else None
                score = TokenScore(chosen[i], float(row[chosen[i]]),
                                   tuple(zip(top.indices.tolist(), top.values.tolist())) if top else ())
            self._emit(seq, chosen[i], score or TokenScore(chosen[i], None))

    def _emit(self, seq: _Sequence, token: int, score: TokenScore) -> None:
        """Send what `token` adds to the text, holding back a possible start of a stop string; end the
        sequence on end-of-sequence, a stop string, or its length."""
        seq.generated += 1
        self.generated_tokens_total += 1
        r = seq.request
        finish = STOP if token in self._eos else (LENGTH if seq.generated >= r.max_tokens else None)
        seq.text += "" if token in self._eos else seq.detokenizer.add(token)
        cut = min((i for i in (seq.text.find(s) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            seq.text, finish = seq.text[:cut], STOP
        held = 0 if finish else held_back(seq.text, r.stop)
        piece, seq.text = seq.text[:len(seq.text) - held], seq.text[len(seq.text) - held:]
        seq.stream._put(Delta(piece, (score,)))
        if finish:
            self._end(seq, Done(finish, len(r.prompt), seq.generated))
        else:
            seq.token = token


def _wait(tensor: torch.Tensor) -> None:
    """Wait for the GPU work that makes `tensor` with the GIL released (a stream's synchronize lets it go;
    `.tolist()` would hold it), so the event loop sends the last tokens while the step runs."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
