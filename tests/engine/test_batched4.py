"""The batched decode kernel (engine/batched.py) in Triton's interpreter: every weight layout it reads, one to
three parts, bias, residual, the fused GLU over row views of one weight, split-K and SWAP, at 2 to 33 tokens,
against a float64 reference of the dequantized weights.

Triton's interpreter rounds float32 to bf16 toward zero (the GPU to nearest), so one bf16 rounding of the
output costs up to 2^-8 here; the bounds leave room for that and nothing like a wrong block scale, nibble
or row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heavylift.engine import batched as B
from heavylift.engine import ops
from heavylift.engine import weights as W
from heavylift.engine.ops import TorchOps, TritonOps

from conftest import compile_apart

pytestmark = pytest.mark.interpreter

# layout name -> (storage kind, 4-bit code table)
LAYOUTS = {"nf4": (W.NF4, "nf4"), "nf4-dq": (W.NF4_DQ, "nf4"), "fp4": (W.NF4, "fp4"), "fp4-dq": (W.NF4_DQ, "fp4"),
           "int8": (W.INT8, "nf4"), "fp8": (W.FP8, "nf4")}
ROWS = [2, 5, 16, 33]
K = 192  # three 64-weight blocks: the fixed 128-wide K step ends half way through the last one
LINEAR_BOUND = 8e-3
GLU_BOUND = 2e-2  # silu(g) * u: two projections, each rounded, then their product


def quantized(layout: str, n: int, k: int = K, bias: bool = False) -> W.QWeight:
    kind, code = LAYOUTS[layout]
    b = torch.randn(n).bfloat16() if bias else None
    return W.quantize(torch.randn(n, k) * 0.02, kind, bias=b, code=code)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "an output element was never written (still NaN)"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16)


def projection(x: torch.Tensor, w: W.QWeight) -> torch.Tensor:
    y = x.double() @ w.dequantize(torch.float64).T
    return y if w.bias is None else y + w.bias.double()


@pytest.fixture(autouse=True)
def _fresh_tile(monkeypatch):
    """Every test starts from the fixed tile and the interpreter's multiprocessor count, whatever another
    test changed."""
    monkeypatch.setattr(B, "FIXED", dict(B.FIXED))
    monkeypatch.setattr(B, "INTERPRET_SMS", B.INTERPRET_SMS)
    monkeypatch.setattr(B, "SLICE_PER_ROW", B.SLICE_PER_ROW)
    B._sm_count.cache_clear()
    yield
    B._sm_count.cache_clear()


@pytest.mark.parametrize("variant", ["scaled", "post"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parts,bias,residual", [(1, False, True), (2, True, False), (3, True, True)])
@pytest.mark.parametrize("rows", ROWS)
def test_linear_matches_float64(layout, parts, bias, residual, rows, variant, monkeypatch):
    monkeypatch.setenv(B.VARIANT_ENV, variant)
    weights = [quantized(layout, n, bias=bias) for n in (96, 32, 32)[:parts]]
    width = sum(w.n for w in weights)
    x = torch.randn(rows, K).bfloat16()
    res = torch.randn(rows, width).bfloat16() if residual else None
    ref = torch.cat([projection(x, w) for w in weights], dim=-1)
    if residual:
        ref = ref + res.double()
    assert rel_err(TritonOps.linear(x, weights, poisoned(rows, width), residual=res), ref) < LINEAR_BOUND


@pytest.mark.parametrize("variant", ["scaled", "post"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_glu_over_row_views_matches_float64(layout, rows, variant, monkeypatch):
    """Gate and up as halves of one fused weight (Phi-3's gate_up_proj): the up half's absmax starts mid-way
    through the fused weight's blocks (and its double quantization's groups)."""
    monkeypatch.setenv(B.VARIANT_ENV, variant)
    fused = quantized(layout, 128)
    gate, up = fused.rows(0, 64), fused.rows(64, 128)
    x = torch.randn(rows, K).bfloat16()
    full = fused.dequantize(torch.float64)
    ref = F.silu(x.double() @ full[:64].T) * (x.double() @ full[64:].T)
    assert rel_err(TritonOps.glu(x, gate, up, poisoned(rows, 64)), ref) < GLU_BOUND


@pytest.mark.parametrize("layout,variant", [("nf4-dq", "scaled"), ("nf4-dq", "post"), ("int8", "scaled")])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("sms", [1, 8])
def test_split_k_and_swap_sum_every_slice_and_leave_the_tickets_at_zero(layout, variant, swap, sms, monkeypatch):
    """128 rows (four 32-row tiles) over K = 640 (five 128-wide steps), slices of at least 8 x 16 rows: eight
    multiprocessors split each tile four ways, [0, 2), [2, 4), [4, 5) and an empty slice; one multiprocessor
    leaves it whole. Either way every slice is summed once and the tickets are back at zero for the next call."""
    monkeypatch.setenv(B.VARIANT_ENV, variant)
    B.FIXED["SWAP"] = swap
    B.INTERPRET_SMS = sms
    B.SLICE_PER_ROW = 8
    k = 640
    w = quantized(layout, 128, k, bias=True)
    gate, up = quantized(layout, 128, k), quantized(layout, 128, k)
    x = torch.randn(5, k).bfloat16()
    assert B.split_k(B.tiles([128], 32), k, 128, 16, x.device) == (4 if sms == 8 else 1)
    got = TritonOps.linear(x, [w], poisoned(5, 128))
    assert rel_err(got, projection(x, w)) < LINEAR_BOUND
    parts = [quantized(layout, n, k) for n in (96, 32, 32)]  # five tiles, three slices each: the tickets of
    res = torch.randn(5, 160).bfloat16()  # every part's tiles, their columns in the workspace and the output
    ref = torch.cat([projection(x, p) for p in parts], dim=-1) + res.double()
    assert rel_err(TritonOps.linear(x, parts, poisoned(5, 160), residual=res), ref) < LINEAR_BOUND
    act = TritonOps.glu(x, gate, up, poisoned(5, 128))
    assert rel_err(act, F.silu(projection(x, gate)) * projection(x, up)) < GLU_BOUND
    for _, tickets in B._SCRATCH.get(x.device, []):
        assert not tickets.any()
    assert torch.equal(TritonOps.linear(x, [w], poisoned(5, 128)), got)  # a second call: the same bits


def test_split_k_fills_the_multiprocessors_within_its_caps():
    cpu = torch.device("cpu")  # INTERPRET_SMS = 8: SPLITS_TARGET x 8 = 16 programs wanted
    assert B.split_k(4, 4096, 128, 16, cpu) == 4  # 4 tiles x 4 slices
    assert B.split_k(1, 4096, 128, 16, cpu) == 8  # SPLITS_MAX
    assert B.split_k(1, 4096, 128, 64, cpu) == 2  # slices of at least 32 x 64 of K
    assert B.split_k(1, 256, 128, 2, cpu) == 2  # two K steps
    assert B.split_k(40, 4096, 128, 16, cpu) == 1  # the tiles alone fill it


def test_the_glu_workspace_holds_gate_and_up_of_each_gate_tile_and_a_short_one_is_refused(monkeypatch):
    """Four 32-row gate tiles split four ways (K = 640, slices of at least 8 x 16): 4 slices x 16 rows x
    (128 gate + 128 up columns) floats and 4 tickets; handed less, the launch raises instead of writing past
    the workspace's end."""
    B.SLICE_PER_ROW = 8
    cpu = torch.device("cpu")
    assert B.scratch_sizes([128], 256, 640, 5, cpu) == (4 * 16 * 256, 4)
    gate, up = quantized("nf4", 128, 640), quantized("nf4", 128, 640)
    monkeypatch.setattr(B, "scratch", lambda device, work, tickets: (torch.empty(work - 1), torch.zeros(tickets)))
    with pytest.raises(RuntimeError, match="4-way split-K needs 16384 workspace floats"):
        TritonOps.glu(torch.randn(5, 640).bfloat16(), gate, up, poisoned(5, 128))


def test_steps_of_2_to_64_tokens_take_the_batched_kernel_and_65_the_dequantized_matmul(monkeypatch):
    calls = []
    monkeypatch.setattr(TorchOps, "linear", staticmethod(lambda x, parts, out, residual=None: calls.append(len(x))))
    w = quantized("nf4-dq", 32)
    for rows in (2, 64, 65):
        TritonOps.linear(torch.randn(rows, K).bfloat16(), [w], poisoned(rows, 32))
    assert calls == [65]
    assert ops._gemv_rows(quantized("int8", 32)) == ops._gemv_rows(quantized("fp8", 32)) == 64
    assert ops._gemv_rows(W.quantize(torch.randn(32, K), W.DENSE)) == 16


def test_scratch_grows_and_keeps_what_graphs_may_point_at():
    dev = torch.device("cpu")
    small = B.scratch(dev, 10, 3)
    assert B.scratch(dev, 5, 2) is small  # big enough: the same pair
    big = B.scratch(dev, small[0].numel() + 1, 3)
    assert big[0].numel() >= 2 * small[0].numel() and not big[1].any()
    assert B._SCRATCH[dev][-1] is big and any(pair is small for pair in B._SCRATCH[dev])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_scaled_pair_lookup_rounds_each_weight_as_the_interpreter_path_does(quant_type):
    """lut.scaled_pairs_program (the compiled kernel's decode), run step by step in Python for every byte value
    in every position of a packed word: each weight is bf16(bf16(code) * bf16(scale)), the three roundings the
    interpreter path spells out, and each byte's first weight comes from its high nibble."""
    import random

    import bitsandbytes.functional as bnbf

    from heavylift.engine import lut

    code = bnbf.get_4bit_type(quant_type, device="cpu").tolist()
    bf16 = lambda v: torch.tensor(v, dtype=torch.float32).bfloat16().item()  # noqa: E731
    rng = random.Random(7)
    for first in range(0, 256, 4):
        packed = bytes((first + i * 67) % 256 for i in range(4))
        scales = [rng.uniform(1e-3, 2.0) for _ in range(4)]
        want = [bf16(bf16(code[n]) * bf16(s)) for byte, s in zip(packed, scales) for n in (byte >> 4, byte & 15)]
        assert lut.emulate_scaled_pairs(code, int.from_bytes(packed, "little"), scales) == want


def test_scaled_pair_ptx_reads_its_operands_where_the_kernel_passes_them():
    """Four bf16 pair outputs ($0-$3), the packed word ($4), two scale pairs ($5, $6), then the eight table words
    as the first of each group of four operands (pack=4 of int32 tensors: $7, $11, ... $35)."""
    import re

    from heavylift.engine import lut

    ptx = lut.scaled_pairs_ptx()
    used = {int(n) for n in re.findall(r"\$(\d+)", ptx)}
    assert used == set(range(7)) | {7 + 4 * j for j in range(8)}
    assert ptx.count("fma.rn.bf16x2") == 4


def test_the_wgmma_variant_runs_scaled_where_its_kernels_do_not_and_a_bad_variant_is_refused(monkeypatch):
    """On a CPU (no Hopper) the "wgmma" variant takes the Triton kernel that scales each weight: the same bits as
    "scaled", and not those of "post". An unknown variant names the valid ones."""
    from heavylift.errors import InvalidArgumentError

    w = quantized("nf4-dq", 64)
    x = torch.randn(5, K).bfloat16()
    got = {}
    for variant in B.VARIANTS:
        monkeypatch.setenv(B.VARIANT_ENV, variant)
        got[variant] = TritonOps.linear(x, [w], poisoned(5, 64))
    assert torch.equal(got["scaled"], got["wgmma"]) and not torch.equal(got["scaled"], got["post"])
    monkeypatch.setenv(B.VARIANT_ENV, "fast")
    with pytest.raises(InvalidArgumentError, match=r"^HEAVYLIFT_BATCHED4='fast' is not a batched 4-bit variant; "
                                                   r"set it to one of scaled, post, wgmma or unset it$"):
        TritonOps.linear(x, [w], poisoned(5, 64))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_pair_lookup_gives_each_weights_code_in_bf16(quant_type):
    """lut.pairs_program (the post variant's decode) for every byte value in every position of a packed word: each
    weight is bf16(code), the first of each byte from its high nibble."""
    import bitsandbytes.functional as bnbf

    from heavylift.engine import lut

    code = bnbf.get_4bit_type(quant_type, device="cpu").tolist()
    bf16 = lambda v: torch.tensor(v, dtype=torch.float32).bfloat16().item()  # noqa: E731
    for first in range(0, 256, 4):
        packed = bytes((first + i * 67) % 256 for i in range(4))
        want = [bf16(code[n]) for byte in packed for n in (byte >> 4, byte & 15)]
        assert lut.emulate_pairs(code, int.from_bytes(packed, "little")) == want


@pytest.mark.parametrize("scaled", [False, True])
def test_shared_table_lookup_reads_the_lanes_copy_of_each_bytes_pair(scaled):
    """lut.smem_pairs_program (wgmma4's decode) as lanes 0, 5 and 31 run it, every byte value in every position:
    bf16(code) per weight, or bf16(bf16(code) * bf16(scale)) with the scale; the PTX reads its operands where
    the kernel passes them ($0-$3 out, $4 word, $5 lane column, $6 scale pair)."""
    import random
    import re

    import bitsandbytes.functional as bnbf

    from heavylift.engine import lut

    code = bnbf.get_4bit_type("nf4", device="cpu").tolist()
    bf16 = lambda v: torch.tensor(v, dtype=torch.float32).bfloat16().item()  # noqa: E731
    rng = random.Random(5)
    for first in range(0, 256, 4):
        packed = bytes((first + i * 67) % 256 for i in range(4))
        scale = rng.uniform(1e-3, 2.0) if scaled else None
        want = [bf16(code[n]) if scale is None else bf16(bf16(code[n]) * bf16(scale))
                for byte in packed for n in (byte >> 4, byte & 15)]
        for lane in (0, 5, 31):
            assert lut.emulate_smem_pairs(code, int.from_bytes(packed, "little"), lane, scale) == want
    used = {int(n) for n in re.findall(r"\$(\d+)", lut.smem_pairs_ptx(scaled))}
    assert used == set(range(6)) | ({6} if scaled else set())


def test_wgmma_k_order_gives_each_lane_eight_contiguous_bytes():
    """wgmma4.k_order: a permutation of a block's 64 weights that keeps each byte's two weights together; lane t
    of a row (wgmma's pairs 2t and 2t + 8 of each 16-wide step) holds exactly packed bytes 8t .. 8t + 7."""
    from heavylift.engine.wgmma4 import k_order

    order = [k_order(kl) for kl in range(64)]
    assert sorted(order) == list(range(64))
    assert all(order[kl + 1] == order[kl] + 1 and order[kl] % 2 == 0 for kl in range(0, 64, 2))
    for t in range(4):
        held = {order[16 * s + 8 * h + 2 * t] // 2 for s in range(4) for h in range(2)}
        assert held == set(range(8 * t, 8 * t + 8))


def test_wgmma_kernels_compile_for_sm90_with_the_weights_never_in_shared_memory(tmp_path):
    """wgmma4's kernels compiled for sm_90 without a GPU (the layout conversions into wgmma's operand are asserted
    free at compile time): in the main loop one ld.shared per packed byte (the table lookup) and no ldmatrix,
    so the looked-up weights go from registers to the tensor cores. In a process of its own without Triton's
    interpreter (which this suite runs under, and whose patches of the language a kernel run before may leave in
    place) and with an empty Triton cache, so that the kernels are compiled, never read from a cache."""
    code = ("import json; from batched_sass import compile_wgmma4; "
            "print(json.dumps([compile_wgmma4(form, bm) for form, bm in (('linear', 16), ('glu', 64))]))")
    for rec in compile_apart(code, tmp_path):
        assert rec["loop_ops"]["LDS"] == rec["bytes_per_thread"], rec
        assert rec["smem_round_trip"]["LDSM"] == 0 and rec["regs"] <= 255, rec


def test_fp8_row_kernels_compile_for_sm90_at_every_autotuner_tile(tmp_path):
    """FP8 rows widen to bf16 (cvt from e4m3 pairs) in batched.py's kernels compiled for sm_90, at every tile the
    autotuner may pick, in at most 6 SASS instructions a weight byte in the main loop (LLM.int8's kernels,
    which read the same bytes, take 3.4 to 8.2); in a process of its own, as above."""
    code = ("import json; from batched_sass import compile_rows; from heavylift.engine.batched import CONFIGS; "
            "print(json.dumps([compile_rows(f, m, 'fp8', c) for f in ('glu', 'linear') for m in (16, 64) "
            "for c in CONFIGS]))")
    records = compile_apart(code, tmp_path)
    assert len(records) == 16 and all(r["instructions_per_byte"] <= 6 and r["regs"] <= 255 for r in records), records


def test_unset_steps_of_up_to_sixteen_tokens_take_wgmma_and_longer_ones_scaled(monkeypatch):
    monkeypatch.delenv(B.VARIANT_ENV, raising=False)
    assert [B.variant(rows) for rows in (2, B.WGMMA_MAX_ROWS, B.WGMMA_MAX_ROWS + 1, 64)] == \
        ["wgmma", "wgmma", "scaled", "scaled"]
    monkeypatch.setenv(B.VARIANT_ENV, "post")
    assert B.variant(2) == B.variant(64) == "post"
