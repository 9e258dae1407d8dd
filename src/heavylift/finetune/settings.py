"""What decides a fine-tune's loss curve, checked once: the precision of the base, the LoRA, the data's
shape, the optimizer and its schedule, the seed. A resumed run takes them from its checkpoint; a flag given
again must say the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from heavylift.defaults import (EVAL_FRACTION, FINETUNE_GRAD_ACCUM, FINETUNE_LEARNING_RATE, FINETUNE_MICRO_BATCH,
                                FINETUNE_QUANT, FINETUNE_SEQ_LEN_TOKENS, LORA_ALPHA, LORA_DROPOUT, LORA_RANK,
                                MAX_CONTEXT_TOKENS)
from heavylift.errors import InvalidArgumentError
from heavylift.schemes import SCHEMES
from .adapter import ALL_LINEAR

PAGED_ADAMW_8BIT, ADAMW = "paged-adamw-8bit", "adamw"  # bitsandbytes' PagedAdamW8bit; torch's AdamW
OPTIMIZERS = (PAGED_ADAMW_8BIT, ADAMW)
# LoRA trains over weights bitsandbytes stores (peft wraps its layers) or unquantized ones; peft has no LoRA
# layer over torchao's FP8 weights.
TRAINABLE_QUANTS = tuple(name for name, s in SCHEMES.items() if not s.quantized or s.four_bit or s.code == "int8")


@dataclass(frozen=True)
class Settings:
    quant: str = FINETUNE_QUANT
    seq_len: int = FINETUNE_SEQ_LEN_TOKENS
    micro_batch: int = FINETUNE_MICRO_BATCH
    grad_accum: int = FINETUNE_GRAD_ACCUM
    lr: float = FINETUNE_LEARNING_RATE
    steps: int | None = None  # optimizer steps; None: --epochs (default one pass) decides
    epochs: float | None = None
    lora_r: int = LORA_RANK
    lora_alpha: float = LORA_ALPHA
    lora_dropout: float = LORA_DROPOUT
    target: str = ALL_LINEAR
    optimizer: str = PAGED_ADAMW_8BIT
    eval_fraction: float = EVAL_FRACTION
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self)

    @property
    def quantized(self) -> bool:
        return SCHEMES[self.quant].quantized

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(Settings)}
FLAGS["lr"], FLAGS["lora_r"], FLAGS["target"] = "--lr", "--lora-r", "--target"


def _check(s: Settings) -> None:
    rules = [
        (s.quant in TRAINABLE_QUANTS, f"--quant must be one of {', '.join(TRAINABLE_QUANTS)} to train LoRA over, "
                                      f"not {s.quant!r}"),
        (2 <= s.seq_len <= MAX_CONTEXT_TOKENS, f"--seq-len must be from 2 to {MAX_CONTEXT_TOKENS:,} tokens"),
        (s.micro_batch >= 1, "--micro-batch must be 1 or more"),
        (s.grad_accum >= 1, "--grad-accum must be 1 or more"),
        (s.lr > 0, "--lr must be above 0"),
        (s.steps is None or s.epochs is None, "give --steps or --epochs, not both"),
        (s.steps is None or s.steps >= 1, "--steps must be 1 or more"),
        (s.epochs is None or s.epochs > 0, "--epochs must be above 0"),
        (s.lora_r >= 1, "--lora-r must be 1 or more"),
        (s.lora_alpha > 0, "--lora-alpha must be above 0"),
        (0 <= s.lora_dropout < 1, "--lora-dropout must be from 0 to below 1"),
        (s.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {s.optimizer!r}"),
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
