"""bitsandbytes quantization on load a block of rows at a time (runtime/bnb_load.py): every stored byte equals
what bitsandbytes' whole-tensor quantization gives, and a load through transformers uses it."""

from __future__ import annotations

from math import gcd

import pytest
import torch
import transformers.core_model_loading as hf_loading
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

from conftest import run_cli, save_runnable_checkpoint

import heavylift.runtime.bnb_load as bnb_load
from heavylift.planner.load_program import load_row_step


def _weight(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(torch.bfloat16)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("rows,k", [(96, 160), (1000, 96), (37, 64), (130, 200)])
def test_4bit_rows_equal_the_whole_tensor(monkeypatch, quant_type, double_quant, rows, k):
    # 200 columns: a block of 8 rows holds 1600 = 25 x 64 weights; 37 x 64 leaves a last block of 5 rows.
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr("heavylift.planner.load_program.LOAD_ROW_CHUNK_ELEMENTS", 1024)
    w = _weight(rows, k, rows + k)
    packed, state = bnb_load.quantize_4bit_rows(w, "cpu", quant_type, double_quant)
    whole, expected = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    assert load_row_step(rows, k, 64 // gcd(k, 64)) < rows  # more than one block of rows
    assert torch.equal(packed, whole)
    assert torch.equal(state.absmax, expected.absmax) and torch.equal(state.code, expected.code)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == \
        (expected.shape, expected.dtype, expected.blocksize, expected.quant_type)
    assert state.nested == expected.nested == double_quant
    if double_quant:
        assert torch.equal(state.offset, expected.offset)
        assert torch.equal(state.state2.absmax, expected.state2.absmax)
        assert torch.equal(state.state2.code, expected.state2.code)
        assert state.state2.blocksize == expected.state2.blocksize


@pytest.mark.parametrize("rows,k", [(96, 160), (1000, 96), (7, 300)])
def test_int8_rows_equal_the_whole_tensor(monkeypatch, rows, k):
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr("heavylift.planner.load_program.LOAD_ROW_CHUNK_ELEMENTS", 700)
    w = _weight(rows, k, 3 * rows + k)
    cb, scb = bnb_load.quantize_int8_rows(w, "cpu")
    whole_cb, whole_scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    assert load_row_step(rows, k, 1) < rows
    assert torch.equal(cb, whole_cb) and torch.equal(scb, whole_scb)


def test_load_row_step_holds_whole_64_blocks():
    assert load_row_step(53248, 16384, 1) == 256  # 1 << 22 weights of a 405B MLP weight
    assert load_row_step(100, 200, 8) == 100  # a small weight goes whole
    assert load_row_step(10 ** 6, 200, 8) == 20968  # 1 << 22 // 200 = 20971, down to a multiple of 8
    assert load_row_step(10, 1 << 23, 1) == 1  # a row wider than the chunk goes alone


def test_weights_to_quantize_are_read_to_cpu_and_quantized_onto_their_device(monkeypatch):
    # transformers asks the quantizer about a parameter, then where to read it: a weight to quantize is read
    # into CPU RAM, its device kept for the quantize op; every other tensor, and the quantized weight when it is
    # set in its module, goes where the device map says (device 0 here).
    monkeypatch.setattr(hf_loading, "get_device", lambda device_map, name, valid_torch_device=False: 0)
    monkeypatch.setattr(Bnb4BitHfQuantizer, "param_needs_quantization",
                        lambda self, model, name, **kwargs: name.endswith("proj.weight"))
    before = hf_loading.get_device
    quantizer = object.__new__(Bnb4BitHfQuantizer)
    with bnb_load.row_blocked_bitsandbytes():
        assert quantizer.param_needs_quantization(None, "model.layers.0.mlp.up_proj.weight")
        assert hf_loading.get_device({}, "model.layers.0.mlp.up_proj.weight", valid_torch_device=True) == "cpu"
        assert not quantizer.param_needs_quantization(None, "model.norm.weight")
        assert hf_loading.get_device({}, "model.norm.weight", valid_torch_device=True) == 0
        assert hf_loading.get_device({}, "model.layers.0.mlp.up_proj.weight") == 0
        op = quantizer.get_quantize_ops()
        assert isinstance(op, bnb_load.RowBlock4bitQuantize)
        assert op.devices == {"model.layers.0.mlp.up_proj.weight": 0}
    assert hf_loading.get_device is before
    assert not isinstance(quantizer.get_quantize_ops(), bnb_load.RowBlock4bitQuantize)


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "int8"])
def test_a_load_quantizes_every_weight_in_row_blocks_from_cpu(tmp_path, monkeypatch, quant):
    # Through heavylift.load: each quantized weight must reach the row-block ops on the CPU (where the
    # device map puts it: here the CPU itself) and hold what transformers' own op stores.
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    import heavylift

    monkeypatch.setattr("heavylift.planner.load_program.LOAD_ROW_CHUNK_ELEMENTS", 1024)  # several blocks each
    seen = []
    rows_4bit, rows_8bit = bnb_load.quantize_4bit_rows, bnb_load.quantize_int8_rows
    monkeypatch.setattr(bnb_load, "quantize_4bit_rows", lambda w, *a: seen.append(w.device.type) or rows_4bit(w, *a))
    monkeypatch.setattr(bnb_load, "quantize_int8_rows", lambda w, *a: seen.append(w.device.type) or rows_8bit(w, *a))
    folder = save_runnable_checkpoint(tmp_path / "llama", "llama")
    session = heavylift.load(str(folder), quant=quant, context=64, engine="transformers")
    layers = session.model.config.num_hidden_layers
    assert seen == ["cpu"] * 7 * layers
    saved = {}
    for f in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(f))
    kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    modules = {n: m for n, m in session.model.named_modules() if isinstance(m, kind)}
    assert len(modules) == 7 * layers
    for name, module in modules.items():
        w = saved[f"{name}.weight"]
        if quant == "int8":
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
            assert torch.equal(module.weight.data, cb) and torch.equal(module.weight.SCB, scb), name
            continue
        packed, state = bnb.functional.quantize_4bit(w, compress_statistics=quant == "nf4-dq", quant_type="nf4")
        assert torch.equal(module.weight.data, packed) and module.weight.quant_state is module.quant_state, name
        assert torch.equal(module.weight.quant_state.absmax, state.absmax), name
    assert session.generate("the quick brown fox", max_new_tokens=3, temperature=0).generated_tokens >= 1
