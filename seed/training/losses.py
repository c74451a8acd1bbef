"""The original SEED training losses (stage 1: contrastive; stage 2: reconstruction, generation).

The VQ loss lives beside the quantizer (`seed.quantizer.vq_loss`). Every function takes float
tensors and returns a 0-d float tensor (with grad where its inputs have one).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B,...] of every rank, concatenated in rank order [world*B,...], with NO gradient.

    As the original ``concat_all_gather`` (run under ``torch.no_grad``): the gathered copies,
    this rank's included, are detached, also in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-1 image-text contrastive loss, exactly as the original (``blip2_qformer_casual``).

    ``image_feat``, ``text_feat``: L2-normalised features [B,D] of this rank; ``temp``: the
    learned 0-d temperature (divides, no clamp). Each side is compared with the other side's
    features of all ranks, gathered without gradient (`gather_without_grad`), so the i2t term
    trains the image side only and the t2i term the text side only. Targets: rank*B + i.
    Returns ``(loss, sim_i2t, sim_t2i)``, the similarities [B, world*B].
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    sim_i2t = image_feat @ gather_without_grad(text_feat).t() / temp
    sim_t2i = text_feat @ gather_without_grad(image_feat).t() / temp
    b = image_feat.shape[0]
    targets = torch.arange(rank * b, rank * b + b, device=image_feat.device)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


def cosine_recon_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cos(recon, target), [...,D] each (no eps: the original's
    ``calculate_rec_loss`` divides by the plain L2 norms)."""
    target = target / target.norm(dim=-1, keepdim=True)
    recon = recon / recon.norm(dim=-1, keepdim=True)
    return (1 - (target * recon).sum(-1)).mean()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (generation embeddings vs. their target; no mask)."""
    return ((pred - target) ** 2).mean()
