"""`heavylift finetune` as a user types it: the loss falls on the training text and on a distinct held-out
text, the output folder holds peft's adapter and whole checkpoints, and a resumed run repeats the
uninterrupted one's losses step for step."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli
from finetune.conftest import SEQ_LEN, train_args
from heavylift.defaults import CHECKPOINTS_KEPT
from heavylift.finetune.checkpoints import STATE_FILE, TRAINING_STATE

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _log(folder) -> list[dict]:
    return json.loads((folder / STATE_FILE).read_text())["log"]


def test_a_short_finetune_lowers_training_and_held_out_loss(trained, base):
    out, err = trained["out"], trained["err"]
    log = _log(out)
    losses = [e["loss"] for e in log if "loss" in e]
    evals = {e["step"]: e["eval_loss"] for e in log if "eval_loss" in e}
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 31)) and sorted(evals) == [0, 10, 20, 30]
    # A repetitive text: the mean loss of the last five steps is well under half the first five's.
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert evals[30] < evals[20] < evals[10] < evals[0] - 1.5
    summary = re.escape(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, held-out {evals[0]:.4f} -> {evals[30]:.4f}")
    assert re.fullmatch(rf"trained 30 steps in \d+:\d\d:\d\d, {summary}, [\d,]+ tok/s, RSS \d+\.\d\d GB; "
                        rf"adapter in {re.escape(str(out))}", err.splitlines()[-1])
    assert f"step 10/30 held-out loss {evals[10]:.4f}" in err.splitlines()


def test_the_output_folder_is_a_peft_adapter_beside_whole_checkpoints(trained, base):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", STATE_FILE, "checkpoint-20",
                            "checkpoint-30"])
    assert CHECKPOINTS_KEPT == 2  # checkpoint-10 went when checkpoint-30 was whole
    for step in (20, 30):
        folder = out / f"checkpoint-{step}"
        assert {"adapter_config.json", "adapter_model.safetensors", STATE_FILE, TRAINING_STATE} <= \
            {p.name for p in folder.iterdir()}
        state = json.loads((folder / STATE_FILE).read_text())
        assert (state["step"], state["micro_batches"], state["total_steps"]) == (step, step, 30)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 16, 32, str(base))
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS)
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoint-30" / "adapter_model.safetensors").read_bytes()


def test_resume_continues_the_loss_curve_exactly(base, texts, tmp_path, capsys):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, _, err = run_cli(capsys, *train_args(base, texts["train"], whole, "--steps", "6", "--save-every", "3",
                                               "--seed", "3"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "finetune", str(base), "--data", str(texts["train"]), "--resume",
                           str(whole / "checkpoint-3"), "--out", str(resumed))
    assert code == 0, err
    assert f"resuming {whole / 'checkpoint-3'} at step 3" in err
    first, second = _log(whole), _log(resumed)
    assert [e["step"] for e in second] == [e["step"] for e in first]
    for a, b in zip(first, second):
        for key in ("loss", "eval_loss", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a, b)
    assert json.loads((resumed / STATE_FILE).read_text())["settings"]["seed"] == 3


def test_resume_of_an_out_folder_takes_its_newest_checkpoint(trained, base, texts, capsys):
    code, _, err = run_cli(capsys, "finetune", str(base), "--data", str(texts["train"]), "--eval-data",
                           str(texts["held_out"]), "--resume", str(trained["out"]))
    assert (code, err) == (2, f"error: --resume {trained['out']}: checkpoint-30 is the last of its 30 steps, nothing "
                              "is left to train; start a new run\n")


def test_a_flag_typed_again_on_resume_must_match(trained, base, texts, capsys):
    checkpoint = trained["out"] / "checkpoint-20"
    code, _, err = run_cli(capsys, "finetune", str(base), "--data", str(texts["train"]), "--eval-data",
                           str(texts["held_out"]), "--resume", str(checkpoint), "--lr", "0.001",
                           "--seq-len", str(SEQ_LEN))
    assert (code, err) == (2, f"error: --resume {checkpoint} was trained with --lr 0.01, not 0.001; leave --lr out to "
                              "continue it, or start a new run without --resume\n")
