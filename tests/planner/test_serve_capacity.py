"""How many sequences a server holds (`heavylift plan --serve`, SchemePlan.max_concurrent_sequences): the
boundary by the plan's own fit test, what the serve layout counts, the JSON field and the CLI line."""

from __future__ import annotations

import json

import pytest

import heavylift
from heavylift.model.architecture import architecture_from_config
from conftest import run_cli
from heavylift.defaults import CUDA_CONTEXT_BYTES, SERVE_MAX_SEQS
from heavylift.errors import InvalidArgumentError
from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.model.catalog import catalog_entries
from heavylift.model.source import resolve_model
from heavylift.planner.allocator import block_size
from heavylift.planner.forward_program import Part
from heavylift.planner.memory import FAST, TRANSFORMERS, runtime_terms
from heavylift.planner.plan import Workload, layout

H100 = parse_gpu_spec("1xH100")
# Llama 3.1 8B keeps 2 (keys, values) x 32 layers x 8 KV heads x 128 channels x 2 bytes (bf16) per token:
# 131,072 bytes, so a sequence of 8,192 tokens holds 1 GiB of KV cache.
LLAMA8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


def _arch(model: str):
    return resolve_model(model).architecture


def _serves(model: str, gpus: str, context: int, quants: list[str]) -> dict[str, int]:
    plan = heavylift.plan(model, gpus=gpus, context=context, quant=quants, serve=True)
    return {s.quant: s.max_concurrent_sequences for s in plan.schemes}


def _margin(model: str, quant: str, devices, context: int, batch: int, engine: str) -> int:
    work = Workload(context=context, batch=batch, engine=engine, serve=True)
    return layout(_arch(model), quant).margin(devices, work)


def test_llama8b_serves_62_sequences_of_8k_in_bf16_and_72_in_nf4_dq_on_one_h100():
    plan = heavylift.plan("llama3.1-8b", gpus="1xH100", context=8192, quant=["bf16", "nf4-dq"], serve=True)
    kv_per_sequence = LLAMA8B_KV_BYTES_PER_TOKEN * 8192
    assert kv_per_sequence == 2**30
    got = {}
    for s in plan.schemes:
        assert s.engine == FAST
        # The KV cache alone, beside the weights and the CUDA context, leaves room for this many sequences;
        # the server's decode buffers, fp32 logits, graph pools and one prefill take one or two of them.
        by_kv = (H100[0].memory_bytes - s.weights_bytes - CUDA_CONTEXT_BYTES) // kv_per_sequence
        assert s.max_concurrent_sequences < by_kv <= s.max_concurrent_sequences + 2
        got[s.quant] = s.max_concurrent_sequences
    assert got == {"bf16": 62, "nf4-dq": 72}


@pytest.mark.parametrize("quant,engine", [("bf16", FAST), ("nf4-dq", FAST), ("fp16", TRANSFORMERS),
                                          ("int8", FAST)])
def test_the_count_fits_and_one_more_does_not(quant, engine):
    n = _serves("llama3.1-8b", "1xH100", 8192, [quant])[quant]
    assert 0 < n < SERVE_MAX_SEQS
    assert _margin("llama3.1-8b", quant, H100, 8192, n, engine) >= 0
    assert _margin("llama3.1-8b", quant, H100, 8192, n + 1, engine) < 0


def test_a_longer_context_serves_fewer_sequences():
    counts = [_serves("llama3.1-8b", "1xH100", c, ["bf16"])["bf16"] for c in (2048, 4096, 8192, 16384, 32768, 131072)]
    assert counts == [249, 125, 62, 31, 15, 3]
    for shorter, longer in zip(counts, counts[1:]):
        assert longer < shorter


def test_split_over_two_gpus_the_boundary_holds_on_the_fullest():
    devices = parse_gpu_spec("2xRTX4090")
    n = _serves("llama3.1-8b", "2xRTX4090", 8192, ["nf4-dq"])["nf4-dq"]
    assert n == 40
    assert _margin("llama3.1-8b", "nf4-dq", devices, 8192, n, FAST) >= 0
    assert _margin("llama3.1-8b", "nf4-dq", devices, 8192, n + 1, FAST) < 0


def test_a_family_the_engine_does_not_run_is_counted_on_transformers():
    plan = heavylift.plan("gemma2-9b", gpus="1xH100", context=8192, quant=["bf16"], serve=True)
    s = plan.scheme("bf16")
    assert s.engine == TRANSFORMERS and s.max_concurrent_sequences == 30
    assert _margin("gemma2-9b", "bf16", H100, 8192, 30, TRANSFORMERS) >= 0
    assert _margin("gemma2-9b", "bf16", H100, 8192, 31, TRANSFORMERS) < 0
    # From 29 sequences a server fits by prefilling in 1024-token chunks (plan.Layout.fitting_chunk).
    served = heavylift.plan("gemma2-9b", gpus="1xH100", context=8192, batch=30, quant=["bf16"], serve=True)
    assert served.scheme("bf16").fits and served.scheme("bf16").per_device[0].prefill_rows == 1024


def test_zero_when_not_even_one_sequence_fits():
    # Llama 3.1 405B's bf16 weights (811 GB) exceed eight H100s; on one RTX 4090 (24 GB) Llama 3.1 8B's bf16
    # weights (16.1 GB) fit, but not beside one sequence of 131,072 tokens (17.2 GB of KV cache).
    assert _serves("llama3.1-405b", "8xH100", 8192, ["bf16"]) == {"bf16": 0}
    assert _serves("llama3.1-8b", "1xRTX4090", 131072, ["bf16"]) == {"bf16": 0}
    assert _margin("llama3.1-8b", "bf16", parse_gpu_spec("1xRTX4090"), 131072, 1, FAST) < 0


def test_the_count_stops_at_the_most_a_server_runs():
    # Llama 3.2 1B: 2 x 16 layers x 8 KV heads x 64 channels x 2 bytes x 1,024 tokens = 32 MiB a sequence.
    assert _serves("llama3.2-1b", "1xH100", 1024, ["bf16", "fp16"]) == {"bf16": SERVE_MAX_SEQS, "fp16": SERVE_MAX_SEQS}


def test_serve_is_counted_only_when_asked():
    plan = heavylift.plan("llama3.1-8b", gpus="1xH100", quant=["bf16"])
    assert plan.scheme("bf16").max_concurrent_sequences is None and not plan.workload.serve


def test_the_engine_server_keeps_its_decode_buffers_and_slot_tables():
    # A server of 4 sequences on one device (the model's start and end) keeps, beside a run of 4 sequences,
    # Engine._buffers(4), a bool, two int32 and an int64 [4] table and an int32 scalar, each rounded to 512 bytes: hidden x3 (2 x 4 x 4096 bytes
    # each), qkv (2 x 4 x 48 x 128), q and attn (2 x 4 x 4096 each), act (2 x 4 x 14336), slots (512),
    # the split-K partials o (4 x 4 x 32 x 64 x 128), m and l (4 x 4 x 32 x 64 each), tokens (512), final
    # (2 x 4 x 4096), bf16 logits (2 x 4 x 128256), active, positions, last, and a mixed step's row_slots and
    # lengths (512 each).
    arch, part = _arch("llama3.1-8b"), Part(range(32), True, True)
    run = runtime_terms(arch, "bf16", FAST, 8192, 4, 2, H100[0], part)
    served = runtime_terms(arch, "bf16", FAST, 8192, 4, 2, H100[0], part, serve=True)
    buffers = (3 * 32768 + 49152 + 2 * 32768 + 114688 + 512 + 4194304 + 2 * 32768 + 512 + 32768
               + block_size(2 * 4 * 128256) + 5 * 512)
    assert served.kv_cache_bytes == run.kv_cache_bytes == 4 * 2**30  # 1 GiB a sequence
    assert served.buffer_bytes - run.buffer_bytes == buffers == 5_649_920


def test_the_transformers_server_keeps_a_cache_per_sequence_and_runs_one_at_a_time():
    # Gemma 2 9B at 8,192 tokens: its sliding-window layers hold 4,096 positions, the others 8,192. A server
    # of 3 keeps three one-sequence caches; what else it keeps (the cuBLAS workspace, one prompt's ids) is
    # the one-sequence run's.
    arch = _arch("gemma2-9b")
    part = Part(range(arch.num_layers), True, True)
    one = runtime_terms(arch, "bf16", TRANSFORMERS, 8192, 1, 2, H100[0], part)
    served = runtime_terms(arch, "bf16", TRANSFORMERS, 8192, 3, 2, H100[0], part, serve=True)
    assert served.kv_cache_bytes == 3 * one.kv_cache_bytes
    assert served.buffer_bytes == one.buffer_bytes


def test_serve_must_be_a_bool():
    with pytest.raises(InvalidArgumentError, match="serve must be True or False"):
        Workload(context=8192, batch=1, serve="yes")


def test_cli_serve_line_and_column(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--serve")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == "context 8,192 tokens x 1 sequence served at once, KV cache bf16"
    assert "serves" in lines[5]
    rows = {line.split("│")[1].strip(): line.split("│")[10].strip() for line in lines if line.startswith("│")}
    assert rows == {"bf16 ★": "62", "fp16": "63", "fp8": "69", "int8": "69", "nf4": "71", "nf4-dq": "72",
                    "fp4": "71"}
    assert "  bf16: serves up to 62 sequences of 8,192 tokens at once" in lines


def test_cli_without_serve_has_no_serve_column(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100")
    assert code == 0 and "serves" not in out and "x batch 1," in out


def test_cli_serve_json_carries_the_field_per_scheme(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--serve", "--json",
                           "--quant", "nf4-dq")
    assert code == 0
    plan = json.loads(out)
    assert plan["serve"] is True
    assert [(s["quant"], s["max_concurrent_sequences"]) for s in plan["schemes"]] == [("nf4-dq", 72)]
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--json", "--quant", "nf4-dq")
    plan = json.loads(out)
    assert code == 0 and "serve" not in plan and "max_concurrent_sequences" not in plan["schemes"][0]


def test_cli_serve_line_when_the_most_is_reached(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.2-1b", "--gpus", "1xH100", "--context", "1024", "--serve",
                           "--quant", "bf16")
    assert code == 0
    assert "  bf16: serves up to 256 sequences of 1,024 tokens at once (the most counted)" in out.splitlines()


def test_every_catalog_model_counts_a_boundary_on_one_h100():
    for entry in catalog_entries():
        model = entry.aliases[0]
        pre = architecture_from_config(entry.config_dict()).prequantized
        quant = "nf4" if pre is None else pre.accepted[-1]  # a pre-quantized checkpoint: its smallest precision
        plan = heavylift.plan(model, gpus="1xH100", context=4096, quant=[quant], serve=True)
        s = plan.scheme(quant)
        n = s.max_concurrent_sequences
        assert 0 <= n <= SERVE_MAX_SEQS
        if 0 < n < SERVE_MAX_SEQS:
            assert _margin(model, quant, H100, 4096, n + 1, s.engine) < 0
        if n:
            assert _margin(model, quant, H100, 4096, n, s.engine) >= 0
