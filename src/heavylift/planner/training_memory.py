"""The bytes one QLoRA training step holds besides the frozen base: adapters, their gradients and optimizer
states, the tensors autograd saves for backward, the loss buffers, and what a backward pass adds on top.

Every count follows the recipe planner/training.py describes (bitsandbytes 4-bit base prepared by peft's
prepare_model_for_kbit_training, LoRA adapters from peft's get_peft_model, the forward and the loss under
bf16 autocast, reentrant gradient checkpointing). The saved tensors are those autograd keeps, listed op by op
in the order the forward runs them: tests/planner/test_training_plan.py holds the lists to a count of the
tensors the real forward saves (torch.autograd.graph.saved_tensors_hooks, one count per storage) on several
shapes. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from heavylift.model.architecture import Architecture
from heavylift.schemes import BNB_4BIT_BLOCKSIZE, allocated_bytes

BF16, FP32, INT64, MASK = 2, 4, 8, 1  # bytes per element: autocast's compute, fp32, token ids, dropout masks
# The projections LoRA can target in a llama-style layer, in the order the forward runs them; --target names.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# bitsandbytes' 8-bit optimizers (optim/optimizer.py, Optimizer2State.init_state, 0.50): a parameter of fewer
# elements than min_8bit_size keeps fp32 states; the others one byte per state and element, plus a float32
# absmax per block of 256 elements for each state, and one shared 256-entry float32 code book per state.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIMIZER_BLOCKSIZE = 256
BNB_QMAP_ENTRIES = 256
BNB_PAGED_MIN_ELEMENTS = 10**5  # paged optimizers page the states of parameters this large, allocate the rest
# Flash attention's forward on CUDA returns its random-number state (philox seed and offset) as two 0-dim
# int64 tensors, which its backward node keeps: one allocator block each.
SDPA_RNG_TENSORS = 2


@dataclass(frozen=True)
class Saved:
    """One tensor autograd keeps for backward: what it is and its bytes (before the allocator rounds them)."""

    name: str
    nbytes: int


def projection_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """Each projection's (in_features, out_features)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


# --- Adapters, gradients, optimizer states ------------------------------------------------------------

def adapter_shapes(arch: Architecture, targets: tuple[str, ...], r: int) -> tuple[int, ...]:
    """Element counts of one layer's adapter tensors: lora_A (r x in) and lora_B (out x r) per target."""
    shapes = projection_shapes(arch)
    return tuple(n for t in targets for n in (r * shapes[t][0], shapes[t][1] * r))


def adapter_bytes(sizes: tuple[int, ...]) -> int:
    """The adapters as peft creates them over a bitsandbytes 4-bit base: float32, one allocation each. Their
    gradients take the same."""
    return sum(allocated_bytes(n * FP32) for n in sizes)


def adamw_bytes(sizes: tuple[int, ...]) -> int:
    """torch.optim.AdamW: exp_avg and exp_avg_sq in float32 per parameter (its step counters stay on the CPU)."""
    return 2 * adapter_bytes(sizes)


def paged_adamw_8bit_bytes(sizes: tuple[int, ...]) -> int:
    """bitsandbytes' PagedAdamW8bit: per parameter two uint8 states and two float32 absmax vectors, or two
    float32 states below BNB_MIN_8BIT_SIZE elements. States of 10^5 elements or more live in CUDA managed
    memory, which the driver pages to the CPU only when the GPU runs out: the plan counts them on the GPU."""
    total = 0
    for n in sizes:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * allocated_bytes(n * FP32)
        else:
            total += 2 * allocated_bytes(n) + 2 * allocated_bytes(ceil(n / BNB_OPTIMIZER_BLOCKSIZE) * FP32)
    return total


def paged_state_bytes(sizes: tuple[int, ...]) -> int:
    """The 8-bit states bitsandbytes' paged optimizers put in CUDA managed memory: those of parameters of
    BNB_PAGED_MIN_ELEMENTS elements or more (Optimizer8bit.get_state_buffer)."""
    return sum(2 * n for n in sizes if n >= BNB_PAGED_MIN_ELEMENTS)


def optimizer_shared_bytes(optimizer_8bit: bool, any_8bit: bool) -> int:
    """What an optimizer holds once per device: the 8-bit optimizer's signed and unsigned code books."""
    return 2 * allocated_bytes(BNB_QMAP_ENTRIES * FP32) if optimizer_8bit and any_8bit else 0


def adamw_step_bytes(sizes: tuple[int, ...]) -> int:
    """torch's foreach AdamW step: the square roots of every exp_avg_sq, one float32 copy of the parameters,
    live while the step runs."""
    return adapter_bytes(sizes)


# --- Tensors saved for backward ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """The shape of one micro-batch and the adapters: all the saved tensors depend on."""

    seq_len: int
    micro_batch: int
    targets: tuple[str, ...]
    r: int
    dropout: bool  # lora_dropout > 0: each adapter's input goes through nn.Dropout, which keeps a bool mask
    double_quant: bool = False  # the base's absmax values are 8-bit: dequantizing one makes float32 copies

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


def _lora(arch: Architecture, step: Step, name: str, grad_in: bool, cuda: bool) -> list[Saved]:
    """An adapted projection (peft's lora.Linear4bit under autocast): the base matmul keeps only the packed
    weight, already counted; lora_A(dropout(x)) keeps x cast to bf16 and, where x needs a gradient, its bf16
    copy of lora_A and the dropout mask (on CUDA a bool per element; on the CPU, where peft sees no autocast and
    casts x to lora_A's float32 first, torch's unfused dropout keeps its float32 noise instead); lora_B keeps
    lora_A's output and its bf16 copy of lora_B."""
    if name not in step.targets:
        return []
    fan_in, fan_out = projection_shapes(arch)[name]
    t, r = step.tokens, step.r
    out = [Saved(f"{name}.lora_A weight bf16", fan_in * r * BF16)] if grad_in else []
    if grad_in and step.dropout:
        out.append(Saved(f"{name} dropout mask", t * fan_in * (MASK if cuda else FP32)))
    return out + [Saved(f"{name} input bf16", t * fan_in * BF16), Saved(f"{name}.lora_B weight bf16", r * fan_out * BF16),
                  Saved(f"{name}.lora_A output", t * r * BF16)]


def _rms_norm(arch: Architecture, step: Step, where: str) -> list[Saved]:
    """RMSNorm on the float32 residual stream: its input (pow and mul share it) and 1/rms per token."""
    t = step.tokens
    return [Saved(f"{where} input fp32", t * arch.hidden_size * FP32), Saved(f"{where} rsqrt", t * FP32)]


def _attention(arch: Architecture, step: Step, cuda: bool) -> list[Saved]:
    """Scaled-dot-product attention under autocast (flash, no mask, GQA without repeating keys): bf16 copies
    of query, key and value, the bf16 output and the float32 log-sum-exp per head and position."""
    b, s, hd = step.micro_batch, step.seq_len, arch.head_dim
    q, kv = b * arch.num_heads * s * hd * BF16, b * arch.num_kv_heads * s * hd * BF16
    out = [Saved("query bf16", q), Saved("key bf16", kv), Saved("value bf16", kv), Saved("attention output", q),
           Saved("log-sum-exp", b * arch.num_heads * s * FP32)]
    return out + [Saved(f"flash rng state {i}", INT64) for i in range(SDPA_RNG_TENSORS)] if cuda else out


def layer_saved(arch: Architecture, step: Step, grad_in: bool, cuda: bool = True) -> list[Saved]:
    """The tensors one decoder layer saves for backward, in forward order. `grad_in`: the layer's input needs
    a gradient (every layer after the first adapted one, and every layer under gradient checkpointing, whose
    inputs peft makes require it); where it does not, ops before the first adapter record nothing. The
    rotary cos and sin every layer reads are counted apart (rope_saved). `cuda`: as on a GPU, where dropout
    keeps a bool mask and flash attention's output is o_proj's input; else as on the CPU, where the tests
    count it."""
    out = _rms_norm(arch, step, "input_layernorm") if grad_in else []
    for name in ("q", "k", "v"):
        out += _lora(arch, step, name, grad_in, cuda)
    attn_grad = grad_in or any(n in step.targets for n in ("q", "k", "v"))
    out += _attention(arch, step, cuda) if attn_grad else []
    o_proj = _lora(arch, step, "o", attn_grad, cuda)
    if cuda and attn_grad and not step.dropout:
        # flash attention lays its output out as (batch, seq, heads, dim): o_proj's input is that storage
        o_proj = [t for t in o_proj if t.name != "o input bf16"]
    out += o_proj
    mid_grad = attn_grad or "o" in step.targets
    out += _rms_norm(arch, step, "post_attention_layernorm") if mid_grad else []
    out += _lora(arch, step, "gate", mid_grad, cuda) + _lora(arch, step, "up", mid_grad, cuda)
    gate_grad, up_grad = mid_grad or "gate" in step.targets, mid_grad or "up" in step.targets
    mlp = step.tokens * arch.intermediate_size * FP32
    out += [Saved("gate output fp32 (silu input)", mlp)] if gate_grad else []
    out += [Saved("silu output fp32", mlp)] if up_grad else []
    out += [Saved("up output fp32", mlp)] if gate_grad else []
    return out + _lora(arch, step, "down", gate_grad or up_grad, cuda)


def rope_needed(step: Step, grad_in: bool) -> bool:
    """Whether a layer's rotary embedding keeps cos and sin: its query or key needs a gradient."""
    return grad_in or "q" in step.targets or "k" in step.targets


def rope_saved(arch: Architecture, step: Step) -> list[Saved]:
    """The rotary cos and sin of every position (float32, like the residual stream; one row for the whole
    micro-batch), computed once per forward and read by every layer."""
    row = step.seq_len * arch.head_dim * FP32
    return [Saved("rotary cos", row), Saved("rotary sin", row)]


def checkpoint_saved(arch: Architecture, step: Step) -> Saved:
    """Under gradient checkpointing a layer keeps only its input: the float32 residual stream."""
    return Saved("checkpointed layer input fp32", step.tokens * arch.hidden_size * FP32)


def head_saved(arch: Architecture, step: Step) -> list[Saved]:
    """The final norm, the head and the loss: prepare_model_for_kbit_training leaves lm_head in float32, which
    autocast copies to bf16 for the matmul (kept for the input's gradient); transformers' loss upcasts the
    logits to float32 and log_softmax keeps its float32 output; nll_loss keeps the shifted labels and the
    count it divides by."""
    b, s, v = step.micro_batch, step.seq_len, arch.vocab_size
    # labels padded by one and sliced: contiguous and sharing the padded storage only for one sequence
    labels = (s + 1) * INT64 if b == 1 else b * s * INT64
    return _rms_norm(arch, step, "norm") + [
        Saved("lm_head weight bf16", v * arch.hidden_size * BF16),
        Saved("log_softmax output fp32", step.tokens * v * FP32),
        Saved("shifted labels", labels), Saved("loss total weight", FP32)]


def forward_saved(arch: Architecture, step: Step, layers: int, checkpointing: bool, cuda: bool = True) -> list[Saved]:
    """Everything one forward of a whole single-device model saves for backward, as the saved-tensor hooks see
    it: per layer its saved tensors (or, checkpointed, its input alone), the rotary tables where a layer keeps
    them, then the head and the loss."""
    out: list[Saved] = []
    grad_in = checkpointing  # the embeddings' output needs a gradient only under checkpointing (peft)
    rope = False
    for _ in range(layers):
        if checkpointing:
            out.append(checkpoint_saved(arch, step))
            continue
        out += layer_saved(arch, step, grad_in, cuda)
        rope = rope or rope_needed(step, grad_in)
        grad_in = True
    return out + (rope_saved(arch, step) if rope else []) + head_saved(arch, step)


def total(saved: list[Saved], allocated: bool = True) -> int:
    """The bytes of these tensors: as the allocator hands them out, or (allocated=False) as the tensors hold them."""
    return sum(allocated_bytes(s.nbytes) if allocated else s.nbytes for s in saved)


# --- What the forward and backward hold beyond the saved tensors --------------------------------------

def _down_adapter_saved(arch: Architecture, step: Step, cuda: bool) -> int:
    """What down_proj's adapter saves: made in the forward after its base matmul, freed in the backward
    before it (the adapter's nodes come later in the forward, so earlier in the backward)."""
    return total(_lora(arch, step, "down", True, cuda))


def _absmax_copies(arch: Architecture, step: Step, copies: int) -> int:
    """Dequantizing down_proj's weight with double quantization rebuilds its float32 absmax (one value per
    BNB_4BIT_BLOCKSIZE weights) first: the forward's fallback keeps two such copies, the backward's one."""
    blocks = ceil(arch.intermediate_size * arch.hidden_size / BNB_4BIT_BLOCKSIZE)
    return copies * allocated_bytes(blocks * FP32) if step.double_quant else 0


def mlp_forward_bytes(arch: Architecture, step: Step, cuda: bool = True) -> int:
    """Beyond the saved tensors, the fullest point of a layer's forward without checkpointing, in down_proj
    (the widest input), while the post-attention norm's float32 output is still held: either its base matmul
    (the float32 gate x up product, its bf16 copy, the weight dequantized to bf16 by bitsandbytes with its
    absmax, the bf16 output), before the adapter has saved anything, or its adapter path (the product, the
    base's float32 result, and with dropout the float32 dropped input)."""
    t, h, i = step.tokens, arch.hidden_size, arch.intermediate_size
    product = allocated_bytes(t * i * FP32)
    base = (product + allocated_bytes(t * i * BF16) + allocated_bytes(i * h * BF16) + _absmax_copies(arch, step, 2)
            + allocated_bytes(t * h * BF16))
    adapter = product + allocated_bytes(t * h * FP32) + (allocated_bytes(t * i * FP32) if step.dropout else 0)
    if "down" in step.targets:
        base = max(base - _down_adapter_saved(arch, step, cuda), adapter)
    return allocated_bytes(t * h * FP32) + base


def embeddings_output_bytes(arch: Architecture, step: Step) -> int:
    """The embeddings' float32 output, which the model's forward keeps to its end; without checkpointing
    nothing saves it, so it counts only in the forward."""
    return allocated_bytes(step.tokens * arch.hidden_size * FP32)


def loss_backward(arch: Architecture, step: Step) -> list[Saved]:
    """The loss's backward at its peak, beside log_softmax's saved output: nll_loss's float32 gradient of the
    log-probabilities and log_softmax's float32 gradient of the logits, one token x vocabulary each."""
    tv = step.tokens * arch.vocab_size * FP32
    return [Saved("nll_loss gradient fp32", tv), Saved("log_softmax gradient fp32", tv)]


def layer_backward_bytes(arch: Architecture, step: Step, checkpointing: bool, cuda: bool = True) -> int:
    """What a layer's backward holds beyond the tensors the forward saved, at its fullest point: the float32
    gradient of the layer's output (kept until the residual branch adds it in), under checkpointing the
    recomputed layer's saved tensors (its input is the checkpoint's) and output, and the MLP's gradient
    buffers (mlp_backward_bytes), down_proj's adapter having freed what it saved."""
    t, h = step.tokens, arch.hidden_size
    out = allocated_bytes(t * h * FP32)
    if checkpointing:
        out += total(layer_saved(arch, step, True, cuda)[1:]) + allocated_bytes(t * h * FP32)
    down = _down_adapter_saved(arch, step, cuda) if "down" in step.targets else 0
    return out + mlp_backward_bytes(arch, step) - down


def mlp_backward_bytes(arch: Architecture, step: Step) -> int:
    """The MLP's gradient buffers at the fullest point of a layer's backward, the largest of three: inside
    down_proj's base backward (bitsandbytes dequantizes the whole weight to bf16 for grad @ W, beside the bf16
    gradients in and out), as that gradient is cast back to float32, and in the gate x up product's backward
    (the product's float32 gradient and the two it yields). The adapter's path runs first and its float32
    gradient of down_proj's input waits for the base's."""
    t, h, i = step.tokens, arch.hidden_size, arch.intermediate_size
    waiting = allocated_bytes(t * i * FP32) if "down" in step.targets else 0
    matmul = (waiting + allocated_bytes(t * h * BF16) + allocated_bytes(i * h * BF16) + _absmax_copies(arch, step, 1)
              + allocated_bytes(t * i * BF16))
    cast = waiting + allocated_bytes(t * i * BF16) + allocated_bytes(t * i * FP32)
    product = 3 * allocated_bytes(t * i * FP32)
    return max(matmul, cast, product)
