"""Advice holds when applied: every "--gpus N", "--context C" and "--batch B" a plan advises, planned again with
that value, fits without offload, and the value one past it (N-1 GPUs, the next context of the advice's grid,
B+1 sequences) does not. Checked over a few models x GPU sets x workloads, every precision that gets advice."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

import heavylift
from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.planner.advice import gpu_spec_item, next_context
from heavylift.planner.plan import Layout, SchemePlan, Workload, layout

GPUS = re.compile(r"use --gpus (\d+)x(\S+): ")
CONTEXT = re.compile(r"use --context (\d+): ")
ROOM = re.compile(r"room for --context (\d+) ")
BATCH = re.compile(r"use --batch (\d+): ")

# (model, --gpus, --context, --batch): plans over, plans near the edge, mixed and generic cards, sliding windows.
CASES = [
    ("llama3.1-405b", "8xH100", 131072, 8),
    ("llama3.1-405b", "6xH100", 8192, 1),
    ("llama3.1-70b", "2xRTX4090,1xA100-40GB", 32768, 2),
    ("llama3.1-70b", "2x48GB", 16384, 4),
    ("mixtral-8x7b", "1xH100", 32768, 4),
    ("gemma2-27b", "1xRTX4090", 8192, 2),
]


def _fits(s: SchemePlan) -> bool:
    return s.fits and not s.offload


def _check(lay: Layout, plan: SchemePlan, devices, work: Workload) -> list[str]:
    """Every piece of advice in `plan` that does not hold, as a line saying why."""
    wrong = []
    limit = lay.arch.max_position_embeddings

    def expect(fits: bool, devs, w: Workload, what: str) -> None:
        if _fits(lay.plan(devs, w)) != fits:
            wrong.append(f"{plan.quant}: {what} {'does not fit' if fits else 'fits'}")

    for line in plan.advice:
        if m := GPUS.match(line):
            n, card = int(m.group(1)), m.group(2)
            expect(True, parse_gpu_spec(f"{n}x{card}"), work, f"--gpus {n}x{card}")
            if n > 1:
                expect(False, parse_gpu_spec(f"{n - 1}x{card}"), work, f"--gpus {n - 1}x{card}")
        elif m := CONTEXT.match(line):
            c = int(m.group(1))
            expect(True, devices, replace(work, context=c), f"--context {c}")
            nxt = next_context(c, work.context)
            expect(False, devices, replace(work, context=nxt), f"--context {nxt}")
        elif m := ROOM.match(line):
            c = int(m.group(1))
            expect(True, devices, replace(work, context=c), f"--context {c}")
            if c < limit:
                nxt = next_context(c, limit)
                expect(False, devices, replace(work, context=nxt), f"--context {nxt}")
        elif m := BATCH.match(line):
            b = int(m.group(1))
            expect(True, devices, replace(work, batch=b), f"--batch {b}")
            expect(False, devices, replace(work, batch=b + 1), f"--batch {b + 1}")
    return wrong


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_advised_value_fits_and_the_next_does_not(case):
    model, gpus, context, batch = case
    plan = heavylift.plan(model, gpus=gpus, context=context, batch=batch)
    advised = [line for s in plan.schemes for line in s.advice
               if GPUS.match(line) or CONTEXT.match(line) or ROOM.match(line) or BATCH.match(line)]
    assert advised, "the case gives no advice to check"
    wrong = []
    for s in plan.schemes:
        work = replace(plan.workload, engine=s.engine)
        wrong += _check(layout(plan.architecture, s.quant), s, plan.devices, work)
    assert not wrong


@pytest.mark.parametrize("spec", ["1xH100", "2x48GB", "1x23.5GB", "1x0.0003GB", "1x0.5GiB", "1x7.123456789GB"])
def test_advice_names_each_card_as_gpus_reads_it_back(spec):
    card = parse_gpu_spec(spec)[0]
    again = parse_gpu_spec(f"3x{gpu_spec_item(card)}")
    assert [d.memory_bytes for d in again] == [card.memory_bytes] * 3 and again[0].name == card.name
