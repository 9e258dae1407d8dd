"""A device too tight for the engine's work on a whole prefill chunk takes the chunk through its layers fewer
tokens at a time (plan.DevicePlan.prefill_rows): the plan says so per device, with what it costs, and the
engine is told (runtime/prepared.py planned_prefill_rows)."""

from __future__ import annotations

import json

from conftest import run_cli
from heavylift.api import plan
from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.model.source import resolve_model
from heavylift.planner.forward_program import Part
from heavylift.planner.plan import Workload, layout, prefill_rows_to_fit

# Llama 3.1 405B in NF4-DQ on ten RTX 4090s at a 49152-token context: the first and last cards (11 layers
# each, beside the embedding and the head) are 68 MB short with whole 2048-token chunks and fit with 1024.
ARGS = ["plan", "llama3.1-405b", "--gpus", "10xRTX4090", "--quant", "nf4-dq", "--context", "49152"]
WORK = Workload(context=49152, batch=1, engine="fast")


def test_the_tight_devices_prefill_half_a_chunk_at_a_time_and_the_others_whole_chunks(capsys):
    code, out, _ = run_cli(capsys, *ARGS, "--json")
    assert code == 0
    (scheme,) = json.loads(out)["schemes"]
    assert scheme["fits"]
    assert [d.get("prefill_rows", 0) for d in scheme["per_device"]] == [1024] + [0] * 8 + [1024]


def test_whole_chunks_would_not_fit_on_the_first_card():
    s = plan("llama3.1-405b", gpus="10xRTX4090", quant="nf4-dq", context=49152).scheme("nf4-dq")
    first = s.per_device[0]
    whole = layout(resolve_model("llama3.1-405b").architecture, "nf4-dq").terms(
        first.device, WORK, Part(first.layers, True, False), every_layer=True)
    need = first.weights_bytes + whole.kv_cache_bytes + whole.transient_bytes + whole.overhead_bytes
    assert need > first.capacity_bytes and first.free_bytes >= 0
    assert whole.transient_bytes > first.activation_bytes


def test_the_advice_states_the_passes_and_the_least_time_they_add(capsys):
    # Each pass after the first dequantizes the card's 11 layers again: 18,088,790,016 bytes of NF4-DQ
    # storage read and 35,064,381,440 weights written in bf16, 88.2 GB at the RTX 4090's 1,008 GB/s: 88 ms.
    assert parse_gpu_spec("1xRTX4090")[0].bandwidth_bytes_s == 1.008e12
    code, out, _ = run_cli(capsys, *ARGS)
    assert code == 0
    line = ("  nf4-dq: prefill: cuda:0 takes each 2048-token chunk through its 11 layers 1024 tokens at a time "
            "to fit (2 passes, the weights dequantized in each: at least +88 ms a chunk)")
    assert line in out.splitlines()
    assert line.replace("cuda:0", "cuda:9") in out.splitlines()


def test_a_plan_with_room_prefills_whole_chunks(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--gpus", "10xRTX4090", "--quant", "nf4-dq", "--json")
    assert code == 0
    (scheme,) = json.loads(out)["schemes"]
    assert all("prefill_rows" not in d for d in scheme["per_device"])
    assert "prefill:" not in out


def test_passes_halve_from_the_chunk_down_to_256_tokens():
    assert prefill_rows_to_fit(WORK) == [1024, 512, 256]
    assert prefill_rows_to_fit(Workload(context=1000, batch=1, engine="fast")) == [500]  # its one chunk: 1000
    assert prefill_rows_to_fit(Workload(context=300, batch=1, engine="fast")) == []


def test_transformers_prefills_every_prompt_in_the_longest_chunks_that_fit_on_every_device(capsys):
    # Gemma 2 9B in bf16 on one RTX 4090 at 8k, on transformers' forward (the engine does not run Gemma 2): its
    # eager attention's scores for a 2048-token chunk do not fit beside the weights and KV cache; for 1024 they do.
    s = plan("gemma2-9b", gpus="1xRTX4090", quant="bf16", context=8192).scheme("bf16")
    (d,) = s.per_device
    assert s.engine == "transformers" and s.fits and d.prefill_rows == 1024
    work = Workload(context=8192, batch=1, engine="transformers")
    lay = layout(resolve_model("gemma2-9b").architecture, "bf16")
    whole, half = (lay.terms(d.device, work, Part(d.layers, True, True), every_layer=True, prefill_rows=rows)
                   for rows in (0, 1024))
    assert d.weights_bytes + whole.kv_cache_bytes + whole.transient_bytes + whole.overhead_bytes > d.capacity_bytes
    assert (d.activation_bytes, d.worst_prompt_tokens) == (half.transient_bytes, half.prompt_tokens)
    code, out, _ = run_cli(capsys, "plan", "gemma2-9b", "--gpus", "1xRTX4090", "--quant", "bf16", "--context", "8192")
    assert code == 0
    assert ("  bf16: prefill: transformers takes prompts 1024 tokens at a time to fit, not 2048 (2 chunks for "
            "2048 tokens)") in out.splitlines()


def test_transformers_chunks_are_one_size_on_every_device_and_their_dequantize_is_counted(capsys):
    s = plan("llama3.1-405b", gpus="10xRTX4090", quant="nf4-dq", context=49152, engine="transformers")
    scheme = s.scheme("nf4-dq")
    assert scheme.fits and {d.prefill_rows for d in scheme.per_device} == {1024}
    code, out, _ = run_cli(capsys, *ARGS, "--engine", "transformers", "--json")
    assert code == 0
    (planned,) = json.loads(out)["schemes"]
    assert [d["prefill_rows"] for d in planned["per_device"]] == [1024] * 10
    (line,) = [a for a in planned["advice"] if a.startswith("prefill:")]
    # The second chunk of every 2048 tokens dequantizes all ten cards' layers again, one card after another.
    assert line.startswith("prefill: transformers takes prompts 1024 tokens at a time to fit, not 2048 (2 chunks "
                           "for 2048 tokens, the weights dequantized in each: at least +")


def test_a_transformers_plan_with_room_prefills_whole_chunks():
    s = plan("gemma2-9b", gpus="1xH100", quant="bf16", context=8192).scheme("bf16")
    assert s.per_device[0].prefill_rows == 0 and not any(a.startswith("prefill:") for a in s.advice)
