"""heavylift's one progress bar while weights load, on stderr, and only when stderr is a terminal.

transformers' own "Loading weights" bar is switched off for the load (its logging utils' progress-bar
switch, put back after): heavylift's bar counts the same thing, the model's parameters as they take
their place on their device, quantized (bitsandbytes quantizes each as it is set, torchao and the MoE
experts just after).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def transformers_bars_off() -> Iterator[None]:
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
    with transformers_bars_off():
        if not sys.stderr.isatty():
            yield
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                   TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            with _counting(lambda slots, placed: bar.update(task, total=slots, completed=placed)):
                yield


@contextmanager
def _counting(report) -> Iterator[None]:
    """Call report(parameters the model has, parameters placed on a real device) as they change, from torch's
    registration hooks: each parameter of a module is registered on the meta device as transformers builds
    the empty model, then again on its real device as it loads. A module a quantizer replaces (set_submodule)
    takes its parameters out of the count; one re-set in place (quantized on arrival) counts once."""
    slots: set[tuple[int, str]] = set()
    placed: set[tuple[int, str]] = set()

    def parameter(module: torch.nn.Module, name: str, param) -> None:
        if param is None:
            return
        slots.add((id(module), name))
        if param.device.type != "meta":
            placed.add((id(module), name))
        report(len(slots), len(placed))

    def submodule(parent: torch.nn.Module, name: str, child) -> None:
        old = getattr(parent, name, None)
        if isinstance(old, torch.nn.Module) and old is not child:
            gone = {id(m) for m in old.modules()}
            slots.difference_update({k for k in slots if k[0] in gone})
            placed.difference_update({k for k in placed if k[0] in gone})

    hooks = (torch.nn.modules.module.register_module_parameter_registration_hook(parameter),
             torch.nn.modules.module.register_module_module_registration_hook(submodule))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
