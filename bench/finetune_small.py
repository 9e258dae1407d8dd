"""A real fine-tune of the small KJV model through `heavylift finetune`, and its loss curve.

    python bench/finetune_small.py [--model FOLDER] [--epochs 3] [--out DIR]

The model is bench/train_small.py's CPU size (0.72M parameters, trained on the King James Bible; trained
into a temporary folder unless --model names one). It is fine-tuned with QLoRA, as a user types it, on a
text it has never seen and that reads nothing like its corpus: this project's own documentation (docs/*.md,
its SHA-256 recorded). Written to DIR (default bench/results): finetune_loss_<card>_<date>.json (the
command, the run's summary line and every logged step and held-out loss from the adapter's
trainer_state.json) and finetune_loss_<card>_<date>.png (training and held-out loss against the step; the committed plot lives in
docs/, where the repository keeps its images).
On a CUDA machine the same command fine-tunes on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_small  # noqa: E402
from eval_gpu import card_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--seq-len", "128", "--micro-batch", "8", "--lr", "1e-3", "--eval-every", "10", "--log-every", "1"]


def corpus(folder: Path) -> tuple[Path, str]:
    """docs/*.md joined into one text file; its SHA-256 names the exact text."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    path = folder / "docs.txt"
    path.write_text(text)
    return path, hashlib.sha256(text.encode()).hexdigest()


def plot(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from heavylift.report.plot import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval_loss" in e]
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], label="training loss", lw=1)
    ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a folder bench/train_small.py wrote (default: train one)")
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="finetune-small-"))
    folder = args.model
    trained = None
    if folder is None:
        folder = work / "kjv"
        trained = train_small.train_small(folder, "cpu", seed=0)
    data, digest = corpus(work)
    adapter = work / "adapter"
    command = [sys.executable, "-m", "heavylift", "finetune", str(folder), "--data", str(data), "--epochs",
               args.epochs, *SETTINGS, "--out", str(adapter)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        sys.exit(f"heavylift finetune failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    state = json.loads((adapter / "trainer_state.json").read_text())
    summary = next((line for line in reversed(done.stdout.splitlines() + done.stderr.splitlines())
                    if line.startswith("trained ")), None)
    import torch

    card, date = card_name("cuda" if torch.cuda.is_available() else "cpu"), datetime.date.today().isoformat()
    result = dict(card=card, date=date,
                  command="python bench/finetune_small.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  finetune_command="heavylift finetune MODEL --data docs.txt --epochs " + args.epochs + " "
                  + " ".join(SETTINGS) + " --out ADAPTER",
                  base=trained, data={"what": "docs/*.md of this repository, joined", "sha256": digest,
                                      "bytes": data.stat().st_size},
                  summary=summary, seconds=seconds, log=state["log"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"finetune_loss_{card}_{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(state["log"], stem.with_suffix(".png"), f"QLoRA (nf4-dq, r 16) of the 0.72M-parameter KJV model on "
         f"heavylift's docs, {card}")
    print(summary)
    print(f"wrote {stem}.json and .png in {seconds} s")


if __name__ == "__main__":
    main()
