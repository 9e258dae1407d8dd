"""Decode speed of the fast engine beside the reference stack, in one GPU call.

Runs, in order: `seed_baseline.py` (the reference stack: transformers + bitsandbytes / torchao,
plain `generate`) as a subprocess on its 8B-shaped random checkpoint; the engine's kernels against
a float64 reference; heavylift on the same checkpoint per precision (plan, load, greedy agreement
with transformers' `generate` on the same weights, batch-1 and batch-16 decode, 4k prefill); and a
Llama-3.1-70B shape in NF4-DQ built layer by layer from random weights.
Usage (GPU machine, after the kit prelude):
    python3 bench/decode_gpu.py --out $OUT/decode_h100_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

SEED_CKPT = "/tmp/llama8b"  # where seed_baseline.py builds its checkpoint
SEED_MODES = {"bf16": "bf16", "nf4": "nf4-dq", "fp8": "fp8"}  # seed mode -> heavylift precision
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def run_seed(modes: list[str], budget_s: int) -> dict:
    out = tempfile.mkdtemp()
    env = dict(os.environ, OUT=out, BUDGET_S=str(budget_s))
    seed = os.path.join(os.path.dirname(__file__), "..", ".gpu", "seed_baseline.py")
    subprocess.run([sys.executable, seed, *modes], env=env, check=False)
    with open(os.path.join(out, "baseline.json")) as f:
        return json.load(f)


def seed_records(seed: dict) -> list[dict]:
    out = []
    for mode, quant in SEED_MODES.items():
        r = seed.get(mode)
        if not r or "error" in r:
            continue
        common = dict(model="llama3.1-8b-shape", engine="reference", quant=quant, gpus=1,
                      roofline_tok_s=r["roofline_tok_s_b1"], bytes_per_token=r["bytes_read_per_token"],
                      load_s=r["load_s"], prefill_tok_s=4096 / r["prefill4k_s"] if "prefill4k_s" in r else None)
        out.append(dict(common, batch=1, decode_tok_s=r["decode_tok_s_b1"]))
        if "decode_tok_s_b16" in r:
            out.append(dict(common, batch=16, decode_tok_s=r["decode_tok_s_b16"]))
    return out


def check_kernels() -> list[dict]:
    """Every weight layout, one and sixteen rows, fresh random inputs, poisoned outputs, float64 reference."""
    from dataclasses import replace

    import torch.nn.functional as F

    from heavylift.engine import weights as W
    from heavylift.engine.ops import TritonOps, planes

    out = []
    for kind in (W.DENSE, W.FP8, W.NF4, W.NF4_DQ):
        for rows in (1, 16):
            for n, k in ((6144, 4096), (4096, 14336)):
                w = W.quantize(torch.randn(n, k, device="cuda") * 0.02, kind)
                x = torch.randn(rows, k, device="cuda").bfloat16()
                y = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                TritonOps.linear(x, [w], y)
                ref = x.double() @ w.dequantize(torch.float64).T
                err = ((y.double() - ref).norm() / ref.norm()).item()
                out.append(dict(kind=W.KIND_NAMES[kind], rows=rows, n=n, k=k, rel_err=err,
                                all_written=bool(torch.isfinite(y).all())))
    for kind in (W.NF4, W.NF4_DQ):  # one token through gemv4: x's planes in, three parts + bias + residual,
        for k in (4096, 3584):      # a K that ends mid-step, and the GLU writing its own planes
            parts = [replace(W.quantize(torch.randn(n, k, device="cuda") * 0.02, kind),
                             bias=torch.randn(n, device="cuda").bfloat16()) for n in (4096, 1024, 1024)]
            x = torch.randn(1, k, device="cuda").bfloat16()
            res = torch.randn(1, 6144, device="cuda").bfloat16()
            y = torch.full((1, 6144), float("nan"), device="cuda", dtype=torch.bfloat16)
            TritonOps.linear(x, parts, y, residual=res, x16=planes(x))
            ref = torch.cat([x.double() @ p.dequantize(torch.float64).T + p.bias.double() for p in parts], -1)
            ref += res.double()
            gate, up = (W.quantize(torch.randn(14336, k, device="cuda") * 0.02, kind) for _ in range(2))
            act = torch.full((1, 14336), float("nan"), device="cuda", dtype=torch.bfloat16)
            act16 = torch.full((7168,), -1, device="cuda", dtype=torch.int32)
            TritonOps.glu(x, gate, up, act, x16=planes(x), out16=act16)
            g, u = (x.double() @ w.dequantize(torch.float64).T for w in (gate, up))
            out.append(dict(kind=W.KIND_NAMES[kind], rows=1, k=k, path="gemv4 planes, qkv + bias + residual; glu",
                            rel_err=((y.double() - ref).norm() / ref.norm()).item(),
                            glu_rel_err=((act.double() - F.silu(g) * u).norm() / (F.silu(g) * u).norm()).item(),
                            all_written=bool(torch.isfinite(y).all() and torch.isfinite(act).all()),
                            glu_planes_exact=bool(torch.equal(act16, planes(act)))))
    return out


def agreement(model, engine, vocab: int, tokens: int = 32) -> dict:
    """Greedy continuation of the engine against transformers' generate on the same weights."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, min(vocab, 128000), (1, 32), generator=g)
    dev = next(model.parameters()).device
    ref = model.generate(ids.to(dev), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=0)[0, 32:].tolist()
    with torch.no_grad():
        ref_logits = model(ids.to(dev)).logits[0, -1].float()
    logits = engine.prefill(ids[0].tolist(), slot=0)
    first_diff = (logits[0] - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    got, token = [], logits.argmax(-1)
    for _ in range(tokens):
        got.append(int(token))
        token = engine.decode(token).argmax(-1)
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), tokens)
    return dict(tokens=tokens, matching_prefix=same, prefill_logits_rel_diff=first_diff)


def heavylift_records(quant: str, bw: float) -> tuple[list[dict], dict]:
    from heavylift.runtime.benchmark import engine_records, timed_load
    from heavylift.engine import Engine

    loaded, load_s = timed_load(SEED_CKPT, quant)
    engine = Engine.from_model(loaded.model, batch=16, context=loaded.plan.context)
    extra = dict(load_s=load_s, agreement=agreement(loaded.model, engine, engine.shape.vocab))
    log(quant, "loaded", extra)
    recs = [dict(r.to_json(), model="llama3.1-8b-shape") for r in engine_records(engine, SEED_CKPT, quant, load_s, bw)]
    extra["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del engine, loaded
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return recs, extra


def big_record(bw: float, layers: int) -> dict:
    """A Llama-3.1-70B shape in NF4-DQ, quantized layer by layer from random weights on the GPU."""
    from transformers import LlamaConfig

    from heavylift.runtime.benchmark import B1_NEW, B1_PROMPT, engine_decode_tok_s
    from heavylift.model.catalog import find_model
    from heavylift.engine import Engine
    from heavylift.engine.weights import NF4_DQ

    config = LlamaConfig(**{k: v for k, v in find_model("llama3.1-70b").config_dict().items() if k != "_heavylift"})
    config.num_hidden_layers = layers
    t = time.perf_counter()
    engine = Engine.from_random(config, NF4_DQ, "cuda", batch=1, context=1024)
    built = time.perf_counter() - t
    per_token = engine.weight_bytes
    rate = engine_decode_tok_s(engine, 1, B1_PROMPT, B1_NEW)
    rec = dict(model=f"llama3.1-70b-shape-{layers}l", engine="heavylift", quant="nf4-dq", gpus=1, batch=1,
               decode_tok_s=rate, roofline_tok_s=bw / per_token, bytes_per_token=per_token, load_s=built,
               prefill_tok_s=None)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quants", default="nf4-dq,fp8,bf16")
    parser.add_argument("--seed-modes", default="bf16,nf4,fp8", help="'' skips the reference stack")
    parser.add_argument("--seed-budget-s", type=int, default=200)
    parser.add_argument("--big-layers", type=int, default=80, help="0 skips the 70B shape")
    args = parser.parse_args()
    from heavylift.runtime.benchmark import command_line, copy_bandwidth

    result = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
                  command=command_line(), records=[], checks={})

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    modes = [m for m in args.seed_modes.split(",") if m]
    if modes:
        seed = run_seed(modes, args.seed_budget_s)
        result["reference_raw"] = seed
        result["records"] += seed_records(seed)
        save()
    else:  # the reference stack builds SEED_CKPT; without it, the same shape from run_gpu
        from run_gpu import make_checkpoint

        make_checkpoint(SEED_CKPT)
    bw = copy_bandwidth()
    result["copy_bytes_s"] = bw
    result["checks"]["kernels"] = check_kernels()
    log("kernels", json.dumps(result["checks"]["kernels"]))
    save()
    for quant in args.quants.split(","):
        try:
            recs, extra = heavylift_records(quant, bw)
            result["records"] += recs
            result["checks"][quant] = extra
        except Exception as e:  # noqa: BLE001 - one precision failing must not lose the others' figures
            import traceback

            traceback.print_exc()
            result["checks"][quant] = {"error": f"{type(e).__name__}: {e}"[:800]}
            gc.collect()
            torch.cuda.empty_cache()
        save()
    if args.big_layers:
        try:
            result["records"].append(big_record(bw, args.big_layers))
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            result["checks"]["big"] = {"error": f"{type(e).__name__}: {e}"[:800]}
        save()
    print("\nmodel | engine | quant | batch | decode tok/s | % roofline | prefill tok/s")
    for r in result["records"]:
        pct = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
        print(r["model"], "|", r["engine"], "|", r["quant"], "|", r["batch"], "|", f"{r['decode_tok_s']:.1f}", "|",
              f"{pct:.1f}", "|", f"{r['prefill_tok_s']:.0f}" if r.get("prefill_tok_s") else "-")


if __name__ == "__main__":
    main()
