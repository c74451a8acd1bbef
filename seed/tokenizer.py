"""The SEED tokenizer: images <-> 32 causal codes, composed from the four stages."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from . import decoder, qformer, quantizer, vision
from .checkpoint import load_checkpoints
from .images import ImageInput, check_pixel_values, load_batch

logger = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput] | torch.Tensor
"""Images (see `seed.images.ImageInput`), a list of them, or preprocessed pixels [B,3,S,S]."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Tokenizer(nn.Module):
    """SEED-1: image -> vision tower -> causal Q-Former -> 32 codes -> generation embeddings.

    Build with `Tokenizer.from_config`. The vision tower runs in ``dtype`` (fp16 by default on
    CUDA); ln_vision, both Q-Formers, the codebook and the decoder run in fp32.
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = vision.build_vision_tower(cfg.model)
        self.qformer = qformer.CausalQFormer(cfg.model)
        self.quantizer = quantizer.Quantizer(cfg.model)
        self.decoder = decoder.Decoder(cfg.model)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Tokenizer:
        """Build from ``cfg.model``, load ``cfg.checkpoints`` (original SEED-1 files), eval mode.

        ``device``: default CUDA if available, else CPU. ``dtype``: the vision tower's dtype,
        default fp16 on CUDA and fp32 on CPU. A null checkpoint leaves random weights (warned).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        files = cfg.get("checkpoints") or {}
        paths = {k: files.get(k) for k in ("vision", "qformer", "codebook")}
        # With every weight coming from a file, skip random init: build on meta, load by assignment.
        with torch.device("meta" if all(paths.values()) else "cpu"):
            tok = cls(cfg)
        load_checkpoints({
            "vision": (paths["vision"], [(tok.vision, lambda sd: vision.checkpoint_filter_fn(sd, tok.vision))]),
            "qformer": (paths["qformer"], [(tok.qformer, qformer.checkpoint_filter_fn)]),
            "codebook": (paths["codebook"], [(tok.quantizer, quantizer.checkpoint_filter_fn),
                                             (tok.decoder, decoder.checkpoint_filter_fn)]),
        })
        tok._materialize_buffers()
        tok.requires_grad_(False).eval()
        tok.to(device)
        tok.vision.to(dtype)
        return tok

    def _materialize_buffers(self) -> None:
        """Fill the non-persistent buffers (not in any file) of a model built on the meta device."""
        for module in self.modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            for name in metas:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device="cpu")
            if metas and hasattr(module, "_init_buffers"):
                module._init_buffers()

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.weight.device

    @property
    def image_size(self) -> int:
        return int(self.cfg.model.image_size)

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> float32 [B,3,S,S] on the CPU: RGB, bicubic resize to S x S, CLIP normalize."""
        return load_batch(images, self.image_size)

    def pixel_values(self, images: Images) -> torch.Tensor:
        """Images or preprocessed pixels -> validated [B,3,S,S] on the device, in the tower's dtype."""
        if isinstance(images, torch.Tensor):
            x = check_pixel_values(images, self.image_size)
        else:
            x = self.preprocess(images)
        return x.to(self.device, self.vision.patch_embed.proj.weight.dtype, non_blocking=True)

    @torch.inference_mode()
    def causal_embeddings(self, images: Images) -> torch.Tensor:
        """The causal Q-Former output, float32 [B,32,hidden] (query i depends on queries 0..i only)."""
        return self.qformer(self.vision.forward_features(self.pixel_values(images)))

    @torch.inference_mode()
    def encode(self, images: Images) -> torch.Tensor:
        """Images (paths, PIL, bytes, files) or pixels [B,3,S,S] -> codes int64 [B,32]."""
        return self.quantizer(self.causal_embeddings(images))

    @torch.inference_mode()
    def embed(self, codes) -> torch.Tensor:
        """Codes [B,32] (or one sequence of 32) -> generation embeddings float32 [B,77,output_dim]."""
        codes = quantizer.check_codes(codes, self.quantizer.codebook.num_embeddings, self.cfg.model.qformer.num_queries)
        return self.decoder(self.quantizer.codebook(codes.to(self.device)))
