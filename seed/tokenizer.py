"""The SEED tokenizer: images <-> 32 causal codes, composed from the four stages."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import nn

from . import decoder, hub, qformer, quantizer, vision
from .checkpoint import load_checkpoints
from .device import default_device, default_dtype
from .errors import InputError
from .images import ImageInput, check_pixel_values, load_batch

if TYPE_CHECKING:
    from PIL import Image

    from .diffusion import Diffusion

logger = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput] | torch.Tensor
"""Images (see `seed.images.ImageInput`), a list of them, or preprocessed pixels [B,3,S,S]."""


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
        default fp16 on CUDA and fp32 on CPU. A null checkpoint leaves random weights (warned),
        drawn from a fixed seed.
        """
        files = cfg.get("checkpoints") or {}
        paths = {k: files.get(k) for k in ("vision", "qformer", "codebook")}
        # With every weight coming from a file, skip random init: build on meta, load by assignment.
        # Otherwise the random weights come from a fixed seed: the same config gives the same model
        # in every process (ranks of a dataset run, reruns, tests).
        with torch.device("meta" if all(paths.values()) else "cpu"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tok = cls(cfg)
        load_checkpoints({
            "vision": (paths["vision"], [(tok.vision, vision.checkpoint_filter_fn)]),
            "qformer": (paths["qformer"], [(tok.qformer, qformer.checkpoint_filter_fn)]),
            "codebook": (paths["codebook"], [(tok.quantizer, quantizer.checkpoint_filter_fn),
                                             (tok.decoder, decoder.checkpoint_filter_fn)]),
        })
        return tok._ready(device, dtype)

    @classmethod
    def from_pretrained(cls, name: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Tokenizer:
        """Load a folder written by `save_pretrained`, or a Hugging Face Hub repo id holding one.

        The weights are memory-mapped from ``model.safetensors`` and assigned to a model built on
        the meta device (no random init, no second copy). ``device``/``dtype`` as in `from_config`.
        Raises `CheckpointError` naming ``name`` if it is neither a folder nor a fetchable repo id.
        """
        folder = hub.find(name)
        cfg = hub.read_config(folder)
        with torch.device("meta"):
            tok = cls(cfg)
        hub.load_weights(tok, folder)
        return tok._ready(device, dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` (float32, our key names) into ``folder``.

        The folder loads by itself with `from_pretrained` (the config's ``checkpoints`` are dropped).
        """
        return hub.save(self, folder)

    def _ready(self, device: str | torch.device | None, dtype: torch.dtype | None) -> Tokenizer:
        """Fill what a meta build left empty, freeze, eval; move to ``device`` with the ViT in ``dtype``."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        self._materialize_buffers()
        self.requires_grad_(False).eval()
        self.vision.to(device, dtype)  # cast on the way: no full-precision copy on the GPU
        return self.to(device)

    def _materialize_buffers(self) -> None:
        """Fill the non-persistent buffers (not in any file) of a model built on the meta device."""
        for module in self.modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            for name in metas:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device="cpu")
            if metas and hasattr(module, "_init_buffers"):
                module._init_buffers()

    def compile_vision(self, **kwargs) -> None:
        """``torch.compile`` the vision tower in place (weights and their names unchanged)."""
        self.vision.compile(**kwargs)

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
        return self.qformer(self.vision(self.pixel_values(images)))

    @torch.inference_mode()
    def encode(self, images: Images) -> torch.Tensor:
        """Images (paths, PIL, bytes, files) or pixels [B,3,S,S] -> codes int64 [B,32]."""
        return self.quantizer(self.causal_embeddings(images))

    @torch.inference_mode()
    def embed(self, codes: torch.Tensor | Sequence) -> torch.Tensor:
        """Codes [B,32] (or one sequence of 32) -> generation embeddings float32 [B,77,output_dim]."""
        codes = quantizer.check_codes(codes, self.quantizer.codebook.num_embeddings, self.cfg.model.qformer.num_queries)
        return self.decoder(self.quantizer.codebook(codes.to(self.device)))

    @property
    def diffusion(self) -> Diffusion:
        """The SD v1.4 model (`seed.diffusion.Diffusion`), loaded from ``cfg.diffusion`` on first use."""
        if getattr(self, "_diffusion", None) is None:
            from .diffusion import Diffusion  # diffusers is imported only when decoding

            self._diffusion = Diffusion.from_config(self.cfg, self.device)
        return self._diffusion

    def decode(self, codes: torch.Tensor | Sequence, *, steps: int | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               height: int | None = None, width: int | None = None, num_samples: int | None = None,
               seed: int | None = None, scheduler: str | None = None) -> list[Image.Image]:
        """Codes [B,32] (or one sequence of 32) -> B x num_samples PIL RGB images, grouped per sequence.

        Images ``b*num_samples .. (b+1)*num_samples - 1`` come from ``codes[b]``. Each setting left
        None takes its ``cfg.diffusion`` value; ``steps`` and ``num_inference_steps`` are the same.
        ``scheduler``: "pndm" (PLMS, the original), "ddim" or "dpm" (DPM-Solver++). The same seed
        gives the same pixels for a code sequence, whatever else is in the batch.
        """
        if steps is not None and num_inference_steps is not None and steps != num_inference_steps:
            raise InputError(f"steps={steps} and num_inference_steps={num_inference_steps} disagree (same setting)")
        embeds = self.embed(codes)
        return self.diffusion.generate(embeds, steps=steps if steps is not None else num_inference_steps,
                                       guidance_scale=guidance_scale, height=height, width=width,
                                       num_samples=num_samples, seed=seed, scheduler=scheduler)

    def reconstruct(self, images: Images, **settings) -> list[Image.Image]:
        """Images -> codes -> B x num_samples PIL images: `encode` then `decode` (same ``settings``)."""
        return self.decode(self.encode(images), **settings)
