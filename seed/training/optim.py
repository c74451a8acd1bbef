"""The original optimiser parameter groups and learning-rate schedule (LAVIS ``runner_base``, ``optims``)."""

from __future__ import annotations

import math

from torch import nn


def no_decay(name: str, ndim: int) -> bool:
    """The original rule: no weight decay when ``ndim < 2`` or the name contains bias, ln or bn."""
    return ndim < 2 or "bias" in name or "ln" in name or "bn" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]``.

    Only parameters with requires_grad, in ``named_parameters`` order (``model.
    trainable_named_parameters()`` when the model has it). Each group also carries ``"names"``
    (the parameter names), which torch's optimisers keep and ignore.
    """
    named = (model.trainable_named_parameters() if hasattr(model, "trainable_named_parameters")
             else [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    decay = [(n, p) for n, p in named if p.requires_grad and not no_decay(n, p.ndim)]
    rest = [(n, p) for n, p in named if p.requires_grad and no_decay(n, p.ndim)]
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in rest], "names": [n for n, _ in rest], "weight_decay": 0.0},
    ]


def linear_warmup_cosine_lr(epoch: int, iteration: int, *, init_lr: float, min_lr: float, warmup_lr: float,
                            warmup_steps: int, max_epoch: int) -> float:
    """The learning rate for ``iteration`` of ``epoch`` (both from 0), as the original sets it.

    Epoch 0: linear warmup from ``warmup_lr``, capped at ``init_lr`` (iteration 0 runs at
    ``warmup_lr``; warmup past the end of epoch 0 is cut off). Epoch e >= 1: constant within the
    epoch, ``min_lr + (init_lr - min_lr) * (1 + cos(pi * e / max_epoch)) / 2``.
    """
    if epoch == 0:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * iteration / max(warmup_steps, 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def lr_at_step(step: int, iters_per_epoch: int, **schedule) -> float:
    """`linear_warmup_cosine_lr` for a global step (epoch = step // iters_per_epoch; 5,000 originally)."""
    return linear_warmup_cosine_lr(step // iters_per_epoch, step % iters_per_epoch, **schedule)
