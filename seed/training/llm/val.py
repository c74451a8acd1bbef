"""The SEED-LLaMA trainer's held-out loss (``data.val``): the same number on any number of
processes, at every evaluation of the same weights, resumed or not.

``data.val`` is a path or a list of paths read like ``data.train`` (files, folders, globs,
``tokenize_dataset.py`` folders; format auto), or one source's settings ``{path, format,
options, max_length, batch_size, name}`` (e.g. ``format: sft_qa`` for caption rows held out of an
instruction-tuning run). Its rows are read once at the start, in file order with no shuffle, and
formatted with draws seeded by ``train.seed`` (the same plans at every evaluation); bad rows are
skipped and counted, as in training.

``val_loss`` is the token mean of the next-token loss over ALL learned tokens (labels != -100
after the shift) of the whole set: each process sums the loss of its share of every global batch
(``batch_size`` samples; rank r takes the r-th contiguous share), the sums and token counts are
all-reduced, then divided. The model runs in eval mode (no dropout) under `no_grad`, inside
`seed.training.run.preserved_rng`, so evaluating changes nothing in the training that follows.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ...errors import InputError
from ..run import preserved_rng
from .data import ImageCodes, _Stream, sources_from_config
from .format import SampleEncoder, collate

logger = logging.getLogger(__name__)

VAL_KEYS = ("path", "name", "format", "options", "max_length", "batch_size")


def val_entry(spec: Any) -> dict:
    """``data.val`` (a path, a list of paths, or a mapping of `VAL_KEYS`) -> one source's settings.
    Raises `seed.InputError` naming ``data.val`` for anything else."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, tuple):
        spec = list(spec)
    if isinstance(spec, (str, os.PathLike)) or (isinstance(spec, list) and spec
                                                 and all(isinstance(p, (str, os.PathLike)) for p in spec)):
        return {"path": spec, "name": "val"}
    if isinstance(spec, Mapping):
        extra = sorted(set(map(str, spec)) - set(VAL_KEYS))
        if extra:
            raise InputError(f"data.val: unknown key(s) {extra}; a held-out source takes {list(VAL_KEYS)}")
        if not spec.get("path"):
            raise InputError("data.val: give its path (data.val.path=FILE_OR_FOLDER)")
        return {"name": "val", **dict(spec)}
    raise InputError(f"data.val: a path, a list of paths, or {{path, format, ...}}; got {spec!r}")


class LlmValSet:
    """The held-out samples of this rank, in global batches, and `evaluate`.

    ``data_cfg``: the ``data:`` section (``val``, and ``batch_size``/``max_length``/
    ``image_tokenizer`` as defaults). ``images``: an `ImageCodes` to share with the training data
    (one image tokenizer in memory); None: a new one from ``data.image_tokenizer``."""

    def __init__(self, data_cfg: Any, tokenizer: Any, *, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), images: ImageCodes | None = None):
        get = (lambda k: data_cfg.get(k)) if hasattr(data_cfg, "get") else (lambda k: getattr(data_cfg, k))
        entry = val_entry(get("val"))
        [src] = sources_from_config({"sources": [entry], "batch_size": get("batch_size"),
                                     "max_length": get("max_length")})
        src.cycle = 1
        self.source, self.rank, self.world_size = src, rank, world_size
        self.encoder = SampleEncoder(tokenizer)
        with preserved_rng(device):  # reading and formatting draws nothing from the training's RNGs
            stream = _Stream(src, 0, seed, False, images or ImageCodes(get("image_tokenizer")))
            plans = []
            while (plan := stream.next_plan()) is not None:
                plans.append(plan)
        self.counts = dict(stream.counts)
        if not plans:
            raise InputError(f"data.val: no usable sample in {len(src.files)} file(s) "
                             f"({self.counts['bad']} bad rows, {self.counts['dropped']} dropped)")
        g, w = src.batch_size, world_size
        self.batches: list[list[tuple[list[int], list[int]]]] = []
        for i in range(0, len(plans), g):
            part = plans[i:i + g]
            n = len(part)
            self.batches.append([self.encoder.encode(p, src.max_length) for p in part[rank * n // w:(rank + 1) * n // w]])
        self.samples = len(plans)
        logger.info("data.val: %d samples from %d rows of %d file(s) (%d bad, %d dropped), %d batches of %d",
                    len(plans), self.counts["rows"], len(src.files), self.counts["bad"], self.counts["dropped"],
                    len(self.batches), g)

    def evaluate(self, model: torch.nn.Module, *, device: torch.device, amp: torch.dtype | None = None) -> float:
        """The token-mean loss of ``model`` over the whole set (collective: every rank calls it with
        its model; under FSDP pass the sharded model, under DDP the module inside). Every rank runs
        the same number of forwards (an empty share runs a 1-token batch that counts nothing)."""
        # ``model`` is what the trainer steps: with train.loss_chunk the `ChunkedLossLM` (no whole logits)
        was_training = model.training
        total = torch.zeros(2, dtype=torch.float64, device=device)
        pad = self.encoder.pad
        with preserved_rng(device), torch.no_grad():
            model.eval()
            try:
                for samples in self.batches:
                    if samples:
                        batch = collate(samples, max(len(x) for x, _ in samples), pad)
                    else:
                        batch = collate([([pad], [-100])], 1, pad)
                    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                    n = int((labels[:, 1:] != -100).sum())
                    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                        # num_items_in_batch=1: HF's loss is then the SUM of the per-token losses
                        out = model(input_ids=ids, labels=labels, use_cache=False,
                                    num_items_in_batch=torch.tensor(1.0, device=device))
                    if n:
                        total[0] += out.loss.double()
                        total[1] += n
            finally:
                model.train(was_training)
        if self.world_size > 1:
            dist.all_reduce(total)
        if total[1] == 0:
            raise InputError("data.val: its samples hold no learned token (every label is masked)")
        return float(total[0] / total[1])
