"""`heavylift catalog`: the bundled models and GPUs, usable offline."""

from __future__ import annotations

import typer
from rich.table import Table

from heavylift.model.catalog import catalog_entries
from heavylift.hardware.gpus import gpu_catalog
from heavylift.report.table import console as report_console, memory_label


def catalog(gpus: bool = typer.Option(False, "--gpus", help="List the GPU catalog instead of models.")) -> None:
    """List the models (or GPUs) heavylift knows without a download."""
    console = report_console()
    if gpus:
        table = Table("GPU", "aliases", "memory", "bandwidth GB/s", "BF16 TFLOP/s", "FP8")
        for g in gpu_catalog():
            table.add_row(g.key, ", ".join(g.aliases), memory_label(int(g.memory_bytes * g.usable_memory_fraction)),
                          f"{g.bandwidth_bytes_s / 1e9:,.0f}", f"{g.bf16_tflops or 0:,.0f}",
                          "yes" if g.native_fp8 else "no")
    else:
        table = Table("name", "hub id", "parameters", "type")
        for e in catalog_entries():
            table.add_row(e.aliases[0], e.hub_id, f"{e.params / 1e9:.2f} B", str(e.config.get("model_type")))
    console.print(table)
