"""`heavylift finetune`'s library side: everything checked, cheapest first, then the base loaded by the
training plan with LoRA on it, ready to train.

Order: the arguments and the checkpoint to resume; the data file, line by line; the model's config and --out
against its folder; the training plan for this machine (planner/training.py: --seq-len and --target against
the model, and one step's memory on each device), which refuses what does not fit; the tokenizer and the
examples; only then the weights, placed as the training plan splits the layers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from heavylift.defaults import FINETUNE_EVAL_EVERY_STEPS, FINETUNE_SAVE_EVERY_STEPS, TRAIN_FRAGMENTED_SLACK_BYTES
from heavylift.errors import DataError, InvalidArgumentError, PlanDoesNotFitError
from heavylift.model.source import ModelSource, resolve_model
from heavylift.planner.advice import gb
from heavylift.planner.memory import TRANSFORMERS
from heavylift.planner.training import TRAIN_ALLOC_CONF, TrainingPlan
from .adapter import attach_lora, check_adapter
from .checkpoints import State, check_out, find_checkpoint, read_state
from .data import Dataset, Encoded, encode, read_data, split_held_out
from .settings import Settings, settings_for

DEFAULT_OUT_PREFIX = "finetune-"  # --out defaults to ./finetune-<model's last name>
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"  # read by PyTorch's CUDA allocator when CUDA starts


@dataclass(frozen=True)
class Options:
    """What a run does besides its settings (none of it changes the loss curve)."""

    out: Path | None = None
    resume: Path | None = None
    eval_data: Path | None = None
    gpus: str | None = None
    grad_checkpointing: bool = True
    eval_every: int = FINETUNE_EVAL_EVERY_STEPS  # optimizer steps between held-out scores
    save_every: int = FINETUNE_SAVE_EVERY_STEPS  # optimizer steps between checkpoints


@dataclass(frozen=True)
class Finetune:
    """A fine-tune ready to load: the settings resolved, the data read and tokenized, the plan made."""

    model: str
    settings: Settings
    plan: TrainingPlan  # one step of this run on this machine's devices, which it fits
    out: Path
    resume: Path | None
    state: State
    train: tuple
    held_out: tuple
    notes: tuple[str, ...]
    base: Any  # runtime.prepared.Prepared: the base planned for this machine, its tokenizer, then its weights


def default_out(model: str) -> Path:
    return Path(DEFAULT_OUT_PREFIX + Path(model.rstrip("/")).name)


def _check_same_data(dataset: Dataset | None, saved: str | None, flag: str, resumed: Path) -> None:
    digest = dataset.sha256 if dataset is not None else None
    if digest != saved:
        shown = dataset.path if dataset is not None else "(none)"
        raise InvalidArgumentError(f"{flag} {shown} is not what --resume {resumed} was trained on (the contents "
                                   "differ); give the same file to continue it")


def _resumed(options: Options) -> tuple[Path | None, State | None]:
    if options.resume is None:
        return None, None
    folder = find_checkpoint(options.resume)
    return folder, read_state(folder)


def prepare_finetune(model: str, data: Path, given: Mapping[str, Any], options: Options) -> Finetune:
    """Check everything cheap and plan; the weights are not read yet (`load_finetune` reads them)."""
    from heavylift.api import prepare

    allocator = allocator_notes()  # before anything starts CUDA
    checkpoint, saved = _resumed(options)
    settings = settings_for(given, saved.settings if saved else None, str(options.resume))
    dataset = read_data(data)
    eval_set = read_data(options.eval_data, "--eval-data") if options.eval_data is not None else None
    if saved is not None:
        if saved.step >= saved.total_steps:
            raise InvalidArgumentError(f"--resume {options.resume}: {checkpoint.name} is the last of its "
                                       f"{saved.total_steps} steps, nothing is left to train; start a new run")
        _check_same_data(dataset, saved.data.get("train"), "--data", options.resume)
        _check_same_data(eval_set, saved.data.get("eval"), "--eval-data", options.resume)
    source = resolve_model(model)
    out = options.out or (checkpoint.parent if checkpoint is not None else default_out(model))
    check_out(out, source.folder, resuming=saved is not None)
    if checkpoint is not None:
        check_adapter(checkpoint, source.architecture, model, "--resume")
    plan = plan_for_training(model, source, settings, options)
    base = prepare(model, quant=settings.quant, gpus=options.gpus, context=settings.seq_len,
                   batch=settings.micro_batch, engine=TRANSFORMERS, source=source)
    train, held_out, notes = _examples(base.tokenizer, dataset, eval_set, settings, model)
    state = saved or State(0, 0, 0, str(source.folder or model), settings.to_json(),
                           {"train": dataset.sha256, "eval": eval_set.sha256 if eval_set else None}, ())
    return Finetune(model, settings, plan, out, checkpoint, state, train, held_out, allocator + notes, base)


def plan_for_training(model: str, source: ModelSource, settings: Settings, options: Options) -> TrainingPlan:
    """One step planned on this machine's devices (those --gpus narrows); PlanDoesNotFitError with the plan's
    advice where it does not fit."""
    from heavylift.api import plan_training
    from heavylift.runtime.devices import machine_devices

    plan = plan_training(model, gpus=machine_devices(options.gpus), quant=settings.quant,
                         training=settings.training(options.grad_checkpointing), source=source)
    if not plan.fits:
        raise PlanDoesNotFitError(f"{model} in {settings.quant}, a training step: {'; '.join(plan.advice)}")
    return plan


def allocator_notes() -> tuple[str, ...]:
    """The recipe's allocator setting (expandable segments) put in the environment before CUDA starts, where
    the user set none; a note where theirs lacks it, or CUDA started before it could take effect."""
    current = os.environ.get(ALLOC_CONF_ENV)
    torch = sys.modules.get("torch")  # not imported yet: CUDA has not started
    started = torch is not None and torch.cuda.is_initialized()
    if current is None and not started:
        os.environ[ALLOC_CONF_ENV] = TRAIN_ALLOC_CONF
        return ()
    if current is not None and TRAIN_ALLOC_CONF in current.replace(" ", ""):
        return ()
    if torch is None or not torch.cuda.is_available():
        return ()
    why = f"is {current!r}" if current is not None else "was not set when CUDA started"
    return (f"{ALLOC_CONF_ENV} {why}, not {TRAIN_ALLOC_CONF!r} as the training plan counts on: a step may need "
            f"up to {gb(TRAIN_FRAGMENTED_SLACK_BYTES)} more than planned",)


def _examples(tokenizer, dataset: Dataset, eval_set: Dataset | None, settings: Settings,
              model: str) -> tuple[tuple, tuple, tuple[str, ...]]:
    """(training, held-out examples, notes on what tokenizing cut or dropped)."""
    encoded = encode(dataset, tokenizer, settings.seq_len, model)
    notes = list(_notes(encoded, dataset, settings.seq_len))
    if eval_set is not None:
        held = encode(eval_set, tokenizer, settings.seq_len, model)
        notes += _notes(held, eval_set, settings.seq_len)
        train, held_out = encoded.examples, held.examples
    else:
        train, held_out = split_held_out(encoded.examples, settings.eval_fraction, settings.seed)
    if not train:
        raise DataError(f"{dataset.path} gives no training example at --seq-len {settings.seq_len}; give more data")
    if not held_out:
        notes.append("no held-out loss: give --eval-data FILE, or more samples for --eval-fraction")
    return train, held_out, tuple(notes)


def _notes(encoded: Encoded, dataset: Dataset, seq_len: int) -> Iterator[str]:
    if encoded.cut:
        yield f"{encoded.cut} samples of {dataset.path} were longer than --seq-len {seq_len} and were cut to it"
    if encoded.dropped:
        yield f"{encoded.dropped} samples of {dataset.path} had no assistant token within --seq-len and were left out"


def load_finetune(finetune: Finetune, options: Options):
    """The base's weights loaded by the plan (the offload guard refuses what lands off it), LoRA attached,
    and a Trainer over them, at the checkpoint's step when resuming."""
    import torch

    from heavylift.runtime import loader
    from .trainer import Cadence, Trainer

    s = finetune.settings
    arch = finetune.base.source.architecture
    weights = finetune.base.load_weights(loader.placement_from_plan(arch, finetune.plan))
    torch.manual_seed(s.seed)  # the LoRA weights' initial values (a resumed run then loads its own)
    training = finetune.plan.training
    model = attach_lora(weights.model, training.target_modules, s.lora_r, s.lora_alpha, s.lora_dropout,
                        options.grad_checkpointing)
    compute = loader.compute_dtype(all(d.bf16_supported for d in finetune.plan.devices))
    cadence = Cadence(options.eval_every, options.save_every)
    pad_id = finetune.base.tokenizer.pad_token_id
    return Trainer(model, s, finetune.train, finetune.held_out, pad_id, finetune.out, finetune.state, cadence,
                   compute, finetune.resume)
