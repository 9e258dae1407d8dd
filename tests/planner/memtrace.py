"""Record what torch code allocates and frees, in order, on the CPU: the truth the planner's programs answer to.

`Trace` is a TorchDispatchMode: every storage an op creates is an allocation (its size rounded to the
caching allocator's 512-byte blocks), and its death, seen through a weakref on the storage, a free.
0-dim tensors (scalars, 512 bytes each) are left out, as the programs leave them out. Views and
in-place ops allocate nothing. Scaled-dot-product attention is replaced by what its CUDA kernels
allocate (forward_program.py `_sdpa`): with a mask, a bool mask converted to the query's dtype, a copy padded
to 16 keys (or made contiguous where its rows are not 16-aligned) and the output; without one, or with a
causal_lower_right bias (which a GPU hands to flash attention with no mask, where the CPU would build one),
flash attention's output and its fp32 log-sum-exp. Indexing by int32 tensors (aten.index) adds the int64 copies of
them that its make_info takes inside the op, on the CPU as on a GPU, before the output and freed after it.
bitsandbytes' LLM.int8 ops, whose kernels this mode sees only whole and whose CUDA kernels allocate otherwise than
the CPU ones, are traced as their CUDA kernels allocate (BNB_CUDA_ALLOCATIONS).
"""

from __future__ import annotations

import weakref

import bitsandbytes  # noqa: F401 - registers the ops of BNB_CUDA_ALLOCATIONS
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from heavylift.planner.allocator import block_size

SDPA = torch.ops.aten.scaled_dot_product_attention.default
INDEX = torch.ops.aten.index.Tensor
# Composite ops that inference mode hands to the mode whole, hiding temporaries they allocate on the GPU as
# on the CPU: softmax(x, dtype=float32) on bf16 converts x to a fp32 copy first (only fp16 on CUDA has a
# fused kernel; aten SoftMax.cpp), and matmul copies a batched operand that bmm cannot view (Gemma 2's
# query at batch > 1). Attention's 4-d matmuls only: the others' copies are the size of a few positions.
DECOMPOSED = {
    torch.ops.aten.softmax.int: lambda x, dim, dtype=None: dtype is not None and dtype != x.dtype,
    torch.ops.aten.matmul.default: lambda a, b: a.dim() == 4 and b.dim() == 4,
}


def _int8_vectorwise_quant(outs, a, threshold=0.0):
    """bitsandbytes 0.50 backends/cuda/ops.py: the row scales and int8 rows, then, past a threshold, |A| in fp16
    and the map of entries past it, the columns holding any and their int64 indices (where there are some)."""
    rows, k = a.numel() // a.shape[-1], a.shape[-1]
    steps = [("row_stats", 4 * rows, 1), ("out_row", rows * k, 0)]
    if threshold > 0.0:
        steps += [("abs", 2 * rows * k), ("outliers", rows * k), "abs"]
        if outs[2].numel():
            steps += [("any", k), ("outlier_cols", 8 * outs[2].numel(), 2), "any"]
        steps.append("outliers")
    return steps


def _int8_mm_dequant(outs, a, row_stats, col_stats, dtype=None, bias=None):
    """backends/cuda/ops.py: an fp16 output (the kernel writes fp16 only), cast to `dtype` where it differs."""
    fp16 = 2 * a.numel()
    if (dtype or torch.float16) == torch.float16:
        return [("out", fp16, 0)]
    return [("fp16", fp16), ("out", outs[0].untyped_storage().nbytes(), 0), "fp16"]


def _int8_vectorwise_dequant(outs, a, stats):
    """_ops.py's default kernel, on every device: A * stats in fp32, then times 1/127."""
    return [("scaled", 4 * a.numel()), ("out", 4 * a.numel(), 0), "scaled"]


# What these ops allocate on a GPU, in order: (name, bytes) an allocation, (name, bytes, i) one that is the op's
# i-th output (freed when it dies), a name alone the free of that allocation.
BNB_CUDA_ALLOCATIONS = {
    torch.ops.bitsandbytes.int8_vectorwise_quant.default: _int8_vectorwise_quant,
    torch.ops.bitsandbytes.int8_mm_dequant.default: _int8_mm_dequant,
    torch.ops.bitsandbytes.int8_vectorwise_dequant.default: _int8_vectorwise_dequant,
}


class _CausalBiasAsFlash(TorchFunctionMode):
    """SDPA with a CausalBias (a function-level override, which the dispatch mode never sees) as flash attention."""

    def __init__(self, trace: "Trace"):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and isinstance(kwargs.get("attn_mask"), CausalBias):
            return self.trace.flash(args[0], args[2])
        return func(*args, **kwargs)


class Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []  # ("alloc", key, bytes, label) / ("free", key)
        self._next = 0
        self._functions = _CausalBiasAsFlash(self)
        self._depth = 0  # __torch_dispatch__ re-enters the mode around decompositions; the function mode once

    def __enter__(self):
        if not self._depth:
            self._functions.__enter__()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if not self._depth:
                self._functions.__exit__(*exc)

    def flash(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Flash attention's output [batch, heads, length, value channels], laid out heads-inner, and its fp32
        log-sum-exp, freed as the op returns (the values are left unset: the trace counts bytes)."""
        b, h, length = q.shape[:3]
        out = torch.empty(b, length, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        self._track(out, "sdpa out")
        self._free(self._alloc(4 * b * h * length, "flash lse"))
        return out

    def _alloc(self, nbytes: int, label: str) -> int:
        key = self._next
        self._next += 1
        self.events.append(("alloc", key, block_size(nbytes), label))
        return key

    def _free(self, key: int) -> None:
        self.events.append(("free", key))

    @staticmethod
    def _mark(t: torch.Tensor) -> bool:
        """Mark a tensor's storage seen; True if it was new."""
        s = t.untyped_storage()
        if getattr(s, "_heavylift_seen", False):
            return False
        s._heavylift_seen = True
        return True

    def _track(self, t: torch.Tensor, label: str) -> None:
        if self._mark(t) and t.dim() > 0 and t.untyped_storage().nbytes():
            key = self._alloc(t.untyped_storage().nbytes(), label)
            weakref.finalize(t.untyped_storage(), self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._mark(t)  # inputs are not allocations of this op
        if func is SDPA:
            return self._sdpa(*args, **kwargs)
        if func in BNB_CUDA_ALLOCATIONS:
            return self._as_on_cuda(func, args, kwargs)
        if func in DECOMPOSED and DECOMPOSED[func](*args, **kwargs):
            with self:  # its composite kernel, back under this mode: each op it runs is traced
                return func.decompose(*args, **kwargs)
        # Indexing by int32 tensors: make_info copies each to int64 inside the op, before its output.
        wide = [self._alloc(8 * i.numel(), "index int64") for i in (args[1] if func is INDEX else ())
                if isinstance(i, torch.Tensor) and i.dtype == torch.int32]
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, f"{func} {tuple(t.shape)} {t.dtype}")
        for key in wide:
            self._free(key)
        return out

    def _as_on_cuda(self, func, args, kwargs):
        """Run a BNB_CUDA_ALLOCATIONS op, tracing what its CUDA kernel allocates and frees; its outputs are the
        allocations bound to them."""
        out = func(*args, **kwargs)
        outs = list(out) if isinstance(out, tuple) else [out]
        keys: dict[str, int] = {}
        for step in BNB_CUDA_ALLOCATIONS[func](outs, *args, **kwargs):
            if isinstance(step, str):
                self._free(keys.pop(step))
                continue
            name, nbytes, *output = step
            key = self._alloc(nbytes, f"{func} {name}")
            if not output:
                keys[name] = key
                continue
            storage = outs[output[0]].untyped_storage()
            self._mark(outs[output[0]])
            weakref.finalize(storage, self._free, key)
        return out

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        b, h, length = q.shape[:3]
        d = v.shape[-1]  # the output has the values' channels (DeepSeek's latent attention: fewer than q's)
        if attn_mask is None:
            return self.flash(q, v)
        # convert_boolean_attn_mask: a bool mask becomes an additive one of the query's dtype; preprocess_mask
        # then pads a copy to 16 keys, or copies a mask whose rows do not start 16 elements apart.
        where = self._alloc(attn_mask.numel() * q.element_size(), "sdpa mask") if attn_mask.dtype == torch.bool \
            else None
        kv = attn_mask.shape[-1]
        aligned = where is not None or all(stride % 16 == 0 for stride in attn_mask.stride()[:-1])
        pad = self._alloc(attn_mask.numel() // kv * -(-kv // 16) * 16 * q.element_size(), "pad") if kv % 16 else \
            None if aligned else self._alloc(attn_mask.numel() * q.element_size(), "contiguous mask")
        out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        self._track(out, "sdpa out")
        for key in (pad, where):
            if key is not None:
                self._free(key)
        return out


def canonical(events) -> list[tuple]:
    """Events as ("alloc", bytes) and ("free", which allocation by order), names and labels dropped."""
    order: dict = {}
    out = []
    for e in events:
        if e[0] == "alloc":
            order[e[1]] = len(order)
            out.append(("alloc", block_size(e[2])))
        elif e[0] == "free" and e[1] in order:
            out.append(("free", order[e[1]]))
        elif e[0] == "empty":
            continue
    return out


def first_difference(a: list, b: list, labels: list | None = None, context: int = 6) -> str:
    """Where two canonical sequences part, with a few events around it, for a readable failure."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            lo = max(0, i - context)
            return f"event {i}: planned {a[lo:i + context]} vs traced {b[lo:i + context]}"
    return f"lengths {len(a)} vs {len(b)}; tails planned {a[len(b):][:context]} traced {b[len(a):][:context]}"
