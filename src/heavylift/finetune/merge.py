"""`heavylift merge`: a LoRA adapter folded into its base's weights, saved as an ordinary bf16 transformers
folder (weights, config, tokenizer) that any tool loads without peft.

The base loads unquantized (an adapter trained over NF4 is merged into the bf16 weights the NF4 ones were
made from: QLoRA's own practice), planned for this machine like `heavylift run --quant bf16`, with layers
the GPUs cannot hold left in CPU RAM; the merged folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from heavylift.errors import InvalidArgumentError
from heavylift.model.source import resolve_model
from heavylift.planner.memory import TRANSFORMERS
from .adapter import check_adapter
from .checkpoints import check_out

MERGE_QUANT = "bf16"
MERGE_CONTEXT_TOKENS = 1  # merging runs no forward: the plan holds the weights and next to no KV cache


def check_merge_out(out: Path, model_folder: Path | None) -> None:
    check_out(out, model_folder, resuming=True)
    if out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"--out {out} is not empty; give a new folder for the merged model")


def merge(model: str, adapter: Path, out: Path, gpus: str | None = None) -> Path:
    """Fold `adapter` into `model`'s bf16 weights and save model, config and tokenizer into `out`."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from heavylift.api import prepare
    from heavylift.runtime.progress import transformers_bars_off

    source = resolve_model(model)
    check_adapter(adapter, source.architecture, model)
    check_merge_out(out, source.folder)
    prepared = prepare(model, quant=MERGE_QUANT, gpus=gpus, context=MERGE_CONTEXT_TOKENS, allow_offload=True,
                       engine=TRANSFORMERS, source=source)
    tokenizer = AutoTokenizer.from_pretrained(prepared.folder)  # as the model ships it, without run's pad token
    base = prepared.load_weights().model
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    temporary = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    with transformers_bars_off():
        merged.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    if out.exists():  # empty, as checked
        out.rmdir()
    temporary.rename(out)
    return out
