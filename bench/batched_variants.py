"""The batched 4-bit linears' variants on one GPU: each variant and tile timed on the Llama-3.1-8B layer shapes,
checked against float64, then greedy decode through the engine with each variant.

Variants (engine/batched.py VARIANTS): "scaled" (the Triton kernel scaling every weight by its block's absmax in
bf16), "post" (the Triton kernel with the absmax applied to each 64-weight block's float32 partial) and "wgmma"
(engine/wgmma4.py, the Gluon kernels that keep the weight operand in registers), each at two tiles; beside them
"torch" (bitsandbytes dequantize + cuBLAS through TorchOps), what steps above 64 tokens take. In one call:
  1. every kernel the call will run is compiled first by --workers processes at once (Triton's disk cache then
     serves this process), so the compile time does not eat the budget one kernel at a time;
  2. per storage (--kinds) and linear (qkv as three parts, o and down with the residual, the gate/up GLU) and
     token count (--rows): over enough copies of the weights to overflow the L2, each candidate once against a
     float64 reference of the dequantized weights (relative error of the output, NaN-poisoned), then timed
     inside a CUDA graph (median of --replays replays); µs per call and the weight bytes' TB/s;
  3. while the budget lasts, greedy decode tok/s of an 8B-shaped engine (Engine.from_random) at
     --decode-batches for each of --decode-variants in turn (the engine's own tiles: TILES for wgmma, the
     autotuner over the two Triton tiles above for the others), with the step's roofline as
     bench/batched_gpu.py computes it.
The JSON (card, date, exact command, versions, records) is rewritten after every record to --out.

--cpu-check runs the same candidates through Triton's interpreter at tiny shapes (errors only, no timing) and
compiles the Gluon kernels for sm_90 without a GPU (Gluon has no interpreter), to prove the script runs.

Usage (GPU machine, ~150 s on an H100):
    python3 bench/batched_variants.py --budget-s 200 --out OUT/batched_variants.json
    python3 bench/batched_variants.py --cpu-check --out /tmp/batched_variants_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

CPU_CHECK = "--cpu-check" in sys.argv
if CPU_CHECK:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

T0 = time.time()
DEVICE = "cpu" if CPU_CHECK else "cuda"
# name -> (K, part widths, "linear" / "residual" / "glu"): Llama-3.1-8B's layer, and a tiny one for --cpu-check
SHAPES = {"qkv": (4096, (4096, 1024, 1024), "linear"), "o+res": (4096, (4096,), "residual"),
          "gate_up": (4096, (14336, 14336), "glu"), "down+res": (14336, (4096,), "residual")}
TINY = {"qkv": (256, (96, 32, 32), "linear"), "o+res": (256, (128,), "residual"),
        "gate_up": (256, (128, 128), "glu"), "down+res": (512, (128,), "residual")}
LINEAR_BOUND, GLU_BOUND = 1e-2, 2e-2  # bench/batched_gpu.py's: bf16 roundings pass, a wrong block is ~1
# Triton tiles: the autotuner's picks for NF4 / NF4-DQ on an H100 (decode_h100_2026-12-06.json, "tuned")
TRITON_TILES = {"n128-swap-w8": dict(BLOCK_N=128, BLOCK_K=128, SWAP=True, num_warps=8, num_stages=3),
                "n64-w4": dict(BLOCK_N=64, BLOCK_K=128, SWAP=False, num_warps=4, num_stages=4)}
# wgmma4 tiles (POST, BN, warps, STAGES) beside its defaults (wgmma4.TILES / GLU_TILES) per x tile height: the
# packed words through a cp.async ring STAGES - 1 steps ahead instead of one step ahead in registers
WGMMA_ALT = {16: (True, 128, 4, 4), 32: (True, 128, 8, 3), 64: (False, 128, 8, 2)}
WGMMA_GLU_ALT = {16: (True, 64, 4, 4), 32: (True, 128, 8, 3), 64: (False, 128, 8, 2)}
DECODE_SECONDS = 40  # an engine build, its first compiles and one variant's decode at three batches


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def kind_of(name: str) -> int:
    from heavylift.engine import weights as W

    return {"nf4": W.NF4, "nf4-dq": W.NF4_DQ}[name]


def candidates(bm: int, glu: bool) -> list[tuple[str, str, object]]:
    """(variant, tile label, tile) for steps of x tile height bm: tile None is the engine's own choice."""
    from heavylift.engine import wgmma4

    out = [(v, label, tile) for v in ("scaled", "post") for label, tile in TRITON_TILES.items()]
    default = (wgmma4.GLU_TILES if glu else wgmma4.TILES)[bm]
    alt = (WGMMA_GLU_ALT if glu else WGMMA_ALT)[bm]
    if not CPU_CHECK:  # Gluon has no interpreter: --cpu-check compiles these instead (gluon_compiles)
        out += [("wgmma", "default " + wgmma_label(default), None), ("wgmma", wgmma_label(alt), alt)]
    return out


def wgmma_label(tile) -> str:
    post, bn, warps, stages = tile
    return f"{'post' if post else 'scaled'}/n{bn}/w{warps}/" + (f"ring{stages}" if stages else "regs")


# -- weights, launches, references --------------------------------------------------------------------


def weights(kind: int, shape, copies: int, seed: int):
    """`copies` sets of the linear's parts (random, std 0.02, quantized as loading stores them); o and down
    get no bias, q/k/v none either (Llama)."""
    from heavylift.engine import weights as W

    k, widths, _ = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [[W.quantize(torch.randn(n, k, generator=g, device=DEVICE, dtype=torch.bfloat16) * 0.02, kind)
             for n in widths] for _ in range(copies)]


def launch(variant: str, tile, parts, x, out, res, form: str):
    """One call through the engine's batched path with this variant and tile (or TorchOps for "torch")."""
    from heavylift.engine import ops

    if variant == "torch":
        if form == "glu":
            return ops.TorchOps.glu(x, parts[0], parts[1], out)
        return ops.TorchOps.linear(x, parts, out, residual=res)
    if form == "glu":
        return ops._batched_glu(x, parts[0], parts[1], out, variant=variant, config=tile)
    return ops._batched_linear(x, parts, out, res, variant=variant, config=tile)


def reference(parts, x, res, form: str) -> torch.Tensor:
    proj = [x.double() @ w.dequantize(torch.float64).T for w in parts]
    if form == "glu":
        return F.silu(proj[0]) * proj[1]
    y = torch.cat(proj, -1)
    return y + res.double() if res is not None else y


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative error of the output (norm) and the largest element error over the largest reference element."""
    d = y.double() - ref
    return dict(rel_err=(d.norm() / ref.norm()).item(), max_rel_err=(d.abs().max() / ref.abs().max()).item(),
                all_written=bool(torch.isfinite(y).all()))


def inputs(shape, rows: int, seed: int):
    k, widths, form = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device=DEVICE).bfloat16()
    n = widths[0] if form == "glu" else sum(widths)
    res = torch.randn(rows, n, generator=g, device=DEVICE).bfloat16() if form == "residual" else None
    return x, res, n


def block_m(rows: int) -> int:
    from heavylift.engine import batched as B

    return B.block_m(rows)


# -- compile ahead, in parallel ---------------------------------------------------------------------


def compile_unit(unit) -> tuple[str, float, str]:
    """Run one (kind, linear, rows, variant, tile) once on the GPU in this worker process, which compiles its
    kernel into Triton's disk cache. Returns (label, seconds, error or "")."""
    kind, name, rows, variant, label, tile = unit
    t = time.time()
    try:
        shape = SHAPES[name]
        parts = weights(kind_of(kind), shape, 1, seed=0)[0]
        x, res, n = inputs(shape, rows, seed=1)
        out = torch.empty(rows, n, device=DEVICE, dtype=torch.bfloat16)
        launch(variant, tile, parts, x, out, res, shape[2])
        torch.cuda.synchronize()
        err = ""
    except Exception as e:  # noqa: BLE001 - reported, and the main process meets the same error again
        err = f"{type(e).__name__}: {e}"[:300]
    return f"{kind} {name} m{rows} {variant} {label}", time.time() - t, err


def precompile(kinds, rows_list, workers: int) -> list[dict]:
    """Every kernel the timing will launch, compiled by `workers` processes (one unit per x tile height)."""
    units = []
    for kind in kinds:
        for name, shape in SHAPES.items():
            for bm in sorted({block_m(r) for r in rows_list}):
                rows = max(r for r in rows_list if block_m(r) == bm)
                for variant, label, tile in candidates(bm, shape[2] == "glu"):
                    units.append((kind, name, rows, variant, label, tile))
    log(f"compiling {len(units)} kernels in {workers} processes")
    done = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for label, seconds, err in pool.map(compile_unit, units):
            done.append(dict(unit=label, seconds=round(seconds, 2), error=err))
            if err:
                log("compile FAILED", label, err)
    log(f"compiled: {sum(1 for d in done if not d['error'])}/{len(done)}")
    return done


# -- timing ---------------------------------------------------------------------------------------------


def graph_us(fn, calls: int, replays: int) -> float:
    """Median µs per call of `fn` (`calls` calls) over `replays` replays of its CUDA graph."""
    from batched_gpu import captured

    graph = captured(fn)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def copies_for(weight_bytes: int) -> int:
    """Weight sets a timed graph cycles through: twice the L2 (an 8B qkv fits in it alone), at most 8."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(2 * l2 / weight_bytes)))


def time_linear(kind: str, name: str, rows_list, replays: int, bandwidth: float, over, save) -> list[dict]:
    """Every candidate on one linear at each token count: checked once, then timed."""
    shape = SHAPES[name] if not CPU_CHECK else TINY[name]
    form = shape[2]
    one = weights(kind_of(kind), shape, 1, seed=0)[0]
    weight_bytes = sum(w.nbytes for w in one)
    sets = [one] + (weights(kind_of(kind), shape, copies_for(weight_bytes) - 1, seed=5) if not CPU_CHECK else [])
    out = []
    for rows in rows_list:
        x, res, n = inputs(shape, rows, seed=1)
        ref = reference(one, x, res, form)
        for variant, label, tile in [("torch", "dequantize+matmul", None)] + candidates(block_m(rows), form == "glu"):
            if over():
                return out
            rec = dict(quant=kind, linear=name, rows=rows, variant=variant, tile=label,
                       tile_config=tile if tile is None or isinstance(tile, tuple) else dict(tile),
                       weight_bytes=weight_bytes)
            try:
                y = torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                launch(variant, tile, one, x, y, res, form)
                rec |= errors(y, ref)
                rec["ok"] = rec["all_written"] and rec["rel_err"] < (GLU_BOUND if form == "glu" else LINEAR_BOUND)
                if not CPU_CHECK:
                    def fn():
                        for parts in sets:
                            launch(variant, tile, parts, x, y, res, form)
                    us = graph_us(fn, len(sets), replays)
                    rec |= dict(us=us, weight_tb_s=weight_bytes / us / 1e6,
                                bandwidth_fraction=weight_bytes / (us * 1e-6) / bandwidth, copies=len(sets))
            except Exception as e:  # noqa: BLE001 - one candidate failing must not lose the others
                rec |= dict(ok=False, error=f"{type(e).__name__}: {e}"[:400])
            out.append(rec)
            save(rec)
            log(f"{kind} {name} m{rows} {variant:6s} {label:18s}",
                *(f"{rec['us']:8.1f} us {rec['weight_tb_s']:.2f} TB/s" for _ in [0] if "us" in rec),
                *(f"err {rec['rel_err']:.1e} max {rec['max_rel_err']:.1e}" for _ in [0] if "rel_err" in rec),
                "" if rec.get("ok") else f"NOT OK {rec.get('error', '')}")
    return out


# -- decode ---------------------------------------------------------------------------------------------


def decode(kind: str, variants, batches, peak: dict, over, save) -> list[dict]:
    """Greedy decode tok/s of one 8B-shaped engine at each batch, per variant (graphs recaptured for each)."""
    from batched_gpu import model_config

    from heavylift.engine import Engine
    from heavylift.engine import batched as B
    from heavylift.runtime.benchmark import decode_lengths, engine_decode_tok_s, step_cost

    import triton

    # The Triton variants autotune over the two tiles compiled ahead (and timed above), not all of CONFIGS.
    for kernel in (B.linear_kernel, B.glu_kernel):
        kernel.configs = [triton.Config({k: v for k, v in t.items() if not k.startswith("num_")},
                                        num_warps=t["num_warps"], num_stages=t["num_stages"])
                          for t in TRITON_TILES.values()]
    context = max(sum(decode_lengths(b)) for b in batches) + 2
    engine = Engine.from_random(model_config(), kind_of(kind), DEVICE, batch=max(batches), context=context)
    out = []
    for variant in variants:
        os.environ[B.VARIANT_ENV] = variant
        engine._graphs.clear()  # captured with the previous variant's kernels
        for batch in batches:
            if over():
                return out
            prompt, new = decode_lengths(batch)
            rate = engine_decode_tok_s(engine, batch, prompt, new)
            cost = step_cost(engine, batch, prompt + new / 2)
            roof = cost.roofline_tok_s(peak["bandwidth_bytes_s"], peak["flops_s"])
            rec = dict(kind="decode", quant=kind, variant=variant, batch=batch, prompt=prompt, new=new,
                       decode_tok_s=rate, roofline_tok_s=roof, roofline_fraction=rate / roof)
            out.append(rec)
            save(rec)
            log(f"decode {kind} {variant} batch {batch}: {rate:.0f} tok/s ({100 * rate / roof:.1f}% of roofline)")
    os.environ.pop(B.VARIANT_ENV, None)
    return out


# -- the run --------------------------------------------------------------------------------------------


def gluon_compiles() -> list[dict]:
    """--cpu-check: the Gluon kernels compiled for sm_90 without a GPU (bench/batched_sass.py's compile)."""
    from batched_sass import compile_wgmma4

    from heavylift.engine import wgmma4

    out = []
    for form, bm in (("linear", 16), ("glu", 16), ("linear", 64), ("glu", 64)):
        for tile in ((wgmma4.GLU_TILES if form == "glu" else wgmma4.TILES)[bm],
                     (WGMMA_GLU_ALT if form == "glu" else WGMMA_ALT)[bm]):
            try:
                out.append(compile_wgmma4(form, bm, tile))
            except Exception as e:  # noqa: BLE001 - reported
                out.append(dict(kernel=form, bm=bm, tile=tile, error=f"{type(e).__name__}: {e}"[:400]))
            log("sm_90 compile", {k: out[-1][k] for k in ("kernel", "regs", "shared_bytes", "instructions_per_byte",
                                                             "error") if k in out[-1]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="batched_variants.json")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new work past this (seconds)")
    p.add_argument("--kinds", default="nf4-dq,nf4")
    p.add_argument("--rows", default="4,16,64")
    p.add_argument("--replays", type=int, default=7)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--decode-batches", default="4,16,64")
    p.add_argument("--decode-variants", default="wgmma,scaled,post")
    p.add_argument("--cpu-check", action="store_true", help="Triton's interpreter at tiny shapes, no timing")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    rows_list = [int(r) for r in args.rows.split(",") if r]
    result = dict(date=datetime.date.today().isoformat(), command="python3 " + " ".join(sys.argv),
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  env={k: v for k, v in os.environ.items() if k.startswith("HEAVYLIFT_")}, records=[])
    if CPU_CHECK:
        result |= dict(card="cpu (Triton interpreter)", peaks=None)
    else:
        from batched_gpu import card_name, peaks

        result |= dict(card=card_name()[0], peaks=peaks())

    def save(rec=None):
        if rec is not None:
            result["records"].append(rec)
        result["elapsed_s"] = time.time() - T0
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def over(reserve: float = 0.0) -> bool:
        return time.time() - T0 > args.budget_s - reserve

    if CPU_CHECK:
        rows_list = [2, 5, 16, 33]
        result["sm90_compiles"] = gluon_compiles()
    else:
        result["compiles"] = precompile(kinds, rows_list, args.workers)
    save()
    bandwidth = result["peaks"]["bandwidth_bytes_s"] if result["peaks"] else 1.0
    decode_variants = [v for v in args.decode_variants.split(",") if v]
    reserve = 0 if CPU_CHECK else DECODE_SECONDS * len(decode_variants[:1])
    for kind in kinds:
        for name in SHAPES:
            time_linear(kind, name, rows_list, args.replays, bandwidth, lambda: over(reserve), save)
    if not CPU_CHECK and args.decode_batches:
        batches = [int(b) for b in args.decode_batches.split(",")]
        decode(kinds[0], decode_variants, batches, result["peaks"], over, save)
    save()
    bad = [r for r in result["records"] if "ok" in r and not r["ok"]]
    log(f"done: {len(result['records'])} records, {len(bad)} not ok, written to {args.out}")


if __name__ == "__main__":
    main()
