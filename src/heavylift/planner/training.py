"""The training plan (`heavylift plan MODEL --train`): per GPU, whether one QLoRA fine-tuning step fits.

The recipe planned, which `heavylift finetune` runs (docs/training.md):
  0. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (TRAIN_ALLOC_CONF) before CUDA starts;
  1. transformers' from_pretrained with bitsandbytes 4-bit (the scheme's quant type and double
     quantization, bf16 compute, dtype bf16), layers placed on the GPUs as this plan splits them;
  2. peft's prepare_model_for_kbit_training(model, use_gradient_checkpointing=..., gradient_checkpointing_kwargs=
     {"use_reentrant": True}): the base frozen, every parameter it does not quantize upcast to float32;
  3. peft's get_peft_model with LoraConfig(r, lora_alpha, lora_dropout, target_modules, task_type="CAUSAL_LM");
  4. per micro-batch, under torch.autocast("cuda", dtype=torch.bfloat16): `loss = model(input_ids=ids,
     labels=ids, use_cache=False).loss` on full sequences (no padding, no attention mask), the output object
     dropped at once; then loss.backward(), and after the accumulated micro-batches optimizer.step() and
     optimizer.zero_grad(set_to_none=True).
The optimizer is bitsandbytes' PagedAdamW8bit or torch.optim.AdamW over the adapters.

Each device is planned at its peak over one steady step (the optimizer states exist from the first step on,
the gradients from the first micro-batch of a step): the loss's backward (the device with the head), a layer's
backward (checkpointed: with its recompute), without checkpointing the forward of a device's last layer, or
the optimizer step. Pure: an Architecture and Devices in, frozen dataclasses out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

from heavylift.defaults import (DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R, DEFAULT_MICRO_BATCH,
                                DEFAULT_TRAIN_SEQ_LEN, MAX_BATCH, MAX_CONTEXT_TOKENS, MAX_LORA_R,
                                PAGED_OPTIMIZER_MIN_MANAGED_BYTES, TRAIN_ALLOCATOR_SLACK_BYTES, TRAIN_CONTEXT_BYTES)
from heavylift.errors import InvalidArgumentError, UnsupportedArchitectureError
from heavylift.hardware.gpus import Device
from heavylift.model.architecture import QUANTIZABLE_ROLES, Architecture, Role
from heavylift.schemes import SCHEMES, Scheme, allocated_bytes
from .memory import cublas_workspace_bytes
from .placement import Costs, balance
from .plan import tightest
from . import training_memory as tm

ALL_LINEAR = "all-linear"  # every projection of the layer: peft's "all-linear" on these families
PAGED_ADAMW_8BIT, ADAMW = "paged-adamw-8bit", "adamw"
OPTIMIZERS = (PAGED_ADAMW_8BIT, ADAMW)
# QLoRA trains over a base bitsandbytes stores in 4 bits: the precisions --quant takes for training.
TRAINABLE_QUANTS = tuple(name for name, s in SCHEMES.items() if s.four_bit)
# The families whose training step is counted (training_memory.py): one decoder layer layout, measured.
TRAIN_FAMILIES = ("llama", "mistral", "qwen2")
# The peak moments a device plan names (TrainingDevicePlan.peak).
PEAK_FORWARD, PEAK_LOSS, PEAK_BACKWARD, PEAK_OPTIMIZER = "forward", "loss", "backward", "optimizer"
# The allocator setting of the recipe: without expandable segments, freed gigabyte-sized logits blocks fragment
# the cache by up to twice their size (defaults.TRAIN_FRAGMENTED_SLACK_BYTES).
TRAIN_ALLOC_CONF = "expandable_segments:True"
# A training step runs the forward on the caller's thread and the backward on autograd's device thread:
# cuBLAS keeps a workspace per thread's handle and stream, so a device holds two.
CUBLAS_WORKSPACES_TRAINING = 2


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """--target: "all-linear" or projections named q, k, v, o, gate, up, down (comma-separated, or with
    the "_proj" peft's module names carry), in the layer's order."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip().removesuffix("_proj") for n in names if n.strip()]
    if names == [ALL_LINEAR]:
        return tm.PROJECTIONS
    bad = [n for n in names if n not in tm.PROJECTIONS]
    if bad or not names:
        raise InvalidArgumentError(f"--target must be {ALL_LINEAR} or some of {','.join(tm.PROJECTIONS)} "
                                   f"(comma-separated), not {bad[0] if bad else targets!r}")
    return tuple(p for p in tm.PROJECTIONS if p in names)


def _whole(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"--{name} must be a whole number from {low:,} to {high:,}, not {value!r}")


@dataclass(frozen=True)
class Training:
    """One fine-tuning workload: the adapters and what one forward and backward carries."""

    lora_r: int = DEFAULT_LORA_R
    lora_alpha: float = DEFAULT_LORA_ALPHA  # a number, as peft's LoraConfig takes it: held as a float
    targets: tuple[str, ...] = tm.PROJECTIONS  # or "all-linear", or "q,v": parsed by parse_targets
    seq_len: int = DEFAULT_TRAIN_SEQ_LEN
    micro_batch: int = DEFAULT_MICRO_BATCH
    grad_checkpointing: bool = True
    optimizer: str = PAGED_ADAMW_8BIT
    lora_dropout: float = DEFAULT_LORA_DROPOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", parse_targets(self.targets))
        _whole("lora-r", self.lora_r, 1, MAX_LORA_R)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise InvalidArgumentError(f"--lora-alpha must be a positive number, not {self.lora_alpha!r}")
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        _whole("seq-len", self.seq_len, 1, MAX_CONTEXT_TOKENS)
        _whole("micro-batch", self.micro_batch, 1, MAX_BATCH)
        if not isinstance(self.grad_checkpointing, bool):
            raise InvalidArgumentError(f"grad_checkpointing must be True or False, not {self.grad_checkpointing!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise InvalidArgumentError(f"--lora-dropout must be at least 0 and below 1, not {self.lora_dropout!r}")

    @property
    def target_modules(self) -> list[str]:
        """The targets as peft's LoraConfig names them."""
        return [f"{t}_proj" for t in self.targets]

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.seq_len * self.micro_batch

    @property
    def step(self) -> tm.Step:
        return tm.Step(self.seq_len, self.micro_batch, self.targets, self.lora_r, self.lora_dropout > 0)


def check_trainable_quant(quant: str) -> None:
    """Refuse, in one line, a base precision QLoRA does not train over."""
    if not isinstance(quant, str) or quant not in TRAINABLE_QUANTS:
        raise InvalidArgumentError(f"QLoRA trains over a 4-bit base: --quant must be one of "
                                   f"{', '.join(TRAINABLE_QUANTS)}, not {quant}")


def check_trainable(arch: Architecture, scheme: Scheme, training: Training) -> None:
    """Refuse, in one line, a model or a workload this plan cannot count or the model cannot take. The lines
    name no command: `heavylift plan --train` and `heavylift finetune` both show them."""
    families = ", ".join(TRAIN_FAMILIES)
    if arch.num_experts:
        raise UnsupportedArchitectureError(
            f"the training plan counts dense {families} models; {arch.model_type} is a mixture of experts, whose "
            f"expert adapters and routing it does not count: pick a dense {families} model")
    if arch.model_type not in TRAIN_FAMILIES:
        raise UnsupportedArchitectureError(
            f"the training plan counts {families} models, not {arch.model_type}: pick one of those to train "
            "(`heavylift plan` without --train plans its inference)")
    check_trainable_quant(scheme.name)
    limit = arch.max_position_embeddings
    if limit and training.seq_len > limit:
        raise InvalidArgumentError(f"--seq-len {training.seq_len:,} is longer than the {limit:,} positions "
                                   f"{arch.model_type} takes (max_position_embeddings); pass --seq-len {limit} or less")
    windows = [w for w in arch.layer_windows if w is not None and w < training.seq_len]
    if windows:
        raise InvalidArgumentError(f"--seq-len {training.seq_len:,} is longer than the model's {min(windows):,}-token "
                                   f"sliding window, whose attention mask the training plan does not count; "
                                   f"pass --seq-len {min(windows)} or less")
    widest = min(min(tm.projection_shapes(arch)[t]) for t in training.targets)
    if training.lora_r > widest:
        raise InvalidArgumentError(f"--lora-r {training.lora_r} is wider than the {widest:,} features of the "
                                   f"narrowest target: pass --lora-r {widest} or less")


@dataclass(frozen=True)
class TrainingDevicePlan:
    """One device's bytes at its peak in a training step."""

    device: Device
    layers: range  # decoder layers held; empty when the device is unused
    weights_bytes: int  # the frozen base: 4-bit projections, float32 norms, biases, embeddings and head
    adapter_bytes: int  # LoRA A and B in float32
    gradient_bytes: int  # the adapters' float32 gradients
    optimizer_bytes: int  # optimizer states (and, at the optimizer step's peak, its temporaries)
    activation_bytes: int  # tensors saved for backward, and the backward's own buffers, at the peak
    logits_bytes: int  # the head's bf16 weight copy, log-probabilities and their gradients, at the peak
    overhead_bytes: int  # CUDA context, cuBLAS workspaces, the allocator's slack, managed-memory pages
    capacity_bytes: int  # memory the plan may fill: the device's memory less the reserve
    peak: str  # when the peak comes: PEAK_FORWARD, PEAK_LOSS, PEAK_BACKWARD or PEAK_OPTIMIZER

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes + self.logits_bytes + self.overhead_bytes)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes


@dataclass(frozen=True)
class TrainingPlan:
    model: str
    architecture: Architecture
    devices: tuple[Device, ...]
    quant: str
    training: Training
    reserve_bytes: int
    per_device: tuple[TrainingDevicePlan, ...]
    trainable_params: int
    advice: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return all(d.free_bytes >= 0 for d in self.per_device)

    @property
    def tightest(self) -> TrainingDevicePlan:
        return tightest(self.per_device)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.per_device)

    @cached_property
    def _json(self) -> dict:
        from .contract import training_plan_to_json

        return training_plan_to_json(self)

    def to_json(self) -> dict:
        """The plan as `heavylift plan --train --json` prints it (contract.py)."""
        return self._json


@dataclass(frozen=True)
class _Peak:
    activation_bytes: int
    logits_bytes: int
    extra_optimizer_bytes: int
    peak: str


class TrainingLayout:
    """Byte counts of one architecture, one 4-bit scheme and one training workload, computed once."""

    def __init__(self, arch: Architecture, scheme: Scheme, training: Training):
        check_trainable(arch, scheme, training)
        self.arch, self.scheme, self.training = arch, scheme, training
        self.step = replace(training.step, double_quant=scheme.double_quant)
        # the head's and the loss's saved tensors with the loss's backward buffers: the last device's loss peak
        self.loss = tm.total(tm.head_saved(arch, self.step) + tm.loss_backward(arch, self.step))
        self.layer_weights = tuple(self._layer_weights(i) for i in range(arch.num_layers))
        fp32 = {r: sum(allocated_bytes(t.numel * tm.FP32) for t in arch.global_tensors() if t.role == r) for r in Role}
        self.embedding = fp32[Role.EMBEDDING]
        self.head = fp32[Role.NORM] + fp32[Role.LM_HEAD]
        sizes = tm.adapter_shapes(arch, training.targets, training.lora_r)
        self.adapter_sizes = sizes
        self.layer_adapters = tm.adapter_bytes(sizes)
        self.layer_optimizer = (tm.paged_adamw_8bit_bytes(sizes) if training.optimizer == PAGED_ADAMW_8BIT
                                else tm.adamw_bytes(sizes))
        self.trainable_params = sum(sizes) * arch.num_layers

    def _layer_weights(self, i: int) -> int:
        """A layer after prepare_model_for_kbit_training: its projections in the scheme, the rest in float32."""
        tensors = self.arch.layer_tensors(i)
        return (self.scheme.weights_bytes(t for t in tensors if t.role in QUANTIZABLE_ROLES)
                + sum(allocated_bytes(t.numel * tm.FP32) for t in tensors if t.role not in QUANTIZABLE_ROLES))

    # --- activations --------------------------------------------------------------------------------

    def held(self, run: range, first: bool, cuda: bool) -> int:
        """What the device's layers keep for backward once the forward is through them: per layer its saved
        tensors (checkpointed: its input), and the rotary tables: once on the device that computes them, once
        per layer on the others (accelerate copies each layer's inputs to its device)."""
        step, gc = self.step, self.training.grad_checkpointing
        if gc:
            per_layer = [[tm.checkpoint_saved(self.arch, step)] for _ in run]
        else:
            per_layer = [tm.layer_saved(self.arch, step, i > 0, cuda) for i in run]
        rope = gc or any(tm.rope_needed(step, i > 0) for i in run)
        tables = tm.total(tm.rope_saved(self.arch, step)) if rope else 0
        return sum(tm.total(saved) for saved in per_layer) + tables * (1 if first else len(run))

    def peak(self, run: range, first: bool, last: bool, cuda: bool) -> _Peak:
        """The device's fullest moment: the loss's backward (the device with the head), a layer's backward
        (its last layer: every other layer's tensors still held), without checkpointing its last layer's
        forward, or the optimizer step."""
        if not run:
            return _Peak(0, 0, 0, PEAK_OPTIMIZER)
        arch, step, gc = self.arch, self.step, self.training.grad_checkpointing
        held = self.held(run, first, cuda)
        moments = [_Peak(held + tm.layer_backward_bytes(arch, step, gc, cuda), 0, 0, PEAK_BACKWARD)]
        if not gc:
            forward = held + tm.mlp_forward_bytes(arch, step, cuda)
            moments.append(_Peak(forward + (tm.embeddings_output_bytes(arch, step) if first else 0), 0, 0,
                                 PEAK_FORWARD))
        if last:
            moments.append(_Peak(held, self.loss, 0, PEAK_LOSS))
        if self.training.optimizer == ADAMW:
            moments.append(_Peak(0, 0, tm.adamw_step_bytes(self.adapter_sizes) * len(run), PEAK_OPTIMIZER))
        return max(moments, key=lambda m: m.activation_bytes + m.logits_bytes + m.extra_optimizer_bytes)

    # --- devices ------------------------------------------------------------------------------------

    def overhead(self, device: Device, layers: int) -> int:
        """Outside the tensors: the CUDA context, a cuBLAS workspace per thread, the allocator's slack, and the
        managed memory a paged optimizer takes beyond its states."""
        if device.kind != "cuda":
            return 0
        managed = 0
        if self.training.optimizer == PAGED_ADAMW_8BIT:
            paged = tm.paged_state_bytes(self.adapter_sizes) * layers
            managed = max(0, PAGED_OPTIMIZER_MIN_MANAGED_BYTES - paged) if paged else 0
        return (TRAIN_CONTEXT_BYTES + CUBLAS_WORKSPACES_TRAINING * cublas_workspace_bytes(device.compute_capability)
                + TRAIN_ALLOCATOR_SLACK_BYTES + managed)

    def device_plan(self, device: Device, run: range, capacity: int) -> TrainingDevicePlan:
        if not run:
            return TrainingDevicePlan(device, run, 0, 0, 0, 0, 0, 0, 0, capacity, PEAK_OPTIMIZER)
        n = self.arch.num_layers
        first, last = 0 in run, n - 1 in run
        weights = (sum(self.layer_weights[i] for i in run) + (self.embedding if first else 0)
                   + (self.head if last else 0))
        adapters = self.layer_adapters * len(run)
        optimizer = self.layer_optimizer * len(run) + tm.optimizer_shared_bytes(
            self.training.optimizer == PAGED_ADAMW_8BIT, any(s >= tm.BNB_MIN_8BIT_SIZE for s in self.adapter_sizes))
        p = self.peak(run, first, last, device.kind == "cuda")
        return TrainingDevicePlan(device, run, weights, adapters, adapters, optimizer + p.extra_optimizer_bytes,
                                  p.activation_bytes, p.logits_bytes, self.overhead(device, len(run)), capacity,
                                  p.peak)

    def costs(self, devices: Sequence[Device], reserve_bytes: int) -> tuple[Costs, tuple[int, ...]]:
        """Bytes per layer for the split: weights, adapters, gradients, states and what the layer keeps for
        backward; the embeddings with the first layer; the head, and the loss's backward where it exceeds a
        layer's, with the last; each device's overhead and a layer's backward. device_plan recounts each
        device exactly."""
        arch, step, gc, cuda = self.arch, self.step, self.training.grad_checkpointing, devices[0].kind == "cuda"
        kept = tm.total([tm.checkpoint_saved(arch, step)] if gc else tm.layer_saved(arch, step, True, cuda))
        per_layer = tuple(w + 2 * self.layer_adapters + self.layer_optimizer + kept for w in self.layer_weights)
        backward = tm.layer_backward_bytes(arch, step, gc, cuda)
        if not gc:
            backward = max(backward, tm.mlp_forward_bytes(arch, step, cuda) + tm.embeddings_output_bytes(arch, step))
        fixed = tuple(self.overhead(d, 0) + backward + tm.total(tm.rope_saved(arch, step)) for d in devices)
        capacities = tuple(d.memory_bytes - reserve_bytes for d in devices)
        return Costs(per_layer, self.embedding, self.head + max(0, self.loss - backward), fixed), capacities

    def split(self, devices: Sequence[Device], reserve_bytes: int) -> tuple[tuple[range, ...], tuple[int, ...]]:
        costs, capacities = self.costs(devices, reserve_bytes)
        return balance(costs, capacities).layers, capacities

    def device_plans(self, devices: Sequence[Device], reserve_bytes: int) -> tuple[TrainingDevicePlan, ...]:
        runs, capacities = self.split(devices, reserve_bytes)
        return tuple(self.device_plan(d, r, c) for d, r, c in zip(devices, runs, capacities))

    def margin(self, devices: Sequence[Device], reserve_bytes: int) -> int:
        """The fewest bytes any device keeps free in the balanced split; negative when it does not fit."""
        return min(d.free_bytes for d in self.device_plans(devices, reserve_bytes))
