"""The user's mistakes, each a class whose message says what to do.

The CLI prints `str(error)` on one line and exits with EXIT_USER_ERROR; Python users catch
`HeavyliftError`. Anything else that escapes is a heavylift bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class HeavyliftError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ModelNotFoundError(HeavyliftError):
    """No local folder, catalog entry or hub repository goes by that name."""


class ConfigError(HeavyliftError):
    """config.json is missing, malformed, truncated or lacks a needed field."""


class UnsupportedArchitectureError(HeavyliftError):
    """The model_type is not one heavylift plans or loads."""


class GpuSpecError(HeavyliftError):
    """A --gpus description or --reserve size that cannot be parsed."""


class InventoryMismatchError(HeavyliftError):
    """The safetensors headers and config.json describe different tensors."""


class CheckpointError(HeavyliftError):
    """A weights file is missing, truncated or corrupt, or a tokenizer is missing."""


class PlanDoesNotFitError(HeavyliftError):
    """The chosen precision does not fit the devices; the message carries the plan's advice."""


class OffloadError(HeavyliftError):
    """Modules landed on CPU or disk although the plan kept them on GPUs."""


class OutOfMemoryError(HeavyliftError):
    """The device ran out of memory while generating; the message names the knob to turn."""


class InvalidArgumentError(HeavyliftError):
    """A value outside its range: context, batch, sampling settings, prompt length."""


class DataError(HeavyliftError):
    """A training data file that is missing, empty or malformed; the message names the line."""


class AdapterError(HeavyliftError):
    """A LoRA adapter or checkpoint folder that is missing, malformed, or made for another base model."""
