"""A quiet CLI: the libraries' routine warnings and bars stay off stderr unless `heavylift -v`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import save_runnable_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
# What torch, torchao, bitsandbytes and transformers print on a CPU-only install when imported and run.
NOISE = ("Failed to load", "_pytree", "register_constant", "kernels-community", "MatMul8bitLt", "Loading weights")
IMPORT_RUNTIME = ("import torch, torchao, bitsandbytes, transformers, accelerate; "
                  "import heavylift.runtime.session, heavylift.runtime.loader, heavylift.runtime.benchmark, "
                  "heavylift.runtime.float8_load, heavylift.runtime.experts, heavylift.engine.model")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for name in ("TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL"):  # as a user's shell has them: unset
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def _heavylift(*args: str) -> subprocess.CompletedProcess:
    return _python(f"import sys; from heavylift.cli import main; sys.argv[1:] = {list(args)!r}; main()")


def test_importing_the_runtime_after_quiet_prints_nothing():
    loud = _python(f"from heavylift import quiet; quiet.third_party(verbose=True); {IMPORT_RUNTIME}")
    quiet = _python(f"from heavylift import quiet; quiet.third_party(verbose=False); {IMPORT_RUNTIME}")
    assert loud.returncode == 0 and any(n in loud.stderr for n in NOISE)  # there was something to silence
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_plan_prints_nothing_on_stderr():
    done = _heavylift("plan", "llama3.1-8b", "--gpus", "1xH100")
    assert done.returncode == 0 and done.stderr == "" and "recommended: --quant" in done.stdout


def test_verbose_is_a_global_option():
    done = _heavylift("-v", "plan", "llama3.1-8b", "--gpus", "1xH100", "--quant", "nf4")
    assert done.returncode == 0 and done.stderr == ""
    assert _heavylift("--verbose", "catalog").returncode == 0


def test_run_shows_only_heavylifts_lines(tmp_path):
    # LLM.int8 on the CPU: bitsandbytes warns on every matmul, torchao and torch on import.
    folder = save_runnable_checkpoint(tmp_path / "llama", "llama")
    args = ("run", str(folder), "--prompt", "hello world", "--quant", "int8", "--engine", "transformers",
            "--max-new-tokens", "2", "--temperature", "0", "--context", "256")
    quiet, loud = _heavylift(*args), _heavylift("-v", *args)
    assert quiet.returncode == 0 and loud.returncode == 0
    assert "Failed to load" in loud.stderr  # -v shows the libraries' import chatter
    lines = [line for line in quiet.stderr.splitlines() if line]
    assert [line for line in lines if any(n in line for n in NOISE)] == []
    assert lines[0] == "prompt wrapped in the model's chat template; --raw to send it as is"
    assert lines[1].startswith(f"{folder}: int8, transformers") and "2 generated" in lines[2] and len(lines) == 3
