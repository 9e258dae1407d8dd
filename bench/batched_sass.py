"""The batched 4-bit kernels compiled for sm_90 without a GPU: registers, shared memory and the SASS of each
kernel's main loop (instructions per packed weight byte a thread handles, and which ones).

Triton compiles for a target it is given (triton.compile with a GPUTarget) and ships ptxas and cuobjdump, so
this runs on any machine with the Triton the GPU image has (the layouts and SASS depend on its version; the
record names it). Per variant (engine/batched.py VARIANTS) and tile, the GLU kernel (gate and up, the 8B
model's largest linear) and the one-part linear, at x tile heights 16 and 64; the loop is the longest backward
branch of the SASS. The loop's shared-memory round trip of the widened weight shows as STS + LDSM + BAR per
step in the Triton kernels and is absent from wgmma4's.

With --rows, the kernels for one-byte weight rows instead (LLM.int8 and FP8, widened to bf16 without a lookup), at
every tile the autotuner may pick (batched.CONFIGS): the loop's instructions per weight byte. `compile_gemv4`
does the same for the one-token 4-bit kernels (gemv4.py), which the tests compile.

Usage: python3 bench/batched_sass.py [--rows] [--out sass.json] [--keep DIR (the .ttgir / .ptx / .sass files)]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BF16_PTRS = {"x_ptr", "out_ptr", "res_ptr", "b0", "b1", "b2"}
FP32_PTRS = {"s0", "s1", "s2", "code2_ptr", "ws_ptr"}
INT32_PTRS = {"code_ptr", "pairs_ptr", "tickets_ptr"}
FP16_PTRS = {"out16_ptr"}  # gemv4's GLU writes the down projection's fp16 planes
DIVISIBLE = {"K", "x_stride", "out_stride", "n", "n0", "n1", "n2", "w_stride"}  # multiples of 16 in the 8B model


def _signature(fn, const: dict, dq: bool) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        if name in BF16_PTRS:
            sig[name] = "*bf16"
        elif name in ("w0", "w1", "w2") or (dq and name in ("a0", "a1", "a2")):
            sig[name] = "*u8"
        elif name in ("a0", "a1", "a2") or name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name in FP16_PTRS:
            sig[name] = "*fp16"
        elif name in ("o0", "o1", "o2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop (backward branch) in the SASS."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    best = (0, -1)
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and addr - int(m.group(1), 16) > best[1] - best[0]:
            best = (int(m.group(1), 16), addr)
    body = [t for a, t in ins if best[0] <= a <= best[1]]
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)


def _compile(src, warps: int, stages: int, label: str, bytes_per_thread: float, keep: str | None) -> dict:
    k = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    if keep:
        tmp = os.path.join(keep, f"{label}.cubin")
    else:
        fd, tmp = tempfile.mkstemp(suffix=".cubin")
        os.close(fd)
    with open(tmp, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", tmp], capture_output=True, text=True).stdout
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", tmp], capture_output=True, text=True).stdout
    if keep:
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(keep, f"{label}.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(keep, f"{label}.sass"), "w") as f:
            f.write(sass)
    else:
        os.remove(tmp)
    ops = _loop(sass)
    total = sum(ops.values())
    return dict(kernel=label, regs=int(re.search(r"REG:(\d+)", usage).group(1)), shared_bytes=k.metadata.shared,
                loop_instructions=total, bytes_per_thread=bytes_per_thread,
                instructions_per_byte=round(total / bytes_per_thread, 2), loop_ops=dict(ops.most_common(14)),
                smem_round_trip=dict(STS=sum(v for o, v in ops.items() if o.startswith("STS")),
                                     LDSM=sum(v for o, v in ops.items() if o.startswith("LDSM")),
                                     BAR=sum(v for o, v in ops.items() if o.startswith("BAR"))))


def compile_gemv4(form: str, keep: str | None = None) -> dict:
    """gemv4's one-token GLU or one-part linear (with the residual) for NF4-DQ at the engine's tile (gemv4.TILE),
    x as fp16 planes; bytes_per_thread: the packed bytes a thread multiplies per step of the main loop."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from heavylift.engine import gemv4 as G
    from heavylift.engine.weights import NF4_DQ

    tile = G.TILE.kwargs
    const = dict(KIND=NF4_DQ, EVEN_K=True, X16=True, **tile)
    fn = G.glu4_kernel if form == "glu" else G.linear4_kernel
    const |= dict(OUT16=True) if form == "glu" else dict(PARTS=1, HAS_BIAS=False, HAS_RES=True)
    sig, attrs = _signature(fn, const, dq=True)
    label = f"gemv4_{form}_r{tile['RPT']}_w{tile['WARPS']}"
    return _compile(GluonASTSource(fn, sig, const, attrs), tile["WARPS"], 1, label, tile["RPT"] * 16, keep)


def compile_wgmma4(form: str, bm: int, tile=None, keep: str | None = None) -> dict:
    """wgmma4's GLU or one-part linear (with the residual) for NF4-DQ at x tile height bm."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from heavylift.engine import wgmma4 as G
    from heavylift.engine.weights import NF4_DQ

    post, bn, warps, stages = tile or (G.GLU_TILES if form == "glu" else G.TILES)[bm]
    const = dict(KIND=NF4_DQ, POST=post, BM=bm, BN=bn, W=warps, STAGES=stages)
    fn = G.glu_kernel if form == "glu" else G.linear_kernel
    if form != "glu":
        const |= dict(PARTS=1, HAS_BIAS=False, HAS_RES=True)
    sig, attrs = _signature(fn, const, dq=True)
    label = f"wgmma4_{form}_m{bm}_{'post' if post else 'scaled'}_n{bn}_w{warps}_s{stages}"
    weights = 2 if form == "glu" else 1
    return _compile(GluonASTSource(fn, sig, const, attrs), warps, 1, label, weights * bn * 64 / (32 * warps), keep)


def compile_triton(form: str, bm: int, post: bool, tile: dict, keep: str | None = None) -> dict:
    """batched.py's GLU or one-part linear (with the residual) for NF4-DQ, register lookup, at height bm."""
    from heavylift.engine import batched as B
    from heavylift.engine.weights import NF4_DQ

    const = dict(KIND=NF4_DQ, LUT=True, BLOCK_M=bm, BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"],
                 SWAP=tile["SWAP"], EVEN=True, POST=post)
    fn = B._glu_kernel if form == "glu" else B._linear_kernel
    if form != "glu":
        const |= dict(PARTS=1, HAS_BIAS=False, HAS_RES=True)
    sig, attrs = _signature(fn, const, dq=True)
    label = (f"triton_{form}_m{bm}_{'post' if post else 'scaled'}_n{tile['BLOCK_N']}_"
             f"{'swap_' if tile['SWAP'] else ''}w{tile['num_warps']}")
    weights = 2 if form == "glu" else 1
    per_thread = weights * tile["BLOCK_N"] * tile["BLOCK_K"] / 2 / (32 * tile["num_warps"])
    return _compile(ASTSource(fn, sig, const, attrs), tile["num_warps"], tile["num_stages"], label, per_thread, keep)


def compile_rows(form: str, bm: int, kind: str, config, keep: str | None = None) -> dict:
    """batched.py's GLU or one-part linear (with the residual) for one-byte weight rows, LLM.int8 or FP8
    (`kind`), at height bm and one of batched.CONFIGS (a triton.Config)."""
    from heavylift.engine import batched as B
    from heavylift.engine.weights import FP8, INT8

    const = dict(KIND=FP8 if kind == "fp8" else INT8, LUT=False, BLOCK_M=bm, EVEN=True, POST=False,
                 **config.kwargs)
    fn = B._glu_kernel if form == "glu" else B._linear_kernel
    if form != "glu":
        const |= dict(PARTS=1, HAS_BIAS=False, HAS_RES=True)
    sig, attrs = _signature(fn, const, dq=False)
    for name in ("w0", "w1", "w2"):
        if name in sig:
            sig[name] = "*fp8e4nv" if kind == "fp8" else "*i8"
    tile = config.kwargs
    label = f"{kind}_{form}_m{bm}_n{tile['BLOCK_N']}_{'swap_' if tile['SWAP'] else ''}w{config.num_warps}"
    weights = 2 if form == "glu" else 1
    per_thread = weights * tile["BLOCK_N"] * tile["BLOCK_K"] / (32 * config.num_warps)
    return _compile(ASTSource(fn, sig, const, attrs), config.num_warps, config.num_stages, label, per_thread, keep)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from batched_variants import TRITON_TILES, WGMMA_ALT, WGMMA_GLU_ALT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--keep", help="write each kernel's .ttgir, .ptx and .sass into this folder")
    p.add_argument("--rows", action="store_true",
                   help="instead, the one-byte-row kernels (LLM.int8 and FP8) at every autotuner tile")
    args = p.parse_args()
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = []
    for form in ("glu", "linear"):
        for bm in (16, 64):
            if args.rows:
                from heavylift.engine.batched import CONFIGS

                rows += [compile_rows(form, bm, kind, c, args.keep) for kind in ("int8", "fp8") for c in CONFIGS]
                continue
            for post in (False, True):
                for tile in TRITON_TILES.values():
                    rows.append(compile_triton(form, bm, post, tile, args.keep))
            rows.append(compile_wgmma4(form, bm, keep=args.keep))
            rows.append(compile_wgmma4(form, bm, (WGMMA_GLU_ALT if form == "glu" else WGMMA_ALT)[bm], args.keep))
    for r in rows:
        print(f"{r['kernel']:44s} regs {r['regs']:3d} smem {r['shared_bytes']:6d}  loop {r['loop_instructions']:4d}"
              f" = {r['instructions_per_byte']:5.2f}/byte  STS {r['smem_round_trip']['STS']:2d} LDSM "
              f"{r['smem_round_trip']['LDSM']:2d} BAR {r['smem_round_trip']['BAR']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card="none (CPU): compiled for sm_90", date=datetime.date.today().isoformat(),
                           command="python3 " + shlex.join(sys.argv), triton=triton.__version__, target="sm_90",
                           records=rows), f, indent=1)


if __name__ == "__main__":
    main()
