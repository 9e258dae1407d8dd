"""Where the NF4 decode kernels lose their bandwidth: kernel variants and tile shapes, timed one by one.

The engine's 4-bit GEMV read about 0.6 TB/s on an H100 while its bf16 one read 2.6. This script
times, for the 8B model's weight shapes, the production kernels (autotuned as the engine runs them)
beside variants that each change one thing, over a wide set of tiles:
  v0  the production loop body (byte tile, two code-table loads per byte, strided x loads)
  v1  x read as int32 pairs and split with shifts (no strided loads)
  v2  v1 with the table lookup replaced by arithmetic (wrong values: the ceiling without lookups)
  v3  v1, each 64-block reduced before its absmax multiply
  v4  weights read as int32 words, eight nibbles each, x contiguous
  v5  bytes and x pairs in one register layout, the lookup in registers (engine/lut.py)
  v6  v5 with the table lookup from memory
  v7  v5 with pointers advanced per step and no masks; v8 the same with the lookup from memory
and, for 16 rows, the production tensor-core kernel against bitsandbytes' dequantize + cuBLAS.
Every variant but v2 is checked against a float64 reference first.
Usage (GPU machine, after the kit prelude): python3 bench/gemv_sweep.py --out $OUT/gemv_sweep.json
"""

import argparse
import datetime
import json
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import bitsandbytes.functional as bnbf

from heavylift.engine import lut, weights as W
from heavylift.engine.kernels import DQ_GROUP, NF4_DQ, _dot, _nf4_rows
from heavylift.engine.ops import TritonOps, dense_linear

LUT_ASM = tl.constexpr(lut.ptx(bnbf.get_4bit_type("nf4", device="cpu").tolist()))
SHAPES = {"gate": (14336, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
TILES = ((4, 8), (8, 4), (2, 16), (8, 8), (4, 16), (16, 4), (16, 8), (8, 16), (32, 4), (16, 16), (32, 8), (1, 32))
WARPS = (2, 4, 8)


@triton.jit
def _load_absmax(abs_ptr, abs2_ptr, code2_ptr, offset, blk_base, rows, blk, nblk, mask2, KIND: tl.constexpr):
    """The fp32 absmax of blocks `blk` of `rows` (the engine's loop before v7): stored, or rebuilt from its
    8-bit double quantization."""
    idx = blk_base + rows[:, None].to(tl.int64) * nblk + blk[None, :]
    if KIND == NF4_DQ:
        q = tl.load(abs_ptr + idx, mask=mask2, other=0)
        a = tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // DQ_GROUP, mask=mask2, other=0.0) + offset
    else:
        a = tl.load(abs_ptr + idx, mask=mask2, other=0.0)
    return tl.where(mask2, a, 0.0)


@triton.jit
def nf4_gemv(x_ptr, x32_ptr, w_ptr, w32_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, N, K,
             VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, 32)
    b = tl.arange(0, NB)
    nblk = K // 64
    acc3 = tl.zeros((BLOCK_N, NB, 32), tl.float32)
    acc2 = tl.zeros((BLOCK_N, NB), tl.float32)
    acc4 = tl.zeros((BLOCK_N, NB, 8, 8), tl.float32)
    for kb in range(0, nblk, NB):
        blk = kb + b
        blk_mask = blk < nblk
        mask2 = row_mask[:, None] & blk_mask[None, :]
        a = _load_absmax(abs_ptr, abs2_ptr, code2_ptr, offset, 0, rows, blk, nblk, mask2, 3)
        if VARIANT >= 5:  # x and the packed bytes read in one register layout (4 per thread), no shared memory
            offs = tl.max_contiguous(blk[None, :, None] * 32 + j[None, None, :], [1, 1, 4])
            packed = tl.load(w_ptr + rows64[:, None, None] * (K // 2) + offs, mask=mask2[:, :, None], other=0)
            x32 = tl.load(x32_ptr + offs + 0 * rows[:, None, None], mask=mask2[:, :, None], other=0)
            xe = (x32 << 16).to(tl.float32, bitcast=True)
            xo = (x32 & -65536).to(tl.float32, bitcast=True)
            if VARIANT == 5:
                hi, lo = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                                   dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                hi = tl.load(code_ptr + (packed >> 4))
                lo = tl.load(code_ptr + (packed & 15))
            acc3 += (hi * xe + lo * xo) * a[:, :, None]
        elif VARIANT == 4:
            i = tl.arange(0, 8)
            words = tl.load(w32_ptr + rows64[:, None, None] * (K // 8) + blk[None, :, None] * 8 + i[None, None, :],
                            mask=mask2[:, :, None], other=0)
            shift = 8 * (i // 2) + 4 * (1 - i % 2)  # element 8w+e sits at these bits of word w
            nib = (words[:, :, :, None] >> shift[None, None, None, :]) & 15
            wv = tl.load(code_ptr + nib)
            xk = blk[:, None, None] * 64 + i[None, :, None] * 8 + i[None, None, :]
            xv = tl.load(x_ptr + xk, mask=blk_mask[:, None, None], other=0.0).to(tl.float32)
            acc4 += wv * xv[None, :, :, :] * a[:, :, None, None]
        else:
            packed = tl.load(w_ptr + rows64[:, None, None] * (K // 2) + blk[None, :, None] * 32 + j[None, None, :],
                             mask=mask2[:, :, None], other=0)
            if VARIANT == 0:
                xk = blk[:, None] * 64 + 2 * j[None, :]
                xe = tl.load(x_ptr + xk, mask=blk_mask[:, None], other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + xk + 1, mask=blk_mask[:, None], other=0.0).to(tl.float32)
            else:
                x32 = tl.load(x32_ptr + blk[:, None] * 32 + j[None, :], mask=blk_mask[:, None], other=0)
                xe = (x32 << 16).to(tl.float32, bitcast=True)
                xo = (x32 & -65536).to(tl.float32, bitcast=True)
            if VARIANT == 2:
                hi = (packed >> 4).to(tl.float32) * 0.125 - 0.9
                lo = (packed & 15).to(tl.float32) * 0.125 - 0.9
            else:
                hi = tl.load(code_ptr + (packed >> 4))
                lo = tl.load(code_ptr + (packed & 15))
            if VARIANT == 3:
                acc2 += tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2) * a
            else:
                acc3 += (hi * xe[None, :, :] + lo * xo[None, :, :]) * a[:, :, None]
    if VARIANT == 3:
        acc = tl.sum(acc2, axis=1)
    elif VARIANT == 4:
        acc = tl.sum(tl.sum(tl.sum(acc4, axis=3), axis=2), axis=1)
    else:
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    tl.store(out_ptr + rows, acc.to(tl.bfloat16), mask=row_mask)


@triton.jit
def nf4_gemm(x_ptr, w_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, M, N, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """16 rows of x against BLOCK_N weight rows, one 64-block per step: the tile [BLOCK_N, 64] is built from
    byte loads at k // 2 (each byte read for both its nibbles), scaled by the block's absmax after the dot."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, 64)
    shift = 4 * (1 - k % 2)
    nblk = K // 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for blk in range(0, nblk):
        byte = tl.load(w_ptr + rows64[:, None] * (K // 2) + blk * 32 + k[None, :] // 2, mask=row_mask[:, None], other=0)
        w = tl.load(code_ptr + ((byte >> shift[None, :]) & 15))
        xt = tl.load(x_ptr + m[:, None] * K + blk * 64 + k[None, :], mask=(m < M)[:, None], other=0.0)
        idx = rows64 * nblk + blk
        q = tl.load(abs_ptr + idx, mask=row_mask, other=0)
        a = tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // 256, mask=row_mask, other=0.0) + offset
        acc += _dot(xt, tl.trans(w)) * a[None, :]
    mask = (m < M)[:, None] & row_mask[None, :]
    tl.store(out_ptr + m[:, None] * N + rows[None, :], acc.to(tl.bfloat16), mask=mask)


@triton.jit
def nf4_gemv7(x_ptr, w_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, N, K,
              BLOCK_N: tl.constexpr, NB: tl.constexpr, LUT: tl.constexpr):
    """v5 with pointers advanced per step and no masks: the engine's own loop (kernels._nf4_rows)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _nf4_rows(x_ptr, w_ptr, abs_ptr, abs2_ptr, offset, 0, code_ptr, code2_ptr, rows, rows < N, K, NF4_DQ,
                    BLOCK_N, NB, True, LUT)
    tl.store(out_ptr + rows, acc.to(tl.bfloat16))


def run_gemm(w, x, out, bn, warps, stages):
    nf4_gemm[(triton.cdiv(w.n, bn),)](x, w.data, w.scale, w.absmax2, w.code, w.code2, w.offset, out, x.shape[0],
                                      w.n, w.k, BLOCK_M=16, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def run_variant(variant, w, x, out, bn, nb, warps):
    grid = (triton.cdiv(w.n, bn),)
    if variant in (7, 8):
        return nf4_gemv7[grid](x, w.data, w.scale, w.absmax2, w.code, w.code2, w.offset, out, w.n,
                               w.k, BLOCK_N=bn, NB=nb, LUT=variant == 7, num_warps=warps, num_stages=3)
    nf4_gemv[grid](x, x.view(torch.int32), w.data, w.data.view(torch.int32), w.scale, w.absmax2, w.code, w.code2,
                   w.offset, out, w.n, w.k, VARIANT=variant, BLOCK_N=bn, NB=nb, num_warps=warps, num_stages=3)


def rel_err(y, x, w):
    ref = x.double() @ w.dequantize(torch.float64).T
    return ((y.double().reshape(ref.shape) - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="0,1,2,3,4")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--dump-asm", action="store_true")
    p.add_argument("--skip-gemm", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    result = dict(card=dev, date=datetime.date.today().isoformat(), command="python3 bench/gemv_sweep.py " +
                  f"--out {args.out} --variants {args.variants}", gemv=[], gemm=[], production=[])
    weights = {name: W.quantize(torch.randn(n, k, device="cuda") * 0.02, W.NF4_DQ) for name, (n, k) in SHAPES.items()}
    dense = {name: W.quantize(torch.randn(n, k, device="cuda") * 0.02, W.DENSE) for name, (n, k) in SHAPES.items()}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for name, w in weights.items():  # production kernels first: the numbers to beat
        for rows in (1, 16):
            x = torch.randn(rows, w.k, device="cuda").bfloat16()
            out = torch.full((rows, w.n), float("nan"), device="cuda", dtype=torch.bfloat16)
            for label, fn in (("triton", lambda: TritonOps.linear(x, [w], out)),
                              ("dequant+cublas", lambda: out.copy_(dense_linear(x, w)))):
                if rows == 1 and label != "triton":
                    continue
                fn()
                err = rel_err(out, x, w)
                ms = do_bench(fn, warmup=10, rep=40)
                result["production"].append(dict(shape=name, rows=rows, path=label, kind="nf4-dq", ms=ms,
                                                 gb_s=w.nbytes / ms / 1e6, rel_err=err))
            xd = torch.randn(rows, w.k, device="cuda").bfloat16()
            od = torch.empty(rows, w.n, device="cuda", dtype=torch.bfloat16)
            ms = do_bench(lambda: TritonOps.linear(xd, [dense[name]], od), warmup=10, rep=40)
            result["production"].append(dict(shape=name, rows=rows, path="triton", kind="bf16", ms=ms,
                                             gb_s=dense[name].nbytes / ms / 1e6))
    for r in result["production"]:
        print("production", r, flush=True)
    save()

    for bn in (() if args.skip_gemm else (32, 64, 128)):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                row = dict(block_n=bn, warps=warps, stages=stages)
                try:
                    for name, w in weights.items():
                        x = torch.randn(16, w.k, device="cuda").bfloat16()
                        out = torch.full((16, w.n), float("nan"), device="cuda", dtype=torch.bfloat16)
                        run_gemm(w, x, out, bn, warps, stages)
                        row[f"{name}_err"] = rel_err(out, x, w)
                        ms = do_bench(lambda: run_gemm(w, x, out, bn, warps, stages), warmup=5, rep=25)
                        row[f"{name}_gb_s"] = w.nbytes / ms / 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                result["gemm"].append(row)
                print("gemm", row, flush=True)
    save()
    if args.dump_asm:  # what one iteration costs: the compiled code of the best tile of v1 and of bf16
        import os
        w, xv = weights["gate"], torch.randn(1, 4096, device="cuda").bfloat16()
        out = torch.empty(w.n, device="cuda", dtype=torch.bfloat16)
        for variant in (7,):
            kern = run_variant(7, w, xv, out, 8, 8, 4)
            for key in ("ttgir", "ptx", "sass"):
                with open(os.path.join(os.path.dirname(args.out), f"v{variant}.{key}"), "w") as f:
                    f.write(kern.asm[key])
            print("registers", variant, kern.n_regs, "spills", kern.n_spills, flush=True)
        for variant in (5,):
            kern = nf4_gemv[(triton.cdiv(w.n, 8),)](xv, xv.view(torch.int32), w.data, w.data.view(torch.int32),
                                                   w.scale, w.absmax2, w.code, w.code2, w.offset, out, w.n, w.k,
                                                   VARIANT=variant, BLOCK_N=8, NB=8, num_warps=4, num_stages=3)
            for key in ("ttgir", "ptx", "sass"):
                try:
                    text = kern.asm[key]
                except Exception as e:
                    text = repr(e)
                with open(os.path.join(os.path.dirname(args.out), f"v{variant}.{key}"), "w") as f:
                    f.write(text if isinstance(text, str) else text.decode())
            print("registers", variant, kern.n_regs, "spills", kern.n_spills, flush=True)

    x = torch.randn(1, 4096, device="cuda").bfloat16()
    xs = {4096: x, 14336: torch.randn(1, 14336, device="cuda").bfloat16()}
    for variant in [int(v) for v in args.variants.split(",")]:
        for bn, nb in TILES:
            for warps in WARPS:
                if time.time() - t0 > args.budget_s:
                    break
                row = dict(variant=variant, block_n=bn, nb=nb, warps=warps)
                try:
                    for name, w in weights.items():
                        xv = xs[w.k]
                        out = torch.full((w.n,), float("nan"), device="cuda", dtype=torch.bfloat16)
                        run_variant(variant, w, xv, out, bn, nb, warps)
                        if variant != 2:
                            row[f"{name}_err"] = rel_err(out, xv, w)
                        ms = do_bench(lambda: run_variant(variant, w, xv, out, bn, nb, warps), warmup=5, rep=25)
                        row[f"{name}_gb_s"] = w.nbytes / ms / 1e6
                except Exception as e:  # a tile too large for registers or shared memory: record and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                result["gemv"].append(row)
                print("gemv", row, flush=True)
        save()
    best = {}
    for r in result["gemv"]:
        if "error" in r:
            continue
        score = sum(r[f"{s}_gb_s"] * SHAPES[s][0] * SHAPES[s][1] for s in SHAPES) / sum(n * k for n, k in SHAPES.values())
        if score > best.get(r["variant"], (0,))[0]:
            best[r["variant"]] = (score, r)
    result["best_per_variant"] = {str(v): dict(weighted_gb_s=s, **r) for v, (s, r) in best.items()}
    for v, (s, r) in sorted(best.items()):
        print(f"best v{v}: {s:.0f} GB/s", r, flush=True)
    result["elapsed_s"] = time.time() - t0
    save()


if __name__ == "__main__":
    main()
