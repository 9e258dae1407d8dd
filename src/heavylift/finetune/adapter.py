"""LoRA adapters over a base model: attached for training as the training plan's recipe says, checked against
a base before any weight loads, and applied for inference.

An adapter's shapes are compared with the model's tensor inventory (model.architecture: its LINEAR weights,
named as transformers names the modules), so an adapter made for another base is refused before anything
loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from heavylift.errors import AdapterError, CheckpointError, InvalidArgumentError
from heavylift.model.architecture import Architecture, Role
from heavylift.model.checkpoint import read_header
from heavylift.planner.lora import Adapter, LoraModule
from heavylift.planner.memory import FAST, TRANSFORMERS

ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained writes these two files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's names: the wrapped model's module path after this
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


def projections(arch: Architecture) -> dict[str, tuple[int, int]]:
    """Every linear projection of the decoder layers: module path -> (out_features, in_features)."""
    return {t.name.removesuffix(".weight"): t.shape for t in arch.tensors if t.role == Role.LINEAR}


@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    base: str  # the base model the adapter's config names
    rank: int
    alpha: float
    targets: tuple[str, ...]


def _config(folder: Path, flag: str) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{flag} {folder} is not a LoRA adapter (it needs {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS}); give a folder `heavylift finetune` wrote")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"{path} is malformed; give a folder `heavylift finetune` wrote") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{flag} {folder} is not a LoRA adapter (peft_type "
                           f"{config.get('peft_type') if isinstance(config, dict) else None}); heavylift applies LoRA")
    return config


def _lora_shapes(folder: Path, flag: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """module path -> {"A": shape, "B": shape}, from the weights file's header."""
    try:
        header = read_header(folder / ADAPTER_WEIGHTS)
    except CheckpointError:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS} is truncated or corrupt; save the adapter again") from None
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None or not name.startswith(PEFT_PREFIX):
            raise AdapterError(f"{flag} {folder} holds {name}, which is not a LoRA weight of a linear projection; "
                               "heavylift applies adapters of linear projections only")
        module = name[len(PEFT_PREFIX):-len(suffix)]
        shapes.setdefault(module, {})[LORA_SUFFIXES[suffix]] = tuple(info["shape"])
    return shapes


def check_adapter(folder: Path, arch: Architecture, model: str, flag: str = "--adapter") -> AdapterInfo:
    """The adapter in `folder`, checked against `model`'s projections before any weight loads: every LoRA
    pair sits on a projection the model has, with its in and out features. AdapterError in one line otherwise."""
    config = _config(folder, flag)
    base = str(config.get("base_model_name_or_path") or "another model")
    have = projections(arch)
    for module, pair in sorted(_lora_shapes(folder, flag).items()):
        a, b = pair.get("A"), pair.get("B")
        want = have.get(module)
        if want is None or a is None or b is None or len(a) != 2 or len(b) != 2 or (b[0], a[1]) != want:
            shown = f"{b[0]}x{a[1]}" if a and b and len(a) == 2 and len(b) == 2 else "incomplete"
            there = f"{want[0]}x{want[1]}" if want else "absent"
            raise AdapterError(f"{flag} {folder} was made for {base}, not {model}: its {module} is {shown}, "
                               f"{model}'s is {there}; give an adapter trained on {model}")
    targets = config.get("target_modules") or ()
    return AdapterInfo(folder, base, int(config.get("r", 0)), float(config.get("lora_alpha", 0)),
                       tuple(sorted(targets)) if isinstance(targets, (list, tuple)) else (str(targets),))


def planned_adapter(folder: Path, arch: Architecture, model: str, flag: str = "--adapter") -> Adapter:
    """The adapter in `folder`, checked against `model` (check_adapter), as the planner's input: each LoRA
    module's layer and shapes, read from adapter_config.json and the weights file's header, without torch."""
    check_adapter(folder, arch, model, flag)
    layers = {t.name.removesuffix(".weight"): t.layer for t in arch.tensors if t.role == Role.LINEAR}
    return Adapter(tuple(LoraModule(layers[module], module, pair["A"][1], pair["A"][0], pair["B"][0])
                         for module, pair in sorted(_lora_shapes(folder, flag).items())))


def lora_config(targets: list[str], rank: int, alpha: float, dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM")


def attach_lora(model, targets: list[str], rank: int, alpha: float, dropout: float, grad_checkpointing: bool):
    """A 4-bit base prepared and wrapped with LoRA layers of `rank` on the projections `targets` (peft's module
    names), as the training plan's recipe does (planner/training.py): peft's prepare_model_for_kbit_training
    freezes the base, upcasts what it does not quantize (embeddings, norms, head) to float32 and, with
    `grad_checkpointing`, checkpoints each layer reentrantly; the LoRA weights are float32 and torch's RNG
    decides their initial values. A peft model."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})
    model.config.use_cache = False  # a training forward keeps no KV cache
    _keep_cpu_layout(model)
    return get_peft_model(model, lora_config(targets, rank, alpha, dropout))


def _keep_cpu_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first forward
    run in eval mode without grad (an evaluation), and computes differently from then on (Linear4bit.forward,
    0.50). Training keeps the layout it loaded with, so a step computes the same whether or not an evaluation
    came before it: a resumed run then repeats the uninterrupted one exactly."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_adapter(model, folder: Path):
    """The adapter in `folder` put onto `model` in place for inference: each targeted projection computes its
    base output plus the LoRA update. The model object stays the transformers model it was."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    base = wrapped.get_base_model()
    base.eval()
    return base



def adapter_engine(engine: str, folder: Path) -> tuple[str, str]:
    """For `run`/`serve --adapter`: the --engine to plan for (transformers: the fast engine does not apply LoRA),
    and the line that says so; --engine fast is refused."""
    if engine == FAST:
        raise InvalidArgumentError("--adapter runs on transformers' forward (the fast engine does not apply LoRA); "
                                   "drop --engine fast")
    return TRANSFORMERS, f"adapter {folder}: transformers runs the model (the fast engine does not apply LoRA)"
