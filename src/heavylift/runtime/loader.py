"""Load a checkpoint exactly as a plan says: its precision, its device map, nothing on CPU or disk by surprise."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from heavylift.model.architecture import Architecture
from heavylift.errors import CheckpointError, OffloadError, OutOfMemoryError
from heavylift.model.families import WRAPPED_PREFIX
from heavylift.model.prequantized import BLOCK_FP8, Prequantized, fallback_serves, keeps_stored
from heavylift.planner.plan import SchemePlan
from heavylift.planner.training import TrainingPlan
from heavylift.schemes import SCHEMES
from .block_fp8 import partial_blocks_dequantized
from .devices import runtime_device
from .progress import load_progress

CPU, DISK = "cpu", "disk"
# bitsandbytes' LLM.int8 logs this on every matmul whose input is not fp16 (logging, not warnings: no
# warnings filter reaches it): the plan computes in bf16, so the cast is expected and said once per matmul.
INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


@dataclass(frozen=True)
class Placement:
    """Where each top-level module goes: a torch device string ('cuda:0', 'cpu')."""

    modules: Mapping[str, str]
    offloaded: frozenset[str]  # modules the plan itself leaves in CPU RAM (--allow-offload)


def placement_from_plan(arch: Architecture, scheme: SchemePlan | TrainingPlan) -> Placement:
    """One device-map entry per module, so transformers' prefix matching cannot mix up layer 1 and 10: the
    layers where an inference plan's scheme or a training plan puts them (a training plan offloads none)."""
    modules: dict[str, str] = {}
    owner = {}
    for d in scheme.per_device:
        for i in d.layers:
            owner[i] = runtime_device(d.device.index)
    offloaded = set()
    if getattr(scheme, "offload", None):
        for i in scheme.offload.layers:
            owner[i] = CPU
            offloaded.add(f"model.layers.{i}")
    first, last = owner[0], owner[arch.num_layers - 1]
    modules["model.embed_tokens"] = first
    modules["model.rotary_emb"] = first
    modules.update({f"model.layers.{i}": owner[i] for i in range(arch.num_layers)})
    modules["model.norm"] = last
    modules["lm_head"] = first if arch.tie_word_embeddings else last
    return Placement(modules, frozenset(offloaded))


def compute_dtype(devices_bf16: bool) -> torch.dtype:
    return torch.bfloat16 if devices_bf16 else torch.float16


def quantization_config(quant: str, dtype: torch.dtype, native_fp8: bool, cpu_offload: bool = False,
                        pre: Prequantized | None = None) -> Any:
    """The transformers quantization config that stores weights as the plan counted them.

    cpu_offload: the plan leaves layers in CPU RAM (--allow-offload); bitsandbytes then keeps those
    layers unquantized there, which is the only offload transformers allows for it. `pre`: the checkpoint is
    stored quantized (config.json's quantization_config): kept so (block FP8 in fp8) or dequantized (bf16).
    """
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if pre is not None:
        return _stored_config(pre, quant)
    scheme = SCHEMES[quant]
    if not scheme.quantized:
        return None
    if scheme.four_bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.code,
                                  bnb_4bit_use_double_quant=scheme.double_quant, bnb_4bit_compute_dtype=dtype,
                                  llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if scheme.code == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if scheme.code == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

        from .float8_load import RowChunkedFloat8WeightConfig

        # Real FP8 matmuls need compute capability 8.9+; elsewhere the weights are stored in FP8
        # and dequantized on use (same bytes, as the plan counts them). Quantized a block of rows at a time.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if native_fp8 \
            else Float8WeightOnlyConfig()
        return TorchAoConfig(RowChunkedFloat8WeightConfig(config))
    raise ValueError(quant)


def _stored_config(pre: Prequantized, quant: str) -> Any:
    """transformers' config for a pre-quantized checkpoint: block FP8 kept (fp8) or dequantized (bf16), MXFP4
    dequantized; given explicitly, so that what loads never depends on the packages or GPUs found."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if pre.method == BLOCK_FP8:
        return FineGrainedFP8Config(weight_block_size=pre.block, dequantize=not keeps_stored(pre, quant),
                                    modules_to_not_convert=list(pre.skipped) or None)
    return Mxfp4Config(dequantize=True, modules_to_not_convert=list(pre.skipped) or None)


def attention_implementation(arch: Architecture) -> str:
    """FlashAttention 2 when installed on a GPU of compute capability 8.0+, else PyTorch SDPA (eager for
    families SDPA cannot run)."""
    from transformers.utils import is_flash_attn_2_available

    from heavylift.model.families import FAMILIES

    family = FAMILIES[arch.model_type]
    if family.flash and torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8 \
            and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa" if family.sdpa else "eager"


@contextmanager
def _moe_loading(arch: Architecture, quant: str):
    """An MoE checkpoint loads one tensor at a time (transformers' HF_DEACTIVATE_ASYNC_LOAD; a quantized load
    always does), each fused expert tensor quantized as it arrives, and without transformers' allocator
    warm-up: that reserves up front what it expects the weights to take, counting the fused experts at
    bf16 because its quantizers skip them (for Mixtral 8x7B in NF4, 87 GB for a 24 GB model). The load's
    peak is then one layer's experts in bf16 beyond the weights (load_program.expert_load)."""
    if not arch.num_experts:
        yield
        return
    import transformers.modeling_utils as hf_modeling

    from .experts import quantized_on_arrival

    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    warmup = hf_modeling.caching_allocator_warmup
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    hf_modeling.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        with quantized_on_arrival(quant):
            yield
    finally:
        hf_modeling.caching_allocator_warmup = warmup
        if before is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before


@contextmanager
def _stored_loading(arch: Architecture, quant: str, native_fp8: bool):
    """A block-FP8 checkpoint dequantizes weights with partial edge blocks too (DeepSeek-V3's
    kv_a_proj_with_mqa: 576 rows in blocks of 128; block_fp8.partial_blocks_dequantized). Kept as stored (fp8),
    its matmuls are transformers' finegrained-fp8 kernel where that loads, else heavylift's torch ones, which run
    on any device, so transformers keeps the FP8 weights there too (block_fp8_matmul)."""
    pre = arch.prequantized
    if pre is None or pre.method != BLOCK_FP8:
        yield
        return
    with partial_blocks_dequantized(pre.block), _kept_matmuls(pre, quant, native_fp8):
        yield


def _kept_matmuls(pre: Prequantized, quant: str, native_fp8: bool):
    """Where fp8 keeps the block-FP8 weights and transformers is the release heavylift's torch matmuls answer
    (api.prepare refused the rest): the kernel, or those matmuls kept on any device (block_fp8_matmul.install)."""
    import transformers

    from .block_fp8_matmul import install, kept_on_any_device

    if not keeps_stored(pre, quant) or not fallback_serves(transformers.__version__):
        return nullcontext()
    return nullcontext() if install(native_fp8) is None else kept_on_any_device()


def _bnb_loading(arch: Architecture, quant: str):
    """A bitsandbytes precision quantizes each weight onto its GPU a block of rows at a time from CPU RAM
    (bnb_load.py), so that the load leaves no bf16 copy's hole among the weights."""
    scheme = SCHEMES[quant]
    if arch.prequantized is not None or not (scheme.four_bit or scheme.code == "int8"):
        return nullcontext()
    from .bnb_load import row_blocked_bitsandbytes

    return row_blocked_bitsandbytes()


def _language_model(folder: Path, arch: Architecture) -> dict:
    """from_pretrained's arguments that load a multimodal checkpoint's language model alone (families.WRAPPERS):
    its text config, and its tensors' names without the "language_model." prefix (the vision tower's are left)."""
    if not arch.wrapped:
        return {}
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder).get_text_config(decoder=True)
    return {"config": text, "key_mapping": {f"^{WRAPPED_PREFIX.replace('.', '[.]')}": ""}}


def load_model(folder: Path, arch: Architecture, scheme: SchemePlan, placement: Placement, native_fp8: bool,
               bf16: bool, attention: str, label: str):
    """from_pretrained with the plan's quantization and explicit device map, under heavylift's progress bar
    (`label`); the MoE experts quantized as they arrive (experts.quantized_on_arrival), so the load never
    holds more than one fused tensor unquantized."""
    from transformers import AutoModelForCausalLM

    from .experts import quantize_experts

    dtype = torch.float16 if scheme.quant == "fp16" else compute_dtype(bf16)
    # A model wholly in CPU RAM goes as one entry: transformers' torchao integration takes a map with several
    # entries and "cpu" among them for CPU offload, and moves each such layer to a GPU to quantize it.
    device_map = {"": CPU} if set(placement.modules.values()) == {CPU} else dict(placement.modules)
    try:
        with warnings.catch_warnings(), _moe_loading(arch, scheme.quant), \
                _stored_loading(arch, scheme.quant, native_fp8), _bnb_loading(arch, scheme.quant), \
                load_progress(label):
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, device_map=device_map, attn_implementation=attention,
                quantization_config=quantization_config(
                    scheme.quant, dtype, native_fp8, pre=arch.prequantized,
                    cpu_offload=bool(placement.offloaded) and torch.cuda.is_available()),
                output_loading_info=True, **_language_model(folder, arch))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise OutOfMemoryError(f"out of GPU memory loading the weights in {scheme.quant}, which the plan fits: "
                               "another process may hold GPU memory (free it), or lower --context or use a "
                               "smaller --quant") from None
    except (OSError, RuntimeError, ValueError) as e:
        name = type(e).__name__
        if "SafetensorError" in name or "safetensors" in str(e).lower() or "header" in str(e).lower():
            raise CheckpointError(f"a weights file in {folder} is corrupt ({str(e).splitlines()[0][:160]}); "
                                  "delete the shards and download them again") from None
        if "size mismatch" in str(e) or "shape" in str(e):
            raise CheckpointError(f"the weights in {folder} do not match its config.json "
                                  f"({str(e).splitlines()[0][:160]}); download both from the same revision") from None
        raise
    missing = info.get("missing_keys") or []
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensors the model needs (first: {sorted(missing)[0]}); "
                              "finish or repeat the download")
    if arch.num_experts:
        quantize_experts(model, scheme.quant)
    model.eval()
    return model


class _ExpectedInt8Cast(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(INT8_CAST_MESSAGE)


@contextmanager
def expected_int8_casts():
    """Drop bitsandbytes' per-matmul int8 cast message while the body runs transformers' forward."""
    logger, quiet = logging.getLogger(INT8_CAST_LOGGER), _ExpectedInt8Cast()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def module_bytes(model: torch.nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def real_placement(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Where each module's tensors really are, from accelerate's map or from the tensors themselves."""
    hf_map = getattr(model, "hf_device_map", None) or {}
    out = {}
    for name in names:
        if name in hf_map and str(hf_map[name]) in (CPU, DISK):
            out[name] = str(hf_map[name])
            continue
        module = model.get_submodule(name)
        devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
        kinds = {"disk" if d.type == "meta" else str(d) for d in devices}
        out[name] = sorted(kinds)[0] if kinds else CPU
    return out


def guard_offload(planned: Placement, real: Mapping[str, str], sizes: Mapping[str, int],
                  allow_offload: bool) -> dict[str, int]:
    """Bytes per device ('cpu', 'disk') of modules that sit off the GPU the plan gave them.

    Raises OffloadError unless allow_offload. Modules the plan put on the CPU (no GPU here, or
    --allow-offload) are the plan, not an offload, unless the plan itself offloaded them.
    """
    spilled: dict[str, int] = {}
    for name, device in real.items():
        want = planned.modules.get(name, CPU)
        if device in (CPU, DISK) and (want != device or name in planned.offloaded):
            if want == CPU and name not in planned.offloaded:
                continue
            spilled[device] = spilled.get(device, 0) + sizes.get(name, 0)
    if spilled and not allow_offload:
        where = ", ".join(f"{n / 1e9:.2f} GB on {d}" for d, n in spilled.items())
        raise OffloadError(f"the model loaded with {where} instead of the GPUs the plan chose; "
                           "free GPU memory, lower --context, use a smaller --quant, or pass --allow-offload")
    return spilled
