"""Bad inputs through the CLI, as a user types them: exit 2, one line on stderr naming the fix, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from heavylift.hardware.gpus import parse_gpu_spec

from conftest import TINY_FAMILIES, TINY_LLAMA, run_cli, write_config

FAMILIES = ("llama, mistral, mixtral, qwen2, gemma2, phi3, qwen3, qwen3_moe, gemma3_text, llama4_text, deepseek_v3, "
            "gpt_oss")
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def refused(capsys, *args) -> str:
    """The one line a refused command prints, without its "error: " prefix."""
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("error: ")
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": None}, "'num_hidden_layers' is null; it must be an integer from 1 to 4,096"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' is true; it must be an integer from 1 to 4,096"),
    ({"num_hidden_layers": "2"}, "'num_hidden_layers' is \"2\"; it must be an integer from 1 to 4,096"),
    ({"num_hidden_layers": 2.0}, "'num_hidden_layers' is 2.0; it must be an integer from 1 to 4,096"),
    ({"num_hidden_layers": -2}, "'num_hidden_layers' is -2; it must be an integer from 1 to 4,096"),
    ({"num_hidden_layers": 10**12}, "'num_hidden_layers' is 1000000000000; it must be an integer from 1 to 4,096"),
    ({"hidden_size": 10**12}, "'hidden_size' is 1000000000000; it must be an integer from 1 to 1,048,576"),
    ({"vocab_size": 10**12}, "'vocab_size' is 1000000000000; it must be an integer from 1 to 16,777,216"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' is 0; it must be an integer from 1 to 16,777,216"),
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' is \"no\"; it must be true or false"),
    ({"hidden_size": 66}, "num_attention_heads 4 does not divide hidden_size 66 and there is no head_dim; "
                          "fix one of them or give head_dim"),
])
def test_bad_config_fields(tmp_path, capsys, change, message):
    write_config(tmp_path, {**TINY_LLAMA, **change})
    assert refused(capsys, "plan", str(tmp_path), "--gpus", "1xH100") == f"{tmp_path}/config.json: {message}"


def test_too_many_experts_in_all(tmp_path, capsys):
    write_config(tmp_path, {**TINY_FAMILIES["mixtral"], "num_hidden_layers": 100, "num_local_experts": 4096})
    assert refused(capsys, "plan", str(tmp_path), "--gpus", "1xH100") == (
        f"{tmp_path}/config.json describes 100 layers of 12,295 tensors, more than the 262,144 heavylift plans; "
        "check num_hidden_layers and num_local_experts")


def test_no_model_type(tmp_path, capsys):
    write_config(tmp_path, {k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    assert refused(capsys, "plan", str(tmp_path)) == f'{tmp_path}/config.json has no "model_type"; heavylift plans: {FAMILIES}'


def test_unknown_model_type(tmp_path, capsys):
    write_config(tmp_path, {**TINY_LLAMA, "model_type": "gpt2"})
    assert refused(capsys, "plan", str(tmp_path)) == (
        f'{tmp_path}/config.json: model_type "gpt2" is not supported; heavylift plans: {FAMILIES}')


def test_running_a_folder_without_weights_says_to_add_them(tmp_path, capsys):
    write_config(tmp_path, TINY_LLAMA)
    assert refused(capsys, "run", str(tmp_path), "--prompt", "hi") == (
        f"{tmp_path} has config.json but no *.safetensors weights; put the checkpoint's safetensors files and "
        "tokenizer in it, or give the model's hub id")


def _offline_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": UNREACHABLE_HUB, **extra}


def test_a_hub_id_without_a_hub_fails_at_once_in_one_line(tmp_path):
    """HF_HUB_OFFLINE unset and no hub answering: one request, no retries, one line (a subprocess, as
    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "heavylift", "plan", "acme/tiny-model", "--gpus", "1xH100"],
                          capture_output=True, text=True, env=_offline_env(tmp_path))
    elapsed = time.monotonic() - start
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"error: could not reach the hub at {UNREACHABLE_HUB} for 'acme/tiny-model' (ConnectError); pass a local "
        "folder or a catalog name, or set HF_HUB_OFFLINE=1 to plan from the hub cache (HF_TOKEN for gated models)\n")
    assert elapsed < 15  # huggingface_hub's own retries wait 23 s before they give up


def test_a_hub_id_in_the_cache_plans_without_a_hub(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-model" / "snapshots" / ("0" * 40)
    write_config(snapshot, TINY_LLAMA)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    done = subprocess.run([sys.executable, "-m", "heavylift", "plan", "acme/tiny-model", "--gpus", "1xH100",
                           "--json"], capture_output=True, text=True, env=_offline_env(tmp_path))
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["params"] == 2 * 64 * 256 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 128) + 64


def test_generic_gpus_are_decimal_gigabytes_and_binary_gibibytes(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.2-1b", "--gpus", "1x48GB,1x48GiB", "--json")
    assert code == 0
    assert [(d["name"], d["capacity_bytes"]) for d in json.loads(out)["devices"]] == [
        ("48GB", 48_000_000_000), ("48GiB", 48 * 1024**3)]


def test_advice_names_gpus_the_way_gpus_reads_them(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-70b", "--gpus", "1x24GiB", "--quant", "nf4", "--context", "1024",
                           "--json")
    (advice,) = [a for a in json.loads(out)["schemes"][0]["advice"] if a.startswith("use --gpus ")]
    assert code == 0 and advice == "use --gpus 2x24GiB: the fewest of these that hold nf4 at this context"
    spec = advice.split()[2].rstrip(":")
    assert [(d.name, d.memory_bytes) for d in parse_gpu_spec(spec)] == [("24GiB", 24 * 1024**3)] * 2
    code, out, _ = run_cli(capsys, "plan", "llama3.1-70b", "--gpus", spec, "--quant", "nf4", "--context", "1024",
                           "--json")
    assert code == 0 and json.loads(out)["schemes"][0]["fits"]


def test_bench_names_a_wrong_model_before_looking_for_a_gpu(capsys):
    code, out, err = run_cli(capsys, "bench", "/nonexistent")
    assert (code, out) == (2, "")
    assert err == "error: no folder or catalog model named '/nonexistent' (`heavylift catalog` lists them)\n"
