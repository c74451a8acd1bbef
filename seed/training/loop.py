"""The training loop: one process or many (torchrun), CPU or GPU, resumable bit-for-bit.

``train(cfg, resume=...)`` builds the model (`seed.training.models.build_model`), AdamW with the
original parameter groups, the original warmup + cosine schedule (set before every step), and
runs ``train.max_steps`` optimizer steps. Under torchrun (``WORLD_SIZE`` > 1) it joins the
process group from the environment (NCCL on GPUs, gloo on the CPU) and wraps the model in
DistributedDataParallel; rank 0 writes every file.

Checkpoints: ``OUTPUT/checkpoints/step_XXXXXXXX/`` holds ``model.safetensors`` (the trainable
parameters, by name), ``state.pt`` (optimizer, GradScaler, step, data position, the RNG states
of torch/CUDA/numpy/python of every rank, the codebook-usage window; plain tensors and numbers,
``torch.load(weights_only=True)``) and ``config.yaml``. Each is written into a temporary folder,
fsynced, and the folder renamed into place, so a checkpoint folder is always complete.
``OUTPUT/metrics.jsonl`` gets one line per step (losses averaged over ranks, lr, images/s).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..config import resolve_path
from ..dataset import fsync_path
from ..errors import CheckpointError, InputError
from .config import image_size, max_steps
from .data import Position, build_loader, read_pairs
from .optim import lr_at_step, param_groups

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^step_(\d{8})$")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.yaml"


# --- processes ----------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join torchrun's process group from its environment variables (none set: 1 process).

    NCCL when CUDA is available, else gloo; each process uses GPU ``LOCAL_RANK``.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank, world, local, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


# --- RNG states as plain tensors (weights_only-loadable) ----------------------------------------

def rng_state(device: torch.device) -> dict:
    """The torch (CPU and this CUDA device), numpy and python RNG states, as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoints --------------------------------------------------------------------------------

def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders under ``OUTPUT/checkpoints``, oldest first."""
    d = Path(output_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)), key=lambda p: p.name)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict, config_yaml: str) -> None:
    """Write one checkpoint folder atomically: into ``.NAME.tmp``, fsync every file and the
    folder, then rename to ``NAME`` (replacing an older one of the same name) and fsync the parent."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt"})
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        fsync_path(tmp / name)
    fsync_path(tmp)
    if folder.exists():
        old = parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    fsync_path(parent)


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(trainable parameters by name, state)`` of a checkpoint folder written by `write_checkpoint`."""
    folder = Path(folder)
    for name in (MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; not a checkpoint folder written by train_tokenizer.py")
    try:
        return load_file(str(folder / MODEL_FILE)), torch.load(folder / STATE_FILE, weights_only=True,
                                                                map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


# --- codebook usage -----------------------------------------------------------------------------

class CodebookUsage:
    """Code counts over the last ``window`` steps (all ranks): perplexity and share of codes used."""

    def __init__(self, size: int, window: int):
        self.size, self.counts = size, deque(maxlen=window)

    def add(self, counts: torch.Tensor) -> None:
        self.counts.append(counts.to(torch.int64).cpu())

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.counts)).sum(0) if self.counts else torch.zeros(self.size, dtype=torch.int64)

    def stats(self) -> dict[str, float]:
        """``perplexity`` (exp of the code-distribution entropy; ``size`` = all equally used) and
        ``codes_used`` (share of the codebook used at least once in the window)."""
        total = self.total().double()
        if total.sum() == 0:
            return {"perplexity": 0.0, "codes_used": 0.0}
        p = total / total.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {"perplexity": math.exp(entropy), "codes_used": (total > 0).double().mean().item()}

    def state(self) -> torch.Tensor:
        return torch.stack(list(self.counts)).to(torch.int32) if self.counts else torch.zeros(0, self.size, dtype=torch.int32)

    def load(self, t: torch.Tensor) -> None:
        self.counts.clear()
        for row in t.to(torch.int64):
            self.counts.append(row)


def restart_dead_codes(codebook: torch.Tensor, dead: torch.Tensor, candidates: torch.Tensor,
                       gen: torch.Generator) -> int:
    """Move the ``dead`` rows (bool [K]) of ``codebook`` [K,D] onto rows of ``candidates`` [N,D]
    (encoder outputs of the current batch) drawn with ``gen``; returns how many moved."""
    n = int(dead.sum())
    if n == 0 or candidates.numel() == 0:
        return 0
    pick = torch.randint(0, candidates.shape[0], (n,), generator=gen)
    with torch.no_grad():
        codebook[dead.to(codebook.device)] = candidates[pick].to(codebook.device, codebook.dtype)
    return n


# --- the loop -----------------------------------------------------------------------------------

def _autocast(d: Dist, precision: str):
    if d.device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def _schedule(cfg: DictConfig) -> dict:
    t = cfg.train
    return dict(init_lr=t.init_lr, min_lr=t.min_lr, warmup_lr=t.warmup_lr, warmup_steps=t.warmup_steps,
                max_epoch=t.max_epoch)


def _scalar_terms(out: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if k != "codes" and torch.is_tensor(v) and v.ndim == 0}


def _prune_metrics(path: Path, last_step: int) -> None:
    """Drop the metric lines of steps after ``last_step`` (left by a run stopped after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _find_codebook(model: torch.nn.Module, size: int, dim: int) -> torch.nn.Parameter | None:
    """The trainable codebook parameter [size, dim] (for the dead-code restart)."""
    found = [p for n, p in model.trainable_named_parameters()
             if p.shape == (size, dim) and ("codebook" in n or "embed" in n)]
    return found[0] if len(found) == 1 else None


def train(cfg: DictConfig, resume: bool = False, build_model=None) -> dict:
    """Train per ``cfg`` (a validated `seed.training.config.TrainConfig`); returns a summary dict
    (``step``, ``output_dir``, ``export`` (stage 2) and the last step's metrics).

    ``resume``: continue from the newest checkpoint in ``OUTPUT/checkpoints`` (none: start fresh,
    with a warning). ``build_model``: a stand-in for `seed.training.models.build_model` (tests).
    """
    d = setup_distributed()
    t = cfg.train
    out_dir = Path(t.output_dir).expanduser()
    total_steps = max_steps(cfg)
    if cfg.data.train is None:
        raise InputError("data.train is not set: pass data.train=FILE.jsonl or data.train=DIR_OR_SHARD")
    if not resume and checkpoints(out_dir):
        raise InputError(f"{out_dir} already holds checkpoints ({checkpoints(out_dir)[-1].name}): pass --resume "
                         f"to continue that run, or choose another train.output_dir")
    if t.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("train.tensorboard=true needs the tensorboard package: "
                             "pip install 'seed[train]' (or pip install tensorboard)") from None
    seed_everything(t.seed + d.rank)
    if build_model is None:
        from .models import build_model
    model = build_model(cfg)
    model = model.to_device(d.device) if hasattr(model, "to_device") else model.to(d.device)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.init_lr, betas=tuple(t.betas), eps=t.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=d.device.type == "cuda" and t.precision == "fp16")
    usage = CodebookUsage(cfg.model.codebook.size, t.usage_window) if cfg.stage == 2 else None

    step, position, rng, skipped_total = 0, Position(), None, 0
    found = checkpoints(out_dir) if resume else []
    if resume and not found:
        logger.warning("--resume: no checkpoint in %s; starting from the beginning", out_dir / "checkpoints")
    if found:
        tensors, state = read_checkpoint(found[-1])
        model.load_trainable_state_dict(tensors, str(found[-1]))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        position = Position(**state["position"])
        old_global = state["global_batch"]
        if old_global != cfg.data.batch_size * d.world_size:  # a new world size: same sample count
            samples = position.index * old_global
            position = Position(position.epoch, samples // (cfg.data.batch_size * d.world_size))
            logger.warning("resuming with a global batch of %d (was %d): continuing at sample %d of epoch %d; "
                           "not bit-for-bit", cfg.data.batch_size * d.world_size, old_global, samples, position.epoch)
        if len(state["rng"]) == d.world_size:
            rng = state["rng"][d.rank]
        else:
            logger.warning("resuming with %d processes (was %d): fresh RNG states", d.world_size, len(state["rng"]))
        skipped_total = state.get("skipped_images", 0)
        if usage is not None and state.get("usage") is not None:
            usage.load(state["usage"])
        logger.info("resumed from %s (step %d, data epoch %d, batch %d)", found[-1], step, position.epoch,
                    position.index)

    if d.world_size > 1:
        model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                    find_unused_parameters=t.find_unused_parameters)
    net = unwrap(model)
    codebook = _find_codebook(net, cfg.model.codebook.size, cfg.model.codebook.dim) if t.dead_code_restart else None
    if t.dead_code_restart and (cfg.stage != 2 or codebook is None):
        raise InputError("train.dead_code_restart needs a stage-2 model with one trainable codebook")

    pairs = read_pairs(resolve_path(cfg.data.train))
    loader, per_epoch = build_loader(
        pairs, image_size=image_size(cfg), batch_size=cfg.data.batch_size, rank=d.rank, world_size=d.world_size,
        seed=t.seed, start=position, num_workers=cfg.data.num_workers, min_scale=cfg.data.min_scale,
        flip=cfg.data.flip, max_words=cfg.data.max_words, pin_memory=d.device.type == "cuda")
    batches: Iterator[dict] = iter(loader)
    if rng is not None:  # after building the loader, so nothing after this point differs from the first run
        set_rng_state(rng, d.device)

    metrics_path = out_dir / "metrics.jsonl"
    writer = None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _prune_metrics(metrics_path, step)
        (out_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
        logger.info("%d pairs, %d processes x %d images x %d accumulation = %d per step, %d batches per epoch; "
                    "steps %d -> %d on %s", len(pairs), d.world_size, cfg.data.batch_size, t.grad_accum,
                    cfg.data.batch_size * d.world_size * t.grad_accum, per_epoch, step, total_steps, d.device)
        if t.tensorboard:
            writer = SummaryWriter(str(out_dir / "tensorboard"))
    bar = tqdm(total=total_steps, initial=step, disable=not (d.main and t.progress), unit="step", dynamic_ncols=True)
    trainable = [p for _, p in net.trainable_named_parameters()]
    global_images = cfg.data.batch_size * d.world_size * t.grad_accum
    last = {}
    tick, tick_step = time.perf_counter(), step
    try:
        while step < total_steps:
            lr = lr_at_step(step, t.iters_per_epoch, **_schedule(cfg))
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, torch.Tensor] = {}
            skipped = 0
            counts = torch.zeros(cfg.model.codebook.size, dtype=torch.int64, device=d.device) if usage else None
            candidates = []
            for micro in range(t.grad_accum):
                batch = next(batches)
                position = position.advanced(per_epoch)
                for item_id, err in batch["skipped"]:
                    logger.warning("skipped a bad image: %s", err)
                skipped += len(batch["skipped"])
                pixels = batch["pixel_values"].to(d.device, non_blocking=True)
                sync = micro == t.grad_accum - 1 or not isinstance(model, DDP)
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with _autocast(d, t.precision):
                        out = (model(pixels, batch["captions"], intermediates=True) if codebook is not None
                               else model(pixels, batch["captions"]))
                    scaler.scale(out["loss"] / t.grad_accum).backward()
                for k, v in _scalar_terms(out).items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                if counts is not None and "codes" in out:
                    counts += torch.bincount(out["codes"].reshape(-1), minlength=counts.numel())
                if codebook is not None and "z_e" in out:
                    candidates.append(out["z_e"].detach().reshape(-1, codebook.shape[1]))
            if t.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            names = sorted(sums)
            vec = torch.stack([sums[k] / t.grad_accum for k in names] + [torch.tensor(float(skipped), device=d.device)])
            if d.world_size > 1:
                dist.all_reduce(vec)
                if counts is not None:
                    dist.all_reduce(counts)
                vec[:-1] /= d.world_size
            row = {"step": step, "lr": lr, **{k: v.item() for k, v in zip(names, vec[:-1])}}
            skipped_total += int(vec[-1].item())
            row["skipped_images"] = skipped_total
            if usage is not None:
                usage.add(counts)
                row.update(usage.stats())
                if codebook is not None and step % t.usage_window == 0:
                    dead = usage.total() == 0
                    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
                    if d.main:
                        cand = torch.cat(candidates) if candidates else torch.empty(0, codebook.shape[1])
                        moved = restart_dead_codes(codebook.data, dead, cand.float().cpu(), gen)
                        logger.info("step %d: restarted %d dead codes", step, moved)
                    if d.world_size > 1:
                        dist.broadcast(codebook.data, 0)
            now = time.perf_counter()
            if step % t.log_every == 0 or step == total_steps:
                row["images_per_s"] = global_images * (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                if d.main:
                    logger.info("step %d/%d  %s", step, total_steps, "  ".join(
                        f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
            last = row
            if d.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for k, v in row.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
            bar.update(1)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", lr=f"{lr:.3g}")

            if step % t.save_every == 0 or step == total_steps:
                save(out_dir, d, net, optimizer, scaler, step, position, usage, cfg, skipped_total)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        del batches

    summary = {"step": step, "output_dir": str(out_dir), **last}
    if cfg.stage == 2:
        export_dir = out_dir / "export"
        if d.main:
            net.export(export_dir)
            logger.info("exported the tokenizer to %s (seed.Tokenizer.from_pretrained)", export_dir)
        summary["export"] = str(export_dir)
    d.barrier()
    return summary


def save(out_dir: Path, d: Dist, net: torch.nn.Module, optimizer, scaler, step: int, position: Position,
         usage: CodebookUsage | None, cfg: DictConfig, skipped_images: int = 0) -> None:
    """Gather every rank's RNG state and let rank 0 write checkpoint ``step`` (atomically)."""
    rng = rng_state(d.device)
    if d.world_size > 1:
        states = [None] * d.world_size
        dist.all_gather_object(states, rng)
        states = [{k: _to_cpu(v) for k, v in s.items()} for s in states]
    else:
        states = [rng]
    if d.main:
        state = {
            "format": 1,
            "step": step,
            "position": {"epoch": position.epoch, "index": position.index},
            "global_batch": cfg.data.batch_size * d.world_size,
            "world_size": d.world_size,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": states,
            "usage": usage.state() if usage is not None else None,
            "skipped_images": skipped_images,
        }
        folder = out_dir / "checkpoints" / f"step_{step:08d}"
        write_checkpoint(folder, dict(net.trainable_named_parameters()), state, OmegaConf.to_yaml(cfg))
        logger.info("checkpoint %s", folder)
        keep = cfg.train.keep_last
        if keep:
            for old in checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _to_cpu(v):
    if torch.is_tensor(v):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v


def export_checkpoint(cfg: DictConfig, checkpoint: str | os.PathLike, out: str | os.PathLike, build_model=None) -> Path:
    """Export a stage-2 checkpoint folder as a ``Tokenizer.save_pretrained`` folder at ``out``."""
    if cfg.stage != 2:
        raise InputError("only a stage-2 checkpoint exports a tokenizer (this config has stage 1)")
    if build_model is None:
        from .models import build_model
    model = build_model(cfg)
    tensors, _ = read_checkpoint(checkpoint)
    model.load_trainable_state_dict(tensors, str(checkpoint))
    model.export(out)
    return Path(out)
