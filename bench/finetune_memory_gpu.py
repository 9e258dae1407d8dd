"""Where a `heavylift finetune` run's GPU memory goes, beyond what its allocator hands out.

    python3 bench/finetune_memory_gpu.py [--cases 2048x1,8192x1] [--steps 4] [--out DIR]

bench/finetune_gpu.py measures a finetune run from outside (NVML used memory above a baseline) against the
training plan's device total. This script runs the same command in-process (bench/finetune_gpu.py's
checkpoint and data) and splits that figure into its parts, sampled together every SAMPLE_PERIOD_S by a
thread: the allocator's allocated and reserved bytes, and the device's used memory. At the moment NVML
used memory peaks it records reserved - allocated (the cache: freed blocks and partly used pages) and used -
reserved (outside the allocator: CUDA context, loaded kernel modules, bitsandbytes' paged optimizer's
managed memory). torch's memory history (alloc/free/segment events with their sizes and stacks) is dumped
per case as a pickle, `torch.cuda.memory._snapshot()`'s format, to read on a CPU. Writes
DIR/finetune_memory_<card>_<date>.json (DIR: $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import finetune_gpu  # noqa: E402
from heavylift.planner.training import TRAIN_ALLOC_CONF  # noqa: E402

SAMPLE_PERIOD_S = 0.002
HISTORY_ENTRIES = 200_000
GB = 1e9


def case_child(args) -> None:
    """One case in this process: the sampler, the memory history, `heavylift finetune` through the CLI."""
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = TRAIN_ALLOC_CONF
    import pynvml
    import torch

    from heavylift.cli import main

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    base = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - base
            samples.append((time.perf_counter(), used, torch.cuda.memory_reserved(0), torch.cuda.memory_allocated(0)))
            time.sleep(SAMPLE_PERIOD_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    case = finetune_gpu.Case(finetune_gpu.FINETUNE, *(int(x) for x in args.case.split("x")))
    argv = finetune_gpu.finetune_args(Path(args.model), case, args.steps, Path(args.work),
                                      Path(args.work) / f"adapter-{args.case}")
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    torch.cuda.synchronize()
    stop.set()
    thread.join()
    stats = torch.cuda.memory_stats(0)
    snapshot = torch.cuda.memory._snapshot()
    with open(Path(args.out) / f"finetune_memory_{args.case}.pickle", "wb") as f:
        pickle.dump(snapshot, f)
    peak = max(samples, key=lambda s: s[1])
    top_reserved = max(samples, key=lambda s: s[2])
    print("RESULT " + json.dumps({
        "case": args.case, "exit_code": code, "argv": argv, "baseline_used_bytes": base, "samples": len(samples),
        "nvml_peak": {"used": peak[1], "reserved": peak[2], "allocated": peak[3],
                      "outside_allocator": peak[1] - peak[2], "cached": peak[2] - peak[3]},
        "at_reserved_peak": {"used": top_reserved[1], "reserved": top_reserved[2], "allocated": top_reserved[3]},
        "allocated_peak": stats["allocated_bytes.all.peak"], "reserved_peak": stats["reserved_bytes.all.peak"],
        "segments_peak": stats.get("segment.all.peak"), "num_alloc_retries": stats.get("num_alloc_retries"),
        "large_pool_reserved_peak": stats.get("reserved_bytes.large_pool.peak"),
        "small_pool_reserved_peak": stats.get("reserved_bytes.small_pool.peak"),
        "end": {"reserved": torch.cuda.memory_reserved(0), "allocated": torch.cuda.memory_allocated(0),
                "used": int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - base},
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="2048x1,8192x1")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=finetune_gpu.DEFAULT_LAYERS)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case_child(args)
        return
    ck = argparse.Namespace(layers=args.layers, device="cuda", tiny=False)
    checkpoint = finetune_gpu.make_checkpoint(ck)
    model = str(finetune_gpu.checkpoint_folder(ck))
    work = finetune_gpu.WORK / "memory"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases.split(","):
        plan = finetune_gpu.plan_case(Path(model), finetune_gpu.Case("finetune", *map(int, case.split("x"))))
        done = subprocess.run([sys.executable, __file__, "--case", case, "--model", model, "--work", str(work),
                               "--out", args.out, "--steps", str(args.steps)], capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        record = {"plan": plan, **(json.loads(line[7:]) if line else {"error": done.stderr[-3000:]})}
        results.append(record)
        print(json.dumps(record, indent=1), flush=True)
    today = datetime.date.today().isoformat()
    out = Path(args.out) / f"finetune_memory_{checkpoint['card']}_{today}.json"
    out.write_text(json.dumps({"card": checkpoint["card"], "date": today, "command": "python3 " + " ".join(sys.argv),
                               "versions": checkpoint["versions"], "cases": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
