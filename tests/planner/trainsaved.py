"""Count what a QLoRA training forward saves for backward, on the CPU: the truth the training plan's formula
answers to (planner/training_memory.py).

A tiny random-weight checkpoint of one family is loaded the way the training recipe loads it (bitsandbytes
4-bit base, bf16 compute, prepare_model_for_kbit_training with reentrant checkpointing, peft LoRA adapters),
and one forward with the loss runs under bf16 autocast inside torch.autograd.graph.saved_tensors_hooks. Every
tensor packed is counted once per storage, leaving out the model's own parameters and buffers (already
counted as weights and adapters). With checkpointing, the backward runs too, and each layer's recompute is
counted the same way: what a checkpointed layer holds while its backward runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from conftest import save_tiny_checkpoint


@dataclass
class Counted:
    """Storages packed while counting, by data pointer: (bytes, dtype, shape). Each tensor counted is held
    until the count is dropped, so no storage freed meanwhile lends its address to another."""

    storages: dict[int, tuple[int, torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    held: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(n for n, _, _ in self.storages.values())


def load_for_training(folder: Path, family: str, targets: tuple[str, ...], r: int, dropout: float,
                      checkpointing: bool, **overrides):
    """A tiny checkpoint saved and loaded as the training recipe loads it, wrapped with LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    save_tiny_checkpoint(folder, family, **overrides)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=[f"{t}_proj" for t in targets])
    model = get_peft_model(model, config)
    model.train()
    return model


def _owned(model) -> Callable[[], set[int]]:
    """The storages of the model's parameters and buffers, read when asked: bitsandbytes' CPU path can give a
    weight a new storage during the forward, and the old one's address to a saved tensor."""
    return lambda: {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def _counter(owned: Callable[[], set[int]], into: Counted):
    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in into.storages and s.data_ptr() not in owned():
            into.storages[s.data_ptr()] = (s.nbytes(), t.dtype, tuple(t.shape))
            into.held.append(t)
        return t
    return pack


def count_step(model, vocab: int, seq_len: int, micro_batch: int) -> tuple[Counted, list[Counted]]:
    """What one forward saves, and what each checkpointed layer's recompute saves during the backward (in the
    order the backward runs them; none without checkpointing)."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, seq_len))
    owned, forward = _owned(model), Counted()
    with torch.autograd.graph.saved_tensors_hooks(_counter(owned, forward), lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    recomputes: list[Counted] = []
    # A checkpointed layer runs its forward itself, not through its module call, so its first submodule marks
    # where each recompute starts; the checkpointed forward runs without grad, the recompute with it.
    firsts = [m.input_layernorm for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]

    def start(module, args):
        if torch.is_grad_enabled():
            recomputes.append(Counted())

    hooks = [first.register_forward_pre_hook(start) for first in firsts]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if recomputes:
            _counter(lambda: owned() | set(forward.storages), recomputes[-1])(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return forward, recomputes
