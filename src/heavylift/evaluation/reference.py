"""The reference's per-position distributions, saved once and compared against every precision.

What is kept, per scored position: the reference's REFERENCE_TOP_K most likely tokens and their
log-probabilities (float32, normalised over the whole vocabulary, so the log-sum-exp is already folded
in), its single most likely token, and its log-probability of the token that follows. Full logits would be
vocab x positions (128k tokens x 16k positions x 2 bytes = 4 GB for a Llama 3 model); the top k is 4 KiB a
position whatever the vocabulary, and exact for vocabularies of at most k tokens. Float32 rather than the
16 bits llama.cpp stores: a 16-bit log-probability rounds by up to 4e-3 near -10, which is more KL
divergence than an 8-bit model adds.

A file (numpy .npz, no pickles) carries its fingerprint: a hash of the tokenizer's vocabulary and of the
token ids it scored, and the window. A reference is reused only where all three match, so a file made
with another tokenizer or another text is refused instead of compared position by position with noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from heavylift.defaults import CACHE_ENV, CACHE_FOLDER
from heavylift.errors import InvalidArgumentError

FORMAT = 1  # bumped when the arrays or the meta change meaning
ARRAYS = ("targets", "target_logprobs", "top_ids", "top_logprobs", "top1")


@dataclass(frozen=True)
class Fingerprint:
    tokenizer: str  # sha256 of the vocabulary
    text: str  # sha256 of the token ids of the windows scored
    window: int


@dataclass(frozen=True)
class ReferenceMeta:
    model: str
    quant: str
    runtime: str  # "fast" or "transformers"
    fingerprint: Fingerprint
    format: int = FORMAT


@dataclass(frozen=True)
class Reference:
    meta: ReferenceMeta
    targets: np.ndarray  # int64 [n]: the token after each scored position
    target_logprobs: np.ndarray  # float32 [n]
    top_ids: np.ndarray  # int64 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]
    top1: np.ndarray  # int64 [n]: argmax over the whole vocabulary

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Positions start..stop-1 as tensors, for metrics.compare."""
        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name)[start:stop])) for name in ARRAYS}


def cache_dir() -> Path:
    """$HEAVYLIFT_CACHE, else $XDG_CACHE_HOME/heavylift, else ~/.cache/heavylift."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_FOLDER


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def ids_hash(windows: list[list[int]]) -> str:
    return hashlib.sha256(np.asarray(windows, dtype=np.int64).tobytes()).hexdigest()


def default_path(meta: ReferenceMeta) -> Path:
    """Where a reference is saved: one file per model, precision, runtime, tokenizer, text and window."""
    key = hashlib.sha256(json.dumps(asdict(meta), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "references" / f"{meta.quant}-{meta.runtime}-{key}.npz"


def save(reference: Reference, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, meta=np.array(json.dumps(asdict(reference.meta))),
             **{name: getattr(reference, name) for name in ARRAYS})
    partial.replace(path)  # a reader never sees half a file
    return path


def load(path: Path) -> Reference:
    """A saved reference; one line naming the file where it cannot be read."""
    if not path.is_file():
        raise InvalidArgumentError(f"--reference {path} is neither a precision nor a file; give bf16 (or another "
                                   "precision) to compute one, or the file an earlier eval printed")
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in ARRAYS}
        meta = ReferenceMeta(raw["model"], raw["quant"], raw["runtime"], Fingerprint(**raw["fingerprint"]),
                             raw["format"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgumentError(f"--reference {path} is not a reference heavylift eval saved "
                                   f"({type(e).__name__}); give a precision (bf16) to compute one") from None
    if meta.format != FORMAT:
        raise InvalidArgumentError(f"--reference {path} was saved by another heavylift (format {meta.format}); "
                                   "compute it again with --reference bf16")
    return Reference(meta, **arrays)


def check(reference: Reference, expected: Fingerprint, path: Path) -> None:
    """Refuse a reference made with another tokenizer, text or window (one line that says which)."""
    got = reference.meta.fingerprint
    fix = "compute a new one with --reference bf16"
    if got.tokenizer != expected.tokenizer:
        raise InvalidArgumentError(f"--reference {path} was made with another tokenizer; {fix}")
    if got.window != expected.window:
        raise InvalidArgumentError(f"--reference {path} was made with --window {got.window}, not "
                                   f"{expected.window}; pass --window {got.window} or {fix}")
    if got.text != expected.text:
        raise InvalidArgumentError(f"--reference {path} was made on another text (or --tokens); give the same "
                                   f"--text and --tokens, or {fix}")
