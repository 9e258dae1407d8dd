"""`heavylift merge MODEL --adapter DIR --out DIR`: a LoRA adapter folded into the base's bf16 weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from heavylift.commands.run import RUN_GPUS_HELP


def merge(
    model: str = typer.Argument(..., help="The base model the adapter was trained on: local folder, catalog name "
                                "backed by a downloaded copy, or hub id."),
    adapter: Path = typer.Option(..., "--adapter", help="The LoRA adapter folder (`heavylift finetune --out`, or one "
                                 "of its checkpoints)."),
    out: Path = typer.Option(..., "--out", help="A new folder for the merged model (bf16 weights, config, tokenizer)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=RUN_GPUS_HELP),
) -> None:
    """Write MODEL with the adapter merged into its weights, in bf16, for tools that do not apply adapters."""
    from heavylift.finetune.merge import MERGE_QUANT, merge as merge_adapter

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    written = merge_adapter(model, adapter, out, gpus)
    err.print(escape(f"merged {adapter} into {model}: {written} ({MERGE_QUANT} weights, config, tokenizer)"))
