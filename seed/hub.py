"""Saving a tokenizer as a self-contained folder, and finding such a folder locally or on the Hub.

A saved folder holds ``config.yaml`` (the full config, without the ``checkpoints`` section) and
``model.safetensors`` (the tokenizer's weights under our own key names; no pickles).

Before anything is fetched from the Hub, `hub_access` probes the endpoint once (`HUB_TIMEOUT_S`):
without network a Hub id fails at once with one line saying how to work offline, instead of
huggingface_hub's minute of retries (``Retrying in 8s``) per file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub import constants, get_session, snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from .checkpoint import assign_weights, read_state_dict
from .config import resolve_path
from .errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
STAGES = ("vision", "qformer", "quantizer", "decoder")
"""The tokenizer's submodules whose weights a saved folder holds (the diffusion model is not one)."""
HUB_TIMEOUT_S = 5.0
"""Seconds the Hub has to answer `hub_access`'s probe (and each metadata request of `find`)."""
_REACHED: set[str] = set()
"""Hub endpoints that answered a probe in this process (not probed again)."""


def save(tok: nn.Module, folder: str | Path) -> Path:
    """Write ``config.yaml`` and ``model.safetensors`` for ``tok`` into ``folder`` (created).

    Each weight is stored in the dtype it has in memory, so nothing is silently rounded or passed
    off as more precise than it is: a vision tower loaded in fp16 (the CUDA default) is saved in
    fp16, with a warning saying so. Load the original files with ``dtype=torch.float32`` to save
    full precision. `from_pretrained` reads either.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.to_container(tok.cfg, resolve=True)
    cfg.pop("checkpoints", None)  # the weights are in this folder; it must load from itself alone
    state = {}
    for stage in STAGES:
        for key, value in getattr(tok, stage).state_dict().items():
            state[f"{stage}.{key}"] = value.detach().to("cpu").contiguous()
    narrow = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()
                     if v.is_floating_point() and v.dtype != torch.float32})
    if narrow:
        n = sum(1 for v in state.values() if v.is_floating_point() and v.dtype != torch.float32)
        logger.warning("save_pretrained: %d weight tensors are saved in %s, the precision they have in memory "
                       "(not the float32 of the original files); build with dtype=torch.float32 to save full "
                       "precision", n, "/".join(narrow))
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    OmegaConf.save(OmegaConf.create(cfg), folder / CONFIG_NAME)
    logger.info("saved %d tensors and the config to %s", len(state), folder)
    return folder


def _offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it only once, at import)."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _unreachable() -> str | None:
    """None when the Hub endpoint (``HF_ENDPOINT``) answers an HTTP request within `HUB_TIMEOUT_S`
    (any status: the network works), else why not. One request, no retries."""
    endpoint = constants.ENDPOINT
    if endpoint in _REACHED:
        return None
    try:
        status = get_session().head(endpoint, timeout=HUB_TIMEOUT_S, follow_redirects=False).status_code
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy, TLS: all "unreachable"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no answer'}"
    if status >= 500:  # the Hub is down: each download would retry for half a minute
        return f"HTTP {status}"
    _REACHED.add(endpoint)
    return None


def log_once() -> None:
    """Print each huggingface_hub log record once, through the root logger's handlers.

    huggingface_hub gives its loggers a handler of its own and also passes every record on to the
    root logger: once a script sets up logging (``logging.basicConfig``) each record would print
    twice, once raw and once formatted. Call after setting up logging.
    """
    hub_logger = logging.getLogger("huggingface_hub")
    if logging.getLogger().handlers:
        for handler in list(hub_logger.handlers):
            hub_logger.removeHandler(handler)


def _cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of model repo ``repo_id``."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def offline_help(name: str) -> str:
    """How to run without the Hub, for a message about ``name`` (a Hub id)."""
    return (f"to work offline, pass a local folder instead (download it where there is network: "
            f"hf download {name} --local-dir FOLDER; scripts/download_weights.py fetches the tokenizers' weights "
            f"into pretrained/), or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})")


def _access(name: str) -> tuple[bool, str | None]:
    """(local_files_only, why ``name`` cannot load or None) for Hub repo ``name``; see `hub_access`."""
    if _offline():
        if _cached(name):
            return True, None
        return True, ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}); pass a local folder, or download it where there is network")
    why = _unreachable()
    if why is None:
        return False, None
    if _cached(name):
        logger.warning("the Hugging Face Hub (%s) is unreachable (%s): using the cached copy of %s "
                       "(HF_HUB_OFFLINE=1 skips this check)", constants.ENDPOINT, why, name)
        return True, None
    return True, (f"the network or the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({why}) and it is "
                  f"not in the local cache; {offline_help(name)}")


def hub_access(name: str, what: str) -> bool:
    """Before loading Hub repo ``name`` (``what`` names the input in messages, e.g. ``"llm"``):
    whether to read the local Hugging Face cache only (pass it on as ``local_files_only``).

    Offline (``HF_HUB_OFFLINE=1``): True. Otherwise the Hub is probed once per process (one
    request, `HUB_TIMEOUT_S`, no retries): reachable, False; unreachable, True when the cache
    holds the repo (logged). A repo that cannot load (not cached, and offline or unreachable) is a
    `CheckpointError` at once, one line naming ``name``, the endpoint and how to work offline.
    """
    validate_repo_id(name)
    local_only, problem = _access(name)
    if problem is not None:
        raise CheckpointError(f"{what}: cannot load {name!r}: {problem}")
    return local_only


def find(name: str | Path) -> Path:
    """A saved folder: ``name`` if it is a folder, else a Hub repo id fetched with `snapshot_download`.

    Raises `CheckpointError` naming ``name`` when it is neither (offline, no network, no such repo);
    without network at once (`hub_access`).
    """
    local = resolve_path(name)
    if local.is_dir():
        return local
    name = str(name)
    prefix = f"cannot load a pretrained tokenizer from {name!r}: no such folder, and as a Hugging Face repo id"
    try:
        validate_repo_id(name)
        local_only, problem = _access(name)
        if problem is not None:
            raise CheckpointError(f"{prefix}: {problem}")
        return Path(snapshot_download(name, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                                      etag_timeout=HUB_TIMEOUT_S, local_files_only=local_only))
    except (HFValidationError, HTTPError, OSError) as e:  # HTTP, connection, not-cached errors
        why = ("offline mode (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
               if _offline() else f"the Hub download failed: {type(e).__name__}: {e}")
        raise CheckpointError(f"{prefix}: {why}") from None


def read_config(folder: Path) -> DictConfig:
    """The ``config.yaml`` of a saved folder (its ``model`` section is required)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a saved tokenizer: {CONFIG_NAME} is missing "
                              f"(make one with tok.save_pretrained or scripts/convert_checkpoint.py)")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise CheckpointError(f"{path}: not a seed config (no 'model' section)")
    return cfg


def load_weights(tok: nn.Module, folder: Path) -> None:
    """Assign ``model.safetensors`` (memory-mapped) to the tokenizer's stages, strictly."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a saved tokenizer: {WEIGHTS_NAME} is missing")
    state = read_state_dict(path)
    for stage in STAGES:
        prefix = f"{stage}."
        assign_weights(getattr(tok, stage), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                       str(path))
