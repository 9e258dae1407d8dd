"""Two GPUs in one call: a model split by heavylift's plan, measured against the plan, checked and timed.

Parts (`--parts`, any of them, in this order whatever order they are named in):
  run       an 8B-shaped checkpoint (bench/run_gpu.py's) in bf16 and NF4-DQ, and a Llama-3.1-70B-shaped slice of
            --big-layers layers in NF4-DQ and FP8, each loaded by heavylift over both GPUs as its plan splits it:
            per device the planned bytes beside torch's allocated, peak allocated and peak reserved bytes and the
            driver's (cudaMemGetInfo polled, NVML or nvidia-smi at the end); greedy tokens of the split against the
            same model planned on one GPU (every shape here fits one), and the 70B slice's against the reference
            stack (transformers + accelerate's device_map="auto" over the same two GPUs, the same checkpoint).
  decode    the 70B slice's decode tok/s at batch 1 and 16: heavylift split, heavylift on one GPU (the same slice),
            the reference stack split; beside two rooflines built from the plan's per-device bytes over each
            device's measured copy bandwidth: the slower device's share, and both shares one after the other.
  validate  bench/validate_plan.py --gpus 2 as a subprocess with the time left; its cases merged into the output.

Each model runs in its own child process (a fresh CUDA context per model; a failure loses one model), which
starts no step past the deadline and is killed at it; `--budget-s` is shared out before anything starts.
Usage (a machine with two GPUs, repository root):
  python bench/two_gpu.py --out $OUT/two_gpu_<card>x2_<date>.json --budget-s 480
  python bench/two_gpu.py --parts validate --budget-s 540 --out $OUT/two_gpu_validate.json  # continues validate
  python bench/two_gpu.py --cpu-check --out /tmp/two_gpu_cpu.json   # the same code paths, tiny models, CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("run", "decode", "validate")
GPU_PARTS = ("run", "decode")  # measured by the per-model children; validate runs validate_plan.py
# Shares of --budget-s: the children of run and decode take theirs first, validate the rest (with what they left).
PART_WEIGHTS = {"run": 0.35, "decode": 0.25, "validate": 0.40}
VALIDATE_CASE_S = 90  # validate_plan.py starts no case past its --budget-s: the longest two-GPU case fits in this
DEFAULT_BUDGET_S = 480
DEFAULT_WORK = "/tmp/two-gpu"  # children's records, validate's results (kept: a later call continues them)
KILL_GRACE_S = 5  # SIGTERM, then SIGKILL after this long
EIGHT_B, BIG = "llama3.1-8b-shape", "llama3.1-70b-shape"
BIG_LAYERS = 20  # of the 70B shape's 80: 38 GB in bf16 on disk; 13 GB in NF4-DQ, 21 GB in FP8
EIGHT_B_QUANTS, BIG_QUANTS = ("bf16", "nf4-dq"), ("nf4-dq", "fp8")
VALIDATE_RESULTS = "plan_validation_2gpu.json"
OUTPUT_TAIL_CHARS = 6000  # of a child's output, kept in the results


# --- Pure pieces --------------------------------------------------------------------------------------

def parse_parts(text: str) -> tuple[str, ...]:
    """`--parts` as the parts in running order; ValueError naming the choices for an unknown or empty list."""
    named = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in named if p not in PARTS]
    if unknown or not named:
        raise ValueError(f"--parts takes a comma-separated list of {', '.join(PARTS)}, not {text!r}")
    return tuple(p for p in PARTS if p in named)


def units_of(parts: tuple[str, ...], big_quants: tuple[str, ...] = BIG_QUANTS) -> tuple[str, ...]:
    """The children to run, one per model and precision group: the 8B for `run`, the 70B slice per precision for
    `run` or `decode`."""
    units = ("8b",) if "run" in parts else ()
    return units + (tuple(f"70b-{q}" for q in big_quants) if set(parts) & set(GPU_PARTS) else ())


def stage_seconds(budget_s: float, parts: tuple[str, ...]) -> float:
    """Seconds of the budget the per-model children may take together; validate has the rest, and what they leave."""
    weights = {p: PART_WEIGHTS[p] for p in parts}
    return budget_s * sum(w for p, w in weights.items() if p in GPU_PARTS) / sum(weights.values())


def validate_budget(seconds_left: float) -> float:
    """validate_plan.py's --budget-s: cases start only while the longest one still ends within the time left."""
    return max(0.0, seconds_left - VALIDATE_CASE_S)


@dataclass(frozen=True)
class Share:
    """What one device reads in one decode step of the split model, and how fast it reads."""

    device: int
    layers: tuple[int, int]  # [start, stop)
    weight_bytes: int  # the plan's weights on the device, the embedding table left out (a step reads one row)
    kv_bytes: int  # one sequence's keys and values on the device at the timed length
    bandwidth_bytes_s: float

    def step_seconds(self, batch: int) -> float:
        return (self.weight_bytes + batch * self.kv_bytes) / self.bandwidth_bytes_s


def planned_shares(arch, scheme, length: float, bandwidths: dict[int, float]) -> list[Share]:
    """Each device's share of a step from the plan's own byte counts (SchemePlan.per_device, as
    Layout.decode_upper_bound reads them), with the KV cache at `length` tokens on heavylift's engine."""
    from heavylift.planner.memory import FAST, kv_cache_bytes
    from heavylift.planner.plan import layout
    from heavylift.schemes import KV_DTYPES

    embedding = 0 if arch.tie_word_embeddings else layout(arch, scheme.quant).embedding
    return [Share(d.device.index, (d.layers.start, d.layers.stop),
                  d.weights_bytes - (embedding if 0 in d.layers else 0),
                  int(kv_cache_bytes(arch, d.layers, length, 1, KV_DTYPES["bf16"], FAST)),
                  bandwidths[d.device.index])
            for d in scheme.per_device if d.layers]


def rooflines(shares: list[Share], batch: int) -> dict:
    """Tokens/s at full bandwidth: `slower_share_tok_s` if each device only had to keep up with the slowest
    (a pipeline with several steps in flight), `serial_tok_s` with the devices one after the other, as
    heavylift's engine replays its segments."""
    seconds = [s.step_seconds(batch) for s in shares]
    slowest = max(range(len(shares)), key=seconds.__getitem__)
    return {"slower_share_device": shares[slowest].device, "slower_share_tok_s": batch / seconds[slowest],
            "serial_tok_s": batch / sum(seconds)}


def greedy_record(model: str, quant: str, a: str, b: str, tokens_a: list[int], tokens_b: list[int],
                  first_logits_rel_diff: float | None) -> dict:
    """Two runs' greedy tokens from the same prompt: equal, or how many agree before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b)) if x != y), min(len(tokens_a), len(tokens_b)))
    return {"part": "run", "kind": "greedy", "model": model, "quant": quant, "a": a, "b": b,
            "tokens": len(tokens_a), "equal": tokens_a == tokens_b, "matching_prefix": same,
            "first_logits_rel_diff": first_logits_rel_diff}


def device_map_summary(device_map: dict) -> dict[str, dict]:
    """accelerate's device map (module name -> device) as per device: its decoder layers [first, last + 1) and
    its other modules."""
    out: dict[str, dict] = {}
    for name, device in device_map.items():
        entry = out.setdefault(str(device), {"layers": None, "modules": []})
        parts = name.split(".")
        if len(parts) == 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            i = int(parts[2])
            start, stop = entry["layers"] or (i, i + 1)
            entry["layers"] = [min(start, i), max(stop, i + 1)]
        else:
            entry["modules"].append(name)
    return out


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def table_lines(result: dict) -> list[str]:
    """The short table printed at the end: memory per device, greedy agreement, decode rates, validate, gaps."""
    records = result.get("records", [])
    lines = ["memory | model quant gpus | per device: layers, planned / peak allocated / peak reserved / "
             "driver peak GB (plan error)"]
    for r in (r for r in records if r["kind"] == "memory"):
        cells = [f"#{d['index']} {d['layers'][0]}-{d['layers'][1]}: {_gb(d['predicted_bytes'])} / "
                 f"{_gb(d.get('max_memory_allocated'))} / {_gb(d.get('max_memory_reserved'))} / "
                 f"{_gb(d.get('measured_bytes'))}"
                 + ("" if d.get("error_pct") is None else f" ({d['error_pct']:+.1f}%)") for d in r["devices"]]
        lines.append(f"memory | {r['model']} {r['quant']} {r['gpus']} | " + " ; ".join(cells))
    lines.append("greedy | model quant | a vs b | equal | matching prefix | first logits rel diff")
    for r in (r for r in records if r["kind"] == "greedy"):
        diff = "-" if r["first_logits_rel_diff"] is None else f"{r['first_logits_rel_diff']:.2e}"
        lines.append(f"greedy | {r['model']} {r['quant']} | {r['a']} vs {r['b']} | {'yes' if r['equal'] else 'NO'} | "
                     f"{r['matching_prefix']}/{r['tokens']} | {diff}")
    lines.append("decode | model quant | stack gpus | batch | tok/s | % serial roofline | % slower-share roofline")
    for r in (r for r in records if r["kind"] == "decode"):
        pct = lambda key: "-" if not r.get(key) else f"{100 * r['decode_tok_s'] / r[key]:.1f}"  # noqa: E731
        lines.append(f"decode | {r['model']} {r['quant']} | {r['stack']} {r['gpus']} | {r['batch']} | "
                     f"{r['decode_tok_s']:.1f} | {pct('serial_tok_s')} | {pct('slower_share_tok_s')}")
    validate = result.get("validate")
    if validate and "cases" not in validate:
        last = (validate.get("output_tail") or "").strip().splitlines()[-1:] or ["no output"]
        lines.append(f"validate | no cases measured; validate_plan.py exited {validate.get('exit')}: {last[0][:200]}")
    elif validate:
        cases = validate.get("cases", [])
        measured = [c for c in cases if c.get("measured_bytes") is not None]
        errors = [abs(d["error_pct"]) for c in measured for d in c["devices"] if d.get("error_pct") is not None]
        worst = f", worst {max(errors):.1f}%" if errors else ""
        lines.append(f"validate | {len(measured)} of {len(cases)} two-GPU cases measured, "
                     f"{sum(e <= 3 for e in errors)} of {len(errors)} devices within 3%{worst}, "
                     f"{sum(bool(c.get('oom')) and bool(c.get('fits_predicted')) for c in cases)} planned to fit "
                     "ran out of memory")
    for name in result.get("not_started", []):
        lines.append(f"not started | {name}")
    for e in result.get("errors", []):
        lines.append(f"error | {e['step']} | {e['error'][:200]}")
    return lines


def write_json(path: Path, document: dict) -> None:
    """Whole or not at all: a process killed mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.replace(path)


# --- The parent: budget, children, validate, results --------------------------------------------------

def run_bounded(command: list[str], deadline: float, env: dict | None = None,
                log: Path | None = None) -> tuple[int | None, str]:
    """Run `command` in its own process group until it ends or the deadline passes (then the whole group is
    ended: a child's own children too), its output into `log` (else a temporary file). (exit code, None if it
    was stopped at the deadline; the end of its output)."""
    with (log.open("w+", errors="replace") if log else tempfile.TemporaryFile("w+", errors="replace")) as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            code = None
            _end_group(proc)
        except BaseException:
            _end_group(proc)
            raise
        out.seek(0)
        return code, out.read()[-OUTPUT_TAIL_CHARS:]


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def log_path(out: str, name: str) -> Path:
    """A child's whole output, beside the results file: two_gpu.json -> two_gpu.8b.log."""
    path = Path(out)
    return path.with_name(f"{path.stem}.{name}.log")


def run_units(args, parts: tuple[str, ...], deadline: float, result: dict, save) -> None:
    """One child per model; each adds its records, the steps it did not start and its errors."""
    import validate_plan as vp

    work = Path(args.work)
    for unit in units_of(parts, tuple(args.big_quants.split(","))):
        if time.time() >= deadline:
            result["not_started"].append(f"{unit}: all of it (budget)")
            continue
        out = work / f"unit-{unit}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--unit", unit, "--parts", ",".join(parts), "--deadline", str(deadline),
                   "--unit-out", str(out), "--big-layers", str(args.big_layers), "--work", str(work)]
        command += ["--cpu-check"] if args.cpu_check else []
        print(f"[{unit}] started, {deadline - time.time():.0f} s left for the models", flush=True)
        code, tail = run_bounded(command, deadline, vp.child_env(2), log_path(args.out, unit))
        done = json.loads(out.read_text()) if out.exists() else {"records": [], "not_started": [], "errors": [],
                                                                 "steps": []}
        result["records"] += done["records"]
        result["not_started"] += [f"{unit}: {s}" for s in done["not_started"]]
        result["errors"] += done["errors"]
        result["steps"] += done["steps"]
        if code != 0:
            what = "stopped at the deadline" if code is None else f"exited {code}"
            running = done.get("running") or "start"
            result["errors"].append({"step": f"{unit}: {running}", "error": f"child {what}: {tail[-1500:]}"})
            result["not_started"].append(f"{unit}: every step after {running}")
        print(f"[{unit}] {'ok' if code == 0 else 'ended early'}: {len(done['records'])} records", flush=True)
        save()


def run_validate(args, deadline: float, result: dict, save) -> None:
    """validate_plan.py's two-GPU cases with the time left, continuing its results file (--merge); on the CPU,
    only its plan of those cases (--list)."""
    script = str(HERE / "validate_plan.py")
    out = Path(args.work) / VALIDATE_RESULTS
    if args.cpu_check:
        command = [sys.executable, script, "--list", "--gpus", "2"]
    else:
        budget = validate_budget(deadline - time.time())
        if budget <= 0:
            result["not_started"].append("validate: all of it (budget)")
            return
        command = [sys.executable, script, "--gpus", "2", "--budget-s", f"{budget:.0f}", "--merge", "--out", str(out)]
    code, tail = run_bounded(command, deadline, log=log_path(args.out, "validate"))
    record = {"command": shlex.join(command), "exit": code, "output_tail": tail}
    if out.exists() and not args.cpu_check:
        record.update(results_file=str(out), **{k: v for k, v in json.loads(out.read_text()).items() if k == "cases"})
    result["validate"] = record
    if code != 0:
        what = "stopped at the deadline" if code is None else f"exited {code}"
        result["errors"].append({"step": "validate", "error": f"validate_plan.py {what}: {tail[-1500:]}"})
    save()


def machine_cards(cpu_check: bool) -> list[str]:
    """The GPUs' names as the driver gives them (no CUDA context in this process)."""
    if cpu_check:
        return ["CPU (--cpu-check)"]
    from heavylift.hardware.detect import detect_devices

    return [d.name for d in detect_devices() if d.kind == "cuda"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--out", help="results JSON, rewritten after every model and part (required)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="start nothing after this long")
    parser.add_argument("--big-layers", type=int, default=BIG_LAYERS, help="layers kept of the 70B shape")
    parser.add_argument("--big-quants", default=",".join(BIG_QUANTS), help="the 70B slice's precisions")
    parser.add_argument("--work", default=DEFAULT_WORK, help="children's records and validate's results")
    parser.add_argument("--cpu-check", action="store_true", help="tiny models on the CPU, two device handles")
    parser.add_argument("--unit", help=argparse.SUPPRESS)
    parser.add_argument("--unit-out", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        parts = parse_parts(args.parts)
    except ValueError as e:
        parser.exit(2, f"{e}\n")
    if args.unit:
        from two_gpu_units import run_unit

        run_unit(args.unit, parts, args.deadline, Path(args.unit_out), args.big_layers, Path(args.work), args.cpu_check)
        return
    if not args.out:
        parser.exit(2, "--out is required: the results file, e.g. --out $OUT/two_gpu.json\n")
    cards = machine_cards(args.cpu_check)
    if len(cards) < 2 and not args.cpu_check:
        parser.exit(2, f"two GPUs are needed and {len(cards)} are here; run it on a two-GPU machine, or pass "
                       "--cpu-check\n")
    start = time.time()
    deadline = start + args.budget_s
    result = {"card": cards[0], "cards": cards, "date": datetime.date.today().isoformat(),
              "command": shlex.join(["python", *sys.argv]), "parts": list(parts), "budget_s": args.budget_s,
              "big_layers": args.big_layers, "records": [], "steps": [], "not_started": [], "errors": []}
    out = Path(args.out)

    def save():
        result["wall_s"] = round(time.time() - start, 1)
        write_json(out, result)

    save()  # the folder and the file exist from the start: children's logs go beside it
    try:
        if set(parts) & set(GPU_PARTS):
            run_units(args, parts, start + stage_seconds(args.budget_s, parts), result, save)
        if "validate" in parts:
            run_validate(args, deadline, result, save)
    except KeyboardInterrupt:
        save()
        print("interrupted; results so far in", out, file=sys.stderr)
        sys.exit(130)
    save()
    print("\n".join(table_lines(result)))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
