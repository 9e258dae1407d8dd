"""The prefill matmul on stored weights (ops.dense_linear), a tile of weight rows at a time, on the CPU: the tiles
are exactly the whole weight's rows, and the product is the whole weight's to within one bf16 rounding."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from heavylift.engine import weights as W
from heavylift.engine.ops import _tile_writer, block_absmax, dense_linear, dense_linear_mul
from heavylift.planner.matmul_programs import dequant_tile_rows

STORED = [W.FP8, W.INT8, W.NF4, W.NF4_DQ]  # FP8 too: a CPU has no FP8 tensor cores, so FP8 dequantizes
N, K = 100, 192  # 100 rows in tiles of 24 (TILE_ROWS), the last one 4 rows; 192 = 3 4-bit blocks a row
TILE_ROWS = 24


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr("heavylift.planner.matmul_programs.DEQUANT_TILE_BYTES", TILE_ROWS * K * 2)


def _weight(kind: int, n: int = N, k: int = K, bias: bool = False) -> W.QWeight:
    g = torch.Generator().manual_seed(kind)
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return W.quantize(torch.randn(n, k, generator=g) * 0.02, kind, bias=b)


def _tiles(w: W.QWeight) -> torch.Tensor:
    step = dequant_tile_rows(w.n, w.k)
    write, out = _tile_writer(w), []
    for start in range(0, w.n, step):
        tile = torch.full((min(step, w.n - start), w.k), float("nan"), dtype=torch.bfloat16)
        write(start, start + tile.shape[0], tile)
        out.append(tile)
    return torch.cat(out)


@pytest.mark.parametrize("kind", STORED, ids=lambda k: W.KIND_NAMES[k])
def test_tiles_are_the_whole_weights_rows_bit_for_bit(small_tiles, kind):
    w = _weight(kind)
    assert dequant_tile_rows(w.n, w.k) == TILE_ROWS
    tiles = _tiles(w)
    assert torch.equal(tiles, w.dequantize(torch.bfloat16))
    if w.packed:  # and bitsandbytes' own dequantize of the whole weight
        assert torch.equal(tiles, bnbf.dequantize_4bit(w.data.view(-1, 1), w.state))


def test_a_tiles_absmax_is_the_whole_weights_bit_for_bit():
    # 1000 x 192: 3000 4-bit blocks, whose 8-bit absmax is quantized in nested blocks of 256 (the last 184):
    # ranges inside one nested block, across several, on their edges and up to the last block.
    w = _weight(W.NF4_DQ, n=1000)
    whole = bnbf.dequantize_blockwise(w.state.absmax, w.state.state2) + w.state.offset
    for first, last in [(0, 72), (72, 144), (250, 770), (256, 512), (2816, 3000), (0, 3000), (2999, 3000)]:
        assert torch.equal(block_absmax(w.state, first, last), whole[first:last])


def test_4bit_tiles_start_on_whole_blocks(monkeypatch):
    # k = 96: a row is 1.5 blocks of 64, so tiles hold an even number of rows; 7 rows of bf16 ask for 6.
    monkeypatch.setattr("heavylift.planner.matmul_programs.DEQUANT_TILE_BYTES", 7 * 96 * 2)
    w = _weight(W.NF4_DQ, n=40, k=96)
    assert dequant_tile_rows(w.n, w.k) == 6
    assert torch.equal(_tiles(w), w.dequantize(torch.bfloat16))


@pytest.mark.parametrize("kind", STORED, ids=lambda k: W.KIND_NAMES[k])
@pytest.mark.parametrize("bias", [False, True])
def test_the_tiled_product_is_the_whole_weights_within_one_bf16_rounding(small_tiles, kind, bias):
    # Each output element is the same k bf16 products summed in fp32 either way; a different GEMM kernel
    # may sum them in another order, which moves the fp32 sum by a few fp32 ulps and so the bf16 result by at
    # most one bf16 ulp (2^-7 of its magnitude, 2^-8 rounded to nearest on either side). Elements near zero
    # after cancellation get an absolute margin of one bf16 ulp at the output's scale.
    w = _weight(kind, bias=bias)
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(7)).bfloat16()
    whole = F.linear(x, w.dequantize(torch.bfloat16), w.bias)
    tiled = dense_linear(x, w)
    assert tiled.shape == (3, 5, N) and tiled.dtype == torch.bfloat16
    scale = whole.float().abs().max().item()
    assert torch.allclose(tiled.float(), whole.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_one_tile_when_the_weight_is_smaller_than_a_tile():
    w = _weight(W.INT8)
    assert dequant_tile_rows(w.n, w.k) == N
    x = torch.randn(4, K).bfloat16()
    assert torch.equal(dense_linear(x, w), F.linear(x, w.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("kind", STORED + [W.DENSE], ids=lambda k: W.KIND_NAMES[k])
@pytest.mark.parametrize("bias", [False, True])
def test_each_tiles_product_multiplied_into_its_columns_is_the_whole_product_multiplied_in(small_tiles, kind, bias):
    # dense_linear_mul (the MLP's up projection times SiLU of the gate's): the same tile products as dense_linear,
    # each in a buffer of one tile's columns (the last tile of 4 rows in part of it), multiplied into `into`.
    w = _weight(kind, bias=bias)
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(8)).bfloat16()
    into = torch.randn(6, N, generator=torch.Generator().manual_seed(9)).bfloat16()
    want = into * dense_linear(x, w)
    got = dense_linear_mul(x, w, into)
    assert got is into and torch.equal(into, want)
