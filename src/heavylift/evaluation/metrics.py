"""The statistics of `heavylift eval`, defined as llama.cpp's `perplexity --kl-divergence` defines them.

Per scored position t, with P the reference's next-token distribution, Q the evaluated one and y_t the
token that really follows:

- negative log-likelihood  nll_t = -log Q(y_t)
- KL divergence            KLD_t = sum_i P(i) (log P(i) - log Q(i))
- same top token           S_t = [argmax_i Q(i) == argmax_i P(i)]
- change in the right token's probability   dp_t = Q(y_t) - P(y_t)

Over the n positions, each mean comes with its standard error, the sample variance over n - 1
(llama.cpp's mean_and_uncertainty):

- perplexity        PPL = exp(mean nll), error PPL * sqrt((mean nll^2 - (mean nll)^2) / (n - 1))
- mean KLD          mean KLD, error sqrt((mean KLD^2 - (mean KLD)^2) / (n - 1)); also its 99th
                    percentile (numpy's linear interpolation) and maximum
- same top          p = mean S, error sqrt(p (1 - p) / (n - 1))
- RMS dp            r = sqrt(mean dp^2), error (first-order propagation through the square root)
                    sqrt((mean dp^4 - (mean dp^2)^2) / (n - 1)) / (2 r)

The reference keeps only its top k tokens per position (defaults.REFERENCE_TOP_K; all of them when the
vocabulary is no larger). The KL divergence then lumps the rest into one token:
KLD_t = sum_{i in top k} P(i) (log P(i) - log Q(i)) + P_rest (log P_rest - log Q_rest), with P_rest and
Q_rest each distribution's mass outside the reference's top k. By the log-sum inequality this is at most
the full sum, and equal to it when the rest is one token or Q rescales P there uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KLD_PERCENTILE = 99.0  # the tail reported beside the mean


@dataclass(frozen=True)
class Positions:
    """Per-position figures of one evaluated precision (numpy arrays of one length)."""

    nll: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray  # bool
    dp: np.ndarray


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error, sqrt((mean x^2 - (mean x)^2) / (n - 1)); the error is 0 for n = 1."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    mean = float(x.mean())
    variance = max(float((x * x).mean()) - mean * mean, 0.0)
    return mean, math.sqrt(variance / (n - 1)) if n > 1 else 0.0


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    mean, error = mean_and_error(nll)
    value = math.exp(mean)
    return value, value * error


def fraction_and_error(flags: np.ndarray) -> tuple[float, float]:
    """The fraction of True and its binomial standard error sqrt(p (1 - p) / (n - 1))."""
    n = flags.size
    p = float(np.mean(flags))
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def rms_and_error(dp: np.ndarray) -> tuple[float, float]:
    mean_square, error = mean_and_error(np.asarray(dp, dtype=np.float64) ** 2)
    rms = math.sqrt(mean_square)
    return rms, error / (2 * rms) if rms > 0 else 0.0


def percentile(values: np.ndarray, q: float = KLD_PERCENTILE) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def compare(logprobs: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
            top1: torch.Tensor, target_logprobs: torch.Tensor) -> Positions:
    """One window's positions: the evaluated log-probabilities [n, vocab] against the reference's top-k ids
    and log-probabilities [n, k], its most likely token [n] and its log-probability of the targets [n]."""
    lq = logprobs.double()
    lp = top_logprobs.double()
    nll = -lq.gather(1, targets[:, None])[:, 0]
    lq_top = lq.gather(1, top_ids)
    p = lp.exp()
    kld = (p * (lp - lq_top)).sum(1)
    if top_ids.shape[1] < lq.shape[1]:  # the tokens outside the reference's top k, as one
        p_rest = (1 - p.sum(1)).clamp_min(0)
        q_rest = (1 - lq_top.exp().sum(1)).clamp_min(torch.finfo(torch.float64).tiny)
        kld = kld + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0.0)
    same = lq.argmax(1) == top1
    dp = (-nll).exp() - target_logprobs.double().exp()
    return Positions(nll.numpy(), kld.numpy(), same.numpy(), dp.numpy())


def join(parts: list[Positions]) -> Positions:
    return Positions(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nll", "kld", "same_top", "dp")))
