"""seed: the SEED visual tokenizer (arXiv 2307.08041), images <-> 32 causal discrete codes."""

from .config import load_config
from .errors import CheckpointError, InputError
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "load_config", "InputError", "CheckpointError"]
__version__ = "0.1.0"
