"""The fast engine: Triton kernels over the loaded weights, a static KV cache, CUDA-graph decode."""

from .model import Engine, device_reason, model_reason, unsupported_reason

AUTO, FAST, TRANSFORMERS = "auto", "fast", "transformers"
ENGINES = (AUTO, FAST, TRANSFORMERS)  # --engine choices: auto = fast where it runs, else transformers


def check_engine(name: str) -> None:
    """Refuse an --engine value that is not one of ENGINES, before anything loads."""
    from ..errors import InvalidArgumentError

    if name not in ENGINES:
        raise InvalidArgumentError(f"--engine must be one of {', '.join(ENGINES)}, not {name!r}")

__all__ = ["AUTO", "ENGINES", "Engine", "FAST", "TRANSFORMERS", "check_engine", "device_reason", "model_reason",
           "unsupported_reason"]
