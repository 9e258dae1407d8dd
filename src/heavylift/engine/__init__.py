"""The fast engine: Triton kernels over the loaded weights, a static KV cache, CUDA-graph decode."""

from .model import Engine, unsupported_reason

AUTO, FAST, TRANSFORMERS = "auto", "fast", "transformers"
ENGINES = (AUTO, FAST, TRANSFORMERS)  # --engine choices: auto = fast where it runs, else transformers

__all__ = ["AUTO", "ENGINES", "Engine", "FAST", "TRANSFORMERS", "unsupported_reason"]
