"""Ctrl-C during `heavylift finetune`: the step in flight finishes, a checkpoint is saved, exit 130; a write
cut short leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.conftest import train_args
from heavylift.finetune.checkpoints import STATE_FILE, TRAINING_STATE, checkpoints_in, save_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
STOPPING = "stopping after this step to save a checkpoint (Ctrl-C again stops at once, keeping the last one)"
WAIT_S = 90  # at most this long for the first step (imports, load), then for the exit


def test_ctrl_c_saves_a_checkpoint_and_exits_130(base, texts, tmp_path):
    out = tmp_path / "out"
    # As a terminal starts a command: Ctrl-C at its default action (see tests/cli/test_cli_interrupt.py).
    child = subprocess.Popen([sys.executable, "-m", "heavylift", *train_args(base, texts["train"], out, "--steps",
                                                                            "100000", "--log-every", "1")],
                             env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in child.stderr:  # blocks until the first step's line (or the end of the output)
            seen.append(line)
            if line.startswith("step 1/100000 loss"):
                break
        else:
            pytest.fail(f"no first step: {''.join(seen)}")
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=WAIT_S)[::-1]
    finally:
        if child.poll() is None:
            child.kill()
    lines = rest.splitlines()
    assert child.returncode == 130
    # Steps already logged, the notice, at most the step in flight, the checkpoint of the last step, the exit.
    notice = lines.index(STOPPING)
    assert all(line.startswith("step ") for line in lines[:notice] + lines[notice + 1:-2])
    assert len(lines[notice + 1:-2]) <= 1
    step = max(int(line.split()[1].split("/")[0]) for line in seen + lines if line.startswith("step "))
    assert lines[-2:] == [f"saved {out / f'checkpoint-{step}'}", "interrupted"]
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{step}"]  # whole; no final adapter yet
    state = json.loads((out / f"checkpoint-{step}" / STATE_FILE).read_text())
    assert (state["step"], state["micro_batches"]) == (step, step)
    assert [e["step"] for e in state["log"] if "loss" in e] == list(range(1, step + 1))
    assert (out / f"checkpoint-{step}" / TRAINING_STATE).is_file()


def test_a_checkpoint_write_cut_short_leaves_the_last_one_whole(tmp_path):
    def write(text):
        def fill(folder: Path) -> None:
            (folder / STATE_FILE).write_text(text)
        return fill

    def cut_short(folder: Path) -> None:
        (folder / STATE_FILE).write_text("partial")
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of the write

    first = save_checkpoint(tmp_path, 1, write("one"))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, cut_short)
    assert checkpoints_in(tmp_path) == [first] and (first / STATE_FILE).read_text() == "one"
    again = save_checkpoint(tmp_path, 2, write("two"))  # the next save clears what the cut one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert (again / STATE_FILE).read_text() == "two"
