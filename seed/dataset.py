"""Tokenizing a whole dataset: input discovery, a fault-tolerant image Dataset, resumable JSONL output.

Used by ``scripts/tokenize_dataset.py``. Each process (a torchrun rank) takes a deterministic
share of the sorted image ids, skips the ids already in the output folder, and appends one
JSON line per image to its own ``codes-rankNNNNN.jsonl`` (bad inputs to ``errors-rankNNNNN.jsonl``),
a batch at a time with flush + fsync, so a crash loses at most the batch being written and a
rerun repairs the torn line and carries on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .errors import InputError
from .images import open_image, preprocess_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File (and tar member) name endings taken as images, case-insensitive; other files are ignored."""

RANK_FILE = re.compile(r"^(codes|errors)-rank(\d{5})\.jsonl$")


@dataclass(frozen=True, slots=True)
class Item:
    """One image to tokenize: a file, or a member of an uncompressed tar at ``offset`` / ``size``.

    ``error`` is set for an input that is already known to be bad (an unreadable tar shard).
    """

    id: str
    path: str
    offset: int | None = None
    size: int | None = None
    error: str | None = None


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _tar_items(path: Path, shard_id: str) -> list[Item]:
    """The image members of a tar shard; an unreadable shard (or tail) becomes an error item."""
    items = []
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed only: members are read by offset
            for m in tf:
                if m.isfile() and is_image_name(m.name):
                    items.append(Item(f"{shard_id}/{m.name}", str(path), m.offset_data, m.size))
    except (tarfile.TarError, OSError) as e:
        items.append(Item(shard_id, str(path), error=f"{path}: cannot read the tar shard "
                                                     f"(uncompressed .tar only; truncated?): {e}"))
    return items


def _expand(path: Path, item_id: str) -> list[Item]:
    if path.suffix.lower() == ".tar" and path.is_file():
        return _tar_items(path, item_id)
    return [Item(item_id, str(path))]


def discover(src: str | os.PathLike) -> list[Item]:
    """All images of an input, sorted by id, each id once.

    ``src`` is a folder (searched recursively; image files by extension and ``.tar`` shards;
    ids are paths relative to it), a ``.tar`` shard (ids ``shard.tar/member``), or a text file
    listing one path per line (files or ``.tar`` shards; relative paths are relative to the
    list's folder; blank lines and ``#`` comments are skipped; ids are the paths as written).
    A listed path that does not exist is kept: it fails later as an error row.
    """
    src = Path(src)
    items: list[Item] = []
    if src.is_dir():
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                if is_image_name(name) or name.lower().endswith(".tar"):
                    p = Path(dirpath) / name
                    items += _expand(p, p.relative_to(src).as_posix())
    elif src.suffix.lower() == ".tar" and src.is_file():
        items = _tar_items(src, src.name)
    elif src.is_file():
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{src}: expected a folder, a .tar shard or a text file listing paths "
                             f"(one per line); this file is not UTF-8 text") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                items += _expand(src.parent / line, line)
    else:
        raise InputError(f"{src}: no such file or folder")
    unique = {}
    for item in items:
        if item.id in unique:
            logger.warning("%s: listed more than once; tokenized once", item.id)
        unique.setdefault(item.id, item)
    return [unique[k] for k in sorted(unique)]


def shard(items: Sequence[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's share of the sorted items: every ``world_size``-th one from ``rank``."""
    return list(items[rank::world_size])


class ImageDataset(Dataset):
    """Decodes and preprocesses images; never raises for a bad image.

    Each item is a dict ``{"id": str, "pixels": float32 [3,S,S] or None, "error": str or None}``.
    """

    def __init__(self, items: Sequence[Item], image_size: int):
        self.items = list(items)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        try:
            if item.error is not None:
                raise InputError(item.error)
            if item.offset is None:
                src = item.path
            else:
                with open(item.path, "rb") as f:
                    f.seek(item.offset)
                    src = io.BytesIO(f.read(item.size))
                src.name = f"{item.path}:{item.id}"
            pixels = preprocess_image(open_image(src), self.image_size)
            return {"id": item.id, "pixels": pixels, "error": None}
        except Exception as e:  # one bad image must not kill the worker or the run
            msg = str(e) if isinstance(e, InputError) else f"{item.path}: {type(e).__name__}: {e}"
            return {"id": item.id, "pixels": None, "error": msg}


def collate(rows: list[dict]) -> dict:
    """Rows -> ``{"ids": [good ids], "pixels": float32 [B,3,S,S] or None, "errors": [(id, message)]}``."""
    good = [r for r in rows if r["error"] is None]
    return {
        "ids": [r["id"] for r in good],
        "pixels": torch.stack([r["pixels"] for r in good]) if good else None,
        "errors": [(r["id"], r["error"]) for r in rows if r["error"] is not None],
    }


def rank_file(out_dir: str | os.PathLike, kind: str, rank: int) -> Path:
    """``OUT/codes-rank00000.jsonl`` (kind ``"codes"``) or ``OUT/errors-rank00000.jsonl``."""
    return Path(out_dir) / f"{kind}-rank{rank:05d}.jsonl"


def output_files(out_dir: str | os.PathLike) -> list[Path]:
    """Every codes and errors file in ``out_dir``, whichever world size wrote it."""
    out = Path(out_dir)
    return sorted(p for p in out.iterdir() if RANK_FILE.match(p.name)) if out.is_dir() else []


def repair(path: Path) -> int:
    """Cut a torn last line (no newline: a crash mid-write) off a JSONL file; returns bytes cut."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = size
        while keep > 0:  # scan back to the last newline
            step = min(keep, 1 << 16)
            f.seek(keep - step)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                keep = keep - step + nl + 1
                break
            keep -= step
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            logger.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def read_ids(path: Path) -> set[str]:
    """The ids in a JSONL output file; a torn last line (another rank may be writing it) is ignored."""
    with open(path, "rb") as f:
        data = f.read()
    ids = set()
    for n, line in enumerate(data.split(b"\n")[:-1], 1):  # the piece after the last newline is torn
        try:
            ids.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {n}: not a valid output line ({line[:80]!r}); "
                             f"fix or delete the line, then rerun") from None
    return ids


def finished_ids(out_dir: str | os.PathLike) -> set[str]:
    """Ids already in any codes or errors file of ``out_dir`` (from any rank of any earlier run)."""
    done: set[str] = set()
    for p in output_files(out_dir):
        done |= read_ids(p)
    return done


class JsonlWriter:
    """Appends rows to a JSONL file, a batch at a time, each batch flushed and fsynced."""

    def __init__(self, path: Path):
        new = not path.exists()
        self.file = open(path, "a", encoding="utf-8")
        if new:  # make the new file's directory entry durable too
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if text:
            self.file.write(text)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


@dataclass
class Summary:
    """What one run did: images tokenized, skipped (already in the output), failed; wall time."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def tokenize_items(tok, items: Sequence[Item], out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1,
                   batch_size: int = 64, num_workers: int = 4, progress: bool = True) -> Summary:
    """Tokenize this rank's share of ``items`` into ``out_dir``, resuming where an earlier run stopped.

    ``tok``: a `seed.Tokenizer`. Writes ``codes-rank{rank}.jsonl`` lines ``{"image": id, "codes": [32 ints]}``
    and ``errors-rank{rank}.jsonl`` lines ``{"image": id, "error": message}``. Ids found in any
    output file of ``out_dir`` are skipped. Rank 0 also repairs the files of ranks beyond
    ``world_size`` (left by a run with more processes), which no rank appends to.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [rank_file(out, kind, rank) for kind in ("codes", "errors")]
    orphans = [p for p in output_files(out) if rank == 0 and int(RANK_FILE.match(p.name)[2]) >= world_size]
    for p in mine + orphans:
        repair(p)
    done = finished_ids(out)
    share = shard(items, rank, world_size)
    todo = [it for it in share if it.id not in done]
    summary = Summary(skipped=len(share) - len(todo))
    if summary.skipped:
        logger.info("rank %d: %d of %d images already in %s, skipped", rank, summary.skipped, len(share), out)

    num_workers = min(num_workers, -(-len(todo) // batch_size))  # no idle workers for a small share
    loader = DataLoader(ImageDataset(todo, tok.image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate, pin_memory=tok.device.type == "cuda")
    codes_out, errors_out = JsonlWriter(mine[0]), JsonlWriter(mine[1])
    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=f"rank {rank}/{world_size}",
               dynamic_ncols=True)
    try:
        for batch in loader:
            if batch["pixels"] is not None:
                codes = tok.encode(batch["pixels"]).tolist()
                codes_out.write({"image": i, "codes": c} for i, c in zip(batch["ids"], codes))
            errors_out.write({"image": i, "error": e} for i, e in batch["errors"])
            summary.done += len(batch["ids"])
            summary.failed += len(batch["errors"])
            bar.update(len(batch["ids"]) + len(batch["errors"]))
    finally:
        bar.close()
        codes_out.close()
        errors_out.close()
    summary.seconds = time.perf_counter() - start
    return summary
