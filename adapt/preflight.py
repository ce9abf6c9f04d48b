"""Checks that run before any expensive work, so that a start which cannot succeed fails in seconds,
names the real cause, and leaves no run directory behind.

    check_run(config, domain, train_config, run_dir)   # api.run calls it before creating run_dir

What is checked: the model reference (a preset, a local folder with the files a load needs, a hub id
in the local cache, or a hub id the hub confirms, decided once with one short timeout and the hub's
offline mode honoured), the data sources (exist, known formatter kind, file or folder as the kind
reads them), the training options, and the output locations (writable, free disk space for the
planned checkpoints, export and formatted data).

Hub settings (HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE) are read when a check runs, not
when huggingface_hub was imported, so that a notebook or a test can change them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from adapt.errors import AdaptError

if TYPE_CHECKING:
    from adapt.training.trainer import TrainConfig
    from domains import DataSource, Domain

HUB_TIMEOUT = float(os.environ.get("ADAPT_HUB_TIMEOUT", 10))  # seconds for the one hub question
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one holds the vocabulary
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Formatter kinds that read only a dataset folder (the others also take an annotation file).
FOLDER_KINDS = {"driving", "rsvqa"}


_CONFIRMED_ON_HUB: dict[tuple[str, str], int] = {}  # (endpoint, hub id) -> weight bytes


@dataclass(frozen=True)
class ModelLocation:
    """Where a model reference points: `kind` is preset, folder, cached or hub; `folder` is the local
    folder to load from (None for presets and for hub ids that will be downloaded)."""

    name: str
    kind: str
    folder: Path | None = None
    weight_bytes: int = 0  # size of the weight files when known (0: unknown)


# ----------------------------------------------------------------------------------------------
# the model reference
# ----------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """The hub's offline mode, from the environment now (as huggingface_hub reads it) or at import."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.is_offline_mode()


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_cache() -> Path:
    """The hub cache folder as huggingface_hub derives it: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def locate_model(name: str, *, timeout: float = HUB_TIMEOUT) -> ModelLocation:
    """Decide once where `name` loads from, or raise an AdaptError that names the cause."""
    from adapt.checkpoints.models import PRESETS

    if name in PRESETS:
        return ModelLocation(name, "preset", None, _preset_bytes(name))
    path = Path(name).expanduser()
    if path.exists():
        return ModelLocation(name, "folder", path, check_model_folder(path))
    if not _could_be_hub_id(name):
        raise AdaptError("model folder not found", path=path,
                         hint="pass an existing folder, a hub id (owner/name) or a preset: " + ", ".join(PRESETS))
    cached = _cached_snapshot(name)
    if cached is not None:
        try:
            return ModelLocation(name, "cached", cached, check_model_folder(cached, hub_id=name))
        except AdaptError:
            if hub_offline():
                raise
            # a partial download (config.json only, say): the hub decides, and the load completes it
    if hub_offline():
        raise _offline_and_not_cached(name)
    key = (hub_endpoint(), name)
    if key not in _CONFIRMED_ON_HUB:  # asked once per process: the preflight's answer serves the load
        _CONFIRMED_ON_HUB[key] = _check_on_hub(name, timeout)
    return ModelLocation(name, "hub", None, _CONFIRMED_ON_HUB[key])


def _offline_and_not_cached(name: str) -> AdaptError:
    return AdaptError(f"the hub is in offline mode (HF_HUB_OFFLINE) and {name} is not in the local cache "
                      f"({hub_cache()})", hint=f"download it where there is network (hf download {name}) and "
                      "copy the cache here, or pass --model /path/to/the/model/folder")


def _preset_bytes(name: str) -> int:
    """fp32 weight size of a random-init preset, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from adapt.checkpoints.models import preset_config

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(preset_config(name))
    return 4 * sum(p.numel() for p in model.parameters())


def _could_be_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` (its main revision), or None when not cached."""
    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache(), local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        return None


def _check_on_hub(repo_id: str, timeout: float) -> int:
    """Ask the hub once about `repo_id`: it exists, is a native InternVL with weights and tokenizer.
    Returns the size of its weight files."""
    import httpx2  # huggingface_hub's HTTP client

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, timeout=timeout, files_metadata=True)
    except GatedRepoError:
        raise AdaptError(f"{repo_id} is gated on the hub and this machine has no access",
                         hint=f"accept its terms on {hub_endpoint()}/{repo_id} and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise AdaptError(f"there is no model {repo_id} on the hub ({hub_endpoint()})",
                         hint="check the spelling (e.g. OpenGVLab/InternVL3-1B-hf; a local folder of that "
                         "name does not exist here); private models need hf auth login") from None
    except OfflineModeIsEnabled:  # offline since huggingface_hub was imported
        raise _offline_and_not_cached(repo_id) from None
    except httpx2.TransportError as err:
        raise AdaptError(f"the hub ({hub_endpoint()}) cannot be reached ({type(err).__name__}: {err}) and {repo_id} "
                         f"is not in the local cache ({hub_cache()})",
                         hint=f"connect to the network, or download it elsewhere (hf download {repo_id}) and pass "
                         "--model /path/to/the/model/folder") from None
    except HfHubHTTPError as err:
        raise AdaptError(f"the hub answered an error about {repo_id} ({str(err).splitlines()[0]})",
                         hint="retry later, or pass --model /path/to/a/downloaded/folder") from None
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    model_type = (info.config or {}).get("model_type")
    _check_layout(f"hub model {repo_id}", model_type, set(files), original_hint=(
        f"download it (hf download {repo_id} --local-dir {repo_id.split('/')[-1]}), then adapt convert it"))
    return sum(size for name, size in files.items() if name.endswith(WEIGHT_SUFFIXES))


def check_model_folder(path: Path, *, hub_id: str | None = None) -> int:
    """A folder holds what a load needs: config.json of a native InternVL, weights, a tokenizer.
    Returns the size of its weight files."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdaptError("no config.json in the model folder", path=path,
                         hint="point --model at a folder written by save_pretrained / adapt export")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AdaptError(f"config.json is not valid JSON ({err})", path=config_file) from None
    if not isinstance(config, dict):
        raise AdaptError("config.json is not a JSON object", path=config_file)
    if "llm_config" in config:
        config["model_type"] = "internvl_chat"
    files = {p.name for p in path.iterdir()}
    where = f"cached hub model {hub_id} ({path})" if hub_id else f"model folder {path}"
    _check_layout(where, config.get("model_type"), files,
                  original_hint=f"convert it first: adapt convert {path} {path.name}-hf ; then use --model {path.name}-hf")
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def _check_layout(where: str, model_type: str | None, files: set[str], *, original_hint: str) -> None:
    """The architecture, weights and tokenizer of a checkpoint whose files are `files`."""
    if model_type == "internvl_chat":
        raise AdaptError(f"{where} is an original OpenGVLab (remote-code) InternVL checkpoint", hint=original_hint)
    if model_type is not None and model_type != "internvl":
        raise AdaptError(f"{where} is a checkpoint of another architecture (model_type {model_type!r}, "
                         "not 'internvl')", hint="adapt fine-tunes HF-native InternVL checkpoints "
                         "(e.g. OpenGVLab/InternVL3-1B-hf); pass one of those, or a preset")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise AdaptError(f"{where} has no weights (*.safetensors / *.bin)",
                         hint="save the model with save_pretrained / adapt export into this folder")
    if not any(name in files for name in TOKENIZER_FILES):
        raise AdaptError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                         hint="copy the tokenizer files of the base model into this folder "
                         "(save_pretrained of the model alone does not write them)")


# ----------------------------------------------------------------------------------------------
# data, outputs, training options
# ----------------------------------------------------------------------------------------------
def check_sources(sources: list[DataSource]) -> None:
    """Each source exists, its kind is a known formatter, and it is a folder where that kind needs one."""
    import formatters

    for source in sources:
        formatters.get(source.kind)
        path = Path(source.path).expanduser()
        if not path.exists():
            raise AdaptError(f"data source {source.label} ({source.kind}) not found", path=path,
                             hint="check the path after KIND= in --data / --general")
        if source.kind in FOLDER_KINDS and not path.is_dir():
            raise AdaptError(f"the {source.kind} formatter reads a dataset folder, this is a file", path=path,
                             hint=f"pass the folder that holds the {source.kind} annotations and images")


def check_train_options(train_config: TrainConfig) -> None:
    """The options train() would refuse, refused now (before formatting and loading)."""
    import torch

    from adapt.training.trainer import precision_flags

    train_config.validate()
    precision_flags(train_config.precision)
    if train_config.mode == "lora" and train_config.qlora and not torch.cuda.is_available():
        raise AdaptError("QLoRA needs a CUDA GPU and the bitsandbytes package", hint="use --mode lora")


def planned_bytes(model: ModelLocation, train_config: TrainConfig, sources: list[DataSource]) -> int:
    """A rough lower bound of what a run writes: each kept checkpoint (weights, and optimizer state
    twice their size in full / partial mode), the export, and formatted data no larger than its source."""
    weights = model.weight_bytes
    optimizer = 0 if train_config.mode == "lora" else 2 * weights
    kept = train_config.save_total_limit or 2
    return kept * (weights + optimizer) + weights + sum(_size(Path(s.path)) for s in sources)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check_writable(folder: Path, needed: int = 0) -> None:
    """`folder` can be created and written, with at least `needed` bytes free on its disk."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AdaptError("the output location is under a file, not a folder", path=existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AdaptError("the output location is not writable", path=existing,
                         hint="choose another --runs-dir, or fix the folder's permissions")
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise AdaptError(f"not enough free disk space for the run: about {_gib(needed)} planned "
                         f"(checkpoints, export, formatted data), {_gib(free)} free", path=existing,
                         hint="free some space, choose another --runs-dir, or keep fewer checkpoints "
                         "(--train-opt save_total_limit=2)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_run(model: str, sources: list[DataSource], train_config: TrainConfig, outputs: list[Path],
              ) -> ModelLocation:
    """Everything checkable before a run creates its directory; returns where the model loads from."""
    location = locate_model(model)
    check_train_options(train_config)
    check_sources(sources)
    needed = planned_bytes(location, train_config, sources)
    for folder in outputs:
        check_writable(folder, needed)
    return location


def run_sources(config: Any, domain: Domain) -> list[DataSource]:
    """The sources a run will format: its data and its general data (the recipe's by default); none
    for the demo, which writes its own."""
    from domains import DataSource

    if config.demo:
        return []
    general = [DataSource(**g) for g in config.general] or list(domain.general)
    return [DataSource(**d) for d in config.data] + general


class StartGuard:
    """Removes the run directory that a failed start created (formatting, planning, loading), so that
    no half-made run looks like a run; once training starts the directory stays, for --resume."""

    def __init__(self) -> None:
        self.created: Path | None = None

    def creating(self, run_dir: Path) -> None:
        """`run_dir` is about to be made by this start (an existing one is never removed)."""
        self.created = None if run_dir.exists() else run_dir

    def started(self) -> None:
        self.created = None

    def __enter__(self) -> StartGuard:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
