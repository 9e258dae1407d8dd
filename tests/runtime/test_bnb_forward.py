"""bitsandbytes' 4-bit layers on transformers' forward (runtime/bnb_forward.py), on the CPU backend: more rows than
its fused kernel takes go a weight tile at a time, to within one bf16 rounding of bitsandbytes' own product; fewer
keep bitsandbytes' forward; the layer reads its loaded storage, never a copy."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

import heavylift
import heavylift.runtime.bnb_forward as bnb_forward
from heavylift.planner.matmul_programs import BNB_4BIT_FUSED_MAX_ROWS, bnb_4bit_fused, dequant_tile_rows, \
    transformers_tile_bytes
from heavylift.runtime.bnb_forward import TiledLinear4bit, tile_4bit_matmuls

from conftest import save_runnable_checkpoint

N, K = 100, 192  # 100 output rows in tiles of 24, the last 4 rows; 192 = 3 blocks of 64 a row
TILE_ROWS = 24
SCHEMES = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False)}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr("heavylift.planner.matmul_programs.TRANSFORMERS_TILE_BYTES", TILE_ROWS * K * 2)


@pytest.fixture
def tiled_calls(monkeypatch):
    """The calls that took the tiles: (rows of x, the weight view) per call."""
    calls = []
    real = bnb_forward.dense_linear

    def spy(x, w, out=None, tile_bytes=None):
        calls.append((x.numel() // x.shape[-1], w))
        return real(x, w, out=out, tile_bytes=tile_bytes)

    monkeypatch.setattr(bnb_forward, "dense_linear", spy)
    return calls


def _layer(quant: str, bias: bool, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Sequential:
    """A model of one Linear4bit [N, K] quantized on the CPU, as transformers loads one, made tiled."""
    code, double_quant = SCHEMES[quant]
    g = torch.Generator().manual_seed(len(quant) + bias)
    layer = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, compress_statistics=double_quant, quant_type=code)
    layer.weight = bnb.nn.Params4bit((torch.randn(N, K, generator=g) * 0.02).to(dtype), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=code)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(N, generator=g).to(dtype), requires_grad=False)
    model = torch.nn.Sequential(layer.to("cpu"))
    tile_4bit_matmuls(model)
    return model


def _bitsandbytes(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own Linear4bit.forward on the layer: on the CPU the whole weight dequantized, then F.linear,
    as its GPU dispatch does beyond its fused kernel."""
    return bnb.nn.Linear4bit.forward(layer, x)


@pytest.mark.parametrize("quant", sorted(SCHEMES))
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_take_the_tiles_within_one_bf16_rounding_of_bitsandbytes(small_tiles, tiled_calls, quant, bias):
    # As tests/engine/test_tiled_linear.py: the tiles are bitsandbytes' dequantized rows bit for bit, and a GEMM
    # on a tile may sum each output's k products in another order, moving a bf16 result by one ulp at most
    # (2^-7 of its magnitude; an absolute margin of one ulp at the output's scale for elements near zero).
    layer = _layer(quant, bias)[0]
    assert isinstance(layer, TiledLinear4bit) and dequant_tile_rows(N, K, transformers_tile_bytes()) == TILE_ROWS
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.inference_mode():
        tiled, whole = layer(x), _bitsandbytes(layer, x)
    assert [rows for rows, _ in tiled_calls] == [15]
    assert tiled.shape == (3, 5, N) and tiled.dtype == torch.bfloat16
    scale = whole.float().abs().max().item()
    assert torch.allclose(tiled.float(), whole.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_fp16_compute_tiles_in_fp16(small_tiles, tiled_calls):
    layer = _layer("nf4-dq", True, torch.float16)[0]
    x = torch.randn(2, 8, K, generator=torch.Generator().manual_seed(3)).half()
    with torch.inference_mode():
        tiled, whole = layer(x), _bitsandbytes(layer, x)
    assert len(tiled_calls) == 1 and tiled.dtype == torch.float16
    scale = whole.float().abs().max().item()
    assert torch.allclose(tiled.float(), whole.float(), rtol=2 ** -10, atol=2 ** -10 * scale)


def test_few_rows_and_gradients_keep_bitsandbytes_forward(tiled_calls):
    layer = _layer("nf4-dq", True)[0]
    x = torch.randn(1, BNB_4BIT_FUSED_MAX_ROWS, K, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.inference_mode():
        assert torch.equal(layer(x), _bitsandbytes(layer, x))
    wide = torch.randn(16, K).bfloat16().requires_grad_()  # a training step's input: its backward needs MatMul4Bit
    layer(wide).sum().backward()
    assert tiled_calls == [] and wide.grad is not None


def test_the_layer_reads_its_loaded_storage():
    layer = _layer("nf4-dq", True)[0]
    state = layer.weight.quant_state
    stored = layer.stored
    assert stored.data.data_ptr() == layer.weight.data_ptr()
    assert stored.scale.data_ptr() == state.absmax.data_ptr()
    assert stored.absmax2.data_ptr() == state.state2.absmax.data_ptr()
    assert stored.bias.data_ptr() == layer.bias.data_ptr()
    # The CPU repack for AVX512-BF16 kernels, which the tiles cannot read, stays off after a forward of few rows.
    with torch.inference_mode():
        layer(torch.randn(1, K).bfloat16())
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.data_ptr() == stored.data.data_ptr()


def test_a_replaced_weight_is_the_one_the_tiles_read(small_tiles, tiled_calls):
    # peft's merge_and_unload gives a layer a new Params4bit: the tiles must multiply by it, as bitsandbytes'
    # few-row path does, not by a view of the weight the layer loaded with.
    layer = _layer("nf4-dq", True)[0]
    before = layer.stored
    merged = (torch.randn(N, K, generator=torch.Generator().manual_seed(11)) * 0.02).bfloat16()
    layer.weight = bnb.nn.Params4bit(merged, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cpu")
    assert layer.stored is not before and layer.stored.data.data_ptr() == layer.weight.data_ptr()
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(12)).bfloat16()
    with torch.inference_mode():
        tiled, whole = layer(x), _bitsandbytes(layer, x)
    assert len(tiled_calls) == 1
    scale = whole.float().abs().max().item()
    assert torch.allclose(tiled.float(), whole.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_fused_rows_are_bitsandbytes_own():
    # bitsandbytes 0.50's CUDA dispatch (backends/cuda/ops.py): up to _GEMM_4BIT_CUSTOM_FLOOR_M rows always take
    # its fused kernel; the plan and the runtime read that bound from BNB_4BIT_FUSED_MAX_ROWS.
    source = Path(importlib.util.find_spec("bitsandbytes").submodule_search_locations[0]) / "backends/cuda/ops.py"
    floor = re.search(r"^_GEMM_4BIT_CUSTOM_FLOOR_M = (\d+)$", source.read_text(), re.MULTILINE)
    assert floor is not None and int(floor.group(1)) == BNB_4BIT_FUSED_MAX_ROWS == 4
    assert bnb_4bit_fused(4, 4096) and not bnb_4bit_fused(5, 4096)
    assert not bnb_4bit_fused(1, 96)  # an inner dimension of partial blocks: bitsandbytes dequantizes


def test_a_transformers_session_tiles_every_4bit_layer(tmp_path, tiled_calls):
    folder = save_runnable_checkpoint(tmp_path / "llama", "llama")
    session = heavylift.load(str(folder), quant="nf4-dq", context=64, engine="transformers")
    layers = [m for m in session.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(type(m) is TiledLinear4bit for m in layers)  # 2 layers of q k v o gate up down
    record = session.generate("hello world", max_new_tokens=3, temperature=0)
    assert record.generated_tokens == 3
    prompt = record.prompt_tokens
    # The prefill only: q k v o gate down of 2 layers (each MLP multiplies its up projection into the gate's output
    # through ops.dense_linear_mul: runtime/mlp_forward.py).
    assert {rows for rows, _ in tiled_calls} == {prompt} and len(tiled_calls) == 2 * 6
    fast = heavylift.load(str(folder), quant="nf4-dq", context=64, engine="fast")
    assert not any(isinstance(m, TiledLinear4bit) for m in fast.model.modules())
