"""The plan's JSON contract: the field names and values other tools read from `heavylift plan --json`.

Each device's figures are those of the prompt length at which it holds the most ("worst_prompt_tokens", up to
the context; planner/prompt_lengths.py; 0 on a device that holds no layer), and each scheme names its
tightest device's. With --serve (plan.Workload.serve) the plan describes a server of `batch` sequences: the
top level then carries "serve": true, and each scheme "max_concurrent_sequences", the most sequences of
`context` tokens it serves at once (0: not even one). A plan without --serve carries neither key.
`heavylift plan --fewest --json` prints fewest_to_json instead of a plan, `heavylift plan --train --json`
training_plan_to_json: the same model and devices fields, and a "training" section in place of the schemes.

Pure: plain dicts of a plan's records. It reads a plan.Plan, plan.SchemePlan and plan.DevicePlan by their
fields without importing them, because Plan.to_json() calls it from that module.
"""

from __future__ import annotations

from typing import Any

from heavylift.hardware.gpus import MAX_GPU_COUNT, Device


def device_id(device: Device) -> str:
    """The torch-style name of a device in plans and device maps: cuda:0, mps, cpu."""
    return f"cuda:{device.index}" if device.kind == "cuda" else device.kind


def device_plan_to_json(d: Any) -> dict[str, Any]:
    """One plan.DevicePlan; "prefill_rows" only where the engine takes each prefill chunk through the device's
    layers that many tokens at a time, or transformers prefills in chunks of that many tokens (then on every
    device), "adapter_bytes" only where a LoRA adapter adds weights."""
    return {"device": device_id(d.device), "name": d.device.name,
            "layers": [d.layers.start, d.layers.stop - 1] if d.layers else [],
            "weights_bytes": d.weights_bytes, "kv_cache_bytes": d.kv_cache_bytes,
            "activation_bytes": d.activation_bytes, "overhead_bytes": d.overhead_bytes,
            "total_bytes": d.total_bytes, "free_bytes": d.free_bytes, "worst_prompt_tokens": d.worst_prompt_tokens,
            **({"adapter_bytes": d.adapter_bytes} if d.adapter_bytes else {}),
            **({"prefill_rows": d.prefill_rows} if d.prefill_rows else {})}


def scheme_plan_to_json(s: Any) -> dict[str, Any]:
    """One plan.SchemePlan: its totals, its devices, its advice, the runtime it describes, the prompt length at
    which its tightest device holds the most and, for a server, how many sequences it serves."""
    out = {"quant": s.quant, "weights_bytes": s.weights_bytes, "kv_cache_bytes": s.kv_cache_bytes,
           "activation_bytes": s.activation_bytes, "overhead_bytes": s.overhead_bytes,
           "total_bytes": s.total_bytes, "fits": s.fits, "offload_bytes": s.offload_bytes,
           "worst_prompt_tokens": s.tightest.worst_prompt_tokens,
           "per_device": [device_plan_to_json(d) for d in s.per_device],
           "decode_tok_s_upper_bound": round(s.decode_tok_s_upper_bound, 2), "advice": list(s.advice),
           "engine": s.engine}
    if s.max_concurrent_sequences is not None:
        out["max_concurrent_sequences"] = s.max_concurrent_sequences
    return out


def plan_to_json(plan: Any) -> dict[str, Any]:
    """A whole plan.Plan: the model, the workload, the devices with the capacity the plan may fill, and every
    precision's plan."""
    arch, work = plan.architecture, plan.workload
    out = {"model": plan.model, "model_type": arch.model_type, "params": arch.params,
           "context": work.context, "batch": work.batch, "kv_dtype": work.kv_dtype,
           "reserve_bytes": work.reserve_bytes,
           "devices": _devices(plan.devices, work.reserve_bytes),
           "schemes": [scheme_plan_to_json(s) for s in plan.schemes],
           "recommended": plan.recommended, "warnings": list(plan.warnings)}
    if work.serve:
        out["serve"] = True
    return out


def _devices(devices: Any, reserve_bytes: int) -> list[dict[str, Any]]:
    return [{"index": d.index, "name": d.name, "kind": d.kind, "capacity_bytes": d.memory_bytes - reserve_bytes}
            for d in devices]


# A training device plan's byte terms, in the order the report shows them; total_bytes is their sum.
TRAINING_TERMS = ("weights_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes",
                  "logits_bytes", "overhead_bytes")


def training_device_to_json(d: Any) -> dict[str, Any]:
    """One training.TrainingDevicePlan: its terms at its peak, and when the peak comes ("forward", "loss",
    "backward" or "optimizer")."""
    return {"device": device_id(d.device), "name": d.device.name,
            "layers": [d.layers.start, d.layers.stop - 1] if d.layers else [],
            **{t: getattr(d, t) for t in TRAINING_TERMS},
            "total_bytes": d.total_bytes, "free_bytes": d.free_bytes, "peak": d.peak}


def training_plan_to_json(plan: Any) -> dict[str, Any]:
    """A training.TrainingPlan (`heavylift plan --train --json`): the model and devices as a plan gives them,
    and "training": the workload, the adapters' parameter count, each term summed over the devices, whether
    the step fits, every device at its peak, and the advice."""
    arch, work = plan.architecture, plan.training
    section = {"quant": plan.quant, "lora_r": work.lora_r, "lora_alpha": work.lora_alpha,
               "lora_dropout": work.lora_dropout, "targets": list(work.targets),
               "target_modules": work.target_modules, "seq_len": work.seq_len, "micro_batch": work.micro_batch,
               "grad_checkpointing": work.grad_checkpointing, "optimizer": work.optimizer,
               "trainable_params": plan.trainable_params,
               **{t: sum(getattr(d, t) for d in plan.per_device) for t in TRAINING_TERMS},
               "total_bytes": plan.total_bytes, "fits": plan.fits,
               "per_device": [training_device_to_json(d) for d in plan.per_device], "advice": list(plan.advice)}
    return {"model": plan.model, "model_type": arch.model_type, "params": arch.params,
            "reserve_bytes": plan.reserve_bytes, "devices": _devices(plan.devices, plan.reserve_bytes),
            "training": section}


def fewest_to_json(table: Any) -> dict[str, Any]:
    """A fewest.Fewest (`heavylift plan --fewest --json`): the model and workload as a plan gives them, each
    card with the capacity one holds, and per precision (keyed by --quant name) per card (keyed by catalog
    key): "fewest", the fewest cards that hold it without offload (null: more than "max_gpu_count");
    "weights_only", the cards its weights alone fill; "engines", the runtime each precision is planned for."""
    arch, work = table.architecture, table.workload
    keys = [card.name for card in table.cards]
    out = {"model": table.model, "model_type": arch.model_type, "params": arch.params,
           "context": work.context, "batch": work.batch, "kv_dtype": work.kv_dtype,
           "reserve_bytes": work.reserve_bytes, "max_gpu_count": MAX_GPU_COUNT,
           "cards": [{"name": card.name, "capacity_bytes": card.memory_bytes - work.reserve_bytes}
                     for card in table.cards],
           "fewest": {row.quant: dict(zip(keys, row.counts)) for row in table.rows},
           "weights_only": {row.quant: dict(zip(keys, row.weights_only)) for row in table.rows},
           "engines": {row.quant: row.engine for row in table.rows}}
    if work.serve:
        out["serve"] = True
    return out
