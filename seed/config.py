"""OmegaConf configs: a YAML file plus ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
"""The project folder (where ``configs/`` and ``pretrained/`` live in a checkout)."""


def load_config(path: str | Path, *overrides: str) -> DictConfig:
    """Load a YAML config and apply dotlist overrides such as ``"model.image_size=56"``.

    ``path`` is a file (a relative one is looked up here, then in the project folder), or the
    name of a config shipped in ``configs/`` (``"seed_tiny"``).
    Overrides may add keys; ``null`` sets a value to None.
    """
    p = resolve_path(path)
    if not p.is_file() and not p.suffix:
        shipped = ROOT / "configs" / f"{p}.yaml"
        p = shipped if shipped.is_file() else p
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = OmegaConf.load(p)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def resolve_path(path: str | Path) -> Path:
    """A relative path as given if it exists from here, else relative to the project folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p if (ROOT / p).exists() else p
