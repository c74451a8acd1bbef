"""The tokenizer trainer: stage 1 / stage 2 on `seed.training.run`'s shared run machinery.

``train(cfg, resume=...)`` builds the model (`seed.training.models.build_model`), AdamW with the
original parameter groups, the original warmup + cosine schedule (set before every step), and
runs ``train.max_steps`` optimizer steps, one process or many (torchrun; DistributedDataParallel),
CPU or GPU, resumable bit-for-bit. Processes, the output folder, checkpoints, resume with the
checkpoint's config, ``metrics.jsonl``, the non-finite-loss stop and progress are `seed.training.run`'s
(see ``docs/training.md``); this module adds the model, the data, the step and the codebook-usage
statistics. Besides the run's own fields a checkpoint's ``state.pt`` holds ``optimizer``,
``scaler`` (GradScaler), ``position`` (data epoch and batch), ``global_batch``, ``usage`` (the
codebook-usage window) and ``skipped_images``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import resolve_path
from ..dataset import default_workers
from ..errors import InputError
from . import card
from .config import TrainConfig, image_size, max_steps
from .data import Position, build_loader, read_pairs
from .optim import lr_at_step, param_groups
from .run import (RUN_ONLY, Dist, NonFiniteError, Run, config_for_resume, load_checkpoint_config, non_finite,
                  prepare_output_dir, read_checkpoint, unwrap)

logger = logging.getLogger(__name__)


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


def _find_codebook(model: torch.nn.Module, size: int, dim: int) -> torch.nn.Parameter | None:
    """The trainable codebook parameter [size, dim] (for the dead-code restart)."""
    found = [p for n, p in model.trainable_named_parameters()
             if p.shape == (size, dim) and ("codebook" in n or "embed" in n)]
    return found[0] if len(found) == 1 else None


def train(cfg: DictConfig, resume: bool = False, build_model=None, overrides: Sequence[str] | None = None,
          command: Sequence[str] | None = None) -> dict:
    """Train per ``cfg`` (a validated `seed.training.config.TrainConfig`); returns a summary dict
    (``step``, ``output_dir``, ``export`` (stage 2) and the last step's metrics).

    ``resume``: continue from the newest checkpoint in ``OUTPUT/checkpoints`` with ITS config
    (`seed.training.run.config_for_resume`; none: start fresh, with a warning). ``overrides``: the
    command line's ``key=value`` strings, so a resume can tell a value given there (refused when
    it differs from the checkpoint's, except run-only keys) from one of the config file (the
    checkpoint's is used); None: every value of ``cfg`` counts as given. ``build_model``: a
    stand-in for `seed.training.models.build_model` (tests). ``command``: the script's ``[script,
    *args]`` for the export's model card (None: ``sys.argv``). Raises `seed.InputError`,
    `seed.CheckpointError`, or `seed.training.run.NonFiniteError` (a non-finite loss: stopped
    before the bad update; the last good checkpoint is kept, no export written).
    """
    run = Run(cfg, resume=resume, overrides=overrides, schema=TrainConfig, command=command)
    try:
        if run.cfg.data.train is None:
            raise InputError("data.train is not set: pass data.train=FILE.jsonl or data.train=DIR_OR_SHARD")
        return _train(run, build_model)
    finally:
        run.close()


def _train(run: Run, build_model) -> dict:
    cfg, d = run.cfg, run.dist
    t = cfg.train
    total_steps = max_steps(cfg)
    if build_model is None:
        from .models import build_model
    model = build_model(cfg)
    model = model.to_device(d.device) if hasattr(model, "to_device") else model.to(d.device)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.init_lr, betas=tuple(t.betas), eps=t.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=d.device.type == "cuda" and t.precision == "fp16")
    usage = CodebookUsage(cfg.model.codebook.size, t.usage_window) if cfg.stage == 2 else None

    step, position, skipped_total = run.start_step, Position(), 0
    if run.resumed:
        state = run.state
        model.load_trainable_state_dict(run.tensors, str(run.checkpoint))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        position = Position(**state["position"])
        old_global = state["global_batch"]
        if old_global != cfg.data.batch_size * d.world_size:  # a new world size: same sample count
            samples = position.index * old_global
            position = Position(position.epoch, samples // (cfg.data.batch_size * d.world_size))
            logger.warning("resuming with a global batch of %d (was %d): continuing at sample %d of epoch %d; "
                           "not bit-for-bit", cfg.data.batch_size * d.world_size, old_global, samples, position.epoch)
        skipped_total = state.get("skipped_images", 0)
        if usage is not None and state.get("usage") is not None:
            usage.load(state["usage"])
        logger.info("data epoch %d, batch %d", position.epoch, position.index)

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
        seed=t.seed, start=position, min_scale=cfg.data.min_scale,
        num_workers=default_workers() if cfg.data.num_workers is None else cfg.data.num_workers,
        flip=cfg.data.flip, max_words=cfg.data.max_words, pin_memory=d.device.type == "cuda")
    batches: Iterator[dict] = iter(loader)
    val = build_val(cfg, d)
    run.begin(total_steps)  # after building the loader, so nothing after this point differs from the first run
    if d.main:
        logger.info("%d pairs, %d processes x %d images x %d accumulation = %d per step, %d batches per epoch; "
                    "steps %d -> %d on %s", len(pairs), d.world_size, cfg.data.batch_size, t.grad_accum,
                    cfg.data.batch_size * d.world_size * t.grad_accum, per_epoch, step, total_steps, d.device)
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

            names = sorted(sums)  # the step's terms, averaged over ranks before the update
            vec = torch.stack([sums[k] / t.grad_accum for k in names] + [torch.tensor(float(skipped), device=d.device)])
            if d.world_size > 1:
                dist.all_reduce(vec)
                if counts is not None:
                    dist.all_reduce(counts)
                vec[:-1] /= d.world_size
            terms = {k: v.item() for k, v in zip(names, vec[:-1])}
            run.check_finite(step + 1, terms)  # every rank sees the same values: all stop together

            if t.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            row = {"step": step, "lr": lr, **terms}
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
            if val is not None and (step == total_steps or (t.eval_every and step % t.eval_every == 0)):
                row["val_loss"] = val.evaluate(net, d.device, lambda: _autocast(d, t.precision))
            if run.log_due(step):
                now = time.perf_counter()
                row["images_per_s"] = global_images * (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
            run.log(row)
            last = row

            if run.save_due(step):
                run.save(step, dict(net.trainable_named_parameters()), {
                    "position": {"epoch": position.epoch, "index": position.index},
                    "global_batch": cfg.data.batch_size * d.world_size,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "usage": usage.state() if usage is not None else None,
                    "skipped_images": skipped_total,
                })
    finally:
        del batches

    summary = {"step": step, "output_dir": str(run.out_dir), **last}
    if cfg.stage == 2:
        export_dir = run.out_dir / "export"
        if d.main:
            _export(net, export_dir)
            card.write_card(export_dir, card.tokenizer_record(
                cfg, out_dir=run.out_dir, step=step, pairs=len(pairs), val_pairs=val.samples if val else None,
                skipped_images=skipped_total, world_size=d.world_size, command=run.command))
            logger.info("exported the tokenizer to %s (seed.Tokenizer.from_pretrained)", export_dir)
        summary["export"] = str(export_dir)
    d.barrier()
    return summary


def build_val(cfg: DictConfig, d: Dist):
    """The held-out pairs of ``data.val`` for this rank (`seed.training.val.PairValSet`), or None."""
    if cfg.data.val is None:
        return None
    from .val import PairValSet

    if cfg.train.eval_every is None:
        logger.info("data.val without train.eval_every: evaluated at the last step only")
    return PairValSet(resolve_path(cfg.data.val), image_size=image_size(cfg),
                      batch_size=cfg.data.val_batch_size or cfg.data.batch_size, rank=d.rank, world_size=d.world_size,
                      seed=cfg.train.seed, max_words=cfg.data.max_words, num_workers=cfg.data.num_workers,
                      resample=cfg.model.image_resample)


def _export(model: torch.nn.Module, out: str | os.PathLike) -> Path:
    bad = non_finite(dict(model.trainable_named_parameters()))
    if bad:
        raise NonFiniteError(f"not exporting to {out}: non-finite values in {', '.join(bad[:5])}")
    return Path(model.export(out))


def export_checkpoint(cfg: DictConfig, checkpoint: str | os.PathLike, out: str | os.PathLike, build_model=None,
                      overrides: Sequence[str] | None = None, command: Sequence[str] | None = None) -> Path:
    """Export a stage-2 checkpoint folder as a ``Tokenizer.save_pretrained`` folder at ``out``.

    The model (frozen parts included) is built from the checkpoint's ``config.yaml``, as a resume
    (`seed.training.run.config_for_resume`): an override of a key that shapes the model with
    another value than the checkpoint's is refused, naming the key. ``out`` is checked before
    anything is built."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise InputError(f"--export-from {checkpoint}: not a folder (give a checkpoints/step_XXXXXXXX folder)")
    tensors, _ = read_checkpoint(checkpoint)
    cfg = config_for_resume(load_checkpoint_config(checkpoint, TrainConfig), cfg, overrides, RUN_ONLY,
                            what="--export-from")
    if cfg.stage != 2:
        raise InputError(f"{checkpoint}: a stage-{cfg.stage} checkpoint; only stage 2 exports a tokenizer")
    prepare_output_dir(out, "--export-to")
    if build_model is None:
        from .models import build_model
    model = build_model(cfg)
    model.load_trainable_state_dict(tensors, str(checkpoint))
    folder = _export(model, out)
    step = int(re.sub(r"\D", "", checkpoint.name) or 0)
    card.write_card(folder, card.tokenizer_record(cfg, out_dir=checkpoint.parent.parent, step=step, command=command))
    return folder
