"""Ctrl-C: exit 130 and one short line, wherever it lands - in a command, while planning, during an import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

WAIT_S = 60  # at most this long for the command to reach the slow import, then for it to exit


def test_ctrl_c_inside_a_command_exits_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("heavylift.commands.catalog.catalog_entries", interrupted)
    assert run_cli(capsys, "catalog") == (130, "", "interrupted\n")


def _slow_module(folder: Path, name: str, reached: Path) -> dict:
    """An environment where importing `name` announces itself in `reached`, then blocks: a slow import."""
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        f"import pathlib, time\npathlib.Path({str(reached)!r}).touch()\ntime.sleep({WAIT_S})\n")
    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(src)])}


def _interrupt_when_reached(args: list[str], env: dict, reached: Path) -> subprocess.CompletedProcess:
    # As a terminal starts a command: Ctrl-C at its default action, even where this test runs with SIGINT
    # ignored (a job a non-interactive shell put in the background), which the child would inherit.
    child = subprocess.Popen([sys.executable, "-m", "heavylift", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + WAIT_S
    while not reached.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not reached.exists():
        child.kill()
        pytest.fail(f"the command never reached the slow import: {child.communicate()}")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=WAIT_S)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("args, slow", [
    # planning for this machine: GPU detection imports NVML's Python binding first
    (["plan", "llama3.1-405b", "--context", "8192"], "pynvml"),
    # `run` imports torch before it reads anything else
    (["run", "llama3.1-8b", "--prompt", "hi"], "torch"),
])
def test_ctrl_c_during_a_command_as_typed_exits_130(tmp_path, args, slow):
    reached = tmp_path / "reached"
    done = _interrupt_when_reached(args, _slow_module(tmp_path / "modules", slow, reached), reached)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")
