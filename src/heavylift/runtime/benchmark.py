"""`heavylift bench`: load, prefill and decode speed of the fast engine, and of the reference stack.

Decode is timed as the seed article's `seed_baseline.py` times it (greedy, one token per step,
`torch.cuda.synchronize` around the loop, random prompt ids), so the two sets of figures compare,
at batch 1, 4, 16 and 64. A step's roofline is the longer of its two limits (`StepCost`): the bytes it
reads (every weight except the embedding table, of which a step reads one row per sequence; the KV
cache up to each sequence's length; each linear's input and output) over the memory bandwidth, and
its FLOPs over the GPU's dense bf16 peak, where the hardware catalog knows the card.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .loader import expected_int8_casts

B1_PROMPT, B1_NEW = 32, 128  # batch-1 decode: prompt tokens, timed new tokens (as seed_baseline.py)
B16_PROMPT, B16_NEW = 128, 64  # decode of more sequences (batch 16 in seed_baseline.py): each one's prompt, new tokens
PREFILL_TOKENS = 4096  # the prefill timing's prompt
BENCH_CONTEXT = PREFILL_TOKENS + B16_PROMPT + B16_NEW  # the context a benchmark load is planned for
BENCH_BATCH = 16
DECODE_BATCHES = (1, 4, 16, 64)  # the batch sizes a benchmark decodes at
BF16_BYTES = 2  # the cache, activations and logits are bf16


def decode_lengths(batch: int) -> tuple[int, int]:
    """(prompt tokens per sequence, timed new tokens) of the decode timing at `batch`."""
    return (B1_PROMPT, B1_NEW) if batch == 1 else (B16_PROMPT, B16_NEW)


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
    bytes_per_token: int  # the weights a step reads
    bytes_per_step: int | None = None  # the roofline's bytes: weights, KV cache, activations (StepCost)
    flops_per_step: int | None = None

    @property
    def roofline_pct(self) -> float:
        return 100 * self.decode_tok_s / self.roofline_tok_s

    def to_json(self) -> dict:
        """The record as `heavylift bench --json` prints it: its fields and the roofline's percentage."""
        return {**asdict(self), "roofline_pct": round(self.roofline_pct, 1)}


@dataclass(frozen=True)
class StepCost:
    """What one decode step of `batch` sequences reads from memory and computes: the roofline's two terms."""

    batch: int
    weight_bytes: int  # every weight once, whatever the batch (the embedding table excepted)
    kv_bytes: int  # keys and values of every sequence up to its length, every layer
    activation_bytes: int  # each linear's input and output rows, the logits
    flops: int  # 2 per weight per sequence, and the attention's two products

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    def roofline_tok_s(self, bandwidth: float, flops_s: float | None) -> float:
        """Tokens per second at the longer of the two limits (the FLOP limit only where the peak is known)."""
        seconds = max(self.bytes / bandwidth, self.flops / flops_s if flops_s else 0.0)
        return self.batch / seconds


def step_cost(engine, batch: int, length: float) -> StepCost:
    """A decode step of `batch` sequences of `length` cached tokens each (a sliding window caps what a layer
    reads), on `engine`'s weights and shape."""
    s = engine.shape
    per_position = 2 * s.kv_heads * s.head_dim  # a key and a value per kv head
    attended = sum(min(length, layer.window or length) for layer in engine.layers)
    linears = [w for layer in engine.layers for w in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)]
    rows = sum(w.k + w.n for w in linears) + engine.lm_head.k + engine.lm_head.n
    weights = sum(w.n * w.k for w in linears) + engine.lm_head.n * engine.lm_head.k
    return StepCost(batch, engine.weight_bytes, int(BF16_BYTES * batch * per_position * attended),
                    BF16_BYTES * batch * rows,
                    int(2 * batch * weights + 4 * batch * s.heads * s.head_dim * attended))


def card_peaks(device=None) -> tuple[float, float | None] | None:
    """The datasheet memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s, None where unpublished) of this
    CUDA device, from the hardware catalog; None for a card it does not know."""
    from heavylift.hardware.gpus import lookup_gpu

    card = lookup_gpu(torch.cuda.get_device_name(device))
    if card is None:
        return None
    return card.bandwidth_bytes_s, card.bf16_tflops * 1e12 if card.bf16_tflops else None


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


def sweep_engine(engine, batches=DECODE_BATCHES):
    """An engine that decodes every batch in `batches`: `engine` where its batch suffices, else one over the
    same weights with a cache just long enough for the timings (Engine.with_cache releases engine's first)."""
    longest = max(sum(decode_lengths(b)) for b in batches) + 1
    return engine if max(batches) <= engine.batch else engine.with_cache(max(batches), longest)


def engine_records(engine, model: str, quant: str, load_s: float, bandwidth: float, flops_s: float | None = None,
                   batches=DECODE_BATCHES) -> list[BenchRecord]:
    """The engine's prefill rate, then its decode rate at each of `batches` with the step's roofline (the
    engine may be replaced by one with a larger cache for the sweep: sweep_engine)."""
    per_token = engine.weight_bytes
    prefill = engine_prefill_tok_s(engine)
    gpus = len({layer.device for layer in engine.layers})
    engine = sweep_engine(engine, batches)
    records = []
    for batch in batches:
        prompt, new = decode_lengths(batch)
        cost = step_cost(engine, batch, prompt + new / 2)
        records.append(BenchRecord(model, "heavylift", quant, batch, gpus,
                                   engine_decode_tok_s(engine, batch, prompt, new),
                                   cost.roofline_tok_s(bandwidth, flops_s), prefill, load_s, per_token, cost.bytes,
                                   cost.flops))
    return records


def reference_records(hf_model, model: str, quant: str, load_s: float,
                      engine: list[BenchRecord]) -> list[BenchRecord]:
    """transformers' generate on the same loaded weights, at batch 1 and 16, beside the engine's records of
    the same batch (their roofline)."""
    gpus = len({p.device for p in hf_model.parameters()})
    ours = {r.batch: r for r in engine}
    return [BenchRecord(model, "reference", quant, batch, gpus,
                        reference_decode_tok_s(hf_model, batch, *decode_lengths(batch)), ours[batch].roofline_tok_s,
                        None, load_s, ours[batch].bytes_per_token, ours[batch].bytes_per_step,
                        ours[batch].flops_per_step)
            for batch in (1, BENCH_BATCH) if batch in ours]


def command_line() -> str:
    """This process's command as a user would retype it, heavylift's environment switches included
    (HEAVYLIFT_PDL=0 and the like change what a benchmark measures)."""
    import os
    import shlex
    import sys

    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("HEAVYLIFT_")]
    return shlex.join([*env, "python3", *sys.argv])
