"""`heavylift plan MODEL`: whether and how a model fits, before anything is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from heavylift.api import fewest as fewest_table, plan as make_plan
from heavylift.defaults import DEFAULT_BATCH, DEFAULT_CONTEXT_TOKENS, DEFAULT_RESERVE_BYTES, SERVE_MAX_SEQS
from heavylift.schemes import ALL, QUANT_CHOICES
from heavylift.errors import InvalidArgumentError
from heavylift.report.table import console as report_console, render, render_fewest
from heavylift.planner.runtimes import AUTO

# The options that describe one device plan, which --fewest (a count for every catalog card) has none of.
NOT_WITH_FEWEST = ("--gpus", "--plot", "--allow-offload")
GPUS_HELP = "GPUs to plan for, e.g. 4xA100-80GB, 8xRTX4090, 2xH200, 1xH100,1xA100-40GB, 2x48GB (default: this machine's)"


def plan(
    model: str = typer.Argument(..., help="Local folder, catalog name (see `heavylift catalog`) or hub id."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=GPUS_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens per sequence (prompt + output); default "
                                          f"{DEFAULT_CONTEXT_TOKENS}, or the model's maximum when shorter."),
    batch: int = typer.Option(DEFAULT_BATCH, "--batch", help="Sequences decoded together."),
    quant: str = typer.Option(ALL, "--quant", help=f"{ALL} or one of: {', '.join(QUANT_CHOICES)}."),
    reserve: str = typer.Option(str(DEFAULT_RESERVE_BYTES), "--reserve", help="Headroom to leave free on every device, e.g. 2GiB "
                                "(GiB = 2^30 bytes, GB = 10^9)."),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="KV cache precision: bf16, fp16, fp8, fp32."),
    allow_offload: bool = typer.Option(False, "--allow-offload", help="Let layers that do not fit stay in CPU RAM."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw memory against context length into FILE.png."),
    engine: str = typer.Option(AUTO, "--engine", help="Plan for the runtime `heavylift run --engine` uses: "
                               "auto (heavylift's engine where it runs the model, else transformers), fast or "
                               "transformers."),
    serve: bool = typer.Option(False, "--serve", help="Plan a server (`heavylift serve`) of --batch sequences, and "
                               f"count how many sequences of --context tokens each precision serves at once (up to "
                               f"{SERVE_MAX_SEQS})."),
    fewest: bool = typer.Option(False, "--fewest", help="Instead of a plan: for each precision, the fewest cards "
                                "of each catalog GPU that hold the model without offload, beside the cards its "
                                "weights alone fill."),
) -> None:
    """Predict each device's memory for every precision, say whether it fits, and how to make it fit."""
    if fewest:
        check_fewest_options({"--gpus": gpus is not None, "--plot": plot is not None, "--allow-offload": allow_offload})
        table = fewest_table(model, context=context, batch=batch, quant=quant, reserve=reserve, kv_dtype=kv_dtype,
                             engine=engine, serve=serve)
        if as_json:
            typer.echo(json.dumps(table.to_json(), indent=2))
        else:
            render_fewest(table, report_console())
        return
    result = make_plan(model, gpus=gpus, context=context, batch=batch, quant=quant, reserve=reserve,
                       kv_dtype=kv_dtype, allow_offload=allow_offload, engine=engine, serve=serve)
    if plot is not None:
        from heavylift.report.plot import plot_memory

        plot_memory(result, plot)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    console = report_console()
    render(result, console)
    if plot is not None:
        console.print(f"plot written to {plot}")


def check_fewest_options(given: dict[str, bool]) -> None:
    """Refuse, in one line, an option of NOT_WITH_FEWEST given with --fewest."""
    for option in NOT_WITH_FEWEST:
        if given[option]:
            raise InvalidArgumentError(f"--fewest and {option} exclude each other: --fewest counts the cards of "
                                       f"every catalog GPU; drop {option}, or drop --fewest to plan those devices")
