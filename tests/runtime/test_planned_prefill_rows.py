"""The engine is built with the plan's per-device prefill passes (plan.DevicePlan.prefill_rows), keyed by the
torch device the loader put each device's layers on."""

from __future__ import annotations

import types

import torch

from heavylift.api import plan
from heavylift.runtime.loader import placement_from_plan
from heavylift.runtime.prepared import planned_prefill_rows


def test_the_tight_cards_get_their_passes_by_torch_device(monkeypatch):
    monkeypatch.setattr("heavylift.runtime.loader.runtime_device", lambda index: f"cuda:{index}")  # ten GPUs here
    p = plan("llama3.1-405b", gpus="10xRTX4090", quant="nf4-dq", context=49152)
    scheme = p.scheme("nf4-dq")
    weights = types.SimpleNamespace(scheme=scheme, placement=placement_from_plan(p.architecture, scheme))
    assert planned_prefill_rows(weights) == {torch.device("cuda:0"): 1024, torch.device("cuda:9"): 1024}


def test_no_passes_where_every_card_takes_whole_chunks():
    p = plan("llama3.1-405b", gpus="10xRTX4090", quant="nf4-dq", context=8192)
    scheme = p.scheme("nf4-dq")
    weights = types.SimpleNamespace(scheme=scheme, placement=placement_from_plan(p.architecture, scheme))
    assert planned_prefill_rows(weights) == {}


def test_on_a_machine_without_the_gpus_the_passes_go_to_the_cpu():
    p = plan("llama3.1-405b", gpus="10xRTX4090", quant="nf4-dq", context=52224)  # cuda:0 and cuda:9 take 512
    scheme = p.scheme("nf4-dq")
    weights = types.SimpleNamespace(scheme=scheme, placement=placement_from_plan(p.architecture, scheme))
    assert [d.prefill_rows for d in scheme.per_device if d.prefill_rows] == [512, 512]
    assert planned_prefill_rows(weights) == {torch.device("cpu"): 512}  # no GPU on this machine: all on the CPU
