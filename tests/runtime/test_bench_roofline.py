"""The decode roofline `heavylift bench` and bench/batched_gpu.py report (runtime/benchmark.py), on a tiny engine
whose bytes and FLOPs are written out by hand, and the engine its batch sweep decodes on."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from heavylift.engine import Engine
from heavylift.engine.weights import DENSE
from heavylift.runtime.benchmark import StepCost, decode_lengths, step_cost, sweep_engine

# hidden 128, 4 heads of 32 (2 kv heads), intermediate 256, 2 layers, vocab 320. Per layer q 128x128, k and v
# 64x128, o 128x128, gate and up 256x128, down 128x256: 147456 weights; with the 320x128 head 335872 in all.
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320)


@pytest.fixture
def engine():
    return Engine.from_random(LlamaConfig(**CONFIG), DENSE, "cpu", batch=1, context=16, ops="torch")


def test_a_step_reads_every_weight_once_the_cache_to_its_length_and_each_linears_rows(engine):
    cost = step_cost(engine, batch=4, length=10)
    assert cost.weight_bytes == 335872 * 2  # bf16
    # a key and a value of 2 kv heads x 32 per position, 10 positions, 2 layers, 4 sequences, bf16
    assert cost.kv_bytes == 2 * 4 * (2 * 2 * 32) * 10 * 2
    # inputs and outputs per layer: q 128 + 128, k and v 128 + 64, o 128 + 128, gate and up 128 + 256,
    # down 256 + 128 (2048); two layers and the head's 128 + 320, 4 rows, bf16
    assert cost.activation_bytes == 2 * 4 * (2 * 2048 + 448)
    # 2 FLOPs per weight per sequence; q.k and p.v over 10 positions for 4 heads of 32, 2 layers
    assert cost.flops == 2 * 4 * 335872 + 4 * 4 * (4 * 32) * 10 * 2
    assert cost.bytes == 671744 + 20480 + 36352


def test_the_roofline_is_the_longer_of_the_two_limits():
    cost = StepCost(batch=4, weight_bytes=900, kv_bytes=80, activation_bytes=20, flops=5000)
    assert cost.roofline_tok_s(bandwidth=1000.0, flops_s=None) == 4.0  # 1000 bytes in 1 s
    assert cost.roofline_tok_s(bandwidth=1000.0, flops_s=10000.0) == 4.0  # the FLOPs take 0.5 s
    assert cost.roofline_tok_s(bandwidth=1000.0, flops_s=2500.0) == 2.0  # they take 2 s


def test_a_sliding_window_caps_what_its_layer_reads(engine):
    engine.layers[0].window = 4
    assert step_cost(engine, batch=1, length=10).kv_bytes == 2 * (2 * 2 * 32) * (4 + 10)


def test_the_sweep_runs_on_the_same_weights_with_a_cache_for_its_largest_batch(engine):
    sweep = sweep_engine(engine, (1, 4))
    longest = max(sum(decode_lengths(b)) for b in (1, 4))
    assert (sweep.batch, sweep.context) == (4, longest + 1)
    assert sweep.layers[0].k_cache.shape == (4, 2, longest + 1, 32)
    assert sweep.layers[0].gate.data is engine.layers[0].gate.data and sweep.lm_head is engine.lm_head
    assert engine.layers[0].k_cache is None  # released first: the two never hold a cache at once
    assert sweep_engine(sweep, (1, 4)) is sweep
    token = torch.tensor([3, 5, 7, 9])
    assert sweep.decode(token).shape == (4, 320)


def test_a_record_prints_as_json_with_its_roofline_percentage():
    from heavylift.runtime.benchmark import BenchRecord

    record = BenchRecord(model="m", engine="heavylift", quant="nf4-dq", batch=16, gpus=1, decode_tok_s=250.0,
                         roofline_tok_s=1000.0, prefill_tok_s=None, load_s=1.5, bytes_per_token=4096)
    assert record.to_json() == {"model": "m", "engine": "heavylift", "quant": "nf4-dq", "batch": 16, "gpus": 1,
                                "decode_tok_s": 250.0, "roofline_tok_s": 1000.0, "prefill_tok_s": None,
                                "load_s": 1.5, "bytes_per_token": 4096, "bytes_per_step": None,
                                "flops_per_step": None, "roofline_pct": 25.0}
