"""`heavylift finetune` on one GPU: its training plan against the memory a run takes, its tokens/s, and the
same step trained with plain peft + transformers' Trainer beside it.

    python3 bench/finetune_gpu.py [--budget-s 150] [--shape 8b|70b] [--layers 8] [--steps 8] [--cases ...]
                                  [--caps 1.0,0.95] [--no-uncapped] [--out DIR]
    python3 bench/finetune_gpu.py --device cpu --tiny     # the whole flow on a tiny model on the CPU (< 1 minute)

The model is Llama-3.1-8B's shape (or with --shape 70b Llama-3.1-70B's) with random weights (bench/run_gpu.py's
checkpoint) cut to --layers of its 32 (80) layers, so it is written and loaded in seconds (the vocabulary, head and every layer's shapes whole), beside
bench/serve_gpu.py's word-level tokenizer: a text of random words "t<id>" is one token per word. The data of a
case is one .txt of exactly steps x micro-batch sequences of seq-len tokens (BOS, the words, EOS), so every
micro-batch is full, as the plan counts it. The cases run in --cases' order (most important first); none starts
past --budget-s from the script's start. For each:
- plan: `heavylift plan MODEL --train --json` with the case's flags: the planned total of the device (or the
  plan's refusal line, and the case is skipped);
- finetune: `heavylift finetune MODEL --data CASE.txt --steps N --seq-len S --micro-batch B --grad-accum 1
  --eval-fraction 0 --log-every 1 --out DIR` as a user types it, in a subprocess;
- ref (bench/finetune_reference.py): the same model, LoRA and data trained by peft + Trainer, with the
  allocator the environment sets (finetune sets expandable segments where it sets none; the reference does not).
- capped (--caps F,...): the finetune again with the allocator held to F times the planned total less the
  plan's bytes outside the allocator (torch.cuda.set_per_process_memory_fraction, set in the child before it
  starts): with expandable segments a step that meets the cap unmaps its cache's free pages and goes on, so
  "runs at F = 1" is "the plan holds" and "out of memory at F = 0.95" is "the plan is within 5% of what the step
  needs". The NVML peak of an uncapped run is larger: with memory to spare the allocator keeps freed pages.
Each child's memory is polled from this process every 50 ms: the GPU's used memory (NVML) above what it was
before the child started, which counts what the plan counts (CUDA context, allocator, cuBLAS); on the CPU the
child's resident set. This process never starts CUDA (a child writes the checkpoint and names the card).
Tokens/s are over steps 2..N (the first carries one-time set-up: kernels, the paged optimizer's state), from
finetune's progress lines (each gives the tokens/s so far) and trainer_state.json's tokens per step, or from
the reference's step ends; finetune's own summary rate (all steps) sits beside. error_pct is (planned -
measured) / measured; a reference case is held to the plan of the heavylift step of its shape.
Writes DIR/finetune_<card>_<date>.json (DIR: $OUT, else bench/results) after every case; prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from finetune_reference import RESULT_MARKER as REFERENCE_MARKER  # noqa: E402
from heavylift.finetune.checkpoints import STATE_FILE  # noqa: E402
from heavylift.finetune.train import ALLOC_CONF_ENV as ALLOC_CONF  # noqa: E402
from heavylift.planner.training import TRAIN_ALLOC_CONF  # noqa: E402  (finetune sets it where nothing is set)
from serve_gpu import SPECIALS, WORDS  # noqa: E402

FINETUNE, REFERENCE = "finetune", "ref"
# Most important first: the default seq-len at micro-batch 1, a short batched one, a long one, then the
# reference at the first, then the rest.
CASES = "2048x1,512x4,8192x1,ref2048x1,2048x4,ref512x4,512x1,8192x4"
TINY_CASES = "64x1,32x2,ref64x1"  # --tiny: sequences a CPU trains in seconds
FULL_LAYERS = 32  # Llama-3.1-8B's layers, of which --layers are kept
DEFAULT_LAYERS = 8
# Llama-3.1-70B's shape (--shape 70b) over bench/run_gpu.py's Llama-3.1-8B one, and its layer count.
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
FULL_LAYERS_OF = {"8b": FULL_LAYERS, "70b": 80}
CAP_MARKER = "FINETUNE_CAPPED "
OOM_LINE = "out of GPU memory"  # finetune's one line for a step that ran out (commands/finetune.py)
# A tiny model of the same family and vocabulary (--tiny): the word tokenizer's ids all stay inside it.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
POLL_PERIOD_S = 0.05
CASE_GRACE_S = 90  # a case started before --budget-s may run this long past it before it is stopped
MIN_CASE_TIMEOUT_S = 60
WORK = Path("/tmp/hl-finetune-gpu")  # the checkpoint (kept for a rerun) and RUNS (cleared at the start)
RUNS = "runs"  # each case's data, adapter and logs
CHECKPOINT_MARKER = "FINETUNE_CHECKPOINT "
PROGRESS = re.compile(r"^step (\d+)/(\d+) loss \S+ lr \S+ ([\d,]+) tok/s (?:peak|RSS) ([\d.]+) GB")
SUMMARY = re.compile(r"^trained .*?([\d,]+) tok/s, (?:peak|RSS) ([\d.]+) GB")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes, should a console add them
TAIL_LINES = 15  # of a failed child's stderr, kept in its record
GB = 1e9


@dataclass(frozen=True)
class Case:
    kind: str  # FINETUNE or REFERENCE
    seq_len: int
    micro_batch: int

    @property
    def shape(self) -> str:
        return f"{self.seq_len}x{self.micro_batch}"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.shape}"


def parse_cases(spec: str) -> list[Case]:
    """"2048x1,ref512x4": a heavylift finetune case, a reference case."""
    cases = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind = REFERENCE if item.startswith(REFERENCE) else FINETUNE
        match = re.fullmatch(r"(\d+)x(\d+)", item.removeprefix(REFERENCE))
        if match is None:
            raise SystemExit(f"--cases: {item!r} is not SEQxBATCH or refSEQxBATCH, e.g. 2048x1,ref2048x1")
        cases.append(Case(kind, int(match[1]), int(match[2])))
    return cases


def write_words(path: Path, sequences: int, seq_len: int, seed: int = 0) -> None:
    """A text that packs into exactly `sequences` pieces of `seq_len` tokens: BOS + words + EOS."""
    rng = random.Random(seed)
    words = sequences * seq_len - 2
    path.write_text(" ".join(f"t{rng.randrange(len(SPECIALS), WORDS)}" for _ in range(words)) + "\n")


def ends_from_rates(rates: list[float], tokens: list[int]) -> list[float]:
    """Seconds at each step's end, from the tokens/s so far after each step and the tokens of each step."""
    return [sum(tokens[:k + 1]) / rate for k, rate in enumerate(rates)]


def steady_rate(ends: list[float], tokens: list[int]) -> float | None:
    """Tokens/s over steps 2..N, from the seconds at each step's end and the tokens of each step."""
    if len(ends) < 2 or len(ends) != len(tokens):
        return None
    return sum(tokens[1:]) / (ends[-1] - ends[0])


def parse_finetune(stderr: str) -> dict:
    """finetune's progress lines (tokens/s so far, allocator peak) and its summary line."""
    steps, summary = [], None
    for line in ANSI.sub("", stderr).splitlines():
        if (m := PROGRESS.match(line)) is not None:
            steps.append((int(m[1]), float(m[3].replace(",", "")), float(m[4])))
        elif (m := SUMMARY.match(line)) is not None:
            summary = (line, float(m[1].replace(",", "")), float(m[2]))
    return {"steps": steps, "summary": summary}


class Meter:
    """The peak memory of a child process, polled from this process: GPU used memory above a baseline
    (NVML, every device), or without a GPU the child's resident set."""

    def __init__(self, device: str) -> None:
        self.device, self.handles = device, []
        if device == "cuda":
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def _gpu_used(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles]

    def measure(self, process: subprocess.Popen, timeout_s: float) -> dict:
        """Poll until `process` exits (killed past `timeout_s`): the peak, and whether it timed out."""
        base = self._gpu_used() if self.handles else []
        peak = list(base) if self.handles else [0]
        started, timed_out = time.monotonic(), False
        while process.poll() is None:
            if time.monotonic() - started > timeout_s:
                process.kill()
                timed_out = True
                break
            now = self._gpu_used() if self.handles else [_rss(process.pid)]
            peak = [max(p, n) for p, n in zip(peak, now)]
            time.sleep(POLL_PERIOD_S)
        process.wait()
        used = [p - b for p, b in zip(peak, base)] if self.handles else peak
        return {"measured_bytes": max(used), "measured_by": "nvml used above baseline" if self.handles
                else "child RSS", "baseline_bytes": base, "timed_out": timed_out,
                "seconds": round(time.monotonic() - started, 1)}


def _rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in (process, *process.children(recursive=True)))
    except psutil.NoSuchProcess:
        return 0


def run_child(command: list[str], meter: Meter, timeout_s: float, log: Path) -> tuple[dict, str, str, int]:
    """`command` run and measured; (memory, stdout, stderr, exit code), both streams kept in `log`.*"""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with out.open("w") as o, err.open("w") as e:
        process = subprocess.Popen(command, stdout=o, stderr=e, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        memory = meter.measure(process, timeout_s)
    return memory, out.read_text(), err.read_text(), process.returncode


def plan_case(model: Path, case: Case) -> dict:
    command = [sys.executable, "-m", "heavylift", "plan", str(model), "--train", "--json",
               "--seq-len", str(case.seq_len), "--micro-batch", str(case.micro_batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"plan_command": shown(command), "refused": _last_line(done.stderr)}
    plan = json.loads(done.stdout)["training"]
    device = max(plan["per_device"], key=lambda d: d["total_bytes"])
    record = {"plan_command": shown(command), "planned_bytes": device["total_bytes"], "planned_peak": device["peak"],
              "planned_outside_bytes": outside_allocator(device["overhead_bytes"]),
              "params": json.loads(done.stdout)["params"]}
    return record if plan["fits"] else {**record, "refused": plan["advice"][0]}


def outside_allocator(overhead: int) -> int:
    """Of the plan's overhead on an H100, what lies outside PyTorch's allocator: the CUDA context and the paged
    optimizer's managed memory, not the cuBLAS workspaces (the allocator's blocks) nor its slack."""
    from heavylift.defaults import TRAIN_ALLOCATOR_SLACK_BYTES
    from heavylift.planner.memory import cublas_workspace_bytes
    from heavylift.planner.training import CUBLAS_WORKSPACES_TRAINING

    return overhead - TRAIN_ALLOCATOR_SLACK_BYTES - CUBLAS_WORKSPACES_TRAINING * cublas_workspace_bytes((9, 0))


def shown(command: list[str]) -> str:
    return " ".join(["python3" if c == sys.executable else c for c in command])


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failed(record: dict, stderr: str, why: str = "") -> dict:
    """A child's record with its error: its last stderr line, and the lines before it to debug from."""
    return {**record, "error": why + _last_line(stderr), "stderr_tail": stderr.splitlines()[-TAIL_LINES:]}


def finetune_args(model: Path, case: Case, steps: int, work: Path, out: Path) -> list[str]:
    """`heavylift finetune`'s arguments for the case, its data written."""
    data = work / f"{case.shape}.txt"
    write_words(data, steps * case.micro_batch, case.seq_len)
    return ["finetune", str(model), "--data", str(data), "--steps", str(steps), "--seq-len", str(case.seq_len),
            "--micro-batch", str(case.micro_batch), "--grad-accum", "1", "--eval-fraction", "0", "--log-every", "1",
            "--out", str(out)]


def finetune_case(model: Path, case: Case, steps: int, meter: Meter, timeout_s: float, work: Path) -> dict:
    out = work / f"adapter-{case.shape}"
    command = [sys.executable, "-m", "heavylift", *finetune_args(model, case, steps, work, out)]
    memory, _, stderr, code = run_child(command, meter, timeout_s, work / f"finetune-{case.shape}")
    record = {"command": shown(command), **memory, "exit_code": code,
              ALLOC_CONF: os.environ.get(ALLOC_CONF, TRAIN_ALLOC_CONF)}
    if code != 0:
        return failed(record, stderr)
    progress = parse_finetune(stderr)
    if progress["summary"] is None:
        return failed(record, stderr, "no summary line: ")
    lines = ANSI.sub("", stderr).splitlines()
    header = next((i for i, x in enumerate(lines) if "planned:" in x), 0)
    tokens = [e["tokens"] for e in json.loads((out / STATE_FILE).read_text())["log"] if "tokens" in e]
    ends = ends_from_rates([rate for _, rate, _ in progress["steps"]], tokens)
    line, summary_rate, summary_peak = progress["summary"]
    return {**record, "tokens": tokens, "step_ends_s": [round(t, 4) for t in ends],
            "tokens_per_s": _round(steady_rate(ends, tokens)), "tokens_per_s_all_steps": summary_rate,
            "allocated_peak_gb": summary_peak, "summary": line, "header": lines[header], "notes": lines[:header]}


def capped_case(model: Path, case: Case, steps: int, plan: dict, fraction: float, meter: Meter, timeout_s: float,
                work: Path) -> dict:
    """The finetune with the allocator held to `fraction` of the plan's total less the plan's bytes outside it:
    whether it ran, or ran out of memory (finetune's one line), and what it measured of itself."""
    cap = int(fraction * plan["planned_bytes"]) - plan["planned_outside_bytes"]
    tag = f"{case.shape}-cap{fraction:g}"
    command = [sys.executable, __file__, "--cap-child", str(cap), "--",
               *finetune_args(model, case, steps, work, work / f"adapter-{tag}")]
    memory, stdout, stderr, code = run_child(command, meter, timeout_s, work / f"finetune-{tag}")
    line = next((x for x in stdout.splitlines() if x.startswith(CAP_MARKER)), None)
    record = {"fraction": fraction, "allocator_cap_bytes": cap, "command": shown(command), **memory,
              "exit_code": code, **(json.loads(line.removeprefix(CAP_MARKER)) if line else {})}
    if code == 0:
        return {**record, "ran": True}
    if OOM_LINE in stderr:
        return {**record, "ran": False, "out_of_memory": _last_line(stderr)}
    return failed(record, stderr)


def cap_child(cap: int, argv: list[str]) -> None:
    """In a child: the allocator capped at `cap` bytes before CUDA does anything else, then `heavylift finetune`
    in this process; prints what the process held outside the allocator (NVML used above what the device
    used before it started, less the allocator's reservation) and the allocator's peaks."""
    os.environ.setdefault(ALLOC_CONF, TRAIN_ALLOC_CONF)
    import pynvml
    import torch

    from heavylift.cli import main as heavylift

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    before = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.mem_get_info(0)[1], 0)
    code = 0
    try:
        heavylift(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    torch.cuda.synchronize()
    used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - before
    print(CAP_MARKER + json.dumps({"outside_allocator_bytes": used - torch.cuda.memory_reserved(0),
                                   "reserved_peak_bytes": torch.cuda.max_memory_reserved(0),
                                   "allocated_peak_bytes": torch.cuda.max_memory_allocated(0)}), flush=True)
    sys.exit(code)


def reference_case(model: Path, case: Case, steps: int, meter: Meter, timeout_s: float, work: Path,
                   device: str) -> dict:
    data = work / f"{case.shape}.txt"
    write_words(data, steps * case.micro_batch, case.seq_len)
    command = [sys.executable, str(HERE / "finetune_reference.py"), str(model), str(data), "--seq-len",
               str(case.seq_len), "--micro-batch", str(case.micro_batch), "--steps", str(steps), "--device", device]
    memory, stdout, stderr, code = run_child(command, meter, timeout_s, work / f"reference-{case.shape}")
    record = {"command": shown(command), **memory, "exit_code": code, ALLOC_CONF: os.environ.get(ALLOC_CONF)}
    line = next((x for x in stdout.splitlines() if x.startswith(REFERENCE_MARKER)), None)
    if code != 0 or line is None:
        return failed(record, stderr)
    result = json.loads(line.removeprefix(REFERENCE_MARKER))
    ends, tokens = result["step_ends_s"], result["tokens"]
    all_steps = sum(tokens) / ends[-1] if ends else None
    return {**record, **result, "tokens_per_s": _round(steady_rate(ends, tokens)),
            "tokens_per_s_all_steps": _round(all_steps),
            "allocated_peak_gb": round(result["max_allocated_bytes"] / GB, 2) if "max_allocated_bytes" in result
            else None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def make_checkpoint(args) -> dict:
    """In a child (this process never starts CUDA): the cut checkpoint and tokenizer, the card's name."""
    command = [sys.executable, __file__, "--checkpoint-child", "--layers", str(args.layers), "--device", args.device,
               "--shape", args.shape, *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith(CHECKPOINT_MARKER)), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"writing the checkpoint failed ({done.returncode}): {_last_line(done.stderr)}")
    return json.loads(line.removeprefix(CHECKPOINT_MARKER))


def checkpoint_folder(args) -> Path:
    return WORK / f"{'tiny' if args.tiny else 'llama' + args.shape}-{args.layers}layers"


def checkpoint_child(args) -> None:
    import bitsandbytes
    import peft
    import torch
    import transformers

    import run_gpu
    import serve_gpu
    from eval_gpu import card_name

    started = time.perf_counter()
    folder = checkpoint_folder(args)
    run_gpu.make_checkpoint(str(folder), args.device, num_hidden_layers=args.layers,
                            **(TINY_SHAPE if args.tiny else LLAMA_70B if args.shape == "70b" else {}))
    serve_gpu.save_word_tokenizer(str(folder))
    print(CHECKPOINT_MARKER + json.dumps({
        "card": card_name(args.device), "folder": str(folder), "seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__}}), flush=True)


def run_case(case: Case, args, model: Path, meter: Meter, plans: dict, timeout_s: float) -> dict:
    if case.shape not in plans:
        plans[case.shape] = plan_case(model, case)
    plan = plans[case.shape]
    record = {"case": case.name, "kind": case.kind, "seq_len": case.seq_len, "micro_batch": case.micro_batch, **plan}
    if "refused" in plan:
        return record
    work = WORK / RUNS
    work.mkdir(parents=True, exist_ok=True)
    if case.kind == FINETUNE and args.uncapped:
        record |= finetune_case(model, case, args.steps, meter, timeout_s, work)
    elif case.kind == REFERENCE:
        record |= reference_case(model, case, args.steps, meter, timeout_s, work, args.device)
    if "measured_bytes" in record and "error" not in record:
        record["error_pct"] = round(100 * (plan["planned_bytes"] - record["measured_bytes"])
                                    / record["measured_bytes"], 1)
    if case.kind == FINETUNE and args.device == "cuda":
        record["capped"] = [capped_case(model, case, args.steps, plan, f, meter, timeout_s, work) for f in args.caps]
    return record


def _cell(x: float | None, width: int, form: str) -> str:
    return ("-" if x is None else format(x, form)).rjust(width)


def table(cases: list[dict]) -> str:
    rows = [f"{'case':<16} {'planned GB':>10} {'measured GB':>11} {'plan-meas.':>10} {'alloc. GB':>9} "
            f"{'tok/s 2..N':>10} {'tok/s all':>9}  capped runs"]
    for c in cases:
        if "refused" in c or "skipped" in c or "error" in c:
            rows.append(f"{c['case']:<16} {c.get('refused') or c.get('skipped') or c.get('error')}")
            continue
        measured = "measured_bytes" in c
        rows.append(f"{c['case']:<16} {c['planned_bytes'] / GB:>10.2f} "
                    f"{_cell(c['measured_bytes'] / GB if measured else None, 11, '.2f')} "
                    f"{_cell(c.get('error_pct'), 9, '.1f')}% {_cell(c.get('allocated_peak_gb'), 9, '.2f')} "
                    f"{_cell(c.get('tokens_per_s'), 10, ',.0f')} {_cell(c.get('tokens_per_s_all_steps'), 9, ',.0f')}  "
                    + " ".join(_capped(r) for r in c.get("capped", ())))
    return "\n".join(rows)


def _capped(run: dict) -> str:
    outcome = "error" if "error" in run else "ran" if run["ran"] else "OOM"
    return f"{run['fraction']:g}x:{outcome}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=150, help="start no case past this many seconds")
    parser.add_argument("--layers", type=int, help=f"layers kept of {FULL_LAYERS} (default {DEFAULT_LAYERS}; "
                        "--tiny 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps per case (default 8; --tiny 3)")
    parser.add_argument("--cases", help=f"SEQxBATCH (finetune) and refSEQxBATCH (reference), in order "
                        f"(default {CASES}; --tiny {TINY_CASES})")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same vocabulary (the CPU check)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or HERE / "results"))
    parser.add_argument("--shape", default="8b", choices=tuple(FULL_LAYERS_OF), help="Llama-3.1-8B's or -70B's")
    parser.add_argument("--caps", default="1.0,0.95", help="fractions of the plan a finetune case runs again under "
                        "('' for none; GPU only)")
    parser.add_argument("--no-uncapped", dest="uncapped", action="store_false",
                        help="finetune cases run only capped")
    parser.add_argument("--checkpoint-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cap-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("child_argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cap_child is not None:
        cap_child(args.cap_child, [a for a in args.child_argv if a != "--"])
        return
    args.caps = [float(f) for f in args.caps.split(",") if f.strip()]
    args.layers = args.layers or (1 if args.tiny else DEFAULT_LAYERS)
    args.steps = args.steps or (3 if args.tiny else 8)
    if args.checkpoint_child:
        checkpoint_child(args)
        return
    cases = parse_cases(args.cases or (TINY_CASES if args.tiny else CASES))
    started = time.monotonic()
    shutil.rmtree(WORK / RUNS, ignore_errors=True)  # finetune refuses an --out that holds another run
    checkpoint = make_checkpoint(args)
    model, meter, plans = Path(checkpoint["folder"]), Meter(args.device), {}
    date = datetime.date.today().isoformat()
    path = args.out / f"finetune_{'' if args.shape == '8b' else args.shape + '_'}{checkpoint['card']}_{date}.json"
    result = {"card": checkpoint["card"], "date": date,
              "command": "python3 bench/finetune_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": {"shape": f"llama3.1-{args.shape}" if not args.tiny else "tiny llama, 128,256-word vocabulary",
                        "layers": args.layers, "of_layers": FULL_LAYERS_OF[args.shape], "random_weights": True},
              "steps": args.steps, "budget_s": args.budget_s, "checkpoint_s": checkpoint["seconds"],
              "versions": checkpoint["versions"], ALLOC_CONF: os.environ.get(ALLOC_CONF),
              "reference": "peft + transformers Trainer, optim paged_adamw_8bit (bench/finetune_reference.py)",
              "cases": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s:
            result["cases"].append({"case": case.name, "skipped": f"not started: past --budget-s {args.budget_s:g}"})
        else:
            timeout_s = max(MIN_CASE_TIMEOUT_S, args.budget_s + CASE_GRACE_S - elapsed)
            result["cases"].append(run_case(case, args, model, meter, plans, timeout_s))
            print(table(result["cases"][-1:]).splitlines()[-1], flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["cases"]))
    print(f"wrote {path} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
