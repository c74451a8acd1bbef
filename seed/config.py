"""OmegaConf configs: a YAML file plus ``key=value`` overrides, checked against a schema.

The schema is a tree of dataclasses. A key that is not in it, or a value of the wrong type, is an
`InputError` naming the key (and the closest valid key), so a typo such as
``checkpoints.vison=...`` can never silently leave a default in place.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import InputError

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
"""The source checkout, when seed runs from one (``configs/``, ``pretrained/``, ``tests/``)."""
CHECKOUT = (ROOT / "pyproject.toml").is_file() and (ROOT / "configs").is_dir()
SHIPPED_CONFIGS = PACKAGE / "configs" if (PACKAGE / "configs").is_dir() else ROOT / "configs"
"""The YAML configs that come with seed: package data in an install, ``configs/`` in a checkout."""


# --- the tokenizer config schema ---------------------------------------------------------------
# Optional[...] rather than X | None: OmegaConf reads these annotations at runtime.

@dataclass
class VisionConfig:
    """EVA ViT-g/14 (released: patch 14, width 1408, 39 blocks, 16 heads, MLP 6144)."""

    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_ratio: float = 4.3637


@dataclass
class QFormerConfig:
    """The causal Q-Former (BERT-base shaped, 32 queries)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_every: int = 2
    num_queries: int = 32


@dataclass
class CodebookConfig:
    size: int = 8192
    dim: int = 32


@dataclass
class DecoderConfig:
    """Codes -> generation embeddings: 4 blocks, then the Reverse Q-Former head (SEED-1)."""

    head: str = "reverse_qformer"
    """``reverse_qformer`` (SEED-1: 77 x output_dim) or ``image`` (SEED-2: image_down + projection to output_dim)."""
    num_blocks: int = 4
    num_heads: int = 12
    reverse_layers: int = 4
    num_queries: int = 77
    output_dim: int = 768


@dataclass
class ModelConfig:
    image_size: int = 224
    image_resample: str = "bicubic"
    """Resize filter of the preprocessing: ``bicubic`` (SEED-1) or ``bilinear`` (SEED-2's main path)."""
    precision: str = "default"
    """``default`` (fp32; the vision tower in fp16 on CUDA) or ``fp16-all`` (the whole tokenizer in fp16,
    input included: the original SEED-2's path, whose codes SEED-LLaMA was trained on)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class CheckpointsConfig:
    """Original-format weight files; null = random weights (warned)."""

    vision: Optional[str] = None
    qformer: Optional[str] = None
    codebook: Optional[str] = None
    quantizer: Optional[str] = None
    """SEED-2's flat ``seed_quantizer.pt`` (all but the vision tower); SEED-1 uses qformer + codebook."""


@dataclass
class DiffusionConfig:
    """De-tokenizing settings; ``random`` holds the tiny random model's kwargs (smoke runs)."""

    model: Optional[str] = None
    scheduler: str = "pndm"
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    num_samples: int = 1
    seed: int = 42
    noise_level: int = 0
    """SD 2.1 unCLIP (SEED-2) only: the image embedding's noise level, 0 as in the original."""
    random: Optional[dict[str, Any]] = None


@dataclass
class EncodeConfig:
    batch_size: int = 32
    """`Tokenizer.encode` runs long lists in chunks of this many images (same codes, bounded memory)."""


@dataclass
class TokenizerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)


# --- loading --------------------------------------------------------------------------------------

def load_config(path: str | Path, *overrides: str, schema: type = TokenizerConfig) -> DictConfig:
    """Load a YAML config, apply dotlist overrides such as ``"model.image_size=56"``, validate.

    ``path``: a file, or the name of a config shipped with seed (``"seed_tiny"``,
    ``"train/seed1_stage1_tiny"``). ``schema``: the dataclass the config must fit (default: the
    tokenizer's). ``null`` sets a value to None. Raises `InputError` for an unknown key or a value
    of the wrong type, naming the key and the closest valid one.
    """
    p = find_config(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise InputError(f"overrides must look like key=value, got {bad}")
    try:
        layers = [OmegaConf.load(p), OmegaConf.from_dotlist(list(overrides))]
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise InputError(f"cannot parse config {p} or overrides {list(overrides)}: {e}") from None
    where = f"{p}" + (f" with overrides {list(overrides)}" if overrides else "")
    return validate(layers, schema, where)


def validate(layers: list[Any], schema: type = TokenizerConfig, where: str = "config") -> DictConfig:
    """Merge ``layers`` (dicts or DictConfigs, later wins) over ``schema``'s defaults, strictly.

    Returns a new DictConfig (struct mode: reading an unknown key raises too).
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except OmegaConfBaseException as e:
        raise InputError(explain(e, schema, where)) from None
    return cfg


def explain(e: OmegaConfBaseException, schema: type, where: str) -> str:
    """An OmegaConf validation error as one sentence naming the key and the closest valid key."""
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError) or "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.structured(schema)
        try:
            siblings = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        except Exception:  # the parent itself is unknown
            siblings = []
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else (
            f" Valid keys here: {', '.join(siblings)}." if siblings else "")
        return f"{where}: unknown config key '{key}'.{hint}"
    return f"{where}: bad value for '{key}': {msg}"


def find_config(path: str | Path) -> Path:
    """A config file: ``path`` if it exists (relative to the working directory, then to the
    checkout), else a shipped config of that name (``seed_tiny``, ``configs/seed_tiny.yaml``)."""
    p = resolve_path(path)
    if p.is_file():
        return p
    name = Path(path)
    if name.parts and name.parts[0] == "configs":
        name = Path(*name.parts[1:])
    shipped = SHIPPED_CONFIGS / (name if name.suffix else name.with_suffix(".yaml"))
    if shipped.is_file():
        return shipped
    raise InputError(f"config file not found: {path} (shipped configs: "
                     f"{', '.join(sorted(q.stem for q in SHIPPED_CONFIGS.glob('*.yaml')))})")


def resolve_path(path: str | Path) -> Path:
    """A relative path as given if it exists from the working directory, else relative to the
    source checkout (when seed runs from one); an installed seed never looks into site-packages."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not CHECKOUT:
        return p
    return ROOT / p if (ROOT / p).exists() else p
