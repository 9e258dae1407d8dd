"""FP8 rows on GPUs whose Triton has no e4m3 type (before sm_89: the A100, the RTX 3090): the kernels are handed
the rows as bytes and widen them with integer operations (kernels.widened). In Triton's interpreter, forced onto
that path: every byte widens to the value torch's float8_e4m3fn holds, and the one-token, few-token and GLU
kernels give the e4m3 path's output bit for bit; compiled for sm_80 and sm_86 without a GPU, no kernel argument
is an FP8 pointer."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from heavylift.engine import ops
from heavylift.engine import weights as W
from heavylift.engine.kernels import widened
from heavylift.engine.ops import TritonOps

from conftest import compile_apart

pytestmark = pytest.mark.interpreter


@triton.jit
def _widen_all(src, dst, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dst + i, widened(tl.load(src + i)).to(tl.float32))


def test_every_byte_widens_to_the_e4m3_value_it_holds():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = torch.empty(256)
    _widen_all[(1,)](codes, got, N=256)
    want = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert nan.sum() == 2 and torch.equal(got[~nan], want[~nan])  # 0x7f and 0xff: e4m3's NaN codes
    assert got[0x7F] == 480 and got[0xFF] == -480
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # -0.0 at 0x80 too


@pytest.fixture
def as_bytes(monkeypatch):
    monkeypatch.setattr(ops, "e4m3_loads", lambda device: False)


@pytest.mark.parametrize("rows", [1, 5])
def test_linear_from_bytes_is_the_e4m3_paths_output(rows, monkeypatch):
    parts = [W.quantize(torch.randn(n, 256) * 0.02, W.FP8, bias=torch.randn(n).bfloat16()) for n in (96, 32, 32)]
    x = torch.randn(rows, 256).bfloat16()
    residual = torch.randn(rows, 160).bfloat16()
    native = TritonOps.linear(x, parts, torch.empty(rows, 160, dtype=torch.bfloat16), residual=residual)
    monkeypatch.setattr(ops, "e4m3_loads", lambda device: False)
    assert ops._weight_args(parts[0])[0].dtype == torch.uint8
    from_bytes = TritonOps.linear(x, parts, torch.empty(rows, 160, dtype=torch.bfloat16), residual=residual)
    assert torch.equal(from_bytes, native)


@pytest.mark.parametrize("rows", [1, 3])
def test_glu_from_bytes_is_the_e4m3_paths_output(rows, monkeypatch):
    fused = W.quantize(torch.randn(128, 192) * 0.02, W.FP8)
    gate, up = fused.rows(0, 64), fused.rows(64, 128)
    x = torch.randn(rows, 192).bfloat16()
    native = TritonOps.glu(x, gate, up, torch.empty(rows, 64, dtype=torch.bfloat16))
    monkeypatch.setattr(ops, "e4m3_loads", lambda device: False)
    assert torch.equal(TritonOps.glu(x, gate, up, torch.empty(rows, 64, dtype=torch.bfloat16)), native)


_COMPILE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batched_sass import _signature
from heavylift.engine import kernels as K
from heavylift.engine.weights import FP8
done = []
for cap in (80, 86):
    for fn, form in ((K._linear_kernel, "linear"), (K._glu_kernel, "glu")):
        for bm in (1, 16):
            const = dict(KIND=FP8, LUT=False, BLOCK_M=bm, BLOCK_N=32, NB=2, EVEN_K=True)
            if form == "linear":
                const |= dict(PARTS=3, HAS_BIAS=True, HAS_RES=True)
            sig, attrs = _signature(fn, const, dq=False)  # the weights as bytes, as ops._kernel_rows hands them
            triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                           options=dict(num_warps=4))
            done.append([cap, form, bm])
print(json.dumps(done))
"""


def test_the_fp8_kernels_compile_for_ampere_from_bytes(tmp_path):
    assert len(compile_apart(_COMPILE, tmp_path)) == 8
