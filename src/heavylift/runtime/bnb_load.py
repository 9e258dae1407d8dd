"""bitsandbytes quantization on load, a block of rows at a time, from the weight in CPU RAM.

transformers' bitsandbytes integration copies each linear weight whole to its GPU in bf16 and quantizes it
there (Params4bit._quantize, Int8Params._quantize): for Llama-3.1-405B's 53248 x 16384 MLP weights a 1.7 GB
bf16 copy (LLM.int8 adds a 1.7 GB fp16 one) beside the quantized result. The copies are freed, but they
leave holes among the weights in the allocator's warm-up segment that no later phase can give back: 2 GB
per device in NF4, 7 GB in LLM.int8 (docs/planner.md). Here a weight to quantize stays in CPU RAM as it is
read from the checkpoint; its quantized storage is allocated on the GPU whole, and each block of rows goes to
the GPU and through bitsandbytes' own kernel into its place. Every code, absmax and row scale is the one the
whole-tensor call gives: 4-bit quantization works on blocks of 64 consecutive elements of the flattened weight
and a block of rows holds a multiple of 64 of them (double quantization then runs once over the whole absmax
vector, as quantize_4bit does); LLM.int8 scales each row by itself. tests/runtime/test_bnb_load.py holds them
equal.
"""

from __future__ import annotations

from contextlib import contextmanager
from math import gcd

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import transformers.core_model_loading as hf_loading
from transformers.integrations.bitsandbytes import Bnb4bitQuantize, Bnb8bitQuantize
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from heavylift.hardware.gpus import KIND_CPU as CPU
from heavylift.planner.load_program import BNB_4BIT_BLOCKSIZE, load_row_step
from heavylift.schemes import BNB_NESTED_BLOCKSIZE


def quantize_4bit_rows(weight: torch.Tensor, device: torch.device | str, quant_type: str, double_quant: bool,
                       quant_storage: torch.dtype = torch.uint8, blocksize: int = BNB_4BIT_BLOCKSIZE):
    """bitsandbytes' quantize_4bit of `weight` [rows, k] onto `device`, a block of rows at a time: (packed
    nibbles [numel / 2, 1], QuantState), the same as quantize_4bit(weight.to(device), ...) gives. What stays is
    allocated before anything that goes: the absmax and the packed storage; under double quantization the packed
    storage, the 8-bit absmax and its scales, and only then the fp32 absmax. The temporaries are freed on top
    of what stays, so they leave no hole among the weights (in transformers' warm-up segment a freed fp32 absmax
    below the packed storage was one that no later tensor filled: about 2 MB for each 405B layer)."""
    rows, k = weight.shape
    n = weight.numel()
    blocks = -(-n // blocksize)
    per_element = quant_storage.itemsize * 2  # 4-bit codes per storage element
    if not double_quant:  # the absmax stays: first, as bitsandbytes' kernel allocates it
        absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    packed = torch.empty(((n + 1) // per_element, 1), dtype=quant_storage, device=device)
    if double_quant:
        qabsmax = torch.empty(blocks, dtype=torch.uint8, device=device)
        absmax2 = torch.empty(-(-blocks // BNB_NESTED_BLOCKSIZE), dtype=torch.float32, device=device)
        absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    step = load_row_step(rows, k, blocksize // gcd(k, blocksize))
    for start in range(0, rows, step):
        piece = weight[start:start + step].contiguous().to(device)
        out, amax = torch.ops.bitsandbytes.quantize_4bit.default(piece, blocksize, quant_type, quant_storage)
        first = start * k
        packed[first // per_element:first // per_element + out.shape[0]].copy_(out)
        absmax[first // blocksize:first // blocksize + amax.numel()].copy_(amax)
        del piece, out, amax  # gone before the next block arrives
    code = bnbf.get_4bit_type(quant_type, device=device)
    if not double_quant:
        return packed, bnbf.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                       code=code, quant_type=quant_type)
    # functional.quantize_4bit's nested quantization over the whole absmax, shifted in place (the same values as
    # its `absmax - offset`) and quantized into the tensors allocated above.
    offset = absmax.mean()
    _, state2 = bnbf.quantize_blockwise(absmax.sub_(offset), blocksize=BNB_NESTED_BLOCKSIZE, out=qabsmax,
                                        absmax=absmax2)
    del absmax
    return packed, bnbf.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                   code=code, quant_type=quant_type, offset=offset, state2=state2)


def quantize_int8_rows(weight: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8Params._quantize of `weight` [rows, k] onto `device`, a block of rows at a time: (int8 rows CB,
    fp32 row absmax SCB), as int8_vectorwise_quant gives them from the whole weight in fp16."""
    rows, k = weight.shape
    cb = torch.empty(rows, k, dtype=torch.int8, device=device)
    scb = torch.empty(rows, dtype=torch.float32, device=device)
    step = load_row_step(rows, k, 1)
    for start in range(0, rows, step):
        piece = weight[start:start + step].contiguous().to(device=device, dtype=torch.float16)
        q, s, _ = bnbf.int8_vectorwise_quant(piece)
        cb[start:start + step].copy_(q)
        scb[start:start + step].copy_(s)
        del piece, q, s
    return cb, scb


class _OnDevices:
    """A bitsandbytes converter that quantizes each weight onto the device `devices` names for it (its own device
    where none is named)."""

    def __init__(self, hf_quantizer, devices: dict):
        super().__init__(hf_quantizer)
        self.devices = devices

    def _weights(self, input_dict):
        """(name, the checkpoint tensor, the device it goes to) for each weight converted."""
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            yield name, value, self.devices.pop(name, value.device)


class RowBlock4bitQuantize(_OnDevices, Bnb4bitQuantize):
    """transformers' Bnb4bitQuantize, the weight quantized onto its device by quantize_4bit_rows."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for name, value, device in self._weights(input_dict):
            module, _ = get_module_from_name(model, name)
            kept = dict(model.get_parameter_or_buffer(name).__dict__)
            packed, state = quantize_4bit_rows(value, device, kept["quant_type"], kept["compress_statistics"],
                                               kept["quant_storage"], kept["blocksize"])
            kept.update(quant_state=state, bnb_quantized=True)
            result[name] = bnb.nn.Params4bit(packed, requires_grad=False, **kept)
            module.quant_state = state  # as Params4bit._quantize sets it
            module._is_hf_initialized = True
        return result


class RowBlock8bitQuantize(_OnDevices, Bnb8bitQuantize):
    """transformers' Bnb8bitQuantize, the weight quantized onto its device by quantize_int8_rows."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        result = {}
        for name, value, device in self._weights(input_dict):
            kept = dict(model.get_parameter_or_buffer(name).__dict__)
            kept.pop("SCB", None)
            kept.pop("CB", None)
            cb, scb = quantize_int8_rows(value, device)
            result[name] = bnb.nn.Int8Params(cb, requires_grad=False, CB=cb, SCB=scb, **kept)
        return result


@contextmanager
def row_blocked_bitsandbytes():
    """While from_pretrained runs: each weight bitsandbytes quantizes on load is read into CPU RAM instead of
    its GPU (transformers asks the quantizer whether a parameter needs quantizing just before it picks the
    device to read it to), and quantized onto that GPU by the row-block ops above."""
    devices: dict[str, object] = {}  # parameter -> the device the device map gives it
    pending: set[str] = set()
    saved = [(cls, attr, cls.__dict__[attr]) for cls in (Bnb4BitHfQuantizer, Bnb8BitHfQuantizer)
             for attr in ("param_needs_quantization", "get_quantize_ops")]
    get_device = hf_loading.get_device

    def needs(original):
        def wrapped(self, model, param_name, **kwargs):
            yes = original(self, model, param_name, **kwargs)
            if yes:
                pending.add(param_name)
            return yes
        return wrapped

    def staged_device(device_map, param_name, valid_torch_device=False):
        device = get_device(device_map, param_name, valid_torch_device=valid_torch_device)
        if valid_torch_device and param_name in pending:
            pending.discard(param_name)
            devices[param_name] = device
            return CPU
        return device

    Bnb4BitHfQuantizer.param_needs_quantization = needs(Bnb4BitHfQuantizer.param_needs_quantization)
    Bnb8BitHfQuantizer.param_needs_quantization = needs(Bnb8BitHfQuantizer.param_needs_quantization)
    Bnb4BitHfQuantizer.get_quantize_ops = lambda self: RowBlock4bitQuantize(self, devices)
    Bnb8BitHfQuantizer.get_quantize_ops = lambda self: RowBlock8bitQuantize(self, devices)
    hf_loading.get_device = staged_device
    try:
        yield
    finally:
        hf_loading.get_device = get_device
        for cls, attr, original in saved:
            setattr(cls, attr, original)
