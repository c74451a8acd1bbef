"""Tokenizing a whole dataset: input listing, a fault-tolerant image Dataset, a locked, resumable output folder.

Used by ``scripts/tokenize_dataset.py`` (and, for the listing, ``check_image.py`` and
``evaluate.py``'s image folders, so all three find the same files). The sorted image ids are cut into
chunks of ``chunk_size`` ids; chunk ``k`` goes to rank ``k % world_size``, whose rows go to
``OUT/codes/K.jsonl`` (bad inputs to ``OUT/errors/K.jsonl``), a batch at a time with flush +
fsync; a finished chunk gets a marker ``OUT/done/K.json``. A rerun skips the chunks with a marker
by their name alone and reads only the rows of unfinished chunks (at most one per rank of the
interrupted run), so resuming costs the same at 10M rows as at 10k. ``OUT/run.json`` records what
made the rows (the model config, a hash of each weight file, the listing's hash, the output
format); a rerun that differs is refused. ``OUT/.lock`` keeps a second run out of the folder.

This module imports only the standard library at import time (torch and the image code load when
a run starts), so scripts can check their arguments and the output folder first.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import operator
import os
import signal
import socket
import tarfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File (and tar member) name endings taken as images, case-insensitive; other files are ignored."""

PROGRESS_LOG_S = 30.0
"""Seconds between progress lines when stderr is not a terminal (a log file, a scheduler), where a
progress bar would leave fragments between the log lines."""

MAX_CHUNK_SIZE = 10_000
"""The default chunk size for large inputs: a resume reads at most this many rows per unfinished chunk."""

FORMATS = ("codes", "text", "codes+text")
"""What each row holds besides the image id: the 32 codes, their SEED-LLaMA text
(`seed.llm.codes_to_text`), or both."""


def check_format(model_cfg: Any, fmt: str) -> None:
    """`InputError` unless ``fmt`` is one of `FORMATS` and fits the model: the SEED-LLaMA text
    forms (``text``, ``codes+text``) only for SEED-2 (``model.decoder.head: image``), whose codes
    SEED-LLaMA reads; SEED-1's codes index another codebook and mean nothing to it."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    head = model_cfg.decoder.get("head", "reverse_qformer")
    if fmt != "codes" and head != "image":
        raise InputError(f"--format {fmt} writes SEED-LLaMA text, which holds SEED-2 codes; this is a SEED-1 "
                         f"config (model.decoder.head: {head}), whose codes mean nothing to SEED-LLaMA. Use "
                         f"--format codes, or a SEED-2 config such as configs/seed2_tokenizer.yaml")


def output_fields(fmt: str) -> set[str]:
    """The fields an output row of ``fmt`` holds besides ``image``."""
    return {"codes+text": {"codes", "text"}, "text": {"text"}}.get(fmt, {"codes"})


# --- listing -------------------------------------------------------------------------------------

class Item(NamedTuple):
    """One image: a file (``source`` is the folder its ``id`` is relative to), or a member of an
    uncompressed tar (``source`` is the shard's path; the member's bytes are at ``offset``/``size``).

    ``error`` is set for an input already known to be bad (an unreadable tar shard, a bad JSONL
    row). ``fields``: the other fields of a JSONL input row, written into its output row.
    ``file``: the image's path relative to ``source`` where it differs from ``id`` (an image on
    several JSONL rows: ids ``a.jpg``, ``a.jpg#2``, ...).
    """

    id: str
    source: str
    offset: int | None = None
    size: int | None = None
    error: str | None = None
    fields: dict[str, Any] | None = None
    file: str | None = None

    @property
    def path(self) -> str:
        """The file holding the image (the tar shard for a member)."""
        if self.offset is None and self.error is None:
            return os.path.join(self.source, self.file or self.id)
        return self.source

    @property
    def name(self) -> str:
        """A human name for messages: the file's path, or ``shard.tar:member``."""
        return self.path if self.offset is None else f"{self.source}:{self.id}"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _tar_items(path: str, shard_id: str) -> list[Item]:
    """The image members of a tar shard; an unreadable shard (or tail) becomes an error item."""
    items = []
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed only: members are read by offset
            for m in tf:
                if m.isfile() and is_image_name(m.name):
                    items.append(Item(f"{shard_id}/{m.name}", path, m.offset_data, m.size))
    except (tarfile.TarError, OSError) as e:
        items.append(Item(shard_id, path, error=f"{path}: cannot read the tar shard "
                                                f"(uncompressed .tar only; truncated?): {e}"))
    return items


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar") and os.path.isfile(path)


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(relative folder prefix, file name) for every file under ``root``, following symlinked
    folders; a folder reached a second time (a symlink cycle, or two links to one folder) is
    skipped with a warning, so every real folder is listed once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("%s: a folder already listed (symlink cycle or second link); skipped", dirpath)
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in filenames:
            yield prefix, name


def _jsonl_items(src: str) -> list[Item]:
    """The rows of a JSONL input: ``{"image": path, any other fields}`` per line (see `discover`).

    An image on several rows gets the ids ``path``, ``path#2``, ... (skipping any ``path#n`` that
    another row names as its own image, so every row keeps its own id)."""
    base, name = os.path.dirname(src), os.path.basename(src)
    rows: list[tuple[int, str, Any, str | None]] = []
    with open(src, encoding="utf-8-sig") as f:  # -sig: a BOM from a Windows tool is not part of row 1
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                row, why = None, f"not valid JSON ({e})"
            else:
                why = None if isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"] else \
                    'not a JSON object with an "image" path'
            if why is None:
                try:
                    row["image"].encode("utf-8")
                except UnicodeEncodeError:
                    why = 'its "image" path is not valid Unicode (a lone surrogate)'
            rows.append((n, line, row, why))
    literal = {row["image"] for _, _, row, why in rows if why is None}
    items: list[Item] = []
    times: dict[str, int] = {}
    for n, line, row, why in rows:
        if why is not None:
            items.append(Item(f"{name}:{n}", src, error=f"{src}, line {n}: {why}: {line.strip()[:80]!r}"))
            continue
        path = row.pop("image")
        k = times.get(path, 0) + 1
        while k > 1 and f"{path}#{k}" in literal:
            k += 1
        times[path] = k
        items.append(Item(path if k == 1 else f"{path}#{k}", base, fields=row or None,
                          file=None if k == 1 else path))
    return items


def discover(src: str | os.PathLike) -> list[Item]:
    """All images of an input, sorted by id, each id once.

    ``src`` is a folder (searched recursively, symlinked sub-folders followed; image files by
    extension and ``.tar`` shards; ids are paths relative to it), a ``.tar`` shard (ids
    ``shard.tar/member``), a ``.jsonl`` file of rows ``{"image": path, any other fields}``, or a
    text file listing one path per line (files or ``.tar`` shards; relative paths are relative to
    the list's folder; blank lines and ``#`` comments are skipped; ids are the paths as written).

    A JSONL row's id is its ``image`` path as written (relative to the file's folder); its other
    fields (``fields``) go into its output row, so captions travel with codes. An image on
    several rows is tokenized once per row, the n-th row's id being ``path#n`` from the second
    on. A row that is not a JSON object with a string ``image`` becomes an error item with id
    ``file.jsonl:LINE``. A listed path that does not exist is kept: it fails later as an error
    row. This is the one listing used by the dataset run, ``check_image.py`` and ``evaluate.py``
    (image folders, tars and lists: `seed.evaluation.data.load_images`).
    """
    src = os.fspath(src)
    items: list[Item] = []
    if os.path.isfile(src) and src.lower().endswith(".jsonl"):
        try:
            items = _jsonl_items(src)
        except UnicodeDecodeError:
            raise InputError(f"{src}: a .jsonl input must be UTF-8 text") from None
    elif os.path.isdir(src):
        for prefix, name in _walk(src):
            if is_image_name(name):
                items.append(Item(prefix + name, src))
            elif name.lower().endswith(".tar") and os.path.isfile(os.path.join(src, prefix, name)):
                items += _tar_items(os.path.join(src, prefix, name), prefix + name)
    elif _is_tar(src):
        items = _tar_items(src, os.path.basename(src))
    elif os.path.isfile(src):
        base = os.path.dirname(src)
        try:
            with open(src, encoding="utf-8-sig") as f:
                for line in f:
                    line = line.strip()
                    if line and line[0] != "#":
                        if line[-4:].lower() == ".tar" and _is_tar(os.path.join(base, line)):
                            items += _tar_items(os.path.join(base, line), line)
                        else:
                            items.append(Item(line, base))
        except UnicodeDecodeError:
            raise InputError(f"{src}: expected a folder, a .tar shard or a text file listing paths "
                             f"(one per line); this file is not UTF-8 text") from None
    else:
        raise InputError(f"{src}: no such file or folder")
    items.sort(key=operator.itemgetter(0))  # by id
    unique = [it for i, it in enumerate(items) if i == 0 or it.id != items[i - 1].id]
    if len(unique) < len(items):
        logger.warning("%d id(s) listed more than once in %s; each tokenized once", len(items) - len(unique), src)
    return unique


def listing_hash(items: Sequence[Item]) -> str:
    """sha256 of the sorted ids, and of the fields of JSONL rows (what a rerun must find again for
    the chunks, and the rows written, to line up)."""
    def key(it: Item) -> str:
        return it.id if it.fields is None else f"{it.id}\t{json.dumps(it.fields, sort_keys=True)}"

    h = hashlib.sha256()
    for start in range(0, len(items), 65536):
        h.update("\n".join(map(key, items[start:start + 65536])).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def item_source(item: Item) -> str | IO[bytes]:
    """What `seed.images.open_image` reads for an item: its path, or a tar member's bytes
    (a file object named ``shard.tar:member``). Raises `InputError` for a known-bad item."""
    if item.error is not None:
        raise InputError(item.error)
    if item.offset is None:
        return item.path
    with open(item.source, "rb") as f:
        f.seek(item.offset)
        data = io.BytesIO(f.read(item.size))
    data.name = item.name
    return data


def read_item(item: Item):
    """The item as an 8-bit RGB PIL image; `InputError` naming it if it cannot be read."""
    from .images import open_image

    return open_image(item_source(item))


# --- loading -------------------------------------------------------------------------------------

class ImageDataset:
    """A map-style Dataset that decodes and preprocesses images and never raises for a bad one.

    Each element is a dict ``{"id": str, "chunk": int, "pixels": float32 [3,S,S] or None,
    "error": str or None}``; ``chunks[i]`` is the output chunk of ``items[i]`` (default 0).
    """

    def __init__(self, items: Sequence[Item], image_size: int, chunks: Sequence[int] | None = None,
                 resample: str = "bicubic"):
        self.items = list(items)
        self.chunks = list(chunks) if chunks is not None else [0] * len(self.items)
        self.image_size = image_size
        self.resample = resample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from .images import preprocess_image

        item = self.items[i]
        try:
            img = read_item(item)
            pixels = preprocess_image(img, self.image_size, self.resample)
            return {"id": item.id, "chunk": self.chunks[i], "pixels": pixels, "error": None}
        except Exception as e:  # one bad image must not kill the worker or the run
            msg = str(e) if isinstance(e, InputError) else f"{item.name}: {type(e).__name__}: {e}"
            return {"id": item.id, "chunk": self.chunks[i], "pixels": None, "error": msg}


def collate(rows: list[dict]) -> dict:
    """Rows -> ``{"ids", "chunks": of the good rows, "pixels": float32 [B,3,S,S] or None,
    "errors": [(id, chunk, message)]}``."""
    import torch

    good = [r for r in rows if r["error"] is None]
    return {
        "ids": [r["id"] for r in good],
        "chunks": [r["chunk"] for r in good],
        "pixels": torch.stack([r["pixels"] for r in good]) if good else None,
        "errors": [(r["id"], r["chunk"], r["error"]) for r in rows if r["error"] is not None],
    }


def default_workers(most: int = 4) -> int:
    """DataLoader worker processes by default: the CPUs this process may use (``os.sched_getaffinity``,
    as torch's "suggested max number of worker" check), at most ``most``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(most, cpus))


def _worker_init(_: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- the output folder: lock, run record, chunks -------------------------------------------------

class OutputError(InputError):
    """The output folder cannot be used: held by another run, not writable, or holding rows of
    another model, config or input."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a live holder from a reused pid); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD_LOCKS: weakref.WeakSet[OutputLock] = weakref.WeakSet()
"""The `OutputLock` objects this process holds (closed in forked children, see `_drop_inherited_locks`)."""


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, any ``fork``): close the inherited lock files.

    ``flock`` belongs to the open file, which a fork shares: a worker keeping its copy would hold
    the folder after its parent was killed (until the worker notices, seconds later), and a rerun
    would be refused naming the dead pid. Closing the copy (never ``LOCK_UN``, which would unlock
    the parent too) ties the lock to the process that took it.
    """
    for lock in list(_HELD_LOCKS):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class OutputLock:
    """``OUT/.lock``: one run at a time per output folder.

    The file is held with ``flock`` for the whole run and holds ``{"pid", "host", "since",
    "start"}`` of the holder. A second run fails at once naming the holder. A lock whose holder is
    gone (no flock held and its pid dead on this host, or an empty file after a clean exit) is
    taken over; a lock left by a process on another host, which this host cannot check, is
    refused with how to clear it. The file stays in place (emptied) after the run: removing it
    could let two runs lock two different files. Forked children (DataLoader workers) do not
    keep the lock: it ends with the process that took it, so a run killed with ``kill -9`` can be
    rerun at once. ``option``: how the user names the folder (for the refusal's "use another
    ..."): ``--output`` (tokenize_dataset.py), ``train.output_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike, option: str = "--output"):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None
        self.option = option

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write to the output folder {self.path.parent}: {e.strerror}") from None
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(self._held_message(self._read(fd), "is writing to it")) from None
            except OSError as e:  # a filesystem without flock: go by the file's contents alone
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                flocked = False
            holder = self._read(fd)
            if holder:
                self._check_stale(holder, flocked)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "start": _process_start(os.getpid())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD_LOCKS.add(self)

    @staticmethod
    def _read(fd: int) -> dict | None:
        data = os.pread(fd, 4096, 0)
        try:
            return json.loads(data) if data.strip() else None
        except ValueError:
            return {"pid": None, "host": "?", "since": "?", "raw": data[:200].decode(errors="replace")}

    def _held_message(self, holder: dict | None, doing: str) -> str:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
               if holder else "another process")
        return f"{self.path.parent} is in use: {who} {doing}; wait for it to finish or use another {self.option}"

    def _check_stale(self, holder: dict, flocked: bool) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int):
            alive = _pid_alive(pid) and (holder.get("start") in (None, _process_start(pid)))
            if alive and pid != os.getpid():
                if not flocked:
                    raise OutputError(self._held_message(holder, "is writing to it"))
                # flock is free but the process lives: it is not running in this folder any more
            logger.warning("%s: taking over a stale lock of pid %s on this host (since %s), which %s",
                           self.path, pid, holder.get("since"), "is gone" if not alive else "no longer holds it")
            return
        raise OutputError(self._held_message(holder, "last held it and did not release it") + (
            f". This host cannot tell whether it still runs; if it does not, delete {self.path} and rerun"))

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds the folder
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
            _HELD_LOCKS.discard(self)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2.5 h``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def chunk_file(out_dir: str | os.PathLike, kind: str, k: int) -> Path:
    """``OUT/codes/000012.jsonl``, ``OUT/errors/000012.jsonl`` or the marker ``OUT/done/000012.json``."""
    return Path(out_dir) / kind / f"{k:06d}.json{'' if kind == 'done' else 'l'}"


def done_chunks(out_dir: str | os.PathLike) -> set[int]:
    """The chunks with a done marker: one directory listing, no file read."""
    d = Path(out_dir) / "done"
    if not d.is_dir():
        return set()
    return {int(name[:-5]) for name in os.listdir(d) if name.endswith(".json") and name[:-5].isdigit()}


def has_rows(out_dir: str | os.PathLike) -> bool:
    """Whether any row has been written to ``out_dir``."""
    for kind in ("codes", "errors"):
        d = Path(out_dir) / kind
        if d.is_dir() and any(name.endswith(".jsonl") for name in os.listdir(d)):
            return True
    return False


def default_chunk_size(num_images: int, world_size: int) -> int:
    """About four chunks per process, each of 100 to `MAX_CHUNK_SIZE` images."""
    return max(100, min(MAX_CHUNK_SIZE, math.ceil(num_images / (4 * world_size))))


def file_identity(path: str | os.PathLike) -> dict:
    """A weight file's size and sha256 (its identity, wherever it was copied to)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def model_fingerprint(cfg: Any, vision_dtype: str, saved_folder: str | os.PathLike | None = None) -> dict:
    """What decides the codes: the config's ``model`` section, each weight file's size + sha256
    (``null`` for random weights, which come from a fixed seed) and the vision tower's dtype.
    ``saved_folder``: a `seed.Tokenizer.save_pretrained` folder, whose ``model.safetensors`` holds
    every weight (``cfg`` is then its ``config.yaml``).

    Paths, decode settings and batch sizes are left out: they do not change the codes.
    """
    from omegaconf import OmegaConf

    from .config import resolve_path

    if saved_folder is not None:
        from .hub import WEIGHTS_NAME

        return {"model": OmegaConf.to_container(cfg.model, resolve=True),
                "weights": {WEIGHTS_NAME: file_identity(Path(saved_folder) / WEIGHTS_NAME)},
                "vision_dtype": vision_dtype}
    from .checkpoint import check_weights

    check_weights(cfg, diffusion=False)  # a CheckpointError listing every missing file and how to get it
    weights = {}
    for name, path in OmegaConf.to_container(cfg.checkpoints, resolve=True).items():
        weights[name] = None if path is None else file_identity(resolve_path(path))
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "weights": weights,
            "vision_dtype": vision_dtype}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) and v else f"{prefix}{k}"))
    return out


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """``["model.image_size: 56 in run.json, 28 now", ...]`` for every key that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k.rstrip('.')}: {json.dumps(a.get(k))} in run.json, {json.dumps(b.get(k))} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        data = json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not valid Unicode: JSON escapes
        data = json.dumps(obj, indent=1).encode("ascii")
    with open(tmp, "wb") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename or a new file in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output(out_dir: str | os.PathLike, items: Sequence[Item], fingerprint: dict, fmt: str,
                   chunk_size: int | None, world_size: int, force_mismatch: bool = False,
                   input_name: str = "", model_spec: str | None = None) -> dict:
    """Check or create ``OUT/run.json``; returns the run record (``chunk_size`` and ``chunks`` included).

    ``model_spec``: what names the model for `seed.Tokenizer.load` (a shipped config name, a YAML or
    folder path; None with overrides), recorded as ``model_spec`` so that an LLM trained on the rows
    can name its image tokenizer (`seed.provenance`); not compared on resume (the fingerprint is).

    A new folder records the fingerprint, the listing (count + hash), the format and the chunk
    size. An existing one must match: another listing or format is an `OutputError` (its chunks
    would not line up); another model fingerprint is one too, naming each difference, unless
    ``force_mismatch`` (then the new fingerprint is appended to ``forced`` and rows of both
    models share the folder). A record with no rows written yet is simply replaced. Call it with
    the folder locked (`OutputLock`).
    """
    out = Path(out_dir)
    for kind in ("codes", "errors", "done"):
        (out / kind).mkdir(exist_ok=True)
    if any(out.glob("codes-rank*.jsonl")):
        raise OutputError(f"{out} holds output of an older seed version (codes-rank*.jsonl); use a new --output")
    run_json = out / "run.json"
    listing = {"images": len(items), "listing_sha256": listing_hash(items)}
    if run_json.is_file():
        try:
            record = json.loads(run_json.read_text(encoding="utf-8"))
        except ValueError as e:
            raise OutputError(f"{run_json}: not valid JSON ({e}); restore it or use a new --output") from None
        if has_rows(out):
            problems = []
            if record.get("format") != fmt:
                problems.append(f"its rows are --format {record.get('format')}, this run asks for --format {fmt}")
            if {k: record.get(k) for k in listing} != listing:
                problems.append(f"the input changed: {record.get('images')} images then, {len(items)} now"
                                f"{' (same count, other ids or row fields)' if record.get('images') == len(items) else ''}; "
                                f"tokenize new images into another --output")
            if problems:
                raise OutputError(f"{out} cannot be resumed by this run: " + "; ".join(problems))
            if chunk_size is not None and chunk_size != record["chunk_size"]:
                logger.warning("%s: resuming with the folder's --chunk-size %d (not %d)", out,
                               record["chunk_size"], chunk_size)
            latest = record["forced"][-1]["fingerprint"] if record.get("forced") else record["fingerprint"]
            diff = fingerprint_diff(latest, fingerprint)
            if diff:
                if not force_mismatch:
                    raise OutputError(
                        f"{out} holds rows of another model or config than this run's, so resuming would mix "
                        f"codes: " + "; ".join(diff) + ". Use another --output, or pass --force-mismatch "
                        "to add rows from this model anyway (recorded in run.json)")
                logger.warning("%s: --force-mismatch: adding rows from another model (%s)", out, "; ".join(diff))
                record.setdefault("forced", []).append({"time": _utcnow(), "fingerprint": fingerprint})
                _write_json_atomic(run_json, record)
            return record
        logger.info("%s: run.json without rows: starting afresh", out)
    from . import __version__

    size = chunk_size or default_chunk_size(len(items), world_size)
    record = {"format_version": 1, "created": _utcnow(), "seed_version": __version__, "input": input_name,
              **listing, "chunk_size": size, "chunks": math.ceil(len(items) / size), "format": fmt,
              "fingerprint": fingerprint, "model_spec": model_spec}
    _write_json_atomic(run_json, record)
    return record


# --- writing -------------------------------------------------------------------------------------

@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (then deliver them): a Ctrl-C never tears a line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h is not None:
            old[s] = h
            signal.signal(s, lambda sig, frame: pending.append(sig))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending:
            signal.raise_signal(s)


def json_line(row: dict) -> bytes:
    """One JSONL line, UTF-8 (names that are not ASCII stay readable); a name that is not valid
    Unicode (undecodable bytes in a file name) is written with JSON escapes instead."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


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


def read_ids(path: Path) -> list[str]:
    """The ids in a JSONL output file (call `repair` first)."""
    if not path.is_file():
        return []
    ids = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                ids.append(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                raise OutputError(f"{path}, line {n}: not a valid output line ({line[:80]!r}); "
                                  f"fix or delete the line, then rerun") from None
    return ids


class JsonlWriter:
    """Appends rows to a JSONL file (created on the first row), a batch at a time, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.file: IO[bytes] | None = None

    def write(self, rows: Iterable[dict]) -> None:
        data = b"".join(json_line(r) for r in rows)
        if not data:
            return
        with signals_deferred():
            if self.file is None:
                new = not self.path.exists()
                self.file = open(self.path, "ab")
                if new:  # make the new file's directory entry durable too
                    fsync_path(self.path.parent)
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


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


@dataclass
class _Chunk:
    k: int
    todo: list[Item]
    codes: int = 0  # rows in the chunk's files so far
    errors: int = 0


def plan_chunks(out_dir: str | os.PathLike, items: Sequence[Item], chunk_size: int, rank: int = 0,
                world_size: int = 1) -> tuple[list[_Chunk], int]:
    """This rank's unfinished chunks (with the items still to do) and the number of items skipped.

    Reads the ``done/`` listing, and the rows of this rank's chunks that have rows but no marker
    (repairing a torn last line first); a chunk found complete gets its marker now.
    """
    out = Path(out_dir)
    done = done_chunks(out)
    plan, skipped = [], 0
    for k in range(rank, math.ceil(len(items) / chunk_size), world_size):
        chunk = items[k * chunk_size:(k + 1) * chunk_size]
        if k in done:
            skipped += len(chunk)
            continue
        files = [chunk_file(out, kind, k) for kind in ("codes", "errors")]
        for f in files:
            repair(f)
        codes_ids, error_ids = read_ids(files[0]), read_ids(files[1])
        have = set(codes_ids) | set(error_ids)
        todo = [it for it in chunk if it.id not in have]
        skipped += len(chunk) - len(todo)
        c = _Chunk(k, todo, len(codes_ids), len(error_ids))
        if todo:
            plan.append(c)
        else:
            _mark_done(out, c, chunk)
    return plan, skipped


def _mark_done(out: Path, c: _Chunk, chunk: Sequence[Item]) -> None:
    with signals_deferred():
        _write_json_atomic(chunk_file(out, "done", c.k), {
            "chunk": c.k, "images": len(chunk), "codes": c.codes, "errors": c.errors,
            "first": chunk[0].id if chunk else None, "last": chunk[-1].id if chunk else None})


def tokenize_items(tok, items: Sequence[Item], out_dir: str | os.PathLike, chunk_size: int, rank: int = 0,
                   world_size: int = 1, batch_size: int = 64, num_workers: int | None = None, fmt: str = "codes",
                   progress: bool = True) -> Summary:
    """Tokenize this rank's chunks of ``items`` (sorted, as from `discover`) into ``out_dir``.

    ``tok``: a `seed.Tokenizer`. Chunk ``k`` (items ``k*chunk_size`` on) belongs to rank
    ``k % world_size``; its rows go to ``codes/K.jsonl`` (``{"image": id, "codes": [32 ints]}``,
    or ``"text"`` with ``fmt="text"``, both with ``"codes+text"``; a JSONL input row's other
    fields come after ``image``) and ``errors/K.jsonl`` (``{"image": id, "error": message}``; a
    row whose fields would be overwritten by the output's goes there too), and ``done/K.json``
    marks it finished. ``fmt`` must fit the model (`check_format`). ``num_workers``: DataLoader
    processes decoding images (default `default_workers`). Rows already
    in the folder are skipped. The folder must have been prepared (`prepare_output`) under
    `OutputLock`. A KeyboardInterrupt stops between writes: every line on disk is complete.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    check_format(tok.cfg.model, fmt)
    to_text = None
    if fmt != "codes":
        from .llm import codes_to_text as to_text
    start = time.perf_counter()
    out = Path(out_dir)
    plan, skipped = plan_chunks(out, items, chunk_size, rank, world_size)
    summary = Summary(skipped=skipped)
    if skipped:
        logger.info("rank %d: %d images already in %s, skipped", rank, skipped, out)
    own = output_fields(fmt)
    todo = [it if not (it.fields and own & it.fields.keys()) else it._replace(error=(
        f"{it.id}: its field(s) {', '.join(sorted(own & it.fields.keys()))} would be overwritten by the "
        f"output's own (--format {fmt}); rename them in the input")) for c in plan for it in c.todo]
    fields = {it.id: it.fields for it in todo if it.fields and it.error is None}
    chunks = {c.k: c for c in plan}
    remaining = {c.k: len(c.todo) for c in plan}
    num_workers = default_workers() if num_workers is None else num_workers
    num_workers = min(num_workers, -(-len(todo) // batch_size))  # no idle workers for a small share
    resample = tok.cfg.model.get("image_resample", "bicubic")  # SEED-1 bicubic, SEED-2 bilinear
    loader = DataLoader(ImageDataset(todo, tok.image_size, [c.k for c in plan for _ in c.todo], resample),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        pin_memory=tok.device.type == "cuda", worker_init_fn=_worker_init if num_workers else None)
    writers: dict[int, tuple[JsonlWriter, JsonlWriter]] = {}
    import sys

    on_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = tqdm(total=len(todo), unit="img", disable=not (progress and on_terminal), desc=f"rank {rank}/{world_size}",
               dynamic_ncols=True)
    seen, last_log = 0, time.perf_counter()
    try:
        for batch in loader:
            rows: dict[int, tuple[list[dict], list[dict]]] = {}
            if batch["pixels"] is not None:
                codes = tok.encode(batch["pixels"])
                texts = to_text(codes) if to_text is not None else None
                codes = codes.tolist()
                for n, (image_id, k) in enumerate(zip(batch["ids"], batch["chunks"])):
                    row: dict[str, Any] = {"image": image_id, **fields.get(image_id, {})}
                    if fmt != "text":
                        row["codes"] = codes[n]
                    if texts is not None:
                        row["text"] = texts[n]
                    rows.setdefault(k, ([], []))[0].append(row)
            for image_id, k, message in batch["errors"]:
                rows.setdefault(k, ([], []))[1].append({"image": image_id, "error": message})
            for k, (good, bad) in rows.items():
                if k not in writers:
                    writers[k] = (JsonlWriter(chunk_file(out, "codes", k)), JsonlWriter(chunk_file(out, "errors", k)))
                writers[k][0].write(good)
                writers[k][1].write(bad)
                chunks[k].codes += len(good)
                chunks[k].errors += len(bad)
                remaining[k] -= len(good) + len(bad)
                if remaining[k] == 0:
                    for w in writers.pop(k):
                        w.close()
                    _mark_done(out, chunks[k], items[k * chunk_size:(k + 1) * chunk_size])
            summary.done += len(batch["ids"])
            summary.failed += len(batch["errors"])
            bar.update(len(batch["ids"]) + len(batch["errors"]))
            seen += len(batch["ids"]) + len(batch["errors"])
            now = time.perf_counter()
            if progress and not on_terminal and now - last_log >= PROGRESS_LOG_S and seen < len(todo):
                last_log = now  # one readable line per interval instead of a bar
                rate = seen / max(now - start, 1e-9)
                logger.info("rank %d/%d: %d/%d images (%.1f%%), %d failed, %.1f images/s, about %s left", rank,
                            world_size, seen, len(todo), 100 * seen / len(todo), summary.failed, rate,
                            _duration((len(todo) - seen) / max(rate, 1e-9)))
    finally:
        bar.close()
        for pair in writers.values():
            for w in pair:
                w.close()
        summary.seconds = time.perf_counter() - start
    return summary
