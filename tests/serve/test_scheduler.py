"""The continuous-batching scheduler in-process, on both backends: sequences that join, leave and prefill in
chunks between decode steps give what each gives alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

import heavylift
from heavylift.serve.backends import buckets
from heavylift.serve.events import Delta, Done, Failed, PromptScores, QueueFullError, Request, held_back
from heavylift.serve.scheduler import Scheduler
from conftest import save_runnable_checkpoint

CONTEXT, SLOTS = 96, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_runnable_checkpoint(tmp_path_factory.mktemp("served"), "llama")


@pytest.fixture(scope="module", params=["fast", "transformers"])
def served(request, folder):
    """(session, scheduler) on the engine's CPU path or on transformers; prefill chunks of 8 tokens."""
    patch = pytest.MonkeyPatch()
    patch.setattr("heavylift.engine.model.PREFILL_CHUNK_TOKENS", 8)
    patch.setattr("heavylift.serve.backends.PREFILL_CHUNK_TOKENS", 8)
    session = heavylift.load(str(folder), quant="bf16", context=CONTEXT, batch=SLOTS, engine=request.param)
    assert (session.engine is not None) == (request.param == "fast")
    scheduler = Scheduler(session, SLOTS, max_queue=64)
    scheduler.start()
    scheduler.ready.wait()
    yield session, scheduler
    scheduler.shutdown(1)
    patch.undo()


async def _collect(scheduler: Scheduler, request: Request, cancel_after: int | None = None):
    """(text, token ids, the last event, PromptScores or None) of one request."""
    stream = scheduler.submit(request)
    text, ids, last, scores = "", [], None, None
    async for event in stream:
        if isinstance(event, Delta):
            text += event.text
            ids += [t.id for t in event.tokens]
            if cancel_after is not None and len(ids) >= cancel_after:
                stream.cancel()
                return text, ids, None, None
        elif isinstance(event, PromptScores):
            scores = event
        else:
            last = event
    return text, ids, last, scores


def _prompt(session, i: int) -> tuple[int, ...]:
    """Prompts of 3 to 40 tokens: some prefill in one chunk, some in five."""
    return tuple(session.encode(" ".join(f"w{i}x{j}" for j in range(1 + 4 * (i % 4))), raw=True))


def _alone(session, prompt: tuple[int, ...], n: int) -> list[int]:
    return list(session.generate(session.tokenizer.decode(prompt), raw=True, max_new_tokens=n, temperature=0).token_ids)


def test_sequences_joining_and_leaving_give_what_each_gives_alone(served):
    session, scheduler = served
    prompts = [_prompt(session, i) for i in range(10)]
    lengths = [4 + 3 * (i % 5) for i in range(10)]  # sequences leave at different steps

    async def main():
        return await asyncio.gather(*[_collect(scheduler, Request(p, n, temperature=0))
                                      for p, n in zip(prompts, lengths)])

    results = asyncio.run(main())  # 10 requests on 4 slots: 6 wait, then join as others leave
    for prompt, n, (_, ids, done, _) in zip(prompts, lengths, results):
        assert ids == _alone(session, prompt, n)
        assert done == Done("length", len(prompt), n)
    stats = scheduler.stats()
    assert (stats.running, stats.waiting, stats.slots_used) == (0, 0, 0)


def test_a_stop_string_ends_the_text_before_it_and_a_seed_repeats(served):
    session, scheduler = served
    prompt = _prompt(session, 3)

    async def main():
        full = await _collect(scheduler, Request(prompt, 24, temperature=0))
        stop = full[0][6:9]
        cut = await _collect(scheduler, Request(prompt, 24, temperature=0, stop=("never there", stop)))
        seeded = [await _collect(scheduler, Request(prompt, 12, temperature=1.0, seed=11)) for _ in range(2)]
        return full, stop, cut, seeded

    full, stop, cut, seeded = asyncio.run(main())
    assert cut[0] == full[0][:full[0].find(stop)]
    assert cut[2].finish_reason == "stop"
    assert seeded[0][1] == seeded[1][1]


def test_echo_scores_are_the_models_own_log_probabilities(served, folder):
    from transformers import AutoModelForCausalLM

    session, scheduler = served
    prompt = _prompt(session, 7)
    *_, done, scores = asyncio.run(_collect(scheduler, Request(prompt, 0, logprobs=2, echo_logprobs=True)))
    assert done == Done("length", len(prompt), 0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert [t.id for t in scores.tokens] == list(prompt) and scores.tokens[0].logprob is None
    for i, token in enumerate(scores.tokens[1:]):
        assert token.logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=0.05)
        second = expected[i].topk(2).values[-1].item()
        for t, logprob in token.top:  # the two best, up to the engine's bf16 rounding (near-ties may swap)
            assert logprob == pytest.approx(expected[i, t].item(), abs=0.05) and logprob >= second - 0.1


def test_a_cancelled_sequence_frees_its_slot_and_the_others_go_on(served):
    session, scheduler = served
    prompts = [_prompt(session, i) for i in range(4)]

    async def main():
        gone = [_collect(scheduler, Request(p, 40, temperature=0), cancel_after=2) for p in prompts[:2]]
        kept = [_collect(scheduler, Request(p, 12, temperature=0)) for p in prompts[2:]]
        return await asyncio.gather(*gone, *kept)

    results = asyncio.run(main())
    for prompt, (_, ids, done, _) in zip(prompts[2:], results[2:]):
        assert ids == _alone(session, prompt, 12) and done.finish_reason == "length"
    for _ in range(100):  # the worker takes the cancellation on its next turn
        if scheduler.stats().slots_used == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert scheduler.stats().slots_used == 0


def test_out_of_memory_fails_only_that_request(served, monkeypatch):
    session, scheduler = served
    doomed, fine = _prompt(session, 5), _prompt(session, 6)
    real = scheduler.backend.prefill

    def prefill(slot, ids, scores, chunk):
        if tuple(ids) == doomed:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(slot, ids, scores, chunk)

    monkeypatch.setattr(scheduler.backend, "prefill", prefill)

    async def main():
        return await asyncio.gather(_collect(scheduler, Request(doomed, 5, temperature=0)),
                                    _collect(scheduler, Request(fine, 5, temperature=0)))

    (_, _, failed, _), (_, ids, done, _) = asyncio.run(main())
    assert isinstance(failed, Failed) and failed.status == 503 and "out of GPU memory" in failed.message
    assert ids == _alone(session, fine, 5) and done.finish_reason == "length"


def test_a_full_queue_refuses_at_once(folder):
    session = heavylift.load(str(folder), quant="bf16", context=CONTEXT, batch=1, engine="transformers")
    scheduler = Scheduler(session, 1, max_queue=2)  # not started: nothing leaves the queue

    async def main():
        for _ in range(2):
            scheduler.submit(Request((5, 6), 1))
        with pytest.raises(QueueFullError, match="--max-queue 2"):
            scheduler.submit(Request((5, 6), 1))

    asyncio.run(main())


def test_held_back_text_is_the_longest_possible_start_of_a_stop_string():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("lo!", "llo?")) == 3
    assert held_back("hello", ("x",)) == 0
    assert held_back("", ("ab",)) == 0


def test_decode_buckets_are_powers_of_two_and_the_slot_count():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(16) == [1, 2, 4, 8, 16]


def test_out_of_memory_while_warming_up_is_one_line_that_says_what_to_lower(folder):
    from heavylift.errors import OutOfMemoryError

    session = heavylift.load(str(folder), quant="bf16", context=CONTEXT, batch=2, engine="fast")
    scheduler = Scheduler(session, 2, max_queue=1)

    def warm_up():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    scheduler.backend.warm_up = warm_up
    scheduler.start()
    assert scheduler.ready.wait(30)
    assert isinstance(scheduler.failure, OutOfMemoryError)
    assert str(scheduler.failure) == ("out of GPU memory preparing the decode steps of 2 sequences; lower "
                                      "--max-seqs or --context")


def test_steady_decoding_launches_each_step_before_reading_the_last(served, monkeypatch):
    session, scheduler = served
    if session.engine is None:
        pytest.skip("transformers steps one sequence at a time, each read before the next")
    launched = []
    real = scheduler.backend.decode_on_device
    monkeypatch.setattr(scheduler.backend, "decode_on_device",
                        lambda slots, tokens: launched.append(list(slots)) or real(slots, tokens))
    prompts = [_prompt(session, i) for i in (1, 2)]

    async def main():
        return await asyncio.gather(*[_collect(scheduler, Request(p, 20, temperature=0)) for p in prompts])

    results = asyncio.run(main())
    for prompt, (_, ids, done, _) in zip(prompts, results):
        assert ids == _alone(session, prompt, 20) and done == Done("length", len(prompt), 20)
    assert len(launched) >= 15 and [0, 1] in launched  # most steps ran ahead, both sequences together
    assert scheduler.stats().slots_used == 0


def test_a_prompt_scored_while_other_streams_decode_goes_in_prefill_chunks(served, monkeypatch):
    """A prompt that asks for its own scores (and any prompt on transformers) goes in standalone chunks of
    prefill_chunk while others decode; alone, in full chunks."""
    from heavylift.defaults import PREFILL_CHUNK_TOKENS

    session, scheduler = served
    monkeypatch.setattr(scheduler, "prefill_chunk", 4)
    chunks = []
    real = scheduler.backend.prefill
    monkeypatch.setattr(scheduler.backend, "prefill",
                        lambda slot, ids, scores, chunk: chunks.append(chunk) or real(slot, ids, scores, chunk))
    first, second = _prompt(session, 1), _prompt(session, 2)

    async def main():
        stream, ids_first, joined = scheduler.submit(Request(first, 40, temperature=0)), [], None
        async for event in stream:
            if isinstance(event, Delta):
                ids_first += [t.id for t in event.tokens]
                if joined is None:  # the first is decoding now: the second joins it
                    joined = asyncio.create_task(_collect(scheduler, Request(
                        second, 6, temperature=0, logprobs=0, echo_logprobs=True)))
        return ids_first, (await joined)[1]

    ids_first, ids_second = asyncio.run(main())
    assert chunks == [PREFILL_CHUNK_TOKENS, 4]
    assert ids_first == _alone(session, first, 40) and ids_second == _alone(session, second, 6)


def test_prompts_that_arrive_while_others_decode_ride_inside_their_steps(served, monkeypatch):
    """On the engine, prompts that join a decoding stream go in mixed steps: each step carries the decode
    rows and the next few prompt tokens (the engine's 4 rows at most here), the prompts' tokens in order and
    at their positions; every greedy output is what the sequence gives alone."""
    from heavylift.defaults import PREFILL_CHUNK_TOKENS

    session, scheduler = served
    if session.engine is None:
        pytest.skip("transformers runs no mixed steps")
    chunks, steps = [], []
    real_prefill, real_mixed = scheduler.backend.prefill, scheduler.backend.mixed
    monkeypatch.setattr(scheduler.backend, "prefill",
                        lambda slot, ids, scores, chunk: chunks.append(chunk) or real_prefill(slot, ids, scores, chunk))
    monkeypatch.setattr(scheduler.backend, "mixed", lambda rows: steps.append(list(rows)) or real_mixed(rows))
    first, second, third = _prompt(session, 1), _prompt(session, 2), _prompt(session, 5)

    async def main():
        stream, ids_first, joined = scheduler.submit(Request(first, 30, temperature=0)), [], None
        async for event in stream:
            if isinstance(event, Delta):
                ids_first += [t.id for t in event.tokens]
                if joined is None and len(ids_first) == 2:  # the first is decoding now: two more join it
                    joined = [asyncio.create_task(_collect(scheduler, Request(p, 8, temperature=0)))
                              for p in (second, third)]
        return ids_first, [(await j)[1] for j in joined]

    ids_first, (ids_second, ids_third) = asyncio.run(main())
    assert ids_first == _alone(session, first, 30)
    assert ids_second == _alone(session, second, 8) and ids_third == _alone(session, third, 8)
    assert chunks == [PREFILL_CHUNK_TOKENS]  # only the first prompt, alone, went in a standalone chunk
    assert steps and all(len(rows) <= SLOTS for rows in steps)
    decoded = [(position, token) for step in steps for s, position, token in step if s == 0]
    assert decoded and all(token == ids_first[position - len(first)] for position, token in decoded)
    for slot, prompt in ((1, second), (2, third)):
        rows = [(position, token) for step in steps for s, position, token in step if s == slot]
        assert rows[:len(prompt)] == list(enumerate(prompt))  # the prompt, in order, then its decode rows
        carried = [step for step in steps if (slot, 0, prompt[0]) in step]
        assert all(any(s == 0 for s, _, _ in step) for step in carried)  # inside the first stream's steps
    assert scheduler.stats().slots_used == 0


def test_prompts_that_arrive_together_go_in_full_chunks_before_any_stream_decodes(served, monkeypatch):
    """A burst on the engine: with no stream decoding yet, each prompt goes in a standalone full chunk, and
    the first decode step waits for all of them (no mixed step); every greedy output is its own alone."""
    from heavylift.defaults import PREFILL_CHUNK_TOKENS

    session, scheduler = served
    if session.engine is None:
        pytest.skip("transformers runs no mixed steps")
    chunks, steps, decoded = [], [], []
    real_prefill, real_mixed, real_decode = (scheduler.backend.prefill, scheduler.backend.mixed,
                                             scheduler.backend.decode)
    monkeypatch.setattr(scheduler.backend, "prefill",
                        lambda slot, ids, scores, chunk: chunks.append(chunk) or real_prefill(slot, ids, scores, chunk))
    monkeypatch.setattr(scheduler.backend, "mixed", lambda rows: steps.append(rows) or real_mixed(rows))
    monkeypatch.setattr(scheduler.backend, "decode",
                        lambda tokens: decoded.append(sorted(tokens)) or real_decode(tokens))
    prompts = [_prompt(session, i) for i in (1, 2, 5)]

    async def main():
        streams = [scheduler.submit(Request(p, 6, temperature=0)) for p in prompts]  # one tick: a burst
        out = []
        for stream in streams:
            ids = []
            async for event in stream:
                if isinstance(event, Delta):
                    ids += [t.id for t in event.tokens]
            out.append(ids)
        return out

    results = asyncio.run(main())
    assert results == [_alone(session, p, 6) for p in prompts]
    assert chunks == [PREFILL_CHUNK_TOKENS] * 3 and steps == []
    assert decoded[0] == [0, 1, 2]  # the first decode step, once every prompt is in, steps all three
