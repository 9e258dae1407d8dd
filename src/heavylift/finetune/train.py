"""`heavylift finetune`'s library side: everything checked, cheapest first, then the base loaded by its plan
with LoRA on it, ready to train.

Order: the arguments and the checkpoint to resume; the data file, line by line; the model's config (--seq-len
against its positions, --target against its projections, --out against its folder); the plan for this
machine, which refuses what does not fit; the tokenizer and the examples; only then the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from heavylift.defaults import FINETUNE_EVAL_EVERY_STEPS, FINETUNE_SAVE_EVERY_STEPS
from heavylift.errors import DataError, InvalidArgumentError
from heavylift.model.source import resolve_model
from heavylift.planner.memory import TRANSFORMERS
from .adapter import attach_lora, check_adapter, resolve_targets
from .checkpoints import State, check_out, find_checkpoint, read_state
from .data import Dataset, Encoded, encode, read_data, split_held_out
from .settings import Settings, settings_for

DEFAULT_OUT_PREFIX = "finetune-"  # --out defaults to ./finetune-<model's last name>


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
    targets: tuple[str, ...]
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
    arch = source.architecture
    if 0 < arch.max_position_embeddings < settings.seq_len:
        raise InvalidArgumentError(f"--seq-len {settings.seq_len} is beyond {model}'s max_position_embeddings "
                                   f"{arch.max_position_embeddings}; use --seq-len {arch.max_position_embeddings} "
                                   "or less")
    targets = resolve_targets(settings.target, arch, model)
    out = options.out or (checkpoint.parent if checkpoint is not None else default_out(model))
    check_out(out, source.folder, resuming=saved is not None)
    if checkpoint is not None:
        check_adapter(checkpoint, arch, model, "--resume")
    base = prepare(model, quant=settings.quant, gpus=options.gpus, context=settings.seq_len,
                     batch=settings.micro_batch, engine=TRANSFORMERS)
    train, held_out, notes = _examples(base.tokenizer, dataset, eval_set, settings, model)
    state = saved or State(0, 0, 0, str(base.source.folder or model), settings.to_json(),
                           {"train": dataset.sha256, "eval": eval_set.sha256 if eval_set else None}, ())
    return Finetune(model, settings, targets, out, checkpoint, state, train, held_out, notes, base)


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

    from .trainer import Cadence, Trainer

    s = finetune.settings
    weights = finetune.base.load_weights()
    torch.manual_seed(s.seed)  # the LoRA weights' initial values (a resumed run then loads its own)
    model = attach_lora(weights.model, s.quantized, finetune.targets, s.lora_r, s.lora_alpha, s.lora_dropout,
                        options.grad_checkpointing)
    cadence = Cadence(options.eval_every, options.save_every)
    pad_id = finetune.base.tokenizer.pad_token_id
    return Trainer(model, s, finetune.train, finetune.held_out, pad_id, finetune.out, finetune.state, cadence,
                   finetune.resume)
