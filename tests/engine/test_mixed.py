"""The engine's mixed steps on CPU: rows of (sequence, position, token), a prompt's chunk riding in a decode
step, against a float64 reference (the attention) and against each sequence decoded alone (a model)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from heavylift.engine import Engine
from heavylift.engine.ops import TorchOps, TritonOps, attention_scratch

from conftest import save_runnable_checkpoint

pytestmark = pytest.mark.interpreter  # the engine's kernels or its model on the CPU

OPS = [TorchOps, TritonOps]


def _reference(q, k, v, slots, lengths, window) -> torch.Tensor:
    """By hand: row i sees positions [lo, lengths[i]) of sequence slots[i]."""
    rows, heads, d = q.shape
    group = heads // k.shape[1]
    ref = torch.empty(rows, heads, d, dtype=torch.float64)
    for i in range(rows):
        hi = int(lengths[i])
        lo = max(0, hi - window) if window else 0
        for h in range(heads):
            kk, vv = k[int(slots[i]), h // group, lo:hi].double(), v[int(slots[i]), h // group, lo:hi].double()
            ref[i, h] = torch.softmax(kk @ q[i, h].double() / d ** 0.5, 0) @ vv
    return ref.view(rows, -1)


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("window", [0, 6])
def test_attention_with_a_row_to_sequence_map_matches_float64(ops, window):
    """Rows 1 to 4 are one sequence's chunk (positions 17 to 20), rows 0 and 5 decode tokens of others."""
    seqs, heads, kv_heads, d, s_max = 3, 8, 2, 32, 40
    torch.manual_seed(1)
    k, v = torch.randn(seqs, kv_heads, s_max, d).bfloat16(), torch.randn(seqs, kv_heads, s_max, d).bfloat16()
    slots = torch.tensor([2, 0, 0, 0, 0, 1], dtype=torch.long)
    lengths = torch.tensor([5, 18, 19, 20, 21, 39], dtype=torch.int32)
    q = torch.randn(len(slots), heads, d).bfloat16()
    out = torch.full((len(slots), heads * d), float("nan"), dtype=torch.bfloat16)
    got = ops.decode_attention(q, k, v, lengths, d ** -0.5, window, out,
                               attention_scratch(len(slots), heads, d, 4, "cpu"), slots=slots)
    ref = _reference(q, k, v, slots, lengths, window)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).norm() / ref.norm()).item() < 8e-3


def test_decode_is_the_mixed_attention_of_rows_that_are_their_sequences():
    """The decode form (row i is sequence i, length seq_len + 1) gives the mixed form's bits exactly."""
    b, heads, kv_heads, d, s_max = 3, 8, 2, 32, 40
    torch.manual_seed(2)
    k, v = torch.randn(b, kv_heads, s_max, d).bfloat16(), torch.randn(b, kv_heads, s_max, d).bfloat16()
    q = torch.randn(b, heads, d).bfloat16()
    seq_len = torch.tensor([4, 21, 38], dtype=torch.int32)
    scratch = attention_scratch(b, heads, d, 4, "cpu")
    decode = TritonOps.decode_attention(q, k, v, seq_len, d ** -0.5, 0, torch.empty(b, heads * d).bfloat16(),
                                        scratch).clone()
    mixed = TritonOps.decode_attention(q, k, v, seq_len + 1, d ** -0.5, 0, torch.empty(b, heads * d).bfloat16(),
                                       scratch, slots=torch.arange(b))
    assert torch.equal(decode, mixed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_runnable_checkpoint(tmp_path_factory.mktemp("mixed"), "llama")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": "cpu"}).eval()


def _alone(engine: Engine, prompt: list[int], n: int) -> list[int]:
    token = engine.prefill(prompt, slot=0).argmax(-1)
    out = []
    for _ in range(n):
        out.append(int(token))
        token = engine.decode(token.view(1)).argmax(-1)
    engine.free_slot(0)
    return out


def _step(engine: Engine, rows: list[tuple[int, int, int]], size: int) -> torch.Tensor:
    """A mixed step of (slot, position, token) rows padded to `size` as the server pads it."""
    pad = size - len(rows)
    rows = rows + [(rows[0][0], engine.context - 1, 0)] * pad
    slots, positions, tokens = (torch.tensor(c) for c in zip(*rows))
    lengths = positions.int() + 1
    lengths[len(rows) - pad:] = 1
    return engine.mixed(tokens, slots, positions.int(), lengths)


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_prompts_prefilled_inside_decode_steps_give_what_each_gives_alone(llama, ops):
    """Two sequences decode; a third's prompt goes in chunks of 5 inside their steps (rows padded to a
    bucket of 8), then all three decode in mixed steps: each sequence's greedy tokens are its own alone."""
    engine = Engine.from_model(llama, batch=8, context=64, ops=ops)
    engine.enable_ragged()
    prompts = [list(range(5, 17)), list(range(40, 49)), list(range(100, 113))]
    n = 6
    alone = [_alone(engine, p, n) for p in prompts]
    together: list[list[int]] = [[], [], []]
    for slot in (0, 1):
        together[slot].append(int(engine.prefill(prompts[slot], slot=slot).argmax(-1)))
    third = prompts[2]
    for start in range(0, len(third), 5):
        chunk = third[start:start + 5]
        rows = [(s, len(prompts[s]) + len(together[s]) - 1, together[s][-1]) for s in (0, 1)]
        rows += [(2, start + i, t) for i, t in enumerate(chunk)]
        logits = _step(engine, rows, 8)
        for s in (0, 1):
            together[s].append(int(logits[s].argmax()))
        if start + len(chunk) == len(third):
            together[2].append(int(logits[len(rows) - 1].argmax()))
    while min(len(t) for t in together) < n:
        live = [s for s in range(3) if len(together[s]) < n]
        rows = [(s, len(prompts[s]) + len(together[s]) - 1, together[s][-1]) for s in live]
        logits = _step(engine, rows, 4)
        for i, s in enumerate(live):
            together[s].append(int(logits[i].argmax()))
    assert [t[:n] for t in together] == alone
    # each length: the furthest row written (the padding rows, at the context's end, change none)
    assert engine.lengths()[:3] == [len(p) + len(t) - 1 for p, t in zip(prompts, together)]
