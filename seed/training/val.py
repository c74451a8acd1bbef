"""The tokenizer trainer's held-out loss (``data.val``): the same number on any number of
processes, at every evaluation of the same weights, resumed or not.

The pairs of ``data.val`` (the formats of ``data.train``) are cut, in file order, into global
batches of ``data.val_batch_size`` (null: ``data.batch_size``) images; the pairs after the last
whole batch are left out (logged), because stage 1's contrastive loss compares the images of a
batch, so a batch's size is part of what the loss means. Rank r of W takes the r-th contiguous
share of every batch (stage 1 gathers the features of all ranks, as in training). Images are
resized to the model's input size (no crop, no flip: `seed.images.preprocess_image`, as the
tokenizer's own ``encode``); the caption of a pair with several is a fixed draw per pair.

``val_loss`` is the mean of the batches' ``loss`` (the training objective, in eval mode: no
dropout), averaged over the ranks' equal shares: the mean over the whole set for stage 2's
per-image terms. It runs under `seed.training.run.preserved_rng` with ``torch.no_grad``, so
evaluating changes nothing in the training that follows.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader

from ..errors import InputError
from ..images import preprocess_image, to_rgb
from .data import PairDataset, collate, read_pairs
from .run import preserved_rng

logger = logging.getLogger(__name__)


class EvalTransform:
    """Resize to ``size`` x ``size`` (``resample`` filter), CLIP normalize: float32 [3,size,size].
    The ``seed`` argument of `PairDataset`'s transforms is ignored (nothing is random)."""

    def __init__(self, size: int, resample: str = "bicubic"):
        self.size, self.resample = size, resample

    def __call__(self, img: Image.Image, seed: int = 0) -> torch.Tensor:
        return preprocess_image(to_rgb(img), self.size, self.resample)


class PairValSet:
    """This rank's share of the held-out pairs of ``path``, and `evaluate`."""

    def __init__(self, path: str | os.PathLike, *, image_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 42, max_words: int = 50, num_workers: int = 0,
                 resample: str = "bicubic"):
        if batch_size % world_size:
            raise InputError(f"data.val_batch_size (or data.batch_size) {batch_size}: a global validation batch must "
                             f"divide by the {world_size} processes; pass data.val_batch_size=N with N a multiple")
        self.pairs = read_pairs(path, "data.val")
        n = len(self.pairs)
        self.num_batches = n // batch_size
        if self.num_batches == 0:
            raise InputError(f"data.val: {path}: {n} pairs, fewer than one validation batch of {batch_size}; pass "
                             f"data.val_batch_size={n} (or fewer) or hold out more pairs")
        if n % batch_size:
            logger.info("data.val: the last %d of %d pairs are left out (not a whole batch of %d)",
                        n % batch_size, n, batch_size)
        self.samples = self.num_batches * batch_size
        self.world_size, self.seed, self.num_workers = world_size, seed, num_workers
        share = batch_size // world_size
        self.keys = [[(0, b * batch_size + rank * share + i) for i in range(share)] for b in range(self.num_batches)]
        self.dataset = PairDataset(self.pairs, EvalTransform(image_size, resample), seed=seed, max_words=max_words)
        logger.info("data.val: %d pairs in %d batches of %d", self.samples, self.num_batches, batch_size)

    def evaluate(self, model: torch.nn.Module, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
        """The mean ``loss`` of ``model`` (the module itself, not its DDP wrapper) over the set
        (collective: every rank calls it)."""
        loader = DataLoader(self.dataset, batch_sampler=self.keys, num_workers=self.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(self.seed))
        was_training = model.training
        total = torch.zeros(1, dtype=torch.float64, device=device)
        skipped = 0
        with preserved_rng(device), torch.no_grad():
            model.eval()
            try:
                for batch in loader:
                    skipped += len(batch["skipped"])
                    with autocast():
                        out = model(batch["pixel_values"].to(device), batch["captions"])
                    total += out["loss"].double()
            finally:
                model.train(was_training)
        if skipped:
            logger.warning("data.val: %d unreadable image(s) replaced by the next pair", skipped)
        if self.world_size > 1:
            dist.all_reduce(total)
        return float(total.item() / (self.num_batches * self.world_size))
