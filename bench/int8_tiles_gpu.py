"""LLM.int8 a weight tile at a time on one CUDA GPU (runtime/bnb_forward.py TiledLinear8bitLt) against bitsandbytes'
own Linear8bitLt forward, and its allocations against the planner's (matmul_programs._llm_int8).

For each shape (Llama 3.1 405B's q, gate and down projections; 2048 prefill rows and 1 decode row; threshold 6
with outlier columns, every column an outlier column, and threshold 0):
- values: threshold 0 and inputs without outliers must equal bitsandbytes' bit for bit (no addmm); with
  outliers, the only difference allowed is the outlier part's addmm summing in another order: the result within
  one bf16 rounding of bitsandbytes' (rtol 2^-7, atol 2^-7 of the output's largest magnitude), and the count of
  differing elements is reported;
- memory: the allocated peak above what was allocated before the call, against the planner's peak_live of
  linear(p, "int8", ...) for every column an outlier column (the case the plan counts), and bitsandbytes' own
  peak beside it.
Prints one JSON object and writes it to --out; exits 1 if any check fails. About 20 s on an H100.
Usage: python3 bench/int8_tiles_gpu.py --out $OUT/int8_tiles_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys

import bitsandbytes as bnb
import torch

from heavylift.planner.allocator import Program, peak_live
from heavylift.planner.matmul_programs import linear
from heavylift.runtime.bnb_forward import TiledLinear8bitLt, tile_int8_matmuls
from heavylift.runtime.bnb_load import quantize_int8_rows

SHAPES = {"q_proj": (16384, 16384), "gate_proj": (53248, 16384), "down_proj": (16384, 53248)}  # (n, k)
ROWS = (2048, 1)
PEAK_SLACK_BYTES = 1 << 20  # the measured allocated peak may differ from the plan's by this much, or
PEAK_SLACK_FRACTION = 0.005  # this fraction of it (the plan leaves out 0-dim tensors)


def _layer(n: int, k: int, threshold: float) -> TiledLinear8bitLt:
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    cb, scb = quantize_int8_rows(w, "cuda")
    del w
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    model = torch.nn.Sequential(layer).eval()
    tile_int8_matmuls(model)
    return model[0]


def _input(rows: int, k: int, kind: str) -> torch.Tensor:
    x = torch.randn(rows, k, device="cuda").clamp(-3, 3)
    if kind == "some":
        x[:, :: max(1, k // 7)] *= 4  # entries of 6 or more in a few columns
    elif kind == "every":
        x[0] = 7.0  # every column holds an entry past the threshold
    return x.bfloat16()


def _peak(fn) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn()
    torch.cuda.synchronize()
    return y, torch.cuda.max_memory_allocated() - before


def _case(name: str, n: int, k: int, rows: int, threshold: float, kind: str) -> dict:
    layer = _layer(n, k, threshold)
    x = _input(rows, k, kind)
    with torch.inference_mode():
        tiled, tiled_peak = _peak(lambda: layer(x))
        whole, whole_peak = _peak(lambda: bnb.nn.Linear8bitLt.forward(layer, x))
    differ = int((tiled != whole).sum())
    scale = whole.float().abs().max().item()
    close = torch.allclose(tiled.float(), whole.float(), rtol=2 ** -7, atol=2 ** -7 * scale)
    exact_expected = threshold == 0.0 or kind == "none"
    program = Program()
    linear(program, "int8", rows, k, n)
    planned = peak_live(program)
    ok = (differ == 0) if exact_expected else close
    if threshold > 0 and kind == "every":  # the case the plan counts; the 0-dim tensors it leaves out: 512 B each
        ok = ok and abs(tiled_peak - planned) <= max(PEAK_SLACK_BYTES, PEAK_SLACK_FRACTION * planned)
    return {"case": name, "rows": rows, "n": n, "k": k, "threshold": threshold, "outliers": kind,
            "differing_elements": differ, "within_one_bf16_rounding": close, "exact_expected": exact_expected,
            "tiled_peak_bytes": tiled_peak, "bitsandbytes_peak_bytes": whole_peak, "planned_peak_bytes": planned,
            "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    a.addmm(a, a)  # cuBLAS's workspace, allocated at its first call, in place before any measurement
    results = []
    for name, (n, k) in SHAPES.items():
        for rows in ROWS:
            for threshold, kind in ((6.0, "none"), (6.0, "some"), (6.0, "every"), (0.0, "every")):
                results.append(_case(name, n, k, rows, threshold, kind))
                torch.cuda.empty_cache()  # the case's layer is gone; its blocks go back before the next
                print(json.dumps(results[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(), "bitsandbytes": bnb.__version__, "cases": results,
              "ok": all(r["ok"] for r in results)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"ok": report["ok"], "failed": [r["case"] for r in results if not r["ok"]]}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
