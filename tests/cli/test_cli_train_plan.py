"""`heavylift plan MODEL --train` through the CLI: the table, the JSON contract, advice a user can follow, and
every mistake in one line."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY_FAMILIES, TINY_LLAMA, run_cli, write_config

TERMS = ("weights_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes", "logits_bytes",
         "overhead_bytes")


def train_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, "plan", *args, "--train", "--json")
    assert code == 0, err
    return json.loads(out)


def test_table(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--train")
    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == [
        "llama3.1-8b (llama, 8,030,261,248 parameters, 32 layers)",
        "QLoRA on a nf4-dq base: LoRA r 16 (alpha 32, dropout 0.05) on q,k,v,o,gate,up,down, 41,943,040 trainable "
        "parameters",
        "seq-len 2,048 x micro-batch 1, gradient checkpointing on, paged-adamw-8bit",
        "devices: H100-80GB (#0), 79.2 GiB = 85.0 GB"]
    header = next(line for line in lines if "layers" in line and "peak" in line)
    assert re.findall(r"[a-z.]+", header) == ["device", "layers", "base", "adapters", "grads", "optim.", "activ.",
                                               "logits", "overh.", "total", "free", "peak"]
    row = next(line for line in lines if "cuda:0" in line)
    assert re.findall(r"[\w.:-]+", row) == ["cuda:0", "0-31", "7.8", "0.2", "0.2", "0.1", "1.1", "4.2", "1.2",
                                            "14.8", "70.3", "loss"]
    assert "  fits: 70.3 GB left on the fullest device (H100-80GB (#0))" in lines
    assert lines[-1] == "fits: step one and every step after it"


def test_json_contract(capsys):
    plan = train_json(capsys, "llama3.1-70b", "--gpus", "2xH100", "--seq-len", "4096", "--micro-batch", "2",
                      "--target", "q,v", "--lora-r", "64", "--optimizer", "adamw", "--quant", "nf4")
    assert {"model", "model_type", "params", "reserve_bytes", "devices", "training"} == plan.keys()
    assert [d["capacity_bytes"] for d in plan["devices"]] == [85_017_493_504] * 2
    t = plan["training"]
    assert (t["quant"], t["lora_r"], t["targets"], t["target_modules"], t["seq_len"], t["micro_batch"],
            t["grad_checkpointing"], t["optimizer"]) == ("nf4", 64, ["q", "v"], ["q_proj", "v_proj"], 4096, 2, True,
                                                         "adamw")
    # LoRA on q (8192 -> 8192) and v (8192 -> 1024), r 64, 80 layers
    assert t["trainable_params"] == 80 * 64 * (8192 + 8192 + 8192 + 1024)
    assert [d["layers"] for d in t["per_device"]][0][0] == 0 and t["per_device"][-1]["layers"][1] == 79
    for d in t["per_device"]:
        assert d["total_bytes"] == sum(d[k] for k in TERMS)
        assert d["free_bytes"] == 85_017_493_504 - d["total_bytes"]
        assert d["peak"] in ("forward", "loss", "backward", "optimizer")
    for k in (*TERMS, "total_bytes"):
        assert t[k] == sum(d[k] for d in t["per_device"])
    assert t["fits"] == all(d["free_bytes"] >= 0 for d in t["per_device"])
    assert t["advice"][0].startswith("fits: " if t["fits"] else "does not fit: ")


def test_lora_alpha_is_a_number_as_finetune_takes_it(capsys):
    # `heavylift finetune --lora-alpha` takes a float; the plan of the same run takes the same value
    given = train_json(capsys, "llama3.1-8b", "--gpus", "1xH100", "--lora-alpha", "16.5")
    assert given["training"]["lora_alpha"] == 16.5
    assert train_json(capsys, "llama3.1-8b", "--gpus", "1xH100")["training"]["lora_alpha"] == 32.0
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--train", "--lora-alpha", "8.25")
    assert code == 0 and out.splitlines()[1].startswith("QLoRA on a nf4-dq base: LoRA r 16 (alpha 8.25, dropout 0.05)")


def test_local_folder(tmp_path, capsys):
    write_config(tmp_path, TINY_LLAMA)
    t = train_json(capsys, str(tmp_path), "--gpus", "1x24GB", "--seq-len", "64", "--micro-batch", "2", "--lora-r",
                   "8", "--lora-dropout", "0")["training"]
    (d,) = t["per_device"]
    # the step tests/planner/test_training_plan.py counts by hand
    assert (d["total_bytes"], d["peak"], t["trainable_params"]) == (1_140_807_168, "backward", 16_384)


def _apply(args: list[str], line: str) -> list[str]:
    """The command line an advice line asks for."""
    if line.startswith("use --grad-checkpointing: "):
        return [a for a in args if a != "--no-grad-checkpointing"] + ["--grad-checkpointing"]
    option, value = re.match(r"use (--micro-batch|--seq-len|--gpus) (\S+?)[: ]", line).groups()
    if option in args:
        return [value if i and args[i - 1] == option else a for i, a in enumerate(args)]
    return args + [option, value]


@pytest.mark.parametrize("args, fixes", [
    (["llama3.1-8b", "--gpus", "1x15GB", "--no-grad-checkpointing"], ["--grad-checkpointing", "--seq-len", "--gpus"]),
    (["llama3.1-8b", "--gpus", "1x16GB", "--micro-batch", "4"], ["--micro-batch", "--seq-len"]),
])
def test_advice_followed_as_typed(capsys, args, fixes):
    """Each fix the plan advises, typed as the advice says, fits."""
    t = train_json(capsys, *args)["training"]
    assert not t["fits"] and [re.match(r"use (--[a-z-]+)", line).group(1) for line in t["advice"][1:]] == fixes
    for line in t["advice"][1:]:
        assert train_json(capsys, *_apply(args, line))["training"]["fits"], line


BAD = [
    (["plan", "llama3.1-8b", "--train", "--seq-len", "200000"],
     "--seq-len 200,000 is longer than the 131,072 positions llama takes (max_position_embeddings); pass --seq-len "
     "131072 or less"),
    (["plan", "llama3.1-8b", "--train", "--target", "q,qkv"],
     "--target must be all-linear or some of q,k,v,o,gate,up,down (comma-separated), not 'qkv'"),
    (["plan", "llama3.1-8b", "--train", "--lora-r", "0"], "--lora-r must be a whole number from 1 to 4,096, not 0"),
    (["plan", "llama3.1-8b", "--train", "--lora-r", "2048"],
     "--lora-r 2048 is wider than the 1,024 features of the narrowest target: pass --lora-r 1024 or less"),
    (["plan", "mixtral-8x7b", "--train"],
     "the training plan counts dense llama, mistral, qwen2 models; mixtral is a mixture of experts"),
    (["plan", "gemma2-9b", "--train"], "the training plan counts llama, mistral, qwen2 models, not gemma2"),
    (["plan", "phi3-mini", "--train"], "the training plan counts llama, mistral, qwen2 models, not phi3"),
    (["plan", "llama3.1-8b", "--train", "--quant", "int8"], "--quant must be one of nf4, nf4-dq, fp4, not int8"),
    (["plan", "llama3.1-8b", "--train", "--quant", "all"],
     "QLoRA trains over a 4-bit base: --quant must be one of nf4, nf4-dq, fp4, not all"),
    (["plan", "llama3.1-8b", "--train", "--optimizer", "sgd"], "--optimizer must be one of paged-adamw-8bit, adamw"),
    (["plan", "llama3.1-8b", "--train", "--micro-batch", "0"], "--micro-batch must be a whole number from 1"),
    (["plan", "llama3.1-8b", "--train", "--lora-dropout", "1"], "--lora-dropout must be at least 0 and below 1"),
    (["plan", "llama3.1-8b", "--train", "--context", "4096"], "--train and --context exclude each other"),
    (["plan", "llama3.1-8b", "--train", "--serve"], "--train and --serve exclude each other"),
    (["plan", "llama3.1-8b", "--seq-len", "4096"], "--seq-len describes a training step: add --train, or drop --seq-len"),
    (["plan", "llama3.1-8b", "--no-grad-checkpointing"], "--grad-checkpointing describes a training step"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_mistakes_are_one_line_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args, *(["--gpus", "1xH100"] if "--gpus" not in args else []))
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sliding_window_shorter_than_the_sequence(tmp_path, capsys):
    write_config(tmp_path, TINY_FAMILIES["mistral"])
    code, _, err = run_cli(capsys, "plan", str(tmp_path), "--gpus", "1xH100", "--train", "--seq-len", "64")
    assert code == 2 and "longer than the model's 32-token sliding window" in err
