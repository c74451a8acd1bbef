"""The SEED-LLaMA training config schema (``configs/train/llama_*.yaml``).

Three sections: ``model:`` (`LlmModelConfig`: the base LM, its tokenizer, LoRA or full
fine-tuning, dtype, gradient checkpointing), ``data:`` (`seed.training.llm.data.LlmDataConfig`:
sources and the mixture) and ``train:`` (`LlmTrainSection`: the original's optimizer and schedule,
precision, parallelism, and the run settings of `seed.training.run.RunSection`). An unknown key or
a value of the wrong type is an `InputError` naming the key. The defaults are the released
pretraining recipe's (spec section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ...config import load_config
from ...errors import InputError
from ..config import RunSection, check_eval
from .data import LlmDataConfig, source_settings
from .model import DTYPES, LoraSettings


@dataclass
class TinyModelConfig:
    """The tiny random LLaMA of ``model.base: tiny`` (``vocab_size``: the tokenizer's text pieces)."""

    hidden: int = 32
    layers: int = 2
    heads: int = 4
    intermediate: int = 64
    seed: int = 0


@dataclass
class LlmModelConfig:
    base: str = "pretrained/vicuna-7b-v1.1"
    """An HF causal LM folder or hub name (the original: Vicuna-7B v1.1; SFT: the merged pretraining
    export), or ``tiny``: a tiny random LLaMA (``model.tiny``) built in memory, no files."""
    tokenizer: Optional[str] = None
    """Tokenizer folder or hub name; null: ``base``'s (``tiny``: seed's tiny SentencePiece
    tokenizer). The image tokens are added when it lacks them (`seed.llm.add_image_tokens`)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "bfloat16"
    """Storage dtype of the frozen base weights (float32, bfloat16, float16); what trains is fp32."""
    lora: Optional[LoraSettings] = field(default_factory=LoraSettings)
    """LoRA settings; null: full fine-tuning (every parameter trains)."""
    gradient_checkpointing: bool = True
    init: Optional[str] = None
    """A safetensors file of recorded initial values (``embed_tokens_new_rows``, ``lm_head_new_rows``,
    ``...lora_A.default.weight``) instead of fresh draws: the parity fixture's ``init.safetensors``."""


@dataclass
class LlmTrainSection(RunSection):
    """Optimizer and schedule (the original's: old HF AdamW, decay on every tensor, clip 1.0, warmup
    + cosine to ``min_lr_ratio``), precision, parallelism, and the run settings."""

    output_dir: str = "outputs/llama"
    max_steps: Optional[int] = 30000
    """Optimizer steps of this run (run-only: a resume may change it; the schedule stays)."""
    schedule_steps: Optional[int] = None
    """The schedule's length: warmup + cosine reach min_lr_ratio x lr here (the original's
    max_steps). null: max_steps, fixed when the run starts and saved with its config, so a resume
    with another max_steps keeps the learning-rate curve (past it the original's formula rises again)."""
    seed: int = 42
    save_every: int = 1000
    log_every: int = 1
    lr: float = 1.5e-4
    warmup_ratio: float = 0.03
    """Warmup steps = ceil(schedule_steps x warmup_ratio)."""
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-5
    grad_clip: Optional[float] = 1.0
    """Clip the total gradient L2 norm to this (null: no clipping)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (each micro-batch's loss is its own token mean, divided by this)."""
    precision: str = "bf16"
    """Autocast dtype on CUDA: bf16, fp16 (with a GradScaler) or fp32; on the CPU always fp32."""
    loss_chunk: Optional[int] = 1024
    """The loss's logits are computed this many learned tokens at a time and recomputed in backward
    (`seed.training.llm.loss`: never the whole [tokens, V] logits; the same loss within float
    rounding); null: HF's plain loss over the whole [B, T, V] logits."""
    parallel: str = "ddp"
    """ddp (torchrun data parallel, every rank holds the model) or fsdp (FSDP2: parameters, gradients
    and optimizer state sharded across ranks, for 7B-14B; see docs/llm_training.md)."""
    export: bool = True
    """At the end, write OUT/export/ (merged model + tokenizer, and OUT/export/adapter/)."""
    export_dtype: Optional[str] = None
    """Cast the exported merged weights (e.g. bfloat16); null: as trained."""


@dataclass
class LlamaTrainConfig:
    model: LlmModelConfig = field(default_factory=LlmModelConfig)
    data: LlmDataConfig = field(default_factory=LlmDataConfig)
    train: LlmTrainSection = field(default_factory=LlmTrainSection)


PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")


def load_llama_train_config(path: str | Path, *overrides: str) -> DictConfig:
    """Load and validate a SEED-LLaMA training config with ``key=value`` overrides.

    Raises `seed.InputError` for an unknown key, a wrong type or a value out of range."""
    _check_override_values(overrides)
    cfg = load_config(path, *overrides, schema=LlamaTrainConfig)
    check_llama_train_config(cfg, str(path))
    return cfg


def _check_override_values(overrides: tuple[str, ...]) -> None:
    """An override whose value YAML cannot parse -> `InputError` naming it (not a YAML traceback)."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        try:
            OmegaConf.from_dotlist([o])
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"override {o!r}: the value of {o.split('=', 1)[0]!r} is not valid YAML ({first})") from None
        except OmegaConfBaseException:  # load_config reports these, naming the override
            continue


def check_llama_train_config(cfg: DictConfig, where: str = "config") -> None:
    """The range checks of `load_llama_train_config` (also for a checkpoint's saved config)."""
    t, m = cfg.train, cfg.model
    checks = [
        (m.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}"),
        (m.lora is None or (m.lora.r >= 1 and 0 <= m.lora.dropout < 1), "model.lora", "r >= 1, 0 <= dropout < 1"),
        (t.max_steps is not None and t.max_steps >= 1, "train.max_steps", "must be >= 1"),
        (t.schedule_steps is None or t.schedule_steps >= 1, "train.schedule_steps", "must be >= 1 or null"),
        (t.lr >= 0, "train.lr", "must be >= 0"),
        (0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "must be in [0, 1]"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)"),
        (t.eps >= 0, "train.eps", "must be >= 0"),
        (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be > 0 or null"),
        (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}"),
        (t.loss_chunk is None or t.loss_chunk >= 1, "train.loss_chunk", "tokens per chunk, >= 1, or null (the plain loss)"),
        (t.parallel in PARALLEL, "train.parallel", f"must be one of {PARALLEL}"),
        (t.save_every >= 1, "train.save_every", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.keep_last >= 0, "train.keep_last", "must be >= 0"),
        (t.export_dtype is None or t.export_dtype in DTYPES, "train.export_dtype", f"one of {sorted(DTYPES)} or null"),
    ]
    if m.base == "tiny":
        tiny = m.tiny
        checks += [
            (min(tiny.hidden, tiny.layers, tiny.heads, tiny.intermediate) >= 1, "model.tiny", "sizes must be >= 1"),
            (tiny.heads >= 1 and tiny.hidden % tiny.heads == 0 and (tiny.hidden // tiny.heads) % 2 == 0,
             "model.tiny.heads", f"must divide model.tiny.hidden ({tiny.hidden}) into heads of an even width"),
        ]
    for ok, key, why in checks:
        if not ok:
            raise InputError(f"{where}: bad value for '{key}' ({OmegaConf.select(cfg, key)!r}): {why}")
    if cfg.data.train is not None or cfg.data.sources:
        try:  # the data settings (weights, sizes), before anything is built; the files are listed later
            source_settings(cfg.data, log=False)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    check_eval(cfg, where)
