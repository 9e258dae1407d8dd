"""The bundled offline catalog: config.json values of well-known models, found by name.

Each `data/models/<alias>.json` is the model's Hugging Face config.json, key for key, plus one
`_heavylift` object with the hub id, the short names it answers to and its exact parameter
count (tests/model/test_catalog.py builds every entry on the meta device to check that count).
No weights and no tokenizer live here; the planner needs nothing but the config.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from heavylift.errors import ModelNotFoundError

__all__ = ["CatalogEntry", "catalog_entries", "closest_models", "find_model", "require_model"]

METADATA_KEY = "_heavylift"  # the one key of a catalog file that config.json does not have
_DATA_DIR = ("data", "models")  # below the heavylift package
SUGGESTION_CUTOFF = 0.6  # difflib similarity (0..1) a name needs to be offered as "did you mean"


@dataclass(frozen=True)
class CatalogEntry:
    """One bundled model: who it is, what it is called, how big it is, and its config.json."""

    hub_id: str  # "meta-llama/Llama-3.1-8B"
    aliases: tuple[str, ...]  # short names, the first one is the file name
    params: int  # exact parameter count, tied embeddings counted once
    config: Mapping[str, Any]  # config.json without METADATA_KEY; read-only all the way down

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling find_model accepts (compared case-insensitively)."""
        return (self.hub_id, *self.aliases, self.hub_id.rsplit("/", 1)[-1])

    def config_dict(self) -> dict[str, Any]:
        """A fresh, mutable copy of the config with plain dicts and lists (for AutoConfig)."""
        return json.loads(json.dumps(self.config, default=_thaw))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _entry_from_json(file_name: str, text: str) -> CatalogEntry:
    document = json.loads(text)
    meta = document.pop(METADATA_KEY, None)
    if not isinstance(meta, dict) or not {"hub_id", "aliases", "params"} <= meta.keys():
        raise ValueError(f"catalog file {file_name}: {METADATA_KEY} needs hub_id, aliases, params")
    return CatalogEntry(
        hub_id=meta["hub_id"],
        aliases=tuple(meta["aliases"]),
        params=int(meta["params"]),
        config=_freeze(document),
    )


@functools.cache
def catalog_entries() -> tuple[CatalogEntry, ...]:
    """Every bundled model, read once from heavylift/data/models/*.json, in file-name order."""
    folder = resources.files("heavylift")
    for part in _DATA_DIR:  # one part at a time: a namespace package's path takes no more
        folder = folder / part
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return tuple(_entry_from_json(f.name, f.read_text(encoding="utf-8")) for f in files)


@functools.cache
def _index() -> dict[str, CatalogEntry]:
    index: dict[str, CatalogEntry] = {}
    for entry in catalog_entries():
        for name in entry.names:
            other = index.setdefault(name.lower(), entry)
            if other is not entry:
                claimants = f"{other.hub_id} and {entry.hub_id}"
                raise ValueError(f"catalog name {name!r} is claimed by {claimants}")
    return index


def find_model(name: str) -> CatalogEntry | None:
    """The entry whose hub id, alias or hub-id last part is `name` (any case), else None."""
    return _index().get(name.strip().lower())


def closest_models(name: str, n: int = 3) -> list[str]:
    """Up to `n` models whose alias or hub id looks like `name`, best first, one name each."""
    spelled: dict[str, tuple[str, CatalogEntry]] = {}  # lower-case candidate -> (shown, entry)
    for entry in catalog_entries():
        for candidate in (*entry.aliases, entry.hub_id):
            spelled.setdefault(candidate.lower(), (candidate, entry))
    wanted = name.strip().lower()
    ranked = difflib.get_close_matches(wanted, spelled, n=len(spelled), cutoff=SUGGESTION_CUTOFF)
    suggestions: dict[str, str] = {}  # hub id -> its best-matching spelling, in rank order
    for match in ranked:
        shown, entry = spelled[match]
        suggestions.setdefault(entry.hub_id, shown)
    return list(suggestions.values())[:n]


def require_model(name: str) -> CatalogEntry:
    """Like find_model, but an unknown name raises ModelNotFoundError naming the near misses."""
    entry = find_model(name)
    if entry is not None:
        return entry
    suggestions = closest_models(name)
    if suggestions:
        hint = f"did you mean {', '.join(suggestions)}?"
    else:
        hint = "bundled models: " + ", ".join(e.aliases[0] for e in catalog_entries()) + "."
    raise ModelNotFoundError(f"{name!r} is not in heavylift's bundled catalog; {hint}")
