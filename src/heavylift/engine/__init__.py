"""The fast engine: Triton kernels over the loaded weights, a static KV cache, CUDA-graph decode."""

from heavylift.planner.memory import FAST, TRANSFORMERS  # the --engine values beside auto, as plans name the runtimes
from heavylift.planner.runtimes import AUTO, CHOICES as ENGINES, check_choice as check_engine
from .model import Engine, device_reason, model_reason, unsupported_reason

__all__ = ["AUTO", "ENGINES", "Engine", "FAST", "TRANSFORMERS", "check_engine", "device_reason", "model_reason",
           "unsupported_reason"]
