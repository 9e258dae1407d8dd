"""Memory a model needs while it runs, besides its weights: KV cache, activation peak, logits.

Every term is a pure function of the architecture, the scheme and the workload; the constants
live in `defaults.py` with the reasoning behind their values.
"""

from __future__ import annotations

from typing import Iterable

from .architecture import FAMILIES, Architecture
from .defaults import (ACTIVATION_HIDDEN_COPIES, ACTIVATION_INTERMEDIATE_COPIES, LOGITS_BYTES_PER_ENTRY,
                       PREFILL_CHUNK_TOKENS)

ACTIVATION_BYTES = 2  # activations run in bf16 / fp16
# The attention mask transformers builds for SDPA when a prefill chunk attends to cached tokens:
# one bool per (query, key) pair and sequence (masking_utils.sdpa_mask).
ATTENTION_MASK_BYTES_PER_ENTRY = 1
# Extra [tokens, intermediate] bf16-sized buffers a scheme's matmuls hold during prefill, beyond a
# BF16 layer's: LLM.int8 keeps int8 activations and int32 accumulators, torchao's FP8 keeps fp8
# activations, scales and a bf16 output. Measured by the seed article's stack on one H100 (4k-token
# prefill of an 8B model: 1.50 GB int8 / 1.55 GB fp8 over 1.03 GB bf16; 1 copy = 117 MB there).
SCHEME_EXTRA_INTERMEDIATE_COPIES = {"int8": 4.0, "fp8": 4.5}
# Eager attention (families SDPA cannot run) materializes the scores of every head: bf16 scores and
# their float32 softmax (eager_attention_forward in transformers 5).
EAGER_SCORE_BYTES_PER_ENTRY = 2 + 4


def kv_bytes_per_token(arch: Architecture, kv_dtype_bytes: int) -> int:
    """Keys and values of one token in one layer."""
    return 2 * arch.num_kv_heads * arch.head_dim * kv_dtype_bytes


def kv_cache_bytes(arch: Architecture, layers: Iterable[int], context: int, batch: int,
                   kv_dtype_bytes: int) -> int:
    """KV cache of these layers when `batch` sequences reach `context` tokens.

    Sliding-window layers hold at most their window, as transformers' DynamicSlidingWindowLayer does.
    """
    per_token = kv_bytes_per_token(arch, kv_dtype_bytes)
    return sum(per_token * min(context, arch.layer_windows[i] or context) * batch for i in layers)


def prefill_chunk(context: int) -> int:
    """Tokens of one prefill step: heavylift prefills long prompts in chunks."""
    return min(context, PREFILL_CHUNK_TOKENS)


def activation_peak_bytes(arch: Architecture, scheme_name: str, context: int, batch: int) -> int:
    """Peak of one decoder layer's transient tensors while prefilling the last chunk of a full context."""
    tokens = prefill_chunk(context) * batch
    # A fused gate_up projection (Phi-3) holds its [tokens, 2 x intermediate] output next to the others.
    fused = any(t.name.endswith("mlp.gate_up_proj.weight") for t in arch.layer_tensors(0))
    inter_copies = (ACTIVATION_INTERMEDIATE_COPIES + (1 if fused else 0)
                    + SCHEME_EXTRA_INTERMEDIATE_COPIES.get(scheme_name, 0.0))
    dense = tokens * (ACTIVATION_HIDDEN_COPIES * arch.hidden_size + inter_copies * arch.intermediate_size)
    mask = tokens * context * ATTENTION_MASK_BYTES_PER_ENTRY
    scores = 0 if FAMILIES[arch.model_type].sdpa else tokens * arch.num_heads * context * EAGER_SCORE_BYTES_PER_ENTRY
    return int(dense * ACTIVATION_BYTES + mask + scores)


def kv_append_transient_bytes(arch: Architecture, layers: Iterable[int], context: int, batch: int,
                              kv_dtype_bytes: int) -> int:
    """The largest layer's cache again: DynamicCache.update concatenates into a new tensor before
    the old one is freed."""
    return max((kv_cache_bytes(arch, [i], context, batch, kv_dtype_bytes) for i in layers), default=0)


def logits_bytes(arch: Architecture, batch: int) -> int:
    """Last-position logits of every sequence, and the float32 copy sampling reads."""
    return batch * arch.vocab_size * LOGITS_BYTES_PER_ENTRY
