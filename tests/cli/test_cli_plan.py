"""`heavylift plan` through the CLI: output, JSON contract, and every user mistake in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY_LLAMA, run_cli, write_config


def test_plan_table_for_catalog_model(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--gpus", "8xH100")
    assert code == 0
    assert "405,853,388,800 parameters" in out and "nf4-dq" in out and "recommended: --quant fp8" in out


def test_plan_json_contract(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-70b", "--gpus", "1xH100,1xA100-40GB", "--context", "4096",
                           "--batch", "2", "--json")
    assert code == 0
    plan = json.loads(out)
    assert {"model", "model_type", "params", "context", "batch", "devices", "schemes", "recommended"} <= plan.keys()
    assert (plan["params"], plan["context"], plan["batch"]) == (70_553_706_496, 4096, 2)
    assert [d["index"] for d in plan["devices"]] == [0, 1]
    assert all({"index", "name", "capacity_bytes"} <= d.keys() for d in plan["devices"])
    scheme_keys = {"quant", "weights_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes", "total_bytes",
                   "fits", "offload_bytes", "per_device", "decode_tok_s_upper_bound", "advice", "worst_prompt_tokens"}
    device_keys = {"device", "layers", "weights_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes",
                   "total_bytes", "free_bytes", "worst_prompt_tokens"}
    assert [s["quant"] for s in plan["schemes"]] == ["bf16", "fp16", "fp8", "int8", "nf4", "nf4-dq", "fp4"]
    for s in plan["schemes"]:
        assert scheme_keys <= s.keys()
        assert s["total_bytes"] == s["weights_bytes"] + s["kv_cache_bytes"] + s["activation_bytes"] + s["overhead_bytes"]
        for d in s["per_device"]:
            assert device_keys <= d.keys()
            assert d["total_bytes"] == (d["weights_bytes"] + d["kv_cache_bytes"] + d["activation_bytes"]
                                        + d["overhead_bytes"])
        layers = [d["layers"] for d in s["per_device"] if d["layers"]]
        assert layers[0][0] == 0 and layers[-1][1] == 79
        assert all(0 < d["worst_prompt_tokens"] <= 4096 for d in s["per_device"] if d["layers"])
        tightest = min((d for d in s["per_device"] if d["layers"]), key=lambda d: d["free_bytes"])
        assert s["worst_prompt_tokens"] == tightest["worst_prompt_tokens"]
    assert plan["recommended"] in {s["quant"] for s in plan["schemes"] if s["fits"]}


def test_plan_local_folder(tmp_path, capsys):
    write_config(tmp_path, TINY_LLAMA)
    code, out, _ = run_cli(capsys, "plan", str(tmp_path), "--gpus", "2x48GB", "--quant", "nf4", "--json")
    assert code == 0 and json.loads(out)["schemes"][0]["quant"] == "nf4"


def test_plot_is_written(tmp_path, capsys):
    target = tmp_path / "mem.png"
    code, _, _ = run_cli(capsys, "plan", "mistral-7b", "--gpus", "1xRTX4090", "--plot", str(target))
    assert code == 0 and target.stat().st_size > 10_000


BAD_INPUTS = [
    (["plan", "/no/such/dir"], "no folder or catalog model"),
    (["plan", "llama3-8b"], "did you mean llama3.1-8b"),
    (["plan", "someone/unknown-model"], "not in the hub cache"),
    (["plan", "llama3.1-8b", "--gpus", "4xFoo"], "expected items like"),
    (["plan", "llama3.1-8b", "--gpus", "0xH100"], "expected items like"),
    (["plan", "llama3.1-8b", "--context", "0"], "--context must be a positive"),
    (["plan", "llama3.1-8b", "--batch", "-3"], "--batch must be a positive"),
    (["plan", "llama3.1-8b", "--quant", "int3"], "--quant must be all or one of"),
    (["plan", "llama3.1-8b", "--reserve", "lots"], "reserve"),
    (["plan", "llama3.1-8b", "--kv-dtype", "int2"], "--kv-dtype must be one of"),
    (["plan", "llama3.1-8b", "--engine", "turbo"], "--engine must be one of"),
    (["plan", "gemma2-9b", "--gpus", "1xH100", "--engine", "fast"], "run it with --engine transformers"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_user_mistakes_are_one_line_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text, message", [("{", "malformed or truncated"), ('{"model_type": "t5"}', "not supported"),
                                            ('{"model_type": "llama"}', "has no 'hidden_size'")])
def test_bad_config_through_cli(tmp_path, capsys, text, message):
    (tmp_path / "config.json").write_text(text)
    code, _, err = run_cli(capsys, "plan", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_installed_command_end_to_end(tmp_path):
    """The console script a user runs: exit code 2 and no traceback for a mistake."""
    bad = subprocess.run([sys.executable, "-m", "heavylift", "plan", "llama3.1-8b", "--gpus", "2xBanana"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "expected items like" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "heavylift", "plan", "qwen2.5-72b", "--gpus", "2xH200", "--json"],
                          capture_output=True, text=True)
    assert good.returncode == 0 and json.loads(good.stdout)["recommended"]


def test_the_plan_describes_the_runtime_run_would_use(capsys):
    # heavylift's engine runs Llama in every precision but fp16 on a CUDA GPU; Gemma 2 runs on transformers.
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--json")
    engines = {s["quant"]: s["engine"] for s in json.loads(out)["schemes"]}
    assert code == 0 and engines.pop("fp16") == "transformers" and set(engines.values()) == {"fast"}
    code, out, _ = run_cli(capsys, "plan", "gemma2-9b", "--gpus", "1xH100", "--json")
    assert {s["engine"] for s in json.loads(out)["schemes"]} == {"transformers"}
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--engine", "transformers", "--json")
    assert {s["engine"] for s in json.loads(out)["schemes"]} == {"transformers"}
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--quant", "nf4")
    assert code == 0 and "planned for heavylift's engine" in out
    # --engine fast over every precision: fp16, which the engine cannot run, is planned as run would run it.
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--engine", "fast", "--json")
    engines = {s["quant"]: s["engine"] for s in json.loads(out)["schemes"]}
    assert code == 0 and engines.pop("fp16") == "transformers" and set(engines.values()) == {"fast"}
    code, _, err = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--engine", "fast", "--quant", "fp16")
    assert code == 2 and "run it with --engine transformers" in err and len(err.strip().splitlines()) == 1


def test_a_plan_for_the_engine_is_the_engines_plan():
    import heavylift
    from heavylift.model.architecture import architecture_from_config
    from heavylift.model.catalog import find_model
    from heavylift.hardware.gpus import parse_gpu_spec
    from heavylift.planner.memory import FAST
    from heavylift.planner.make import make_plan
    from heavylift.planner.plan import Workload

    planned = heavylift.plan("mistral-7b", gpus="1xH100", context=32768, quant="nf4-dq").scheme("nf4-dq")
    arch = architecture_from_config(find_model("mistral-7b").config_dict())
    direct = make_plan("mistral-7b", arch, parse_gpu_spec("1xH100"), Workload(32768, 1, engine=FAST), ["nf4-dq"])
    assert planned.engine == FAST and planned.per_device == direct.scheme("nf4-dq").per_device


def test_plan_json_names_the_prompt_length_of_its_figures(capsys):
    # gpt-oss-20b at 1k x 8 holds the most at a 1,020-token prompt (tests/planner/test_prompt_lengths.py).
    code, out, _ = run_cli(capsys, "plan", "gpt-oss-20b", "--gpus", "1xH100", "--context", "1024", "--batch", "8",
                           "--quant", "bf16", "--json")
    assert code == 0
    (scheme,) = json.loads(out)["schemes"]
    (device,) = scheme["per_device"]
    assert scheme["worst_prompt_tokens"] == device["worst_prompt_tokens"] == 1020
    assert device["total_bytes"] - device["weights_bytes"] == 10_281_322_496
