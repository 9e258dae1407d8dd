"""heavylift.evaluate(): each precision's quality against a reference, one loaded model at a time.

The text is tokenized once (with the tokenizer's own special tokens, as llama.cpp does) and cut into
consecutive, non-overlapping windows of `window` tokens; where the tokenizer starts a text with BOS, each
window's first token is replaced by BOS. In each window the logits at positions window/2 .. window-2 are
scored against the tokens at window/2 + 1 .. window-1: window/2 - 1 positions a window, every window the
first included, each with at least window/2 tokens of context (llama.cpp's `perplexity`, first = n_ctx/2).

The reference precision runs first and alone; its distributions are saved (reference.py) and the model
freed before the next precision loads, so the reference and a quantized copy are never in memory together.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from heavylift.api import BEST, prepare, resolve_quants
from heavylift.defaults import EVAL_QUANTS, EVAL_WINDOW_TOKENS, REFERENCE_TOP_K
from heavylift.errors import InvalidArgumentError, PlanDoesNotFitError
from heavylift.planner.memory import FAST
from heavylift.planner.runtimes import AUTO
from heavylift.schemes import ALL, QUANT_CHOICES
from . import corpus, metrics, reference as ref

MIN_WINDOW_TOKENS = 4  # a window scores window/2 - 1 positions: at least one


@dataclass(frozen=True)
class Quality:
    """One precision measured against the reference (the reference's own row has reference=True and no
    comparison figures). Fractions, not percent: same_top 0.97 is 97%."""

    quant: str
    runtime: str  # "fast" (heavylift's engine) or "transformers"
    reference: bool
    positions: int
    perplexity: float
    perplexity_error: float
    kld_mean: float | None
    kld_error: float | None
    kld_p99: float | None
    kld_max: float | None
    same_top: float | None
    same_top_error: float | None
    rms_dp: float | None
    rms_dp_error: float | None
    memory_bytes: int | None  # the plan's total on this machine at --context window
    decode_tok_s_bound: float | None  # the plan's upper bound on decode speed


@dataclass(frozen=True)
class Evaluation:
    model: str
    text: str  # the file, or the default corpus's name
    window: int
    windows: int
    positions: int  # scored per precision
    reference_quant: str
    reference_runtime: str
    reference_file: str
    results: tuple[Quality, ...]


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, its name): the file, or the default corpus's held-out chapters."""
    if path is None:
        return corpus.held_out_text(), corpus.CORPUS_NAME
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"--text {path} does not exist; give a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"--text {path} cannot be read as UTF-8 text ({type(e).__name__})") from None
    if not text.strip():
        raise InvalidArgumentError(f"--text {path} is empty; give a text of at least one --window of tokens")
    return text, str(path)


def make_windows(tokenizer, text: str, window: int, tokens: int | None) -> list[list[int]]:
    """The text's consecutive windows of `window` token ids, within its first `tokens` tokens."""
    ids = tokenizer(text)["input_ids"]
    usable = len(ids) if tokens is None else min(tokens, len(ids))
    if usable < window:
        have = f"--tokens {tokens}" if tokens is not None and tokens < len(ids) else f"the text's {len(ids)} tokens"
        raise InvalidArgumentError(f"{have} do not fill one --window of {window}; give a longer text or a "
                                   "smaller --window")
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None
    windows = [ids[i:i + window] for i in range(0, usable - window + 1, window)]
    if bos is not None:
        windows = [[bos] + w[1:] for w in windows]
    return windows


def window_logprobs(session, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [window/2 - 1, vocab] (float32, CPU) at positions window/2 .. window-2."""
    first = len(ids) // 2
    if session.engine is not None:
        rows = session.engine.prompt_logprobs(ids, first)[:-1]
    else:
        from heavylift.runtime.loader import expected_int8_casts

        tokens = torch.tensor([ids], device=session.device)
        with torch.inference_mode(), expected_int8_casts():
            logits = session.model(input_ids=tokens, logits_to_keep=len(ids) - first).logits[0, :-1]
        rows = torch.log_softmax(logits.float(), dim=-1)
    return rows.cpu()


def _targets(ids: list[int]) -> torch.Tensor:
    first = len(ids) // 2
    return torch.tensor(ids[first + 1:], dtype=torch.long)


def _runtime(session) -> str:
    return FAST if session.engine is not None else "transformers"


def _release() -> None:
    """Give back the memory of a model its caller has just dropped, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_reference(session, windows: list[list[int]], meta: ref.ReferenceMeta) -> ref.Reference:
    parts = {name: [] for name in ref.ARRAYS}
    for ids in windows:
        lp = window_logprobs(session, ids)
        targets = _targets(ids)
        top = torch.topk(lp, min(REFERENCE_TOP_K, lp.shape[1]), dim=-1)
        parts["targets"].append(targets.numpy())
        parts["target_logprobs"].append(lp.gather(1, targets[:, None])[:, 0].numpy())
        parts["top_ids"].append(top.indices.numpy())
        parts["top_logprobs"].append(top.values.numpy())
        parts["top1"].append(lp.argmax(1).numpy())
    return ref.Reference(meta, **{name: np.concatenate(v) for name, v in parts.items()})


def compare_session(session, windows: list[list[int]], reference: ref.Reference) -> metrics.Positions:
    parts, start = [], 0
    for ids in windows:
        lp = window_logprobs(session, ids)
        rows = reference.rows(start, start + lp.shape[0])
        parts.append(metrics.compare(lp, rows["targets"], rows["top_ids"], rows["top_logprobs"], rows["top1"],
                                     rows["target_logprobs"]))
        start += lp.shape[0]
    return metrics.join(parts)


def _quality(quant: str, runtime: str, positions: metrics.Positions, scheme) -> Quality:
    ppl, ppl_error = metrics.perplexity(positions.nll)
    kld, kld_error = metrics.mean_and_error(positions.kld)
    same, same_error = metrics.fraction_and_error(positions.same_top)
    rms, rms_error = metrics.rms_and_error(positions.dp)
    return Quality(quant, runtime, False, len(positions.nll), ppl, ppl_error, kld, kld_error,
                   metrics.percentile(positions.kld), float(positions.kld.max()), same, same_error, rms, rms_error,
                   scheme.total_bytes, scheme.decode_tok_s_upper_bound)


def _reference_quality(reference: ref.Reference, scheme) -> Quality:
    ppl, ppl_error = metrics.perplexity(-reference.target_logprobs)
    return Quality(reference.meta.quant, reference.meta.runtime, True, len(reference.targets), ppl, ppl_error,
                   None, None, None, None, None, None, None, None,
                   scheme.total_bytes if scheme else None, scheme.decode_tok_s_upper_bound if scheme else None)


def _check(quants: Sequence[str], window: int, tokens: int | None) -> tuple[str, ...]:
    names = resolve_quants(ALL if list(quants) == [ALL] else list(quants))
    if window < MIN_WINDOW_TOKENS or window % 2:
        raise InvalidArgumentError(f"--window must be an even number of at least {MIN_WINDOW_TOKENS} tokens, "
                                   f"not {window}")
    if tokens is not None and tokens < 1:
        raise InvalidArgumentError(f"--tokens must be at least one --window ({window}), not {tokens}")
    return names


def _prepare_reference(model: str, asked: str | None, window: int, engine: str, gpus):
    """The reference precision, planned: the one asked, else BF16, else (BF16 does not fit) the most
    faithful precision that does."""
    if asked is not None:
        return prepare(model, asked, gpus=gpus, context=window, engine=engine)
    try:
        return prepare(model, "bf16", gpus=gpus, context=window, engine=engine)
    except PlanDoesNotFitError:
        return prepare(model, BEST, gpus=gpus, context=window, engine=engine)


def _is_precision(reference: str | Path | None) -> bool:
    return reference is None or str(reference) in QUANT_CHOICES


def evaluate(model: str, quant: str | Sequence[str] = EVAL_QUANTS, text: str | Path | None = None,
             tokens: int | None = None, window: int = EVAL_WINDOW_TOKENS, reference: str | Path | None = None,
             engine: str = AUTO, reference_engine: str | None = None, gpus: str | None = None,
             progress: Callable[[str], None] | None = None) -> Evaluation:
    """Measure each precision in `quant` against the reference (a precision, default BF16 or the most
    faithful that fits; or a file a previous evaluation saved) on `text` (default: the held-out chapters of
    the KJV corpus), each loaded on this machine for `engine` (`reference_engine`: the reference's, default
    the same). Records in the order asked, the reference's first."""
    say = progress or (lambda message: None)
    names = _check([quant] if isinstance(quant, str) else quant, window, tokens)
    body, text_name = read_text(text)
    reference_engine = reference_engine or engine
    from_file = not _is_precision(reference)
    first = _prepare_reference(model, None if from_file else reference, window, reference_engine, gpus)
    # Every precision planned (config and headers only) before any weight loads: one that cannot fit, or
    # that the runtime asked for cannot run, is refused now rather than after the reference has run.
    planned = [prepare(model, name, gpus=gpus, context=window, engine=engine) for name in names]
    windows = make_windows(first.tokenizer, body, window, tokens)
    fingerprint = ref.Fingerprint(ref.tokenizer_hash(first.tokenizer), ref.ids_hash(windows), window)
    if from_file:
        path = Path(reference)
        saved = ref.load(path)
        ref.check(saved, fingerprint, path)
        scheme = None
    else:
        say(f"reference: {first.scheme.quant}")
        session = first.load()
        meta = ref.ReferenceMeta(model, first.scheme.quant, _runtime(session), fingerprint)
        saved = compute_reference(session, windows, meta)
        del session
        _release()
        path = ref.save(saved, ref.default_path(meta))
        scheme = first.scheme
    results = [_reference_quality(saved, scheme)]
    for prepared in planned:
        results.append(_measure(prepared, windows, saved, say))
    return Evaluation(model, text_name, window, len(windows), len(saved.targets), saved.meta.quant,
                      saved.meta.runtime, str(path), tuple(results))


def _measure(prepared, windows, saved: ref.Reference, say: Callable[[str], None]) -> Quality:
    """Load one planned precision, compare it with the reference, and free it."""
    quant = prepared.scheme.quant
    say(quant)
    session = prepared.load()
    runtime = _runtime(session)
    positions = compare_session(session, windows, saved)
    del session
    _release()
    return _quality(quant, runtime, positions, prepared.scheme)
