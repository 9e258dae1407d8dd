"""Which runtime runs a model: heavylift's engine where it supports the model in that precision and every
layer sits on a CUDA GPU that can run its Triton kernels, else transformers' forward.

Pure (no torch): `choose_runtime` is the one decision. `heavylift plan` asks it about the devices it
describes, `heavylift.load` about this machine's before anything loads (so the one plan it makes is for
the runtime that will run), and the engine and the loader about the devices the weights really landed
on (engine.unsupported_reason, the loader's check after loading).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from heavylift.errors import InvalidArgumentError
from heavylift.hardware.gpus import KIND_CPU, KIND_CUDA, Device
from heavylift.model.architecture import Architecture, head_dim_of
from heavylift.schemes import SCHEMES
from .memory import FAST, TRANSFORMERS  # the runtimes a plan describes; --engine adds AUTO
from .plan import Workload, layout

AUTO = "auto"  # --engine: heavylift's engine where it runs, else transformers
CHOICES = (AUTO, FAST, TRANSFORMERS)
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # Qwen 3: its q/k norms fused into the RoPE kernel
SUPPORTED_ROPE = (None, "default", "llama3", "linear", "yarn")
GPU_REASON = "the fast engine needs every layer on a CUDA GPU"
ASKED_REASON = "--engine transformers"
OFFLOAD_REASON = "the fast engine needs every layer on a CUDA GPU, and its plan leaves some in CPU RAM"
# What each family the engine does not run has that its llama layer lacks (the reason's tail)
LACKS = {
    "mixtral": "mixture-of-experts MLPs",
    "qwen3_moe": "mixture-of-experts MLPs",
    "gemma2": "GELU-tanh MLPs, four norms a layer and soft-capped attention",
    "gemma3_text": "GELU-tanh MLPs, four norms a layer and a second RoPE for sliding layers",
    "phi3": "fused qkv and gate/up projections",
    "llama4_text": "mixture-of-experts MLPs, chunked attention and complex RoPE",
    "deepseek_v3": "latent attention and mixture-of-experts MLPs",
    "gpt_oss": "attention sinks and biased mixture-of-experts MLPs",
}


@dataclass(frozen=True)
class Runtime:
    """The runtime that runs a model in one precision, and why transformers does when it does."""

    name: str  # memory.FAST or memory.TRANSFORMERS
    reason: str = ""  # why not the engine; empty on the engine


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
        lacks = f"'s {LACKS[kind]}" if kind in LACKS else ""
        return f"the fast engine runs {', '.join(SUPPORTED_FAMILIES)} layers, not {kind}{lacks}"
    rope = _rope_type(config)
    if rope not in SUPPORTED_ROPE:
        return f"the fast engine has no {rope} RoPE (its positions change with the length)"
    head_dim = head_dim_of(config)
    if head_dim & (head_dim - 1) or head_dim > 256:
        return f"the fast engine's kernels need a power-of-two head size, not {head_dim}"
    act = config.get("hidden_act") or "silu"  # the supported families' default
    if act != "silu":
        return f"the fast engine's MLP is SiLU-gated, not {act}"
    if not SCHEMES[quant].engine_runs:
        return f"the fast engine computes in bf16; {quant} runs on transformers"
    return None


def check_choice(engine: str) -> None:
    """Refuse an --engine value that is not one of CHOICES, before anything loads."""
    if engine not in CHOICES:
        raise InvalidArgumentError(f"--engine must be one of {', '.join(CHOICES)}, not {engine!r}")


def devices_reason(kinds: Sequence[str], kernels: str | None = None) -> str | None:
    """Why the engine's kernels cannot run where the layers are (their device kinds: "cuda", "cpu", "mps"),
    or None. `kernels` says why this process cannot run them on any GPU (Triton missing); it is None for
    described devices: a CUDA GPU is taken to run them (heavylift installs Triton with torch on Linux)."""
    return GPU_REASON if any(k != KIND_CUDA for k in kinds) else kernels


def choose_runtime(config: Mapping[str, Any], quant: str, engine: str, kinds: Sequence[str],
                   kernels: str | None = None) -> Runtime:
    """The runtime for `engine` (auto, fast, transformers) with the layers on devices of these `kinds`.

    On CPUs alone, --engine fast runs the engine's torch reference path. --engine fast where the engine
    cannot run is refused here, in one line, before anything is downloaded or loaded.
    """
    check_choice(engine)
    if engine == TRANSFORMERS:
        return Runtime(TRANSFORMERS, ASKED_REASON)
    on_model, on_devices = model_reason(config, quant), devices_reason(kinds, kernels)
    if on_model is None and (on_devices is None or (engine == FAST and all(k == KIND_CPU for k in kinds))):
        return Runtime(FAST)
    if engine == FAST:
        raise InvalidArgumentError(f"{on_model or on_devices}; run it with --engine transformers")
    return Runtime(TRANSFORMERS, on_model or on_devices)


def plan_runtimes(config: Mapping[str, Any], arch: Architecture, devices: Sequence[Device], work: Workload,
                  quants: Sequence[str], engine: str, kernels: str | None = None) -> dict[str, Runtime]:
    """Each precision's runtime on the devices its plan places layers on: `devices`, and the CPU where the
    plan on the engine would leave layers in CPU RAM (--allow-offload; the greedy test make_plan's split
    makes). --engine fast is refused (one line) only where no precision asked for can run on the engine;
    among several, one it cannot run (fp16) is planned on transformers, as auto would, with the refusal
    as its Runtime's reason."""
    kinds = [d.kind for d in devices]
    chosen, refusals = {}, []
    for quant in quants:
        try:
            runtime = choose_runtime(config, quant, engine, kinds, kernels)
            if runtime.name == FAST and work.allow_offload and \
                    layout(arch, quant).margin(devices, replace(work, engine=FAST)) < 0:
                runtime = choose_runtime(config, quant, engine, kinds + [KIND_CPU], kernels)
                runtime = Runtime(runtime.name, runtime.reason and OFFLOAD_REASON)
        except InvalidArgumentError as e:
            refusals.append(e)
            runtime = Runtime(TRANSFORMERS, str(e))
        chosen[quant] = runtime
    if refusals and len(refusals) == len(quants):
        raise refusals[0]
    return chosen
