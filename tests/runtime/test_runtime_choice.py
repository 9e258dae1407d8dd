"""The one runtime decision (planner/runtimes.py) and the devices a run plans for (runtime/devices.py)."""

from __future__ import annotations

import pytest

import heavylift
from heavylift.errors import GpuSpecError, InvalidArgumentError
from heavylift.planner.memory import FAST, TRANSFORMERS
from heavylift.planner.runtimes import GPU_REASON, OFFLOAD_REASON, Runtime, choose_runtime

from conftest import TINY_FAMILIES

LLAMA, GEMMA = TINY_FAMILIES["llama"], TINY_FAMILIES["gemma2"]
TRITON = "the fast engine needs Triton (`pip install triton`)"


@pytest.mark.parametrize("config, quant, engine, kinds, kernels, expected", [
    (LLAMA, "nf4", "auto", ["cuda", "cuda"], None, Runtime(FAST)),
    (LLAMA, "nf4", "auto", ["cuda", "cpu"], None, Runtime(TRANSFORMERS, GPU_REASON)),
    (LLAMA, "nf4", "auto", ["cpu"], None, Runtime(TRANSFORMERS, GPU_REASON)),
    (LLAMA, "nf4", "fast", ["cpu"], None, Runtime(FAST)),  # the engine's torch reference path
    (LLAMA, "nf4", "auto", ["cuda"], TRITON, Runtime(TRANSFORMERS, TRITON)),
    (LLAMA, "nf4", "auto", ["mps"], None, Runtime(TRANSFORMERS, GPU_REASON)),
    (LLAMA, "fp16", "auto", ["cuda"], None, Runtime(TRANSFORMERS, "the fast engine computes in bf16; fp16 runs on "
                                                               "transformers")),
    (GEMMA, "bf16", "auto", ["cuda"], None, Runtime(TRANSFORMERS, "the fast engine runs llama, mistral, qwen2, qwen3 "
                                                               "layers, not gemma2's GELU-tanh MLPs, four norms "
                                                               "a layer and soft-capped attention")),
    (LLAMA, "bf16", "transformers", ["cuda"], None, Runtime(TRANSFORMERS, "--engine transformers")),
])
def test_choose_runtime(config, quant, engine, kinds, kernels, expected):
    assert choose_runtime(config, quant, engine, kinds, kernels) == expected


@pytest.mark.parametrize("config, quant, kinds, kernels, message", [
    (LLAMA, "nf4", ["cuda", "cpu"], None, GPU_REASON),
    (LLAMA, "nf4", ["cuda"], TRITON, TRITON),
    (GEMMA, "bf16", ["cpu"], None, "not gemma2"),  # the torch path runs only what the engine runs
])
def test_engine_fast_is_refused_in_one_line_where_the_engine_cannot_run(config, quant, kinds, kernels, message):
    with pytest.raises(InvalidArgumentError, match="run it with --engine transformers") as refused:
        choose_runtime(config, quant, "fast", kinds, kernels)
    assert message in str(refused.value)


def test_a_plan_that_offloads_is_planned_for_transformers():
    # Llama 3.1 70B in NF4 (about 40 GB of weights) cannot sit on one 24 GB card: with --allow-offload its plan
    # leaves layers in CPU RAM, where the engine cannot run them; without, it is planned (not fitting) for the engine.
    offloading = heavylift.plan("llama3.1-70b", gpus="1xRTX4090", quant="nf4", allow_offload=True).scheme("nf4")
    assert offloading.offload is not None and offloading.engine == TRANSFORMERS
    assert heavylift.plan("llama3.1-70b", gpus="1xRTX4090", quant="nf4").scheme("nf4").engine == FAST
    fitting = heavylift.plan("llama3.1-8b", gpus="1xH100", quant="nf4", allow_offload=True).scheme("nf4")
    assert fitting.offload is None and fitting.engine == FAST
    with pytest.raises(InvalidArgumentError, match="needs every layer on a CUDA GPU; run it with --engine transformers"):
        heavylift.plan("llama3.1-70b", gpus="1xRTX4090", quant="nf4", allow_offload=True, engine="fast")


def test_the_reason_an_offloading_plan_gives():
    from heavylift.model.catalog import find_model
    from heavylift.hardware.gpus import parse_gpu_spec
    from heavylift.model.architecture import architecture_from_config
    from heavylift.planner.plan import Workload
    from heavylift.planner.runtimes import plan_runtimes

    config = find_model("llama3.1-70b").config_dict()
    runtimes = plan_runtimes(config, architecture_from_config(config), parse_gpu_spec("1xRTX4090"),
                             Workload(8192, 1, allow_offload=True), ["nf4", "bf16"], "auto")
    assert runtimes == {"nf4": Runtime(TRANSFORMERS, OFFLOAD_REASON), "bf16": Runtime(TRANSFORMERS, OFFLOAD_REASON)}


# --- The devices a run plans for -------------------------------------------------------------------------


@pytest.fixture
def two_h100s(monkeypatch):
    """This machine as two H100s that torch can use."""
    import dataclasses

    import torch

    import heavylift.hardware.detect as detect
    from heavylift.hardware.gpus import parse_gpu_spec

    cards = tuple(dataclasses.replace(d, name="NVIDIA H100 80GB HBM3") for d in parse_gpu_spec("2xH100"))
    monkeypatch.setattr(detect, "detect_devices", lambda: cards)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return cards


def test_gpus_selects_and_narrows_this_machines_gpus(two_h100s):
    from heavylift.defaults import GiB
    from heavylift.runtime.devices import machine_devices

    assert machine_devices(None) == two_h100s
    assert machine_devices("1xH100") == two_h100s[:1]
    narrowed = machine_devices("2x40GiB")
    assert [d.memory_bytes for d in narrowed] == [40 * GiB] * 2 and [d.name for d in narrowed] == [two_h100s[0].name] * 2
    assert machine_devices(two_h100s[1:]) == two_h100s[:1]  # detected devices passed back in


@pytest.mark.parametrize("spec", ["3xH100", "1xA100-80GB", "1x100GB", "1xH100,1xA100-80GB"])
def test_gpus_this_machine_lacks_are_refused(two_h100s, spec):
    from heavylift.runtime.devices import machine_devices

    with pytest.raises(GpuSpecError) as refused:
        machine_devices(spec)
    assert str(refused.value) == (f"--gpus {spec} describes devices this machine lacks (it has 2x NVIDIA H100 80GB "
                                  f"HBM3); leave --gpus out to run on what is here, or plan for others with "
                                  f"`heavylift plan --gpus {spec}`")


def test_gpus_torch_cannot_use_are_not_planned_for(two_h100s, monkeypatch):
    import torch

    from heavylift.hardware.gpus import KIND_CPU
    from heavylift.runtime.devices import machine_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES=0
    assert machine_devices(None) == two_h100s[:1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch
    (cpu,) = machine_devices(None)
    assert cpu.kind == KIND_CPU
