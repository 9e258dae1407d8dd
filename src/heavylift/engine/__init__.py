"""The fast engine: Triton kernels over the loaded weights, a static KV cache, CUDA-graph decode."""

from .model import Engine, device_reason, model_reason, unsupported_reason

__all__ = ["Engine", "device_reason", "model_reason", "unsupported_reason"]
