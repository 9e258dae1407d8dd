"""heavylift's torch block-FP8 matmuls answer transformers 5.24's finegrained-fp8 calls: each output is the
float64 product with the dequantized weight to within bf16 rounding, tile by tile and across partial edge blocks,
and transformers' own FP8Linear and experts forwards reach them once they are installed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from transformers.integrations import finegrained_fp8
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from heavylift.runtime import block_fp8_matmul as fallback
from heavylift.runtime.block_fp8 import partial_blocks_dequantized

BLOCK = (64, 64)
BF16_UNIT = 2.0 ** -8  # bf16 keeps 8 significant bits: a rounding moves a value by at most half of this, relative


def _stored(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 codes [rows, cols] and positive float32 scales, one per BLOCK (edge blocks partial)."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, cols, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]), generator=g) * 0.01 + 0.001
    return codes, scales


def _float64(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dequantized weight in float64: each code times its block's scale."""
    rows, cols = codes.shape
    grid = scales.double().repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
    return codes.double() * grid


def _assert_within_bf16(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> None:
    """y against x @ w64.T in float64: the weight rounded to bf16 and the output rounded to bf16 move each
    output by at most half a bf16 unit of sum(|x| |w|) each (the float32 accumulation by far less)."""
    ref = x.double() @ w64.T
    bound = BF16_UNIT * (x.double().abs() @ w64.abs().T) * 1.001
    assert y.dtype == x.dtype
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_the_dequantized_tile_is_a_bf16_loads_weight_bit_for_bit():
    """Rows 64-191 of a [200, 160] weight (its row blocks 1-2; its last column block 32 wide) dequantize to what a
    bf16 load of the whole weight holds in those rows (Fp8Dequantize, partial edge blocks padded)."""
    codes, scales = _stored(200, 160, 0)
    with partial_blocks_dequantized(BLOCK):
        loaded = Fp8Dequantize(None)._dequantize_one(codes, scales, output_dtype=torch.bfloat16)
    tile = fallback.dequantized_rows(codes, scales, BLOCK, 64, 192, torch.bfloat16)
    assert tile.shape == (128, 160) and torch.equal(tile, loaded[64:192])
    last = fallback.dequantized_rows(codes, scales, BLOCK, 192, 200, torch.bfloat16)  # a partial row block
    assert torch.equal(last, loaded[192:])


def test_matmul_is_the_float64_product_tile_by_tile(monkeypatch):
    """A [200, 160] weight in tiles of 64 rows (the tile bound lowered to one row block of the padded 192-wide
    staging): four tiles, the last 8 rows of a partial block; a 3-D input comes back 3-D."""
    monkeypatch.setattr("heavylift.model.prequantized.BLOCK_FP8_TILE_WEIGHTS", 64 * 192)
    codes, scales = _stored(200, 160, 1)
    x = torch.randn(2, 3, 160, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = fallback.matmul(x, codes, scales, list(BLOCK), torch.bfloat16)
    assert y.shape == (2, 3, 200)
    _assert_within_bf16(y.reshape(6, 200), x.reshape(6, 160), _float64(codes, scales))


def test_grouped_matmul_multiplies_each_experts_rows_and_zeroes_the_rows_past_the_last():
    """Three experts, the second reached by no row; rows 5 and 6 lie past offsets[-1] (expert parallelism's
    sentinels), which come back zero."""
    stored = [_stored(128, 96, 10 + e) for e in range(3)]
    weight, scales = torch.stack([c for c, _ in stored]), torch.stack([s for _, s in stored])
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    offsets = torch.tensor([3, 3, 5], dtype=torch.int32)
    y = fallback.grouped_matmul(x, weight, scales, offsets=offsets, tokens_per_expert=torch.tensor([3, 0, 2]),
                                block_size=list(BLOCK))
    assert y.shape == (7, 128) and y.dtype == torch.bfloat16
    _assert_within_bf16(y[:3], x[:3], _float64(*stored[0]))
    _assert_within_bf16(y[3:5], x[3:5], _float64(*stored[2]))
    assert torch.equal(y[5:], torch.zeros(2, 128, dtype=torch.bfloat16))


def test_batched_matmul_multiplies_each_row_by_its_expert():
    stored = [_stored(64, 128, 20 + e) for e in range(2)]
    weight, scales = torch.stack([c for c, _ in stored]), torch.stack([s for _, s in stored])
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ids = torch.tensor([1, 0, 2, 1])  # 2: a sentinel, past the experts
    y = fallback.batched_matmul(x, weight, scales, block_size=list(BLOCK), expert_ids=ids)
    for row, expert in ((0, 1), (1, 0), (3, 1)):
        _assert_within_bf16(y[row:row + 1], x[row:row + 1], _float64(*stored[expert]))
    assert torch.equal(y[2], torch.zeros(64, dtype=torch.bfloat16))


@pytest.fixture
def installed(monkeypatch):
    """heavylift's matmuls in transformers' module global, as on a machine without the kernel (the global
    restored afterwards)."""
    monkeypatch.setattr(finegrained_fp8, "_FINEGRAINED_FP8", None)
    assert fallback.install(native_fp8=False) == "its Triton kernel needs GPUs of compute capability 8.9 or later"
    assert finegrained_fp8.load_finegrained_fp8_kernel().matmul is fallback.matmul


def test_transformers_fp8_linear_runs_them(installed):
    codes, scales = _stored(96, 128, 30)
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = finegrained_fp8.fp8_linear(x, codes, scales, list(BLOCK))
    _assert_within_bf16(y.reshape(5, 96), x.reshape(5, 128), _float64(codes, scales))


def _experts(num_experts: int, hidden: int, inner: int) -> SimpleNamespace:
    """What transformers' FP8 experts forwards read of an FP8Experts module, gated, in BLOCK blocks."""
    ups = [_stored(2 * inner, hidden, 40 + e) for e in range(num_experts)]
    downs = [_stored(hidden, inner, 50 + e) for e in range(num_experts)]
    act = torch.nn.functional.silu
    return SimpleNamespace(
        activation_scheme="dynamic", num_experts=num_experts, _is_expert_parallel=False, has_gate=True,
        block_size=list(BLOCK), act_fn=act, _apply_gate=lambda gu: act(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1],
        gate_up_proj=torch.stack([c for c, _ in ups]), gate_up_proj_scale_inv=torch.stack([s for _, s in ups]),
        down_proj=torch.stack([c for c, _ in downs]), down_proj_scale_inv=torch.stack([s for _, s in downs]),
        float64=[(_float64(*u), _float64(*d)) for u, d in zip(ups, downs)])


def test_transformers_grouped_and_batched_experts_forwards_run_them(installed):
    """fp8_grouped_mm_experts_forward (transformers' default experts) and fp8_batched_mm_experts_forward give
    the float64 mixture of experts to within a few bf16 roundings of its intermediates."""
    experts = _experts(4, 128, 64)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    top_k = torch.tensor([[0, 2], [2, 3], [0, 3], [2, 0], [3, 2]])  # expert 1 is chosen by no token
    weights = torch.rand(5, 2, generator=g)
    ref = torch.zeros(5, 128, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            up, down = experts.float64[top_k[t, j]]
            gate, lin = (x[t].double() @ up.T).chunk(2)
            ref[t] += weights[t, j].double() * ((torch.nn.functional.silu(gate) * lin) @ down.T)
    grouped = finegrained_fp8.fp8_grouped_mm_experts_forward(experts, x, top_k, weights)
    batched = finegrained_fp8.fp8_batched_mm_experts_forward(experts, x, top_k, weights)
    for y in (grouped, batched):
        assert y.shape == (5, 128) and y.dtype == torch.bfloat16
        assert (y.double() - ref).abs().max() <= 8 * BF16_UNIT * ref.abs().max()


def test_the_kernel_is_kept_where_it_loads_and_replaced_where_it_fails(monkeypatch):
    kernel = finegrained_fp8.FineGrainedFP8(matmul=len, batched_matmul=len, grouped_matmul=len)

    def loads():
        finegrained_fp8._FINEGRAINED_FP8 = kernel
        return kernel

    def fails():
        raise ImportError("finegrained-fp8 kernel unavailable: no Hub")

    monkeypatch.setattr(finegrained_fp8, "_FINEGRAINED_FP8", None)
    monkeypatch.setattr(finegrained_fp8, "load_finegrained_fp8_kernel", loads)
    assert fallback.install(native_fp8=True) is None and finegrained_fp8._FINEGRAINED_FP8 is kernel
    monkeypatch.setattr(finegrained_fp8, "_FINEGRAINED_FP8", None)
    monkeypatch.setattr(finegrained_fp8, "load_finegrained_fp8_kernel", fails)
    assert fallback.install(native_fp8=True) == ("the finegrained-fp8 kernel does not load (ImportError: "
                                                 "finegrained-fp8 kernel unavailable: no Hub)")
    assert finegrained_fp8._FINEGRAINED_FP8.grouped_matmul is fallback.grouped_matmul


def test_a_block_size_that_is_not_a_pair_or_a_scale_grid_that_does_not_match_is_refused():
    codes, scales = _stored(128, 128, 60)
    x = torch.ones(1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="take a \\[rows, columns\\] block size, not None"):
        fallback.matmul(x, codes, scales, None)
    with pytest.raises(ValueError, match=r"in blocks of \(32, 32\) has a \(4, 4\) scale grid, not \(2, 2\)"):
        fallback.matmul(x, codes, scales, [32, 32])
