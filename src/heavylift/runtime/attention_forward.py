"""transformers' SDPA attention at inference with the cache's key and value heads read in place on every prefill
chunk, as the engine's prefill attends, so that no copy of the keys and values per query head is made.

Why: on a chunk after the first, transformers builds a bool mask over the static cache's whole length and its
sdpa_attention_forward, which on a GPU may pass grouped heads to SDPA only without a mask, repeats the keys and
values to every query head at that length (repeat_kv): 2 x 0.27 GB at 8k for Llama 3.1 405B (8 key and value heads,
128 query heads), the peak of its forward beyond weights and KV cache. `attend_in_place` registers one attention
implementation, HEAVYLIFT_SDPA, in transformers' AttentionInterface and AttentionMaskInterface and sets a loaded
model of LEAN_ATTENTION_FAMILIES to it. Its mask function returns, for a causal mask of several queries after
cached ones with no padding and keys counted from position 0 (a full-attention layer of a static or dynamic
cache), a FilledCausal span instead of a mask; the attention function then calls SDPA on the keys and values up to
the last query's position (a static cache holds zeros beyond it) with their own heads (enable_gqa) and
causal_lower_right, which a GPU runs on flash attention with no mask: the keys and values that transformers' mask
lets through, the same scores up to SDPA's kernel rounding. Every other mask (a first chunk: none, with SDPA's
is_causal; a decode step; a sliding window or chunked layer; padding) is transformers' own, and with it
transformers' sdpa_attention_forward. The planner counts the same (planner/forward_program.py _mask and
LEAN_ATTENTION_FAMILIES).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heavylift.engine.model import lower_right
from heavylift.planner.forward_program import LEAN_ATTENTION_FAMILIES

HEAVYLIFT_SDPA = "heavylift_sdpa"  # the attention implementation's name in transformers' interfaces


@dataclass(frozen=True)
class FilledCausal:
    """A causal mask of `queries` queries whose last one is at position `filled` - 1, keys counted from 0. Not a
    tensor, and with no `to`: a model split over devices passes it on as it is."""

    queries: int
    filled: int


def lean_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function=None, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
              **kwargs):
    """transformers' sdpa_mask, except a FilledCausal span for several queries after cached ones under a plain
    causal mask with no padding and no key offset (sdpa_mask materialises [batch, 1, queries, kv_length] there)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if (mask_function is causal_mask_function and attention_mask is None and kv_offset == 0 and q_length > 1
            and allow_is_causal_skip):
        offset = int(q_offset)  # a StaticLayer's offset is a tensor; sdpa_mask reads it as well
        if offset > 0:
            return FilledCausal(q_length, offset + q_length)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def lean_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """sdpa_attention_forward, except for a FilledCausal span: SDPA over the keys and values up to its last
    query, every query head reading its key and value head in place, aligned to the last key."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, FilledCausal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{HEAVYLIFT_SDPA} attends at inference only: no dropout, softcap or position bias")
    end = attention_mask.filled
    out = F.scaled_dot_product_attention(query, key[:, :, :end], value[:, :, :end],
                                         attn_mask=lower_right(attention_mask.queries, end), scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def attend_in_place(model: torch.nn.Module) -> bool:
    """Set a loaded model of LEAN_ATTENTION_FAMILIES on transformers' SDPA to HEAVYLIFT_SDPA (registered once in
    transformers' attention and mask interfaces); whether it was."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    if config.model_type not in LEAN_ATTENTION_FAMILIES or config._attn_implementation not in ("sdpa", HEAVYLIFT_SDPA):
        return False
    AttentionInterface.register(HEAVYLIFT_SDPA, lean_attention)
    AttentionMaskInterface.register(HEAVYLIFT_SDPA, lean_mask)
    model.set_attn_implementation(HEAVYLIFT_SDPA)
    return True
