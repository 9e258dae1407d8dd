"""`heavylift plan --fewest`: the fewest cards of each catalog GPU per precision, as the CLI prints it, with
every count checked against the exact fit test (Layout.margin) and the advice of a plan on that card."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli
from heavylift.api import plan
from heavylift.hardware.gpus import MAX_GPU_COUNT, gpu_catalog, parse_gpu_spec
from heavylift.model.source import resolve_model
from heavylift.planner.plan import Workload, layout
from heavylift.schemes import QUANT_CHOICES

CUDA_CARDS = [m.key for m in gpu_catalog() if m.kind == "cuda"]


def fewest_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, "plan", *args, "--fewest", "--json")
    assert code == 0, err
    return json.loads(out)


def margin(model: str, quant: str, gpus: str, work: Workload) -> int:
    return layout(resolve_model(model).architecture, quant).margin(parse_gpu_spec(gpus), work)


def test_8b_in_bf16_needs_one_h100(capsys):
    table = fewest_json(capsys, "llama3.1-8b", "--context", "8192", "--quant", "bf16")
    assert table["fewest"]["bf16"]["H100-80GB"] == 1
    assert table["weights_only"]["bf16"]["H100-80GB"] == 1
    assert table["engines"] == {"bf16": "fast"}


def test_405b_nf4_dq_on_4090s_is_the_advice_and_one_fewer_does_not_fit(capsys):
    table = fewest_json(capsys, "llama3.1-405b", "--context", "8192", "--quant", "nf4-dq")
    n = table["fewest"]["nf4-dq"]["RTX-4090"]
    advice = plan("llama3.1-405b", gpus="1xRTX4090", context=8192, quant="nf4-dq").scheme("nf4-dq").advice
    advised = [int(m.group(1)) for line in advice if (m := re.search(r"--gpus (\d+)xRTX-4090", line))]
    assert advised == [n] and n == 10
    work = Workload(context=8192, batch=1, engine="fast")
    assert margin("llama3.1-405b", "nf4-dq", f"{n}xRTX4090", work) >= 0
    assert margin("llama3.1-405b", "nf4-dq", f"{n - 1}xRTX4090", work) < 0
    assert table["weights_only"]["nf4-dq"]["RTX-4090"] == 9  # 215.6 GB of weights over 25.8 GB cards


def test_json_carries_every_precision_and_catalog_card(capsys):
    table = fewest_json(capsys, "llama3.1-70b")
    assert (table["model"], table["context"], table["batch"], table["max_gpu_count"]) == \
        ("llama3.1-70b", 8192, 1, MAX_GPU_COUNT)
    assert [c["name"] for c in table["cards"]] == CUDA_CARDS
    assert list(table["fewest"]) == list(QUANT_CHOICES) == list(table["weights_only"])
    for quant in QUANT_CHOICES:
        assert list(table["fewest"][quant]) == CUDA_CARDS
        weights = layout(resolve_model("llama3.1-70b").architecture, quant).weights_bytes
        for card in table["cards"]:
            lower = table["weights_only"][quant][card["name"]]
            assert lower == -(-weights // card["capacity_bytes"])
            assert table["fewest"][quant][card["name"]] >= lower


def test_null_where_more_than_the_most_cards_would_be_needed(capsys):
    table = fewest_json(capsys, "llama3.1-405b", "--context", "131072", "--batch", "16", "--quant", "bf16")
    assert table["fewest"]["bf16"]["A10G"] is None and table["fewest"]["bf16"]["RTX-5090"] == 64
    work = Workload(context=131072, batch=16, engine="fast")
    assert margin("llama3.1-405b", "bf16", f"{MAX_GPU_COUNT}xA10G", work) < 0


def test_table_shows_count_beside_the_weights_only_bound(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--fewest", "--quant", "nf4-dq")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if "RTX-4090" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["quant"] + CUDA_CARDS
    row = next(line for line in lines if "nf4-dq" in line and "│" in line)
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[0] == "nf4-dq" and cells[1 + CUDA_CARDS.index("RTX-4090")] == "10 (9)"
    assert cells[1 + CUDA_CARDS.index("H100-80GB")] == "3 (3)"
    assert lines[-1] == "planned for heavylift's engine"


def test_null_count_is_shown_as_more_than_the_most(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--fewest", "--quant", "bf16", "--context", "131072",
                           "--batch", "16")
    row = next(line for line in out.splitlines() if "bf16" in line and "│" in line)
    assert [c.strip() for c in row.strip("│").split("│")][1] == f">{MAX_GPU_COUNT} (34)"


def test_plan_without_fewest_does_not_compute_it(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fewest table was computed")

    monkeypatch.setattr("heavylift.commands.plan.fewest_table", refuse)
    monkeypatch.setattr("heavylift.api.fewest_table", refuse)
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100")
    assert code == 0 and "recommended: --quant bf16" in out


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2xH100"], "--fewest and --gpus exclude each other"),
    (["--plot", "mem.png"], "--fewest and --plot exclude each other"),
    (["--allow-offload"], "--fewest and --allow-offload exclude each other"),
    (["--quant", "int3"], "--quant must be all or one of"),
    (["--context", "0"], "--context must be a positive"),
    (["--engine", "fast", "--quant", "fp16"], "run it with --engine transformers"),
])
def test_mistakes_with_fewest_are_one_line_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, "plan", "llama3.1-8b", "--fewest", *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
