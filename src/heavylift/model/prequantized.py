"""Checkpoints stored quantized: what config.json's quantization_config says, the tensors such a checkpoint
holds for each weight, and which of heavylift's precisions can load it.

Two storages are planned, both as transformers 5.24 reads them:
- block FP8 (DeepSeek-V3: quant_method "fp8", weight_block_size [128, 128]): every linear weight in
  float8_e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block (integrations/finegrained_fp8.py).
  transformers keeps it so (FP8Linear, FP8Experts) through the `kernels` package's finegrained-fp8 Triton
  kernel, on a GPU of compute capability 8.9 or later; where that kernel does not load, heavylift keeps it so
  with its own torch matmuls in its place (runtime/block_fp8_matmul.py), a tile of rows dequantized at a time.
- MXFP4 (gpt-oss: quant_method "mxfp4"): each expert projection as 4-bit codes, two to a byte, in blocks
  of 32 along the input with one uint8 power-of-two scale per block (`_blocks` [experts, out, in / 32, 16],
  `_scales` [experts, out, in / 32]; integrations/mxfp4.py). transformers keeps it so only through the
  `kernels` package's triton_kernels; heavylift loads it dequantized (Mxfp4Config(dequantize=True)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from math import ceil, prod
from typing import Any, Mapping

from heavylift.defaults import BLOCK_FP8_TILE_WEIGHTS
from heavylift.errors import ConfigError, InvalidArgumentError
from .tensors import Role, TensorSpec

BLOCK_FP8 = "fp8"  # quant_method of a block-FP8 checkpoint
MXFP4 = "mxfp4"
MXFP4_BLOCK = 32  # weights per MXFP4 scale
MXFP4_CODES_PER_BYTE = 2
FP8_SCALE_BYTES = 4  # float32 weight_scale_inv
# The transformers release whose finegrained_fp8 calls heavylift's torch block-FP8 matmuls answer, argument for
# argument (pyproject allows >=5.24,<5.25); under another, keeping block FP8 needs the `kernels` package's kernel.
FALLBACK_TRANSFORMERS = (5, 24)
# The precisions each storage loads in, most faithful first, and what each does to the stored weights.
ACCEPTED = {
    BLOCK_FP8: {"fp8": "keeps the stored block-FP8 weights and their 128 x 128 block scales",
                "bf16": "dequantizes the block-FP8 weights to bf16 while they load"},
    MXFP4: {"bf16": "dequantizes the MXFP4 experts to bf16 while they load (every other tensor is bf16 already)"},
}


@dataclass(frozen=True)
class Prequantized:
    method: str  # BLOCK_FP8 or MXFP4
    block: tuple[int, int] = (0, 0)  # block FP8: weight_block_size (rows, columns)
    skipped: tuple[str, ...] = ()  # modules_to_not_convert, as config.json spells them

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(ACCEPTED[self.method])

    @property
    def label(self) -> str:
        return "block FP8" if self.method == BLOCK_FP8 else "MXFP4"


def prequantized_of(config: Mapping[str, Any], where: str) -> Prequantized | None:
    """config.json's quantization_config as a Prequantized, None without one; ConfigError for a storage
    heavylift does not plan."""
    q = config.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, Mapping) else None
    skipped = tuple(q.get("modules_to_not_convert") or ()) if isinstance(q, Mapping) else ()
    if method == BLOCK_FP8:
        block = q.get("weight_block_size")
        pair = isinstance(block, (list, tuple)) and len(block) == 2
        if not (pair and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{where}: quantization_config's weight_block_size is {block!r}; heavylift plans block "
                              "FP8 with two positive block sides, as DeepSeek-V3's [128, 128]")
        return Prequantized(BLOCK_FP8, (block[0], block[1]), skipped)
    if method == MXFP4:
        return Prequantized(MXFP4, skipped=skipped)
    raise ConfigError(f"{where}: quantization_config stores the weights as {method!r}, which heavylift does not plan "
                      f"(it plans {BLOCK_FP8!r} and {MXFP4!r}); use the model's bf16 checkpoint")


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _skipped(pre: Prequantized, name: str) -> bool:
    """Whether modules_to_not_convert names the module holding `name`, or a module above it (a pattern's `*`
    stands for one part of the name, as in gpt-oss's "model.layers.*.self_attn")."""
    module = _module(name)
    for pattern in pre.skipped:
        regex = re.escape(pattern).replace(r"\*", r"[^.]+")
        if re.fullmatch(rf"(.*\.)?{regex}(\..*)?", module):
            return True
    return False


def stored_as(t: TensorSpec, pre: Prequantized | None) -> TensorSpec:
    """`t` with the checkpoint tensors a `pre` checkpoint stores it in (unchanged where it is stored in bf16)."""
    if pre is None or t.role not in (Role.LINEAR, Role.EXPERT) or _skipped(pre, t.name):
        return t
    if pre.method == BLOCK_FP8:
        rows, cols = t.shape[-2], t.shape[-1]
        scale = (*t.shape[:-2], ceil(rows / pre.block[0]), ceil(cols / pre.block[1]))
        return replace(t, stored=((t.name, t.shape), (f"{_module(t.name)}.weight_scale_inv", scale)))
    if t.role is Role.EXPERT and len(t.shape) == 3:  # MXFP4: fused [experts, in, out], stored [experts, out, in]
        experts, k, n = t.shape
        blocks = ceil(k / MXFP4_BLOCK)
        return replace(t, stored=((f"{t.name}_blocks", (experts, n, blocks, MXFP4_BLOCK // MXFP4_CODES_PER_BYTE)),
                                  (f"{t.name}_scales", (experts, n, blocks))))
    return t


def stored_bytes(t: TensorSpec) -> int:
    """Bytes of the checkpoint tensors that hold `t` as stored (t.stored): one byte per FP8 weight, MXFP4 code
    pair or MXFP4 scale; four per FP8 block scale."""
    (_, weight), (_, scale) = t.stored
    per_scale = FP8_SCALE_BYTES if t.stored[1][0].endswith("weight_scale_inv") else 1
    return prod(weight) + prod(scale) * per_scale


def stored_note(pre: Prequantized) -> str:
    """What a plan of a pre-quantized checkpoint says about its storage, in one line."""
    if pre.method == BLOCK_FP8:
        return ("the checkpoint stores block-FP8 weights: fp8 keeps them so, its matmuls run by the `kernels` "
                "package's finegrained-fp8 kernel on GPUs of compute capability 8.9 or later where it loads, else by "
                "heavylift's torch matmuls (slower: a tile of rows dequantized per matmul, as planned); bf16 "
                "dequantizes them while they load")
    return ("the checkpoint stores its experts in MXFP4, which transformers keeps only through the `kernels` package: "
            "heavylift loads them dequantized to bf16, as planned")


def keeps_stored(pre: Prequantized | None, quant: str) -> bool:
    """Whether precision `quant` holds a `pre` checkpoint's weights as it stores them (block FP8 in fp8)."""
    return pre is not None and pre.method == BLOCK_FP8 and quant == "fp8"


def check_quant(pre: Prequantized | None, quant: str, model: str) -> None:
    """Refuse, in one line naming what works, a precision a pre-quantized checkpoint cannot load in."""
    if pre is None or quant in pre.accepted:
        return
    ways = "; ".join(f"--quant {q} {what}" for q, what in ACCEPTED[pre.method].items())
    raise InvalidArgumentError(f"{model} is stored in {pre.label} (config.json's quantization_config), which "
                               f"transformers cannot requantize to {quant}: {ways}")


def installed_transformers() -> str:
    """The installed transformers' version, read without importing it ("none" where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def fallback_serves(transformers_version: str) -> bool:
    """Whether heavylift's torch block-FP8 matmuls answer this transformers' calls (FALLBACK_TRANSFORMERS)."""
    parts = transformers_version.split(".")[:2]
    return len(parts) == 2 and all(p.isdigit() for p in parts) and tuple(map(int, parts)) == FALLBACK_TRANSFORMERS


def fallback_tile_rows(rows: int, cols: int, block: tuple[int, int]) -> int:
    """Output rows of a [rows, cols] block-FP8 weight that heavylift's torch matmuls dequantize at once: the most
    whole row blocks whose float32 staging, padded to whole column blocks, holds BLOCK_FP8_TILE_WEIGHTS weights
    (one row block at least), and no more than the weight's rows padded to whole blocks."""
    padded_cols = ceil(cols / block[1]) * block[1]
    blocks = max(1, BLOCK_FP8_TILE_WEIGHTS // (padded_cols * block[0]))
    return min(blocks, ceil(rows / block[0])) * block[0]


def check_stored_runs(pre: Prequantized | None, quant: str, native_fp8: bool, transformers_version: str) -> None:
    """Refuse, before any weight is read, to keep block-FP8 weights where neither heavylift's torch matmuls
    (another transformers than FALLBACK_TRANSFORMERS) nor transformers' own kernel (no GPU of compute
    capability 8.9+, or no `kernels` package) would run them."""
    if not keeps_stored(pre, quant) or fallback_serves(transformers_version):
        return
    import importlib.util

    if not (native_fp8 and importlib.util.find_spec("kernels") is not None):
        wanted = ".".join(map(str, FALLBACK_TRANSFORMERS))
        raise InvalidArgumentError(f"--quant fp8 keeps the block-FP8 weights, which heavylift runs with transformers "
                                   f"{wanted} (this is {transformers_version}), or transformers on GPUs of compute "
                                   "capability 8.9 or later with the `kernels` package; install transformers "
                                   f"{wanted} (pip install 'transformers>={wanted},<{FALLBACK_TRANSFORMERS[0]}."
                                   f"{FALLBACK_TRANSFORMERS[1] + 1}'), or use --quant bf16 to dequantize them while "
                                   "they load")
