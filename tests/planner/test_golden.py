"""The golden plans: every catalog model, every precision, three contexts and two GPU sets, planned exactly as
tests/planner/golden/plans.jsonl records them. A change to what plans say must regenerate that file
(tests/planner/golden/make_golden.py) in the same commit, where the diff shows what changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("golden")))
from make_golden import GOLDEN, cases, plan_line  # noqa: E402

RECORDED = {tuple(json.loads(line)["case"]): line for line in GOLDEN.read_text().splitlines()}


def test_the_golden_file_covers_the_matrix():
    assert set(RECORDED) == set(cases())


@pytest.mark.parametrize("case", cases(), ids=lambda c: str(c))
def test_plan_is_unchanged(case):
    model, context, gpus = case
    expected = json.loads(RECORDED[case])
    actual = json.loads(plan_line(model, context, gpus))
    assert actual == expected
