"""What each kind of kernel costs inside the captured batch-1 decode step: time the step with it left out.

A profiler's per-kernel times overlap under programmatic dependent launch (a kernel starts early and
waits), so they do not add up to the step. Here an 8B-shaped engine (random weights) replays its decode
graph as built, then rebuilt with one class of operation skipped (its outputs go stale: the figures are
times only), and the difference is what that class costs the step - the most that fusing it away can save.
Usage (GPU machine, after the kit prelude):
    python3 bench/step_ablation.py --out $OUT/step_ablation_h100_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

SKIPS = {
    "none": (),
    "rmsnorm": ("rmsnorm",),
    "rope_cache": ("rope_cache",),
    "attention": ("decode_attention",),
    "rmsnorm+rope+attention": ("rmsnorm", "rope_cache", "decode_attention"),
    "gemv": ("linear", "glu"),
}


def ops_without(names: tuple[str, ...]):
    from heavylift.engine.ops import TritonOps

    def skip(*args, **kwargs):
        return None

    return type("Ablated", (TritonOps,), {n: staticmethod(skip) for n in names})


def step_us(engine, steps: int) -> float:
    engine._graphs.clear()
    for lengths in engine.seq_len.values():
        lengths.fill_(32)  # the prompt's length: every timing decodes the same positions
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(3):
        engine.decode(token)
    graph = engine._graphs[1, False][0]  # (batch, mixed)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quant", default="nf4-dq")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import LlamaConfig

    from heavylift.runtime.benchmark import command_line
    from heavylift.model.catalog import find_model
    from heavylift.engine import Engine
    from heavylift.engine import weights as W

    config = LlamaConfig(**{k: v for k, v in find_model("llama3.1-8b").config_dict().items() if k != "_heavylift"})
    kind = {name: k for k, name in W.KIND_NAMES.items()}[args.quant]
    engine = Engine.from_random(config, kind, "cuda", batch=1, context=1024)
    engine.prefill(list(range(1, 33)), slot=0)
    base_ops = engine.ops
    rows = []
    for label, names in SKIPS.items():
        engine.ops = ops_without(names) if names else base_ops
        engine._static.clear()
        times = [step_us(engine, args.steps) for _ in range(args.repeats)]
        rows.append(dict(skipped=label, step_us=min(times), step_us_all=times))
        print(f"{label:28s} {min(times):8.1f} us/step", flush=True)
    full = rows[0]["step_us"]
    for r in rows:
        r["saved_us"] = full - r["step_us"]
    result = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(), command=command_line(),
                  quant=args.quant, weight_bytes=engine.weight_bytes, layers=len(engine.layers), rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
