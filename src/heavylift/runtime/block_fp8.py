"""Dequantize block-FP8 weights whose last row or column block is partial, as transformers 5.24 cannot.

A block-FP8 checkpoint holds one float32 scale per weight_block_size block, the edge blocks partial where a
side is not a multiple of the block: DeepSeek-V3's kv_a_proj_with_mqa has 576 = 512 + 64 rows, so its
[576, 7168] weight has a [5, 56] scale grid (ceil(576 / 128) = 5), as DeepSeek's own weight_dequant reads it.
transformers' Fp8Dequantize derives the block from the scale grid instead (rows / scale rows): it refuses a
grid that does not divide the weight, so `--quant bf16` of every DeepSeek-V3 checkpoint stops in
from_pretrained, and scales one that does with the wrong blocks (96 rows in blocks of 64 as two of 48).
While heavylift loads such a checkpoint, a weight with a partial edge block is padded up to whole blocks of the
configured size, dequantized by transformers' own routine and cut back to its shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from math import ceil

import torch


def partial_grid_padding(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                         block: tuple[int, int]) -> tuple[int, int] | None:
    """The (rows, columns) that pad a weight to whole blocks where its scale grid is `block`'s with a partial
    edge block; None where the blocks are whole or the grid is some other layout (MXFP4's [1, 32])."""
    if len(weight_shape) < 2 or len(scale_shape) < 2:
        return None
    rows, cols = weight_shape[-2:]
    grid = tuple(scale_shape[-2:])
    if grid != (ceil(rows / block[0]), ceil(cols / block[1])) or (rows % block[0] == 0 and cols % block[1] == 0):
        return None
    return grid[0] * block[0] - rows, grid[1] * block[1] - cols


@contextmanager
def partial_blocks_dequantized(block: tuple[int, int]):
    """While the body loads a checkpoint in blocks of `block` (rows, columns), transformers dequantizes
    weights with partial edge blocks too: each is padded with zeros to whole blocks (in float32, transformers'
    own first step), dequantized as usual and cut back to its shape (a copy, so no padding stays allocated)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    original = Fp8Dequantize._dequantize_one

    def dequantize_one(self, quantized, scales, output_dtype=None):
        pad = None
        if quantized.dtype.is_floating_point and quantized.element_size() == 1:  # FP8 codes, not packed FP4
            pad = partial_grid_padding(tuple(quantized.shape), tuple(getattr(scales, "shape", ())), block)
        if pad is None:
            return original(self, quantized, scales, output_dtype=output_dtype)
        rows, cols = quantized.shape[-2:]
        padded = torch.nn.functional.pad(quantized.to(torch.float32), (0, pad[1], 0, pad[0]))
        return original(self, padded, scales, output_dtype=output_dtype)[..., :rows, :cols].clone()

    Fp8Dequantize._dequantize_one = dequantize_one
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original
