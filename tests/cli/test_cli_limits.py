"""Sizes a plan refuses or warns about, through the CLI as typed."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize("flag, value, most", [("--context", "1000000000000", "16,777,216"),
                                               ("--batch", "1000000000", "65,536")])
def test_absurd_context_or_batch_is_refused_in_one_line(capsys, flag, value, most):
    code, out, err = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "8xH100", flag, value)
    assert (code, out) == (2, "")
    assert err == (f"error: {flag} {int(value):,} is beyond any model or server (at most {most}); "
                   f"pass a smaller {flag}\n")


def test_a_context_past_the_models_positions_is_planned_with_a_warning(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--context", "200000")
    warning = ("--context 200,000 is longer than the 131,072 positions llama was trained on "
               "(max_position_embeddings): memory is planned, but text past that length degrades")
    assert code == 0 and f"warning: {warning}" in out
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--context", "200000", "--json")
    assert json.loads(out)["warnings"] == [warning]
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--context", "131072", "--json")
    assert json.loads(out)["warnings"] == []


def test_without_context_a_model_shorter_than_the_default_is_planned_at_its_own_maximum(capsys):
    code, out, _ = run_cli(capsys, "plan", "phi3-mini", "--gpus", "1xH100", "--json")
    plan = json.loads(out)
    assert (code, plan["context"], plan["warnings"]) == (0, 4096, [])
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100", "--json")
    assert json.loads(out)["context"] == 8192


def test_a_reserve_that_takes_the_whole_device_is_refused_from_python_too():
    import heavylift
    from heavylift.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"^--reserve 200GiB leaves nothing to plan on: H100-80GB \(#0\)"):
        heavylift.plan("llama3.1-8b", gpus="1xH100", reserve="200GiB")
