"""Evaluation datasets as users have them, read into one list of `Example` each.

Layouts (`load_examples` picks by what it finds):

- a folder of images (or a ``.tar`` shard, or a text file listing paths): `seed.dataset.discover`,
  the listing dataset tokenization uses; no captions;
- a JSONL file (or a JSON list) of ``{"image": path, "caption": str}`` or ``"captions": [str, ...]``
  (paths relative to the file, or to ``image_root``); an optional ``"id"``;
- a Karpathy split JSON of COCO or Flickr30K (``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}], "cocoid"|"imgid"?}]}``), filtered by ``split`` (default ``test``);
- VQAv2: a questions JSON (``{"questions": [{"question_id", "image_id", "question"}]}``) with an
  optional annotations JSON (``{"annotations": [{"question_id", "answers": [{"answer"}]}]}``) and
  an image folder with COCO names (``COCO_val2014_000000000042.jpg``, ``image_pattern``).

A row that is malformed (no image, no caption, an answer list that is not strings, text that is
not valid Unicode such as a lone surrogate ``"\\ud83d"``) is logged, counted in ``bad`` and
skipped: it never stops the run. In a JSONL/JSON list, rows naming the same image are one item
with all their captions (one row per pair and one row per image give the same items). Ids are
unique; a repeated id is suffixed ``#2``, ``#3``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dataset import Item, discover, read_item
from ..errors import InputError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One evaluation item: an image (a path, or a `seed.dataset.Item` for folder/tar inputs),
    its reference captions, and for VQA the question and the human answers."""

    id: str
    image: str | Item | None
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()

    def open(self) -> Image.Image:
        """The image as 8-bit RGB PIL; `seed.InputError` naming it if it cannot be read."""
        from ..images import open_image

        if self.image is None:
            raise InputError(f"{self.id}: no image")
        return read_item(self.image) if isinstance(self.image, Item) else open_image(self.image)


@dataclass
class Dataset:
    """The examples of one input, what it was (``name``, ``layout``) and how many rows were bad."""

    name: str
    layout: str
    examples: list[Example]
    bad: int = 0


def _resolve(path: str, base: Path, image_root: str | os.PathLike | None) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return str(Path(image_root) / p if image_root is not None else base / p)


def _unique(examples: list[Example]) -> list[Example]:
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        n = seen.get(ex.id, 0) + 1
        seen[ex.id] = n
        if n > 1:
            logger.warning("id %r appears %d times; renamed %r", ex.id, n, f"{ex.id}#{n}")
            ex = replace(ex, id=f"{ex.id}#{n}")
        out.append(ex)
    return out


def is_text(value: Any) -> bool:
    """A str that is valid Unicode (encodes as UTF-8): not a lone surrogate such as ``"\\ud83d"``
    (a JSON escape of half an emoji, common in scraped captions), which no tokenizer can read."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _captions(row: dict) -> tuple[str, ...] | None:
    value = row.get("captions", row.get("caption"))
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(is_text(c) and c.strip() for c in value):
        return tuple(value)
    return None


def _group(examples: list[Example], where: Path) -> list[Example]:
    """Rows naming the same image (resolved path) as one example with all their captions, in
    first-appearance order, under the first row's id: one ``{"image", "caption"}`` row per pair is
    the same data as one row per image with ``"captions"``."""
    out: list[Example] = []
    at: dict[str, int] = {}
    for ex in examples:
        n = at.get(ex.image) if isinstance(ex.image, str) else None
        if n is None:
            if isinstance(ex.image, str):
                at[ex.image] = len(out)
            out.append(ex)
        else:
            out[n] = replace(out[n], captions=out[n].captions + ex.captions)
    if len(out) < len(examples):
        logger.info("%s: %d rows name %d images: each image is one item with all its rows' captions",
                    where, len(examples), len(out))
    return out


def _split_lines(text: str) -> list[str]:
    """Lines at ``\\n`` (and ``\\r\\n``) only: ``str.splitlines`` would also cut at U+2028, U+0085 ...,
    which a caption may hold."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON: {e}") from None


def load_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               need_captions: bool = True) -> Dataset:
    """A JSONL file (or JSON list) of ``{"image", "caption"|"captions", "id"?}`` rows."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of {{'image', 'caption'}} objects (or a Karpathy "
                             f"split file with 'images')")
        rows = [(f"item {n}", r) for n, r in enumerate(data, 1)]
    else:
        rows = []
        try:
            lines = _split_lines(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read it: {e}") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append((f"line {n}", json.loads(line)))
                except ValueError as e:
                    rows.append((f"line {n}", ValueError(str(e))))
    examples, bad = [], 0
    for where, row in rows:
        caps = _captions(row) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or (need_captions and caps is None):
            reason = f"not JSON ({row})" if isinstance(row, Exception) else (
                "expected an object with 'image' (a path) and 'caption' or 'captions' (non-blank, valid Unicode "
                "text)")
            logger.warning("%s, %s: %s; skipped", path, where, reason)
            bad += 1
            continue
        image = _resolve(row["image"], path.parent, image_root)
        examples.append(Example(str(row.get("id", row["image"])), image, caps or ()))
    return Dataset(str(path), "jsonl", _unique(_group(examples, path)), bad)


def load_karpathy(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  split: str | None = "test") -> Dataset:
    """A Karpathy split JSON (COCO: ``filepath/filename``; Flickr30K: ``filename``), one split."""
    path = Path(path)
    data = _read_json(path)
    root = Path(image_root) if image_root is not None else path.parent
    examples, bad = [], 0
    for n, img in enumerate(data.get("images", []), 1):
        if split is not None and isinstance(img, dict) and img.get("split") != split:
            continue
        try:
            name = os.path.join(img.get("filepath", ""), img["filename"])
            caps = tuple(s["raw"] for s in img["sentences"])
            if not caps or not all(is_text(c) and c.strip() for c in caps):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.warning("%s, image %d: expected 'filename' and 'sentences' [{'raw': text}] (not blank, valid "
                           "Unicode); skipped",
                           path, n)
            bad += 1
            continue
        ident = str(img.get("cocoid", img.get("imgid", name)))
        examples.append(Example(ident, str(root / name), caps))
    if not examples and not bad:
        raise InputError(f"{path}: no images of split {split!r} (a Karpathy split file has 'images' with 'split')")
    return Dataset(str(path), f"karpathy:{split}", _unique(examples), bad)


def load_vqa(questions: str | os.PathLike, annotations: str | os.PathLike | None, image_root: str | os.PathLike,
             image_pattern: str = "COCO_val2014_{image_id:012d}.jpg") -> Dataset:
    """VQAv2 questions (+ annotations with the 10 human answers each; without them no accuracy)."""
    qpath = Path(questions)
    try:
        image_pattern.format(image_id=42)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise InputError(f"image pattern {image_pattern!r}: {type(e).__name__}: {e}; it may use only "
                         f"{{image_id}}, e.g. 'COCO_val2014_{{image_id:012d}}.jpg'") from None
    qs = _read_json(qpath)
    qs = qs.get("questions", qs) if isinstance(qs, dict) else qs
    if not isinstance(qs, list):
        raise InputError(f"{qpath}: expected {{'questions': [{{'question_id', 'image_id', 'question'}}]}}")
    answers: dict[Any, tuple[str, ...]] = {}
    if annotations is not None:
        apath = Path(annotations)
        ann = _read_json(apath)
        ann = ann.get("annotations", ann) if isinstance(ann, dict) else ann
        if not isinstance(ann, list):
            raise InputError(f"{apath}: expected {{'annotations': [{{'question_id', 'answers'}}]}}")
        for a in ann:
            try:
                ans = tuple(x["answer"] for x in a["answers"])
                if ans and all(is_text(x) for x in ans):
                    answers[a["question_id"]] = ans
            except (KeyError, TypeError):
                pass
    examples, bad = [], 0
    for n, q in enumerate(qs, 1):
        try:
            qid, text = q["question_id"], q["question"]
            image = q["image"] if "image" in q else image_pattern.format(image_id=q["image_id"])
            if not is_text(text) or not text.strip() or not isinstance(image, str) or not image:
                raise ValueError
            hash(qid)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            logger.warning("%s, question %d: expected 'question_id', 'question' (valid Unicode text) and 'image_id' "
                           "(or 'image', a path); skipped", qpath, n)
            bad += 1
            continue
        if annotations is not None and qid not in answers:
            logger.warning("%s, question %d: no annotation with answers (valid Unicode text) for question_id %r; "
                           "skipped", qpath, n, qid)
            bad += 1
            continue
        examples.append(Example(str(qid), _resolve(image, qpath.parent, image_root), (), text,
                                answers.get(qid, ())))
    return Dataset(str(qpath), "vqav2", _unique(examples), bad)


def load_images(src: str | os.PathLike) -> Dataset:
    """A folder of images (recursively), a ``.tar`` shard or a list file: `seed.dataset.discover`."""
    items = discover(src)
    bad = [it for it in items if it.error is not None]
    for it in bad:
        logger.warning("%s; skipped", it.error)
    return Dataset(str(src), "images", [Example(it.id, it) for it in items if it.error is None], len(bad))


def load_examples(src: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str | None = "test",
                  need_captions: bool = False) -> Dataset:
    """Any image or image-caption layout: a folder/tar/list of images, JSONL/JSON list, or Karpathy JSON.

    ``need_captions``: rows without a caption are bad (tasks that score captions); a plain image
    folder is then refused.
    """
    p = Path(src)
    if not p.exists():
        raise InputError(f"{src}: no such file or folder")
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".json":
        head = _read_json(p)
        if isinstance(head, dict) and "images" in head:
            return load_karpathy(p, image_root, split)
        return load_jsonl(p, image_root, need_captions)
    if p.is_file() and suffix == ".jsonl":
        return load_jsonl(p, image_root, need_captions)
    if need_captions:
        raise InputError(f"{src}: this task needs captions: give a JSONL of {{'image', 'caption'}} rows or a "
                         f"Karpathy split JSON, not a folder of images")
    return load_images(p)


def load_captions(src: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  split: str | None = "test") -> Dataset:
    """Captions without images (text-to-image): a text file (one caption per line) or JSONL/JSON
    rows with ``caption``/``captions`` and optionally ``image`` (the reference for CLIP-I / FID)."""
    p = Path(src)
    if not p.is_file():
        raise InputError(f"{src}: no such file")
    if p.suffix.lower() == ".json":
        head = _read_json(p)
        if isinstance(head, dict) and "images" in head:
            return load_karpathy(p, image_root, split)
        rows = list(enumerate(head, 1)) if isinstance(head, list) else [(1, head)]
    elif p.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(_lines(p), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError:
                    rows.append((n, None))
    else:
        rows = None
    if rows is not None:
        examples, bad = [], 0
        for n, row in rows:
            caps = _captions(row) if isinstance(row, dict) else None
            if caps is None:
                logger.warning("%s, row %d: expected a JSON object with 'caption' or 'captions' (non-blank, valid "
                               "Unicode text); skipped", p, n)
                bad += 1
                continue
            image = row.get("image")
            examples.append(Example(str(row.get("id", n)), _resolve(image, p.parent, image_root)
                                    if isinstance(image, str) else None, caps))
        return Dataset(str(p), "jsonl", _unique(examples), bad)
    examples = [Example(str(n), None, (line.strip(),)) for n, line in enumerate(_lines(p), 1) if line.strip()]
    return Dataset(str(p), "text", examples, 0)


def _lines(p: Path) -> list[str]:
    try:
        lines = _split_lines(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read it: {e}") from None
    return lines
