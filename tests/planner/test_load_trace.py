"""The planner's load programs against what transformers' from_pretrained allocates, event by event.

A tiny checkpoint of each MoE family loads on the CPU under memtrace.Trace, as heavylift loads it (one tensor
at a time, HF_DEACTIVATE_ASYNC_LOAD; a pre-quantized one with heavylift's quantization config); each checkpoint
tensor is copied where it arrives, as its host-to-device copy allocates on a GPU. The trace is taken over the
routed experts' weight converters, which stack and fuse per-expert tensors or dequantize fused MXFP4 ones; the
planner's expert programs (load_program.expert_load, experts_load) must list the same allocations, of the same
sizes, freed in the same order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from heavylift.model.architecture import architecture_from_config
from heavylift.planner.allocator import Program
from heavylift.planner.forward_program import Part
from heavylift.planner.load_program import expert_load, experts_load, load_order, load_tensors, natural_key
from heavylift.runtime.loader import quantization_config

from conftest import save_tiny_checkpoint
from memtrace import Trace, canonical, first_difference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import validate_plan as vp  # noqa: E402  (its checkpoints hold gpt-oss's experts in MXFP4, as the hub's do)


def _traced_load(folder, arch, monkeypatch, traced_name=lambda name: ".experts." in name) -> list[tuple]:
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    trace = Trace()
    copy, convert = loading._materialize_copy, loading.WeightConverter.convert

    def arrive(tensor, device=None, dtype=None):  # read from the file in host memory, then copied: a new storage
        with _disable_current_modes():
            host = copy(tensor, device, dtype)
        return host.clone()

    def traced(self, layer_name, *args, **kwargs):
        if not traced_name(layer_name):
            return convert(self, layer_name, *args, **kwargs)
        with trace:
            return convert(self, layer_name, *args, **kwargs)

    monkeypatch.setattr(loading, "_materialize_copy", arrive)
    monkeypatch.setattr(loading.WeightConverter, "convert", traced)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=quantization_config("bf16", torch.bfloat16, False, pre=arch.prequantized))
    events = list(trace.events)  # the loaded experts stay: their frees come only with the model's end
    del model
    return events


def _checkpoint(tmp_path, family: str) -> Path:
    stored = {"gpt_oss": "gpt-oss-20b", "deepseek_v3": "deepseek-v3"}  # MXFP4 experts; block-FP8 weights
    if family in stored:
        return vp.build_checkpoint(vp.model_config(stored[family], shrink=True), tmp_path / family)
    return save_tiny_checkpoint(tmp_path / family, family)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_expert_load_programs_match_from_pretrained(tmp_path, monkeypatch, family):
    # Mixtral's w1 sorts before w2: gate_up_proj converts first; Qwen 3 MoE's down_proj before gate_proj;
    # gpt-oss's down_proj_blocks before gate_up_proj_blocks, each dequantized through int64 lookup indices;
    # DeepSeek-V3's block-FP8 experts all arrive, then each is dequantized through float32 before the stacking.
    folder = _checkpoint(tmp_path, family)
    arch = architecture_from_config(json.loads((folder / "config.json").read_text()))
    traced = _traced_load(folder, arch, monkeypatch)
    order = load_order(arch, Part(range(arch.num_layers), True, True))
    program = Program()
    if order.layers:
        for layer in order.layers:
            if layer.experts is not None:
                experts_load(program, layer.experts, "bf16")
    else:
        for _ in range(arch.num_layers):
            expert_load(program, order.experts, "bf16")
    planned, seen = canonical(program.events), canonical(traced)
    assert planned == seen, first_difference(planned, seen)


def test_a_block_fp8_weight_dequantizes_through_float32(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path, "deepseek_v3")
    arch = architecture_from_config(json.loads((folder / "config.json").read_text()))
    name = "model.layers.0.self_attn.o_proj.weight"
    traced = _traced_load(folder, arch, monkeypatch, lambda layer_name: layer_name == name)
    order = load_order(arch, Part(range(arch.num_layers), True, True))
    (weight,) = [loaded for spec, loaded in zip(_stored_specs(arch, 0), order.layers[0].tensors) if spec == name]
    program = Program()
    load_tensors(program, "bf16", [weight])
    planned, seen = canonical(program.events), canonical(traced)
    assert weight.stored != (0, 0) and planned == seen, first_difference(planned, seen)


def _stored_specs(arch, layer: int) -> list[str]:
    """The names of layer `layer`'s checkpoint tensors in load order, as LayerLoad.tensors holds them."""
    return sorted((t.name for t in arch.layer_tensors(layer) if t.fused_into is None and t.role.value != "expert"),
                  key=natural_key)
