"""`heavylift plan MODEL`: whether and how a model fits, before anything is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from typer._click.core import ParameterSource

from heavylift.api import fewest as fewest_table, plan as make_plan, plan_training
from heavylift.defaults import (DEFAULT_BATCH, DEFAULT_CONTEXT_TOKENS, DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT,
                                DEFAULT_LORA_R, DEFAULT_MICRO_BATCH, DEFAULT_RESERVE_BYTES, DEFAULT_TRAIN_QUANT,
                                DEFAULT_TRAIN_SEQ_LEN, SERVE_MAX_SEQS)
from heavylift.schemes import ALL, QUANT_CHOICES
from heavylift.errors import InvalidArgumentError
from heavylift.report.table import console as report_console, render, render_fewest, render_training
from heavylift.planner.runtimes import AUTO
from heavylift.planner.training import ALL_LINEAR, OPTIMIZERS, PAGED_ADAMW_8BIT, Training

# The options that describe one device plan, which --fewest (a count for every catalog card) has none of.
NOT_WITH_FEWEST = ("--gpus", "--plot", "--allow-offload")
# The options that describe an inference workload, which --train (one training step) has none of; and the
# options that describe the training step, which only --train takes (parameter name: option).
NOT_WITH_TRAIN = {"context": "--context", "batch": "--batch", "kv_dtype": "--kv-dtype",
                  "allow_offload": "--allow-offload", "plot": "--plot", "engine": "--engine", "serve": "--serve",
                  "fewest": "--fewest"}
TRAIN_ONLY = {"lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
              "target": "--target", "seq_len": "--seq-len", "micro_batch": "--micro-batch",
              "grad_checkpointing": "--grad-checkpointing", "optimizer": "--optimizer"}
GPUS_HELP = "GPUs to plan for, e.g. 4xA100-80GB, 8xRTX4090, 2xH200, 1xH100,1xA100-40GB, 2x48GB (default: this machine's)"


def plan(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local folder, catalog name (see `heavylift catalog`) or hub id."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=GPUS_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens per sequence (prompt + output); default "
                                          f"{DEFAULT_CONTEXT_TOKENS}, or the model's maximum when shorter."),
    batch: int = typer.Option(DEFAULT_BATCH, "--batch", help="Sequences decoded together."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"{ALL} (default) or one of: {', '.join(QUANT_CHOICES)}; "
                                        f"with --train one 4-bit base, default {DEFAULT_TRAIN_QUANT}."),
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
    train: bool = typer.Option(False, "--train", help="Instead of inference: one QLoRA fine-tuning step (a 4-bit "
                               "base, LoRA adapters, their optimizer, the activations kept for backward), as "
                               "`heavylift finetune` runs it."),
    lora_r: int = typer.Option(DEFAULT_LORA_R, "--lora-r", help="With --train: the adapters' rank."),
    lora_alpha: float = typer.Option(DEFAULT_LORA_ALPHA, "--lora-alpha", help="With --train: the adapters' alpha "
                                     "(scaling alpha / r)."),
    lora_dropout: float = typer.Option(DEFAULT_LORA_DROPOUT, "--lora-dropout", help="With --train: dropout on the "
                                       "adapters' inputs (0 keeps no masks)."),
    target: str = typer.Option(ALL_LINEAR, "--target", help=f"With --train: the projections adapted, {ALL_LINEAR} "
                               "or some of q,k,v,o,gate,up,down."),
    seq_len: int = typer.Option(DEFAULT_TRAIN_SEQ_LEN, "--seq-len", help="With --train: tokens per sequence."),
    micro_batch: int = typer.Option(DEFAULT_MICRO_BATCH, "--micro-batch", help="With --train: sequences per "
                                    "forward and backward (more per optimizer step come by accumulation)."),
    grad_checkpointing: bool = typer.Option(True, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="With --train: recompute each layer in the backward instead of "
                                                 "keeping its activations."),
    optimizer: str = typer.Option(PAGED_ADAMW_8BIT, "--optimizer", help=f"With --train: {' or '.join(OPTIMIZERS)}."),
) -> None:
    """Predict each device's memory for every precision, say whether it fits, and how to make it fit."""
    given = {name for name in (*NOT_WITH_TRAIN, *TRAIN_ONLY)
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if train:
        check_train_options(given)
        training = Training(lora_r=lora_r, lora_alpha=lora_alpha, targets=target, seq_len=seq_len,
                            micro_batch=micro_batch, grad_checkpointing=grad_checkpointing, optimizer=optimizer,
                            lora_dropout=lora_dropout)
        result = plan_training(model, gpus=gpus, quant=quant or DEFAULT_TRAIN_QUANT, training=training,
                               reserve=reserve)
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=2))
        else:
            render_training(result, report_console())
        return
    for name, option in TRAIN_ONLY.items():
        if name in given:
            raise InvalidArgumentError(f"{option} describes a training step: add --train, or drop {option}")
    quant = quant or ALL
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


def check_train_options(given: set[str]) -> None:
    """Refuse, in one line, an inference option given with --train."""
    for name, option in NOT_WITH_TRAIN.items():
        if name in given:
            raise InvalidArgumentError(f"--train and {option} exclude each other: --train plans one training step "
                                       f"(--seq-len, --micro-batch); drop {option}")
