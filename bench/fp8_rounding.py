"""How far apart two FP8 runs land when they differ only in bf16-level details, beside how far FP8 lands from BF16.

    python bench/fp8_rounding.py [--model FOLDER] [--windows 24] [--out DIR]

FP8 as torchao's Float8DynamicActivationFloat8Weight computes it (weights per output row, activations per
token row, both float8_e4m3fn) is emulated in float32 on the CPU in every linear layer but the head of the
small model bench/train_small.py trains on the King James Bible (trained into a temporary folder unless
--model names one). The same held-out windows are scored with:
- bf16, with SDPA attention (the reference) and with eager attention;
- FP8, its activation scale rounded in bf16 (torchao's arithmetic), with SDPA and with eager attention;
- FP8, its activation scale kept in float32, with SDPA.
Written: the KL divergence of each against the reference, and between the FP8 variants. An FP8 activation
has three mantissa bits, so a bf16-level difference upstream (another attention kernel, another rounding of
a scale) moves some activations across a rounding boundary, and every later layer rounds differently: two
FP8 runs that are each as far from BF16 disagree with each other by most of that distance. The result
explains why heavylift's engine and transformers' forward, each in FP8 on the same weights, differ by more
than their BF16 runs do (bench/eval_gpu.py's runtime_agreement).
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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_small  # noqa: E402

FP8_E4M3_MAX = 448.0
SIZE = "cpu"  # the CPU-size model: the effect needs no larger one, and this runs in about two minutes


def fp8_forward(scale_in_bf16: bool):
    """A Linear's forward in emulated FP8: per-row weight and activation scales, exact float32 accumulation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        ws = (w.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX).float()  # torchao: in the weight's dtype
        wq = (w.float() / ws).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        xs = (x.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).float() if scale_in_bf16 \
            else x.float().abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
        xq = (x.float() / xs).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        y = (xq @ wq.t()) * xs * ws.t()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    return forward


VARIANTS = {
    "bf16 sdpa": dict(attention="sdpa", fp8=None),
    "bf16 eager": dict(attention="eager", fp8=None),
    "fp8 sdpa": dict(attention="sdpa", fp8="bf16"),
    "fp8 eager": dict(attention="eager", fp8="bf16"),
    "fp8 sdpa, fp32 activation scale": dict(attention="sdpa", fp8="fp32"),
}
PAIRS = (("bf16 sdpa", "bf16 eager"), ("bf16 sdpa", "fp8 sdpa"), ("bf16 sdpa", "fp8 eager"),
         ("bf16 sdpa", "fp8 sdpa, fp32 activation scale"), ("fp8 sdpa", "fp8 eager"),
         ("fp8 sdpa", "fp8 sdpa, fp32 activation scale"))


def log_probs(folder: Path, windows: torch.Tensor, attention: str, fp8: str | None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation=attention)
    if fp8:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                module.forward = fp8_forward(scale_in_bf16=fp8 == "bf16").__get__(module)
    with torch.no_grad():
        return torch.cat([F.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(P || Q), from log-probabilities."""
    return (p.exp() * (p - q)).sum(-1).mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a folder bench/train_small.py wrote (default: train one)")
    parser.add_argument("--windows", type=int, default=24, help="held-out windows scored")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from heavylift.evaluation import corpus

    started = time.perf_counter()
    folder = args.model
    trained = None
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="kjv-cpu-"))
        trained = train_small.train_small(folder, SIZE, seed=0, device="cpu")
    window = train_small.SIZES[SIZE].seq
    ids = AutoTokenizer.from_pretrained(folder)(corpus.held_out_text())["input_ids"]
    count = min(args.windows, len(ids) // window)
    windows = torch.tensor(ids[:count * window]).view(count, window)
    scored = {name: log_probs(folder, windows, **v) for name, v in VARIANTS.items()}
    result = dict(card="cpu", date=datetime.date.today().isoformat(),
                  command="python bench/fp8_rounding.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  torch=torch.__version__, python=platform.python_version(), train=trained,
                  window=window, positions=count * window,
                  kl={f"{a} -> {b}": kl(scored[a], scored[b]) for a, b in PAIRS})
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8_rounding_cpu_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for pair, value in result["kl"].items():
        print(f"KL {pair}: {value:.6f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
