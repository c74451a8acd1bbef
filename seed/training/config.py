"""The training config schema: ``seed.load_config(path, *overrides, schema=TrainConfig)``.

A training config is one YAML file (``configs/train/*.yaml``): what is trained (``stage``,
``objective``, ``dropout``), the model's dimensions (``model:``, the tokenizer's own
`seed.config.ModelConfig`), where the starting weights come from (``init:``), stage 1's
contrastive head (``itc:``), the exported tokenizer's decode settings (``diffusion:``), the data
(``data:``) and the optimisation and run settings (``train:``). An unknown key or a value of the
wrong type is an `InputError` naming the key. The defaults are the released recipe's (stage 1,
spec section 4); ``configs/train/`` has each stage's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ..config import DiffusionConfig, ModelConfig, load_config
from ..errors import InputError


@dataclass
class InitConfig:
    """Starting weights and the text/CLIP models that the losses use (see `seed.training.models`)."""

    vision: Optional[str] = None
    """``eva_vit_g.pth`` (BLIP-2's EVA ViT-g, bare state dict)."""
    qformer: Optional[str] = None
    """Stage 1: ``blip2_pretrained.pth``; stage 2: a stage-1 checkpoint (ours or the original's)."""
    stage2: Optional[str] = None
    """Stage-2 modules in the training names; null: constructor init from ``seed``."""
    seed: int = 0
    """Seed of every constructor init (the same model on every rank and rerun)."""
    bert_tokenizer: Optional[str] = None
    """BertTokenizer folder (bert-base-uncased); ``[DEC]`` is added as bos."""
    bert_config: Optional[str] = None
    """BertConfig json (vocab size, max positions); null: bert-base-uncased's."""
    clip_tokenizer: Optional[str] = None
    """SEED-1 objective: SD's CLIP tokenizer folder."""
    text_encoder: Optional[str] = None
    """SEED-1 objective: SD's CLIPTextModel folder."""
    clip_vision: Optional[str] = None
    """SEED-2 objective: CLIPVisionModelWithProjection folder (CLIP ViT-H/14)."""
    bert_model: Optional[str] = None
    """bert-base-uncased weights (a BertModel folder): what the original initialises from BERT (the
    stage-1 Q-Former when no BLIP-2 checkpoint is given; stage 2's Reverse Q-Former layers); null:
    random N(0, 0.02) (warned)."""


@dataclass
class ITCConfig:
    """Stage 1's image-text contrast (see `seed.training.models.Stage1Model`)."""

    embed_dim: int = 256
    """Width of ``vision_proj``/``text_proj`` (the compared features)."""
    max_txt_len: int = 32
    """BERT caption tokens (padding to max_length, truncation)."""
    temp: float = 0.07
    """Initial temperature (a BLIP-2 checkpoint's ``temp`` replaces it)."""
    label_smoothing: float = 0.1


@dataclass
class DataConfig:
    """Image-caption pairs and their processing (spec section 3)."""

    train: Optional[str] = None
    """A JSONL file of ``{"image": path relative to the file, "caption": str or list}``, or a
    WebDataset-style ``.tar`` shard, or a folder of them (``KEY.jpg/png`` + ``KEY.txt``/``.json``)."""
    batch_size: int = 64
    """Images per process and micro-step (the global batch is this x processes x grad_accum)."""
    num_workers: Optional[int] = None
    """DataLoader processes decoding images (0: in the training process; null: the CPUs this process
    may use, at most 4: `seed.dataset.default_workers`)."""
    image_size: Optional[int] = None
    """RandomResizedCrop size; null: ``model.image_size``."""
    min_scale: float = 0.5
    """RandomResizedCrop area scale range (min_scale, 1)."""
    flip: bool = True
    """RandomHorizontalFlip(0.5)."""
    max_words: int = 50
    """Captions are cut to this many words after cleaning."""
    val: Optional[str] = None
    """A held-out set in the formats of ``train`` (JSONL file, ``.tar`` shard, folder of shards): its
    loss is logged as ``val_loss`` every ``train.eval_every`` steps and at the end
    (`seed.training.val.PairValSet`: images resized, no crop or flip, each pair's first caption)."""
    val_batch_size: Optional[int] = None
    """Images per GLOBAL validation batch (all processes together; must divide by their number);
    null: ``batch_size``. Stage 1's contrastive loss compares the images of one batch, so this
    value (not the number of processes) decides what ``val_loss`` measures."""


@dataclass
class RunSection:
    """The run settings every trainer's ``train:`` section has (it subclasses this; see
    `seed.training.run`, which also exports it)."""

    output_dir: str = "outputs/train"
    """Checkpoints go to OUTPUT/checkpoints/, metrics to OUTPUT/metrics.jsonl."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (null: the trainer's default length)."""
    seed: int = 42
    """Seeds data order and augmentation and, + rank, every RNG (dropout...)."""
    save_every: int = 5000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints; 0: keep all."""
    log_every: int = 50
    """Log a line (losses, lr, throughput) every this many steps; metrics.jsonl gets every step."""
    eval_every: Optional[int] = None
    """Evaluate the held-out set ``data.val`` every this many steps (and at the last step);
    null: at the last step only. Needs ``data.val``."""
    tensorboard: Optional[bool] = None
    """Write TensorBoard logs to OUTPUT/tensorboard (``tensorboard --logdir OUTPUT``). null: when the
    ``tensorboard`` package is installed (./install.sh installs it); true: required."""
    progress: bool = True
    """Rank 0 shows a tqdm bar when stderr is a terminal; otherwise (a log file) a log line every
    ``log_every`` steps is the progress."""


@dataclass
class TrainSection(RunSection):
    """Optimiser, schedule, precision (spec sections 4 and 5) and the run settings of
    `seed.training.run.RunSection` (output folder, length, checkpoints, logging)."""

    output_dir: str = "outputs/train"
    """Checkpoints go to OUTPUT/checkpoints/, the stage-2 export to OUTPUT/export/."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps; null: max_epoch x iters_per_epoch. The schedule
    does not shrink with it (as the original, a shorter run is a run stopped early)."""
    seed: int = 42
    """Seeds data order and augmentation (the same for every world size) and, + rank, dropout."""
    max_epoch: int = 10
    """Cosine schedule length in "epochs" of ``iters_per_epoch`` iterations."""
    iters_per_epoch: int = 5000
    init_lr: float = 3e-5
    min_lr: float = 3e-6
    warmup_lr: float = 3e-7
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    precision: str = "fp16"
    """fp16 (autocast + GradScaler), bf16 (autocast) or fp32; on the CPU always fp32."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: Optional[float] = None
    """Clip the global gradient L2 norm to this; null: no clipping (the original)."""
    usage_window: int = 100
    """Stage 2: codebook usage is measured over the last this many steps."""
    dead_code_restart: bool = False
    """Stage 2: every ``usage_window`` steps, move codes unused in the window onto random
    encoder outputs of the current batch. Off by default (the original has no restart)."""
    find_unused_parameters: bool = False
    """Passed to DistributedDataParallel."""


@dataclass
class TrainConfig:
    stage: int = 1
    """1: causal Q-Former (contrastive); 2: codebook, decoder and generation embeddings."""
    objective: str = "seed1"
    """Stage 2 generation target: seed1 (SD text encoder, 77 x D) or seed2 (CLIP image embedding);
    seed2_head: seed2 with the committed code's 1-query Reverse Q-Former head (decoder.num_queries=1)."""
    dropout: float = 0.1
    """Q-Former dropout in train mode (0 for exactness checks)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    diffusion: Optional[DiffusionConfig] = None
    """Stage 2: the decode settings written into the exported tokenizer's config (null: defaults)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)


STAGES = (1, 2)
OBJECTIVES = ("seed1", "seed2", "seed2_head")
PRECISIONS = ("fp16", "bf16", "fp32")


def load_train_config(path: str | Path, *overrides: str) -> DictConfig:
    """Load and validate a training config (`TrainConfig`), with ``key=value`` overrides.

    Raises `seed.InputError` for an unknown key, a wrong type or a value out of range.
    """
    cfg = load_config(path, *overrides, schema=TrainConfig)
    where = f"{path}"
    checks = [
        (cfg.stage in STAGES, "stage", f"must be one of {STAGES}"),
        (cfg.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}"),
        (cfg.train.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}"),
        (cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
        (cfg.data.num_workers is None or cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0 or null"),
        (0 < cfg.data.min_scale <= 1, "data.min_scale", "must be in (0, 1]"),
        (cfg.data.max_words >= 1, "data.max_words", "must be >= 1 (captions are cut to this many words)"),
        (cfg.data.image_size is None or cfg.data.image_size >= 1, "data.image_size", "must be >= 1 or null"),
        (0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)"),
        (cfg.itc.embed_dim >= 1, "itc.embed_dim", "must be >= 1"),
        (cfg.itc.max_txt_len >= 1, "itc.max_txt_len", "must be >= 1"),
        (cfg.itc.temp > 0, "itc.temp", "must be > 0"),
        (0 <= cfg.itc.label_smoothing < 1, "itc.label_smoothing", "must be in [0, 1)"),
        (min(cfg.train.init_lr, cfg.train.min_lr, cfg.train.warmup_lr) >= 0, "train.init_lr",
         "train.init_lr, min_lr and warmup_lr must be >= 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (cfg.train.eps >= 0, "train.eps", "must be >= 0"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (cfg.train.iters_per_epoch >= 1, "train.iters_per_epoch", "must be >= 1"),
        (cfg.train.max_epoch >= 1, "train.max_epoch", "must be >= 1"),
        (cfg.train.usage_window >= 1, "train.usage_window", "must be >= 1"),
        (len(cfg.train.betas) == 2, "train.betas", "must be two numbers"),
        (cfg.train.grad_clip is None or cfg.train.grad_clip > 0, "train.grad_clip", "must be > 0 or null"),
    ]
    _raise_first(cfg, where, checks)
    check_run_section(cfg, where)
    return cfg


def check_run_section(cfg: DictConfig, where: str = "config") -> None:
    """Range checks of the `RunSection` keys under ``train:`` (`seed.InputError` naming the key)."""
    t = cfg.train
    _raise_first(cfg, where, [
        (t.max_steps is None or t.max_steps >= 0, "train.max_steps", "must be >= 0"),
        (t.save_every >= 1, "train.save_every", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.keep_last >= 0, "train.keep_last", "must be >= 0"),
    ])
    check_eval(cfg, where)


def check_eval(cfg: DictConfig, where: str = "config") -> None:
    """``train.eval_every`` >= 1 or null, and only with a held-out set ``data.val`` (an eval
    cadence without a set to evaluate is a mistake, not a no-op)."""
    every = OmegaConf.select(cfg, "train.eval_every")
    val = OmegaConf.select(cfg, "data.val")
    if every is not None and every < 1:
        raise InputError(f"{where}: bad value for 'train.eval_every' ({every!r}): must be >= 1, or null "
                         f"(evaluate data.val at the last step only)")
    if every is not None and val is None:
        raise InputError(f"{where}: train.eval_every={every} but no held-out set: pass data.val=FILE_OR_FOLDER, "
                         f"or drop train.eval_every")
    vb = OmegaConf.select(cfg, "data.val_batch_size")
    if vb is not None and vb < 1:
        raise InputError(f"{where}: bad value for 'data.val_batch_size' ({vb!r}): must be >= 1 or null")


def _raise_first(cfg: DictConfig, where: str, checks: list[tuple[bool, str, str]]) -> None:
    for ok, key, why in checks:
        if not ok:
            raise InputError(f"{where}: bad value for '{key}' ({OmegaConf.select(cfg, key)!r}): {why}")


def max_steps(cfg: DictConfig) -> int:
    """The number of optimizer steps of the run: ``train.max_steps``, else max_epoch x iters_per_epoch."""
    t = cfg.train
    return t.max_steps if t.max_steps is not None else t.max_epoch * t.iters_per_epoch


def image_size(cfg: DictConfig) -> int:
    """The training crop size: ``data.image_size``, else ``model.image_size``."""
    return cfg.data.image_size if cfg.data.image_size is not None else cfg.model.image_size
