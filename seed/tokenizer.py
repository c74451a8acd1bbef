"""The SEED tokenizer: images <-> 32 causal codes, composed from the four stages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import decoder, hub, qformer, quantizer, vision
from .checkpoint import load_checkpoints
from .config import validate
from .device import default_device, default_dtype
from .errors import InputError
from .images import ImageInput, as_list, check_pixel_values, load_batch

if TYPE_CHECKING:
    from PIL import Image

    from .diffusion import Diffusion

logger = logging.getLogger(__name__)

_DIFFUSION_LOCK = threading.RLock()
"""Serialises the lazy load (and moves) of tokenizers' diffusion models: each loads exactly once."""

CHECKPOINT_FILES = {"reverse_qformer": ("vision", "qformer", "codebook"), "image": ("vision", "quantizer")}
"""The ``checkpoints.*`` files each ``model.decoder.head`` reads: SEED-1's three, SEED-2's two."""
PRECISIONS = ("default", "fp16-all")
"""``model.precision`` values: see `Tokenizer.precision`."""

Images = ImageInput | Sequence[ImageInput] | torch.Tensor
"""Images (see `seed.images.ImageInput`), a list of them, or preprocessed pixels [B,3,S,S]."""


def own_config(cfg: DictConfig) -> DictConfig:
    """A validated, resolved, read-only copy of ``cfg``: editing the caller's config later cannot
    change a built tokenizer, nor make `save_pretrained` write a config that does not fit its weights."""
    own = validate([cfg], where="the tokenizer config")
    OmegaConf.resolve(own)
    OmegaConf.set_readonly(own, True)
    return own


class Tokenizer(nn.Module):
    """SEED-1 or SEED-2 (see `variant`): image -> vision tower -> causal Q-Former -> 32 codes ->
    generation embeddings.

    Build with `Tokenizer.from_config`. The vision tower runs in ``dtype`` (fp16 by default on
    CUDA); ln_vision, both Q-Formers, the codebook and the decoder run in fp32.
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = own_config(cfg)
        cfg = self.cfg
        self.vision = vision.build_vision_tower(cfg.model)
        self.qformer = qformer.CausalQFormer(cfg.model)
        self.quantizer = quantizer.Quantizer(cfg.model)
        self.decoder = decoder.build_decoder(cfg.model)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Tokenizer:
        """Build from ``cfg.model``, load ``cfg.checkpoints`` (the original files), eval mode.

        SEED-1 (``model.decoder.head: reverse_qformer``) reads ``checkpoints.{vision,qformer,codebook}``;
        SEED-2 (``head: image``) reads ``checkpoints.vision`` (eva_vit_g.pth, fp16 or fp32) and
        ``checkpoints.quantizer`` (the flat seed_quantizer.pt: everything else). Keys no stage uses
        are skipped and counted in the log. ``device``: default CUDA if available, else CPU.
        ``dtype``: the vision tower's dtype, default fp16 on CUDA and fp32 on CPU (ignored under
        ``model.precision: fp16-all``). A null checkpoint leaves random weights (warned), drawn
        from a fixed seed.
        """
        from .checkpoint import check_weights

        check_weights(cfg, diffusion=False)  # every missing file at once, with how to get it
        files = cfg.get("checkpoints") or {}
        head = decoder.head_of(cfg.model)
        names = CHECKPOINT_FILES[head]
        stray = [k for k in ("qformer", "codebook", "quantizer") if k not in names and files.get(k)]
        if stray:
            raise InputError(f"checkpoints.{stray[0]} is set, but model.decoder.head={head} reads only "
                             f"checkpoints.{' and checkpoints.'.join(names)} (SEED-2: vision + quantizer; "
                             f"SEED-1: vision + qformer + codebook)")
        paths = {k: files.get(k) for k in names}
        # With every weight coming from a file, skip random init: build on meta, load by assignment.
        # Otherwise the random weights come from a fixed seed: the same config gives the same model
        # in every process (ranks of a dataset run, reruns, tests).
        with torch.device("meta" if all(paths.values()) else "cpu"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tok = cls(cfg)
        vision_stage = (tok.vision, vision.checkpoint_filter_fn)
        qformer_stage = (tok.qformer, qformer.checkpoint_filter_fn)
        codebook_stages = [(tok.quantizer, quantizer.checkpoint_filter_fn), (tok.decoder, decoder.KEYMAPS[head])]
        if head == "image":
            plan = {"vision": (paths["vision"], [vision_stage]),
                    "quantizer": (paths["quantizer"], [qformer_stage, *codebook_stages])}
        else:
            plan = {"vision": (paths["vision"], [vision_stage]),
                    "qformer": (paths["qformer"], [qformer_stage]),
                    "codebook": (paths["codebook"], codebook_stages)}
        load_checkpoints(plan)
        return tok._ready(device, dtype)

    @classmethod
    def from_pretrained(cls, name: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, precision: str | None = None) -> Tokenizer:
        """Load a folder written by `save_pretrained`, or a Hugging Face Hub repo id holding one.

        The weights are memory-mapped from ``model.safetensors`` and assigned to a model built on
        the meta device (no random init, no second copy). ``device``/``dtype`` as in `from_config`.
        ``precision``: overrides the folder's ``model.precision`` (see `precision`).
        Raises `CheckpointError` naming ``name`` if it is neither a folder nor a fetchable repo id.
        """
        folder = hub.find(name)
        cfg = hub.read_config(folder)
        if precision is not None:
            cfg.model.precision = precision
        with torch.device("meta"):
            tok = cls(cfg)
        hub.load_weights(tok, folder)
        return tok._ready(device, dtype)

    @classmethod
    def load(cls, spec: Tokenizer | DictConfig | str | Path, *overrides: str) -> Tokenizer:
        """A tokenizer from whatever names one: a `Tokenizer` (returned as is), a config
        (`DictConfig`, a YAML path or a shipped config name such as ``"seed2_tokenizer"``, with
        ``overrides``), a `save_pretrained` folder, or else a Hugging Face Hub repo id.
        The default device and dtype, as `from_config`."""
        from .config import load_config, resolve_path

        path = None if isinstance(spec, (Tokenizer, DictConfig)) else resolve_path(spec)
        if path is not None and not path.is_dir() and (path.suffix in (".yaml", ".yml") or "/" not in str(spec)):
            return cls.from_config(load_config(spec, *overrides))
        if overrides:
            raise InputError(f"key=value overrides apply to a config name or YAML file, not to {spec!r}")
        if isinstance(spec, Tokenizer):
            return spec
        if isinstance(spec, DictConfig):
            return cls.from_config(spec)
        return cls.from_pretrained(path if path.is_dir() else str(spec))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` (our key names, each weight in the dtype it
        has in memory: see `seed.hub.save`) into ``folder``.

        The folder loads by itself with `from_pretrained` (the config's ``checkpoints`` are dropped).
        """
        return hub.save(self, folder)

    def _ready(self, device: str | torch.device | None, dtype: torch.dtype | None) -> Tokenizer:
        """Fill what a meta build left empty, freeze, eval; move to ``device`` with the ViT in ``dtype``
        (under ``model.precision: fp16-all``, the whole tokenizer in fp16)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        self._materialize_buffers()
        self.requires_grad_(False).eval()
        if self.precision == "fp16-all":
            if device.type == "cpu":
                logger.warning("model.precision=fp16-all on the CPU: slow, and meant only to check the original's "
                               "fp16 codes; it was run on CUDA")
            return self.to(device, torch.float16)
        self.vision.to(device, dtype)  # cast on the way: no full-precision copy on the GPU
        return self.to(device)

    @property
    def precision(self) -> str:
        """``model.precision``: "default" (fp32; the ViT in ``dtype``) or "fp16-all" (everything fp16,
        codebook and input included, as the original SEED-2 computed the codes SEED-LLaMA learned)."""
        p = self.cfg.model.get("precision", "default")
        if p not in PRECISIONS:
            raise InputError(f"model.precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
        return p

    @property
    def variant(self) -> str:
        """"seed1" (Reverse Q-Former head: `embed` gives [B,77,768]) or "seed2" (image head: [B,1024])."""
        return "seed2" if isinstance(self.decoder, decoder.ImageDecoder) else "seed1"

    def _materialize_buffers(self) -> None:
        """Fill the non-persistent buffers (not in any file) of a model built on the meta device."""
        for module in self.modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            for name in metas:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device="cpu")
            if metas and hasattr(module, "_init_buffers"):
                module._init_buffers()

    def __repr__(self) -> str:
        """One line: variant, dimensions, device and dtypes (not the 15,000-character module tree)."""
        m = self.cfg.model
        v, q, c = m.vision, m.qformer, m.codebook
        params = sum(p.numel() for p in self.parameters()) / 1e6
        return (f"Tokenizer({self.variant}, {m.image_size}px, "
                f"ViT {v.width}x{v.depth}, Q-Former {q.hidden_size}x{q.num_layers}, codebook {c.size}x{c.dim}, "
                f"{params:.1f}M params, device={self.device}, "
                f"vision={str(self.vision.patch_embed.proj.weight.dtype).removeprefix('torch.')}, "
                f"rest={str(self.quantizer.codebook.weight.dtype).removeprefix('torch.')})")

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
        """Images -> float32 [B,3,S,S] on the CPU: RGB, resize to S x S with ``model.image_resample``
        (bicubic for SEED-1, bilinear for SEED-2's main path), CLIP normalize."""
        return load_batch(images, self.image_size, self.cfg.model.image_resample)

    def pixel_values(self, images: Images) -> torch.Tensor:
        """Images or preprocessed pixels -> validated [B,3,S,S] on the device, in the tower's dtype.

        A float tensor is taken as preprocessed pixels (and must look CLIP-normalized); a uint8
        tensor [3,H,W] / [B,3,H,W] or a numpy array is an image (or a batch of them).
        """
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            x = check_pixel_values(images, self.image_size)
        else:
            x = self.preprocess(images)
        return self._to_tower(x)

    def _to_tower(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.vision.patch_embed.proj.weight.dtype, non_blocking=True)

    def batches(self, images: Images) -> Iterator[torch.Tensor]:
        """Validated pixel batches of at most ``cfg.encode.batch_size`` images, on the device.

        Images are read and preprocessed one chunk at a time, so a long list of paths never holds
        every image and activation at once.
        """
        n = int(self.cfg.encode.batch_size)
        if n < 1:
            raise InputError(f"encode.batch_size must be >= 1, got {n}")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            x = check_pixel_values(images, self.image_size)
            for i in range(0, x.shape[0], n):
                yield self._to_tower(x[i:i + n])
        else:
            items = as_list(images)
            for i in range(0, len(items), n):
                yield self._to_tower(load_batch(items[i:i + n], self.image_size, self.cfg.model.image_resample,
                                                start=i, total=len(items)))

    @torch.no_grad()
    def causal_embeddings(self, images: Images) -> torch.Tensor:
        """The causal Q-Former output, float32 [B,32,hidden] (query i depends on queries 0..i only).

        Computed without gradients. For gradients (e.g. to fine-tune through the tokenizer),
        call the stages yourself with the parameters you train set to ``requires_grad_(True)``:
        ``tok.qformer(tok.vision(tok.pixel_values(images)))``.
        """
        return torch.cat([self.qformer(self.vision(x)).float() for x in self.batches(images)])

    @torch.no_grad()
    def encode(self, images: Images) -> torch.Tensor:
        """Images or pixels [B,3,S,S] -> codes int64 [B,32] (an ordinary tensor, usable in training).

        Images: paths, PIL images, encoded bytes, binary files, uint8 numpy arrays (HxW, HxWx3) or
        uint8 tensors ([3,H,W], [B,3,H,W]), one or a list. Long lists run in chunks of
        ``cfg.encode.batch_size``; the codes do not depend on the chunking.
        """
        return torch.cat([self.quantizer(self.qformer(self.vision(x))) for x in self.batches(images)])

    @torch.no_grad()
    def embed(self, codes: torch.Tensor | Sequence) -> torch.Tensor:
        """Codes [B,32] (or one sequence of 32) -> generation embeddings, float32.

        SEED-1: [B,77,output_dim] (SD v1.4 text conditioning); SEED-2: [B,output_dim] (the SD 2.1
        unCLIP image embedding, 1024). See `variant`.
        """
        codes = quantizer.check_codes(codes, self.quantizer.codebook.num_embeddings, self.cfg.model.qformer.num_queries)
        return self.decoder(self.quantizer.codebook(codes.to(self.device))).float()

    @property
    def diffusion(self) -> Diffusion:
        """The diffusion model (`seed.diffusion.Diffusion`), loaded from ``cfg.diffusion`` on first use:
        SD v1.x for SEED-1, SD 2.1 unCLIP for SEED-2.

        Loaded once, also when several threads decode at once. After `tok.to(device)` it follows the
        tokenizer to that device (with that device's default dtype) on the next call; do not move a
        tokenizer while another thread decodes with it.
        """
        model = getattr(self, "_diffusion", None)
        if model is None or model.device != self.device:
            with _DIFFUSION_LOCK:
                model = getattr(self, "_diffusion", None)
                if model is None:
                    from .diffusion import Diffusion  # diffusers is imported only when decoding

                    model = self._diffusion = Diffusion.from_config(self.cfg, self.device)
                elif model.device != self.device:
                    model.to(self.device)
        return model

    def decode(self, codes: torch.Tensor | Sequence, *, steps: int | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               height: int | None = None, width: int | None = None, num_samples: int | None = None,
               seed: int | None = None, scheduler: str | None = None,
               negative_codes: torch.Tensor | Sequence | None = None,
               noise_level: int | None = None) -> list[Image.Image]:
        """Codes [B,32] (or one sequence of 32) -> B x num_samples PIL RGB images, grouped per sequence.

        Images ``b*num_samples .. (b+1)*num_samples - 1`` come from ``codes[b]``. Each setting left
        None takes its ``cfg.diffusion`` value; ``steps`` and ``num_inference_steps`` are the same.
        ``scheduler``: "pndm" (PLMS), "ddim" or "dpm" (DPM-Solver++). The same seed gives the same
        pixels for a code sequence, whatever else is in the batch. ``negative_codes`` ([B,32], or one
        sequence for all): their embedding is the unconditional branch of guidance (the original
        SEED-2's ``negative_indices``). ``noise_level``: SEED-2 (unCLIP) only, default 0.
        Safe to call from several threads on one tokenizer.
        """
        if steps is not None and num_inference_steps is not None and steps != num_inference_steps:
            raise InputError(f"steps={steps} and num_inference_steps={num_inference_steps} disagree (same setting)")
        embeds = self.embed(codes)
        negative = None if negative_codes is None else self.embed(negative_codes)
        return self.diffusion.generate(embeds, negative, steps=steps if steps is not None else num_inference_steps,
                                       guidance_scale=guidance_scale, height=height, width=width,
                                       num_samples=num_samples, seed=seed, scheduler=scheduler,
                                       noise_level=noise_level)

    def reconstruct(self, images: Images, **settings) -> list[Image.Image]:
        """Images -> codes -> B x num_samples PIL images: `encode` then `decode` (same ``settings``)."""
        return self.decode(self.encode(images), **settings)
