"""Stage 3: down-projection and nearest-neighbour quantization to a codebook."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from .checkpoint import KeyMap
from .errors import InputError


class Quantizer(nn.Module):
    """Causal embeddings [B,32,hidden] -> codes [B,32] int64 in ``[0, codebook.size)``.

    ``down``: Linear hidden->hidden, tanh, Linear hidden->dim; each vector takes the index of
    its nearest codebook row in Euclidean distance (no normalization).
    """

    def __init__(self, model_cfg: DictConfig):
        super().__init__()
        h, c = model_cfg.qformer.hidden_size, model_cfg.codebook
        self.down = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c.dim))
        self.codebook = nn.Embedding(c.size, c.dim)
        # The original VectorQuantizer's init; with N(0,1) rows a random model maps every vector to one code.
        nn.init.uniform_(self.codebook.weight, -1.0 / c.size, 1.0 / c.size)

    def forward(self, causal_embeds: torch.Tensor) -> torch.Tensor:
        return self.nearest(self.down(causal_embeds.to(self.codebook.weight.dtype)))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Down-projected vectors [...,dim] -> index of the nearest codebook row, int64 [...]."""
        e = self.codebook.weight
        # ||z||^2 + ||e||^2 - 2 z.e, as the original VectorQuantizer computes it
        dist = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
        return dist.argmin(-1)


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """The original (``legacy``) VQ training loss and the straight-through vectors.

    ``z``: encoder output [...,dim]; ``z_q``: its codebook rows (same shape, with grad into the
    codebook). Returns ``(loss, z_st)``: loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    (the legacy form: beta weighs the codebook term, the commitment term has weight 1), a 0-d
    tensor; ``z_st = z + sg(z_q - z)`` (values of z_q, gradient of z).
    """
    loss = torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
    return loss, z + (z_q - z).detach()


checkpoint_filter_fn = KeyMap((("encode_task_layer.", "down."), ("quantize.embedding.", "codebook.")))
"""``seed_tokenizer.pth`` -> `Quantizer` keys."""


def check_codes(codes, codebook_size: int, length: int = 32) -> torch.Tensor:
    """Validate codes -> int64 [B,length]; a 1-D sequence of ``length`` is a batch of one.

    Accepts tensors, numpy arrays and (nested) lists. Raises `InputError` when they are not
    integers, not ``length`` per row, or outside ``[0, codebook_size)``.
    """
    if not isinstance(codes, torch.Tensor):
        try:
            codes = torch.as_tensor(codes)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"codes must be a tensor or a rectangular list of integers: {e}") from None
    if codes.numel() == 0:
        raise InputError(f"codes are empty (shape {list(codes.shape)}); expected [B,{length}]")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InputError(f"codes must be integers, got dtype {codes.dtype}")
    codes = codes.long()  # before comparing: in uint8, codebook_size would wrap around
    if codes.dim() == 1:
        codes = codes.unsqueeze(0)
    if codes.dim() != 2 or codes.shape[1] != length:
        raise InputError(f"codes must be [B,{length}] (or a single sequence of {length}), got {list(codes.shape)}")
    bad = (codes < 0) | (codes >= codebook_size)
    if bad.any():
        rows = bad.any(1).nonzero().flatten().tolist()
        raise InputError(f"codes out of range [0, {codebook_size}) in batch row(s) {rows}")
    return codes
