"""`heavylift eval` as a user types it: the report, and every mistake in one line with exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import TOKENS, WINDOW
from conftest import run_cli


def _eval(capsys, model, *args):
    return run_cli(capsys, "eval", str(model), "--window", str(WINDOW), "--tokens", str(TOKENS), *args)


def test_json_has_every_precision_asked_after_the_reference(small_model, capsys, tmp_path):
    code, out, err = _eval(capsys, small_model, "--quant", "int8,nf4", "--json", "--plot", str(tmp_path / "q.png"))
    assert code == 0, err
    data = json.loads(out)
    assert [(r["quant"], r["reference"]) for r in data["results"]] == [("bf16", True), ("int8", False),
                                                                        ("nf4", False)]
    assert data["positions"] == 1008 and data["windows"] == 16 and data["window"] == WINDOW
    assert (tmp_path / "q.png").stat().st_size > 0


def _one_line_error(code, out, err, *parts):
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    for part in parts:
        assert part in err


def test_missing_text(small_model, capsys, tmp_path):
    _one_line_error(*_eval(capsys, small_model, "--text", str(tmp_path / "none.txt")), "does not exist")


def test_empty_text(small_model, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    _one_line_error(*_eval(capsys, small_model, "--text", str(tmp_path / "empty.txt")), "is empty")


def test_text_shorter_than_one_window(small_model, capsys, tmp_path):
    (tmp_path / "short.txt").write_text("In the beginning God created the heaven and the earth.")
    _one_line_error(*_eval(capsys, small_model, "--text", str(tmp_path / "short.txt")),
                    "do not fill one --window of 128")


def test_unknown_precision(small_model, capsys):
    _one_line_error(*_eval(capsys, small_model, "--quant", "nf4,q4_k_m"), "q4_k_m")


def test_unreadable_reference_file(small_model, capsys, tmp_path):
    (tmp_path / "ref.npz").write_bytes(b"not a reference")
    _one_line_error(*_eval(capsys, small_model, "--reference", str(tmp_path / "ref.npz")),
                    "is not a reference heavylift eval saved")


@pytest.fixture
def saved_reference(small_model, capsys):
    code, out, err = _eval(capsys, small_model, "--quant", "bf16", "--json")
    assert code == 0, err
    return json.loads(out)["reference_file"]


def test_reference_made_with_another_tokenizer(small_model, saved_reference, capsys, tmp_path):
    from transformers import AutoTokenizer

    other = shutil.copytree(small_model, tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["Jerusalem"])
    tokenizer.save_pretrained(other)
    _one_line_error(*_eval(capsys, other, "--reference", saved_reference), "made with another tokenizer")


def test_reference_made_on_another_text(small_model, saved_reference, capsys, tmp_path):
    (tmp_path / "other.txt").write_text("And God said, Let there be light: and there was light.\n" * 400)
    _one_line_error(*_eval(capsys, small_model, "--text", str(tmp_path / "other.txt"), "--reference",
                           saved_reference), "made on another text")


def test_reference_neither_precision_nor_file(small_model, capsys, tmp_path):
    _one_line_error(*_eval(capsys, small_model, "--reference", str(tmp_path / "bf17")), "neither a precision nor a file")


def test_plot_name_refused_before_any_model_loads(small_model, capsys, tmp_path):
    _one_line_error(*_eval(capsys, small_model, "--plot", str(tmp_path / "q.txt")), "--plot wants a .png")
