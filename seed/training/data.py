"""Training data: image-caption pairs, the original augmentation and caption cleaning, and a
resumable distributed batch order.

Sources (``data.train``):

- a JSONL file, one ``{"image": path, "caption": str or [str, ...]}`` per line; a relative
  ``image`` path is relative to the JSONL file's folder (a ``.json`` file holding one list of
  such objects, the original's format, is read too);
- a WebDataset-style ``.tar`` shard, or a folder searched recursively for ``.tar`` shards: members
  ``KEY.jpg`` / ``KEY.png`` / ... with ``KEY.txt`` (the caption) or ``KEY.json`` (a caption
  string, a list, or an object with ``"caption"``); as in WebDataset, the field is everything
  after the first dot of the file name, so ``KEY.seg.png`` is another field and is ignored.
  Uncompressed tars only (read by offset with the standard library).

Randomness never comes from a global generator: the data order of epoch ``e`` is a permutation
seeded by ``seed + e``, and each sample's crop, flip and caption choice come from a generator
seeded by ``(seed, e, index)``. So a run is the same for any number of DataLoader workers, the
global batch of step k is the same for any number of processes (each rank takes its own slice
of it), and a run resumed from a saved `Position` continues exactly where it stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..dataset import IMAGE_EXTENSIONS
from ..errors import InputError
from ..images import CLIP_MEAN, CLIP_STD, open_image

logger = logging.getLogger(__name__)

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """The original caption processing (LAVIS ``BlipCaptionProcessor``, prompt "", spec section 3).

    Lower-case; each of ``. ! " ( ) * # : ; ~`` becomes a space; runs of 2+ whitespace become one
    space; a trailing newline and surrounding spaces are stripped; the first ``max_words``
    space-separated words are kept. Commas, apostrophes and hyphens stay.
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


# --- sources ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pair:
    """One training pair: an image file, or a member of an uncompressed tar at ``offset``/``size``,
    and its caption(s)."""

    id: str
    path: str
    captions: tuple[str, ...]
    offset: int | None = None
    size: int | None = None

    def open(self) -> Image.Image:
        """The image as 8-bit RGB; raises `InputError` naming the pair."""
        if self.offset is None:
            return open_image(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            src = io.BytesIO(f.read(self.size))
        src.name = f"{self.path}:{self.id}"
        return open_image(src)


def _captions(value, where: str) -> tuple[str, ...]:
    if isinstance(value, dict):
        value = next((value[k] for k in ("caption", "captions", "text") if k in value), None)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: the caption must be a string or a non-empty list of strings")
    return tuple(value)


def _read_json_pairs(path: Path) -> tuple[list[Pair], int]:
    """Pairs of a JSONL (or JSON list) file; malformed rows are logged and counted, not fatal."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the data file: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            rows = list(enumerate(json.loads(text), 1))
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: not a JSON list of {{'image', 'caption'}} objects: {e}") from None
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 etc. may sit in a caption
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as e:
                    logger.warning("%s, line %d: not JSON (%s); skipped", path, n, e)
                    rows.append((n, None))
    pairs, bad = [], 0
    for n, row in rows:
        where = f"{path}, line {n}" if path.suffix.lower() != ".json" else f"{path}, item {n}"
        try:
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or "caption" not in row:
                raise ValueError(f"{where}: expected an object with 'image' (a path) and 'caption'")
            image = Path(row["image"]).expanduser()
            image = image if image.is_absolute() else path.parent / image
            pairs.append(Pair(row["image"], str(image), _captions(row["caption"], where)))
        except ValueError as e:
            if row is not None:
                logger.warning("%s; skipped", e)
            bad += 1
    return pairs, bad


_IMAGE_FIELDS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/abc.seg.png`` -> key ``dir/abc``, extension ``seg.png``."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _read_tar_pairs(path: Path, shard_id: str) -> tuple[list[Pair], int]:
    """Pairs of one uncompressed tar shard; members without a partner are logged and counted."""
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if ext in _IMAGE_FIELDS:
                    images.setdefault(key, m)
                elif ext in ("txt", "json"):
                    texts[key] = (ext, tf.extractfile(m).read())
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: cannot read the tar shard (uncompressed .tar only; truncated?): {e}") from None
    pairs, bad = [], 0
    for key in sorted(images.keys() | texts.keys()):
        where = f"{path}:{key}"
        try:
            if key not in images:
                raise ValueError(f"{where}: a caption without an image")
            if key not in texts:
                raise ValueError(f"{where}: an image without a caption (.txt or .json)")
            ext, raw = texts[key]
            value = raw.decode("utf-8")
            captions = _captions(json.loads(value), where) if ext == "json" else (value.strip(),)
            m = images[key]
            pairs.append(Pair(f"{shard_id}/{m.name}", str(path), captions, m.offset_data, m.size))
        except (ValueError, UnicodeDecodeError) as e:
            logger.warning("%s; skipped", e)
            bad += 1
    return pairs, bad


def read_pairs(src: str | os.PathLike, what: str = "data.train") -> list[Pair]:
    """Every image-caption pair of ``data.train`` (a JSONL/JSON file, a ``.tar`` shard or a
    folder of shards), in a fixed order. Malformed rows are logged, counted and left out.
    ``what``: the option named in errors (``data.val`` for the held-out set)."""
    src = Path(src).expanduser()
    if src.is_dir():
        shards = sorted(p for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(".tar"))
        if not shards:
            raise InputError(f"{src}: a data folder must hold .tar shards (or pass a .jsonl file)")
        found = [_read_tar_pairs(p, p.relative_to(src).as_posix()) for p in shards]
    elif src.is_file() and src.name.lower().endswith(".tar"):
        found = [_read_tar_pairs(src, src.name)]
    elif src.is_file():
        found = [_read_json_pairs(src)]
    else:
        raise InputError(f"{what}: {src}: no such file or folder")
    pairs = [p for ps, _ in found for p in ps]
    bad = sum(b for _, b in found)
    if bad:
        logger.warning("%s: %d malformed row(s) skipped, %d pairs kept", src, bad, len(pairs))
    if not pairs:
        raise InputError(f"{what}: {src}: no image-caption pairs found")
    return pairs


# --- augmentation -------------------------------------------------------------------------------

class TrainTransform:
    """The original training augmentation (LAVIS ``blip2_image_train``), torchvision's own:
    RandomResizedCrop(size, scale (min_scale, 1), ratio (3/4, 4/3), bicubic), RandomHorizontalFlip(0.5),
    ToTensor, CLIP Normalize. ``__call__(img, seed)`` -> float32 [3, size, size]; its random draws come
    from ``seed`` alone (the global RNG is left as it was), so a sample's crop and flip do not depend
    on the worker, the rank or what ran before."""

    def __init__(self, size: int, min_scale: float = 0.5, flip: bool = True):
        steps = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                                     interpolation=InterpolationMode.BICUBIC)]
        steps += [T.RandomHorizontalFlip(0.5)] if flip else []
        self.pipeline = T.Compose([*steps, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.pipeline(img)


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    """A 63-bit seed for one sample's randomness, a function of ``(seed, epoch, index, attempt)`` only."""
    return int(np.random.SeedSequence([seed, epoch, index, attempt]).generate_state(1, np.uint64)[0] >> 1)


class PairDataset(Dataset):
    """Indexed by ``(epoch, index)``; returns ``{"pixel_values": float32 [3,S,S], "caption": str,
    "skipped": [(id, error)]}``.

    An image that fails to load is skipped: the next pair (``index + 1``, ...) takes its place,
    so a batch always has its full size, and the failure is reported in ``skipped``.
    """

    max_tries = 100

    def __init__(self, pairs: Sequence[Pair], transform: TrainTransform, seed: int = 42, max_words: int = 50):
        self.pairs, self.transform, self.seed, self.max_words = list(pairs), transform, seed, max_words

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        skipped = []
        for attempt in range(min(self.max_tries, len(self.pairs))):
            pair = self.pairs[(index + attempt) % len(self.pairs)]
            s = sample_seed(self.seed, epoch, index, attempt)
            try:
                img = pair.open()
            except Exception as e:  # one bad image must not stop the run
                msg = str(e) if isinstance(e, InputError) else f"{pair.path}: {type(e).__name__}: {e}"
                skipped.append((pair.id, msg))
                continue
            pixels = self.transform(img, s)
            caption = random.Random(s).choice(pair.captions)
            return {"pixel_values": pixels, "caption": clean_caption(caption, self.max_words), "skipped": skipped}
        raise InputError(f"{len(skipped)} images in a row failed to load, the last: {skipped[-1][1]}")


def collate(rows: list[dict]) -> dict:
    """Rows -> ``{"pixel_values": float32 [B,3,S,S], "captions": [str], "skipped": [(id, error)]}``."""
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "captions": [r["caption"] for r in rows],
        "skipped": [s for r in rows for s in r["skipped"]],
    }


# --- order and position -------------------------------------------------------------------------

@dataclass
class Position:
    """Where the data stream stands: ``index`` batches of ``epoch`` already consumed."""

    epoch: int = 0
    index: int = 0

    def advanced(self, batches_per_epoch: int) -> Position:
        """The position after one more batch."""
        if self.index + 1 >= batches_per_epoch:
            return Position(self.epoch + 1, 0)
        return Position(self.epoch, self.index + 1)


class EndlessBatches(Sampler):
    """Batches of ``(epoch, index)`` keys for one rank, forever, from ``start``.

    Epoch ``e`` shuffles all N pairs with a generator seeded ``seed + e``, cuts the permutation
    into global batches of ``batch_size x world_size`` (the incomplete last one is dropped) and
    gives rank r the r-th slice of ``batch_size`` of each. So step k's global batch is the same
    for any world size with the same global batch.
    """

    def __init__(self, num_pairs: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 42,
                 start: Position | None = None):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = num_pairs, batch_size, rank, world_size, seed
        self.start = start or Position()
        self.batches_per_epoch = num_pairs // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise InputError(f"data.train has {num_pairs} pairs, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes)")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, index = self.start.epoch, self.start.index
        glob, b = self.batch_size * self.world_size, self.batch_size
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for k in range(index, self.batches_per_epoch):
                lo = k * glob + self.rank * b
                yield [(epoch, i) for i in perm[lo:lo + b]]
            epoch, index = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own len()
        return 2**62


def build_loader(pairs: Sequence[Pair], *, image_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 42, start: Position | None = None, num_workers: int = 0, min_scale: float = 0.5,
                 flip: bool = True, max_words: int = 50, pin_memory: bool = False) -> tuple[DataLoader, int]:
    """An endless DataLoader of this rank's batches from ``start``, and the batches per epoch.

    Each batch is ``{"pixel_values": float32 [B,3,S,S], "captions": [B str], "skipped": [(id, error)]}``.
    """
    dataset = PairDataset(pairs, TrainTransform(image_size, min_scale, flip), seed=seed, max_words=max_words)
    sampler = EndlessBatches(len(pairs), batch_size, rank, world_size, seed, start)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))  # not the global RNG
    return loader, sampler.batches_per_epoch
