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

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image]
"""A path, the bytes of an encoded image, a binary file object, or a PIL image."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def describe(src: ImageInput) -> str:
    """A short human name for an image input, for error messages and dataset ids."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} {src.width}x{src.height}>"
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


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    16-bit images are scaled (``v / 257``: a 16-bit image gives the same pixels as its 8-bit
    twin), 32-bit integer ones likewise when they fit in 16 bits, else stretched min..max. Float
    images in [0, 1] are scaled by 255, in [0, 255] kept, others stretched; NaN/inf count as 0.
    Transparency (an alpha band or a transparent colour) is composited on white.
    """
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: the image has no pixels ({img.width}x{img.height})")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        full_scales = (1.0, 255.0) if img.mode == "F" else (65535.0,)
        scale = next((f for f in full_scales if lo >= 0 and hi <= f), None)
        if scale is None:  # unknown range: stretch min..max
            a, scale = a - lo, (hi - lo) or 1.0
        a = np.nan_to_num(a * (255.0 / scale), nan=0.0, posinf=0.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> float32 [3,size,size]: bicubic resize (no crop), /255, CLIP normalize."""
    x = TF.pil_to_tensor(img.resize((size, size), Image.BICUBIC)).float().div_(255)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def load_batch(images: ImageInput | Sequence[ImageInput], size: int) -> torch.Tensor:
    """Images -> float32 [B,3,size,size]. A bad item raises `InputError` naming its position."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(images, "read"):
        images = [images]
    images = list(images)
    if len(images) == 0:
        raise InputError("got an empty list of images")
    out = []
    for i, src in enumerate(images):
        try:
            out.append(preprocess_image(open_image(src), size))
        except InputError as e:
            raise InputError(f"image {i} of {len(images)}: {e}") from None
    return torch.stack(out)


def check_pixel_values(x: torch.Tensor, size: int) -> torch.Tensor:
    """Validate preprocessed pixels: float [B,3,size,size] (or [3,size,size]), all finite."""
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
    return x
