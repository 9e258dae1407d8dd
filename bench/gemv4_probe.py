"""One-token 4-bit GEMVs on a GPU: gemv4 (fp16x2 Gluon kernels, x as bf16 or as its planes; the code looked up
in registers or in a shared-memory byte table) against the Triton kernels (HEAVYLIFT_GEMV4=0), each timed inside
a CUDA graph over enough distinct weights that none stays in L2 (closer to a decode step than do_bench, whose L2
flush slows short kernels), after correctness checks against float64 for both lookups: three parts with bias and
residual, K that ends mid-step, the GLU writing its planes. Every tile config is timed on its own, then the
autotuned pick (what the engine runs).
Usage (GPU machine, after the kit prelude): python3 bench/gemv4_probe.py $OUT/gemv4_probe.json"""
import dataclasses, json, os, sys, time, datetime
import torch
from heavylift.runtime.benchmark import command_line
from heavylift.engine import weights as W
from heavylift.engine import gemv4 as G
from heavylift.engine.ops import TritonOps, planes

dev = torch.device("cuda")
res = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), command=command_line(), rows=[],
           checks=[])


def graph_time(fns, reps=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns: f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns: f()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / len(fns) * 1e3


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def only(configs):
    """Make gemv4's autotuners choose among `configs` alone, forgetting earlier picks."""
    for tuner in (G.linear4, G.glu4):
        tuner.configs = list(configs)
        tuner.cache.clear()


def label(c):
    return f"{'smem' if c.kwargs['SMEM'] else 'reg'}-r{c.kwargs['RPT']}w{c.kwargs['WARPS']}"


ALL = G._configs()
t0 = time.time()
for smem in (False, True):  # correctness of each lookup, through its own configs
    only([c for c in ALL if c.kwargs["SMEM"] == smem])
    for kind in (W.NF4, W.NF4_DQ):
        for k in (4096, 3584, 1088):
            ws = [W.quantize(torch.randn(n, k, device=dev) * 0.02, kind) for n in (512, 128, 128)]
            ws = [dataclasses.replace(w, bias=torch.randn(w.n, device=dev).bfloat16()) for w in ws]
            x = torch.randn(1, k, device=dev).bfloat16() * 3
            resid = torch.randn(1, 768, device=dev).bfloat16()
            out = torch.full((1, 768), float("nan"), device=dev, dtype=torch.bfloat16)
            TritonOps.linear(x, ws, out, residual=resid, x16=planes(x))
            ref = torch.cat([x.double() @ w.dequantize(torch.float64).T + w.bias.double() for w in ws], -1)
            ref += resid.double()
            gate, up = (W.quantize(torch.randn(1000, k, device=dev) * 0.02, kind) for _ in range(2))
            act = torch.full((1, 1000), float("nan"), device=dev, dtype=torch.bfloat16)
            act16 = torch.full((500,), -1, device=dev, dtype=torch.int32)
            TritonOps.glu(x, gate, up, act, x16=planes(x), out16=act16)
            g, u = (x.double() @ w.dequantize(torch.float64).T for w in (gate, up))
            aref = torch.nn.functional.silu(g) * u
            res["checks"].append(dict(lookup="smem" if smem else "reg", kind=W.KIND_NAMES[kind], k=k,
                                      linear_rel_err=rel(out, ref), glu_rel_err=rel(act, aref),
                                      finite=bool(torch.isfinite(out).all() and torch.isfinite(act).all()),
                                      act16_exact=bool(torch.equal(act16, planes(act)))))
            print(res["checks"][-1], flush=True)
SHAPES = {"gate": (14336, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096), "gate70": (28672, 8192),
          "down70": (8192, 28672), "qwen_gate": (18944, 3584)}
for name, (n, k) in SHAPES.items():
    count = max(2, -(-300_000_000 // (n * k // 2)))
    ws = [W.quantize(torch.randn(n, k, device=dev) * 0.02, W.NF4_DQ) for _ in range(count)]
    x = torch.randn(1, k, device=dev).bfloat16() * 2
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    ref = (x.double() @ ws[0].dequantize(torch.float64).T)
    x16 = planes(x)
    runs = [("triton", "0", None, ALL)] + [("gemv4-x16-" + label(c), "1", x16, [c]) for c in ALL]
    runs.append(("gemv4-x16-autotuned", "1", x16, ALL))
    for path, env, xp, configs in runs:
        os.environ["HEAVYLIFT_GEMV4"] = env
        only(configs)
        out.fill_(float("nan")); TritonOps.linear(x, [ws[0]], out, x16=xp); e = rel(out, ref)
        us = graph_time([lambda w=w: TritonOps.linear(x, [w], out, x16=xp) for w in ws])
        res["rows"].append(dict(shape=name, path=path, us=us, gb_s=ws[0].nbytes / us / 1e3, rel_err=e))
        print(res["rows"][-1], flush=True)
        if name in ("gate", "gate70"):
            up = ws[1]
            us = graph_time([lambda w=w: TritonOps.glu(x, w, up, out, x16=xp) for w in ws])
            res["rows"].append(dict(shape=name, path=path + "-glu", us=us, gb_s=2 * ws[0].nbytes / us / 1e3))
            print(res["rows"][-1], flush=True)
    del ws; torch.cuda.empty_cache()
os.environ.pop("HEAVYLIFT_GEMV4")
only(ALL)
res["elapsed_s"] = time.time() - t0
json.dump(res, open(sys.argv[1], "w"), indent=1)
