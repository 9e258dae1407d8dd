"""A LoRA adapter in the plan (`run`/`serve --adapter`): peft's LoRA forward over a 4-bit projection as an
allocation program, held to a CPU trace of it, and a plan that counts the adapter's weights on the device of
each layer and the forward's transients beside them."""

from __future__ import annotations

import pytest
import torch

from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.model.architecture import architecture_from_config
from heavylift.planner.allocator import Program
from heavylift.planner.lora import Adapter, LoraModule, lora_forward
from heavylift.planner.make import make_plan
from heavylift.planner.plan import Workload

from conftest import TINY_LLAMA
from memtrace import Trace, canonical, first_difference

MiB = 1 << 20


def test_the_lora_program_matches_peft_over_a_4bit_projection():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    batch, tokens, features_in, rank, features_out = 2, 8, 128, 8, 64

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(features_in, features_out, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4")

    model = Holder()
    model.is_loaded_in_4bit = True  # peft then wraps the projection in lora.bnb.Linear4bit
    model.proj.weight = bnb.nn.Params4bit(torch.randn(features_out, features_in, dtype=torch.bfloat16),
                                          requires_grad=False, quant_type="nf4")
    wrapped = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.1, target_modules=["proj"]))
    wrapped.eval()
    layer = wrapped.base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and layer.lora_A["default"].weight.dtype == torch.float32
    # The base projection's own allocations are forward_program's; here it returns a fresh bf16 output.
    layer.base_layer.forward = lambda x: torch.zeros(batch, tokens, features_out, dtype=torch.bfloat16)
    x = torch.randn(batch, tokens, features_in, dtype=torch.bfloat16)
    trace = Trace()
    with torch.inference_mode(), trace:
        y = layer(x)  # noqa: F841 - kept alive, as the program keeps its result
    p = Program()
    base = p.alloc("base", 2 * batch * tokens * features_out)
    lora_forward(p, batch * tokens, features_in, rank, features_out, base)
    planned, traced = canonical(p.events), canonical(trace.events)
    assert planned == traced, first_difference(planned, traced)


# TINY_LLAMA: hidden 64, intermediate 128, 2 layers. Rank 8 on q_proj (64 -> 64) and down_proj (128 -> 64), in
# float32: q 4 * 8 * (64 + 64) = 4096, down 4 * 8 * (128 + 64) = 6144; 10240 bytes a layer.
ADAPTER = Adapter(tuple(LoraModule(i, f"model.layers.{i}.{name}", a, 8, b) for i in range(2)
                        for name, a, b in (("self_attn.q_proj", 64, 64), ("mlp.down_proj", 128, 64))))
# A prefill chunk of 64 rows: every LoRA tensor is under 1 MiB, a 2 MiB segment each, and at most four are live
# at once (the clone, x in float32, lora_B's output and its scaled copy; then the clone, x, the cast and the sum).
LORA_TRANSIENT = 4 * 2 * MiB


@pytest.mark.parametrize("gpus, runs", [("1xH100", [range(0, 2)]), ("2x1GB", [range(0, 1), range(1, 2)])])
def test_the_plan_counts_the_adapter_on_the_device_of_each_layer(gpus, runs):
    arch = architecture_from_config(TINY_LLAMA)
    assert ADAPTER.weight_bytes == 20480
    plans = [make_plan("tiny", arch, parse_gpu_spec(gpus), Workload(context=64, batch=1, adapter=a), ["nf4"])
             for a in (None, ADAPTER)]
    plain, adapted = (p.scheme("nf4").per_device for p in plans)
    assert [d.layers for d in plain] == [d.layers for d in adapted] == runs
    for without, with_adapter in zip(plain, adapted):
        held = 10240 * len(with_adapter.layers)
        assert with_adapter.adapter_bytes == held and without.adapter_bytes == 0
        assert with_adapter.weights_bytes - without.weights_bytes == held
        assert with_adapter.activation_bytes - without.activation_bytes == LORA_TRANSIENT
        assert (with_adapter.kv_cache_bytes, with_adapter.overhead_bytes) == (without.kv_cache_bytes,
                                                                              without.overhead_bytes)
        assert with_adapter.total_bytes - without.total_bytes == held + LORA_TRANSIENT
    shown = plans[1].to_json()["schemes"][0]["per_device"]
    assert [d["adapter_bytes"] for d in shown] == [10240 * len(r) for r in runs]
    assert all("adapter_bytes" not in d for d in plans[0].to_json()["schemes"][0]["per_device"])


def test_a_server_counts_the_lora_forward_of_one_sequences_chunk():
    # Serving on transformers runs one sequence at a time: the 64-row chunk's bound, whatever --max-seqs.
    arch = architecture_from_config(TINY_LLAMA)
    plans = [make_plan("tiny", arch, parse_gpu_spec("1xH100"), Workload(context=64, batch=4, serve=True, adapter=a),
                       ["nf4"]).scheme("nf4").per_device[0] for a in (None, ADAPTER)]
    assert plans[1].activation_bytes - plans[0].activation_bytes == LORA_TRANSIENT
