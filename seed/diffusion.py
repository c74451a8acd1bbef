"""Stage 5: generation embeddings -> images with Stable Diffusion (diffusers), loaded lazily.

One seeded, batched sampling loop (`Diffusion.sample`) serves two kinds of conditioning:

- SEED-1, `TextConditioned`: Stable Diffusion v1.x. The embeddings [B,77,768] take the place of the
  text encoder's output; the unconditional branch is the text encoder's output for the empty prompt
  "" (as the original SEED-1 demo did).
- SEED-2, `ImageConditioned`: Stable Diffusion 2.1 unCLIP (`StableUnCLIPImg2ImgPipeline`'s
  components). The embedding [B,1024] is the UNet's image (class) conditioning after diffusers'
  `noise_image_embeddings` at ``noise_level`` (0 by default: a little noise all the same); the text
  conditioning is the empty prompt for both branches; the unconditional image conditioning is zeros
  (or the noised embedding of negative codes), as in the original SEED-2 code.

Every call builds its own scheduler and never touches the pipeline's state, so concurrent calls on
one model are safe. Every random draw comes from one CPU generator per code sequence, seeded with
``seed``: image-embedding noise (unCLIP), then the starting latents, then the negative embedding's
noise (unCLIP, if any); so a sequence's images do not depend on the rest of the batch or on the
device. No safety checker and no watermark are applied.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       PNDMScheduler, StableDiffusionPipeline, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from .config import resolve_path
from .device import default_dtype
from .errors import CheckpointError, InputError

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

UNCLIP_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                        num_train_timesteps=1000)
"""The sampler of stabilityai/stable-diffusion-2-1-unclip (`scheduler/`), for the random unCLIP model."""
UNCLIP_NOISING_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
"""Its `image_noising_scheduler` (DDPM, cosine), for the random unCLIP model."""

UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
HOW_TO_GET = {
    "sd1": ("run `python scripts/download_weights.py` (Stable Diffusion v1.4 in diffusers format, "
            "CompVis/stable-diffusion-v1-4), or set diffusion.model to a diffusers folder or to the "
            "original sd-v1-4.ckpt / .safetensors file"),
    "unclip": (f"run `python scripts/download_weights.py --model seed2` (Stable Diffusion 2.1 unCLIP in diffusers format, "
               f"{UNCLIP_REPO}; the image_encoder is not needed), or set diffusion.model to such a folder"),
}
"""Where to get the weights, per kind of model."""


def seed_embed_shape(cfg: DictConfig) -> tuple[int, ...]:
    """The shape of one sequence's generation embeddings for ``cfg.model``: (77, 768) for SEED-1's
    Reverse Q-Former head, (1024,) for SEED-2's image head."""
    d = cfg.model.decoder
    if d.get("head", "reverse_qformer") == "image":
        return (int(d.output_dim),)
    return (int(d.num_queries), int(d.output_dim))


def kind_of(shape: tuple[int, ...]) -> str:
    """"sd1" (text conditioning, [N, D] per sequence) or "unclip" (image conditioning, [D])."""
    return "unclip" if len(shape) == 1 else "sd1"


def check_model_path(path: str | Path, kind: str = "sd1") -> Path:
    """The resolved model location: a diffusers folder (with model_index.json), or for SD v1.x also a
    single .ckpt/.safetensors file. ``kind``: "sd1" or "unclip" (says where to get the weights).

    Raises `CheckpointError` naming the path and how to get the weights when it is not there.
    """
    how = HOW_TO_GET[kind]
    what = "Stable Diffusion 2.1 unCLIP" if kind == "unclip" else "Stable Diffusion v1.4"
    p = resolve_path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise CheckpointError(f"{what} folder {p} has no model_index.json (not a diffusers "
                                  f"folder, or an incomplete download): {how}.")
        return p
    if p.is_file():
        if kind == "unclip" or p.suffix not in SINGLE_FILE_SUFFIXES:
            single = f" or a {'/'.join(SINGLE_FILE_SUFFIXES)} file"
            allowed = "a diffusers folder" + ("" if kind == "unclip" else single)
            raise CheckpointError(f"diffusion.model {p}: expected {allowed}")
        return p
    raise CheckpointError(f"{what} not found at {p}: {how}.")


def load_pipeline(path: str | Path, dtype: torch.dtype, kind: str = "sd1") -> DiffusionPipeline:
    """Load SD v1.x (a diffusers folder or an original single file) or SD 2.1 unCLIP (a diffusers
    folder; its CLIP image encoder is not loaded), offline, without a safety checker."""
    p = check_model_path(path, kind)
    common = dict(torch_dtype=dtype, local_files_only=True)
    try:
        with warnings.catch_warnings():  # `torch_dtype`: deprecated in new diffusers, the only name in older ones
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            if p.is_dir() and "UnCLIP" in str(json.loads((p / "model_index.json").read_text()).get("_class_name")):
                return StableUnCLIPImg2ImgPipeline.from_pretrained(p, image_encoder=None, feature_extractor=None,
                                                                   **common)
            sd = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)
            if p.is_dir():
                return StableDiffusionPipeline.from_pretrained(p, **sd)
            # The .ckpt holds no tokenizer; the empty prompt's ids are known without it (see empty_prompt_ids).
            return StableDiffusionPipeline.from_single_file(str(p), config=str(SD_CONFIGS), tokenizer=None, **sd)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SingleFileComponentError) as e:
        why = str(e).strip().splitlines()[0].rstrip(". ") if str(e).strip() else type(e).__name__
        holds = "" if kind == "unclip" else (" or an original checkpoint holding only tensors (.ckpt files are "
                                             "read with weights_only=True)")
        raise CheckpointError(f"cannot load the diffusion model from {p}: {why}. Expected a complete diffusers "
                              f"folder{holds}; {HOW_TO_GET[kind]}.") from None


def random_pipeline(spec: Mapping[str, Any], dtype: torch.dtype) -> DiffusionPipeline:
    """A diffusion model with RANDOM weights from ``spec`` (kwargs of the unet, vae and text_encoder
    classes; with an ``image_normalizer`` entry (its kwargs), an SD 2.1 unCLIP, else an SD v1.x).

    Initialised from a fixed seed, so every run builds the same model. For smoke runs and tests only:
    its images are noise. The samplers are SD v1.4's, or SD 2.1 unCLIP's (`UNCLIP_SCHEDULER`).
    """
    logger.warning("diffusion.model is null: the diffusion model is built from diffusion.random with RANDOM "
                   "weights, its images are noise (smoke runs only)")
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
        normalizer = StableUnCLIPImageNormalizer(**spec["image_normalizer"]) if "image_normalizer" in spec else None
    if normalizer is None:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=PNDMScheduler.from_pretrained(SD_CONFIGS, subfolder="scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableUnCLIPImg2ImgPipeline(
            feature_extractor=None, image_encoder=None, image_normalizer=normalizer,
            image_noising_scheduler=DDPMScheduler(**UNCLIP_NOISING_SCHEDULER), tokenizer=None,
            text_encoder=text_encoder, unet=unet, scheduler=PNDMScheduler(**UNCLIP_SCHEDULER), vae=vae)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def empty_prompt_ids(pipe: DiffusionPipeline) -> torch.Tensor:
    """Token ids of the empty prompt "", int64 [1, max_length]: BOS, then EOS/padding.

    With a tokenizer (a diffusers folder) it tokenizes "" as the SD pipelines do. Without one (the
    single-file checkpoint, the random model) it uses the text encoder config's BOS and EOS ids: for
    SD v1.4 the shipped config says 49406 and 49407, which is what its CLIP tokenizer gives for "".
    """
    if pipe.tokenizer is not None:
        tok = pipe.tokenizer
        return tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    c = pipe.text_encoder.config
    return torch.tensor([[c.bos_token_id] + [c.eos_token_id] * (c.max_position_embeddings - 1)])


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high) (high None: no bound), else `InputError` naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise InputError(f"{name} must be {bound}, got {value}")
    return int(value)


class Diffusion:
    """Generation embeddings -> images: the seeded, batched sampling loop shared by both kinds.

    Build with `Diffusion.from_config`, which returns a `TextConditioned` (SD v1.x) or an
    `ImageConditioned` (SD 2.1 unCLIP) model. ``defaults``: the ``diffusion`` config section
    (scheduler, steps, guidance_scale, height, width, num_samples, seed, noise_level).
    ``embed_shape``: one sequence's generation embeddings, (77, 768) or (1024,).
    """

    kind = ""

    def __init__(self, pipe: DiffusionPipeline, defaults: Mapping[str, Any], embed_shape: tuple[int, ...]):
        self.pipe = pipe
        self.defaults = dict(defaults)
        self.embed_shape = tuple(embed_shape)
        self._uncond: torch.Tensor | None = None
        self._scheduler_config = pipe.scheduler.config  # the model's own; every sampler is built from it
        pipe.set_progress_bar_config(leave=False, disable=None)  # None: no bar when stderr is not a terminal (a log file)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device, dtype: torch.dtype | None = None,
                    embed_shape: tuple[int, ...] | None = None) -> Diffusion:
        """Load ``cfg.diffusion.model`` (null: a tiny random model from ``cfg.diffusion.random``).

        ``dtype``: default fp16 on CUDA, fp32 elsewhere. ``embed_shape``: the tokenizer's generation
        embeddings per sequence (default: from ``cfg.model``); it must fit the model, else `CheckpointError`.
        """
        d = cfg.get("diffusion")
        shape = tuple(embed_shape or seed_embed_shape(cfg))
        kind = kind_of(shape)
        if d is None:
            raise CheckpointError("the config has no `diffusion` section: decoding needs a diffusion model")
        dtype = dtype or default_dtype(device)
        if d.get("model") is None:
            if d.get("random") is None:
                raise CheckpointError("diffusion.model is null and there is no diffusion.random spec to build "
                                      f"a random model from: set diffusion.model ({HOW_TO_GET[kind]})")
            pipe = random_pipeline(d.random, dtype)
        else:
            pipe = load_pipeline(d.model, dtype, kind)
        defaults = {k: v for k, v in d.items() if k not in ("model", "random")}
        model_cls = ImageConditioned if isinstance(pipe, StableUnCLIPImg2ImgPipeline) else TextConditioned
        model = model_cls(pipe, defaults, shape)
        return model.to(device, dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Diffusion:
        """Move the model (default dtype: fp16 on CUDA, fp32 elsewhere). Not while a decode runs."""
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        self.pipe.to(device, *([dtype] if dtype != self.dtype else []))
        if device.type == "cuda":  # NHWC convolutions use the tensor cores' fast layouts
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        self._uncond = None
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @torch.no_grad()
    def uncond_embeddings(self) -> torch.Tensor:
        """The text encoder's last hidden state for "", [1,77,D] in the UNet's dtype (computed once)."""
        uncond = self._uncond
        if uncond is None:  # concurrent first calls may both compute it: the same value
            ids = empty_prompt_ids(self.pipe).to(self.device)
            uncond = self._uncond = self.pipe.text_encoder(ids)[0].to(self.dtype)
        return uncond

    def make_scheduler(self, name: str):
        """A new sampler ``name`` ("pndm", "ddim", "dpm") with the model's noise schedule (one per call)."""
        if name not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        return SCHEDULERS[name](self._scheduler_config)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The config defaults with the non-None ``overrides``, validated (`InputError` names the bad one)."""
        s = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        train_steps = int(self._scheduler_config.num_train_timesteps)
        s["steps"] = check_int("steps", s.get("steps"), 1, train_steps + 1)
        s["num_samples"] = check_int("num_samples", s.get("num_samples"), 1)
        s["seed"] = check_int("seed", s.get("seed"), 0, 2**63)
        factor = max(8, self.pipe.vae_scale_factor)
        for key in ("height", "width"):
            s[key] = check_int(key, s.get(key), factor)
            if s[key] % factor:
                raise InputError(f"{key} must be a positive multiple of {factor}, got {s[key]}")
        g = s.get("guidance_scale")
        if not isinstance(g, numbers.Real) or isinstance(g, bool) or not math.isfinite(g):
            raise InputError(f"guidance_scale must be a finite number, got {g!r}")
        s["guidance_scale"] = float(g)
        if s.get("scheduler") not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {s.get('scheduler')!r}")
        return s

    def check_embeds(self, embeds: torch.Tensor, what: str = "generation embeddings") -> torch.Tensor:
        """``embeds`` [B, *embed_shape] on the model's device and dtype, else `InputError`."""
        if not isinstance(embeds, torch.Tensor) or tuple(embeds.shape[1:]) != self.embed_shape or not len(embeds):
            got = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise InputError(f"{what} must be [B,{','.join(map(str, self.embed_shape))}], got {got}")
        if not torch.isfinite(embeds).all():
            raise InputError(f"{what} hold NaN or inf")
        return embeds.to(self.device, self.dtype)

    def initial_noise(self, generators: list[torch.Generator], s: Mapping[str, Any]) -> torch.Tensor:
        """Starting latents float32 [B*num_samples, C, H/f, W/f] on the CPU, num_samples from each generator."""
        f = self.pipe.vae_scale_factor
        shape = (s["num_samples"], self.pipe.unet.config.in_channels, s["height"] // f, s["width"] // f)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def conditioning(self, embeds: torch.Tensor, negative: torch.Tensor | None, s: Mapping[str, Any],
                     generators: list[torch.Generator]) -> tuple[dict, dict, torch.Tensor]:
        """The UNet's conditional and unconditional keyword arguments, one row per sequence [B,...], and
        the starting latents (`initial_noise`), drawn from ``generators`` in this kind's order."""
        raise NotImplementedError

    def sample(self, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], latents: torch.Tensor,
               s: Mapping[str, Any]) -> list[Image.Image]:
        """The sampling loop: UNet kwargs per sequence [B,...] and latents [B*K,...] -> B*K PIL images.

        Each step runs the UNet once on the whole batch, both guidance branches together
        (batch 2 x B x num_samples; 1 x when guidance_scale <= 1).
        """
        k = s["num_samples"]
        latents = latents.to(self.device, self.dtype)
        scheduler = self.make_scheduler(s["scheduler"])  # this call's own: no state shared between calls
        scheduler.set_timesteps(s["steps"], device=self.device)
        latents = latents * scheduler.init_noise_sigma
        guided = s["guidance_scale"] > 1.0
        per_image = {name: c.repeat_interleave(k, dim=0) for name, c in cond.items()}
        if guided:
            per_image = {name: torch.cat([uncond[name].repeat_interleave(k, dim=0), c])
                         for name, c in per_image.items()}
        extra = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
        for t in self.pipe.progress_bar(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            noise = self.pipe.unet(x, t, **per_image, return_dict=False)[0]
            if guided:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + s["guidance_scale"] * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(image))

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None,
                 **overrides: Any) -> list[Image.Image]:
        """Generation embeddings [B, *embed_shape] -> B x num_samples RGB images, grouped per sequence.

        Images ``b*num_samples .. (b+1)*num_samples - 1`` come from ``embeds[b]``. ``negative_embeds``:
        [B or 1, *embed_shape], the unconditional branch instead of the default (the empty prompt's
        text embedding for SD v1.x, zeros for unCLIP). ``overrides``: scheduler, steps, guidance_scale,
        height, width, num_samples, seed, noise_level (None = config default). Safe to call from
        several threads at once.
        """
        s = self.settings(**overrides)
        embeds = self.check_embeds(embeds)
        if negative_embeds is not None:
            negative_embeds = self.check_embeds(negative_embeds, "negative embeddings")
            if len(negative_embeds) not in (1, len(embeds)):
                raise InputError(f"negative embeddings: {len(negative_embeds)} rows for {len(embeds)} sequences "
                                 f"(give one, or one per sequence)")
            negative_embeds = negative_embeds.expand_as(embeds)
        generators = [torch.Generator("cpu").manual_seed(s["seed"]) for _ in range(len(embeds))]
        cond, uncond, latents = self.conditioning(embeds, negative_embeds, s, generators)
        return self.sample(cond, uncond, latents, s)


class TextConditioned(Diffusion):
    """SEED-1: Stable Diffusion v1.x with the embeddings [B,77,768] as its text conditioning."""

    kind = "sd1"

    def __init__(self, pipe: StableDiffusionPipeline, defaults: Mapping[str, Any], embed_shape: tuple[int, ...]):
        unet_dim = pipe.unet.config.cross_attention_dim
        text_dim = pipe.text_encoder.config.hidden_size
        if len(embed_shape) != 2 or unet_dim != embed_shape[-1] or text_dim != embed_shape[-1]:
            raise CheckpointError(
                f"the diffusion model does not fit the tokenizer: its UNet cross-attends to width {unet_dim} "
                f"and its text encoder outputs width {text_dim}, but the generation embeddings are "
                f"{list(embed_shape)} per sequence. SEED-1 needs Stable Diffusion v1.x ([77, 768]); "
                f"SEED-2 ([1024]) needs Stable Diffusion 2.1 unCLIP ({UNCLIP_REPO}).")
        super().__init__(pipe, defaults, embed_shape)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        s = super().settings(**overrides)
        if s.get("noise_level") not in (None, 0):
            raise InputError(f"noise_level={s['noise_level']!r}: a setting of SD 2.1 unCLIP (SEED-2), "
                             f"not of SD v1.x (SEED-1)")
        return s

    def conditioning(self, embeds, negative, s, generators):
        uncond = self.uncond_embeddings().expand_as(embeds) if negative is None else negative
        return {"encoder_hidden_states": embeds}, {"encoder_hidden_states": uncond}, self.initial_noise(generators, s)


class ImageConditioned(Diffusion):
    """SEED-2: Stable Diffusion 2.1 unCLIP with the embedding [B,1024] as its noised image conditioning."""

    kind = "unclip"

    def __init__(self, pipe: StableUnCLIPImg2ImgPipeline, defaults: Mapping[str, Any], embed_shape: tuple[int, ...]):
        dim = pipe.image_normalizer.config.embedding_dim
        unet = pipe.unet.config
        if (embed_shape != (dim,) or unet.class_embed_type != "projection"
                or unet.projection_class_embeddings_input_dim != 2 * dim):
            raise CheckpointError(
                f"the diffusion model does not fit the tokenizer: its image normalizer takes width {dim} and its "
                f"UNet's class embedding ({unet.class_embed_type}) {unet.projection_class_embeddings_input_dim} "
                f"(= 2 x {dim} expected), but the generation embeddings are {list(embed_shape)} per sequence. "
                f"SEED-2 needs Stable Diffusion 2.1 unCLIP ([1024]); SEED-1 ([77, 768]) needs Stable Diffusion v1.x.")
        super().__init__(pipe, defaults, embed_shape)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        s = super().settings(**overrides)
        levels = int(self.pipe.image_noising_scheduler.config.num_train_timesteps)
        s["noise_level"] = check_int("noise_level", s.get("noise_level", 0), 0, levels)
        return s

    def noised(self, embeds: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """diffusers' `noise_image_embeddings` with the given noise: [B,D] -> [B,2D] (noised, level embedding)."""
        return self.pipe.noise_image_embeddings(embeds, level, noise=noise.to(embeds.device, embeds.dtype))

    def conditioning(self, embeds, negative, s, generators):
        # per sequence, as stock diffusers draws from one generator: the embedding's noise, then the latents;
        # then the negative embedding's noise, so negative codes leave the other draws unchanged
        b, dim = embeds.shape
        noise = torch.cat([torch.randn((1, dim), generator=g) for g in generators])
        latents = self.initial_noise(generators, s)
        text = self.uncond_embeddings().expand(b, -1, -1)
        cond = {"encoder_hidden_states": text, "class_labels": self.noised(embeds, noise, s["noise_level"])}
        if negative is None:
            image_uncond = torch.zeros_like(cond["class_labels"])
        else:
            negative_noise = torch.cat([torch.randn((1, dim), generator=g) for g in generators])
            image_uncond = self.noised(negative, negative_noise, s["noise_level"])
        return cond, {"encoder_hidden_states": text, "class_labels": image_uncond}, latents
