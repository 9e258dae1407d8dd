"""Third-party chatter on stderr, switched off for the CLI unless `heavylift -v`.

Each message is silenced on the channel that emits it, before its library is imported; nothing
redirects stderr, so heavylift's own lines and real errors still show. Where each comes from
(torch 2.13, torchao 0.18, bitsandbytes 0.50, transformers 5.24):

- torchao's "Failed to load .../_C_mxfp8...so" lines: logging, logger "torchao", at import.
- PyTorch's "W... torch/utils/_pytree.py ... register_constant() on Enum subclasses is deprecated":
  logging, logger "torch.utils._pytree" (printed by torch's own handler), when torchao registers enums.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (at import) and
  "MatMul8bitLt: inputs will be cast ..." (every int8 matmul): logging, loggers under "bitsandbytes".
- transformers' own warnings: its logger, whose level transformers sets from TRANSFORMERS_VERBOSITY
  when first imported (a level set on the logger beforehand is overwritten).
- PyTorch's C++ log lines (glog-style, from libtorch): TORCH_CPP_LOG_LEVEL, read when libtorch loads.
- Python warnings raised inside these libraries: a warnings filter on their modules.
- transformers' "Loading weights" bar: runtime/progress.py replaces it with heavylift's own for each load.

Environment variables a user set keep their value: they are only filled in where absent.
"""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose warnings are routine on a working install; errors still pass.
QUIET_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")
# Read by the libraries themselves when they are imported or loaded.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# Python warnings attributed to modules of these packages.
QUIET_WARNING_MODULES = r"(torch|torchao|bitsandbytes|transformers|accelerate|triton)(\.|$)"

def third_party(verbose: bool) -> None:
    """Silence the libraries' routine warnings and bars, unless `verbose`. The CLI calls this once, before
    any command runs, so every command (and everything it imports) inherits it."""
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
