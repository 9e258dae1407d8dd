"""What the engine's tiled prefill allocates on one CUDA GPU, call by call, against what the planner counts.

Each check runs the engine's own code on a warmed-up GPU and reads torch.cuda.memory_allocated,
max_memory_allocated and the allocator's count of allocations (memory_stats "allocation.all.allocated")
around it:
- scale: a tile of INT8 and FP8 rows written by ops._tile_writer (copy_, then mul_ of the bf16 tile by the fp32
  row scales in place): allocates nothing;
- mm: torch.mm and torch.addmm (with a bias) into a column slice of a wider output, as ops._tiled_linear calls
  them: allocates nothing;
- dequant4: bitsandbytes' dequantize_4bit into a row slice of the tile, through ops._bnb_writer, NF4 and NF4-DQ:
  allocates nothing, and equals the whole weight's dequantize on those rows;
- linear: ops.dense_linear on NF4-DQ, INT8 and FP8-without-FP8-matmul weights, and ops.dense_linear_mul (the
  product multiplied into a given tensor a tile's columns at a time): allocations, allocated peak and what stays
  equal planner.matmul_programs' dense_linear and dense_linear_mul (the tile, the output or one tile's columns
  of it, NF4-DQ's fp32 absmax);
- attention: Engine._prefill_attention on a first chunk and a later one (causal_lower_right, enable_gqa): only
  the output and flash attention's log-sum-exp, flash attention usable, the result within bf16 rounding of
  SDPA over repeated keys with an additive mask;
- mlp: Engine._prefill_mlp (its norm on the Triton kernel) in two pieces of rows (PREFILL_MLP_BYTES lowered):
  its allocations and allocated peak equal the planner's _engine_mlp program's.
Prints one JSON object and writes it to --out; exits 1 if any check fails. About 10 s on an H100.
Usage: python3 bench/cuda_inplace_probe.py --out $OUT/cuda_inplace_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import types

import torch
import torch.nn.functional as F

from heavylift.engine import ops
from heavylift.engine import weights as W
from heavylift.engine.model import Engine
from heavylift.planner import engine_program
from heavylift.planner.allocator import Program, block_size, peak_live
from heavylift.planner.matmul_programs import dense_linear as planned_linear, dense_linear_mul as planned_linear_mul, \
    dequant_tile_rows
from heavylift.runtime.benchmark import command_line

DEV = torch.device("cuda")
BF16 = dict(dtype=torch.bfloat16, device=DEV)
KINDS = {W.NF4: "nf4", W.NF4_DQ: "nf4-dq", W.INT8: "int8", W.FP8: "fp8"}


def measure(fn):
    """fn's result and what it allocated: still allocated after it, at its peak, and how many allocations."""
    torch.cuda.synchronize()
    base, count = torch.cuda.memory_allocated(), torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, dict(allocated=torch.cuda.memory_allocated() - base, peak=torch.cuda.max_memory_allocated() - base,
                     allocations=torch.cuda.memory_stats()["allocation.all.allocated"] - count)


def nothing(stats: dict) -> bool:
    return stats == dict(allocated=0, peak=0, allocations=0)


def weight(kind: int, n: int, k: int, seed: int) -> W.QWeight:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return W.quantize(torch.randn(n, k, generator=g, **BF16) * 0.02, kind)


def check_scale(n: int = 8192, k: int = 4096) -> list[dict]:
    out = []
    for kind in (W.INT8, W.FP8):
        w = weight(kind, n, k, 1)
        write, step = ops._tile_writer(w), dequant_tile_rows(n, k) // 4
        tile = torch.empty(step, k, **BF16)
        write(0, step, tile)  # warm-up
        _, stats = measure(lambda: write(step, 2 * step, tile))
        exact = torch.equal(tile, w.rows(step, 2 * step).dequantize())
        out.append(dict(check="scale", kind=KINDS[kind], **stats, exact=exact, ok=nothing(stats) and exact))
    return out


def check_mm(m: int = 2048, n: int = 8192, k: int = 4096, step: int = 2048) -> list[dict]:
    x, tile, bias = torch.randn(m, k, **BF16), torch.randn(step, k, **BF16), torch.randn(n, **BF16)
    y = torch.empty(m, n, **BF16)
    out = []
    calls = {"mm": lambda lo: torch.mm(x, tile.t(), out=y[:, lo:lo + step]),
             "addmm": lambda lo: torch.addmm(bias[lo:lo + step], x, tile.t(), out=y[:, lo:lo + step])}
    for name, call in calls.items():
        call(0)  # warm-up: cuBLAS's workspace
        _, stats = measure(lambda: call(step))
        want = x.float() @ tile.float().t() + (bias[step:2 * step].float() if name == "addmm" else 0)
        err = ((y[:, step:2 * step].float() - want).norm() / want.norm()).item()
        out.append(dict(check="mm", call=name, **stats, rel_err=err, ok=nothing(stats) and err < 1e-2))
    return out


def check_dequant4(n: int = 8192, k: int = 4096) -> list[dict]:
    import bitsandbytes.functional as bnbf

    out = []
    for kind in (W.NF4, W.NF4_DQ):
        w = weight(kind, n, k, 2)
        write, step = ops._bnb_writer(w), dequant_tile_rows(n, k) // 4
        tile = torch.empty(2 * step, k, **BF16)
        write(0, step, tile[:step])  # warm-up
        _, stats = measure(lambda: write(step, 2 * step, tile[step:]))
        whole = bnbf.dequantize_4bit(w.data.view(-1, 1), w.state)
        exact = torch.equal(tile[step:], whole[step:2 * step])
        out.append(dict(check="dequant4", kind=KINDS[kind], **stats, exact=exact, ok=nothing(stats) and exact))
    return out


def check_linear(m: int = 2048, n: int = 14336, k: int = 4096) -> list[dict]:
    """dense_linear, and dense_linear_mul (`into` *= the product, a tile's columns at a time)."""
    out = []
    for kind in (W.NF4_DQ, W.INT8, W.FP8):
        w = weight(kind, n, k, 3)
        x, into = torch.randn(m, k, **BF16), torch.randn(m, n, **BF16)
        fp8_matmul = kind == W.FP8 and ops._fp8_matmul_ok(DEV)
        want = x.float() @ w.dequantize().float().t()
        for mul in (False, True):
            if fp8_matmul:  # the tiled path is the one without FP8 tensor cores: call it directly
                run = (lambda: ops._tiled_linear(x, w, into)) if mul else (lambda: ops._tiled_linear(x, w))
            else:
                run = (lambda: ops.dense_linear_mul(x, w, into)) if mul else (lambda: ops.dense_linear(x, w))
            before = into.clone()
            run()  # warm-up
            into.copy_(before)
            y, stats = measure(run)
            p = Program()
            if mul:
                planned_linear_mul(p, KINDS[kind], m, k, n, native_fp8=False)
            else:
                p.free(planned_linear(p, KINDS[kind], m, k, n, native_fp8=False))
            planned = dict(peak=peak_live(p), allocations=sum(1 for e in p.events if e[0] == "alloc"),
                           allocated=0 if mul else block_size(2 * m * n))
            ref = before.float() * want if mul else want
            err = ((y.float() - ref).norm() / ref.norm()).item()
            ok = stats["peak"] == planned["peak"] and stats["allocations"] == planned["allocations"] \
                and stats["allocated"] == planned["allocated"] and err < 1e-2
            out.append(dict(check="linear_mul" if mul else "linear", kind=KINDS[kind], tiled_directly=fp8_matmul,
                            **stats, planned=planned, rel_err=err, ok=ok))
    return out


def check_attention(heads: int = 32, kv_heads: int = 8, d: int = 128, t: int = 2048, context: int = 8192
                    ) -> list[dict]:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention
    from torch.nn.attention import SDPBackend

    g = torch.Generator(device=DEV).manual_seed(4)
    k_cache, v_cache = (torch.randn(2, kv_heads, context, d, generator=g, **BF16) for _ in range(2))
    layer = types.SimpleNamespace(window=0, k_cache=k_cache, v_cache=v_cache)
    shape = types.SimpleNamespace(heads=heads, kv_heads=kv_heads, head_dim=d)
    engine = types.SimpleNamespace(shape=shape, scale=d ** -0.5)
    out = []
    for start in (0, 4096):
        q = torch.randn(t, heads, d, generator=g, **BF16)
        positions = torch.arange(start, start + t, dtype=torch.int32, device=DEV)

        def run():
            return Engine._prefill_attention(engine, q, layer, start, positions, 1, None)

        run()  # warm-up
        y, stats = measure(run)
        end = start + t
        k = k_cache[1, :, :end][None].repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[1, :, :end][None].repeat_interleave(heads // kv_heads, dim=1)
        mask = torch.zeros(t, end, **BF16).masked_fill_(torch.arange(end, device=DEV)[None] > positions[:, None].long(),
                                                         float("-inf"))
        want = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask[None, None],
                                              scale=d ** -0.5)[0].transpose(0, 1).reshape(t, -1)
        err = (y.float() - want.float()).abs().max().item()
        params = SDPAParams(q.transpose(0, 1)[None], k_cache[1, :, :end][None], v_cache[1, :, :end][None], None,
                            0.0, start == 0, True)
        planned = dict(allocated=block_size(2 * t * heads * d), peak=block_size(2 * t * heads * d)
                       + block_size(4 * heads * t))
        ok = stats["allocated"] == planned["allocated"] and stats["peak"] == planned["peak"] and err < 0.02
        backend = SDPBackend(torch._fused_sdp_choice(params.query, params.key, params.value, is_causal=True,
                                                     enable_gqa=True)).name if start == 0 else "causal_lower_right"
        out.append(dict(check="attention", start=start, **stats, planned=planned, backend=backend,
                        flash_usable=can_use_flash_attention(params), max_abs_err=err, ok=ok))
    return out


def check_mlp(t: int = 2048, h: int = 4096, i: int = 14336) -> list[dict]:
    engine_program.PREFILL_MLP_BYTES = 32 << 20  # 1170 rows of 14336: a 2048-token chunk in two pieces of 1024
    layer = types.SimpleNamespace(ln2=torch.ones(h, **BF16), gate=weight(W.NF4_DQ, i, h, 5),
                                  up=weight(W.NF4_DQ, i, h, 6), down=weight(W.NF4_DQ, h, i, 7))
    engine = types.SimpleNamespace(ops=ops.TritonOps, shape=types.SimpleNamespace(eps=1e-5))
    engine._norm = types.MethodType(Engine._norm, engine)
    hidden = torch.randn(t, h, **BF16)
    Engine._prefill_mlp(engine, layer, hidden.clone())  # warm-up: the Triton norm's compilation
    _, stats = measure(lambda: Engine._prefill_mlp(engine, layer, hidden))
    p = Program()
    engine_program._engine_mlp(p, "nf4-dq", t, h, i, native_fp8=False)
    planned = dict(peak=peak_live(p), allocations=sum(1 for e in p.events if e[0] == "alloc"))
    ok = stats["peak"] == planned["peak"] and stats["allocations"] == planned["allocations"] \
        and stats["allocated"] == 0
    return [dict(check="mlp", rows=engine_program.prefill_mlp_rows(t, i), **stats, planned=planned, ok=ok)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    checks = []
    for check in (check_scale, check_mm, check_dequant4, check_linear, check_attention, check_mlp):
        try:
            checks += check()
        except Exception as e:  # a check that cannot run is a failed check, reported with its reason
            checks.append(dict(check=check.__name__, ok=False, error=f"{type(e).__name__}: {e}"))
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                  command=command_line(), all_ok=all(c["ok"] for c in checks), checks=checks)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
