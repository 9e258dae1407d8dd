"""bench/validate_plan.py on CPU: its matrix, checkpoints, estimators, records, merge and summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import validate_plan as vp  # noqa: E402

from conftest import TINY_LLAMA  # noqa: E402


def _plan_on(case, card="H100"):
    from heavylift.hardware.gpus import parse_gpu_spec

    return vp.plan_scheme(case, parse_gpu_spec(f"{case.gpus}x{card}"))


def test_matrix_covers_every_model_precision_context_and_batch():
    one = [c for c in vp.MATRIX if c.gpus == 1]
    two = [c for c in vp.MATRIX if c.gpus == 2]
    runs_on_h100 = [c for c in one if _plan_on(c).fits]
    assert len(runs_on_h100) >= 40 and len(two) >= 6
    assert len({c.key for c in vp.MATRIX}) == len(vp.MATRIX)
    assert {c.model for c in runs_on_h100} == set(vp.MODELS)
    assert {c.quant for c in runs_on_h100} == {"bf16", "fp8", "int8", "nf4", "nf4-dq"}
    assert {c.context for c in runs_on_h100} == {1024, 8192, 32768}
    assert {c.batch for c in runs_on_h100} == {1, 8}
    assert all(sum(c.quant == q for c in runs_on_h100) >= 5 for q in vp.SEED_RULE_BYTES_PER_PARAM)
    # The cases the plan refuses: recorded, not run. Gemma 2 9B bf16 at 32k x 8 is one; its nf4 twin now fits,
    # prefilling in 256-token chunks.
    assert 1 <= len(one) - len(runs_on_h100) <= 3


def test_two_gpu_cases_split_and_one_balances_a_long_context():
    long = [c for c in vp.MATRIX if c.gpus == 2 and c.context == 32768 and c.batch == 8 and _plan_on(c).fits]
    plans = [_plan_on(c).per_device for c in long]
    assert any(d[0].kv_cache_bytes > d[0].weights_bytes for d in plans)  # the KV cache dominates somewhere
    for first, second in plans:
        assert first.layers and second.layers
        assert abs(first.total_bytes - second.total_bytes) < 0.1 * first.total_bytes


def test_list_prints_every_case():
    text = vp.list_matrix()
    assert all(c.key in text for c in vp.MATRIX) and "on two" in text
    # gpt-oss at 1k x 8 holds the most at a 1,020-token prompt (tests/planner/test_prompt_lengths.py): its run
    # prefills that.
    (row,) = [line for line in text.splitlines() if line.startswith("gpt-oss-20b/bf16/1k/b8/1gpu")]
    assert row.split()[-2:] == ["1020", "yes"]


def _language_model_kwargs(folder, source) -> dict:
    """from_pretrained's arguments for a multimodal checkpoint's language model, as heavylift's loader passes them."""
    from transformers import AutoConfig

    from heavylift.model.families import WRAPPED_PREFIX

    if not source.architecture.wrapped:
        return {}
    return {"config": AutoConfig.from_pretrained(folder).get_text_config(decoder=True),
            "key_mapping": {f"^{WRAPPED_PREFIX.replace('.', '[.]')}": ""}}


@pytest.mark.parametrize("model", list(vp.MODELS))
def test_checkpoint_builder_round_trips_through_transformers_and_heavylift(tmp_path, model):
    """Every toy checkpoint loads into transformers' model with no key missing, unexpected or mismatched (stored
    forms dequantized on load on CPU), and holds exactly heavylift's inventory (resolve_model checks the headers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from heavylift.model.source import resolve_model

    config = vp.model_config(model, shrink=True)
    folder = vp.build_checkpoint(config, tmp_path / model)
    source = resolve_model(str(folder))  # heavylift's inventory check against the safetensors headers
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True,
                                                        **_language_model_kwargs(folder, source))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert sum(p.numel() for p in loaded.parameters()) == source.architecture.params
    assert all(torch.isfinite(p.float()).all() for p in loaded.parameters())
    assert vp.language_part(json.loads((folder / "config.json").read_text()))["num_hidden_layers"] == 2
    assert (folder / "tokenizer.json").is_file()


def test_pre_quantized_toy_checkpoints_are_stored_as_the_hub_stores_them(tmp_path):
    """DeepSeek-V3: float8_e4m3fn linear weights with float32 block scales; router, score bias, norms,
    embeddings and lm_head as they load. gpt-oss: uint8 MXFP4 code pairs and scales for the experts, attention
    in bf16. Dequantized, the FP8 weights keep the random weights' spread."""
    import torch
    from transformers import AutoModelForCausalLM

    from heavylift.model.checkpoint import read_checkpoint

    deepseek = vp.build_checkpoint(vp.model_config("deepseek-v3", shrink=True), tmp_path / "ds")
    headers = read_checkpoint(deepseek).tensors
    moe = "model.layers.1.mlp"
    assert headers["model.layers.0.self_attn.kv_b_proj.weight"].dtype == "F8_E4M3"
    assert headers["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape == (8, 2)  # [256, 64] in 32 x 32
    assert headers[f"{moe}.experts.3.down_proj.weight_scale_inv"].dtype == "F32"
    assert headers[f"{moe}.gate.weight"].dtype == "BF16"
    assert headers[f"{moe}.gate.e_score_correction_bias"].dtype == "F32"
    assert headers["model.layers.0.mlp.gate_proj.weight"].dtype == "F8_E4M3"  # the dense first layer
    assert headers["lm_head.weight"].dtype == "BF16" and "lm_head.weight_scale_inv" not in headers
    q_b = AutoModelForCausalLM.from_pretrained(deepseek, dtype=torch.bfloat16).model.layers[0].self_attn.q_b_proj
    assert 0.015 < q_b.weight.float().std() < 0.025

    oss = vp.build_checkpoint(vp.model_config("gpt-oss-20b", shrink=True), tmp_path / "oss")
    headers = read_checkpoint(oss).tensors
    experts = "model.layers.0.mlp.experts"
    assert headers[f"{experts}.gate_up_proj_blocks"].shape == (4, 256, 2, 16)  # [experts, 2 x 128, 64 / 32, 16]
    assert headers[f"{experts}.down_proj_scales"].shape == (4, 64, 4)  # [experts, 64, 128 / 32]
    assert headers[f"{experts}.down_proj_scales"].dtype == "U8"
    assert f"{experts}.gate_up_proj" not in headers and headers[f"{experts}.gate_up_proj_bias"].dtype == "BF16"
    assert headers["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"


def test_the_new_families_are_cut_to_a_few_gb_and_stored_as_heavylift_plans_them():
    """At their GPU sizes, the checkpoints the builder would write (built on the meta device) hold exactly the
    tensors heavylift's inventory expects, in the stored dtypes, each a few GB."""
    from heavylift.model.architecture import architecture_from_config
    from heavylift.model.checkpoint import Checkpoint, TensorInfo, check_against
    from heavylift.model.families import WRAPPED_PREFIX
    from heavylift.model.tensors import FP32_ALWAYS

    sizes, dtypes = {}, {}
    for model in vp.NEW_FAMILIES:
        config = vp.model_config(model)
        arch = architecture_from_config(config)
        shards, stored = vp.checkpoint_tensors(config)
        fp32 = {t.name for t in arch.tensors if t.keep_fp32 == FP32_ALWAYS}
        tensors = {n: t for shapes in shards.values()
                   for n, t in vp._shard_tensors(shapes, stored, fp32, "meta", None).items()}
        prefix = WRAPPED_PREFIX if arch.wrapped else ""
        check_against(arch, Checkpoint({prefix + n: TensorInfo(tuple(t.shape), str(t.dtype), "")
                                        for n, t in tensors.items()}, ()), model)
        sizes[model] = round(sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9, 1)
        dtypes[model] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    assert sizes == {"qwen3-8b": 5.6, "gpt-oss-20b": 4.2, "gemma3-27b": 7.8, "qwen3-235b-a22b": 7.5,
                     "llama4-scout": 8.5, "deepseek-v3": 17.0}
    assert dtypes["deepseek-v3"] == ["bfloat16", "float32", "float8_e4m3fn"]
    assert dtypes["gpt-oss-20b"] == ["bfloat16", "uint8"]


def test_list_plans_the_new_families_alone(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["validate_plan.py", "--list", "--models", "new-families"])
    vp.main()
    rows = capsys.readouterr().out.splitlines()
    cases = [c for c in vp.MATRIX if c.model in vp.NEW_FAMILIES]
    assert [r.split()[0] for r in rows[1:-1]] == [vp.replace(c, engine=vp.AUTO).key for c in cases]
    assert all(r.endswith("  yes") for r in rows[1:-1])
    assert rows[-1] == f"{len(cases)} cases: {len(cases)} on one GPU, 0 on two"
    assert {r.split()[0]: r.split()[-3] for r in rows[1:-1]}["qwen3-8b/nf4-dq/8k/b1/1gpu/auto"] == "fast"
    assert {c.model for c in cases} == set(vp.NEW_FAMILIES)
    assert {c.quant for c in cases if c.model == "deepseek-v3"} == {"fp8", "bf16"}
    assert {c.quant for c in cases if c.model == "gpt-oss-20b"} == {"bf16"}


def test_an_unknown_model_names_the_groups(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["validate_plan.py", "--list", "--models", "qwen9"])
    with pytest.raises(SystemExit, match="choose from .*qwen3-235b-a22b, new-families$"):
        vp.main()


def test_kept_block_fp8_runs_under_transformers_5_24_and_needs_the_kernels_package_under_another(monkeypatch):
    import importlib.util

    from heavylift.model import prequantized

    fp8, bf16 = vp.Case("deepseek-v3", "fp8", 8192, 1, 1), vp.Case("deepseek-v3", "bf16", 1024, 8, 1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(prequantized, "installed_transformers", lambda: "5.24.0")
    assert vp.unmet_requirement(fp8) is None  # heavylift's torch matmuls run it
    monkeypatch.setattr(prequantized, "installed_transformers", lambda: "5.25.0")
    unmet = ("--quant fp8 keeps the block-FP8 weights, which heavylift runs with transformers 5.24 (this is 5.25.0), "
             "or transformers on GPUs of compute capability 8.9 or later with the `kernels` package; install "
             "transformers 5.24 (pip install 'transformers>=5.24,<5.25'), or use --quant bf16 to dequantize them "
             "while they load")
    assert vp.unmet_requirement(fp8) == unmet
    assert vp.unmet_requirement(bf16) is None and vp.unmet_requirement(vp.Case("qwen3-8b", "fp8", 1024, 1, 1)) is None
    record = vp.finish_record({**vp.base_record(fp8, _plan_on(fp8)), "skipped": vp.unmet_requirement(fp8)},
                              {"accelerate_estimate_bytes": 1, "seed_rule_bytes": 2})
    table = vp.summarize({"card": "H100", "date": "2026-12-06", "cases": [record]})
    assert f"| not run: {unmet} |" in table


def test_model_config_keeps_the_catalog_shape_with_fewer_layers():
    assert vp.model_config("llama3.1-70b")["num_hidden_layers"] == 10
    assert vp.model_config("mixtral-8x7b")["num_local_experts"] == 8
    assert vp.model_config("gemma2-9b")["num_hidden_layers"] == 42
    deepseek = vp.model_config("deepseek-v3")  # three dense layers, then one MoE layer, in block FP8
    assert deepseek["num_hidden_layers"] == 4 and deepseek["first_k_dense_replace"] == 3
    assert deepseek["quantization_config"]["weight_block_size"] == [128, 128]
    assert vp.model_config("gemma3-27b")["text_config"]["num_hidden_layers"] == 6  # the sixth is the full layer
    oss = vp.model_config("gpt-oss-20b")
    assert oss["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert oss["quantization_config"]["quant_method"] == "mxfp4"


@pytest.mark.parametrize("quant, accelerate, seed", [
    # LlamaModel, the model accelerate builds (no lm_head): embed 256x64 = 16384; per layer q 4096, k 2048,
    # v 2048, o 4096, gate/up/down 3 x 8192, two norms 128 = 36992, twice = 73984; final norm 64: 90432
    # params, 361728 float32 bytes, plus inv_freq and original_inv_freq (2 x 8 float32) = 361792.
    # The seed rule counts the causal LM: 90432 + lm_head 16384 = 106816 params.
    ("bf16", 361792 // 2, 106816 * 2),
    ("fp8", 361792 // 4, 106816),
    ("int8", 361792 // 4, 106816),
    ("nf4", 361792 // 8, 106816 // 2),
    ("nf4-dq", 361792 // 8, 106816 // 2),
])
def test_estimators_give_hand_counted_bytes(quant, accelerate, seed):
    out = vp.estimates(dict(TINY_LLAMA), quant)
    assert out["params"] == 106816
    assert out["accelerate_estimate_bytes"] == accelerate and out["seed_rule_bytes"] == seed


def test_phase_figures_add_the_non_allocator_part_to_the_allocator_peak():
    # the poller saw 100; at the end the driver shows 90 of which the allocator reserves 60 (30 outside
    # it: context, cuBLAS); the allocator's peak reserve was 80, so the device peaked at 110 at least
    fig = vp.phase_figures(polled_peak=100, used_end=90, reserved_end=60, max_reserved=80, max_allocated=70)
    assert fig["measured_bytes"] == 110 and fig["non_allocator_bytes"] == 30
    assert fig["needed_bytes"] == 100  # peak allocated + what lies outside the allocator
    assert vp.phase_figures(200, 90, 60, 80, 70)["measured_bytes"] == 200  # polling caught a higher peak


def _case_record(predicted=(121,), measured=(110,), case=vp.MATRIX[0], **extra):
    devices = []
    for i, (p, m) in enumerate(zip(predicted, measured)):
        planned = {"index": i, "name": "H100", "layers": [0, 1], "predicted_bytes": p}
        phases = {"load": vp.phase_figures(m // 2, m // 2, m // 4, m // 4, m // 5),
                  "prefill": vp.phase_figures(m, m - 10, m - 30, m - 20, m - 40)}
        devices.append(vp.device_record(planned, phases))
    record = {"model": case.model, "quant": case.quant, "context": case.context, "batch": case.batch,
              "gpus": len(devices), "load_s": 3.0, "fits_predicted": True, "oom": False, "devices": devices, **extra}
    return vp.finish_record(record, {"accelerate_estimate_bytes": 55, "seed_rule_bytes": 220})


def test_records_carry_per_device_and_total_errors():
    record = _case_record(predicted=(121, 99), measured=(110, 110))
    first, second = record["devices"]
    assert first["measured_bytes"] == 110 and first["error_pct"] == 10.0 and second["error_pct"] == -10.0
    assert first["max_memory_allocated"] == 70 and set(first["phases"]) == {"load", "prefill"}
    assert record["predicted_bytes"] == 220 and record["measured_bytes"] == 220 and record["error_pct"] == 0.0
    assert record["accelerate_error_pct"] == -75.0 and record["seed_rule_error_pct"] == 0.0
    assert vp.error_pct(100, None) is None


def test_merge_keeps_measured_records_in_matrix_order():
    a, b = vp.MATRIX[0], vp.MATRIX[1]
    error = {"model": a.model, "quant": a.quant, "context": a.context, "batch": a.batch, "gpus": 1,
             "error": "child exited 1", "devices": []}
    first = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "command": "one",
             "cases": [_case_record(case=b), _case_record(case=a)]}
    second = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-27", "command": "two", "cases": [error]}
    merged = vp.merge([first, second])
    assert [vp.record_key(r) for r in merged["cases"]] == [a.key, b.key]
    assert "error" not in merged["cases"][0] and merged["date"] == "2026-11-27"
    assert merged["command"] == "one ; two" and merged["card"] == "NVIDIA H100 80GB HBM3"


def test_merge_files_and_summarize_through_the_command_line(tmp_path, capsys, monkeypatch):
    files = []
    for i, case in enumerate(vp.MATRIX[:2]):
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "command": f"c{i}",
                                         "cases": [_case_record(case=case)]}))
    out = tmp_path / "final.json"
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(sys, "argv", ["validate_plan.py", "--merge-files", *map(str, files), "--out", str(out)])
    vp.main()
    assert [vp.record_key(r) for r in json.loads(out.read_text())["cases"]] == [c.key for c in vp.MATRIX[:2]]
    monkeypatch.setattr(sys, "argv", ["validate_plan.py", "--summarize", str(out)])
    vp.main()
    table = capsys.readouterr().out
    assert table.count("| llama3.1-8b | bf16 |") == 2 and "| 0.00 (+10.0%) |" in table
    assert "Max |error| of the plan over 2 GPU measurements: 10.0%" in table


def test_engine_runs_are_cases_of_their_own():
    case = vp.replace(vp.MATRIX[0], engine="auto")
    assert case.key == vp.MATRIX[0].key + "/auto"
    assert vp.record_key(vp.asdict(case)) == case.key and vp.record_key(vp.asdict(vp.MATRIX[0])) == vp.MATRIX[0].key


def test_card_slug():
    assert vp.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert vp.card_slug("NVIDIA H200") == "h200"
    assert vp.card_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"


@pytest.mark.parametrize("model, engine", [("mixtral-8x7b", "transformers"), ("gemma2-9b", "transformers"),
                                           ("mistral-7b", "fast"), ("qwen3-8b", "fast"),
                                           *((m, "transformers") for m in vp.NEW_FAMILIES[1:])])
def test_the_loop_fills_the_cache_to_the_context_exactly(tmp_path, monkeypatch, model, engine):
    import heavylift

    monkeypatch.setattr(vp, "DECODE_STEPS", 4)  # 32 on the GPU; 4 keep the CPU test quick
    folder = vp.build_checkpoint(vp.model_config(model, shrink=True), tmp_path / model)
    session = heavylift.load(str(folder), quant="bf16", context=48, batch=2, engine=engine)
    assert (session.engine is not None) == (engine == "fast")
    marks = []
    _, _, cached = vp.drive(session, 48, 2, marks.append, 44)
    assert marks == ["prefill", "decode"] and cached == 48


def test_decode_steps_stop_where_the_cache_holds_the_context():
    assert [vp.decode_steps(1024, prompt) for prompt in (992, 1000, 1020, 1024)] == [32, 24, 4, 0]

class _FakeCuda:
    """torch.cuda's memory calls on one device whose use climbs by 10 bytes per query."""

    def __init__(self):
        self.used = 0

    def mem_get_info(self, i):
        self.used += 10
        return 1000 - self.used, 1000

    def synchronize(self, i):
        pass

    def memory_reserved(self, i):
        return 5

    def max_memory_reserved(self, i):
        return 7

    def max_memory_allocated(self, i):
        return 6

    def reset_peak_memory_stats(self, i):
        pass


def test_meter_closes_phases_per_device():
    meter = vp.Meter(1, cuda=_FakeCuda())
    meter.phase("load")
    meter.phase("prefill")
    meter.stop()
    (phases,) = meter.by_device()
    assert list(phases) == ["load", "prefill"] and meter.start_bytes == [10]
    assert phases["prefill"]["measured_bytes"] >= phases["load"]["measured_bytes"] > 10
    assert phases["load"]["max_memory_allocated"] == 6


def test_a_case_the_plan_refuses_is_recorded_as_planned_and_summarized():
    case = vp.Case("gemma2-9b", "bf16", 32768, 8, 1)
    scheme = _plan_on(case)
    record = vp.finish_record({**vp.base_record(case, scheme), "skipped": "the plan says it does not fit"},
                              {"accelerate_estimate_bytes": 1, "seed_rule_bytes": 2})
    assert not record["fits_predicted"] and record["measured_bytes"] is None and record["error_pct"] is None
    assert record["devices"][0]["predicted_bytes"] == scheme.per_device[0].total_bytes
    table = vp.summarize({"card": "H100", "date": "2026-11-26", "cases": [record]})
    predicted = vp.gb(scheme.per_device[0].total_bytes)
    assert f"| gemma2-9b | bf16 | 32k | 8 | 1 | {predicted} | does not fit (plan) |" in table


def test_cases_run_and_are_planned_on_the_engine_run_would_use():
    llama, gemma = vp.Case("llama3.1-8b", "nf4", 8192, 1, 1), vp.Case("gemma2-9b", "bf16", 8192, 1, 1)
    assert vp.case_engine(vp.replace(llama, engine=vp.AUTO)) == "fast"
    assert vp.case_engine(llama) == "transformers"  # the matrix as listed for --engine transformers
    assert vp.case_engine(vp.replace(gemma, engine=vp.AUTO)) == "transformers"  # not a family the engine runs
    assert "/auto" in vp.list_matrix().splitlines()[1]


def test_the_default_engine_is_auto(monkeypatch):
    seen = {}
    monkeypatch.setattr(vp, "run_matrix", lambda args: seen.update(engine=args.engine))
    monkeypatch.setattr(sys, "argv", ["validate_plan.py", "--gpus", "1"])
    vp.main()
    assert seen == {"engine": vp.AUTO}


def test_replan_puts_the_current_plan_beside_the_same_measurements():
    case = vp.replace(vp.Case("qwen2.5-7b", "fp8", 1024, 1, 1), engine=vp.AUTO)
    scheme = _plan_on(case)
    stale = vp.finish_record({**vp.base_record(case, scheme), "devices": [
        {**vp.base_record(case, scheme)["devices"][0], "predicted_bytes": 1000, "measured_bytes": 2000,
         "error_pct": -50.0}]}, vp.estimates(vp.model_config(case.model), case.quant))
    results = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "command": "run", "cases": [stale]}
    (again,) = vp.replan(results, "replan")["cases"]
    device = again["devices"][0]
    assert device["measured_bytes"] == 2000 and device["predicted_bytes"] == scheme.per_device[0].total_bytes
    assert device["error_pct"] == vp.error_pct(scheme.per_device[0].total_bytes, 2000)
    assert again["planned_at_run"] == {"predicted_bytes": 1000, "error_pct": -50.0}
    assert vp.replan({**results, "cases": [again]}, "again")["cases"][0]["planned_at_run"]["predicted_bytes"] == 1000
