"""How long `heavylift plan` takes on the 405B catalog entry, planned from scratch each time (no cached replays).

Measures the library call (all seven precisions, advice included), the whole CLI process as a user types
it (`heavylift plan llama3.1-405b --gpus 8xH100`, the table) and, of that, what a process spends importing
the CLI before it plans (what the `heavylift` entry point imports); the catalog entry plans from config.json
alone.
Each figure is the best of --repeat runs: other work sharing the machine's cores only ever slows a run down.
--baseline-commit measures that commit's src/ (from `git archive`) the same way first, in the same call.
Usage: python bench/plan_speed.py [--repeat 5] [--baseline-commit COMMIT]
                                  [--out bench/results/plan_speed_<machine>_<date>.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import heavylift
from heavylift.planner.memory import clear_caches

CLI = ["-m", "heavylift", "plan", "llama3.1-405b", "--gpus", "8xH100"]
IMPORT_CLI = ["-c", "from heavylift.cli import main"]
FIGURES = ("api_plan_s_best", "api_plan_s_median", "cli_process_s_best", "cli_process_s_median",
           "import_cli_process_s_best")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline-commit")
    args = parser.parse_args()
    before = baseline(args.baseline_commit, args.repeat) if args.baseline_commit else None
    heavylift.plan("llama3.1-405b", gpus="8xH100")  # warm imports
    calls = []
    for _ in range(args.repeat):
        clear_caches()  # each call plans from scratch, as a new process does
        t = time.perf_counter()
        heavylift.plan("llama3.1-405b", gpus="8xH100")
        calls.append(time.perf_counter() - t)
    cli, imports = process_seconds(CLI, args.repeat), process_seconds(IMPORT_CLI, args.repeat)
    result = {"card": "none (CPU: planner only)", "machine": f"{platform.processor() or platform.machine()}",
              "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv),
              "cli_command": " ".join(["python"] + CLI),
              "import_cli_command": shlex.join(["python"] + IMPORT_CLI),
              "method": f"best of {args.repeat} runs per figure (other work shares the cores); wall-clock seconds",
              "python_dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
              "api_plan_s_best": min(calls), "api_plan_s_median": statistics.median(calls),
              "cli_process_s_best": min(cli), "cli_process_s_median": statistics.median(cli),
              "import_cli_process_s_best": min(imports)}
    if before is not None:
        result["baseline"] = {key: before[key] for key in FIGURES}
        result["baseline"]["commit"] = args.baseline_commit
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def process_seconds(argv: list[str], repeat: int) -> list[float]:
    """Wall-clock seconds of `repeat` Python processes running `argv`, each start to exit."""
    seconds = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True)
        seconds.append(time.perf_counter() - t)
    return seconds


def baseline(commit: str, repeat: int) -> dict:
    """This benchmark's figures for another commit's heavylift, run from its src/ in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "archive", commit, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        env = dict(os.environ, PYTHONPATH=os.path.join(folder, "src"))
        out = subprocess.run([sys.executable, __file__, "--repeat", str(repeat)], env=env, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out)


if __name__ == "__main__":
    main()
