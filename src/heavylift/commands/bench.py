"""`heavylift bench MODEL`: load, prefill and decode speed per precision, with the roofline."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from heavylift.errors import InvalidArgumentError
from heavylift.model.source import resolve_model
from .run import RUN_GPUS_HELP
from heavylift.schemes import QUANT_CHOICES

DEFAULT_BENCH_QUANTS = "nf4-dq,fp8,bf16"


def bench(
    model: str = typer.Argument(..., help="Local folder, hub id, or catalog name with weights on disk."),
    quant: str = typer.Option(DEFAULT_BENCH_QUANTS, "--quant", help="Comma-separated precisions."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=RUN_GPUS_HELP),
    compare_reference: bool = typer.Option(False, "--compare-reference",
                                           help="Also time transformers' generate on the same weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Time the fast engine: load s, prefill tok/s, decode at batch 1, 4, 16 and 64, % of each step's roofline."""
    import gc

    import torch

    from heavylift.runtime.benchmark import card_peaks, copy_bandwidth, engine_records, reference_records, timed_load
    from heavylift.runtime.prepared import build_engine

    quants = [q for q in quant.split(",") if q]
    bad = [q for q in quants if q not in QUANT_CHOICES]
    if bad or not quants:
        raise InvalidArgumentError(f"--quant takes precisions from {', '.join(QUANT_CHOICES)}, not {quant!r}")
    resolve_model(model)  # a wrong path or name is the first thing to say, GPU or not
    if not torch.cuda.is_available():
        raise InvalidArgumentError("heavylift bench times GPU decode and found no CUDA GPU here; "
                                   "run it on the machine that will serve the model")
    bandwidth = copy_bandwidth()
    flops_s = (card_peaks() or (None, None))[1]  # the catalog's dense bf16 peak, where it knows the card
    records, err = [], Console(stderr=True)
    for q in quants:
        loaded, load_s = timed_load(model, q, gpus)
        engine = build_engine(loaded)
        ours = []
        if engine is None:
            err.print(f"{q}: {loaded.runtime.reason}; no fast-engine figures")
        else:
            ours = engine_records(engine, model, q, load_s, bandwidth, flops_s)
            records += ours
            del engine
        if compare_reference and ours:
            records += reference_records(loaded.model, model, q, load_s, ours)
        elif compare_reference:
            err.print(f"{q}: no roofline without the engine's byte count; reference not timed")
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    peak = f", bf16 peak {flops_s / 1e12:.0f} TFLOP/s" if flops_s else ""
    table = Table(title=f"{model}: decode, copy bandwidth {bandwidth / 1e12:.2f} TB/s{peak}")
    for col in ("engine", "quant", "batch", "load s", "prefill tok/s", "decode tok/s", "% roofline"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r.engine, r.quant, str(r.batch), f"{r.load_s:.1f}",
                      f"{r.prefill_tok_s:.0f}" if r.prefill_tok_s else "-", f"{r.decode_tok_s:.1f}",
                      f"{r.roofline_pct:.1f}")
    Console().print(table)
