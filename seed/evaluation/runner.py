"""The resumable, torchrun-aware evaluation run every task uses.

An output folder holds::

    run.json              what is being measured: task, dataset (name, count, hash of the ids, hash
                          of the content: captions, questions, answers, resolved image paths),
                          model fingerprint, the settings that change the results
    items/rankNNN.jsonl   one line per finished item ({"id", ...per-item results} or {"id", "error"}),
                          written a batch at a time, flushed and fsynced (a kill never tears a line
                          that counts: a torn last line is cut on resume)
    images/               what the task generated (reconstructions, text-to-image outputs)
    report.json           the aggregate metrics, written by rank 0 at the end
    .lock                 one run at a time (`seed.dataset.OutputLock`)

A rerun with the same task, data, model and settings skips every item already in ``items/``
(whatever the number of processes then and now), so a killed run resumes where it stopped and
never recomputes a finished item; a rerun that differs is refused, naming each difference. An
item that failed (an error row, or a t2i row whose reference image could not be read) is not
finished: a rerun tries it again, and the last row of an id counts (so a fixed image is scored). Under
torchrun each rank takes every ``world_size``-th remaining item; rank 0 aggregates once all are
done (the ranks share the folder, as dataset tokenization does).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..dataset import (
    JsonlWriter, OutputError, OutputLock, _write_json_atomic, fingerprint_diff, json_line, repair,
)
from ..errors import InputError
from .data import Dataset, Example

logger = logging.getLogger(__name__)

LIBRARIES = ("seed", "torch", "transformers", "diffusers", "timm", "torchmetrics", "torch-fidelity", "pycocoevalcap")


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that compute the numbers (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def utf8(text: str) -> bytes:
    """``text`` as UTF-8 bytes for hashing, whatever it holds: a file name's undecodable bytes
    (surrogate escapes) as those bytes, a lone surrogate (``"\\ud83d"`` from a JSON escape) as
    its code point's 3 bytes, never an error."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def ids_hash(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256(utf8("\n".join(ids))).hexdigest()


def content_hash(examples: Sequence[Example]) -> str:
    """sha256 of what each example holds: id, resolved image (path, or folder/tar member),
    captions, question and answers. Two datasets with the same ids but other captions (a text
    file's ids are its line numbers), other answers or images elsewhere hash differently."""
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        image = (os.path.abspath(ex.image) if isinstance(ex.image, str) else
                 None if ex.image is None else [os.path.abspath(ex.image.source), ex.image.id, ex.image.offset])
        h.update(utf8(json.dumps([ex.id, image, list(ex.captions), ex.question, list(ex.answers)],
                                 ensure_ascii=False)) + b"\n")
    return h.hexdigest()


def files_fingerprint(folder: str | os.PathLike) -> dict[str, list[Any]] | None:
    """``{name: [size, mtime_ns, sha256 of the safetensors header or None]}`` for each file of a
    model folder (None if it is not a folder). Hashing a 16 GB LLM is too slow; a weight file
    rewritten in place changes its mtime, and a ``.safetensors`` header (names, shapes, dtypes,
    offsets) is hashed as well."""
    import hashlib
    import struct

    folder = Path(folder)
    if not folder.is_dir():
        return None
    out: dict[str, list[Any]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        st = f.stat()
        header = None
        if f.suffix == ".safetensors" and st.st_size >= 8:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = hashlib.sha256(fh.read(min(n, st.st_size - 8))).hexdigest()
        out[f.name] = [st.st_size, st.st_mtime_ns, header]
    return out


RETRY_KEYS = ("error", "reference_error")
"""A row with one of these is not finished: a rerun does the item again (its last row counts).
``error``: the item failed; ``reference_error``: its reference image (t2i) could not be read."""


def unfinished(row: dict) -> bool:
    """True for a row a rerun must redo (`RETRY_KEYS`)."""
    return any(k in row for k in RETRY_KEYS)


class Run:
    """One task's run in ``out_dir`` for ``dataset``; use as a context manager.

    ``fingerprint``: what identifies the model (weights hashes, config); ``settings``: everything
    else that changes the per-item results (generation and decode settings, prompts, seeds).
    Both must match on resume. Inside the block: `todo` (this rank's items still to do),
    `write` (rows of finished items), `rows` (every row, rank 0, after `gather`).
    """

    def __init__(self, out_dir: str | os.PathLike, task: str, dataset: Dataset, fingerprint: dict, settings: dict,
                 *, progress: bool = True):
        self.out = Path(out_dir)
        self.task = task
        self.dataset = dataset
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.settings = json.loads(json.dumps(settings, default=str))
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.progress = progress and self.rank == 0
        self.lock: OutputLock | None = None
        self.writer: JsonlWriter | None = None
        self.skipped = 0
        self.start = time.perf_counter()
        if not dataset.examples:
            raise InputError(f"{dataset.name}: no usable items ({dataset.bad} malformed row(s): see the log)")

    # -- setup ----------------------------------------------------------------------------------

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _dist(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _agree(self, error: str | None) -> None:
        """Rank 0's verdict on the folder reaches every rank; all raise the same error."""
        if self.world_size > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise OutputError(error)

    def record(self) -> dict:
        ids = [ex.id for ex in self.dataset.examples]
        return {"task": self.task, "dataset": {"name": self.dataset.name, "layout": self.dataset.layout,
                                               "items": len(ids), "ids_sha256": ids_hash(ids),
                                               "content_sha256": content_hash(self.dataset.examples)},
                "model": self.fingerprint, "settings": self.settings}

    def _prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "items").mkdir(exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        self.lock = OutputLock(self.out)
        self.lock.acquire()
        try:
            self._check_record()
        except BaseException:
            self.lock.release()
            self.lock = None
            raise

    def _check_record(self) -> None:
        record = self.record()
        path = self.out / "run.json"
        if path.is_file() and any((self.out / "items").glob("*.jsonl")):
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise OutputError(f"{path}: not valid JSON ({e}); restore it or use another --out") from None
            # the data is its ids, wherever it is read from: the path it was given by may differ
            old_data = {k: v for k, v in (old.get("dataset") or {}).items() if k != "name"}
            new_data = {k: v for k, v in record["dataset"].items() if k != "name"}
            diff = fingerprint_diff({**{k: old.get(k) for k in record}, "dataset": old_data},
                                    {**record, "dataset": new_data})
            diff = [f"the dataset {self.dataset.name} differs in content (captions, questions, answers or "
                    f"image paths) from the one in run.json" if d.startswith("dataset.content_sha256:") else d
                    for d in diff]
            if diff:
                raise OutputError(f"{self.out} holds results of another run, so resuming would mix them: "
                                  + "; ".join(diff) + ". Use another --out (or delete this folder)")
        else:
            from .. import __version__

            _write_json_atomic(path, {**record, "seed_version": __version__,
                                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                          timespec="seconds")})

    def __enter__(self) -> Run:
        self._dist()
        error = None
        if self.main:
            try:
                self._prepare()
            except (OutputError, OSError) as e:
                error = str(e) if isinstance(e, OutputError) else f"cannot use the output folder {self.out}: {e}"
        self._agree(error)
        own = self.out / "items" / f"rank{self.rank:03d}.jsonl"
        repair(own)
        if self.main:  # files of ranks this run does not have (an earlier, larger run)
            for f in (self.out / "items").glob("rank*.jsonl"):
                if f != own and int(f.stem[4:] or 0) >= self.world_size:
                    repair(f)
        self.barrier()
        done = {row["id"] for row in self._read_rows() if not unfinished(row)}  # failed items: again
        self.barrier()  # every rank has read the same rows before any writes
        todo = [ex for ex in self.dataset.examples if ex.id not in done]
        self.skipped = len(self.dataset.examples) - len(todo)
        if self.skipped and self.main:
            logger.info("%s: %d of %d items already done, skipped", self.out, self.skipped, len(self.dataset.examples))
        self.todo: list[Example] = todo[self.rank::self.world_size]
        self.writer = JsonlWriter(own)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()

    # -- rows -----------------------------------------------------------------------------------

    def _read_rows(self) -> Iterable[dict]:
        for f in sorted((self.out / "items").glob("rank*.jsonl")):
            with open(f, "rb") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a torn line of a rank still writing: not done
                    if isinstance(row, dict) and isinstance(row.get("id"), str):
                        yield row

    def write(self, rows: Sequence[dict]) -> None:
        """Append finished items' rows (each with ``"id"``; a failed item: ``{"id", "error"}``)."""
        for r in rows:
            if "error" in r:
                logger.warning("%s: %s; skipped", r["id"], r["error"])
        assert self.writer is not None
        self.writer.write(rows)

    def gather(self) -> list[dict] | None:
        """Wait for every rank; on rank 0 every row, in the dataset's order (None elsewhere)."""
        if self.writer is not None:
            self.writer.close()
        self.barrier()
        if not self.main:
            return None
        by_id: dict[str, dict] = {}
        def rank(row: dict) -> int:  # a full result beats one without its reference, which beats a failure
            return 0 if "error" in row else 1 if unfinished(row) else 2

        for row in self._read_rows():  # (in any rank's file); of equal ones the last counts
            old = by_id.get(row["id"])
            if old is None or rank(row) >= rank(old):
                by_id[row["id"]] = row
        return [by_id[ex.id] for ex in self.dataset.examples if ex.id in by_id]

    def image_path(self, item_id: str, k: int = 0, ext: str = "png") -> Path:
        """Where the task stores an item's generated image ``k``: a flat, file-name-safe name, with a
        short hash of the id (``a/b.png`` and ``a_b.png``, or two long ids, never share a file)."""
        import hashlib

        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in item_id)[:100]
        tag = hashlib.sha256(utf8(item_id)).hexdigest()[:10]
        return self.out / "images" / f"{safe}_{tag}_{k}.{ext}"

    # -- report ---------------------------------------------------------------------------------

    def report(self, metrics: dict[str, Any], headline: str, rows: Sequence[dict], extra: dict | None = None) -> dict:
        """Write ``report.json`` and print the table (rank 0). ``metrics``: name -> number."""
        errors = sum("error" in r for r in rows)
        report = {
            "task": self.task, "metric": headline, "value": metrics.get(headline), "metrics": metrics,
            "n": len(rows) - errors, "n_errors": errors, "n_bad_rows": self.dataset.bad,
            "dataset": self.record()["dataset"], "model": self.fingerprint, "settings": self.settings,
            "versions": library_versions(), "seconds_this_run": round(time.perf_counter() - self.start, 3),
            "items_resumed": self.skipped,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        _write_json_atomic(self.out / "report.json", report)
        print(table(report))
        return report


def table(report: dict) -> str:
    """A short text table of a report's metrics."""
    lines = [f"{report['task']} on {report['dataset']['name']} (n={report['n']}, errors={report['n_errors']}, "
             f"bad rows={report['n_bad_rows']})"]
    width = max([len(k) for k in report["metrics"]] + [6])
    for k, v in report["metrics"].items():
        lines.append(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """A whole JSONL file at once (e.g. the per-item results in dataset order)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for r in rows:
            f.write(json_line(r))
    os.replace(tmp, path)
