"""Saving a tokenizer as a self-contained folder, and finding such a folder locally or on the Hub.

A saved folder holds ``config.yaml`` (the full config, without the ``checkpoints`` section) and
``model.safetensors`` (the tokenizer's weights under our own key names; no pickles).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError
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


def find(name: str | Path) -> Path:
    """A saved folder: ``name`` if it is a folder, else a Hub repo id fetched with `snapshot_download`.

    Raises `CheckpointError` naming ``name`` when it is neither (offline, no network, no such repo).
    """
    local = resolve_path(name)
    if local.is_dir():
        return local
    name = str(name)
    try:
        return Path(snapshot_download(name, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                                      etag_timeout=HUB_TIMEOUT_S, local_files_only=_offline()))
    except (HFValidationError, HTTPError, OSError) as e:  # HTTP, connection, not-cached errors
        why = ("offline mode (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
               if _offline() else f"the Hub download failed: {type(e).__name__}: {e}")
        raise CheckpointError(
            f"cannot load a pretrained tokenizer from {name!r}: no such folder, and as a Hugging Face "
            f"repo id: {why}") from None


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
