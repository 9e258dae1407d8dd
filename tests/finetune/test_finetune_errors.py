"""Bad input to `heavylift finetune`, `run --adapter`, `serve --adapter` and `merge`: one line each, exit 2,
before any weight loads, and nothing written into the model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from finetune.conftest import train_args

FIX = 'one JSON object per line, {"messages": [...]} or {"text": ...}'


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def untouched(base):
    """Fails the test if anything in the model folder was written."""
    before = _snapshot(base)
    yield
    assert _snapshot(base) == before


@pytest.fixture
def wrong_adapter(tmp_path) -> Path:
    """An adapter whose up_proj LoRA is 192 wide: made for a model with a wider MLP than the tiny base's 128."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "wide-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "base_model_name_or_path": "/elsewhere/llama-wide",
                                                            "target_modules": ["up_proj"]}))
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 64), f"{prefix}.lora_B.weight": torch.zeros(192, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


def _lines(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(capsys, args, message: str) -> None:
    code, out, err = run_cli(capsys, *args)
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_a_missing_or_empty_data_file(base, tmp_path, capsys, untouched):
    missing = tmp_path / "nope.jsonl"
    _refused(capsys, train_args(base, missing, tmp_path / "out"),
             f"--data {missing}: no such file; give a .jsonl of chat samples or texts, or a .txt")
    empty = _lines(tmp_path, "empty.jsonl", "\n  \n")
    _refused(capsys, train_args(base, empty, tmp_path / "out"),
             f"--data {empty} is empty; give it {FIX}, or text in a .txt file")
    assert not (tmp_path / "out").exists()


def test_a_malformed_jsonl_line_is_named(base, tmp_path, capsys, untouched):
    bad = _lines(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')
    _refused(capsys, train_args(base, bad, tmp_path / "out"),
             f"{bad} line 3 is not valid JSON (Expecting value, column 10); give {FIX}")
    mixed = _lines(tmp_path, "mixed.jsonl", '{"text": "a"}\n{"messages": [{"role": "assistant", "content": "b"}]}\n')
    _refused(capsys, train_args(base, mixed, tmp_path / "out"),
             f"{mixed} line 2 is a chat sample but line 1 is a text sample; keep one kind per file")


def test_a_chat_sample_without_an_assistant_turn_is_named(base, tmp_path, capsys, untouched):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    data = _lines(tmp_path, "chat.jsonl", "\n".join(json.dumps(x) for x in (good, good, bad)) + "\n")
    _refused(capsys, train_args(base, data, tmp_path / "out"),
             f'{data} line 3: the chat sample has no "assistant" turn to learn from; add one or drop the line')


def test_seq_len_beyond_the_models_positions(base, texts, tmp_path, capsys, untouched):
    args = train_args(base, texts["train"], tmp_path / "out") + ["--seq-len", "1024"]
    _refused(capsys, args, "--seq-len 1,024 is longer than the 512 positions llama takes (max_position_embeddings); "
                           "pass --seq-len 512 or less")


def test_a_family_the_training_plan_does_not_count(texts, tmp_path, capsys):
    _refused(capsys, train_args("gemma2-9b", texts["train"], tmp_path / "out"),
             "the training plan counts llama, mistral, qwen2 models, not gemma2: pick one of those to train "
             "(`heavylift plan` without --train plans its inference)")
    assert not (tmp_path / "out").exists()


def test_unknown_target_names(base, texts, tmp_path, capsys, untouched):
    _refused(capsys, train_args(base, texts["train"], tmp_path / "out", "--target", "q,v,attn"),
             "--target must be all-linear or some of q,k,v,o,gate,up,down (comma-separated), not 'attn'")


def test_a_step_that_does_not_fit_is_refused_with_the_training_plans_advice(texts, tmp_path, capsys, monkeypatch):
    """Planned before anything loads: llama3.1-70b's catalog entry (no weights here) on one RTX 4090."""
    import heavylift
    from heavylift.hardware.gpus import parse_gpu_spec

    monkeypatch.setattr("heavylift.runtime.devices.machine_devices", lambda gpus: parse_gpu_spec("1xRTX4090"))
    plan = heavylift.plan_training("llama3.1-70b", gpus="1xRTX4090", training=heavylift.Training())
    assert not plan.fits and plan.advice[-1].startswith("use --gpus 3xRTX-4090")
    _refused(capsys, ["finetune", "llama3.1-70b", "--data", str(texts["train"]), "--out", str(tmp_path / "out")],
             f"llama3.1-70b in nf4-dq, a training step: {'; '.join(plan.advice)}")


def test_out_inside_the_model_folder(base, texts, capsys, untouched):
    out = base / "adapters"
    _refused(capsys, train_args(base, texts["train"], out),
             f"--out {out} is inside the model folder {base}; write elsewhere (heavylift leaves the model folder "
             "as it is)")
    assert not out.exists()


def test_an_adapter_for_another_base_is_refused_by_run_serve_and_merge(base, wrong_adapter, tmp_path, capsys,
                                                                        untouched):
    message = (f"--adapter {wrong_adapter} was made for /elsewhere/llama-wide, not {base}: its "
               f"model.layers.0.mlp.up_proj is 192x64, {base}'s is 128x64; give an adapter trained on {base}")
    _refused(capsys, ["run", str(base), "--adapter", str(wrong_adapter), "--prompt", "hi", "--context", "64"], message)
    _refused(capsys, ["serve", str(base), "--adapter", str(wrong_adapter), "--context", "64"], message)
    _refused(capsys, ["merge", str(base), "--adapter", str(wrong_adapter), "--out", str(tmp_path / "merged")], message)
    assert not (tmp_path / "merged").exists()


def test_an_adapter_on_the_fast_engine_and_a_folder_without_one(base, tmp_path, capsys, untouched):
    _refused(capsys, ["run", str(base), "--adapter", str(tmp_path), "--prompt", "hi", "--engine", "fast"],
             "--adapter runs on transformers' forward (the fast engine does not apply LoRA); drop --engine fast")
    _refused(capsys, ["run", str(base), "--adapter", str(tmp_path), "--prompt", "hi", "--context", "64"],
             f"--adapter {tmp_path} is not a LoRA adapter (it needs adapter_config.json and "
             "adapter_model.safetensors); give a folder `heavylift finetune` wrote")


@pytest.mark.parametrize("extra, message", [
    (["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--quant", "fp8"], "QLoRA trains over a 4-bit base: --quant must be one of nf4, nf4-dq, fp4, not fp8"),
    (["--optimizer", "sgd"], "--optimizer must be one of paged-adamw-8bit, adamw, not 'sgd'"),
])
def test_settings_out_of_range(base, texts, tmp_path, capsys, untouched, extra, message):
    _refused(capsys, train_args(base, texts["train"], tmp_path / "out", *extra), message)


def test_an_out_folder_holding_a_finetune_needs_resume(trained, base, texts, capsys, untouched):
    out = trained["out"]
    _refused(capsys, train_args(base, texts["train"], out),
             f"--out {out} already holds a fine-tune (checkpoint-30); continue it with --resume {out}, or pick a new "
             "--out")


def test_resume_with_other_data(trained, base, tmp_path, capsys, untouched):
    other = _lines(tmp_path, "other.jsonl", '{"text": "something else"}\n')
    checkpoint = trained["out"] / "checkpoint-20"
    _refused(capsys, ["finetune", str(base), "--data", str(other), "--resume", str(checkpoint)],
             f"--data {other} is not what --resume {checkpoint} was trained on (the contents differ); give the same "
             "file to continue it")


def test_running_out_of_gpu_memory_mid_training_is_one_line_and_keeps_the_last_checkpoint(base, texts, tmp_path,
                                                                                          capsys, monkeypatch):
    import torch

    from heavylift.finetune.trainer import Trainer

    one_step = Trainer._one_step

    def second_step_runs_out(self):
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.20 GiB")
        return one_step(self)

    monkeypatch.setattr(Trainer, "_one_step", second_step_runs_out)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *train_args(base, texts["train"], out, "--steps", "3", "--save-every", "1"))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last == (f"error: out of GPU memory in training step 2 (--seq-len 32, --micro-batch 1), which the plan "
                    f"fits on a card with nothing else on it: free the GPU of other processes, or pass a smaller "
                    f"--micro-batch (with more --grad-accum) or a shorter --seq-len; the last checkpoint in {out} "
                    f"is intact")
    assert "Traceback" not in err
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
