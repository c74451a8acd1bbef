"""Model cards of training exports: ``README.md`` with Hugging Face metadata, so an export folder
can be uploaded to the Hub as it is (``huggingface_hub.upload_folder``).

Both trainers call `write_card` at the end of their export (the SEED-LLaMA export through
`llm_record`, the tokenizer export through `tokenizer_record`). It writes two files into the
folder:

- ``card.json``: the facts of the card (what was trained from what, on which data with how many
  rows, how long, the final train/val loss, the command line, the resolved config, and any
  evaluation added since): the card can be rewritten from it without the run folder;
- ``README.md``: YAML front matter (``library_name``, ``tags``, ``base_model`` when it is a Hub id,
  ``license`` when given, ``model-index`` with the evaluation numbers) and a short text.

`add_reports` (``scripts/model_card.py EXPORT --report OUT/report.json ...``) adds the numbers of
``scripts/evaluate.py`` reports made with the export's weights (checked against the report's model
fingerprint: a report of other weights is refused) and rewrites both files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

logger = logging.getLogger(__name__)

CARD_FILE, RECORD_FILE, IMAGE_TOKENIZER_FILE = "README.md", "card.json", "image_tokenizer.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TASK_TYPES = {"caption": "image-to-text", "vqa": "visual-question-answering", "t2i": "text-to-image",
              "reconstruction": "image-to-image", "retrieval": "image-text-retrieval", "codebook": "image-feature-extraction"}
"""`scripts/evaluate.py` task -> the Hub's task type in ``model-index``."""


# --- facts ----------------------------------------------------------------------------------------

def command_line(argv: Sequence[str] | None = None, world_size: int = 1) -> str:
    """The training command as typed: ``python SCRIPT ARGS`` (``argv``: ``[script, *args]``; None:
    ``sys.argv``), prefixed ``torchrun --nproc-per-node N`` for N processes on one node."""
    argv = list(sys.argv if argv is None else argv)
    cmd = shlex.join(["python", *argv]) if argv else "(unknown)"
    return f"torchrun --nproc-per-node {world_size} " + cmd[len("python "):] if world_size > 1 else cmd


def final_losses(metrics_path: str | os.PathLike, step: int | None = None) -> dict[str, dict | None]:
    """``{"train_loss": {"step", "value"}, "val_loss": ...}``: the last finite ``loss`` and ``val_loss``
    of ``metrics.jsonl`` at or before ``step`` (None when there is none)."""
    from .run import MetricsLog

    out: dict[str, dict | None] = {"train_loss": None, "val_loss": None}
    for row in MetricsLog.read(metrics_path):
        if step is not None and row["step"] > step:
            continue
        for key, name in (("loss", "train_loss"), ("val_loss", "val_loss")):
            if isinstance(row.get(key), (int, float)):
                out[name] = {"step": row["step"], "value": float(row[key])}
    return out


def read_front_matter(path: str | os.PathLike) -> dict:
    """The YAML front matter of a model card (``{}`` when there is none or it does not parse)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_base_model(base: str | None) -> str | None:
    """``base_model`` for the front matter: a Hub id as given; a local folder's own card's
    ``base_model`` (a chain of exports: SFT from a pretraining export); else None."""
    if not base or base == "tiny":
        return None
    p = Path(os.path.expanduser(base))
    if p.is_dir():
        found = read_front_matter(p / CARD_FILE).get("base_model")
        return found if isinstance(found, str) else None
    return base if HUB_ID.match(base) else None


def image_tokenizer_info(folder: str | os.PathLike, declared: str | None = None) -> dict | None:
    """What made the export's image codes: its ``image_tokenizer.json`` (variant, spec and a short
    hash of the fingerprint), else the config's ``data.image_tokenizer`` (``declared``), else None."""
    path = Path(folder) / IMAGE_TOKENIZER_FILE
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable (%s); the card does not name the image tokenizer", path, e)
            rec = None
        if isinstance(rec, dict):
            fp = rec.get("fingerprint")
            short = None
            if fp:
                raw = fp if isinstance(fp, str) else json.dumps(fp, sort_keys=True)
                short = hashlib.sha256(raw.encode()).hexdigest()[:12]
            return {"variant": rec.get("variant"), "spec": rec.get("spec"), "fingerprint": short,
                    "source": IMAGE_TOKENIZER_FILE}
    if declared:
        return {"variant": None, "spec": str(declared), "fingerprint": None, "source": "data.image_tokenizer"}
    return None


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    out = {}
    for name in ("seed", "torch", "transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _config_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg) if OmegaConf.is_config(cfg) else json.dumps(cfg, indent=2, default=str)


def llm_record(cfg: Any, data: Any, val: Any, *, out_dir: str | os.PathLike, folder: str | os.PathLike, step: int,
               world_size: int = 1, command: Sequence[str] | None = None) -> dict:
    """The card facts of a SEED-LLaMA training export. ``data``: the run's
    `seed.training.llm.data.LlmData` (its sources and per-source counts); ``val``: its
    `seed.training.llm.val.LlmValSet` or None; ``out_dir``: the run folder (metrics.jsonl)."""
    paths = {"train": cfg.data.train}
    for k, s in enumerate(cfg.data.sources or []):
        paths[s.name or f"source{k}"] = s.path
    counts = data.counts() if data is not None else {}
    sources = []
    for s in (data.sources if data is not None else []):
        p = paths.get(s.name, None)
        p = list(p) if p is not None and not isinstance(p, str) else p
        sources.append({"name": s.name, "path": p, "format": s.format, "files": len(s.files),
                        "weight": s.weight, **counts.get(s.name, {})})
    base = str(cfg.model.base)
    return {
        "kind": "seed-llama", "base": base, "base_model": hub_base_model(base),
        "lora": None if cfg.model.lora is None else {k: cfg.model.lora[k] for k in ("r", "alpha", "dropout")},
        "image_tokenizer": image_tokenizer_info(folder, cfg.data.image_tokenizer),
        "data": sources,
        "val": None if val is None else {"path": _plain(cfg.data.val), "rows": val.counts["rows"], "samples": val.samples,
                                         "bad": val.counts["bad"], "dropped": val.counts["dropped"]},
        "steps": step, "world_size": world_size, **final_losses(Path(out_dir) / "metrics.jsonl", step),
        "command": command_line(command, world_size), "config": _config_yaml(cfg), "versions": _versions(),
        "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "evaluations": [],
    }


def tokenizer_record(cfg: Any, *, out_dir: str | os.PathLike, step: int, pairs: int | None = None,
                     val_pairs: int | None = None, skipped_images: int | None = None, world_size: int = 1,
                     command: Sequence[str] | None = None) -> dict:
    """The card facts of a tokenizer (stage-2) training export: the starting weights (``init:``),
    the image-caption pairs of ``data.train`` (``pairs`` of them) and ``data.val``, steps, losses."""
    init = {k: v for k, v in dict(cfg.init).items() if v is not None and k != "seed"} if "init" in cfg else {}
    data = [{"name": "train", "path": str(cfg.data.train), "format": "image-caption pairs", "rows": pairs,
             "samples_seen": step * cfg.data.batch_size * world_size * cfg.train.grad_accum,
             "skipped_images": skipped_images}]
    return {
        "kind": "tokenizer", "stage": cfg.stage, "objective": cfg.objective, "base": init.get("qformer"),
        "base_model": None, "init": {k: str(v) for k, v in init.items()},
        "image_tokenizer": None, "data": data,
        "val": None if cfg.data.val is None else {"path": str(cfg.data.val), "samples": val_pairs},
        "steps": step, "world_size": world_size, **final_losses(Path(out_dir) / "metrics.jsonl", step),
        "command": command_line(command, world_size), "config": _config_yaml(cfg), "versions": _versions(),
        "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "evaluations": [],
    }


def _plain(v: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


# --- rendering -----------------------------------------------------------------------------------

def metadata(record: Mapping[str, Any]) -> dict:
    """The card's YAML front matter (Hugging Face model card metadata) for ``record``."""
    from huggingface_hub import EvalResult, ModelCardData

    llm = record["kind"] == "seed-llama"
    results = []
    for ev in record.get("evaluations", []):
        for name, value in ev["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results.append(EvalResult(task_type=TASK_TYPES.get(ev["task"], ev["task"]), task_name=ev["task"],
                                          dataset_type=ev["dataset"], dataset_name=ev["dataset"],
                                          metric_type=name, metric_name=name, metric_value=value))
    data = ModelCardData(
        library_name="transformers" if llm else "seed",
        tags=["seed", "seed-llama", "multimodal", "lora" if record.get("lora") else "full-fine-tuning"] if llm
        else ["seed", "image-tokenizer", "vector-quantization"],
        base_model=record.get("base_model"), license=record.get("license"),
        model_name=record.get("name") or ("SEED-LLaMA (trained with seed)" if llm else "SEED tokenizer (trained with seed)"),
        eval_results=results or None)
    return data.to_dict()


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "" if x is None else str(x)


def render(record: Mapping[str, Any]) -> str:
    """The whole ``README.md``: front matter + text."""
    import yaml

    llm = record["kind"] == "seed-llama"
    lines = ["---", yaml.safe_dump(metadata(record), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    if llm:
        lines += ["# SEED-LLaMA", "", "A causal LM trained on SEED image codes with the `seed` library's "
                  "`scripts/train_llama.py`. Load it with "
                  "`seed.SeedLlama.from_pretrained(FOLDER)` (or `transformers.AutoModelForCausalLM`: the "
                  "merged weights).", ""]
    else:
        lines += ["# SEED tokenizer", "", f"A SEED visual tokenizer (stage {record.get('stage')}, objective "
                  f"`{record.get('objective')}`) trained with seed's `scripts/train_tokenizer.py`. Load it with "
                  "`seed.Tokenizer.from_pretrained(FOLDER)`.", ""]
    lines += ["## Training", "", "| | |", "|---|---|"]
    base, hub = record.get("base"), record.get("base_model")
    if llm:
        desc = ("a tiny random LLaMA built in memory (no base weights)" if base == "tiny" else
                f"`{base}`" + (f" (base_model `{hub}`)" if hub and hub != base else "") +
                ("" if hub else " (a local folder: set `base_model` to its Hub id before uploading)"))
        lines.append(f"| base model | {desc} |")
        lora = record.get("lora")
        lines.append(f"| method | {'LoRA r=%s alpha=%s, merged' % (lora['r'], lora['alpha']) if lora else 'full fine-tuning'} |")
    else:
        for k, v in (record.get("init") or {}).items():
            lines.append(f"| init.{k} | `{v}` |")
    it = record.get("image_tokenizer")
    if llm:
        if it:
            desc = " ".join(x for x in (f"variant `{it['variant']}`" if it.get("variant") else "",
                                        f"spec `{it['spec']}`" if it.get("spec") else "",
                                        f"fingerprint `{it['fingerprint']}`" if it.get("fingerprint") else "") if x)
            lines.append(f"| image tokenizer | {desc} (from {it['source']}) |")
        else:
            lines.append("| image tokenizer | not recorded (the data held codes) |")
    lines.append(f"| steps | {record['steps']} ({record.get('world_size', 1)} process(es)) |")
    for key, label in (("train_loss", "final train loss"), ("val_loss", "final val loss")):
        v = record.get(key)
        lines.append(f"| {label} | {_fmt(v['value']) + ' (step %d)' % v['step'] if v else '(none)'} |")
    lines += ["", "### Data", "", "| source | path | format | rows read | samples | bad | dropped |",
              "|---|---|---|---|---|---|---|"]
    for s in record.get("data", []):
        lines.append(f"| {s['name']} | `{s.get('path')}` | {s.get('format', '')} | {_fmt(s.get('rows'))} | "
                     f"{_fmt(s.get('samples', s.get('samples_seen')))} | {_fmt(s.get('bad', s.get('skipped_images')))} | "
                     f"{_fmt(s.get('dropped'))} |")
    val = record.get("val")
    if val:
        lines.append(f"| val (held out) | `{val['path']}` | | {_fmt(val.get('rows'))} | {_fmt(val.get('samples'))} | "
                     f"{_fmt(val.get('bad'))} | {_fmt(val.get('dropped'))} |")
    lines += ["", "### Command", "", "```", record.get("command", ""), "```", ""]
    evals = record.get("evaluations") or []
    lines += ["## Evaluation", ""]
    if evals:
        lines += ["| task | dataset | n | metric | value |", "|---|---|---|---|---|"]
        for ev in evals:
            for name, value in ev["metrics"].items():
                lines.append(f"| {ev['task']} | {ev['dataset']} | {ev.get('n', '')} | {name} | {_fmt(value)} |")
    else:
        lines.append("Not evaluated yet: `python scripts/model_card.py FOLDER --report OUT/report.json` adds the "
                     "numbers of a `scripts/evaluate.py` run on this folder.")
    lines += ["", "<details><summary>The resolved training config</summary>", "", "```yaml",
              record.get("config", "").rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``card.json`` and ``README.md`` (`render`) into ``folder``; returns the card's path."""
    folder = Path(folder)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    card = folder / CARD_FILE
    tmp = folder / f".{CARD_FILE}.tmp"
    tmp.write_text(render(record), encoding="utf-8")
    os.replace(tmp, card)
    return card


# --- evaluation reports --------------------------------------------------------------------------

def _weight_identities(model: Any) -> Iterable[tuple[str, Any]]:
    """``(file name, identity)`` pairs found in a report's ``model`` fingerprint: ``llm_files`` /
    ``image_tokenizer_files`` rows ``[size, mtime, header sha256]``, ``weights`` ``{size, sha256}``
    (a tokenizer folder) or ``{name: {size, sha256}}``."""
    if not isinstance(model, Mapping):
        return
    files = model.get("llm_files")
    if isinstance(files, Mapping):
        for name, v in files.items():
            if str(name).endswith(".safetensors") and isinstance(v, list) and len(v) == 3:
                yield str(name), ("header", v[0], v[2])
    w = model.get("weights")
    if isinstance(w, Mapping) and "sha256" in w:
        yield "model.safetensors", ("sha256", w.get("size"), w["sha256"])
    elif isinstance(w, Mapping):
        for name, v in w.items():
            if isinstance(v, Mapping) and "sha256" in v:
                yield str(name), ("sha256", v.get("size"), v["sha256"])


def _identity(path: Path, kind: str) -> tuple:
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        if kind == "sha256":
            return ("sha256", size, hashlib.file_digest(f, "sha256").hexdigest())
        (n,) = struct.unpack("<Q", f.read(8))
        return ("header", size, hashlib.sha256(f.read(min(n, size - 8))).hexdigest())


def report_entry(report_path: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """One evaluation of the card, from a ``scripts/evaluate.py`` ``report.json`` made with the
    weights in ``folder``. Raises `seed.InputError` for an unreadable report or one made with other
    weights (or with none that can be told)."""
    report_path, folder = Path(report_path), Path(folder)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--report {report_path}: not a readable report.json ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or "task" not in report:
        raise InputError(f"--report {report_path}: not a scripts/evaluate.py report.json (no task/metrics)")
    ids = list(_weight_identities(report.get("model")))
    checked = 0
    for name, (kind, size, digest) in ids:
        mine = folder / name
        if not mine.is_file():
            continue
        if _identity(mine, kind) != (kind, size, digest):
            raise InputError(f"--report {report_path}: made with other weights than {folder} ({name} differs); "
                             f"evaluate this folder (scripts/evaluate.py ... {folder}) and pass that report")
        checked += 1
    if not checked:
        raise InputError(f"--report {report_path}: it does not identify weights of {folder} (its model: "
                         f"{json.dumps(report.get('model'), default=str)[:200]}); pass a report of a "
                         f"scripts/evaluate.py run on this folder")
    dataset = report.get("dataset") or {}
    return {"task": str(report["task"]), "dataset": str(dataset.get("name", "?")), "n": report.get("n"),
            "metrics": {k: v for k, v in report["metrics"].items()
                        if v is None or isinstance(v, (int, float, str))},
            "headline": report.get("metric"), "report": str(report_path.resolve()),
            "finished": report.get("finished")}


def add_reports(folder: str | os.PathLike, reports: Sequence[str | os.PathLike], *,
                license: str | None = None, name: str | None = None) -> Path:
    """Add evaluation reports (replacing an earlier one of the same task and dataset) and
    ``license`` / ``name`` to the card of ``folder``, and rewrite ``README.md`` and ``card.json``.
    Everything is checked before anything is written."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {RECORD_FILE}; not an export of seed's trainers (train_llama.py, "
                         f"train_tokenizer.py) or made before they wrote model cards")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    entries = [report_entry(r, folder) for r in reports]
    evals = [e for e in record.get("evaluations", [])
             if not any((e["task"], e["dataset"]) == (n["task"], n["dataset"]) for n in entries)]
    record["evaluations"] = evals + entries
    if license is not None:
        record["license"] = license
    if name is not None:
        record["name"] = name
    return write_card(folder, record)
