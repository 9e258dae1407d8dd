"""Prediction truth: heavylift's per-GPU plan against the memory a real run takes, across a matrix of cases.

For each case (model shape, precision, context, batch, GPU count) a random-weight safetensors checkpoint
of the shape is written once per model (a pre-quantized one in its stored form: DeepSeek-V3's block-FP8
weights with float32 block scales, gpt-oss's MXFP4 experts; Gemma 3's and Llama 4's language model under
"language_model." as their multimodal checkpoints hold it); then a fresh child process plans it, loads it
through heavylift, prefills random prompts of the plan's worst prompt length (its tightest device's
worst_prompt_tokens: the length at which the plan says the device holds the most) in heavylift's chunks and
decodes up to 32 greedy steps, as many as the context leaves room for.
Measured per GPU is the device's peak as the driver sees it (cudaMemGetInfo: CUDA context, cuBLAS, kernels and every
block the caching allocator holds), polled every millisecond and checked against the allocator's own
peaks; `needed_bytes` (peak allocated + what lies outside the allocator) and each phase's figures (load,
prefill, decode) sit beside it. Each case is also estimated as `accelerate estimate-memory` would
(weights only) and by the seed article's rule (params x 2 / 1 / 0.5 bytes).

Usage (repository root; the parent never starts CUDA, each case runs in its own child process):
  python bench/validate_plan.py --list [--models new-families]           # the matrix, planned for H100s
  python bench/validate_plan.py [--models llama3.1-8b,qwen2.5-7b] [--gpus 1] [--budget-s 420] [--merge]
                                [--engine transformers]  # default auto: heavylift's engine where it runs, as `run`
  python bench/validate_plan.py --merge-files a.json b.json --out bench/results/plan_validation_h100_<date>.json
  python bench/validate_plan.py --summarize bench/results/plan_validation_h100_<date>.json   # README table
Results: bench/results/plan_validation_<card>_<date>.json (or --out), rewritten after every case and
copied to $OUT/ when OUT is set. PYTORCH_CUDA_ALLOC_CONF passes to the children and is recorded. Each
record names the engine asked for (`engine`), the one the plan described (`engine_planned`) and the one
that ran (`engine_used`); the plan is made for the one that runs, as heavylift.load makes it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from heavylift.planner.runtimes import AUTO, TRANSFORMERS  # heavylift.load(engine=...): what --engine chooses

HERE = Path(__file__).resolve().parent
K = 1024
DECODE_STEPS = 32  # greedy steps after the prefill at most; prompt + steps never exceed the case's context
WEIGHT_STD = 0.02  # random matrices ~ N(0, 0.02); vectors (norms, biases) are ones
POLL_PERIOD_S = 0.001  # cudaMemGetInfo sampling period of the measuring thread
CASE_TIMEOUT_S = 300  # a child still running after this is recorded as an error
LIST_GPUS = "H100"  # the card --list plans every case for (it needs no GPU)
DEFAULT_WORK = "/tmp/hl-validate"
RESULT_MARKER = "VALIDATE_PLAN_RECORD "  # prefixes the child's one JSON line on stdout
DOES_NOT_FIT = "the plan says it does not fit"  # a case's `skipped` when heavylift refuses it
# Layers kept of each catalog shape (None: all), so the largest fit one 80 GB GPU in bf16. The new families'
# cuts keep each checkpoint a few GB and their quirks: Gemma 3's sixth layer is its first full-attention one,
# DeepSeek-V3's fourth its first MoE layer after the three dense ones; one Qwen 3 MoE or Llama 4 layer holds
# 4.8 or 4.4 GB of bf16 experts, one DeepSeek-V3 MoE layer 11.3 GB of FP8 ones.
MODELS = {"llama3.1-8b": None, "mistral-7b": None, "qwen2.5-7b": None, "gemma2-9b": None, "phi3-mini": None,
          "mixtral-8x7b": 4, "llama3.1-70b": 10,
          "qwen3-8b": 8, "gpt-oss-20b": 4, "deepseek-v3": 4, "gemma3-27b": 6, "llama4-scout": 1, "qwen3-235b-a22b": 1}
# The families heavylift plans besides those above, one catalog entry each: `--models new-families`. They run
# in this order: a --budget-s that stops the run early has measured the pre-quantized checkpoints first.
NEW_FAMILIES = ("qwen3-8b", "gpt-oss-20b", "deepseek-v3", "gemma3-27b", "llama4-scout", "qwen3-235b-a22b")
MODEL_GROUPS = {"new-families": NEW_FAMILIES}
SEED_RULE_BYTES_PER_PARAM = {"bf16": 2, "fp8": 1, "int8": 1, "nf4": 0.5, "nf4-dq": 0.5}
# `accelerate estimate-memory` sizes the model in float32, then divides (commands/estimate.py, gather_data).
ACCELERATE_DTYPE = {"bf16": "float16", "fp8": "int8", "int8": "int8", "nf4": "int4", "nf4-dq": "int4"}
ACCELERATE_DIVISOR = {"float32": 1, "float16": 2, "int8": 4, "int4": 8}

# Per model: "quant context batch" cases. Gemma 2 at 32k x 8 holds 51 GB of eager attention scores: its
# plan fits no 80 GB card, so those two are recorded as planned and not run.
ONE_GPU = {
    "llama3.1-8b": "bf16 1k 1, bf16 8k 1, bf16 32k 8, fp8 8k 1, fp8 8k 8, int8 8k 1, nf4 8k 1, nf4-dq 32k 1",
    "mistral-7b": "bf16 8k 1, bf16 8k 8, fp8 32k 1, int8 8k 1, nf4 1k 8, nf4-dq 8k 1",
    "qwen2.5-7b": "bf16 1k 8, bf16 32k 1, fp8 1k 1, int8 1k 8, nf4 32k 8, nf4-dq 8k 1",
    "gemma2-9b": "bf16 8k 1, bf16 32k 1, fp8 8k 8, int8 1k 1, nf4 32k 1, nf4-dq 1k 8, bf16 32k 8, nf4 32k 8",
    "phi3-mini": "bf16 1k 1, bf16 32k 8, fp8 8k 1, int8 8k 1, nf4 8k 8, nf4-dq 32k 1",
    "mixtral-8x7b": "bf16 8k 1, bf16 32k 8, fp8 1k 8, int8 8k 1, nf4 32k 1, nf4-dq 8k 8",
    "llama3.1-70b": "bf16 1k 1, bf16 8k 8, fp8 32k 1, int8 1k 1, nf4 8k 1, nf4-dq 32k 8",
    # Pre-quantized checkpoints in the precisions they load in: gpt-oss's MXFP4 experts dequantized (bf16),
    # DeepSeek-V3's block FP8 kept (fp8: transformers' FP8 kernel through the `kernels` package where it loads, else
    # heavylift's torch matmuls) or dequantized.
    "qwen3-8b": "bf16 8k 8, nf4-dq 8k 1",
    "gpt-oss-20b": "bf16 8k 1, bf16 1k 8",
    "deepseek-v3": "bf16 1k 8, fp8 8k 1",
    "gemma3-27b": "bf16 8k 1, fp8 1k 8",
    "llama4-scout": "bf16 8k 1, int8 1k 1",
    "qwen3-235b-a22b": "bf16 8k 1, nf4 1k 8",
}
# Split over two GPUs. At 32k x 8 the KV cache (34 GB for the 8B) is what the split must balance;
# Gemma 2 there fits only a pair of 141 GB cards.
TWO_GPU = {
    "llama3.1-8b": "bf16 8k 1, bf16 32k 8, nf4-dq 32k 1",
    "llama3.1-70b": "bf16 32k 8, fp8 8k 1",
    "mixtral-8x7b": "int8 1k 8, nf4 8k 1",
    "gemma2-9b": "bf16 32k 8",
}


@dataclass(frozen=True)
class Case:
    model: str
    quant: str
    context: int
    batch: int
    gpus: int
    engine: str = TRANSFORMERS  # heavylift.load's engine: transformers' forward, or "auto" (its own where it runs)

    @property
    def key(self) -> str:
        engine = "" if self.engine == TRANSFORMERS else f"/{self.engine}"
        return f"{self.model}/{self.quant}/{self.context // K}k/b{self.batch}/{self.gpus}gpu{engine}"


MATRIX = tuple(Case(model, quant, int(context[:-1]) * K, int(batch), gpus)
               for gpus, table in ((1, ONE_GPU), (2, TWO_GPU)) for model, cases in table.items()
               for quant, context, batch in (case.split() for case in cases.split(", ")))


def record_key(record: dict) -> str:
    return Case(**{f.name: record[f.name] for f in fields(Case) if f.name in record}).key


def case_engine(case: Case) -> str:
    """The runtime a case runs on, as heavylift.load decides it on a GPU machine: heavylift's engine where its
    checks pass (every layer on a CUDA GPU, Triton installed: true of the GPU kit), else transformers."""
    from heavylift.engine import model_reason
    from heavylift.planner.memory import FAST, TRANSFORMERS as PLAN_TRANSFORMERS

    if case.engine == TRANSFORMERS:
        return PLAN_TRANSFORMERS
    reason = model_reason(model_config(case.model), case.quant)
    return FAST if reason is None else PLAN_TRANSFORMERS


# --- Model shapes and random checkpoints ----------------------------------------------------------

# Per-family keys of the toy shape beside hidden 64: few small experts, latent ranks and RoPE channels of
# 64 and 32 (as tests/conftest.py's tiny DeepSeek-V3), windows and chunks of 32 positions.
TOY_KEYS = {"num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 64,
            "intermediate_size_mlp": 128, "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 32, "v_head_dim": 32, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
            "attention_chunk_size": 32, "sliding_window_pattern": 2}
TOY_EXPERTS_PER_TOKEN = 2  # num_experts_per_tok (and gpt-oss's experts_per_token) at toy size, at most
TOY_FP8_BLOCK = 32  # a block-FP8 checkpoint's weight_block_size at toy size: every toy projection is a multiple
FP8_STORED_UNIT = 1.0  # std of the float8_e4m3fn codes of a block-FP8 random weight; the scale brings it to WEIGHT_STD
MXFP4_SCALE = 127 - 7  # MXFP4 scale byte (exponent biased by 127): codes up to 6 x 2^-7, about WEIGHT_STD's size


def language_part(config: dict) -> dict:
    """The mapping that holds the language model's keys: config.json itself, or a multimodal one's text_config."""
    from heavylift.model.families import WRAPPERS

    return config["text_config"] if config.get("model_type") in WRAPPERS else config


def cut_layers(config: dict, layers: int) -> dict:
    """`config` with its first `layers` decoder layers (per-layer lists such as layer_types cut alike)."""
    config = json.loads(json.dumps(config))
    text = language_part(config)
    text["num_hidden_layers"] = layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:layers]
    return config


def _shrink_language(config: dict) -> dict:
    small = dict(config, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=320)
    mha = config.get("num_key_value_heads", config["num_attention_heads"]) == config["num_attention_heads"]
    small["num_key_value_heads"] = 4 if mha else 2
    if "head_dim" in config:
        small["head_dim"] = 16
    small.update({k: v for k, v in TOY_KEYS.items() if k in config})
    for key in ("num_experts_per_tok", "experts_per_token"):
        if isinstance(config.get(key), int):
            small[key] = min(config[key], TOY_EXPERTS_PER_TOKEN)
    for key in ("sliding_window", "sliding_window_size"):
        if isinstance(config.get(key), int):
            small[key] = min(config[key], 32)
    if isinstance(config.get("layer_types"), list):
        small["layer_types"] = config["layer_types"][:small["num_hidden_layers"]]
    return small


def shrink_config(config: dict) -> dict:
    """The same family and quirks at toy size, for CPU tests: hidden 64, 2 layers, vocab 320; a multimodal
    config's text_config shrunk so, a block-FP8 one in blocks of TOY_FP8_BLOCK."""
    small = json.loads(json.dumps(config))
    if small.get("text_config") is language_part(small):
        small["text_config"] = _shrink_language(small["text_config"])
    else:
        small = _shrink_language(small)
    if (small.get("quantization_config") or {}).get("weight_block_size"):
        small["quantization_config"]["weight_block_size"] = [TOY_FP8_BLOCK, TOY_FP8_BLOCK]
    for part in (small, language_part(small)):
        for key, fallback in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            ids = part.get(key)
            if isinstance(ids, int) and ids >= 320:
                part[key] = fallback
            elif isinstance(ids, list) and any(i >= 320 for i in ids):
                part[key] = [i for i in ids if i < 320] or [fallback]
    return small


def model_config(model: str, shrink: bool = False) -> dict:
    """The catalog's config.json of `model` with this benchmark's layer count (or shrunk to toy size)."""
    from heavylift.model.catalog import require_model

    config = require_model(model).config_dict()
    if MODELS[model] is not None:
        config = cut_layers(config, MODELS[model])
    return shrink_config(config) if shrink else config


def _random_like(shape, device, generator, dtype=None):
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype or torch.bfloat16, device=device)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, WEIGHT_STD, generator=generator)


def _stored_random(name: str, shape: tuple, device, generator) -> "torch.Tensor":
    """One tensor of a pre-quantized checkpoint as its storage holds it (prequantized.stored_as names it):
    block FP8's float8_e4m3fn weight and float32 weight_scale_inv, MXFP4's uint8 code pairs and scale bytes."""
    import torch

    if name.endswith("weight_scale_inv"):
        return torch.full(shape, WEIGHT_STD / FP8_STORED_UNIT, dtype=torch.float32, device=device)
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    if name.endswith("_scales"):
        return torch.full(shape, MXFP4_SCALE, dtype=torch.uint8, device=device)
    codes = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, FP8_STORED_UNIT, generator=generator)
    return codes.to(torch.float8_e4m3fn)


def build_config(config: dict) -> dict:
    """The config transformers builds the language model from: config.json's, or a multimodal one's text_config
    with its model_type; without quantization_config (the builder writes the stored forms itself)."""
    from heavylift.model.families import WRAPPERS

    kind = config.get("model_type")
    if kind in WRAPPERS:
        return {**config["text_config"], "model_type": WRAPPERS[kind]}
    return {k: v for k, v in config.items() if k != "quantization_config"}


def checkpoint_tensors(config: dict) -> tuple[dict[str, dict[str, tuple]], dict[str, tuple]]:
    """The checkpoint's tensor names and shapes, one group per shard (a decoder layer each, plus one for the
    rest), as transformers' model names them on the hub; and the pre-quantized stored forms by weight name.

    Names and shapes come from transformers' own model on the meta device, parameters and persistent buffers
    (DeepSeek-V3's e_score_correction_bias); its weight-conversion mapping is reverted per shard, as
    save_pretrained does, so MoE experts are stored per expert the way hub checkpoints and heavylift's inventory
    name them. A pre-quantized config's weights take the stored form heavylift's inventory gives them
    (weight name -> (shape, stored tensors)).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from heavylift.model.architecture import architecture_from_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**build_config(config)))
    state = model.state_dict()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights once
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in state})
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer{int(layer.group(1)):03d}" if layer else "other", []).append(name)
    shards = {shard: {k: tuple(v.shape) for k, v in revert_weight_conversion(
                  model, {n: torch.empty(shapes[n], device="meta") for n in names}).items()}
              for shard, names in sorted(groups.items())}
    stored = {t.name: (t.shape, t.stored) for t in architecture_from_config(config).tensors if t.stored}
    return shards, stored


def _shard_tensors(shapes: dict[str, tuple], stored: dict[str, tuple], fp32: set[str], device, generator) -> dict:
    """One shard's random tensors: each weight in its stored form where the checkpoint is pre-quantized."""
    import torch

    tensors = {}
    for name, shape in shapes.items():
        if name not in stored:
            tensors[name] = _random_like(shape, device, generator, torch.float32 if name in fp32 else None)
            continue
        planned, form = stored[name]
        if planned != shape:
            raise RuntimeError(f"transformers builds {name} as {shape}, heavylift's inventory as {planned}")
        tensors.update({n: _stored_random(n, s, device, generator) for n, s in form})
    return tensors


def build_checkpoint(config: dict, folder: Path, device: str = "cpu") -> Path:
    """config.json, one safetensors shard per decoder layer (plus one for the rest), index and tokenizer.

    Tensors as checkpoint_tensors names them, random (matrices ~ N(0, WEIGHT_STD), vectors ones, stored
    forms as _stored_random makes them); a multimodal config's language model under "language_model." with
    no vision tower (heavylift never reads it); parameters transformers keeps in float32 stored so.
    """
    import torch
    from safetensors.torch import save_file

    from heavylift.model.architecture import architecture_from_config
    from heavylift.model.families import WRAPPED_PREFIX
    from heavylift.model.tensors import FP32_ALWAYS

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import save_tiny_tokenizer  # a small real tokenizer; the benchmark feeds random ids

    folder.mkdir(parents=True, exist_ok=True)
    shards, stored = checkpoint_tensors(config)
    arch = architecture_from_config(config)
    fp32 = {t.name for t in arch.tensors if t.keep_fp32 == FP32_ALWAYS}
    prefix = WRAPPED_PREFIX if arch.wrapped else ""
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for n, shapes in enumerate(shards.values()):
        tensors = _shard_tensors(shapes, stored, fp32, device, generator)
        tensors = {prefix + k: v.contiguous().cpu() for k, v in tensors.items()}
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    save_tiny_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=1))  # last: a folder with it is complete
    return folder


# --- What others would have said --------------------------------------------------------------------

@functools.cache
def _accelerate_float32_bytes(config_json: str) -> int:
    """accelerate's model size in float32: the model create_empty_model builds, through calculate_maximum_sizes."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes

    config = json.loads(config_json)
    auto_map = config.get("auto_map") or {}
    constructor = next((getattr(transformers, k) for k in auto_map if k.startswith("AutoModelFor")),
                       transformers.AutoModel)  # the base model, without lm_head, unless auto_map names one
    with init_empty_weights(), torch.device("meta"):  # meta: an MoE layer's experts need no host memory
        model = constructor.from_config(transformers.AutoConfig.for_model(**config), dtype=torch.float32)
    return int(calculate_maximum_sizes(model)[0])


def estimates(config: dict, quant: str) -> dict:
    from heavylift.model.architecture import architecture_from_config

    dtype = ACCELERATE_DTYPE[quant]
    params = architecture_from_config(config).params
    return {"params": params, "accelerate_dtype": dtype,
            "accelerate_estimate_bytes": _accelerate_float32_bytes(json.dumps(config, sort_keys=True))
            // ACCELERATE_DIVISOR[dtype],
            "seed_rule_bytes": int(params * SEED_RULE_BYTES_PER_PARAM[quant])}


# --- Records ------------------------------------------------------------------------------------------

def gb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f}"


def error_pct(predicted: int | None, measured: int | None) -> float | None:
    """How far the prediction is from the measurement, in % of the measurement; positive = over."""
    if not predicted or not measured:
        return None
    return round(100 * (predicted - measured) / measured, 2)


def phase_figures(polled_peak: int, used_end: int, reserved_end: int, max_reserved: int, max_allocated: int) -> dict:
    """One device over one phase. What the driver shows beyond the allocator's reserve at the phase's end
    (CUDA context, cuBLAS, kernels) is added to the allocator's peak reserve, in case polling missed it.
    `needed_bytes` (peak allocated + that part) leaves out the blocks the allocator caches but could free."""
    non_allocator = used_end - reserved_end
    return {"measured_bytes": max(polled_peak, used_end, max_reserved + non_allocator),
            "needed_bytes": max_allocated + non_allocator, "polled_peak_bytes": polled_peak,
            "used_end_bytes": used_end, "non_allocator_bytes": non_allocator, "max_memory_reserved": max_reserved,
            "max_memory_allocated": max_allocated}


def device_record(planned: dict, phases: dict[str, dict]) -> dict:
    """A plan's device next to its phases (load, prefill, decode; or up to an OOM)."""
    measured = max((p["measured_bytes"] for p in phases.values()), default=None)
    last = list(phases.values())[-1] if phases else {}
    return {**planned, "measured_bytes": measured, "error_pct": error_pct(planned["predicted_bytes"], measured),
            "needed_bytes": max((p["needed_bytes"] for p in phases.values()), default=None),
            "max_memory_allocated": max((p["max_memory_allocated"] for p in phases.values()), default=None),
            "max_memory_reserved": max((p["max_memory_reserved"] for p in phases.values()), default=None),
            "non_allocator_bytes": last.get("non_allocator_bytes"), "phases": phases}


def finish_record(record: dict, estimate: dict) -> dict:
    """Totals over GPUs and every estimator's error against the measured total."""
    devices = record["devices"]
    measured = [d.get("measured_bytes") for d in devices]
    total = sum(measured) if devices and None not in measured else None
    predicted = sum(d["predicted_bytes"] for d in devices)
    out = {**record, **estimate, "predicted_bytes": predicted, "measured_bytes": total,
           "error_pct": error_pct(predicted, total)}
    out["accelerate_error_pct"] = error_pct(estimate["accelerate_estimate_bytes"], total)
    out["seed_rule_error_pct"] = error_pct(estimate["seed_rule_bytes"], total)
    return out


def base_record(case: Case, scheme) -> dict:
    """A case as planned: each device's total, its terms and its layers."""
    terms = ("weights", "kv_cache", "activation", "overhead")
    devices = [{"index": d.device.index, "name": d.device.name, "layers": [d.layers.start, d.layers.stop],
                "predicted_bytes": d.total_bytes, "predicted_terms": {t: getattr(d, f"{t}_bytes") for t in terms},
                "worst_prompt_tokens": d.worst_prompt_tokens}
               for d in scheme.per_device]
    return {**asdict(case), "layers": sum(len(d.layers) for d in scheme.per_device), "load_s": None,
            "fits_predicted": scheme.fits, "oom": False, "devices": devices}


def replan(results: dict, command: str) -> dict:
    """A results document with every case planned again by the planner as it is now, next to the same
    measurements: a planner change is checked against the GPU runs without running them again. The document
    says so (`replanned_command`), and each case keeps the figures it was planned with (`planned_at_run`)."""
    from heavylift.hardware.gpus import device_from_model, find_gpu

    card = find_gpu(results["card"].split(" ; ")[0])
    cases = []
    for record in results["cases"]:
        case = Case(**{f.name: record[f.name] for f in fields(Case) if f.name in record})
        fresh = base_record(case, plan_scheme(case, [device_from_model(card, i) for i in range(case.gpus)]))
        devices = [{**old, "predicted_bytes": new["predicted_bytes"], "predicted_terms": new["predicted_terms"],
                    "worst_prompt_tokens": new["worst_prompt_tokens"],
                    "error_pct": error_pct(new["predicted_bytes"], old.get("measured_bytes"))}
                   for old, new in zip(record["devices"], fresh["devices"])] if record["devices"] else fresh["devices"]
        at_run = record.get("planned_at_run") or {"predicted_bytes": record.get("predicted_bytes"),
                                                  "error_pct": record.get("error_pct")}
        updated = {**record, "devices": devices, "fits_predicted": fresh["fits_predicted"], "planned_at_run": at_run}
        cases.append(updated if "error" in record else finish_record(updated, estimates(model_config(case.model),
                                                                                        case.quant)))
    return {**results, "replanned_command": command, "cases": cases}


# --- The child: one case in a fresh CUDA context ------------------------------------------------------

class Meter:
    """Per-GPU memory as the driver sees it, polled by a thread, with the caching allocator's peaks, by phase."""

    def __init__(self, count: int, cuda=None):
        import torch

        self.cuda, self.count, self.phases = cuda or torch.cuda, count, {}
        self.start_bytes = [self._used(i) for i in range(count)]  # creates each device's CUDA context
        self.peaks, self.lock, self.stopped = list(self.start_bytes), threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _used(self, i: int) -> int:
        free, total = self.cuda.mem_get_info(i)
        return total - free

    def _poll(self) -> None:
        while not self.stopped.wait(POLL_PERIOD_S):
            for i in range(self.count):
                used = self._used(i)
                with self.lock:
                    self.peaks[i] = max(self.peaks[i], used)

    def phase(self, name: str) -> None:
        """Close a phase: its figures per device; peaks start again from now."""
        for i in range(self.count):
            self.cuda.synchronize(i)
        used = [self._used(i) for i in range(self.count)]
        with self.lock:
            polled, self.peaks = self.peaks, list(used)
        self.phases[name] = [phase_figures(polled[i], used[i], self.cuda.memory_reserved(i),
                                           self.cuda.max_memory_reserved(i), self.cuda.max_memory_allocated(i))
                             for i in range(self.count)]
        for i in range(self.count):
            self.cuda.reset_peak_memory_stats(i)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def by_device(self) -> list[dict[str, dict]]:
        return [{name: figures[i] for name, figures in self.phases.items()} for i in range(self.count)]


def decode_steps(context: int, prompt: int) -> int:
    """Greedy steps after a prompt of `prompt` tokens: DECODE_STEPS, or as many as the context leaves room for."""
    return min(DECODE_STEPS, context - prompt)


def drive(session, context: int, batch: int, mark, prompt: int) -> tuple[float, float, int]:
    """`batch` random prompts of `prompt` tokens prefilled in heavylift's chunks, then decode_steps greedy
    steps; on heavylift's engine when the session has one, else through transformers as Session does.
    `mark(phase)` is called after the prefill and after the decode. Returns the seconds of each and the
    tokens cached."""
    import torch

    embed = session.model.get_input_embeddings()
    ids = torch.randint(0, embed.num_embeddings, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, advance, cached = session.steps(ids)
        mark("prefill")
        t1 = time.perf_counter()
        for _ in range(decode_steps(context, prompt)):
            logits = advance(logits.float().argmax(dim=-1, keepdim=True))  # the float32 copy sampling makes
        mark("decode")
    return t1 - t0, time.perf_counter() - t1, cached()


def run_case(case: Case, folder: Path) -> dict:
    import torch

    from heavylift.api import load, plan
    from heavylift.hardware.detect import detect_devices
    from heavylift.errors import OutOfMemoryError

    devices = detect_devices()[:case.gpus]  # NVML / nvidia-smi, before CUDA starts
    work = dict(context=case.context, batch=case.batch, quant=case.quant)
    scheme = plan(str(folder), gpus=devices, engine=case.engine, **work).scheme(case.quant)
    planned = scheme.engine
    record = {**base_record(case, scheme), "engine_planned": planned}
    if not scheme.fits:
        return {**record, "skipped": DOES_NOT_FIT}
    meter = Meter(case.gpus)
    try:
        t = time.perf_counter()
        session = load(str(folder), gpus=devices, engine=case.engine, **work)
        record["load_s"], record["attention"] = round(time.perf_counter() - t, 2), session.attention
        record["engine_used"] = session.scheme.engine
        if session.scheme.engine != planned:  # the run went another way: compare with its plan
            replanned = base_record(case, session.scheme)
            record.update(devices=replanned["devices"], fits_predicted=replanned["fits_predicted"],
                          engine_planned=session.scheme.engine, engine_replanned_from=planned)
        meter.phase("load")
        prompt = session.scheme.tightest.worst_prompt_tokens  # the plan the run follows (record["engine_planned"])
        prefill_s, decode_s, cached = drive(session, case.context, case.batch, meter.phase, prompt)
        record.update(prefill_s=round(prefill_s, 2), decode_s=round(decode_s, 2), cache_tokens=cached,
                      prompt_tokens=prompt, decode_steps=decode_steps(case.context, prompt))
    except (torch.OutOfMemoryError, OutOfMemoryError) as e:
        record.update(oom=True, oom_message=str(e).splitlines()[0][:300])
        meter.phase("oom")
    finally:
        meter.stop()
    for planned, phases, start in zip(record["devices"], meter.by_device(), meter.start_bytes):
        planned.update(device_record(planned, phases), start_bytes=start)
    record.update(torch=torch.__version__, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    return record


# --- The parent: matrix, checkpoints, children, results -----------------------------------------------

def plan_scheme(case: Case, devices):
    """The plan of one case on these devices for the runtime it runs on, from the config alone (no CUDA, no weights)."""
    from heavylift.model.architecture import architecture_from_config
    from heavylift.planner.make import make_plan
    from heavylift.planner.plan import Workload

    arch = architecture_from_config(model_config(case.model))
    work = Workload(case.context, case.batch, engine=case_engine(case))
    return make_plan(case.model, arch, devices, work, [case.quant]).scheme(case.quant)


def unmet_requirement(case: Case) -> str | None:
    """Why this machine cannot run a case as planned, known before its checkpoint is written: block-FP8 weights
    kept in fp8 under a transformers release heavylift's torch matmuls do not answer, without the `kernels`
    package (prequantized.check_stored_runs; the cases' GPUs taken to have FP8 tensor cores, as the H100s do)."""
    from heavylift.errors import InvalidArgumentError
    from heavylift.model.architecture import architecture_from_config
    from heavylift.model.prequantized import check_stored_runs, installed_transformers

    pre = architecture_from_config(model_config(case.model)).prequantized
    try:
        check_stored_runs(pre, case.quant, True, installed_transformers())
    except InvalidArgumentError as e:
        return str(e)
    return None


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w not in ("nvidia", "geforce")]
    return next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z]*", w)), "-".join(words[:2]) or "gpu")


def child_env(gpus: int) -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_child(case: Case, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(asdict(case)), "--work", str(folder.parent)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, env=child_env(case.gpus))
    except subprocess.TimeoutExpired:
        return {**asdict(case), "error": f"timed out after {CASE_TIMEOUT_S} s", "devices": []}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode or not lines:
        return {**asdict(case), "error": f"child exited {done.returncode}: {done.stderr[-1500:]}", "devices": []}
    return json.loads(lines[-1][len(RESULT_MARKER):])


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    out.write_text(text)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.parent.resolve():
        (Path(os.environ["OUT"]) / out.name).write_text(text)


def selected(args) -> list[Case]:
    """The --models, --gpus and --quants cases, grouped by model (one checkpoint at a time), on --engine."""
    models = [m for name in args.models.split(",") for m in MODEL_GROUPS.get(name, (name,))] if args.models \
        else list(MODELS)
    unknown = set(models) - set(MODELS)
    if unknown:
        sys.exit(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join([*MODELS, *MODEL_GROUPS])}")
    quants = args.quants.split(",") if args.quants else None
    cases = [c for c in MATRIX if c.model in models and (args.gpus is None or c.gpus == args.gpus)
             and (quants is None or c.quant in quants)]
    return [replace(c, engine=args.engine) for c in sorted(cases, key=lambda c: list(MODELS).index(c.model))]


def run_matrix(args) -> None:
    from heavylift.hardware.detect import detect_devices

    devices = [d for d in detect_devices() if d.kind == "cuda"]  # NVML / nvidia-smi: no CUDA context
    if not devices:
        sys.exit("no NVIDIA GPU here; only --list, --summarize and --merge-files run without one")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no context of the parent's can count in a child's measurement
    today = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"plan_validation_{card_slug(devices[0].name)}_{today}.json")
    results = {"card": devices[0].name, "date": today, "command": shlex.join(["python", *sys.argv]), "cases": []}
    if args.merge and out.exists():
        results = merge([json.loads(out.read_text()), results])
    done = {record_key(r) for r in results["cases"] if "error" not in r}
    start, work = time.monotonic(), Path(args.work)
    todo = [c for c in selected(args) if c.key not in done]
    for i, case in enumerate(todo):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s} s spent; not started: {', '.join(c.key for c in todo[i:])}", flush=True)
            break
        folder = work / case.model
        if case.gpus > len(devices):
            print(f"{case.key}: skipped, needs {case.gpus} GPUs and {len(devices)} are visible", flush=True)
            continue
        scheme = plan_scheme(case, devices[:case.gpus])
        unmet = unmet_requirement(case)
        if not scheme.fits or unmet:
            record = {**base_record(case, scheme), "skipped": unmet or DOES_NOT_FIT}
        else:
            if not (folder / "config.json").exists():
                t = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--build", case.model, "--work", str(work)], check=True,
                               env=child_env(1))
                print(f"{case.model}: checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
            record = run_child(case, folder)
        if "error" not in record:
            record = finish_record(record, estimates(model_config(case.model), case.quant))
        results["cases"] = [r for r in results["cases"] if record_key(r) != case.key] + [record]
        write_results(results, out)
        print(f"{case.key}: predicted {gb(record.get('predicted_bytes'))} GB, measured "
              f"{gb(record.get('measured_bytes'))} GB, error {record.get('error_pct')}% {record.get('skipped', '')}"
              f"{' OOM' if record.get('oom') else ''}{record.get('error', '')[-300:]}", flush=True)
        if all(c.model != case.model for c in todo[i + 1:]):
            shutil.rmtree(folder, ignore_errors=True)  # the GPU machine's disk holds one checkpoint at a time
    print(f"results: {out}")


# --- Merge, list, summarize ---------------------------------------------------------------------------

def merge(documents: list[dict]) -> dict:
    """One results document from several runs: per case, a measured record beats a planned-only one, which
    beats an error; among equals the later file wins. Cases in matrix order."""
    rank = lambda r: 0 if "error" in r else 2 if r.get("measured_bytes") is not None else 1  # noqa: E731
    best: dict[str, dict] = {}
    for doc in documents:
        for record in doc["cases"]:
            key = record_key(record)
            if key not in best or rank(record) >= rank(best[key]):
                best[key] = record
    order = {replace(c, engine=TRANSFORMERS).key: i for i, c in enumerate(MATRIX)}
    position = lambda r: order.get(replace(Case(**{f.name: r[f.name] for f in fields(Case) if f.name in r}),  # noqa: E731
                                           engine=TRANSFORMERS).key, len(order))
    joined = lambda field: " ; ".join(dict.fromkeys(d[field] for d in documents if d.get(field)))  # noqa: E731
    return {"card": joined("card"), "date": max(d["date"] for d in documents), "command": joined("command"),
            "cases": sorted(best.values(), key=position)}


def list_matrix(spec: str = LIST_GPUS, engine: str = AUTO, cases: list[Case] | None = None) -> str:
    """`cases` (default: the whole matrix on `engine`) planned on `spec` cards: layers, per-GPU bytes, the
    runtime planned, the prompt length a run prefills (the tightest device's worst) and whether it fits."""
    from heavylift.hardware.gpus import parse_gpu_spec

    cases = [replace(c, engine=engine) for c in MATRIX] if cases is None else cases
    rows = [f"{'case':42} {'layers':>6} {'predicted GB per GPU':>22} {'runtime':>12} {'prompt':>7}  fits {spec}"]
    for case in cases:
        scheme = plan_scheme(case, parse_gpu_spec(f"{case.gpus}x{spec}"))
        per_gpu = " + ".join(f"{d.total_bytes / 1e9:.1f}" for d in scheme.per_device)
        layers = sum(len(d.layers) for d in scheme.per_device)
        fits = "yes" if scheme.fits else "NO"
        rows.append(f"{case.key:42} {layers:>6} {per_gpu:>22} {scheme.engine:>12} "
                    f"{scheme.tightest.worst_prompt_tokens:>7}  {fits}")
    ones = sum(c.gpus == 1 for c in cases)
    rows.append(f"{len(cases)} cases: {ones} on one GPU, {len(cases) - ones} on two")
    return "\n".join(rows)


def _cell(devices: list[dict], field: str, with_error: bool = True) -> str:
    """Per-GPU bytes joined by +, then the plan's error against each: '29.10 + 28.90 (+1.2% / -0.5%)'."""
    values = [d.get(field) for d in devices]
    if not devices or None in values:
        return "—"
    errors = [error_pct(d["predicted_bytes"], v) for d, v in zip(devices, values)]
    shown = " / ".join(f"{e:+.1f}%" for e in errors if e is not None)
    return " + ".join(gb(v) for v in values) + (f" ({shown})" if with_error and shown else "")


def summarize(results: dict) -> str:
    """The README's table: per case the plan against the measured peak, against what the allocator
    needed of it (peak allocated + the rest of the process), and the two weights-only estimates."""
    pct = lambda p: "" if p is None else f" ({p:+.1f}%)"  # noqa: E731
    again = " Plans made again by the planner as it is now (`replanned_command`)." if results.get("replanned_command") \
        else ""
    lines = [f"Plan vs measured on {results['card']} ({results['date']}); error = (estimate − measured) / measured."
             + again, "", "| model | quant | context | batch | GPUs | predicted GB | measured GB (error) | max allocated GB "
             "| needed GB (error) | accelerate GB (error) | seed rule GB (error) | load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for r in results["cases"]:
        devices = r.get("devices", [])
        errors += [(abs(d["error_pct"]), record_key(r)) for d in devices if d.get("error_pct") is not None]
        skipped = r.get("skipped")
        status = "error" if "error" in r else "does not fit (plan)" if skipped == DOES_NOT_FIT \
            else f"not run: {skipped}" if skipped else None
        measured = status or _cell(devices, "measured_bytes") + (" OOM" if r.get("oom") else "")
        engine = "" if r.get("engine", TRANSFORMERS) == TRANSFORMERS else f" ({r.get('engine_used', r['engine'])})"
        cells = [r["model"] + engine, r["quant"], f"{r['context'] // K}k", str(r["batch"]), str(r["gpus"]),
                 _cell(devices, "predicted_bytes", with_error=False), measured,
                 _cell(devices, "max_memory_allocated", with_error=False), _cell(devices, "needed_bytes"),
                 gb(r.get("accelerate_estimate_bytes")) + pct(r.get("accelerate_error_pct")),
                 gb(r.get("seed_rule_bytes")) + pct(r.get("seed_rule_error_pct")),
                 "—" if r.get("load_s") is None else f"{r['load_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if errors:
        worst, key = max(errors)
        within = sum(e <= 3 for e, _ in errors)
        lines += ["", f"Max |error| of the plan over {len(errors)} GPU measurements: {worst:.1f}% ({key}); "
                      f"{within} of {len(errors)} within 3%."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the matrix and its plan on H100s; no GPU needed")
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS) + "; or a group: "
                        + ", ".join(f"{g} ({', '.join(m)})" for g, m in MODEL_GROUPS.items()))
    parser.add_argument("--gpus", type=int, choices=(1, 2), help="only the cases on this many GPUs")
    parser.add_argument("--quants", help="only the cases in these precisions (comma-separated)")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds")
    parser.add_argument("--out", help="results file (default bench/results/plan_validation_<card>_<date>.json)")
    parser.add_argument("--merge", action="store_true", help="add to --out instead of starting it afresh")
    parser.add_argument("--merge-files", nargs="+", metavar="FILE", help="merge these results files into --out")
    parser.add_argument("--summarize", metavar="FILE", help="print the markdown table of a results file")
    parser.add_argument("--replan", metavar="FILE",
                        help="plan every case of a results file again with the current planner (into --out)")
    parser.add_argument("--engine", choices=(AUTO, TRANSFORMERS), default=AUTO,
                        help="auto (as `heavylift run`: heavylift's engine where it runs), or transformers for all")
    parser.add_argument("--work", default=DEFAULT_WORK, help="where checkpoints are written (one at a time)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = Case(**json.loads(args.child))
        print(RESULT_MARKER + json.dumps(run_case(case, Path(args.work) / case.model)), flush=True)
    elif args.build:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_checkpoint(model_config(args.build), Path(args.work) / args.build, device)
    elif args.list:
        print(list_matrix(cases=selected(args)))
    elif args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text())))
    elif args.replan:
        if not args.out:
            sys.exit("--replan needs --out")
        write_results(replan(json.loads(Path(args.replan).read_text()), shlex.join(["python", *sys.argv])),
                      Path(args.out))
    elif args.merge_files:
        if not args.out:
            sys.exit("--merge-files needs --out")
        write_results(merge([json.loads(Path(f).read_text()) for f in args.merge_files]), Path(args.out))
    else:
        run_matrix(args)


if __name__ == "__main__":
    main()
