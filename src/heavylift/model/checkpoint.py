"""The tensors a checkpoint really holds, read from safetensors headers without touching weight data.

Reading the header ourselves (8-byte length, then JSON) needs no framework and reads a few
kilobytes per shard; the same read tells a truncated shard from a whole one, because the header
says where the last tensor ends.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .architecture import Architecture
from .families import VISION_PREFIXES, WRAPPED_PREFIX
from heavylift.errors import CheckpointError, InventoryMismatchError

INDEX_FILE = "model.safetensors.index.json"
HEADER_LENGTH_BYTES = 8  # little-endian u64 before the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on header size
# Buffers some checkpoints carry that are not parameters; transformers recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MISMATCHES_SHOWN = 3


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: BF16, F16, F32, F8_E4M3, U8, ...
    file: str


@dataclass(frozen=True)
class Checkpoint:
    tensors: Mapping[str, TensorInfo]
    files: tuple[Path, ...]  # empty when read from the hub's metadata


def read_header(path: Path) -> dict:
    """The JSON header of one .safetensors file; CheckpointError if it is cut short or corrupt."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER_LENGTH_BYTES)
        if len(raw) < HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path} is truncated ({size} bytes); delete it and download it again")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise CheckpointError(f"{path} has a corrupt or truncated header; delete it and download it again")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupt header; delete it and download it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if HEADER_LENGTH_BYTES + length + end > size:
        raise CheckpointError(f"{path} is truncated: {size:,} bytes of {HEADER_LENGTH_BYTES + length + end:,}; "
                              "delete it and download it again")
    return header


def checkpoint_files(folder: Path) -> tuple[Path, ...]:
    """The shards of a local checkpoint: those the index names, else every *.safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{index} is malformed; download it again") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks {missing[0]} named by {INDEX_FILE}; finish the download")
        return tuple(folder / n for n in names)
    return tuple(sorted(folder.glob("*.safetensors")))


def read_checkpoint(folder: Path) -> Checkpoint | None:
    """The inventory of the safetensors checkpoint in `folder`, or None when it holds no weights."""
    files = checkpoint_files(folder)
    if not files:
        return None
    tensors = {}
    for path in files:
        for name, info in read_header(path).items():
            tensors[name] = TensorInfo(tuple(info["shape"]), info["dtype"], path.name)
    return Checkpoint(tensors, files)


def from_hub_metadata(files_metadata: Mapping[str, object]) -> Checkpoint:
    """The inventory from huggingface_hub's `get_safetensors_metadata(...).files_metadata`."""
    tensors = {name: TensorInfo(tuple(info.shape), info.dtype, file)
               for file, meta in files_metadata.items() for name, info in meta.tensors.items()}
    return Checkpoint(tensors, ())


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _unwrapped(name: str, arch: Architecture) -> str:
    """A multimodal checkpoint's language-model tensor under the name the language model alone gives it."""
    return name[len(WRAPPED_PREFIX):] if arch.wrapped and name.startswith(WRAPPED_PREFIX) else name


def _unloaded(name: str, arch: Architecture) -> bool:
    """Tensors a checkpoint holds that transformers leaves on disk: a multimodal model's vision tower and
    projector, and DeepSeek-V3's multi-token-prediction layers past num_hidden_layers."""
    if arch.wrapped and name.startswith(VISION_PREFIXES):
        return True
    if arch.extra_layers and name.startswith("model.layers."):
        return int(name.split(".")[2]) >= arch.num_layers
    return False


def check_against(arch: Architecture, checkpoint: Checkpoint, where: str) -> None:
    """Raise InventoryMismatchError unless the checkpoint holds exactly the tensors the config describes."""
    expected = {name: shape for t in arch.tensors for name, shape in t.checkpoint_shapes()}
    found = {_unwrapped(n, arch): i.shape for n, i in checkpoint.tensors.items()
             if not n.endswith(IGNORED_SUFFIXES) and not _unloaded(n, arch)}
    if arch.tie_word_embeddings and found.get("lm_head.weight") == expected.get("model.embed_tokens.weight"):
        found.pop("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    problems = [f"{n} is {_shape(found[n])} in the checkpoint but {_shape(s)} by config.json"
                for n, s in expected.items() if n in found and tuple(found[n]) != s]
    problems += [f"{n} is missing from the checkpoint" for n in expected if n not in found]
    problems += [f"{n} is in the checkpoint but not in config.json's model" for n in found if n not in expected]
    if problems:
        more = f" (and {len(problems) - MISMATCHES_SHOWN} more)" if len(problems) > MISMATCHES_SHOWN else ""
        raise InventoryMismatchError(
            f"safetensors headers in {where} disagree with config.json: {'; '.join(problems[:MISMATCHES_SHOWN])}"
            f"{more}; download config.json and the weights from the same revision")
