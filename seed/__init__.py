"""seed: the SEED visual tokenizers (SEED-1, SEED-2) and SEED-LLaMA: images <-> 32 causal codes.

``import seed`` is light: the model code (torch, timm, transformers, diffusers) is imported when
first used, e.g. by ``seed.Tokenizer``.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .config import load_config
from .errors import CheckpointError, InputError

if TYPE_CHECKING:
    from .llama import SeedLlama
    from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "SeedLlama", "load_config", "InputError", "CheckpointError"]
__version__ = "0.2.0"

_LAZY = {"Tokenizer": ".tokenizer", "SeedLlama": ".llama"}
"""Public name -> the module that defines it, imported on first access."""


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'seed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
