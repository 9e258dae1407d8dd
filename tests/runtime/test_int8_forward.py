"""bitsandbytes' LLM.int8 layers on transformers' forward (runtime/bnb_forward.py TiledLinear8bitLt), on the CPU
backend: a tile of weight rows at a time, bit for bit bitsandbytes' own Linear8bitLt forward, with and without
outlier columns, bias, fp16 or bf16, decode and prefill rows; training, gradients and fp16 weights keep
bitsandbytes' forward."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

import heavylift
import heavylift.runtime.bnb_forward as bnb_forward
from heavylift.planner.matmul_programs import int8_quant_rows, int8_tile_rows
from heavylift.runtime.bnb_forward import TiledLinear8bitLt, tile_int8_matmuls
from heavylift.runtime.bnb_load import quantize_int8_rows

from conftest import save_runnable_checkpoint

TILE_ROWS = 32
THRESHOLD = 6.0  # transformers' BitsAndBytesConfig llm_int8_threshold


@pytest.fixture
def tiled_calls(monkeypatch):
    """The rows of x of each call that took the tiles."""
    calls = []
    real = bnb_forward.int8_linear

    def spy(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args)

    monkeypatch.setattr(bnb_forward, "int8_linear", spy)
    return calls


def _layer(n: int, k: int, bias: bool, threshold: float = THRESHOLD, seed: int = 0) -> TiledLinear8bitLt:
    """A Linear8bitLt [n, k] as heavylift loads one (bnb_load.RowBlock8bitQuantize: int8 rows CB in the weight's
    data and its CB, fp32 row scales SCB, no fp16 weights), in eval mode, made tiled."""
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear8bitLt(k, n, bias=bias, has_fp16_weights=False, threshold=threshold)
    cb, scb = quantize_int8_rows((torch.randn(n, k, generator=g) * 0.05).bfloat16(), "cpu")
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=g).bfloat16(), requires_grad=False)
    model = torch.nn.Sequential(layer).eval()
    tile_int8_matmuls(model)
    return model[0]


def _input(shape: tuple, outliers: bool, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> torch.Tensor:
    """x with entries under the threshold, and where `outliers`, entries of 7 to 10 in a few columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).clamp(-3, 3)
    if outliers:
        cols = torch.tensor([2, 17, shape[-1] - 1])
        x[..., cols] = (7 + 3 * torch.rand(*shape[:-1], 3, generator=g)) * torch.sign(x[..., cols])
    return x.to(dtype)


def _bitsandbytes(layer: TiledLinear8bitLt, x: torch.Tensor) -> torch.Tensor:
    return bnb.nn.Linear8bitLt.forward(layer, x)


@pytest.mark.parametrize("n, k", [(100, 192), (48, 64), (7, 36)])
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (3, 5), (7,)])  # decode 1 and 2 sequences, a prefill, 2-d x
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quant_rows", [0, 2])  # x quantized whole, or 2 rows at a time (a prefill's last block 1)
def test_the_tiles_are_bitsandbytes_product_bit_for_bit(monkeypatch, tiled_calls, n, k, shape, outliers, bias,
                                                         quant_rows):
    monkeypatch.setattr("heavylift.planner.matmul_programs.TRANSFORMERS_TILE_BYTES", TILE_ROWS * k * 4)
    if quant_rows:
        monkeypatch.setattr("heavylift.planner.matmul_programs.LLM_INT8_QUANT_BYTES", quant_rows * k * 2)
    layer = _layer(n, k, bias)
    assert int8_tile_rows(n, k) == min(n, TILE_ROWS)  # 100 rows: 3 tiles of 32 and one of 4
    x = _input((*shape, k), outliers)
    with torch.inference_mode():
        tiled = layer(x)
        whole = _bitsandbytes(layer, x)
    assert tiled_calls == [x.numel() // k]
    assert tiled.shape == (*shape, n) and tiled.dtype == torch.bfloat16
    assert torch.equal(tiled, whole)
    _, _, cols = bnb.functional.int8_vectorwise_quant(x.reshape(-1, k).half(), threshold=THRESHOLD)
    assert cols.numel() == (3 if outliers else 0)


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_x_quantized_a_block_of_rows_at_a_time_is_bitsandbytes_quantize(monkeypatch, threshold):
    # Outliers in other columns on other rows, one in the last block of a single row: each block finds its own
    # columns, the union is every block's, and every row is zeroed in all of them, as one call over all rows does.
    monkeypatch.setattr("heavylift.planner.matmul_programs.LLM_INT8_QUANT_BYTES", 3 * 64 * 2)
    x = _input((10, 64), outliers=False).float()
    x[1, 5], x[4, 9], x[9, 63], x[8, 5] = 8.0, -7.5, 6.0, 9.0
    x = x.bfloat16()
    assert int8_quant_rows(10, 64) == 3
    with torch.inference_mode():
        rows, scales, cols = bnb_forward._int8_rows(x, threshold)
        whole_rows, whole_scales, whole_cols = bnb.functional.int8_vectorwise_quant(x.half(), threshold=threshold)
    assert torch.equal(rows, whole_rows) and torch.equal(scales, whole_scales)
    if threshold:
        assert torch.equal(cols, whole_cols) and cols.tolist() == [5, 9, 63]
    else:
        assert cols is None and whole_cols is None


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_fp16_inputs_and_no_threshold_are_bitsandbytes_too(monkeypatch, tiled_calls, threshold):
    # Threshold 0: no outlier decomposition (MatMul8bitLt's int8_scaled_mm), every column in int8.
    monkeypatch.setattr("heavylift.planner.matmul_programs.TRANSFORMERS_TILE_BYTES", TILE_ROWS * 192 * 4)
    layer = _layer(100, 192, bias=True, threshold=threshold)
    for dtype in (torch.float16, torch.bfloat16):
        x = _input((2, 9, 192), outliers=True, dtype=dtype)
        with torch.inference_mode():
            tiled = layer(x)
            whole = _bitsandbytes(layer, x)
        assert tiled.dtype == dtype and torch.equal(tiled, whole)
    assert tiled_calls == [18, 18]


def test_training_gradients_and_fp16_weights_keep_bitsandbytes_forward(monkeypatch, tiled_calls):
    layer = _layer(48, 64, bias=True)
    x = _input((4, 64), outliers=True)
    own = []  # the inputs bitsandbytes' own forward took (its CPU backend has no backward kernel to run here)
    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", lambda self, x: own.append(x) or x[..., :self.out_features])
    layer.train()  # bitsandbytes runs MatMul8bitFp on the CPU in training mode
    with torch.inference_mode():
        layer(x)
    layer.eval()
    wide = x.clone().requires_grad_()  # a step's input, whose gradient needs bitsandbytes' backward
    layer(wide)
    fp16 = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=True, threshold=THRESHOLD).eval()  # quantized per call
    tile_int8_matmuls(torch.nn.Sequential(fp16))
    with torch.inference_mode():
        fp16(x)
    assert tiled_calls == [] and [t.shape for t in own] == [(4, 64)] * 3


def test_the_layer_reads_its_loaded_rows():
    layer = _layer(48, 64, bias=False)
    rows, scales = layer.weight.CB, layer.weight.SCB
    with torch.inference_mode():
        layer(_input((3, 64), outliers=True))
    # As Linear8bitLt.forward: the rows and scales move to the layer's state at the first call, the weight's data
    # still the rows, no copy made.
    assert layer.state.CB is rows and layer.state.SCB is scales and layer.weight.data_ptr() == rows.data_ptr()


def test_a_transformers_session_tiles_every_int8_layer(tmp_path, tiled_calls):
    folder = save_runnable_checkpoint(tmp_path / "llama", "llama")
    session = heavylift.load(str(folder), quant="int8", context=64, engine="transformers")
    layers = [m for m in session.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # 2 layers of q k v o gate up down
    assert len(layers) == 2 * 7 and all(type(m) is TiledLinear8bitLt for m in layers)
    record = session.generate("hello world", max_new_tokens=3, temperature=0)
    assert record.generated_tokens == 3
    # The prefill, then two decode steps of one row: every linear of both layers each time.
    assert tiled_calls == [record.prompt_tokens] * 14 + [1] * 28
