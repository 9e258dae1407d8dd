"""The statistics of heavylift eval on cases small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heavylift.evaluation import metrics


def test_perplexity_and_its_error():
    # nll 1, 2, 3, 4: mean 2.5, mean square 7.5, variance 7.5 - 6.25 = 1.25, error sqrt(1.25 / 3) = 0.645497
    ppl, error = metrics.perplexity(np.array([1.0, 2.0, 3.0, 4.0]))
    assert ppl == pytest.approx(math.exp(2.5), rel=1e-12)  # 12.182494
    assert error == pytest.approx(math.exp(2.5) * math.sqrt(1.25 / 3), rel=1e-12)  # 7.863778


def test_same_top_fraction_and_its_binomial_error():
    p, error = metrics.fraction_and_error(np.array([True, True, True, False]))
    assert p == 0.75
    assert error == pytest.approx(math.sqrt(0.75 * 0.25 / 3), rel=1e-12)  # 0.25


def test_rms_dp_and_its_propagated_error():
    # dp^2 = .01 .01 .09 .09: mean .05, rms sqrt(.05); dp^4 mean .0041, variance .0041 - .0025 = .0016
    rms, error = metrics.rms_and_error(np.array([0.1, -0.1, 0.3, -0.3]))
    assert rms == pytest.approx(math.sqrt(0.05), rel=1e-12)
    assert error == pytest.approx(math.sqrt(0.0016 / 3) / (2 * math.sqrt(0.05)), rel=1e-9)  # 0.051640


def test_kl_divergence_over_the_whole_vocabulary():
    # P = (.5, .5), Q = (.25, .75): .5 ln(.5/.25) + .5 ln(.5/.75) = 0.143841
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    out = metrics.compare(q, torch.tensor([1]), torch.tensor([[0, 1]]), p, torch.tensor([0]), p[:, 1])
    assert out.kld[0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-12)
    assert out.nll[0] == pytest.approx(-math.log(0.75), rel=1e-6)
    assert out.dp[0] == pytest.approx(0.25, rel=1e-6)
    assert not out.same_top[0]  # Q's top token is 1, P's (by its stored argmax) 0


def test_kl_divergence_lumps_the_tokens_outside_the_reference_top_k():
    # P = (.5, .3, .2), Q = (.4, .4, .2), top 1 kept: .5 ln(.5/.4) + (1 - .5) ln(.5/.6) = 0.020411
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64).log()
    p_top = torch.tensor([[0.5]], dtype=torch.float64).log()
    out = metrics.compare(q, torch.tensor([0]), torch.tensor([[0]]), p_top, torch.tensor([0]), p_top[:, 0])
    assert out.kld[0] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6), rel=1e-6)
    assert out.same_top[0]
