"""Stage 5: generation embeddings -> images with the Stable Diffusion v1.4 UNet (diffusers).

The generation embeddings [B,77,768] take the place of the SD text encoder's output. Classifier-
free guidance pairs them with the text encoder's output for the empty prompt "", as the original
SEED-1 demo did. No safety checker and no watermark are applied.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from .config import resolve_path
from .errors import CheckpointError, InputError
from .device import default_dtype

logger = logging.getLogger(__name__)

SD_CONFIGS = Path(__file__).resolve().parent / "sd_configs" / "stable-diffusion-v1-4"
"""Shipped SD v1.4 component configs (no weights), for loading the original single-file checkpoint."""

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")

SCHEDULERS = {
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),  # PLMS, the original
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpm": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}
"""Sampler name -> scheduler built from the pipeline's scheduler config (same noise schedule)."""

HOW_TO_GET = ("run `python scripts/download_weights.py` (Stable Diffusion v1.4 in diffusers format, "
              "CompVis/stable-diffusion-v1-4), or set diffusion.model to a diffusers folder or to the "
              "original sd-v1-4.ckpt / .safetensors file")


def check_model_path(path: str | Path) -> Path:
    """The resolved SD location: a diffusers folder (with model_index.json) or a single .ckpt/.safetensors file.

    Raises `CheckpointError` naming the path and how to get the weights when it is not there.
    """
    p = resolve_path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise CheckpointError(f"Stable Diffusion folder {p} has no model_index.json (not a diffusers "
                                  f"folder, or an incomplete download): {HOW_TO_GET}.")
        return p
    if p.is_file():
        if p.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"diffusion.model {p}: expected a diffusers folder or a "
                                  f"{'/'.join(SINGLE_FILE_SUFFIXES)} file")
        return p
    raise CheckpointError(f"Stable Diffusion v1.4 not found at {p}: {HOW_TO_GET}.")


def load_pipeline(path: str | Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load SD from a diffusers folder or an original single file, offline, without a safety checker."""
    p = check_model_path(path)
    common = dict(torch_dtype=dtype, local_files_only=True, safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)
    try:
        with warnings.catch_warnings():  # `torch_dtype`: deprecated in new diffusers, the only name in older ones
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            if p.is_dir():
                return StableDiffusionPipeline.from_pretrained(p, **common)
            # The .ckpt holds no tokenizer; the empty prompt's ids are known without it (see empty_prompt_ids).
            return StableDiffusionPipeline.from_single_file(str(p), config=str(SD_CONFIGS), tokenizer=None, **common)
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as e:
        why = str(e).strip().splitlines()[0].rstrip(". ") if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load Stable Diffusion v1.x from {p}: {why}. Expected a complete diffusers folder or an original "
            f"checkpoint holding only tensors (.ckpt files are read with weights_only=True); {HOW_TO_GET}.") from None


def random_pipeline(spec: Mapping[str, Any], dtype: torch.dtype) -> StableDiffusionPipeline:
    """An SD with RANDOM weights from ``spec`` (kwargs of the unet, vae and text_encoder classes).

    Initialised from a fixed seed, so every run builds the same model. For smoke runs and tests only:
    its images are noise. The scheduler is SD v1.4's.
    """
    logger.warning("diffusion.model is null: Stable Diffusion is built from diffusion.random with RANDOM weights, "
                   "its images are noise (smoke runs only)")
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    scheduler = PNDMScheduler.from_pretrained(SD_CONFIGS, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def empty_prompt_ids(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """Token ids of the empty prompt "", int64 [1, max_length]: BOS, then EOS/padding.

    With a tokenizer (a diffusers folder) it tokenizes "" as the SD pipeline does. Without one (the
    single-file checkpoint, the random model) it uses the text encoder config's BOS and EOS ids: for
    SD v1.4 the shipped config says 49406 and 49407, which is what its CLIP tokenizer gives for "".
    """
    if pipe.tokenizer is not None:
        tok = pipe.tokenizer
        return tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    c = pipe.text_encoder.config
    return torch.tensor([[c.bos_token_id] + [c.eos_token_id] * (c.max_position_embeddings - 1)])


class Diffusion:
    """Generation embeddings [B,77,D] -> images, with SD v1.4's UNet, VAE and CLIP text encoder.

    ``defaults``: the ``diffusion`` config section (scheduler, steps, guidance_scale, height, width,
    num_samples, seed). Build with `Diffusion.from_config`.
    """

    def __init__(self, pipe: StableDiffusionPipeline, defaults: Mapping[str, Any], embed_dim: int):
        unet_dim = pipe.unet.config.cross_attention_dim
        text_dim = pipe.text_encoder.config.hidden_size
        if unet_dim != embed_dim or text_dim != embed_dim:
            raise CheckpointError(
                f"the diffusion model does not fit the tokenizer: its UNet cross-attends to width {unet_dim} "
                f"and its text encoder outputs width {text_dim}, but the generation embeddings "
                f"(model.decoder.output_dim) are {embed_dim} wide. SEED-1 needs Stable Diffusion v1.x (768).")
        self.pipe = pipe
        self.defaults = dict(defaults)
        self.embed_dim = embed_dim
        self._uncond: torch.Tensor | None = None
        self._scheduler_config = pipe.scheduler.config  # the model's own; every sampler is built from it
        pipe.set_progress_bar_config(leave=False)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device, dtype: torch.dtype | None = None) -> Diffusion:
        """Load ``cfg.diffusion.model`` (null: a tiny random model from ``cfg.diffusion.random``).

        ``dtype``: default fp16 on CUDA, fp32 elsewhere.
        """
        d = cfg.get("diffusion")
        if d is None:
            raise CheckpointError("the config has no `diffusion` section: decoding needs Stable Diffusion v1.4")
        dtype = dtype or default_dtype(device)
        if d.get("model") is None:
            if d.get("random") is None:
                raise CheckpointError("diffusion.model is null and there is no diffusion.random spec to build "
                                      f"a random model from: set diffusion.model ({HOW_TO_GET})")
            pipe = random_pipeline(d.random, dtype)
        else:
            pipe = load_pipeline(d.model, dtype)
        defaults = {k: v for k, v in d.items() if k not in ("model", "random")}
        pipe.to(device)
        if device.type == "cuda":  # NHWC convolutions use the tensor cores' fast layouts
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        return cls(pipe, defaults, int(cfg.model.decoder.output_dim))

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @torch.inference_mode()
    def uncond_embeddings(self) -> torch.Tensor:
        """The text encoder's last hidden state for "", [1,77,D] in the UNet's dtype (computed once)."""
        if self._uncond is None:
            ids = empty_prompt_ids(self.pipe).to(self.device)
            self._uncond = self.pipe.text_encoder(ids)[0].to(self.dtype)
        return self._uncond

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The config defaults with the non-None ``overrides``, validated (`InputError` names the bad one)."""
        s = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        for key in ("steps", "height", "width", "num_samples", "seed"):
            if not isinstance(s.get(key), numbers.Integral) or isinstance(s[key], bool):
                raise InputError(f"{key} must be an integer, got {s.get(key)!r}")
            s[key] = int(s[key])
        if s["steps"] < 1 or s["num_samples"] < 1:
            raise InputError(f"steps and num_samples must be >= 1, got {s['steps']} and {s['num_samples']}")
        factor = max(8, self.pipe.vae_scale_factor)
        if s["height"] < factor or s["width"] < factor or s["height"] % factor or s["width"] % factor:
            raise InputError(f"height and width must be positive multiples of {factor}, got {s['height']} x {s['width']}")
        if not isinstance(s.get("guidance_scale"), numbers.Real) or isinstance(s["guidance_scale"], bool):
            raise InputError(f"guidance_scale must be a number, got {s.get('guidance_scale')!r}")
        if s.get("scheduler") not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {s.get('scheduler')!r}")
        return s

    def initial_noise(self, batch: int, s: Mapping[str, Any]) -> torch.Tensor:
        """Starting latents float32 [batch*num_samples, C, H/f, W/f], drawn on the CPU.

        Each code sequence gets its own generator seeded with ``seed``, so its images do not depend
        on the rest of the batch or on the device.
        """
        f = self.pipe.vae_scale_factor
        shape = (s["num_samples"], self.pipe.unet.config.in_channels, s["height"] // f, s["width"] // f)
        return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s["seed"]))
                          for _ in range(batch)])

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, **overrides: Any) -> list[Image.Image]:
        """Generation embeddings float [B,77,D] -> B x num_samples RGB images, grouped per sequence.

        Images ``b*num_samples .. (b+1)*num_samples - 1`` come from ``embeds[b]``. ``overrides``:
        scheduler, steps, guidance_scale, height, width, num_samples, seed (None = config default).
        Each step runs the UNet once on the whole batch, conditional and unconditional together.
        """
        s = self.settings(**overrides)
        if embeds.dim() != 3 or embeds.shape[-1] != self.embed_dim:
            raise InputError(f"generation embeddings must be [B,77,{self.embed_dim}], got {list(embeds.shape)}")
        cond = embeds.to(self.device, self.dtype)
        uncond = self.uncond_embeddings().expand_as(cond)
        self.pipe.scheduler = SCHEDULERS[s["scheduler"]](self._scheduler_config)
        latents = self.initial_noise(cond.shape[0], s).to(self.device, self.dtype)
        return self.pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_images_per_prompt=s["num_samples"],
            num_inference_steps=s["steps"], guidance_scale=float(s["guidance_scale"]), eta=0.0,
            height=s["height"], width=s["width"], latents=latents, output_type="pil",
        ).images
