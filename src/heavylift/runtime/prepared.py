"""From a plan to a Session, lightest step first: the tokenizer (a few small files, so a bad prompt is
refused before any weight is read), then the weights exactly as planned, then the fast engine over them
where the plan's runtime is the engine. Nothing here plans again: where the weights land differently from
the plan (a module spilled off its GPU), that is an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from heavylift.errors import CheckpointError, ModelNotFoundError, OffloadError
from heavylift.hardware.gpus import KIND_CUDA
from heavylift.model.checkpoint import check_against, checkpoint_files, read_checkpoint
from heavylift.model.source import ModelSource, no_weights_error
from heavylift.planner.memory import FAST
from heavylift.planner.plan import Plan, SchemePlan
from heavylift.planner.runtimes import Runtime, choose_runtime
from . import loader
from .devices import kernels_reason
from .session import Session

# What a hub download fetches besides the weights: config, tokenizer, chat template, generation config.
SMALL_FILES = ["*.json", "tokenizer*", "*.jinja", "*.model", "*.txt"]
WEIGHT_FILES = ["*.safetensors"]


@dataclass(frozen=True)
class LoadedWeights:
    """A model loaded by its plan, before any engine or tokenizer is put over it."""

    source: ModelSource
    plan: Plan
    scheme: SchemePlan
    runtime: Runtime
    placement: loader.Placement
    model: torch.nn.Module
    folder: Path
    attention: str
    offloaded_bytes: dict[str, int]


def _download(source: ModelSource, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.hub_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise ModelNotFoundError(f"cannot download {source.hub_id}: {type(e).__name__}; check the network, "
                                 "the id, and `hf auth login` for gated models") from None


def _weights_here(source: ModelSource) -> bool:
    return source.checkpoint is not None and bool(source.checkpoint.files)  # not only the hub's headers


class Prepared:
    """A model planned for this machine in one precision, for one runtime (api.prepare)."""

    def __init__(self, source: ModelSource, plan: Plan, scheme: SchemePlan, runtime: Runtime, engine: str):
        self.source, self.plan, self.scheme, self.runtime = source, plan, scheme, runtime
        self.engine = engine  # --engine as asked (auto, fast, transformers): the check after loading asks it

    @cached_property
    def folder(self) -> Path:
        """The folder holding the config and tokenizer: the model's own, or the hub's files fetched now
        (everything but the weights)."""
        if _weights_here(self.source):
            return self.source.folder
        if self.source.origin == "catalog" or self.source.hub_id is None:
            raise no_weights_error(self.source)
        return _download(self.source, SMALL_FILES)

    @cached_property
    def tokenizer(self):
        """The model's tokenizer; CheckpointError (one line) where it is missing or broken."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.folder)
        except Exception:  # noqa: BLE001 - a missing or broken tokenizer is the user's to fix
            raise CheckpointError(f"no usable tokenizer in {self.folder}; copy tokenizer.json and "
                                  "tokenizer_config.json from the original model") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # as the seed article does
        return tok

    def _weights_folder(self) -> Path:
        """The folder with the weights: fetched now from the hub where only their headers were read, and
        those checked against the config again."""
        if _weights_here(self.source):
            return self.source.folder
        folder = _download(self.source, SMALL_FILES + WEIGHT_FILES)
        checkpoint = read_checkpoint(folder)
        if checkpoint is None:
            raise CheckpointError(f"{self.source.hub_id} has no safetensors weights; heavylift loads only those")
        check_against(self.source.architecture, checkpoint, str(folder))
        return folder

    def load_weights(self, placement: loader.Placement | None = None) -> LoadedWeights:
        """Read the weights exactly as planned, and check they landed where the plan put them. `placement`: the
        layers' devices where another plan splits them (a training plan), in this plan's precision."""
        folder, arch, scheme = self._weights_folder(), self.source.architecture, self.scheme
        placement = placement or loader.placement_from_plan(arch, scheme)
        attention = loader.attention_implementation(arch)
        devices = self.plan.devices
        native_fp8 = torch.cuda.is_available() and all(d.native_fp8 for d in devices)
        bf16 = all(d.bf16_supported for d in devices)
        shards = len(checkpoint_files(folder))
        label = f"loading {shards} shard{'s' * (shards != 1)} in {scheme.quant}"
        model = loader.load_model(folder, arch, scheme, placement, native_fp8, bf16, attention, label)
        names = list(placement.modules)
        real = loader.real_placement(model, names)
        spilled = loader.guard_offload(placement, real, {n: loader.module_bytes(model, n) for n in names},
                                       self.plan.workload.allow_offload)
        self._check_runtime(real)
        return LoadedWeights(self.source, self.plan, scheme, self.runtime, placement, model, folder, attention,
                             spilled)

    def _check_runtime(self, real: dict[str, str]) -> None:
        """The runtime decided again on the devices the weights really landed on: the plan's, or an error."""
        kinds = sorted({KIND_CUDA if where.startswith(KIND_CUDA) else where for where in real.values()})
        found = choose_runtime(self.source.config, self.scheme.quant, self.engine, kinds,
                               kernels_reason(self.plan.devices))
        if found.name != self.runtime.name:  # the engine's plan, and layers spilled off its GPUs
            raise OffloadError(f"the weights landed off the plan's GPUs ({found.reason}), and the plan is for "
                               "heavylift's engine; free GPU memory, or pass --engine transformers")

    def load(self) -> Session:
        """The tokenizer (first: a missing one is said before any weight is read), the weights, and the
        engine where the plan's runtime is the engine; on transformers, bitsandbytes' 4-bit layers multiply
        many rows and its LLM.int8 layers any rows a weight tile at a time (bnb_forward.py), the gated MLPs
        compute in place (mlp_forward.py), Llama-style decoder layers add their residuals in place
        (layer_forward.py) and full-attention layers read the cache's key and value heads in place
        (attention_forward.py), as the plan counts them."""
        tokenizer = self.tokenizer
        weights = self.load_weights()
        engine = build_engine(weights)
        if engine is None:
            from .attention_forward import attend_in_place
            from .bnb_forward import tile_4bit_matmuls, tile_int8_matmuls
            from .layer_forward import add_residuals_in_place
            from .mlp_forward import compute_mlps_in_place

            tile_4bit_matmuls(weights.model)
            tile_int8_matmuls(weights.model)
            compute_mlps_in_place(weights.model)
            add_residuals_in_place(weights.model)
            attend_in_place(weights.model)
        return Session(weights, tokenizer, engine)


def build_engine(weights: LoadedWeights):
    """The fast engine over loaded weights whose plan is for it (Triton kernels on GPUs, its torch reference
    path on the CPU), else None."""
    if weights.runtime.name != FAST:
        return None
    from heavylift.engine import Engine

    on_gpus = all(p.device.type == "cuda" for p in weights.model.parameters())
    return Engine.from_model(weights.model, batch=weights.plan.batch, context=weights.plan.context,
                             ops="triton" if on_gpus else "torch", prefill_rows=planned_prefill_rows(weights))


def planned_prefill_rows(weights: LoadedWeights) -> dict:
    """The torch device of each of the plan's devices that prefills fewer tokens of a chunk at a time than the
    whole (plan.DevicePlan.prefill_rows), where its layers were placed, with that count (the fewest, where
    several plan devices run on one torch device, as on a machine without their GPUs)."""
    rows: dict = {}
    for d in weights.scheme.per_device:
        if d.layers and d.prefill_rows:
            dev = torch.device(weights.placement.modules[f"model.layers.{d.layers.start}"])
            rows[dev] = min(rows.get(dev, d.prefill_rows), d.prefill_rows)
    return rows
