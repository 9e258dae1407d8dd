"""Batched decode on one GPU: the fast engine at batch 1, 4, 16 and 64 per precision, each against its roofline.

In one call, per precision (NF4-DQ, NF4, FP8, BF16, then INT8 while time is left):
  1. an engine of the Llama-3.1-8B shape (32 layers; --model another catalog shape the engine runs, such as
     qwen3-8b with its per-head q and k norms) over random weights quantized on the GPU, as loading stores
     them (Engine.from_random);
  2. its first layer's linears (q/k/v as three parts, o and down with the residual, the gate/up GLU) through
     TritonOps at 1, 2, 4, 5, 16, 33 and 64 tokens against a float64 reference of the dequantized weights,
     NaN-poisoned outputs; the first call of each shape autotunes its kernel. The same layer requantized to
     FP4 (FP4-DQ) follows NF4 (NF4-DQ), whose kernels it shares;
  3. each linear timed alone inside a CUDA graph over 8 layers' weights in turn (more bytes than the L2
     holds), through the engine's path and through TorchOps (bitsandbytes dequantize + cuBLAS for 4-bit,
     what the engine ran above one token before batched.py; cuBLAS / torch._scaled_mm for bf16 / FP8);
  4. greedy decode tok/s at each batch (CUDA graphs, runtime.benchmark.engine_decode_tok_s) and its step
     roofline: max(bytes read / HBM bandwidth, FLOPs / dense bf16 peak) with the card's datasheet figures
     from the hardware catalog (H100 SXM 3.35 TB/s and 989 TFLOP/s, H200 4.8 TB/s), and the fraction reached;
     for NF4-DQ (--pdl-quants) the batches above 1 once more with every kernel launched with PDL, which the
     engine does for one-token steps only.
Then, if enough time is left, the reference stack (bench/decode_gpu.py's seed_baseline.py run; Llama-3.1-8B
only). The results are written after every case to OUT/decode_<card>_<date>.json (card, model, date, exact
command; decode_<model>_<card>_<date>.json for another --model), every record naming the model shape.

Usage (GPU machine):
    python3 bench/batched_gpu.py [--model llama3.1-8b | qwen3-8b] [--quick] [--quants nf4-dq,nf4,fp8,bf16,int8]
                                 [--batches 1,4,16,64]
                                 [--seed-modes bf16,nf4,fp8 | ''] [--pdl-quants nf4-dq] [--budget-s 500] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

T0 = time.time()
DEVICE = "cuda"
MODEL = "llama3.1-8b"  # the default --model, and the one shape the reference stack builds
CHECK_ROWS = (1, 2, 4, 5, 16, 33, 64)  # tokens per check: each BLOCK_M the batched kernel has, odd counts too
TIMING_LAYERS = 8  # a linear is timed over this many layers' weights in turn (8B o-proj, 4-bit: 64 MB > L2)
GRAPH_REPLAYS = {False: 10, True: 3}  # replays of a timed graph, without and with --quick
LINEAR_BOUND, GLU_BOUND = 1e-2, 2e-2  # relative error a check passes at (bf16 roundings; a wrong block is ~1)
# FP8 weights above 16 tokens take torch._scaled_mm with activations quantized to FP8 per row (3 mantissa bits:
# ~4% relative error per element, and so per output), as prefill does.
FP8_ACTIVATION_BOUND = 8e-2
QUANT_SECONDS = 100  # a precision's engine, compiles, checks and timings take about this: skipped past the budget
REFERENCE_SECONDS = 240  # the reference stack builds a 16 GB checkpoint first: run only with this much left


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def kind_of(quant: str) -> int:
    from heavylift.engine import weights as W

    return {"bf16": W.DENSE, "fp8": W.FP8, "int8": W.INT8, "nf4": W.NF4, "nf4-dq": W.NF4_DQ}[quant]


def card_name() -> tuple[str, str]:
    """(the driver's name, a short one for the file name: h100, h200, ...)."""
    from heavylift.hardware.gpus import lookup_gpu

    name = torch.cuda.get_device_name(0)
    card = lookup_gpu(name)
    short = card.key.split("-")[0].lower() if card else "".join(c for c in name.lower() if c.isalnum())
    return name, short


def peaks() -> dict:
    """The roofline's bandwidth and FLOP rate: the card's datasheet where the catalog knows it, else the
    measured copy bandwidth (and no FLOP limit); the measured copy bandwidth is recorded either way."""
    from heavylift.runtime.benchmark import card_peaks, copy_bandwidth

    copy = copy_bandwidth()
    sheet = card_peaks()
    if sheet is None:
        return dict(bandwidth_bytes_s=copy, flops_s=None, source="measured copy bandwidth", copy_bytes_s=copy)
    return dict(bandwidth_bytes_s=sheet[0], flops_s=sheet[1], source="datasheet (hardware catalog)",
                copy_bytes_s=copy)


def model_config(model: str = MODEL):
    """The catalog entry's config as transformers' config class of its family (LlamaConfig, Qwen3Config, ...);
    SystemExit naming why when the fast engine does not run the family."""
    from transformers import AutoConfig

    from heavylift.engine import model_reason
    from heavylift.errors import HeavyliftError
    from heavylift.model.catalog import require_model

    try:
        config = require_model(model).config_dict()
    except HeavyliftError as e:
        sys.exit(f"--model: {e}")
    reason = model_reason(config, "bf16")
    if reason is not None:
        sys.exit(f"--model {model}: {reason}; choose a model the engine runs, such as {MODEL} or qwen3-8b")
    return AutoConfig.for_model(**config)


# -- correctness ----------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def linear_cases(layer) -> dict:
    """name -> (input width, run(x, out, residual), float64 reference(x, residual), output width, bound)."""
    from heavylift.engine.ops import TritonOps, planes

    def proj(x, w):
        return x.double() @ w.dequantize(torch.float64).T

    def x16(x, w):  # one token: the fp16 planes the engine's producers write for the 4-bit GEMV
        return planes(x) if len(x) == 1 and TritonOps.wants_planes(w) else None

    qkv, o, gate, up, down = layer.qkv, layer.o, layer.gate, layer.up, layer.down
    return {
        "qkv": (qkv[0].k, lambda x, out, r: TritonOps.linear(x, qkv, out, x16=x16(x, qkv[0])),
                lambda x, r: torch.cat([proj(x, w) for w in qkv], -1), sum(w.n for w in qkv), LINEAR_BOUND),
        "o+res": (o.k, lambda x, out, r: TritonOps.linear(x, (o,), out, residual=r, x16=x16(x, o)),
                  lambda x, r: proj(x, o) + r.double(), o.n, LINEAR_BOUND),
        "glu": (gate.k, lambda x, out, r: TritonOps.glu(x, gate, up, out, x16=x16(x, gate)),
                lambda x, r: F.silu(proj(x, gate)) * proj(x, up), gate.n, GLU_BOUND),
        "down+res": (down.k, lambda x, out, r: TritonOps.linear(x, (down,), out, residual=r, x16=x16(x, down)),
                     lambda x, r: proj(x, down) + r.double(), down.n, LINEAR_BOUND),
    }


def check_layer(layer, label: str, rows_list=CHECK_ROWS) -> list[dict]:
    """Every linear of `layer` at every row count against float64, outputs poisoned with NaN."""
    from heavylift.engine import weights as W
    from heavylift.schemes import ENGINE_GEMV_MAX_ROWS

    out = []
    g = torch.Generator(device=DEVICE).manual_seed(3)
    for name, (k, run, ref, n, bound) in linear_cases(layer).items():
        for rows in rows_list:
            limit = FP8_ACTIVATION_BOUND if layer.o.kind == W.FP8 and rows > ENGINE_GEMV_MAX_ROWS else bound
            x = torch.randn(rows, k, device=DEVICE, generator=g).bfloat16()
            r = torch.randn(rows, n, device=DEVICE, generator=g).bfloat16()
            y = torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            run(x, y, r)
            err = rel_err(y, ref(x, r))
            written = bool(torch.isfinite(y).all())
            out.append(dict(layout=label, linear=name, rows=rows, rel_err=err, all_written=written,
                            ok=written and err < limit))
    bad = [c for c in out if not c["ok"]]
    log(label, "checks:", f"{len(out) - len(bad)}/{len(out)} ok", *(f"FAIL {c}" for c in bad[:5]))
    return out


def fp4_layer(engine, kind: int):
    """The engine's first layer requantized with bitsandbytes' FP4 table in `kind` storage, for its checks."""
    from types import SimpleNamespace

    from heavylift.engine import weights as W

    layer = engine.layers[0]
    def fp4(w):
        return W.quantize(w.dequantize(), kind, code="fp4")

    return SimpleNamespace(qkv=tuple(fp4(w) for w in layer.qkv), o=fp4(layer.o), gate=fp4(layer.gate),
                           up=fp4(layer.up), down=fp4(layer.down))


# -- per-linear timing ----------------------------------------------------------------------------------


def captured(fn) -> torch.cuda.CUDAGraph:
    """`fn` run once on a side stream (autotuned, its scratch allocated), then captured in a CUDA graph and
    replayed once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_us(fn, calls: int, replays: int) -> float:
    """Microseconds per call of `fn` (which makes `calls` calls), replayed in a CUDA graph: launch gaps and
    Python excluded, as in a decode step."""
    graph = captured(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return 1e3 * start.elapsed_time(end) / replays / calls


def time_linears(layers, quant: str, rows_list, replays: int, bandwidth: float) -> list[dict]:
    """Each linear through the engine's path and TorchOps at each row count, over `layers` in turn."""
    from heavylift.engine.ops import TorchOps, TritonOps

    paths = {"engine": TritonOps, "torch": TorchOps}
    shapes = {
        "qkv": lambda L: (L.qkv[0].k, sum(w.n for w in L.qkv), L.qkv, False),
        "o+res": lambda L: (L.o.k, L.o.n, (L.o,), True),
        "glu": lambda L: (L.gate.k, L.gate.n, (L.gate, L.up), False),
        "down+res": lambda L: (L.down.k, L.down.n, (L.down,), True),
    }
    out = []
    for name, shape in shapes.items():
        k, n, _, residual = shape(layers[0])
        weight_bytes = sum(w.nbytes for w in shape(layers[0])[2])
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEVICE).bfloat16()
            r = torch.randn(rows, n, device=DEVICE).bfloat16() if residual else None
            y = torch.empty(rows, n, device=DEVICE, dtype=torch.bfloat16)
            rec = dict(quant=quant, linear=name, rows=rows, weight_bytes=weight_bytes)
            for label, ops in paths.items():
                def fn(ops=ops):
                    for L in layers:
                        ws = shape(L)[2]
                        if name == "glu":
                            ops.glu(x, ws[0], ws[1], y)
                        else:
                            ops.linear(x, ws, y, residual=r)
                try:
                    us = graph_us(fn, len(layers), replays)
                    rec[f"{label}_us"] = us
                    rec[f"{label}_bandwidth_fraction"] = weight_bytes / (us * 1e-6) / bandwidth
                except Exception as e:  # noqa: BLE001 - one path failing must not lose the other's figure
                    rec[f"{label}_error"] = f"{type(e).__name__}: {e}"[:300]
            out.append(rec)
            log("linear", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}))
    return out


# -- decode ---------------------------------------------------------------------------------------------


def decode_records(engine, model: str, quant: str, batches, quick: bool, peak: dict, save, **extra) -> list[dict]:
    """Decode tok/s at each batch with its roofline; `extra` recorded with each (what differs from the
    default engine)."""
    from heavylift.runtime.benchmark import decode_lengths, engine_decode_tok_s, step_cost

    out = []
    for batch in batches:
        prompt, new = decode_lengths(batch)
        new = max(1, new // 4) if quick else new
        rate = engine_decode_tok_s(engine, batch, prompt, new)
        cost = step_cost(engine, batch, prompt + new / 2)
        roof = cost.roofline_tok_s(peak["bandwidth_bytes_s"], peak["flops_s"])
        bound = "bytes" if cost.bytes / peak["bandwidth_bytes_s"] >= cost.flops / (peak["flops_s"] or float("inf")) \
            else "flops"
        rec = dict(model=f"{model}-shape", engine="heavylift", quant=quant, batch=batch, prompt=prompt, new=new,
                   decode_tok_s=rate, roofline_tok_s=roof, roofline_fraction=rate / roof, bound_by=bound,
                   bytes_per_step=cost.bytes, weight_bytes=cost.weight_bytes, kv_bytes=cost.kv_bytes,
                   activation_bytes=cost.activation_bytes, flops_per_step=cost.flops, **extra)
        out.append(rec)
        log(quant, f"batch {batch}: {rate:.1f} tok/s, roofline {roof:.0f} ({100 * rate / roof:.1f}%)", extra or "")
        save(rec)
    return out


def tuned_configs() -> dict:
    """The tile the autotuner chose for every shape it met, per kernel."""
    from heavylift.engine import batched as B
    from heavylift.engine import kernels as K

    kernels = {"batched.linear": B.linear_kernel, "batched.glu": B.glu_kernel, "kernels.linear_gemm": K.linear_gemm,
               "kernels.glu_gemm": K.glu_gemm, "kernels.linear_gemv": K.linear_gemv, "kernels.glu_gemv": K.glu_gemv}
    return {name: {str(key): str(cfg) for key, cfg in getattr(k, "cache", {}).items()} for name, k in kernels.items()}


def free():
    gc.collect()
    torch.cuda.empty_cache()


# -- the run --------------------------------------------------------------------------------------------


def run_quant(quant: str, args, config, peak: dict, result: dict, save) -> None:
    from heavylift.engine import Engine
    from heavylift.runtime.benchmark import decode_lengths

    batches = args.batches
    context = max(sum(decode_lengths(b)) for b in batches) + 2
    t = time.time()
    engine = Engine.from_random(config, kind_of(quant), DEVICE, batch=max(batches), context=context)
    result["engines"][quant] = dict(build_s=time.time() - t, weight_bytes=engine.weight_bytes)
    log(quant, "engine built", result["engines"][quant])
    result["checks"] += check_layer(engine.layers[0], quant)
    save()
    if quant in ("nf4", "nf4-dq"):  # FP4 shares NF4's kernels; only its table differs
        result["checks"] += check_layer(fp4_layer(engine, kind_of(quant)), quant.replace("nf4", "fp4"))
        free()
        save()
    rows = [b for b in batches if b > 1]
    result["linears"] += time_linears(engine.layers[:TIMING_LAYERS], quant, rows[-2:] if args.quick else rows,
                                      GRAPH_REPLAYS[args.quick], peak["bandwidth_bytes_s"])
    result["tuned"] = tuned_configs()
    save()
    record = lambda rec: (result["records"].append(rec), save())  # noqa: E731
    decode_records(engine, args.model, quant, batches, args.quick, peak, record)
    if quant in args.pdl_quants:
        engine = pdl_ablation(engine, args.model, quant, [b for b in batches if b > 1], context, args.quick, peak,
                              record)
    del engine
    free()


def pdl_ablation(engine, model: str, quant: str, batches, context: int, quick: bool, peak: dict, record):
    """The steps of several tokens again with every kernel launched with PDL (ops.PDL_MAX_ROWS raised), on a
    fresh engine over the same weights (new graphs); the engine to free."""
    from heavylift.engine import ops

    engine = engine.with_cache(max(batches), context)
    ops.PDL_MAX_ROWS = max(batches)
    try:
        decode_records(engine, model, quant, batches, quick, peak, record, pdl_max_rows=ops.PDL_MAX_ROWS)
    finally:
        ops.PDL_MAX_ROWS = 1
    return engine


def reference(args, result: dict, save) -> None:
    """The reference stack's b1 / b16 figures (bench/decode_gpu.py), given our roofline of the same batch."""
    left = args.budget_s - (time.time() - T0)
    modes = [m for m in args.seed_modes.split(",") if m]
    if not modes:
        return
    if args.model != MODEL:
        result["reference"] = dict(skipped=f"the reference stack builds {MODEL}, not {args.model}")
        save()
        return
    if left < REFERENCE_SECONDS:
        result["reference"] = dict(skipped=f"{left:.0f} s left, the reference needs {REFERENCE_SECONDS}")
        save()
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_gpu import run_seed, seed_records

    try:
        seed = run_seed(modes, int(left - 30))
    except (OSError, ValueError) as e:
        result["reference"] = dict(error=f"{type(e).__name__}: {e}"[:400])
        save()
        return
    ours = {(r["quant"], r["batch"]): r for r in result["records"]}
    for rec in seed_records(seed):
        match = ours.get((rec["quant"], rec["batch"]))
        if match:
            rec.update(roofline_tok_s=match["roofline_tok_s"], roofline_fraction=rec["decode_tok_s"] /
                       match["roofline_tok_s"], bytes_per_step=match["bytes_per_step"])
        result["records"].append(rec)
    result["reference_raw"] = seed
    save()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help=f"a catalog shape the engine runs (default {MODEL}; qwen3-8b ...)")
    p.add_argument("--out", help="default: $OUT/decode_<card>_<date>.json (decode_<model>_<card>_<date>.json for "
                                 "another --model)")
    p.add_argument("--quants", default="nf4-dq,nf4,fp8,bf16,int8")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--quick", action="store_true", help="a quarter of the decode steps, fewer timings")
    p.add_argument("--seed-modes", default="bf16,nf4,fp8", help="the reference stack's modes; '' skips it")
    p.add_argument("--budget-s", type=float, default=500, help="stop starting precisions past this many seconds")
    p.add_argument("--pdl-quants", default="nf4-dq",
                   help="precisions whose steps of several tokens are timed again with PDL launches ('' none)")
    args = p.parse_args()
    args.quants = [q for q in args.quants.split(",") if q]
    args.pdl_quants = [q for q in args.pdl_quants.split(",") if q]
    args.batches = sorted(int(b) for b in args.batches.split(",") if b)
    return args


def main() -> None:
    args = parse_args()
    config = model_config(args.model)  # a model the engine cannot run is refused before CUDA starts
    import triton

    from heavylift.runtime.benchmark import command_line

    name, short = card_name()
    date = datetime.date.today().isoformat()
    stem = "decode" if args.model == MODEL else f"decode_{args.model}"
    path = args.out or os.path.join(os.environ.get("OUT", "."), f"{stem}_{short}_{date}.json")
    result = dict(card=name, model=args.model, date=date, command=command_line(), torch=torch.__version__,
                  triton=triton.__version__, peaks={}, engines={}, checks=[], linears=[], records=[], skipped={},
                  tuned={})

    def save(*_):
        result["elapsed_s"] = time.time() - T0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    result["peaks"] = peak = peaks()
    log("card", name, peak)
    save()
    for quant in args.quants:
        if time.time() - T0 + QUANT_SECONDS > args.budget_s:
            result["skipped"][quant] = f"time: {time.time() - T0:.0f} s of a {args.budget_s:.0f} s budget"
            log(quant, "skipped", result["skipped"][quant])
            save()
            continue
        try:
            run_quant(quant, args, config, peak, result, save)
        except Exception as e:  # noqa: BLE001 - one precision failing must not lose the others' figures
            import traceback

            traceback.print_exc()
            result["skipped"][quant] = f"error: {type(e).__name__}: {e}"[:800]
            free()
        save()
    reference(args, result, save)
    print(f"\nwritten {path}\nquant | batch | decode tok/s | roofline tok/s | % | bound by")
    for r in result["records"]:
        print(r["engine"], r["quant"], r["batch"], f"{r['decode_tok_s']:.1f}", f"{r.get('roofline_tok_s', 0):.0f}",
              f"{100 * r.get('roofline_fraction', 0):.1f}", r.get("bound_by", "-"), sep=" | ")
    bad = [c for c in result["checks"] if not c["ok"]]
    print(f"checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} ok", *bad[:10], sep="\n")
    for quant, why in result["skipped"].items():
        print(f"{quant} not run: {why}")


if __name__ == "__main__":
    main()
