"""`heavylift finetune MODEL --data FILE`: QLoRA on this machine's GPUs (or its CPU), planned first.

The library side is heavylift/finetune/; this module reads the flags and shows the run: a progress bar with
loss, tokens/s, memory and time left on a terminal, else a line every --log-every steps; held-out losses and
checkpoints as they come; one summary line at the end. Ctrl-C saves a checkpoint after the step in flight and
exits 130; a second Ctrl-C exits at once, the last checkpoint intact.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from heavylift.commands.run import RUN_GPUS_HELP
from heavylift.errors import OutOfMemoryError
from heavylift.defaults import (DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R, DEFAULT_MICRO_BATCH,
                                DEFAULT_TRAIN_QUANT, DEFAULT_TRAIN_SEQ_LEN, EVAL_FRACTION, FINETUNE_EPOCHS,
                                FINETUNE_EVAL_EVERY_STEPS, FINETUNE_GRAD_ACCUM, FINETUNE_LEARNING_RATE,
                                FINETUNE_LOG_EVERY_STEPS, FINETUNE_SAVE_EVERY_STEPS, GB)
from heavylift.planner.training import ALL_LINEAR, OPTIMIZERS, PAGED_ADAMW_8BIT

STOPPING = "stopping after this step to save a checkpoint (Ctrl-C again stops at once, keeping the last one)"


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _memory_label(n: int) -> str:
    import torch

    return f"peak {_gb(n)}" if torch.cuda.is_available() else f"RSS {_gb(n)}"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Lines:
    """Progress as plain lines on stderr (a log file, a pipe): every `every` steps, and the last."""

    def __init__(self, err: Console, every: int) -> None:
        self.err, self.every = err, every

    def print(self, text: str) -> None:
        self.err.print(text)

    def step(self, ev) -> None:
        if ev.step % self.every and ev.step != ev.total_steps and ev.step != 1:
            return
        left = (ev.total_steps - ev.step) * ev.seconds_per_step
        self.err.print(f"step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} lr {ev.lr:.2e} "
                       f"{ev.tokens_per_s:,.0f} tok/s {_memory_label(ev.memory_bytes)} eta {_clock(left)}")


class Bar(Lines):
    """Progress as a rich bar on a terminal; held-out losses and checkpoints printed above it."""

    def __init__(self, err: Console, progress, task) -> None:
        super().__init__(err, 1)
        self.progress, self.task = progress, task

    def print(self, text: str) -> None:
        self.progress.console.print(text)

    def step(self, ev) -> None:
        self.progress.update(self.task, completed=ev.step, total=ev.total_steps, loss=f"{ev.loss:.4f}",
                             rate=f"{ev.tokens_per_s:,.0f}", mem=_memory_label(ev.memory_bytes))


@contextmanager
def display(err: Console, start: int, total: int, log_every: int) -> Iterator[Lines]:
    if not sys.stderr.isatty():
        yield Lines(err, log_every)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} tok/s"), TextColumn("{task.fields[mem]}"), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("train", total=total, completed=start, loss="-", rate="-", mem="-")
        yield Bar(err, progress, task)


def finetune(
    model: str = typer.Argument(..., help="Local folder, catalog name backed by a downloaded copy, or hub id."),
    data: Path = typer.Option(..., "--data", help='JSONL of chat samples ({"messages": [...]}) or texts '
                              '({"text": ...}), or a .txt file.'),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"The frozen base's 4-bit precision: nf4-dq, nf4 or "
                                        f"fp4 (default {DEFAULT_TRAIN_QUANT})."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=f"Tokens per training sequence (default "
                                          f"{DEFAULT_TRAIN_SEQ_LEN})."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help=f"Sequences per forward and backward "
                                              f"(default {DEFAULT_MICRO_BATCH})."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=f"Micro-batches per optimizer step "
                                             f"(default {FINETUNE_GRAD_ACCUM})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate; warm-up, then cosine "
                                       f"(default {FINETUNE_LEARNING_RATE})."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps to train."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data, when --steps is not given "
                                           f"(default {FINETUNE_EPOCHS:g})."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help=f"LoRA rank (default {DEFAULT_LORA_R})."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help=f"LoRA alpha; updates scale by "
                                               f"alpha / rank (default {DEFAULT_LORA_ALPHA})."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help=f"Dropout on each LoRA layer's input "
                                                 f"(default {DEFAULT_LORA_DROPOUT})."),
    target: Optional[str] = typer.Option(None, "--target", help=f"{ALL_LINEAR}, or the projections to adapt, some of "
                                         f"q,k,v,o,gate,up,down (default {ALL_LINEAR})."),
    grad_checkpointing: bool = typer.Option(True, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute each layer's activations in the backward pass."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"{' or '.join(OPTIMIZERS)} "
                                            f"(default {PAGED_ADAMW_8BIT})."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out samples to score, in the same "
                                             "formats as --data."),
    eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help=f"Without --eval-data, this "
                                                  f"fraction of --data is held out (default {EVAL_FRACTION})."),
    eval_every: int = typer.Option(FINETUNE_EVAL_EVERY_STEPS, "--eval-every", min=1,
                                   help="Score the held-out samples every N steps (also before and after)."),
    save_every: int = typer.Option(FINETUNE_SAVE_EVERY_STEPS, "--save-every", min=1,
                                   help="Save a checkpoint every N steps (also at the end and on Ctrl-C)."),
    log_every: int = typer.Option(FINETUNE_LOG_EVERY_STEPS, "--log-every", min=1,
                                  help="A progress line every N steps when stderr is not a terminal."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for checkpoints and the final adapter "
                                       "(default ./finetune-MODEL, or the resumed run's)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint folder, or the "
                                          "newest checkpoint in a fine-tune's --out."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help=RUN_GPUS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the LoRA weights, the held-out split, the "
                                       "data order and dropout (default 0)."),
) -> None:
    """Train a LoRA adapter over MODEL quantized (QLoRA), planned for this machine first."""
    from heavylift.finetune.train import Options, load_finetune, prepare_finetune

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    given = dict(quant=quant, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, lr=lr, steps=steps,
                 epochs=epochs, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target=target,
                 optimizer=optimizer, eval_fraction=eval_fraction, seed=seed)
    options = Options(out, resume, eval_data, gpus, grad_checkpointing, eval_every, save_every)
    job = prepare_finetune(model, data, given, options)
    for warning in job.base.plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    for note in job.notes:
        err.print(f"[dim]{escape(note)}[/]")
    trainer = load_finetune(job, options)
    err.print(escape(_header(job, trainer)))
    _train(err, trainer, log_every)


def _header(job, trainer) -> str:
    s, plan = job.settings, job.plan
    where = f"resuming {job.resume} at step {trainer.step}" if job.resume else f"writing to {job.out}"
    return (f"{job.model}: {s.quant}, LoRA r {s.lora_r} alpha {s.lora_alpha:g} on {','.join(plan.training.targets)} "
            f"({plan.trainable_params:,} trainable parameters); {len(job.train)} training and {len(job.held_out)} "
            f"held-out examples; {trainer.total} steps of {s.grad_accum * s.micro_batch} sequences of up to "
            f"{s.seq_len} tokens; planned: {plan.advice[0]}; {where}")


def _train(err: Console, trainer, log_every: int) -> None:
    import torch

    from heavylift.finetune.loop import Evaluated, Saved, Step

    with display(err, trainer.step, trainer.total, log_every) as shown:
        try:
            for event in trainer.run(notice=lambda: shown.print(STOPPING)):
                if isinstance(event, Step):
                    shown.step(event)
                elif isinstance(event, Evaluated):
                    shown.print(f"step {event.step}/{trainer.total} held-out loss {event.loss:.4f}")
                elif isinstance(event, Saved):
                    shown.print(f"saved {event.folder}")
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(_out_of_memory(trainer)) from None
    err.print(escape(_summary(trainer)))


def _out_of_memory(trainer) -> str:
    """The one line for a step that ran out of GPU memory: what was kept and the knobs that shrink a step."""
    s = trainer.settings
    kept = f"the last checkpoint in {trainer.out} is intact" if trainer.step else "nothing was saved"
    return (f"out of GPU memory in training step {trainer.step + 1} (--seq-len {s.seq_len}, --micro-batch "
            f"{s.micro_batch}), which the plan fits on a card with nothing else on it: free the GPU of other "
            f"processes, or pass a smaller --micro-batch (with more --grad-accum) or a shorter --seq-len; {kept}")


def _summary(trainer) -> str:
    s = trainer.summary()
    parts = [f"trained {s.steps} steps in {_clock(s.seconds)}"]
    if s.first_loss is not None:
        parts.append(f"loss {s.first_loss:.4f} -> {s.last_loss:.4f}")
    if s.first_eval is not None:
        parts.append(f"held-out {s.first_eval:.4f} -> {s.last_eval:.4f}")
    parts.append(f"{s.tokens_per_s:,.0f} tok/s, {_memory_label(s.memory_bytes)}")
    return ", ".join(parts) + f"; adapter in {trainer.out}"
