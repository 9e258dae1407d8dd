"""`heavylift bench`: load, prefill and decode speed of the fast engine, and of the reference stack.

Decode is timed as the seed article's `seed_baseline.py` times it (greedy, one token per step,
`torch.cuda.synchronize` around the loop, random prompt ids), so the two sets of figures compare.
The roofline is the batch-1 limit: measured copy bandwidth over the bytes a step reads (every
weight except the embedding table, of which a step reads one row).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .loader import expected_int8_casts

B1_PROMPT, B1_NEW = 32, 128  # batch-1 decode: prompt tokens, timed new tokens (as seed_baseline.py)
B16_PROMPT, B16_NEW = 128, 64  # batch-16 decode
PREFILL_TOKENS = 4096  # the prefill timing's prompt
BENCH_CONTEXT = PREFILL_TOKENS + B16_PROMPT + B16_NEW  # the context a benchmark load is planned for
BENCH_BATCH = 16


@dataclass(frozen=True)
class BenchRecord:
    model: str
    engine: str  # "heavylift" or "reference"
    quant: str
    batch: int
    gpus: int
    decode_tok_s: float
    roofline_tok_s: float
    prefill_tok_s: float | None
    load_s: float | None
    bytes_per_token: int

    @property
    def roofline_pct(self) -> float:
        return 100 * self.decode_tok_s / self.roofline_tok_s

    def to_json(self) -> dict:
        return {**asdict(self), "roofline_pct": round(self.roofline_pct, 1)}


def copy_bandwidth(device=None, gib: int = 2) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    x = torch.empty(gib * 1024 ** 3, dtype=torch.uint8, device=device or "cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del x, y
    torch.cuda.empty_cache()
    return 2 * 10 * gib * 1024 ** 3 / seconds


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 128000), (batch, length), generator=g)


def engine_decode_tok_s(engine, batch: int, prompt: int, new: int, seed: int = 1) -> float:
    """Greedy decode rate of `batch` sequences after a `prompt`-token prefill each."""
    ids = _prompts(batch, prompt, engine.shape.vocab, seed)
    logits = torch.cat([engine.prefill(ids[b].tolist(), slot=b) for b in range(batch)])
    token = logits.argmax(-1)
    token = engine.decode(token).argmax(-1)  # the first step captures the graphs
    _sync()
    t = time.perf_counter()
    for _ in range(new):
        token = engine.decode(token).argmax(-1)
    _sync()
    return batch * new / (time.perf_counter() - t)


def engine_prefill_tok_s(engine, tokens: int = PREFILL_TOKENS, seed: int = 2) -> float:
    ids = _prompts(1, tokens, engine.shape.vocab, seed)[0].tolist()
    engine.prefill(ids)  # warm-up at the timed length: cuDNN's attention builds a plan per new shape (~1 s)
    _sync()
    t = time.perf_counter()
    engine.prefill(ids)
    _sync()
    return tokens / (time.perf_counter() - t)


def reference_decode_tok_s(model, batch: int, prompt: int, new: int, seed: int = 1) -> float:
    """The reference stack: transformers' own `generate` on the same loaded model, timed as the seed does."""
    ids = _prompts(batch, prompt, model.config.vocab_size, seed).to(next(model.parameters()).device)

    def run(n):
        _sync()
        t = time.perf_counter()
        with expected_int8_casts():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t

    run(4)  # warm-up
    return batch * new / (run(new + 1) - run(1))


def timed_load(model: str, quant: str, gpus=None):
    """Plan `model` on this machine for the benchmark's context and batch and load its weights by that plan:
    (prepared.LoadedWeights, seconds, planning included)."""
    from heavylift.api import prepare

    _sync()
    t = time.perf_counter()
    loaded = prepare(model, quant, gpus, context=BENCH_CONTEXT, batch=BENCH_BATCH).load_weights()
    _sync()
    return loaded, time.perf_counter() - t


def engine_records(engine, model: str, quant: str, load_s: float, bandwidth: float) -> list[BenchRecord]:
    """The engine's prefill rate and its batch-1 and batch-16 decode rates."""
    per_token = engine.weight_bytes
    prefill = engine_prefill_tok_s(engine)
    gpus = len({layer.device for layer in engine.layers})
    return [BenchRecord(model, "heavylift", quant, batch, gpus, engine_decode_tok_s(engine, batch, prompt, new),
                        bandwidth / per_token, prefill, load_s, per_token)
            for batch, prompt, new in ((1, B1_PROMPT, B1_NEW), (BENCH_BATCH, B16_PROMPT, B16_NEW))]


def reference_records(hf_model, model: str, quant: str, load_s: float, bandwidth: float,
                      per_token: int) -> list[BenchRecord]:
    """transformers' generate on the same loaded weights, at batch 1 and 16."""
    gpus = len({p.device for p in hf_model.parameters()})
    return [BenchRecord(model, "reference", quant, batch, gpus, reference_decode_tok_s(hf_model, batch, prompt, new),
                        bandwidth / per_token, None, load_s, per_token)
            for batch, prompt, new in ((1, B1_PROMPT, B1_NEW), (BENCH_BATCH, B16_PROMPT, B16_NEW))]


def command_line() -> str:
    """This process's command as a user would retype it, heavylift's environment switches included
    (HEAVYLIFT_PDL=0 and the like change what a benchmark measures)."""
    import os
    import shlex
    import sys

    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("HEAVYLIFT_")]
    return shlex.join([*env, "python3", *sys.argv])
