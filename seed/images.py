"""Reading images from the wild and the SEED-1 preprocessing.

Every failure is an `InputError` that names the input. Pillow's decompression-bomb limit is
kept, so a forged header fails before any pixels are allocated.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from .errors import InputError

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray, torch.Tensor]
"""A path, the bytes of an encoded image, a binary file object, a PIL image, a uint8 numpy array
(HxW or HxWx3/4, as notebooks hold images) or a uint8 tensor [3,H,W]."""

SINGLE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)
"""Inputs that are always one image (a file object is one too)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def describe(src: ImageInput) -> str:
    """A short human name for an image input, for error messages and dataset ids."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} {src.width}x{src.height}>"
    if isinstance(src, (np.ndarray, torch.Tensor)):
        return f"<{type(src).__module__.split('.')[0]} {src.dtype} {'x'.join(map(str, src.shape))}>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(getattr(src, "name", "<file object>"))


def open_image(src: ImageInput) -> Image.Image:
    """Open and fully decode an image, then convert it with `to_rgb`.

    Raises `InputError` (naming the input) for a missing or empty file, a file that is not an
    image, a truncated image, a decompression bomb, or a mode that cannot be converted.
    """
    name = describe(src)
    try:
        if isinstance(src, Image.Image):
            src.load()  # an image from Image.open is decoded only now
            return to_rgb(src, name)
        if isinstance(src, (np.ndarray, torch.Tensor)):
            return to_rgb(array_to_pil(src, name), name)
        if isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if not path.exists():
                raise InputError(f"{name}: no such file")
            if not path.is_file():
                raise InputError(f"{name}: not a file")
            if path.stat().st_size == 0:
                raise InputError(f"{name}: the file is empty")
        elif isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise InputError(f"{name}: empty, no bytes to decode")
            src = io.BytesIO(src)
        elif not hasattr(src, "read"):
            raise InputError(f"expected a path, bytes, a binary file or a PIL image, got {type(src).__name__}")
        with Image.open(src) as img:
            img.load()
            return to_rgb(img, name)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read (wrong extension or corrupt header?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name}: cannot decode the image (truncated or corrupt?): {e}") from None


def array_to_pil(a: np.ndarray | torch.Tensor, name: str = "array") -> Image.Image:
    """A uint8 image array -> PIL: numpy HxW, HxWx1, HxWx3 or HxWx4 (channels last, as notebooks
    hold images), or a torch tensor [3,H,W] / [1,H,W] (channels first, as torchvision holds them)."""
    if isinstance(a, torch.Tensor):
        if a.dtype != torch.uint8 or a.dim() != 3 or a.shape[0] not in (1, 3, 4):
            raise InputError(f"{name}: a tensor image must be uint8 [3,H,W] (or [B,3,H,W]); float tensors are "
                             f"preprocessed pixels [B,3,S,S] (use tok.preprocess)")
        a = a.detach().cpu().permute(1, 2, 0).numpy()
    if a.dtype != np.uint8:
        raise InputError(f"{name}: a numpy image must be uint8 (HxW or HxWx3), got {a.dtype}; "
                         f"convert it, e.g. (a * 255).round().astype(np.uint8) for floats in [0, 1]")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"{name}: a numpy image must be HxW or HxWx3/4 (channels last), got shape {list(a.shape)}")
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    16-bit images are scaled (``v / 257``: a 16-bit image gives the same pixels as its 8-bit
    twin). 32-bit integer ones holding 8-bit values (all in 0..255) are taken as they are, those
    holding 16-bit values are scaled like 16-bit images, others stretched min..max. Float
    images in [0, 1] are scaled by 255, in [0, 255] kept, others stretched; NaN/inf count as 0.
    Transparency (an alpha band or a transparent colour) is composited on white.
    """
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: the image has no pixels ({img.width}x{img.height})")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        full_scales = {"F": (1.0, 255.0), "I": (255.0, 65535.0)}.get(img.mode, (65535.0,))
        scale = next((f for f in full_scales if lo >= 0 and hi <= f), None)
        if scale is None:  # unknown range: stretch min..max
            a, scale = a - lo, (hi - lo) or 1.0
        a = np.nan_to_num(a * (255.0 / scale), nan=0.0, posinf=0.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
"""The resize filters of ``model.image_resample``: SEED-1 bicubic; SEED-2's main path bilinear
(torchvision's default, which for a PIL image is PIL's antialiased bilinear resize)."""


def resample_filter(resample: str) -> Image.Resampling:
    """The PIL filter named ``resample`` (a key of `RESAMPLE`); `InputError` for another name."""
    try:
        return RESAMPLE[resample]
    except (KeyError, TypeError):
        raise InputError(f"model.image_resample must be one of {', '.join(RESAMPLE)}, got {resample!r}") from None


def preprocess_image(img: Image.Image, size: int, resample: str = "bicubic") -> torch.Tensor:
    """An RGB PIL image -> float32 [3,size,size]: resize both sides with PIL's ``resample``
    filter (no crop, aspect ratio not kept), /255, CLIP normalize."""
    x = TF.pil_to_tensor(img.resize((size, size), resample_filter(resample))).float().div_(255)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them -> a list of single images.

    A numpy array HxW / HxWxC or a uint8 tensor [3,H,W] is one image; a uint8 tensor [B,3,H,W]
    or a numpy array BxHxWxC is B images. Raises `InputError` for None or an empty list.
    """
    if images is None:
        raise InputError("images is None: pass image paths, PIL images, uint8 arrays or preprocessed pixels")
    if isinstance(images, SINGLE) or hasattr(images, "read"):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    try:
        images = list(images)
    except TypeError:
        raise InputError(f"expected an image or a list of images, got {type(images).__name__}") from None
    if len(images) == 0:
        raise InputError("got an empty list of images")
    return images


def load_batch(images: ImageInput | Sequence[ImageInput], size: int, resample: str = "bicubic",
               start: int = 0, total: int | None = None) -> torch.Tensor:
    """Images -> float32 [B,3,size,size] (`preprocess_image` with ``resample``). A bad item raises
    `InputError` naming its position (``start + i`` of ``total``, for a chunk of a longer list)."""
    images = as_list(images)
    resample_filter(resample)  # a bad filter name is the config's fault, not image i's
    out = []
    for i, src in enumerate(images):
        try:
            out.append(preprocess_image(open_image(src), size, resample))
        except InputError as e:
            raise InputError(f"image {start + i} of {total or len(images)}: {e}") from None
    return torch.stack(out)


PIXEL_MARGIN = 0.5
"""How far (in normalized units, about 0.13 of the [0, 1] range) pixels may stray outside the
CLIP-normalized range of [0, 1] images, e.g. after another library's resampling overshoot."""
PIXEL_LOW = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]) - PIXEL_MARGIN
PIXEL_HIGH = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]) + PIXEL_MARGIN


def check_pixel_values(x: torch.Tensor, size: int) -> torch.Tensor:
    """Validate preprocessed pixels: float [B,3,size,size] (or [3,size,size]), finite, and in the
    range CLIP normalization gives [0, 1] images (per channel, with `PIXEL_MARGIN`)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        raise InputError(f"pixel_values must be [B,3,{size},{size}], got {list(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"pixel_values must be a float tensor (CLIP-normalized), got {x.dtype}")
    if x.shape[0] == 0:
        raise InputError("pixel_values is an empty batch")
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    if bad.any():
        raise InputError(f"pixel_values has NaN or inf at batch position(s) {bad.nonzero().flatten().tolist()}")
    lo, hi = x.amin((2, 3)).float().cpu(), x.amax((2, 3)).float().cpu()  # [B,3]
    bad = ((lo < PIXEL_LOW) | (hi > PIXEL_HIGH)).any(1)
    if bad.any():
        raise InputError(
            f"pixel_values at batch position(s) {bad.nonzero().flatten().tolist()} are not CLIP-normalized "
            f"(range {lo.min().item():.3g}..{hi.max().item():.3g}; normalized [0, 1] images lie within "
            f"{PIXEL_LOW.min().item() + PIXEL_MARGIN:.2f}..{PIXEL_HIGH.max().item() - PIXEL_MARGIN:.2f}): pass the images "
            f"themselves (paths, PIL, uint8 arrays) or the output of tok.preprocess(images)")
    return x
