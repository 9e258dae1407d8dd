"""A fine-tune's folder (--out): checkpoints written whole or not at all, the newest found for --resume, and
the final adapter beside them.

    OUT/checkpoint-N/   adapter_config.json, adapter_model.safetensors (peft's save_pretrained),
                        training_state.pt (optimizer, scheduler, RNG), trainer_state.json (step, data
                        position, settings, data hashes, the loss log)
    OUT/                the final adapter's files and trainer_state.json, when the run ends

A checkpoint is written into a hidden temporary folder and renamed into place, so an interrupted write leaves
the previous checkpoint as it was; only the newest CHECKPOINTS_KEPT stay.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from heavylift.defaults import CHECKPOINTS_KEPT
from heavylift.errors import AdapterError, InvalidArgumentError
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
STATE_FORMAT = 1  # trainer_state.json's layout


@dataclass(frozen=True)
class State:
    """trainer_state.json: where a run stands and how it was set up."""

    step: int  # optimizer steps done
    micro_batches: int  # micro-batches consumed: the position in the data's seeded order
    total_steps: int
    base_model: str
    settings: Mapping[str, Any]
    data: Mapping[str, str | None]  # sha256 of the training and held-out files (None: no --eval-data)
    log: tuple[Mapping[str, Any], ...]  # {"step", "loss", "lr", "tokens"} and {"step", "eval_loss"}

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step, "micro_batches": self.micro_batches,
                "total_steps": self.total_steps, "base_model": self.base_model, "settings": dict(self.settings),
                "data": dict(self.data), "log": list(self.log)}


def step_of(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints_in(out: Path) -> list[Path]:
    """The whole checkpoints in `out`, oldest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def find_checkpoint(path: Path) -> Path:
    """--resume PATH: a checkpoint folder, or a fine-tune's --out (its newest checkpoint)."""
    if (path / STATE_FILE).is_file() and (path / TRAINING_STATE).is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise AdapterError(f"--resume {path} holds no checkpoint; give a fine-tune's --out folder or one of its "
                           f"{CHECKPOINT_PREFIX}N folders")
    return found[-1]


def read_state(folder: Path) -> State:
    path = folder / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return State(raw["step"], raw["micro_batches"], raw["total_steps"], raw["base_model"], raw["settings"],
                     raw["data"], tuple(raw["log"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise AdapterError(f"{path} is missing or malformed; resume from another checkpoint") from None


def write_state(folder: Path, state: State) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1) + "\n")


def save_checkpoint(out: Path, step: int, write: Callable[[Path], None]) -> Path:
    """`write` fills a temporary folder, which then replaces OUT/checkpoint-STEP in one rename; the oldest
    checkpoints beyond CHECKPOINTS_KEPT go, and so does what an earlier write cut short left."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    for left in out.glob(f".{CHECKPOINT_PREFIX}*.partial-*"):  # what a write cut short left behind
        shutil.rmtree(left, ignore_errors=True)
    temporary = out / f".{final.name}.partial-{os.getpid()}"
    temporary.mkdir()
    write(temporary)
    if final.exists():  # the same step saved again by a resumed run
        stale = out / f".{final.name}.stale-{os.getpid()}"
        final.rename(stale)
        temporary.rename(final)
        shutil.rmtree(stale)
    else:
        temporary.rename(final)
    for old in checkpoints_in(out)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old)
    return final


FINAL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_FILE)


def publish_final(checkpoint: Path, out: Path) -> None:
    """The final checkpoint's adapter and state, copied beside the checkpoints: OUT is then itself an adapter
    folder for `--adapter OUT`. Each file is copied under a temporary name and renamed over the old one."""
    for name in FINAL_FILES:
        temporary = out / f".{name}.partial-{os.getpid()}"
        shutil.copyfile(checkpoint / name, temporary)
        os.replace(temporary, out / name)


def check_out(out: Path, model_folder: Path | None, resuming: bool, flag: str = "--out") -> None:
    """Refuse an --out inside the model's folder (nothing is written there), one that is a file, and one that
    already holds a fine-tune unless this run resumes."""
    if model_folder is not None:
        model, target = model_folder.resolve(), out.resolve()
        if target == model or model in target.parents:
            raise InvalidArgumentError(f"{flag} {out} is inside the model folder {model_folder}; write elsewhere "
                                       "(heavylift leaves the model folder as it is)")
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{flag} {out} is a file; give a folder")
    if resuming:
        return
    held = checkpoints_in(out)
    if held or (out / ADAPTER_CONFIG).is_file():
        what = held[-1].name if held else ADAPTER_CONFIG
        raise InvalidArgumentError(f"{flag} {out} already holds a fine-tune ({what}); continue it with --resume {out}, "
                                   f"or pick a new {flag}")
