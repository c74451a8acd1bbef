"""SEED-LLaMA training data: sources, a weighted mixture, and a resumable batch iterator.

The ``data:`` section of a SEED-LLaMA training config (`LlmDataConfig`; unknown keys are errors)::

    data:
      train: null            # shortcut: one path (JSONL file, folder, tar, glob) read as a source
                             # named "train" with format auto (pairs / parts / messages rows)
      batch_size: 8          # GLOBAL micro-batch (all ranks together) of a source without its own
      max_length: 200        # every sequence is cut or right-padded to this (a source may override)
      shuffle: true          # shuffle file order and the rows inside each file, per pass
      pad_to: max_length     # or longest: pad each batch to its longest sequence (same loss)
      pack: false            # pack whole samples into rows of up to max_length tokens (same loss)
      image_tokenizer: null  # seed.Tokenizer.load spec (config name/YAML, folder, Hub id): image
                             # PATHS in rows become codes; also names the codes' tokenizer (seed.provenance)
      image_codes: seed2     # or seed1: SEED-1 codes on purpose (else refused)
      allow_unfinished: false  # train on an unfinished tokenize_dataset.py folder (recorded)
      sources:               # the mixture (the original's recipes, spec section 5)
        - path: data/laion   # str or list of str: files, folders (recursive), globs
          name: laion        # default: the file or folder name
          format: caption    # auto (the row's layout picks the kind) | a kind of FORMATTERS (every row)
          weight: 5.0        # relative chance that the next micro-batch comes from this source (0: left out)
          batch_size: null   # global micro-batch of this source (null: data.batch_size)
          max_length: 140    # null: data.max_length
          cycle: null        # passes over the files before the source runs out (null: forever)
          pack: null         # null: data.pack
          options: {reverse_ratio: 0.5}   # keyword arguments of the formatter

What a source's files may hold (one sample per row; see ``docs/llm_training_data.md``):

- JSONL rows: ``{"codes": [32 ints], "caption": str}`` (pairs), ``{"parts": [{"text": ...},
  {"codes": [...]}, ...]}`` (interleaved documents), ``{"messages": [{"role": "user", "content":
  [{"type": "text", "text": ...}, {"type": "image", "codes": [...]} | {"type": "image", "image":
  PATH}]}, ...]}`` (conversations), ``{"text": str}`` (text only), or any original payload with an
  explicit ``format``.
- ``scripts/tokenize_dataset.py`` output folders (``OUT/codes/*.jsonl``: ``image``, ``codes`` or
  the image ``text``, and the input's other fields such as ``caption``).
- The original's webdataset tars: each ``*.pkl`` member a pickled dict of plain data, read with
  a restricted unpickler (`load_plain_pickle`) that refuses anything else.

Batches (`LlmData`): as the original, each micro-batch comes whole from ONE source, picked by a
seeded weighted draw, and holds ``batch_size`` samples padded to that source's ``max_length``
(or, with ``pack``, packed whole into rows of up to ``max_length`` tokens). The
stream of global micro-batches depends only on the seed and the data: rank ``r`` of ``W`` takes
the ``r``-th contiguous share of every global batch, so 2 ranks x B equals 1 rank x 2B. Bad rows
(including text the tokenizer cannot encode) are skipped, counted and logged by file and line; samples
the original drops (blank captions, malformed documents) are counted as dropped; samples cut by
``max_length`` are counted as truncated. `LlmData.state_dict` (JSON-able) resumes the stream exactly.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...errors import InputError
from .format import FORMATTERS, OptionError, Plan, RandomDraws, SampleEncoder, collate, collate_packed

logger = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """One source of the mixture (files of one layout, one formatter)."""

    path: Any = None
    """A file, folder (searched recursively for ``*.jsonl``/``*.tar``) or glob; or a list of them."""
    name: Optional[str] = None
    """Shown in the batches' ``source`` and the per-source counts; null: the path's last name."""
    format: str = "auto"
    """auto (per row: messages / parts / pairs / text) or a kind of `seed.training.llm.format.FORMATTERS`."""
    weight: float = 1.0
    """Relative chance of this source for the next micro-batch; 0 leaves the source out (logged)."""
    batch_size: Optional[int] = None
    """Global micro-batch size of this source (all ranks together); null: ``data.batch_size``."""
    max_length: Optional[int] = None
    """Sequence length of this source; null: ``data.max_length``."""
    cycle: Optional[int] = None
    """Passes over the files; null: forever."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the formatter (``reverse_ratio``, ``max_images``, ``caption_prompt``...)."""
    pack: Optional[bool] = None
    """Pack this source's samples into rows (see `LlmDataConfig.pack`); null: ``data.pack``."""


@dataclass
class LlmDataConfig:
    """The ``data:`` section of a SEED-LLaMA training config."""

    train: Optional[str] = None
    """One path read as a source named ``train`` (format auto), besides ``sources``."""
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 8
    """Global micro-batch size (all ranks together) of a source without its own."""
    max_length: int = 200
    """Sequence length of a source without its own."""
    shuffle: bool = True
    """Shuffle the file order and the rows within each file, per pass (off: files sorted, rows in order)."""
    pad_to: str = "max_length"
    """max_length (the original: every batch padded to its source's max_length) or longest (to the
    longest sequence of the rank's batch: the same ids, labels and loss, fewer pad tokens)."""
    image_tokenizer: Optional[str] = None
    """For image paths in rows: anything `seed.Tokenizer.load` takes (a config name such as
    ``seed2_tokenizer`` or a YAML file, a ``save_pretrained`` folder, a Hub id); built on first use."""
    pack: bool = False
    """Pack each rank's share of a micro-batch whole into rows of up to ``max_length`` tokens,
    position ids restarting at 0 for each sample, attention kept within samples (the same samples,
    loss and gradients as unpacked, without most of the padding); rows padded per ``pad_to``.
    False: one sample per row (the original). A source's own ``pack`` overrides it."""
    val: Any = None
    """A held-out set (`seed.training.llm.val.LlmValSet`): a path or a list of paths read like
    ``train`` (format auto), or one source's settings ``{path, format, options, max_length,
    batch_size, name}``; its loss is logged as ``val_loss`` every ``train.eval_every`` steps and at
    the last step. null: none."""
    image_codes: str = "seed2"
    """Which codes the LLM learns: seed2 (SEED-LLaMA) or seed1 (SEED-1 codes on purpose, as SEED-1's
    SEED-OPT); codes of the other variant are refused (`seed.provenance.training_record`)."""
    allow_unfinished: bool = False
    """Train on an unfinished ``scripts/tokenize_dataset.py`` folder's rows (else refused); recorded."""


# --------------------------------------------------------------------------- reading files


_PLAIN_PICKLE_HINT = "only plain data (dict, list, tuple, str, bytes, int, float, bool, None) is accepted"


class _PlainUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars: every global (class, function) is refused, so a
    pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it references {module}.{name}; {_PLAIN_PICKLE_HINT}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"it holds a persistent id; {_PLAIN_PICKLE_HINT}")


def load_plain_pickle(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` that holds only plain data (the original's stored-code pickles: a dict of
    lists, ints and strs); anything else (a class, a function, a reduce) is an `InputError` naming
    ``where``, and nothing of it runs."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
        raise InputError(f"{where}: not a plain-data pickle: {e}") from None


def _is_tokenized_folder(p: Path) -> bool:
    return (p / "codes").is_dir() and (p / "run.json").is_file()


def list_files(paths: Any, base_dir: str | os.PathLike | None = None) -> list[str]:
    """The data files of a source, sorted: ``*.jsonl`` and ``*.tar`` files given directly, found in
    folders (recursively) or by globs; a `scripts/tokenize_dataset.py` output folder gives its
    ``codes/*.jsonl``. Relative paths are taken from ``base_dir``. Raises `InputError` when a path
    does not exist or yields no file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise InputError("a data source needs a path")
    out: set[str] = set()
    for raw in paths:
        p = Path(os.path.expanduser(str(raw)))
        if base_dir is not None and not p.is_absolute():
            p = Path(base_dir) / p
        matches = [Path(m) for m in sorted(glob.glob(str(p)))] if glob.has_magic(str(p)) else [p]
        if not matches or not all(m.exists() for m in matches):
            raise InputError(f"data path {raw!r} does not exist" + (f" (looked in {base_dir})" if base_dir else ""))
        for m in matches:
            if m.is_file():
                out.add(str(m))
            elif _is_tokenized_folder(m):
                out.update(str(f) for f in (m / "codes").glob("*.jsonl"))
            else:
                out.update(str(f) for ext in ("jsonl", "tar") for f in m.rglob(f"*.{ext}")
                           if "errors" not in f.relative_to(m).parts[:-1])
        if not out:
            raise InputError(f"data path {raw!r} holds no .jsonl or .tar file")
    return sorted(out)


def read_file(path: str) -> list[tuple[str, Callable[[], Any]]]:
    """The rows of one file, in order, as ``(key, load)``: ``load()`` returns the row (a dict, or
    whatever the line or pickle holds) or raises `InputError`. JSONL: one JSON value per non-blank
    line (key ``FILE:LINE``); tar: every ``*.pkl`` member, unpickled with `load_plain_pickle` (key:
    the member's name without ``.pkl``, as the original's ``__key__``)."""
    name = os.path.basename(path)
    if path.endswith(".tar"):
        rows = []
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".pkl"):
                    data = tar.extractfile(m).read()
                    key = os.path.basename(m.name)[:-4]
                    rows.append((key, lambda d=data, w=f"{name}/{m.name}": load_plain_pickle(d, w)))
        return rows
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if line.strip():
            rows.append((f"{name}:{i + 1}", lambda b=line, w=f"{name}:{i + 1}": _json(b, w)))
    return rows


def _json(line: bytes, where: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        raise InputError(f"{where}: not a JSON line: {e}") from None
    except RecursionError:
        raise InputError(f"{where}: not a usable JSON line: nested too deeply") from None


# --------------------------------------------------------------------------- rows -> (kind, payload)


class NoImageTokenizer(InputError):
    """A row holds an image path and the run has no image tokenizer: stops the run (not a bad row)."""


class ImageCodes:
    """Image paths -> codes with a `seed.Tokenizer`, each path encoded once (cached).

    ``tokenizer``: a `seed.Tokenizer`, anything `seed.Tokenizer.load` takes (a config name such as
    ``seed2_tokenizer`` or a YAML file, a ``save_pretrained`` folder, a Hub id), or a callable
    returning one; it is built on the first image that needs it."""

    def __init__(self, tokenizer: Any = None):
        self._tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, path: str) -> tuple[int, ...]:
        if path not in self._cache:
            tok = self._tokenizer
            if tok is None:
                raise NoImageTokenizer(f"image {path!r}: image paths in rows need an image tokenizer: set "
                                       "data.image_tokenizer (e.g. seed2_tokenizer, or the config / folder your "
                                       "other codes came from)")
            if isinstance(tok, (str, os.PathLike)):
                from ...tokenizer import Tokenizer

                tok = self._tokenizer = Tokenizer.load(tok)
            elif callable(tok) and not hasattr(tok, "encode"):
                tok = self._tokenizer = tok()
            if not os.path.isfile(path):
                raise InputError(f"image {path!r} does not exist")
            self._cache[path] = tuple(int(c) for c in tok.encode([path])[0].tolist())
        return self._cache[path]


def _layout(row: Mapping) -> str | None:
    """Which of our row layouts ``row`` is: messages, parts, pair, or None (an original payload)."""
    if "messages" in row:
        return "messages"
    if "parts" in row:
        return "parts"
    if "caption" in row and ("codes" in row or (isinstance(row.get("text"), str) and "<img>" in row["text"])):
        return "pair"
    return None


def _row_codes(row: Mapping, where: str) -> Any:
    if row.get("codes") is not None:
        return row["codes"]
    from ...llm import text_to_codes  # tokenize_dataset --format text rows

    spans = text_to_codes(row.get("text") or "")
    if len(spans) != 1:
        raise InputError(f"{where}: the row's text holds {len(spans)} image spans, not 1")
    return spans[0].tolist()


def _image_part(p: Mapping, images: ImageCodes, base: str, where: str) -> dict:
    if p.get("codes") is None and isinstance(p.get("image"), str):
        path = p["image"] if os.path.isabs(p["image"]) else os.path.join(base, p["image"])
        return {"type": "image", "codes": list(images(path))}
    return p


DESCRIBE_QUESTION = "Please provide an accurate and concise description of the given image."
"""The question the original's caption extraction tool (``_qa`` variant, spec section 4) writes
for every caption: a pair row with ``format: sft_qa`` gets it, its caption as the answer."""


def normalize_row(row: Any, fmt: str, rng: RandomDraws, images: ImageCodes, base: str, where: str) -> tuple[str, Any]:
    """A row of a source with format ``fmt`` -> ``(kind, payload)`` for `FORMATTERS`.

    Our layouts become the original's payloads: a pair (``codes`` or the image ``text``, +
    ``caption``; a list of captions: one picked at random) -> ``{"image_ids", "text"}``; ``parts``
    -> ``{"image_ids", "texts"}``; ``messages`` (image paths become codes) -> ``{"messages"}``.
    With ``fmt`` auto the kind follows the row: pair -> caption, parts -> mmc4, messages ->
    messages, an original caption pickle (``image_ids`` + ``text``) -> caption, ``{"text"}`` ->
    text. An explicit ``fmt`` is always the kind: a pair row with ``sft_qa`` becomes what the
    original's caption tool writes for it (``image_ids``, ``question`` = `DESCRIBE_QUESTION`,
    ``answer`` = the caption), so the answer branch describes the image and the generate branch
    (``reverse_ratio`` -1: always) is a text-to-image instruction; any other row with ``codes``
    gets them as ``image_ids``; other rows go to the formatter as they are (a row that does not
    fit the kind is a bad row)."""
    if not isinstance(row, Mapping):
        raise InputError(f"{where}: a row must be a JSON object / dict, got {type(row).__name__}")
    layout, auto = _layout(row), fmt == "auto"
    if layout == "pair":
        caption = row.get("caption")
        if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
            caption = rng.choice(list(caption))
        if not isinstance(caption, str):
            raise InputError(f"{where}: a pair row needs a 'caption' str (or list of str)")
        codes = _row_codes(row, where)
        if fmt == "sft_qa":
            return fmt, {"image_ids": codes, "question": DESCRIBE_QUESTION, "answer": caption}
        return ("caption" if auto else fmt), {"image_ids": codes, "text": caption}
    if layout == "parts":
        return ("mmc4" if auto else fmt), _parts_payload(row["parts"], images, base, where)
    if layout == "messages":
        return ("messages" if auto else fmt), _messages_payload(row, images, base, where)
    if not auto:
        if row.get("codes") is not None and "image_ids" not in row:
            row = {**{k: v for k, v in row.items() if k != "codes"}, "image_ids": row["codes"]}
        return fmt, row
    if "image_ids" in row and "text" in row:
        return "caption", row
    if "codes" in row:
        raise InputError(f"{where}: a row with codes needs a 'caption'")
    if isinstance(row.get("text"), str):
        return "text", row
    raise InputError(f"cannot tell the kind of a row with keys {sorted(map(str, row))}: a row holds "
                     "'codes' + 'caption', 'parts', 'messages' or 'text' (or name the source's format)")


def _parts_payload(parts: Any, images: ImageCodes, base: str, where: str) -> dict:
    if not isinstance(parts, (list, tuple)) or not parts:
        raise InputError(f"{where}: 'parts' must be a non-empty list")
    image_ids, texts = [], []
    for k, p in enumerate(parts):
        if isinstance(p, Mapping):
            p = _image_part(p, images, base, where)
        if isinstance(p, str) or (isinstance(p, Mapping) and isinstance(p.get("text"), str)):
            image_ids.append(None)
            texts.append(p if isinstance(p, str) else p["text"])
        elif isinstance(p, Mapping) and p.get("codes") is not None:
            image_ids.append(p["codes"])
            texts.append(None)
        else:
            raise InputError(f"{where}: parts[{k}] must be {{'text': str}} or {{'codes': [32 ints]}}")
    return {"image_ids": image_ids, "texts": texts}


def _messages_payload(row: Mapping, images: ImageCodes, base: str, where: str) -> dict:
    messages = row.get("messages")
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"{where}: 'messages' must be a list")
    out = []
    for m in messages:
        if isinstance(m, Mapping) and isinstance(m.get("content"), (list, tuple)):
            m = dict(m, content=[_image_part(p, images, base, where) if isinstance(p, Mapping) else p
                                 for p in m["content"]])
        out.append(m)
    return {"messages": out}


# --------------------------------------------------------------------------- sources and the mixture


@dataclass
class Source:
    """One source of the mixture, resolved: its files and settings (see `SourceConfig`)."""

    name: str
    files: list[str]
    format: str = "auto"
    weight: float = 1.0
    batch_size: int = 8
    max_length: int = 200
    cycle: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)
    pack: bool = False

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATTERS:
            raise InputError(f"source {self.name!r}: unknown format {self.format!r}; "
                             f"choose auto or one of {sorted(FORMATTERS)}")
        for key, ok in (("weight", self.weight > 0), ("batch_size", self.batch_size >= 1),
                        ("max_length", self.max_length >= 2), ("cycle", self.cycle is None or self.cycle >= 1)):
            if not ok:
                raise InputError(f"source {self.name!r}: bad {key} {getattr(self, key)!r}")


def _number(value: Any, key: str, *, integer: bool, low: float, why: str) -> Any:
    """``value`` if it is a number (an int when ``integer``) >= ``low``, else `InputError` naming ``key``."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value < low:
        raise InputError(f"{key}: {why}, got {value!r}")
    return value


def source_settings(cfg: Any, log: bool = True) -> list[dict[str, Any]]:
    """The sources of an `LlmDataConfig` (a dataclass, DictConfig or dict) with their settings
    resolved and checked, files not listed: ``key`` (``data.train`` / ``data.sources[k]``),
    ``path``, ``name``, ``format``, ``weight``, ``batch_size``, ``max_length``, ``cycle``, ``options``,
    ``pack``.

    A setting means what it says: null (absent) takes the default (a source's ``batch_size`` /
    ``max_length``: ``data.batch_size`` / ``data.max_length``; ``weight``: 1.0), any other value is
    used as given. ``weight: 0`` leaves the source out of the mixture (logged; every source at 0
    is an error); a negative weight, a ``batch_size`` < 1, a ``max_length`` < 2 (bos + eos) or a
    ``cycle`` < 1 is an `InputError` naming the key."""
    get = (lambda o, k, d=None: o.get(k, d)) if isinstance(cfg, Mapping) or hasattr(cfg, "keys") else \
        (lambda o, k, d=None: getattr(o, k, d))
    sizes = {"batch_size": 8, "max_length": 200}  # LlmDataConfig's defaults, for a dict without them
    for k, low, why in (("batch_size", 1, "must be an int >= 1"), ("max_length", 2, "must be an int >= 2 (bos + eos)")):
        if get(cfg, k) is not None:
            sizes[k] = _number(get(cfg, k), f"data.{k}", integer=True, low=low, why=why)
    entries = [dict(path=get(cfg, "train"), name="train", key="data.train")] if get(cfg, "train") else []
    for k, s in enumerate(get(cfg, "sources") or []):
        entries.append({"key": f"data.sources[{k}]", **{f: get(s, f) for f in (
            "path", "name", "format", "weight", "batch_size", "max_length", "cycle", "options", "pack")}})
    if not entries:
        raise InputError("data: give data.train or data.sources")
    out = []
    for k, e in enumerate(entries):
        path, key = e["path"], e["key"]
        if isinstance(path, (str, os.PathLike)):
            paths = [path]
        elif isinstance(path, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in path):
            paths = list(path)
        else:
            raise InputError(f"{key}.path: a path (str) or a list of paths, got {path!r}")
        name = e.get("name") or (Path(str(paths[0])).name if paths else f"source{k}")
        opts = e.get("options") or {}
        if not isinstance(opts, Mapping):
            raise InputError(f"{key}.options: a mapping of formatter options, got {opts!r}")
        weight = e.get("weight")
        weight = 1.0 if weight is None else float(_number(weight, f"{key}.weight", integer=False, low=0,
                                                          why="must be a number >= 0 (0: leave the source out)"))
        settings = {"key": key, "paths": paths, "name": name, "format": e.get("format") or "auto", "weight": weight,
                    "cycle": None if e.get("cycle") is None else _number(e["cycle"], f"{key}.cycle", integer=True,
                                                                         low=1, why="must be an int >= 1 or null"),
                    "options": dict(opts),
                    "pack": bool(get(cfg, "pack", False) if e.get("pack") is None else e["pack"])}
        for f, low, why in (("batch_size", 1, "must be an int >= 1 or null (data.batch_size)"),
                            ("max_length", 2, "must be an int >= 2 or null (data.max_length)")):
            v = e.get(f)
            settings[f] = sizes[f] if v is None else _number(v, f"{key}.{f}", integer=True, low=low, why=why)
        if weight == 0:
            if log:
                logger.warning("%s (%s): weight 0, left out of the mixture", key, name)
            continue
        out.append(settings)
    if not out:
        raise InputError(f"data.sources: every source has weight 0 ({', '.join(e['key'] for e in entries)}): "
                         "nothing to train on")
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise InputError(f"data: source names must differ, got {names}")
    return out


def sources_from_config(cfg: Any, base_dir: str | os.PathLike | None = None) -> list[Source]:
    """`LlmDataConfig` (a dataclass, DictConfig or dict) -> resolved `Source` list (files listed),
    settings per `source_settings` (a source with weight 0 is left out)."""
    return [Source(name=s["name"], files=list_files(s["paths"], base_dir), format=s["format"], weight=s["weight"],
                   batch_size=s["batch_size"], max_length=s["max_length"], cycle=s["cycle"], options=s["options"],
                   pack=s["pack"])
            for s in source_settings(cfg)]


_LOGGED_BAD = 10


def _unencodable(plan: Plan) -> str | None:
    """Why a plan's text cannot be tokenized (a lone surrogate such as ``"\\ud83d"``, common in
    scraped captions: not valid Unicode, so no tokenizer can encode it), or None."""
    for parts, _ in plan.segments:
        for p in parts:
            if isinstance(p, str):
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:
                    return f"{e.reason}: {p[max(0, e.start - 20):e.end + 20]!r}"
    return None


class _Stream:
    """The plans of one source, in order: passes over its files (shuffled per pass when asked),
    rows formatted with the source's own seeded draws. Its position is (pass, file, row)."""

    def __init__(self, src: Source, index: int, seed: int, shuffle: bool, images: ImageCodes):
        self.src, self.index, self.seed, self.shuffle, self.images = src, index, seed, shuffle, images
        self.formatter_options = dict(src.options)
        self.draws = RandomDraws(seed + index)
        self.pass_, self.file, self.row = 0, 0, 0
        self.exhausted = False
        self.counts = {"rows": 0, "samples": 0, "dropped": 0, "bad": 0, "batches": 0, "passes": 0, "truncated": 0}
        self._plans_this_pass = 0
        self._rows: list | None = None
        self.last_where = ""

    def _file_order(self) -> list[str]:
        files = list(self.src.files)
        if self.shuffle:
            random.Random(f"files-{self.seed}-{self.index}-{self.pass_}").shuffle(files)
        return files

    def _load(self) -> None:
        path = self._file_order()[self.file]
        try:
            rows = read_file(path)
        except (OSError, tarfile.TarError) as e:
            logger.warning("source %s: skipping unreadable file %s: %s", self.src.name, path, e)
            rows = []
        if self.shuffle:
            random.Random(f"rows-{self.seed}-{self.index}-{self.pass_}-{self.file}").shuffle(rows)
        self._rows = rows
        self._base = os.path.dirname(path)

    def _bad(self, where: str, e: Exception) -> None:
        self.counts["bad"] += 1
        n = self.counts["bad"]
        if n <= _LOGGED_BAD or n % 1000 == 0:
            logger.warning("source %s: skipping bad row %s (%d bad so far): %s", self.src.name, where, n, e)

    def next_plan(self) -> Plan | None:
        """The next kept plan, or None when the source has run out."""
        while not self.exhausted:
            if self._rows is None:
                self._load()
            if self.row >= len(self._rows):
                self._rows, self.row = None, 0
                self.file += 1
                if self.file == len(self.src.files):
                    self._end_pass()
                continue
            key, load = self._rows[self.row]
            self.row += 1
            self.counts["rows"] += 1
            where = f"{self.src.name}:{key}"
            try:
                kind, payload = normalize_row(load(), self.src.format, self.draws, self.images, self._base, where)
                plan = FORMATTERS[kind](payload, self.draws, **self.formatter_options)
            except OptionError as e:
                raise InputError(f"source {self.src.name!r}: bad options {self.formatter_options}: {e}") from None
            except NoImageTokenizer as e:
                raise InputError(f"source {self.src.name!r}, {where}: {e}") from None
            except InputError as e:
                self._bad(where, e)
                continue
            except TypeError as e:  # a formatter option that this kind does not take
                raise InputError(f"source {self.src.name!r}: bad options {self.formatter_options} for its rows: {e}") from None
            if plan is None:
                self.counts["dropped"] += 1
                continue
            bad_text = _unencodable(plan)
            if bad_text:  # on every rank alike: the ranks' draws, drops and counts stay in step
                self._bad(where, InputError(f"{where}: text the tokenizer cannot encode ({bad_text})"))
                continue
            self._plans_this_pass += 1
            self.last_where = where
            return plan
        return None

    def _end_pass(self) -> None:
        if self._plans_this_pass == 0:
            raise InputError(f"source {self.src.name!r}: a whole pass over {len(self.src.files)} file(s) gave no "
                             f"usable sample ({self.counts['bad']} bad rows, {self.counts['dropped']} dropped)")
        self.pass_ += 1
        self.counts["passes"] += 1
        self.file = 0
        self._plans_this_pass = 0
        if self.src.cycle is not None and self.pass_ >= self.src.cycle:
            self.exhausted = True

    def _files_hash(self) -> str:
        return hashlib.sha256("\n".join(os.path.basename(f) for f in self.src.files).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"name": self.src.name, "files": self._files_hash(), "pass": self.pass_, "file": self.file, "row": self.row,
                "plans_this_pass": self._plans_this_pass, "exhausted": self.exhausted,
                "draws": self.draws.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping) -> None:
        if state["name"] != self.src.name:
            raise InputError(f"data state is for source {state['name']!r}, not {self.src.name!r}")
        if state["files"] != self._files_hash():
            raise InputError(f"source {self.src.name!r}: its files differ from the run that saved the data "
                             f"position ({len(self.src.files)} files now); resuming would not continue the same stream")
        self.pass_, self.file, self.row = int(state["pass"]), int(state["file"]), int(state["row"])
        self._plans_this_pass, self.exhausted = int(state["plans_this_pass"]), bool(state["exhausted"])
        self.draws.load_state_dict(state["draws"])
        self.counts = {**dict.fromkeys(self.counts, 0), **state["counts"]}  # older states lack "truncated"
        self._rows = None


class LlmData:
    """The training batches of one rank: an iterator of dicts ``input_ids``, ``attention_mask``,
    ``labels`` (int64 [B, L]: B = this rank's share of the source's global ``batch_size``, L = the
    source's ``max_length``, or with ``pad_to="longest"`` the longest sequence of this batch) and
    ``source`` (list of B names). A source with ``pack`` gives rows instead of samples: this rank's
    share packed whole into R <= B rows of at most ``max_length`` tokens (`collate_packed`: each
    sample's ``position_ids`` restart at 0, its first label is -100; ``attention_mask`` 0 on the
    padding at a row's end), plus ``position_ids`` (int64 [R, L]); ``source`` then has R names.
    Packing changes neither which samples a micro-batch holds nor which rank holds them.

    Each global micro-batch comes whole from one source, picked by a seeded draw weighted by the
    sources' weights (a source that has run out of its ``cycle`` passes leaves the draw; the
    iterator ends when all have). The global batch is the source's next ``batch_size`` kept
    samples; rank ``r`` of ``world_size`` takes the ``r``-th contiguous share (``batch_size`` must
    divide by ``world_size``), so the samples do not depend on the number of ranks. A source's last,
    short batch is split the same way, or dropped if it has fewer samples than ranks. Every rank
    reads and formats every row (the draws and the drops stay in step) but tokenizes only its share.
    A sample longer than its source's ``max_length`` is cut there (the original's truncation) and
    counted as ``truncated``; ``all_sum`` (a function that sums an int over the ranks; every rank
    calls it once per batch, in step) makes that count global: without it, with several ranks,
    ``truncated`` counts this rank's share only.

    ``tokenizer``: the LM's HF tokenizer with the image tokens (`seed.llm.add_image_tokens`).
    ``image_tokenizer``: for image paths in rows (see `ImageCodes`). `state_dict` /
    `load_state_dict` (JSON-able) continue exactly after the last batch returned; `counts` gives
    rows read, samples batched, dropped and bad rows, batches and passes per source (global).
    """

    def __init__(self, sources: Sequence[Source], tokenizer: Any, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, pad_to: str = "max_length", image_tokenizer: Any = None,
                 all_sum: Callable[[int], int] | None = None):
        if not sources:
            raise InputError("LlmData needs at least one source")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        for s in sources:
            if s.batch_size % world_size:
                raise InputError(f"source {s.name!r}: batch_size {s.batch_size} (global) does not divide by "
                                 f"{world_size} ranks")
        if pad_to not in ("max_length", "longest"):
            raise InputError(f"pad_to must be max_length or longest, got {pad_to!r}")
        self.pad_to = pad_to
        self.sources = list(sources)
        self.encoder = SampleEncoder(tokenizer)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.images = images = ImageCodes(image_tokenizer)
        self._streams = [_Stream(s, k, self.seed, shuffle, images) for k, s in enumerate(self.sources)]
        self._mux = random.Random(f"mux-{self.seed}")
        self.batches = 0
        self._all_sum = all_sum

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                    base_dir: str | os.PathLike | None = None, image_tokenizer: Any = None,
                    all_sum: Callable[[int], int] | None = None) -> LlmData:
        """From an `LlmDataConfig` (``data:`` section); relative paths from ``base_dir``."""
        get = (lambda k: cfg.get(k)) if hasattr(cfg, "get") else (lambda k: getattr(cfg, k))
        return cls(sources_from_config(cfg, base_dir), tokenizer, seed=seed, rank=rank, world_size=world_size,
                   shuffle=bool(get("shuffle")), pad_to=get("pad_to") or "max_length",
                   image_tokenizer=image_tokenizer or get("image_tokenizer"), all_sum=all_sum)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            live = [st for st in self._streams if not st.exhausted]
            if not live:
                raise StopIteration
            total = sum(st.src.weight for st in live)
            x, k = self._mux.random() * total, 0
            while k < len(live) - 1 and x >= live[k].src.weight:
                x -= live[k].src.weight
                k += 1
            st = live[k]
            plans, wheres = [], []
            while len(plans) < st.src.batch_size:
                plan = st.next_plan()
                if plan is None:
                    break
                plans.append(plan)
                wheres.append(st.last_where)
            if len(plans) < self.world_size:
                if plans:
                    logger.info("source %s: dropping a last batch of %d samples (< %d ranks)",
                                st.src.name, len(plans), self.world_size)
                continue
            st.counts["samples"] += len(plans)
            st.counts["batches"] += 1
            self.batches += 1
            n, w, r = len(plans), self.world_size, self.rank
            mine = plans[r * n // w:(r + 1) * n // w]
            L = st.src.max_length
            samples, cut = [], 0
            for p, where in zip(mine, wheres[r * n // w:(r + 1) * n // w]):
                ids, labels = self._encode(st, p, where)
                if len(ids) > L:
                    ids, labels = ids[:L], labels[:L]
                    cut += 1
                samples.append((ids, labels))
            st.counts["truncated"] += self._all_sum(cut) if self._all_sum is not None else cut
            if st.src.pack:
                batch = collate_packed(samples, L, self.encoder.pad, longest=self.pad_to == "longest")
            else:
                if self.pad_to == "longest":
                    L = max(len(x) for x, _ in samples)
                batch = collate(samples, L, self.encoder.pad)
            batch["source"] = [st.src.name] * len(batch["input_ids"])
            return batch

    def _encode(self, st: _Stream, plan: Plan, where: str) -> tuple[list[int], list[int]]:
        """The sample's ids and labels, not cut (`SampleEncoder.encode_whole`); if the tokenizer fails on it (beyond the text check every rank
        makes in `_Stream.next_plan`), a counted, logged bad row on this rank that stands in the batch
        as ``[bos, eos]`` with nothing learned, so every rank's batch keeps its size."""
        try:
            return self.encoder.encode_whole(plan)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure on one row must not end the run
            st._bad(where, InputError(f"{where}: the tokenizer cannot encode it ({type(e).__name__}: {e})"))
            return [self.encoder.bos, self.encoder.eos], [-100, -100]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per source: ``rows`` read, ``samples`` batched, ``dropped`` (as the original), ``bad`` rows
        skipped, ``batches``, completed ``passes`` (global: the same on every rank), ``truncated``:
        samples cut by ``max_length`` (global with ``all_sum``, else this rank's)."""
        return {st.src.name: dict(st.counts) for st in self._streams}

    def state_dict(self) -> dict:
        """The position after the last batch returned (JSON-able)."""
        version, internal, gauss = self._mux.getstate()
        return {"seed": self.seed, "batches": self.batches, "mux": [version, list(internal), gauss],
                "sources": [st.state_dict() for st in self._streams]}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state_dict`; the sources must be the same (names, in order)."""
        names = [s["name"] for s in state["sources"]]
        if names != [st.src.name for st in self._streams]:
            raise InputError(f"data state holds sources {names}, this run has {[s.name for s in self.sources]}")
        if int(state["seed"]) != self.seed:
            raise InputError(f"data state was made with seed {state['seed']}, this run has {self.seed}")
        version, internal, gauss = state["mux"]
        self._mux.setstate((version, tuple(internal), gauss))
        self.batches = int(state["batches"])
        for st, s in zip(self._streams, state["sources"]):
            st.load_state_dict(s)
