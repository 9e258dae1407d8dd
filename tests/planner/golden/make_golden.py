"""Write the golden plans: the plan JSON of every catalog model, every precision, three contexts and two GPU
sets, as the planner gives it today. tests/planner/test_golden.py holds the planner to this file byte for byte.

    python tests/planner/golden/make_golden.py      # after a deliberate change to what plans say
"""

from __future__ import annotations

import json
import pathlib

import heavylift
from heavylift.model.catalog import catalog_entries

GOLDEN = pathlib.Path(__file__).with_name("plans.jsonl")
CONTEXTS = (1024, 32768, 131072)
GPU_SETS = ("1xH100", "2xRTX4090,1xA100-40GB")


def cases() -> list[tuple[str, int, str]]:
    return [(entry.aliases[0], context, gpus) for entry in catalog_entries() for context in CONTEXTS for gpus in GPU_SETS]


def plan_line(model: str, context: int, gpus: str) -> str:
    plan = heavylift.plan(model, gpus=gpus, context=context)
    return json.dumps({"case": [model, context, gpus], "plan": plan.to_json()}, sort_keys=True)


if __name__ == "__main__":
    GOLDEN.write_text("".join(plan_line(*case) + "\n" for case in cases()))
    print(f"wrote {GOLDEN} ({len(cases())} plans)")
