"""Which runtime runs a model, decided from its config.json alone: heavylift's engine where it supports the
model in that precision and every layer sits on a CUDA GPU, else transformers' forward.

Pure (no torch): the planner decides with it before anything is downloaded, so `heavylift plan` describes
the runtime `heavylift run` will use; the engine (engine.model_reason) and the loader
(session.planned_engine) apply the same rules.
"""

from __future__ import annotations

from typing import Any, Mapping

from heavylift.errors import InvalidArgumentError
from heavylift.model.architecture import head_dim_of
from .memory import FAST, TRANSFORMERS

AUTO = "auto"  # --engine: heavylift's engine where it runs, else transformers
CHOICES = (AUTO, FAST, TRANSFORMERS)
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = (None, "default", "llama3", "linear", "yarn")
GPU_REASON = "the fast engine needs every layer on a CUDA GPU"


def _rope_type(config: Mapping[str, Any]) -> str | None:
    """transformers 5 keeps it in rope_parameters; config.json files in rope_scaling (older ones as "type")."""
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key) or {}
        if value.get("rope_type") or value.get("type"):
            return value.get("rope_type") or value.get("type")
    return None


def model_reason(config: Mapping[str, Any], quant: str) -> str | None:
    """Why heavylift's engine cannot run this model in this precision on any device, or None."""
    kind = config.get("model_type", "?")
    if kind not in SUPPORTED_FAMILIES:
        return f"the fast engine runs {', '.join(SUPPORTED_FAMILIES)} layers, not {kind}"
    rope = _rope_type(config)
    if rope not in SUPPORTED_ROPE:
        return f"the fast engine has no {rope} RoPE (its positions change with the length)"
    head_dim = head_dim_of(config)
    if head_dim & (head_dim - 1) or head_dim > 256:
        return f"the fast engine's kernels need a power-of-two head size, not {head_dim}"
    act = config.get("hidden_act") or "silu"  # the supported families' default
    if act != "silu":
        return f"the fast engine's MLP is SiLU-gated, not {act}"
    if quant in ("fp16", "fp32"):
        return f"the fast engine computes in bf16; {quant} runs on transformers"
    return None


def check_choice(engine: str) -> None:
    """Refuse an --engine value that is not one of CHOICES, before anything loads."""
    if engine not in CHOICES:
        raise InvalidArgumentError(f"--engine must be one of {', '.join(CHOICES)}, not {engine!r}")


def planned_runtime(config: Mapping[str, Any], quant: str, engine: str, devices_reason: str | None,
                    all_cpu: bool) -> str:
    """FAST or TRANSFORMERS for `engine` (auto, fast, transformers): `devices_reason` says why the engine's
    kernels cannot run on the devices the layers land on (None: they can); on CPUs alone, --engine fast
    runs the engine's torch path. --engine fast where the engine cannot run is refused here, before any
    download."""
    check_choice(engine)
    if engine == TRANSFORMERS:
        return TRANSFORMERS
    on_model = model_reason(config, quant)
    if on_model is None and (devices_reason is None or (engine == FAST and all_cpu)):
        return FAST
    if engine == FAST:
        raise InvalidArgumentError(f"{on_model or devices_reason}; run it with --engine transformers")
    return TRANSFORMERS


def described_devices_reason(kinds) -> str | None:
    """The devices a plan describes, by kind ("cuda", "cpu"): a CUDA GPU is taken to run the engine's Triton
    kernels (heavylift installs Triton with torch on Linux); the loader checks again on the real devices."""
    return None if all(k == "cuda" for k in kinds) else GPU_REASON
