"""`run`/`serve --adapter` plan the adapter they apply: the planned adapter bytes are the loaded adapter's
parameter bytes (peft upcasts bf16 LoRA weights to float32), and a machine that holds the plan without the
adapter but not with it is refused before anything loads, in one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli

RANK = 4
TARGETS = ["q_proj", "down_proj"]


@pytest.fixture(scope="module")
def bf16_adapter(base, tmp_path_factory):
    """A rank-4 adapter of q_proj and down_proj made by peft over the tiny base, saved in bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    wrapped = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp("adapter") / "bf16"
    wrapped.save_pretrained(folder)
    return folder


def test_the_planned_adapter_bytes_are_the_loaded_adapters(base, bf16_adapter):
    import heavylift
    from heavylift.finetune.adapter import apply_adapter, planned_adapter
    from heavylift.model.source import resolve_model

    # The tiny base: hidden 64, intermediate 128, 2 layers. q_proj 4 * 4 * (64 + 64) = 2048 and down_proj
    # 4 * 4 * (128 + 64) = 3072 bytes in float32: 5120 a layer.
    planned = planned_adapter(bf16_adapter, resolve_model(str(base)).architecture, str(base))
    assert [planned.layer_bytes(i) for i in range(2)] == [5120, 5120] and planned.weight_bytes == 10240
    session = heavylift.load(str(base), quant="nf4", engine="transformers")
    model = apply_adapter(session.model, bf16_adapter)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    assert {p.dtype for p in lora} == {torch.float32}
    assert sum(p.numel() * p.element_size() for p in lora) == planned.weight_bytes


def _edge_machine(monkeypatch, base, adapter, serve: bool):
    """This machine as a CPU with exactly one byte less than the plan with the adapter needs."""
    import heavylift.hardware.detect as detect
    from heavylift.api import prepare
    from heavylift.hardware.gpus import cpu_device

    roomy = 1 << 34
    monkeypatch.setattr(detect, "detect_devices", lambda: (cpu_device(roomy),))
    plans = [prepare(str(base), quant="nf4", context=64, engine="transformers", serve=serve, adapter=a).scheme
             for a in (None, adapter)]
    # The adapter's 10240 bytes and its LoRA forward's bound: four 2 MiB segments (planner/lora.py).
    assert plans[1].total_bytes - plans[0].total_bytes == 10240 + 4 * (2 << 20)
    tight = roomy - plans[1].per_device[0].free_bytes - 1
    monkeypatch.setattr(detect, "detect_devices", lambda: (cpu_device(tight),))


def test_run_refuses_a_plan_the_adapter_no_longer_fits(base, bf16_adapter, monkeypatch, capsys):
    _edge_machine(monkeypatch, base, bf16_adapter, serve=False)
    args = ("run", str(base), "--prompt", "the quick", "--raw", "--quant", "nf4", "--context", "64",
            "--max-new-tokens", "1", "--temperature", "0")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, out, err = run_cli(capsys, *args, "--adapter", str(bf16_adapter))
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {base} in nf4 does not fit: ")


def test_serve_refuses_a_plan_the_adapter_no_longer_fits(base, bf16_adapter, monkeypatch, capsys):
    _edge_machine(monkeypatch, base, bf16_adapter, serve=True)
    code, out, err = run_cli(capsys, "serve", str(base), "--quant", "nf4", "--context", "64", "--max-seqs", "1",
                             "--adapter", str(bf16_adapter))
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {base} in nf4 does not fit: ")
