"""The planner's arithmetic, byte for byte, on configs small enough to count by hand."""

from __future__ import annotations

import itertools

import pytest

from heavylift.model.architecture import architecture_from_config
from heavylift.model.catalog import catalog_entries, find_model
from heavylift.defaults import CUDA_CONTEXT_BYTES
from heavylift.errors import InvalidArgumentError
from heavylift.hardware.gpus import cpu_device, parse_gpu_spec
from heavylift.planner.memory import FAST, TRANSFORMERS
from heavylift.planner.placement import Costs, _unit, balance
from heavylift.planner.make import make_plan
from heavylift.planner.plan import Workload, layout
from heavylift.schemes import SCHEMES

from conftest import TINY_LLAMA

# TINY_LLAMA: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads (head_dim 16), vocab 256.
# Allocations round up to 512 bytes. Per layer in bf16:
#   q [64,64] 8192 + k [32,64] 4096 + v 4096 + o [64,64] 8192 + gate/up/down [128,64] 3 x 16384
#   + two norms of 128 bytes -> 512 each = 74,752
# embed [256,64] 32,768; final norm 512; lm_head 32,768 -> bf16 total 215,552.
# NF4 (64-weight blocks, fp32 absmax, 16-entry fp32 code): q: packed 2048 + absmax 256->512 + code 64->512
#   = 3072; k, v: 1024 + 512 + 512 = 2048; gate/up/down: 4096 + 512 + 512 = 5120; layer 26,624;
#   total 32,768 + 2 x 26,624 + 512 + 32,768 = 119,296.
# NF4-DQ adds per tensor uint8 absmax (->512), nested fp32 absmax (->512), fp32 offset (->512) and a
#   256-entry fp32 code (1024) instead of the fp32 absmax: q 5120, k/v 4096, gate/up/down 7168;
#   layer 40,960; total 147,968.
# INT8 (int8 weights + fp32 row scales): q 4096 + 256->512 = 4608; k/v 2048 + 512 = 2560;
#   gate/up 8192 + 512 = 8704; down 8192 + 64 x 4 -> 512 = 8704; layer 41,472; total 148,992.
EXPECTED_WEIGHTS = {"bf16": 215_552, "fp16": 215_552, "nf4": 119_296, "fp4": 119_296, "nf4-dq": 147_968,
                    "int8": 148_992, "fp8": 148_992}


@pytest.fixture
def tiny():
    return architecture_from_config(TINY_LLAMA)


@pytest.mark.parametrize("quant", sorted(EXPECTED_WEIGHTS))
def test_tiny_weights_are_byte_exact(tiny, quant):
    assert SCHEMES[quant].weights_bytes(tiny.tensors) == EXPECTED_WEIGHTS[quant]


def test_tiny_runtime_terms_are_byte_exact_on_the_cpu(tiny):
    # One 100-token chunk of 2 sequences (200 rows) through transformers with a StaticCache, live bytes (a CPU
    # has no caching allocator), every tensor rounded to 512 bytes:
    #   KV: 2 layers x (K, V) x [2 seq, 2 heads, 100, 16] bf16 = 4 x 12,800 = 51,200.
    #   Held by the forward: embeddings 200 x 64 x 2 = 25,600; positions 100 x 8 = 800 -> 1,024;
    #   cos and sin [100, 16] bf16 = 3,200 -> 3,584 each: 33,792.
    #   Peak, layer 1's MLP (computed in place: runtime/mlp_forward.py): its input, which holds the residual
    #   (runtime/layer_forward.py), and the normed input (2 x 25,600), the gate's output holding SiLU of it and
    #   the up projection's output multiplied into it [200, 128] bf16 (2 x 51,200): 33,792 + 51,200 + 102,400 =
    #   187,392.
    #   No CUDA context, no cuBLAS workspace: overhead 0.
    (dev,) = layout(tiny, "bf16").plan([cpu_device(10**9)], Workload(context=100, batch=2)).per_device
    assert (dev.weights_bytes, dev.kv_cache_bytes, dev.activation_bytes, dev.overhead_bytes) == (215_552, 51_200,
                                                                                                187_392, 0)
    assert dev.layers == range(0, 2)


def test_tiny_runtime_terms_on_a_gpu_count_segments_workspace_and_context(tiny):
    # On a GPU the transient term is what the caching allocator reserves beyond the weights and the persistent
    # tensors. Loading: the allocator warm-up (215,552 bytes, all below 1 MiB) takes a 2 MiB small-pool
    # segment, frees it, and the weights (215,552) fill it. Then the cuBLAS workspace, 32 MiB in its own
    # segment (a card of unknown capability gets Hopper's), the 4 KV tensors (12,800 each) and the prompt ids
    # 2 x 100 x 8 = 1,600 -> 2,048: persistent 33,554,432 + 51,200 + 2,048 = 33,607,680.
    #   Every transient fits the small segment's rest: reserved = 32 MiB + 2 MiB = 35,651,584,
    #   transient = 35,651,584 - 215,552 - 33,607,680 = 1,828,352.
    #   Overhead: the CUDA context plus the workspace and the ids: + 33,556,480.
    (gpu,) = parse_gpu_spec("1x48GB")
    (dev,) = layout(tiny, "bf16").plan([gpu], Workload(context=100, batch=2)).per_device
    assert (dev.kv_cache_bytes, dev.activation_bytes) == (51_200, 1_828_352)
    assert dev.overhead_bytes == CUDA_CONTEXT_BYTES + 33_556_480


def test_the_plan_describes_the_engine_it_is_told_runs(tiny):
    # heavylift's engine: every layer's cache holds the full context, whatever its window; its RoPE tables
    # [100, 8] bf16 (1,600 -> 2,048 each) and the per-sequence lengths int32 [2] (512) are its buffers.
    windowed = architecture_from_config({**TINY_LLAMA, "model_type": "mistral", "sliding_window": 32})
    cpu = cpu_device(10**9)
    on_transformers = layout(windowed, "bf16").plan([cpu], Workload(context=100, batch=2)).per_device[0]
    on_engine = layout(windowed, "bf16").plan([cpu], Workload(context=100, batch=2, engine=FAST)).per_device[0]
    assert on_transformers.kv_cache_bytes == 4 * 2 * 2 * 32 * 16 * 2  # StaticSlidingWindowLayer: 32 positions
    assert on_engine.kv_cache_bytes == 4 * 2 * 2 * 100 * 16 * 2
    assert on_engine.overhead_bytes == 2 * 2_048 + 512
    with pytest.raises(InvalidArgumentError, match="engine"):
        Workload(context=100, batch=2, engine="auto")


def test_nf4_dq_rule_matches_bitsandbytes():
    """The storage rule equals the tensors bitsandbytes really creates (before allocator rounding)."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")

    for shape in [(256, 512), (96, 64), (1000, 64)]:
        w = torch.randn(*shape, dtype=torch.bfloat16)
        for dq, rule in ((False, SCHEMES["nf4"].components), (True, SCHEMES["nf4-dq"].components)):
            p = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq, quant_type="nf4")
            p = p._quantize("cpu")
            qs = p.quant_state
            found = [p.data.nbytes, qs.absmax.nbytes, qs.code.nbytes]
            if dq:
                found += [qs.state2.absmax.nbytes, qs.offset.nbytes, qs.state2.code.nbytes]
            numel = shape[0] * shape[1]
            assert sorted(found) == sorted(rule(numel, shape[0])), (shape, dq)


def test_int8_rule_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")

    w = torch.randn(96, 64, dtype=torch.bfloat16)
    p = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    assert sorted([p.data.nbytes, p.SCB.nbytes]) == sorted(SCHEMES["int8"].components(96 * 64, 96))


@pytest.mark.parametrize("name, params", [("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
                                          ("llama3.1-405b", 405_853_388_800)])
def test_llama_parameter_counts(name, params):
    assert architecture_from_config(find_model(name).config_dict()).params == params


@pytest.mark.parametrize("entry", [e.aliases[0] for e in catalog_entries()])
def test_every_catalog_model_counts_its_published_parameters(entry):
    e = find_model(entry)
    assert architecture_from_config(e.config_dict()).params == e.params


def test_8b_resident_bytes_match_the_seed_measurement():
    """The seed article measured 16,060,523,520 (bf16) and 9,086,706,688 (int8, fp8) resident bytes on an
    H100 for this shape: the rotary table (one 512-byte block) and one more 512-byte block aside, exact."""
    arch = architecture_from_config(find_model("llama3.1-8b").config_dict())
    assert 16_060_523_520 - SCHEMES["bf16"].weights_bytes(arch.tensors) == 1024
    assert 9_086_706_688 - SCHEMES["int8"].weights_bytes(arch.tensors) == 1024


def test_sliding_window_layers_hold_at_most_the_window():
    gemma = architecture_from_config(find_model("gemma2-9b").config_dict())
    assert gemma.layer_windows[:2] == (4096, None)
    (gpu,) = parse_gpu_spec("1xH100")
    kv = layout(gemma, "bf16").plan([gpu], Workload(context=8192, batch=1)).per_device[0].kv_cache_bytes
    per_token = 2 * gemma.num_kv_heads * gemma.head_dim * 2
    assert kv == per_token * (21 * 4096 + 21 * 8192)


def test_moe_experts_are_quantized_but_router_is_not():
    arch = architecture_from_config(find_model("mixtral-8x7b").config_dict())
    bf16, nf4 = SCHEMES["bf16"], SCHEMES["nf4"]
    experts = [t for t in arch.tensors if t.role.value == "expert"]
    routers = [t for t in arch.tensors if t.role.value == "router"]
    assert nf4.weights_bytes(experts) < bf16.weights_bytes(experts) / 3.5
    assert nf4.weights_bytes(routers) == bf16.weights_bytes(routers)


def _brute_force_best_margin(costs: Costs, caps: list[int]) -> int:
    n, best = len(costs.layer_bytes), None
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(caps) - 1):
        bounds = (0, *cuts, n)
        margins = []
        for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if a < b:
                margins.append(caps[d] - costs.device_fixed[d] - sum(_unit(costs, i) for i in range(a, b)))
        best = max(best, min(margins)) if best is not None else min(margins)
    return best


@pytest.mark.parametrize("caps", [[1000, 1000], [1500, 600], [600, 1500, 900], [400, 400, 400]])
def test_balance_finds_the_largest_equal_margin(caps):
    costs = Costs(layer_bytes=(100, 120, 90, 100, 110, 100, 95, 105), first_bytes=50, last_bytes=70,
                  device_fixed=tuple([80] * len(caps)))
    split = balance(costs, caps)
    margins = [caps[d] - costs.device_fixed[d] - sum(_unit(costs, i) for i in r)
               for d, r in enumerate(split.layers) if r]
    assert [i for r in split.layers for i in r] == list(range(8))
    assert min(margins) == _brute_force_best_margin(costs, caps)


def test_mixed_gpus_split_by_capacity():
    arch = architecture_from_config(find_model("llama3.1-70b").config_dict())
    devices = parse_gpu_spec("1xH100,1xA100-40GB")
    plan = make_plan("llama3.1-70b", arch, devices, Workload(context=8192, batch=1), ["nf4"])
    h100, a100 = plan.schemes[0].per_device
    assert plan.schemes[0].fits
    assert h100.layers.start == 0 and a100.layers.stop == 80 and h100.layers.stop == a100.layers.start
    assert len(h100.layers) > len(a100.layers)  # the larger card takes more layers
    # Equal margins in bytes, up to the last unit moved: the A100's is the head (bf16 lm_head + logits).
    head = layout(arch, "nf4").head
    assert 0 <= h100.free_bytes - a100.free_bytes <= head + 2 * h100.weights_bytes // len(h100.layers)


def test_405b_does_not_fit_one_h100_and_advice_has_numbers():
    arch = architecture_from_config(find_model("llama3.1-405b").config_dict())
    plan = make_plan("llama3.1-405b", arch, parse_gpu_spec("1xH100"), Workload(context=8192, batch=1),
                     ["bf16", "nf4-dq"])
    assert plan.recommended is None
    advice = " ".join(plan.scheme("nf4-dq").advice)
    assert "does not fit" in advice and "--gpus 3xH100-80GB" in advice


def test_offload_is_reported_with_its_slowdown():
    arch = architecture_from_config(find_model("llama3.1-70b").config_dict())
    work = Workload(context=4096, batch=1, allow_offload=True)
    plan = make_plan("llama3.1-70b", arch, parse_gpu_spec("1xRTX4090"), work, ["nf4"])
    s = plan.schemes[0]
    assert s.offload_bytes > 0 and not s.fits or s.offload is not None
    assert s.per_device[0].free_bytes >= 0
    assert "offloads" in s.advice[0] and "PCIe" in s.advice[0]


def test_recommendation_prefers_fp8_on_hopper_and_int8_on_ampere():
    arch = architecture_from_config(find_model("llama3.1-70b").config_dict())
    work = Workload(context=8192, batch=1)
    quants = list(SCHEMES)
    assert make_plan("m", arch, parse_gpu_spec("1xH100"), work, quants).recommended == "fp8"
    assert make_plan("m", arch, parse_gpu_spec("1xA100-80GB"), work, quants).recommended == "int8"
    assert make_plan("m", arch, parse_gpu_spec("2xA100-80GB"), work, quants).recommended == "bf16"


def test_workload_rejects_bad_values():
    for bad in ({"context": 0, "batch": 1}, {"context": 10, "batch": -1}, {"context": 10, "batch": 1, "kv_dtype": "x"}):
        with pytest.raises(InvalidArgumentError):
            Workload(**bad)


def test_planner_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, heavylift, heavylift.planner.plan, heavylift.planner.make, heavylift.planner.advice, "
            "heavylift.planner.contract, heavylift.api; "
            "heavylift.plan('llama3.1-8b', gpus='1xH100'); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_scheme_says_how_it_stores_and_runs():
    """The scheme records are what modules ask; their answers for the seven precisions, written out."""
    four_bit = {name for name, s in SCHEMES.items() if s.four_bit}
    rowwise = {name: s.row_max for name, s in SCHEMES.items() if s.rowwise8}
    assert four_bit == {"nf4", "nf4-dq", "fp4"}
    assert rowwise == {"fp8": 448.0, "int8": 127.0}
    assert [name for name, s in SCHEMES.items() if s.double_quant] == ["nf4-dq"]
    assert [name for name, s in SCHEMES.items() if not s.engine_runs] == ["fp16"]
    assert {name: s.engine_gemv_max_rows for name, s in SCHEMES.items()} == {
        "bf16": 16, "fp16": 16, "fp8": 64, "int8": 64, "nf4": 64, "nf4-dq": 64, "fp4": 64}


@pytest.mark.parametrize("model,engine", [("mixtral-8x7b", TRANSFORMERS), ("llama3.2-1b", FAST),
                                          ("llama3.2-1b", TRANSFORMERS)])
def test_fp4_allocates_exactly_as_nf4(monkeypatch, model, engine):
    """fp4 shares nf4's runtime terms (memory.allocating_twin); each computed on its own, they are equal."""
    from heavylift.planner import memory
    from heavylift.planner.forward_program import Part

    assert memory.allocating_twin("fp4") == "nf4"
    assert [memory.allocating_twin(q) for q in SCHEMES if q != "fp4"] == [q for q in SCHEMES if q != "fp4"]
    monkeypatch.setattr(memory, "allocating_twin", lambda quant: quant)
    memory.clear_caches()
    arch = architecture_from_config(find_model(model).config_dict())
    device = parse_gpu_spec("1xH100")[0]
    for part in (Part(range(arch.num_layers), True, True), Part(range(1, 3), False, False)):
        terms = {q: memory.runtime_terms(arch, q, engine, 4096, 2, 2, device, part, every_layer=True)
                 for q in ("nf4", "fp4")}
        assert terms["fp4"] == terms["nf4"]
    memory.clear_caches()
