"""The fine-tune tests' models and data: tiny random Llamas built on the spot (one to train, one of another
shape), a repetitive training text and a distinct held-out one, and one short fine-tune shared by the tests
that read its output.

tests/finetune is a package so that this conftest loads as `finetune.conftest`, beside tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_tiny_checkpoint, save_tiny_tokenizer

SEQ_LEN = 32  # tokens per training sequence; the tiny models have 512 positions
# Weights drawn wider than transformers' 0.02: the frozen head of a random model at 0.02 gives nearly uniform
# logits that LoRA on the projections cannot sharpen in a few steps; at 0.2 it learns a repetitive text in 30.
INIT_RANGE = 0.2
TRAIN_SENTENCES = ("the quick brown fox jumps over the lazy dog. ", "hello world, how are you today? ")
HELD_OUT_TEXT = "how are you today? the lazy dog jumps over the quick brown fox. hello world. "


def tiny_base(folder: Path, **overrides) -> Path:
    save_tiny_checkpoint(folder, "llama", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=INIT_RANGE, **overrides)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Another model: the same family with a wider MLP."""
    return tiny_base(tmp_path_factory.mktemp("other") / "llama-wide", intermediate_size=192)


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """A training file of texts (JSONL) and a held-out .txt whose sentences it orders differently."""
    folder = tmp_path_factory.mktemp("data")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"text": TRAIN_SENTENCES[i % 2] * 4}) + "\n" for i in range(40)))
    held_out = folder / "held_out.txt"
    held_out.write_text(HELD_OUT_TEXT * 6)
    return {"train": train, "held_out": held_out}


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(model), "--data", str(data), "--seq-len", str(SEQ_LEN), "--lr", "1e-2",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def trained(base, texts, tmp_path_factory) -> dict:
    """30 steps on the training text, scored on the held-out one every 10: its --out folder and stderr."""
    out = tmp_path_factory.mktemp("trained") / "out"
    code, _, err = cli(*train_args(base, texts["train"], out, "--steps", "30", "--eval-data", str(texts["held_out"]),
                                   "--eval-every", "10", "--save-every", "10"))
    assert code == 0, err
    return {"out": out, "err": err}


def cli(*args: str) -> tuple[int, str, str]:
    """`heavylift ARGS` in this process, where no capsys reaches (a session fixture): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from heavylift.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()
