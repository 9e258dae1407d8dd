"""What each device of a plan holds at every prompt length up to the context, by the planner's own replay.

The caching allocator's reserve is not monotone in the prompt length: a request slightly larger than a block
that a shorter or longer prompt lets it reuse takes a new segment. For each case this replays the plan's
devices at every prompt length from --min-prompt to the plan's longest (the context; the context - 1 on a
server of the engine) and reports, per device: the figure at the longest prompt, the most over all lengths and
where, how many lengths exceed the longest prompt's, and the largest drop from one length to the next; then
whether the plan (which replays planner/prompt_lengths.py's lengths) covers that most. Pure planner: no GPU, no torch.

Usage (repository root; the matrix takes about 25 minutes on 2 cores):
  python bench/prompt_sweep.py --out bench/results/prompt_sweep_<date>.json      # the matrix below
  python bench/prompt_sweep.py --case "gpt-oss-20b bf16 transformers 1024 8 1xH100" [--min-prompt 900]
A case is "model quant engine context batch gpus"; the model is a catalog name, cut to validate_plan.py's layer
count (the validation's checkpoints) when it names one there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heavylift.hardware.gpus import parse_gpu_spec  # noqa: E402
from heavylift.model.architecture import architecture_from_config  # noqa: E402
from heavylift.planner.forward_program import Part  # noqa: E402
from heavylift.planner.make import make_plan  # noqa: E402
from heavylift.planner.memory import FAST, bytes_at_prompt  # noqa: E402
from heavylift.planner.prompt_lengths import longest_prompt  # noqa: E402
from heavylift.planner.plan import Workload  # noqa: E402
from heavylift.schemes import KV_DTYPES  # noqa: E402
from validate_plan import model_config  # noqa: E402

GB = 1e9
# The matrix: validate_plan.py's models (cut to its layer counts) in every precision on transformers, and on
# the engine where it runs them; at 1k x 8, 2k x 4 and 4k x 1 (8,192, 8,192 and 4,096 rows of prompt); on one
# H200 (141 GB), which every case fits.
ENGINE_MODELS = ("llama3.1-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "llama3.1-70b")
MODELS = ("llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma2-9b", "phi3-mini", "mixtral-8x7b", "gpt-oss-20b",
          "qwen3-8b", "gemma3-27b", "llama4-scout", "deepseek-v3", "llama3.1-70b")
QUANTS = ("bf16", "nf4-dq", "int8", "fp8", "nf4")
WORKLOADS = ("1024 8", "4096 1", "2048 4")
MATRIX = tuple(f"{model} {quant} {engine} {work} 1xH200" for model in MODELS for quant in QUANTS
               for engine in ("transformers",) + (("fast",) if model in ENGINE_MODELS else ()) for work in WORKLOADS)


def sweep(case: str, min_prompt: int = 1, series: bool = False) -> dict:
    """Every device of the case's plan at every prompt length from `min_prompt` to the plan's longest."""
    model, quant, engine, context, batch, gpus = case.split()
    context, batch = int(context), int(batch)
    arch = architecture_from_config(model_config(model))
    work = Workload(context, batch, engine=engine)
    scheme = make_plan(model, arch, parse_gpu_spec(gpus), work, [quant]).scheme(quant)
    devices = []
    for d in scheme.per_device:
        if not d.layers:
            continue
        part = Part(d.layers, 0 in d.layers, arch.num_layers - 1 in d.layers)
        longest = longest_prompt(context, engine == FAST, work.serve)
        t = time.perf_counter()
        held = {p: bytes_at_prompt(arch, quant, engine, context, batch, KV_DTYPES[work.kv_dtype], d.device, part, p,
                                   every_layer=True)
                for p in range(min(min_prompt, longest), longest + 1)}
        seconds = time.perf_counter() - t
        devices.append(figures(held, longest, d.total_bytes - d.weights_bytes, d.worst_prompt_tokens, seconds)
                       | ({"series": [held[p] for p in sorted(held)]} if series else {}))
    return {"case": case, "devices": devices}


def figures(held: dict[int, int], longest: int, planned: int, planned_prompt: int, seconds: float) -> dict:
    """A device's record: what it holds at the longest prompt and at its worst, how many lengths hold more than
    the longest, its drops from one length to the next, and the plan's figure and length beside them."""
    lengths = sorted(held)
    worst = max(lengths, key=lambda p: (held[p], p))
    drops = [(lengths[i - 1], held[lengths[i - 1]] - held[lengths[i]]) for i in range(1, len(lengths))
             if held[lengths[i]] < held[lengths[i - 1]]]
    drop_at, drop = max(drops, key=lambda x: x[1]) if drops else (None, 0)
    return {"at_longest_bytes": held[longest], "most_bytes": held[worst], "most_at": worst,
            "lengths": len(lengths), "above_longest": sum(held[p] > held[longest] for p in lengths),
            "drops": len(drops), "largest_drop_bytes": drop, "largest_drop_after": drop_at,
            "planned_bytes": planned, "planned_prompt": planned_prompt, "plan_covers": planned >= held[worst],
            "sweep_s": round(seconds, 2)}


def line(record: dict) -> str:
    """One line per device: its figure at the longest prompt, its most and where, and the plan's."""
    out = []
    for i, d in enumerate(record["devices"]):
        extra = (d["most_bytes"] - d["at_longest_bytes"]) / GB
        out.append(f"{record['case']:48} dev{i} at longest {d['at_longest_bytes'] / GB:7.3f} GB, most "
                   f"{d['most_bytes'] / GB:7.3f} at {d['most_at']:6} (+{extra:.3f}); "
                   f"{d['above_longest']}/{d['lengths']} above, {d['drops']} drops, largest "
                   f"{d['largest_drop_bytes'] / GB:.3f} after {d['largest_drop_after']}; "
                   f"plan {d['planned_bytes'] / GB:.3f} at {d['planned_prompt']} "
                   f"{'covers' if d['plan_covers'] else 'UNDER'}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", help="model quant engine context batch gpus (repeatable)")
    parser.add_argument("--min-prompt", type=int, default=1)
    parser.add_argument("--series", action="store_true", help="keep every length's figure in --out")
    parser.add_argument("--out")
    args = parser.parse_args()
    records = []
    for case in args.case or MATRIX:
        records.append(sweep(case, args.min_prompt, args.series))
        print(line(records[-1]), flush=True)
    summary = summarize(records)
    print(summary)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "min_prompt": args.min_prompt,
                                              "summary": summary, "cases": records}, indent=1) + "\n")


def summarize(records: list[dict]) -> str:
    """Per runtime: the device-cases whose most exceeds the longest prompt's figure, and those the plan misses."""
    lines = []
    for engine in ("transformers", FAST):
        cases = [(r["case"], d) for r in records if r["case"].split()[2] == engine for d in r["devices"]]
        if not cases:
            continue
        above = [(c, d) for c, d in cases if d["most_bytes"] > d["at_longest_bytes"]]
        under = [(c, d) for c, d in cases if not d["plan_covers"]]
        jump = max(above, key=lambda x: (x[1]["most_bytes"] - x[1]["at_longest_bytes"]) / x[1]["at_longest_bytes"],
                   default=None)
        miss = max(under, key=lambda x: (x[1]["most_bytes"] - x[1]["planned_bytes"]) / x[1]["most_bytes"],
                   default=None)
        line = f"{engine}: {len(cases)} device-cases; {len(above)} hold more at a shorter prompt than at the longest"
        if jump:
            c, d = jump
            line += (f" (most: {c}, +{(d['most_bytes'] - d['at_longest_bytes']) / GB:.3f} GB = "
                     f"{100 * (d['most_bytes'] - d['at_longest_bytes']) / d['at_longest_bytes']:.1f}% at {d['most_at']})")
        line += f"; the plan falls short of the most in {len(under)}"
        if miss:
            c, d = miss
            line += f" (worst: {c}, by {100 * (d['most_bytes'] - d['planned_bytes']) / d['most_bytes']:.2f}%)"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
