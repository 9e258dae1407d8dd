"""heavylift's one progress bar while weights load, on stderr, and only when stderr is a terminal.

transformers' own "Loading weights" bar is switched off for the load (its logging utils' progress-bar
switch, put back after): heavylift's bar counts the same thing, the model's parameters as they take
their place on their device, quantized (bitsandbytes quantizes each as it is set; torchao and the MoE
experts re-set theirs, which counts once). torch's parameter-registration hook sees each: first on the
meta device as transformers builds the empty model (the total), then on its real device (done).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def _transformers_bars_off() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextmanager
def load_progress(label: str) -> Iterator[None]:
    """Show `label` and a bar of parameters placed while the body loads a model (on a terminal only);
    transformers' own bars stay off either way."""
    with _transformers_bars_off():
        if not sys.stderr.isatty():
            yield
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                   TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            slots: set[tuple[int, str]] = set()
            placed: set[tuple[int, str]] = set()

            def seen(module: torch.nn.Module, name: str, param) -> None:
                if param is None:
                    return
                key = (id(module), name)
                if param.device.type == "meta":
                    slots.add(key)
                    bar.update(task, total=len(slots))
                elif key not in placed:
                    placed.add(key)
                    bar.update(task, completed=len(placed))

            handle = torch.nn.modules.module.register_module_parameter_registration_hook(seen)
            try:
                yield
            finally:
                handle.remove()
