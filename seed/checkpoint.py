"""Reading weight files safely and assigning them strictly.

Original SEED-1 files are torch pickles; they are read with ``weights_only=True`` only, so
nothing in a file can run code. ``.safetensors`` files are memory-mapped.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .config import resolve_path
from .errors import CheckpointError

logger = logging.getLogger(__name__)

SEED1_WEIGHTS_URL = "https://drive.google.com/drive/folders/1xmVXuttQfBPBOe4ZR96Wu1X34uzPkxsS"
"""The authors' Google Drive folder with the SEED-1 tokenizer files (linked from AILab-CVC/SEED's SEED-1.md)."""

WHERE_TO_GET = {
    "eva_vit_g.pth": "the BLIP-2 EVA ViT-g file: `python scripts/download_weights.py` fetches it",
    "causal_qformer.pth": f"the SEED-1 release, by hand ({SEED1_WEIGHTS_URL})",
    "seed_tokenizer.pth": f"the SEED-1 release, by hand ({SEED1_WEIGHTS_URL})",
    "seed_quantizer.pt": ("the SEED-2 release on the Hugging Face Hub (AILab-CVC/seed-tokenizer-2): "
                          "`python scripts/download_weights.py --model seed2` fetches it"),
}


def missing_file_hint(path: Path) -> str:
    """Where to get a weight file and where to put it, as a sentence."""
    how = WHERE_TO_GET.get(path.name)
    return (f"Get it from {how}; put" if how else "Put") + f" it at {path} (see pretrained/README.md)."


def missing_weights(cfg: Any, diffusion: bool = True) -> list[str]:
    """One line per weight file ``cfg`` names that is not there: the key, the absolute path looked
    at and how to get it (`missing_file_hint`). ``diffusion``: also ``diffusion.model`` (the
    decoder's Stable Diffusion; not needed to encode)."""
    missing = []
    for name, path in (cfg.get("checkpoints") or {}).items():
        p = resolve_path(path).absolute() if path is not None else None
        if p is not None and not p.is_file():
            missing.append(f"checkpoints.{name}: {p} not found. {missing_file_hint(p)}")
    model = (cfg.get("diffusion") or {}).get("model") if diffusion else None
    if model is not None:
        from .diffusion import check_model_path, kind_of, seed_embed_shape  # diffusers: only when asked

        try:
            check_model_path(model, kind_of(seed_embed_shape(cfg)))
        except CheckpointError as e:
            missing.append(f"diffusion.model: {e}")
    return missing


def check_weights(cfg: Any, source: str | None = None, diffusion: bool = True) -> None:
    """`CheckpointError` listing every weight file ``cfg`` (from config ``source``) names that is
    missing (`missing_weights`), with how to get each and the tiny random config to try instead.
    The one message for missing weights, for every script and `seed.Tokenizer.from_config`."""
    missing = missing_weights(cfg, diffusion)
    if not missing:
        return
    model = cfg.get("model") or {}
    tiny = "seed2_tiny" if ((model.get("decoder") or {}).get("head") == "image") else "seed_tiny"
    raise CheckpointError(
        f"{len(missing)} weight file(s) not found" + (f" for {source}" if source else "") + ":\n"
        + "".join(f"  - {line}\n" for line in missing)
        + f"See pretrained/README.md, or try the tiny random model: --config configs/{tiny}.yaml")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    A torch pickle that holds ``{"model": {...}, ...}`` (the SEED-1 layout) is unwrapped to its
    ``"model"`` entry. Raises `CheckpointError` for a missing, corrupt or unsafe file.
    """
    p = resolve_path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p.absolute()}. {missing_file_hint(p.absolute())}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (an interrupted download?). {missing_file_hint(p)}")
    try:
        if p.suffix == ".safetensors":
            obj = load_file(p)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        # torch's message suggests turning weights_only off; keep only the line that says what was refused
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        why = why.strip().split(". ")[0]
        raise CheckpointError(
            f"{p}: refused to load: the file is corrupt or holds Python objects other than tensors, which "
            f"could run code when unpickled ({why or type(e).__name__}). seed reads pickles with "
            f"weights_only=True only; convert a trusted file to .safetensors."
        ) from None
    except Exception as e:  # any other failure of the reader on these bytes: a damaged file
        first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{p}: cannot read the checkpoint (truncated or corrupt?): {type(e).__name__}: {first}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class KeyMap:
    """How an original checkpoint names a stage's weights: prefix renames, then inner substitutions.

    ``renames``: (original prefix, our prefix) pairs; keys matching none are not this stage's.
    ``inner``: (original, ours) substrings replaced inside the renamed keys.
    """

    renames: tuple[tuple[str, str], ...]
    inner: tuple[tuple[str, str], ...] = ()

    def __call__(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original ``{key: tensor}`` -> this stage's keys (tensors passed through unchanged)."""
        out = {}
        for key, value in state_dict.items():
            for old, new in self.renames:
                if key.startswith(old):
                    key = new + key[len(old):]
                    for a, b in self.inner:
                        key = key.replace(a, b)
                    out[key] = value
                    break
        return out

    def original(self, key: str) -> str:
        """Our key -> the name the original file gives it."""
        for old, new in self.renames:
            if key.startswith(new):
                key = old + key[len(new):]
                for a, b in self.inner:
                    key = key.replace(b, a)
                return key
        return key


def assign_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                   keymap: KeyMap | None = None) -> None:
    """Load ``state_dict`` into ``module`` strictly: every weight must be there with its shape.

    Tensors are copied to each parameter's device and dtype; a module built on the meta device
    takes them by assignment (no second copy). ``source`` names the file in errors, and ``keymap``
    gives the file's own names for the weights.
    """
    expected = module.state_dict(keep_vars=True)
    stage = type(module).__name__
    def name(k: str) -> str:
        original = keymap.original(k) if keymap else k
        return original if original == k else f"{original} (our {k})"

    missing = [f"{name(k)} {tuple(v.shape)}" for k, v in expected.items() if k not in state_dict]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the {stage} needs: {shown}. "
                              f"Is it the right file, complete and unmodified?")
    wrong = [
        f"{name(k)}: file has {tuple(state_dict[k].shape)}, the {stage} needs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"weight(s) of the wrong shape in {source} (a different model size or config?): "
                              + "; ".join(wrong))
    on_meta = any(v.is_meta for v in expected.values())
    ready = {k: state_dict[k].to(device=v.device if not v.is_meta else "cpu", dtype=v.dtype) for k, v in expected.items()}
    module.load_state_dict(ready, strict=True, assign=on_meta)


def load_checkpoints(plan: Mapping[str, tuple[str | Path | None, list[tuple[nn.Module, KeyMap]]]]) -> None:
    """Load each original file into the model stages it feeds.

    ``plan``: config name -> (path or None, [(module, keymap), ...]); each keymap maps the file's
    original keys to its module's keys (a module takes the mapped keys it has). None leaves those stages randomly initialised,
    with a warning. Keys no stage uses (training-only) are skipped and counted in one log line.
    """
    for name, (path, stages) in plan.items():
        if path is None:
            logger.warning("checkpoints.%s is null: those weights are RANDOM", name)
            continue
        state_dict = read_state_dict(path)
        used: set[int] = set()
        for module, keymap in stages:
            wanted = module.state_dict().keys()
            sd = {k: v for k, v in keymap(state_dict).items() if k in wanted}
            used.update(id(v) for v in sd.values())
            assign_weights(module, sd, str(resolve_path(path)), keymap)
        skipped = sum(1 for v in state_dict.values() if id(v) not in used)
        logger.info("%s: loaded %d tensors, skipped %d no part of the model uses", resolve_path(path).name,
                    len(state_dict) - skipped, skipped)
