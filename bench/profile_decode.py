"""Where one batch-1 decode step of the fast engine spends its time, kernel by kernel.

Builds an 8B-shaped engine from random weights per precision, replays its captured decode graph under
the torch profiler, and reports per kernel name: launches and GPU microseconds per step; per step: the
wall time, the GPU-busy time (the sum of kernel times) and the gap between them. Also times the 4-bit
GEMV alone at growing sizes, to separate a kernel's fixed cost (ramp-up, tail, launch) from its
streaming rate.
Usage (GPU machine, after the kit prelude):
    python3 bench/profile_decode.py --out $OUT/profile_decode_h100_<date>.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import time

import torch


def step_profile(engine, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    token = torch.zeros(1, dtype=torch.long, device="cuda")
    engine.prefill(list(range(1, 65)), slot=0)
    for _ in range(5):  # capture and warm the graph
        token = engine.decode(token).argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        token = engine.decode(token).argmax(-1)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t) / steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = engine.decode(token).argmax(-1)
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time
    rows = sorted(((name, n / steps, us / steps) for name, (n, us) in kernels.items()), key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    return dict(wall_us_per_step=wall_us, gpu_busy_us_per_step=busy, gap_us_per_step=wall_us - busy,
                launches_per_step=sum(r[1] for r in rows),
                kernels=[dict(name=n, launches=c, us=u) for n, c, u in rows])


def gemv_scaling(kind: int) -> list[dict]:
    """The engine's 1-row linear on 4096-wide weights of 1 to 16 x 14336 rows: time = fixed + bytes / rate."""
    from triton.testing import do_bench

    from heavylift.engine import weights as W
    from heavylift.engine.ops import TritonOps

    out = []
    for mult in (1, 2, 4, 8, 16):
        w = W.quantize(torch.randn(14336 * mult, 4096, device="cuda") * 0.02, kind)
        x = torch.randn(1, 4096, device="cuda").bfloat16()
        y = torch.empty(1, w.n, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(lambda: TritonOps.linear(x, [w], y), warmup=10, rep=50)
        out.append(dict(kind=W.KIND_NAMES[kind], rows=w.n, bytes=w.nbytes, us=ms * 1e3, gb_s=w.nbytes / ms / 1e6))
        del w
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quants", default="nf4-dq")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from transformers import LlamaConfig

    from heavylift.runtime.benchmark import command_line
    from heavylift.model.catalog import find_model
    from heavylift.engine import Engine
    from heavylift.engine import weights as W

    kinds = {"nf4-dq": W.NF4_DQ, "nf4": W.NF4, "fp8": W.FP8, "bf16": W.DENSE}
    result = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                  command=command_line(), steps={}, gemv_scaling={})
    config = LlamaConfig(**{k: v for k, v in find_model("llama3.1-8b").config_dict().items() if k != "_heavylift"})
    for quant in args.quants.split(","):
        engine = Engine.from_random(config, kinds[quant], "cuda", batch=1, context=1024)
        prof = step_profile(engine, args.steps)
        prof["weight_bytes"] = engine.weight_bytes
        result["steps"][quant] = prof
        print(quant, {k: v for k, v in prof.items() if k != "kernels"}, flush=True)
        for k in prof["kernels"][:14]:
            print(f"  {k['us']:8.1f} us  x{k['launches']:5.1f}  {k['name']}", flush=True)
        del engine
        torch.cuda.empty_cache()
        result["gemv_scaling"][quant] = gemv_scaling(kinds[quant])
        for r in result["gemv_scaling"][quant]:
            print("  scaling", r, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
