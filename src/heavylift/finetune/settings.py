"""What decides a fine-tune's loss curve, checked once: the 4-bit base, the LoRA, the data's shape, the
optimizer and its schedule, the seed. A resumed run takes them from its checkpoint; a flag given again must
say the same. The part the training plan counts is its Training (planner/training.py), which checks its own
fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from heavylift.defaults import (DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R, DEFAULT_MICRO_BATCH,
                                DEFAULT_TRAIN_QUANT, DEFAULT_TRAIN_SEQ_LEN, EVAL_FRACTION, FINETUNE_GRAD_ACCUM,
                                FINETUNE_LEARNING_RATE)
from heavylift.errors import InvalidArgumentError
from heavylift.planner.training import ALL_LINEAR, PAGED_ADAMW_8BIT, Training, check_trainable_quant


@dataclass(frozen=True)
class Settings:
    quant: str = DEFAULT_TRAIN_QUANT
    seq_len: int = DEFAULT_TRAIN_SEQ_LEN
    micro_batch: int = DEFAULT_MICRO_BATCH
    grad_accum: int = FINETUNE_GRAD_ACCUM
    lr: float = FINETUNE_LEARNING_RATE
    steps: int | None = None  # optimizer steps; None: --epochs (default one pass) decides
    epochs: float | None = None
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: float = DEFAULT_LORA_ALPHA
    lora_dropout: float = DEFAULT_LORA_DROPOUT
    target: str = ALL_LINEAR
    optimizer: str = PAGED_ADAMW_8BIT
    eval_fraction: float = EVAL_FRACTION
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self)
        self.training(grad_checkpointing=True)  # the planned part checks itself

    def training(self, grad_checkpointing: bool) -> Training:
        """The step the training plan counts."""
        return Training(lora_r=self.lora_r, lora_alpha=self.lora_alpha, targets=self.target, seq_len=self.seq_len,
                        micro_batch=self.micro_batch, grad_checkpointing=grad_checkpointing,
                        optimizer=self.optimizer, lora_dropout=self.lora_dropout)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(Settings)}


def _check(s: Settings) -> None:
    check_trainable_quant(s.quant)
    rules = [
        (s.grad_accum >= 1, "--grad-accum must be 1 or more"),
        (s.lr > 0, "--lr must be above 0"),
        (s.steps is None or s.epochs is None, "give --steps or --epochs, not both"),
        (s.steps is None or s.steps >= 1, "--steps must be 1 or more"),
        (s.epochs is None or s.epochs > 0, "--epochs must be above 0"),
        (0 <= s.eval_fraction < 1, "--eval-fraction must be from 0 to below 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise InvalidArgumentError(message)


def settings_for(given: Mapping[str, Any], saved: Mapping[str, Any] | None = None, resumed: str = "") -> Settings:
    """The settings of a run: `given` (the flags typed; None where absent) over the defaults, or, resuming, over
    the checkpoint's `saved` settings, which a flag typed again must equal (InvalidArgumentError naming it)."""
    chosen = {k: v for k, v in given.items() if v is not None}
    unknown = set(chosen) - set(FLAGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    if saved is None:
        return Settings(**chosen)
    base = {k: saved[k] for k in FLAGS if k in saved}
    for key, value in chosen.items():
        if base.get(key) is None:
            raise InvalidArgumentError(f"--resume {resumed} was trained without {FLAGS[key]}; leave it out to "
                                       "continue it, or start a new run without --resume")
        if base[key] != value:
            raise InvalidArgumentError(f"--resume {resumed} was trained with {FLAGS[key]} {base[key]}, not {value}; "
                                       f"leave {FLAGS[key]} out to continue it, or start a new run without --resume")
    return Settings(**base)
