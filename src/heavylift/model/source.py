"""Find a model by what the user typed: a local folder, a catalog name, or a hub id.

Only config.json and safetensors headers are read; weights are never downloaded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .architecture import CONFIG_FILE, Architecture, architecture_from_config
from .catalog import closest_models, find_model
from heavylift.errors import ConfigError, HeavyliftError, ModelNotFoundError
from .checkpoint import Checkpoint, check_against, from_hub_metadata, read_checkpoint

# Seconds before a hub request is given up. The hub answers a HEAD request in well under a second; one that
# keeps quiet this long is unreachable for planning, which reads a few kilobytes.
HUB_TIMEOUT_S = 5


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user typed it
    origin: str  # "local", "hub" or "catalog"
    config: Mapping[str, Any]
    architecture: Architecture
    folder: Path | None  # a folder holding config.json (and maybe weights): local, or the hub cache
    checkpoint: Checkpoint | None  # tensors from safetensors headers, when there are any
    hub_id: str | None = None


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not text; download config.json again") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is malformed or truncated (line {e.lineno}, column {e.colno}: {e.msg}); "
                          "download config.json again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object; download config.json again")
    return config


def _from_folder(name: str, folder: Path, origin: str, hub_id: str | None = None) -> ModelSource:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelNotFoundError(f"{folder} has no {CONFIG_FILE}; point heavylift at the model's folder")
    config = _read_config(config_path)
    arch = architecture_from_config(config, str(config_path))
    checkpoint = read_checkpoint(folder)
    if checkpoint is not None:
        check_against(arch, checkpoint, str(folder))
    return ModelSource(name, origin, config, arch, folder, checkpoint, hub_id)


def cached_snapshot(hub_id: str) -> Path | None:
    """The hub cache's folder for `hub_id`'s main revision when its config.json is there, without any network.

    Read from the cache's documented layout (models--ORG--NAME/refs/main names the snapshot) rather than
    through huggingface_hub.try_to_load_from_cache, whose import brings the hub's HTTP client: a third of
    the time `heavylift plan` takes for a catalog model. Only the cache's location comes from the library."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if (snapshot / CONFIG_FILE).is_file() else None


def no_weights_error(source: ModelSource) -> ModelNotFoundError:
    """What to do when `source` has a config.json but no safetensors weights to load here."""
    if source.origin == "local":
        return ModelNotFoundError(f"{source.name} has {CONFIG_FILE} but no *.safetensors weights; put the "
                                  "checkpoint's safetensors files and tokenizer in it, or give the model's hub id")
    return ModelNotFoundError(f"{source.name} has no weights here; download them first "
                              f"(`hf download {source.hub_id}`), or give a local folder")


def _hub_error(hub_id: str, error: Exception) -> HeavyliftError:
    """One line for a failed hub request: an HTTP answer, offline mode, or no answer at all."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    suggestions = closest_models(hub_id)
    hint = f" (catalog names close to it: {', '.join(suggestions)})" if suggestions else ""
    if isinstance(error, hub.GatedRepoError):
        return ModelNotFoundError(f"{hub_id} is gated: accept its license on the hub, then `hf auth login` "
                                  "or set HF_TOKEN")
    if isinstance(error, (hub.RepositoryNotFoundError, hub.RevisionNotFoundError)):
        return ModelNotFoundError(f"no model '{hub_id}' on the hub{hint}; check the id or run `heavylift catalog`")
    if isinstance(error, (hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError)) and constants.HF_HUB_OFFLINE:
        return ModelNotFoundError(f"'{hub_id}' is not in the hub cache and HF_HUB_OFFLINE is set{hint}; "
                                  "unset it to fetch the config, or use a local folder or a catalog name")
    if isinstance(error, hub.EntryNotFoundError):
        return ModelNotFoundError(f"{hub_id} has no {CONFIG_FILE}; it is not a transformers model")
    if isinstance(error, hub.HFValidationError):
        return ModelNotFoundError(f"'{hub_id}' is not a folder, a catalog name or a valid hub id{hint}")
    if isinstance(error, hub.HfHubHTTPError):
        code = getattr(error.response, "status_code", "an error")
        return ModelNotFoundError(f"the hub answered {code} for '{hub_id}'{hint}; check the id (and HF_TOKEN for "
                                  "a private model), or try again later")
    return ModelNotFoundError(f"could not reach the hub at {constants.ENDPOINT} for '{hub_id}' "
                              f"({type(error).__name__}){hint}; pass a local folder or a catalog name, or set "
                              "HF_HUB_OFFLINE=1 to plan from the hub cache (HF_TOKEN for gated models)")


def _config_from_hub(hub_id: str) -> tuple[Path, bool]:
    """The folder of `hub_id`'s config.json, and whether the hub answered. One request tells whether it
    answers, so no answer fails in HUB_TIMEOUT_S, quietly, instead of after hf_hub_download's retries (five,
    23 s of backoff, each logged); the hub cache then serves a model downloaded before."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if not constants.HF_HUB_OFFLINE:
        try:
            get_hf_file_metadata(hf_hub_url(hub_id, CONFIG_FILE), timeout=HUB_TIMEOUT_S)
        except (HfHubHTTPError, HFValidationError) as e:  # the hub said no, or the id cannot be one
            raise _hub_error(hub_id, e) from None
        except Exception as e:  # no answer: a network error of huggingface_hub's HTTP client, named in the line
            cached = cached_snapshot(hub_id)
            if cached is None:
                raise _hub_error(hub_id, e) from None
            return cached, False
    try:
        return Path(hf_hub_download(hub_id, CONFIG_FILE, etag_timeout=HUB_TIMEOUT_S)).parent, True
    except Exception as e:  # every hub failure is the user's to fix: turn it into one line
        raise _hub_error(hub_id, e) from None


def _from_hub(hub_id: str) -> ModelSource:
    from huggingface_hub import constants, get_safetensors_metadata

    folder, answered = _config_from_hub(hub_id)
    source = _from_folder(hub_id, folder, "hub", hub_id)
    if source.checkpoint is not None or constants.HF_HUB_OFFLINE or not answered:
        return source
    try:
        metadata = get_safetensors_metadata(hub_id, timeout=HUB_TIMEOUT_S)
    except Exception:  # no safetensors on the hub, or no network now: plan from config.json alone
        return source
    checkpoint = from_hub_metadata(metadata.files_metadata)
    check_against(source.architecture, checkpoint, hub_id)
    return ModelSource(hub_id, "hub", source.config, source.architecture, source.folder, checkpoint, hub_id)


def resolve_model(name: str) -> ModelSource:
    """Turn MODEL into a ModelSource: a folder, a catalog name or alias, or a hub id, in that order."""
    if not name or not name.strip():
        raise ModelNotFoundError("give a model: a local folder, a catalog name (`heavylift catalog`) or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_folder(name, path, "local")
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file; give the folder that holds config.json")
    entry = find_model(name)
    if entry is not None:
        cached = cached_snapshot(entry.hub_id)
        if cached is not None:  # a downloaded copy: its weights can be checked and loaded
            return _from_folder(name, cached, "hub", entry.hub_id)
        config = entry.config_dict()
        return ModelSource(name, "catalog", config, architecture_from_config(config), None, None, entry.hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:  # a path, or no owner/name form
        suggestions = closest_models(name)
        hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
        raise ModelNotFoundError(f"no folder or catalog model named '{name}'{hint} (`heavylift catalog` lists them)")
    return _from_hub(name)
