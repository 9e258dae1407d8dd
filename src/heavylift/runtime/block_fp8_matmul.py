"""Block-FP8 matmuls in plain torch, in place of transformers' finegrained-fp8 kernel where that does not load.

transformers 5.24 runs the weights of a block-FP8 checkpoint kept as stored (FP8Linear, FP8Experts) through
`integrations/finegrained_fp8.py`, whose `load_finegrained_fp8_kernel()` fetches the
`kernels-community/finegrained-fp8` Triton kernel from the Hugging Face Hub with the `kernels` package and
keeps it in the module global `_FINEGRAINED_FP8` (a `FineGrainedFP8(matmul, batched_matmul, grouped_matmul)`).
It calls the three entry points so:
- `matmul(input, weight, weight_scale_inv, block_size, output_dtype, activation_scale=...)` from
  `finegrained_fp8_linear` (FP8Linear, and FP8Experts' eager loop one expert at a time): input [..., K],
  weight [N, K], scales [ceil(N / bn), ceil(K / bk)]; returns [..., N] in output_dtype (the input's).
- `grouped_matmul(input, weight, weight_scale_inv, offsets=, tokens_per_expert=, block_size=)` from
  `fp8_grouped_matmul` (the default grouped_mm experts): input [S, K] sorted by expert, weight [E, N, K],
  offsets [E] each expert's end row (cumulative); returns [S, N] in the input's dtype. Rows past offsets[-1]
  (expert parallelism's sentinels, which the caller masks) the kernel leaves unwritten: here they are zeros.
- `batched_matmul(input, weight, weight_scale_inv, block_size=, expert_ids=)` from the batched_mm experts:
  row s times expert expert_ids[s]; rows whose id is past the experts (sentinels) are zeros.
The kernel quantizes the activations to FP8 on the fly (W8A8); these keep them in their dtype (W8A16) and
dequantize the weight instead: each tile of output rows (prequantized.fallback_tile_rows) goes to float32,
is multiplied by its block scales in place and cast to the activations' dtype, exactly as transformers'
Fp8Dequantize computes a bf16 load's weights (the codes and scales in float32, their product cast), then
multiplied into its columns of the output. A static activation_scale only sets how the kernel rounds the
activations to FP8: with activations unrounded it has no use. Partial edge blocks (DeepSeek-V3's 576-row
kv_a_proj_with_mqa in blocks of 128) are padded with zeros to whole blocks in the float32 staging, as
block_fp8.partial_blocks_dequantized pads them on a bf16 load.

Memory: one call holds its output, one tile's float32 staging and its dequantized copy (never a whole
dequantized weight); the planner counts them (matmul_programs.block_fp8_fallback). Speed: every call reads
the FP8 weight and writes and reads a dequantized tile, several times the kernel's traffic.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from math import ceil

import torch

from heavylift.model.prequantized import fallback_tile_rows


def _block(block_size) -> tuple[int, int]:
    if block_size is None or len(block_size) != 2:
        raise ValueError(f"heavylift's block-FP8 matmuls take a [rows, columns] block size, not {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_grid(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> None:
    rows, cols = weight.shape[-2:]
    grid = (ceil(rows / block[0]), ceil(cols / block[1]))
    if tuple(scales.shape[-2:]) != grid:
        raise ValueError(f"a [{rows}, {cols}] block-FP8 weight in blocks of {block} has a {grid} scale grid, "
                         f"not {tuple(scales.shape)}")


def dequantized_rows(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], start: int, stop: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows start:stop (start a multiple of the block's rows) of a 2-D FP8 weight times their block scales, in
    `dtype`: staged in float32, padded with zeros to whole blocks, scaled in place, cut back and cast."""
    rows, cols = stop - start, weight.shape[1]
    row_blocks, col_blocks = ceil(rows / block[0]), ceil(cols / block[1])
    staged = torch.empty(row_blocks * block[0], col_blocks * block[1], dtype=torch.float32, device=weight.device)
    if staged.shape != (rows, cols):
        staged.zero_()
    staged[:rows, :cols].copy_(weight[start:stop])
    first = start // block[0]
    grid = scales[first:first + row_blocks].to(torch.float32)
    staged.view(row_blocks, block[0], col_blocks, block[1]).mul_(grid[:, None, :, None])
    return staged[:rows, :cols].to(dtype)


def _project(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
             out: torch.Tensor) -> None:
    """out = x @ dequantized(weight).T for a 2-D weight, one tile of output rows (out's columns) at a time,
    each tile's product written straight into its columns of `out`."""
    n, k = weight.shape
    _check_grid(weight, scales, block)
    step = fallback_tile_rows(n, k, block)
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = dequantized_rows(weight, scales, block, start, stop, x.dtype)
        if out.dtype == x.dtype:
            torch.mm(x, w.t(), out=out[:, start:stop])
        else:
            out[:, start:stop] = torch.mm(x, w.t())
        del w


def matmul(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size,
           output_dtype: torch.dtype | None = None, activation_scale: torch.Tensor | None = None) -> torch.Tensor:
    """finegrained-fp8's matmul_2d: input [..., K] times a [N, K] block-FP8 weight, [..., N] in output_dtype."""
    block = _block(block_size)
    x = input.reshape(-1, input.shape[-1])
    with torch.no_grad():
        y = torch.empty(x.shape[0], weight.shape[0], dtype=output_dtype or input.dtype, device=input.device)
        _project(x, weight, weight_scale_inv, block, y)
    return y.reshape(*input.shape[:-1], weight.shape[0])


def grouped_matmul(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   offsets: torch.Tensor, tokens_per_expert: torch.Tensor, block_size) -> torch.Tensor:
    """finegrained-fp8's matmul_grouped: rows sorted by expert, expert e's ending at offsets[e], each times its
    expert's [N, K] weight; an expert no row reaches is not dequantized. [S, N] in the input's dtype."""
    block = _block(block_size)
    with torch.no_grad():
        y = torch.empty(input.shape[0], weight.shape[1], dtype=input.dtype, device=input.device)
        start = 0
        for expert, end in enumerate(offsets.tolist()):
            if end > start:
                _project(input[start:end], weight[expert], weight_scale_inv[expert], block, y[start:end])
            start = max(start, end)
        y[start:].zero_()
    return y


def batched_matmul(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   expert_ids: torch.Tensor, block_size, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """finegrained-fp8's matmul_batched: row s of input [S, K] times expert expert_ids[s]'s [N, K] weight, the
    rows of one expert gathered and multiplied together. [S, N] in output_dtype (the input's)."""
    block = _block(block_size)
    experts = weight.shape[0]
    with torch.no_grad():
        y = torch.zeros(input.shape[0], weight.shape[1], dtype=output_dtype or input.dtype, device=input.device)
        for expert in torch.unique(expert_ids).tolist():
            if not 0 <= expert < experts:
                continue
            rows = (expert_ids == expert).nonzero().squeeze(1)
            part = torch.empty(rows.numel(), weight.shape[1], dtype=input.dtype, device=input.device)
            _project(input[rows], weight[expert], weight_scale_inv[expert], block, part)
            y[rows] = part.to(y.dtype)
    return y


def _kernel_reason(native_fp8: bool) -> str | None:
    """None where transformers' finegrained-fp8 kernel loads (it is then kept in transformers' module global),
    else why it does not: no GPU with FP8 tensor cores for it, or the `kernels` package or the Hub failing."""
    if not native_fp8:
        return "its Triton kernel needs GPUs of compute capability 8.9 or later"
    from transformers.integrations import finegrained_fp8

    if getattr(finegrained_fp8._FINEGRAINED_FP8, "matmul", None) is matmul:  # an earlier load's, not the kernel
        finegrained_fp8._FINEGRAINED_FP8 = None
    try:
        finegrained_fp8.load_finegrained_fp8_kernel()
    except Exception as e:  # noqa: BLE001 - any failure to fetch or import the kernel leaves it to heavylift's
        return f"the finegrained-fp8 kernel does not load ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def install(native_fp8: bool) -> str | None:
    """Give transformers' FP8Linear and FP8Experts their matmuls before a block-FP8 checkpoint loads kept as
    stored: the `kernels` package's finegrained-fp8 kernel where it loads on GPUs with FP8 tensor cores, else
    this module's, set in the module global that `load_finegrained_fp8_kernel()` returns once set (it then
    never fetches). Returns why the kernel is not used, None where it is. The caller checks the transformers
    release (prequantized.fallback_serves): these functions answer 5.24's calls."""
    reason = _kernel_reason(native_fp8)
    if reason is not None:
        from transformers.integrations import finegrained_fp8

        finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
            matmul=matmul, batched_matmul=batched_matmul, grouped_matmul=grouped_matmul)
    return reason


@contextmanager
def kept_on_any_device():
    """While the body loads, transformers keeps pre-quantized block-FP8 weights as stored on any device: its
    quantizer's validate_environment otherwise switches to dequantizing them to bf16 where no GPU, or none of
    compute capability 8.9+, is found (its kernel's need, not this module's), and the plan counted FP8. Its
    warning that it dequantizes, untrue here, is not logged."""
    from transformers.quantizers import quantizer_finegrained_fp8 as quantizer

    original = quantizer.FineGrainedFP8HfQuantizer.validate_environment
    log = logging.getLogger(quantizer.__name__)

    def validate_environment(self, *args, **kwargs):
        kept, level = not self.quantization_config.dequantize, log.level
        log.setLevel(logging.ERROR)
        try:
            original(self, *args, **kwargs)
        finally:
            log.setLevel(level)
        if kept and self.pre_quantized:
            self.quantization_config.dequantize = False

    quantizer.FineGrainedFP8HfQuantizer.validate_environment = validate_environment
    try:
        yield
    finally:
        quantizer.FineGrainedFP8HfQuantizer.validate_environment = original
