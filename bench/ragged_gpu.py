"""A ragged batch on one GPU: 16 sequences of lengths spread over 128 to 8,192 tokens decoding together in
the engine's slots (as `heavylift serve` drives it) give each sequence the greedy tokens it gets alone, at
a throughput compared with a uniform batch of 16 at the ragged batch's mean length.

8B-shaped random weights in bf16 (Engine.from_random), one engine for both: the alone runs use the same
slots one at a time. Usage (GPU machine, after the kit prelude):
    python bench/ragged_gpu.py --out $OUT/ragged_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
             rms_norm_eps=1e-5)


def greedy_together(engine, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], float]:
    """Prefill each prompt into its slot, then `steps` decode steps of all of them: tokens, decode tok/s."""
    batch = len(prompts)
    first = torch.cat([engine.prefill(p, slot=i) for i, p in enumerate(prompts)]).argmax(-1)
    active = torch.ones(batch, dtype=torch.bool)
    token, out = first, [[int(t)] for t in first]
    token = engine.decode(token, active).argmax(-1)  # captures the graphs on a first use
    for i, t in enumerate(token.tolist()):
        out[i].append(t)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - 2):
        token = engine.decode(token, active).argmax(-1)
        for i, t in enumerate(token.tolist()):
            out[i].append(t)
    torch.cuda.synchronize()
    return out, batch * (steps - 2) / (time.perf_counter() - start)


def greedy_alone(engine, prompt: list[int], steps: int, rows: int) -> list[int]:
    """One sequence in slot 0, alone in a step of `rows` rows (1: the one-row kernels; 16: the same
    kernels as the batch, every other row inactive)."""
    token = engine.prefill(prompt, slot=0).argmax(-1)
    out = [int(token)]
    feed, active = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.bool)
    active[0] = True
    for _ in range(steps - 1):
        feed[0] = token.view(-1)[0]
        token = engine.decode(feed, active)[:1].argmax(-1)
        out.append(int(token))
    return out


def main() -> None:
    from transformers import LlamaConfig

    from heavylift.engine.model import Engine
    from heavylift.engine.weights import DENSE

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lengths = [int(128 * (8192 / 128) ** (i / 15)) for i in range(16)]  # 128 ... 8192, spread geometrically
    context = max(lengths) + args.steps + 1
    engine = Engine.from_random(LlamaConfig(**SHAPE), DENSE, "cuda", batch=16, context=context)
    engine.enable_ragged()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    together, ragged_tok_s = greedy_together(engine, prompts, args.steps)
    alone = {}
    for rows in (16, 1):
        alone[rows] = []
        for p in prompts:
            engine.free_slot(0)
            alone[rows].append(greedy_alone(engine, p, args.steps, rows))
    mean = sum(lengths) // len(lengths)
    uniform = [torch.randint(4, SHAPE["vocab_size"], (mean,), generator=g).tolist() for _ in lengths]
    _, uniform_tok_s = greedy_together(engine, uniform, args.steps)

    def compare(reference):
        return dict(same=sum(a == b for a, b in zip(together, reference)),
                    first_difference=[next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                      for a, b in zip(together, reference)])
    record = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                  command="python bench/ragged_gpu.py " + " ".join(sys.argv[1:]), precision="bf16",
                  lengths=lengths, steps=args.steps, sequences=len(lengths),
                  alone_in_a_16_row_step=compare(alone[16]), alone_in_a_1_row_step=compare(alone[1]),
                  ragged_decode_tok_s=round(ragged_tok_s, 1),
                  uniform_length=mean, uniform_decode_tok_s=round(uniform_tok_s, 1),
                  ragged_over_uniform=round(ragged_tok_s / uniform_tok_s, 3))
    print(json.dumps(record))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
