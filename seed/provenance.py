"""Which image tokenizer made a set of codes: records, read and compared at every joint.

SEED-LLaMA learns the 32 codes of ONE image tokenizer; codes of another (SEED-1, or another
trained SEED-2) are other words in the same vocabulary. Every artifact that holds codes says
whose they are, and every step that combines them checks it:

- a ``scripts/tokenize_dataset.py`` folder: ``OUT/run.json`` (``fingerprint``: the model config and
  a hash of each weight file; ``model_spec``: the ``--config`` it was made with);
- an LLM training export: ``EXPORT/image_tokenizer.json`` (`RECORD_NAME`), and a trained tokenizer
  folder's copy in ``EXPORT/image_tokenizer/`` (`FOLDER_NAME`)::

      {"format": 1, "variant": "seed2" | "seed1" | null, "spec": "seed2_tokenizer" | "image_tokenizer"
       | "/abs/folder" | "owner/hub-id" | null, "fingerprint": {"model": {...}, "weights": {...}} | null,
       "declared": false, "sources": [...]}

  ``spec`` is what `seed.Tokenizer.load` takes (``"image_tokenizer"``: the export's own copy);
  ``variant`` null and ``spec`` null: unknown (the run trained on raw JSONL codes with nothing
  naming their tokenizer); ``declared``: SEED-1 codes learned on purpose (``data.image_codes=seed1``).

Two records name the same tokenizer when their variant, model config and weight hashes agree
(`differences`). The vision tower's dtype and ``model.precision`` are left out: fp16 and fp32
runs of one tokenizer are the same tokenizer (their codes differ in a few rounding cases only).
A config and a ``save_pretrained`` copy of it cannot be compared by weight hashes (the files
differ) and count as different: pass the same one everywhere.

Pure functions; heavy imports (torch, the tokenizer) only where a record must load a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError

logger = logging.getLogger(__name__)

RECORD_NAME = "image_tokenizer.json"
"""The record file of an LLM export."""
FOLDER_NAME = "image_tokenizer"
"""The export's copy of a trained image tokenizer folder (``spec: "image_tokenizer"``)."""
FORMAT = 1
VARIANTS = ("seed2", "seed1")
IGNORED_MODEL_KEYS = ("precision",)
"""Keys of the ``model`` config section that do not make another tokenizer (fp16 vs fp32 arithmetic)."""
SCAN_ROWS = 200
"""Rows of each data file read before training to find image paths (a later one stops the run)."""

_HASHES: dict[tuple[str, int, int], dict] = {}


def variant_of_model(model: Mapping | None) -> str | None:
    """"seed2" (``model.decoder.head: image``), "seed1" (the Reverse Q-Former head) or None."""
    if not isinstance(model, Mapping):
        return None
    decoder = model.get("decoder") or {}
    return "seed2" if decoder.get("head", "reverse_qformer") == "image" else "seed1"


def _file_identity(path: Path) -> dict:
    """`seed.dataset.file_identity`, memoized per (path, size, mtime) in this process."""
    from .dataset import file_identity

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_identity(path)
    return _HASHES[key]


def _fingerprint(cfg: Any, saved: Path | None) -> dict:
    """The model config and weight hashes (as `seed.dataset.model_fingerprint`, without the dtype)."""
    from omegaconf import OmegaConf

    from .config import resolve_path
    from .hub import WEIGHTS_NAME

    model = OmegaConf.to_container(cfg.model, resolve=True)
    if saved is not None:
        if not (saved / WEIGHTS_NAME).is_file():
            raise InputError(f"{saved}: not a saved tokenizer ({WEIGHTS_NAME} is missing)")
        return {"model": model, "weights": {WEIGHTS_NAME: _file_identity(saved / WEIGHTS_NAME)}}
    weights = {}
    for name, path in (OmegaConf.to_container(cfg.get("checkpoints") or {}, resolve=True) or {}).items():
        if path is None:
            weights[name] = None
            continue
        p = resolve_path(path)
        if not p.is_file():
            raise InputError(f"checkpoints.{name}: weight file not found: {p} (scripts/download_weights.py "
                             "fetches the released ones)")
        weights[name] = _file_identity(p)
    return {"model": model, "weights": weights}


def _new(variant: str | None, spec: str | None, fingerprint: dict | None, folder: Path | None = None,
         **extra: Any) -> dict:
    record = {"format": FORMAT, "variant": variant, "spec": spec, "fingerprint": fingerprint, "declared": False}
    if folder is not None:
        record["folder"] = str(folder)
    record.update(extra)
    return record


def spec_name(spec: str | os.PathLike) -> str:
    """A spec as a record writes it: a shipped config by its name (``seed2_tiny``), a local file or
    folder by its absolute path, anything else (a Hub id) as given."""
    from .config import SHIPPED_CONFIGS, find_config, resolve_path

    path = resolve_path(spec)
    if path.is_dir():
        return str(path.resolve())
    try:
        found = find_config(spec).resolve()
    except InputError:
        return str(spec)
    shipped = SHIPPED_CONFIGS.resolve()
    if found.parent == shipped:
        return found.stem
    return str(found)


def record_for(spec: Any, *, where: str = "image_tokenizer") -> dict:
    """The record of an image tokenizer named by ``spec``: a config name or YAML path, a
    `seed.Tokenizer.save_pretrained` folder (or a tokenizer training export), a Hub id, a
    `DictConfig` or a `seed.Tokenizer` (its config only: a built tokenizer does not know its weight
    files, so its ``fingerprint`` has ``weights: null`` and is compared by config alone).

    Raises `InputError` naming ``where`` for a name that is none of these (a mistyped config name)
    or a config whose weight files are missing; `seed.CheckpointError` for a Hub id that cannot be
    fetched. Nothing is built; weight files are hashed (sha256, once per process and file)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        fp = _fingerprint(spec, None)
        return _new(variant_of_model(fp["model"]), None, fp)
    if hasattr(spec, "cfg") and hasattr(spec, "encode"):  # a seed.Tokenizer
        model = OmegaConf.to_container(spec.cfg.model, resolve=True)
        return _new(variant_of_model(model), None, {"model": model, "weights": None})
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"{where}: expected a config name, YAML file, saved tokenizer folder or Hub id, "
                         f"got {type(spec).__name__}")
    from .config import find_config, load_config, resolve_path
    from .hub import find, read_config

    path = resolve_path(spec)
    if path.is_dir():
        try:
            cfg = read_config(path)
        except Exception as e:  # CheckpointError: not a saved tokenizer
            raise InputError(f"{where} {os.fspath(spec)}: {e}") from None
        fp = _fingerprint(cfg, path)
        return _new(variant_of_model(fp["model"]), str(path.resolve()), fp, path.resolve())
    if Path(os.fspath(spec)).suffix.lower() in (".yaml", ".yml") or "/" not in os.fspath(spec):
        try:
            find_config(spec)
            cfg = load_config(spec)
            fp = _fingerprint(cfg, None)
        except InputError as e:
            raise InputError(f"{where} {os.fspath(spec)!r}: {e}; give a shipped config name such as seed2_tokenizer, "
                             "a YAML file, a saved tokenizer folder or a Hub id") from None
        return _new(variant_of_model(fp["model"]), spec_name(spec), fp)
    folder = find(os.fspath(spec))  # a Hub id: CheckpointError when it cannot be fetched
    fp = _fingerprint(read_config(folder), folder)
    return _new(variant_of_model(fp["model"]), os.fspath(spec), fp)


def _comparable(fp: Mapping) -> tuple[dict, Any]:
    model = {k: v for k, v in (fp.get("model") or {}).items() if k not in IGNORED_MODEL_KEYS}
    return model, fp.get("weights")


def differences(a: Mapping, b: Mapping) -> list[str]:
    """What tells two records apart (empty: the same tokenizer, or one of them unknown).

    Compared: the variant, then the model config (less `IGNORED_MODEL_KEYS`) and the weight hashes;
    weights of ``null`` on one side (a built `seed.Tokenizer`) compare the config alone. A record
    without a fingerprint is compared by ``spec``; an unknown record (variant and spec null)
    differs from nothing."""
    if a.get("variant") and b.get("variant") and a["variant"] != b["variant"]:
        return [f"{a['variant']} codes vs {b['variant']} codes"]
    fa, fb = a.get("fingerprint"), b.get("fingerprint")
    if fa and fb:
        (ma, wa), (mb, wb) = _comparable(fa), _comparable(fb)
        out = []
        if ma != mb:
            from .dataset import fingerprint_diff

            out += [d.replace(" in run.json, ", " vs ").replace(" now", "") for d in fingerprint_diff({"model": ma}, {"model": mb})][:3]
        if wa is not None and wb is not None and wa != wb:
            if set(wa) != set(wb):
                out.append("weights: a config's weight files vs a saved folder's model.safetensors (pass the same "
                           "kind, config or folder, as the codes were made with)")
            else:
                out += [f"weights {k}: another file" for k in sorted(wa) if wa.get(k) != wb.get(k)]
        return out
    if a.get("spec") and b.get("spec") and not (fa or fb) and a["spec"] != b["spec"]:
        return [f"spec {a['spec']} vs {b['spec']}"]
    return []


def describe(record: Mapping | None) -> str:
    """A short human name for a record: ``seed2 tokenizer seed2_tiny`` / ``seed1 tokenizer (unnamed)``."""
    if not record or (record.get("variant") is None and record.get("spec") is None):
        return "an unknown image tokenizer"
    spec = record.get("shown") or record.get("spec")
    return f"the {record.get('variant') or '?'} image tokenizer {spec or '(unnamed: a config or object, no name)'}"


def check_same(a: Mapping, b: Mapping, where_a: str, where_b: str, hint: str = "",
               verb: str = "holds codes of") -> None:
    """`InputError` naming both sides when ``a`` and ``b`` are different tokenizers (`differences`)."""
    diff = differences(a, b)
    if diff:
        raise InputError(f"{where_a} {verb} {describe(a)}, but {where_b} is {describe(b)} "
                         f"({'; '.join(diff)}): their codes mean different things. "
                         + (hint or "Use codes of one image tokenizer, or tokenize the images again with it."))


# --- tokenize_dataset.py folders -----------------------------------------------------------------

def is_codes_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "run.json").is_file() and (p / "codes").is_dir()


def codes_folder_of(file: str | os.PathLike) -> Path | None:
    """The `scripts/tokenize_dataset.py` folder a ``codes/K.jsonl`` file belongs to, else None."""
    p = Path(file)
    if p.parent.name == "codes" and is_codes_folder(p.parent.parent):
        return p.parent.parent
    return None


def record_of_codes_folder(folder: str | os.PathLike) -> dict:
    """The record of a `scripts/tokenize_dataset.py` output folder, from its ``run.json``: variant
    and fingerprint of the model, ``spec`` (its ``model_spec``, when recorded), ``chunks`` and
    ``done`` (chunks with a ``done/`` marker), ``unfinished`` (fewer done than chunks) and
    ``mixed`` (``--force-mismatch`` added rows of another model). `InputError` if run.json is unreadable."""
    from .dataset import done_chunks

    folder = Path(folder)
    run_json = folder / "run.json"
    try:
        run = json.loads(run_json.read_text(encoding="utf-8"))
        fp = run["fingerprint"]
        chunks = int(run["chunks"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{run_json}: not a tokenize_dataset.py run record ({type(e).__name__}: {e}); "
                         "tokenize the images again into a new --output") from None
    fp = {k: v for k, v in fp.items() if k != "vision_dtype"}
    forced = [f.get("fingerprint", {}) for f in run.get("forced") or []]
    mixed = [d for f in forced for d in differences(_new(None, None, fp), _new(None, None, f))]
    done = len([k for k in done_chunks(folder) if k < chunks])
    return _new(variant_of_model(fp.get("model")), run.get("model_spec"), fp, chunks=chunks, done=done,
                unfinished=done < chunks, mixed=mixed, path=str(folder.resolve()))


def codes_folder_note(record: Mapping) -> str:
    return f"{record['done']} of {record['chunks']} chunks done"


# --- LLM exports ---------------------------------------------------------------------------------

def write_export_record(export: str | os.PathLike, record: Mapping, copy_from: str | os.PathLike | None = None) -> Path:
    """Write ``export/image_tokenizer.json``; with ``copy_from`` (a saved tokenizer folder), copy its
    ``config.yaml`` and ``model.safetensors`` into ``export/image_tokenizer/`` and record ``spec:
    "image_tokenizer"``. Machine-local keys (``folder``) are not written."""
    from .hub import CONFIG_NAME, WEIGHTS_NAME

    export = Path(export)
    out = {k: v for k, v in record.items() if k not in ("folder", "shown")}
    out["format"] = FORMAT
    if copy_from is not None:
        src, dst = Path(copy_from), export / FOLDER_NAME
        dst.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(src / name, dst / name)
        out["spec"] = FOLDER_NAME
        out["copied_from"] = str(src)
    path = export / RECORD_NAME
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_export_record(folder: str | os.PathLike) -> dict | None:
    """The record of an LLM export (None when the folder has no `RECORD_NAME`), with ``spec``
    ``"image_tokenizer"`` made the absolute path of the export's copy (``folder``) and ``shown``
    the name to print. `InputError` for a record that cannot be read."""
    folder = Path(folder)
    path = folder / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format') if isinstance(record, dict) else record!r}, expected {FORMAT}")
        if record.get("variant") not in (*VARIANTS, None):
            raise ValueError(f"variant {record.get('variant')!r}")
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image tokenizer record ({e}); restore it, or delete it and pass "
                         "image_tokenizer= (scripts: --image-tokenizer)") from None
    if record.get("spec") == FOLDER_NAME:
        copy = folder / FOLDER_NAME
        if not copy.is_dir():
            raise InputError(f"{path} names the export's copy {copy}, which is missing: copy the export whole")
        record["spec"] = str(copy.resolve())
        record["folder"] = str(copy.resolve())
        record["shown"] = f"{FOLDER_NAME}/ of {folder}"
    return record


def is_unknown(record: Mapping | None) -> bool:
    return record is None or (record.get("spec") is None and record.get("fingerprint") is None)


def export_image_tokenizer(export: str | os.PathLike, record: Mapping, given: Any = None) -> Any:
    """The image tokenizer an export's chat uses: ``given`` (checked against ``record``: another
    tokenizer is an `InputError` naming both) or the recorded spec. For an unknown record and no
    ``given``, None (the caller fails at the first image, asking for ``image_tokenizer=``).
    A callable ``given`` (built later) is returned unchecked."""
    if given is None:
        return record.get("spec")
    if callable(given) and not hasattr(given, "encode"):
        return given
    if isinstance(given, (str, os.PathLike)) and record.get("spec") is not None and \
            os.fspath(given) == record.get("spec"):
        return given
    mine = record_for(given, where="image_tokenizer")
    check_same(record, mine, f"the LLM export {export} (its {RECORD_NAME})", f"image_tokenizer={given!r}" if
               isinstance(given, (str, os.PathLike)) else "the image_tokenizer passed",
               verb="was trained on codes of", hint=f"Leave image_tokenizer unset (scripts: no --image-tokenizer) to use the export's own, "
                    f"{record.get('shown') or record.get('spec') or 'named in its record'}.")
    return given


def no_tokenizer_message(export: str | os.PathLike, record: Mapping | None) -> str:
    """Why an export cannot read or write an image, and what to pass."""
    if record is None:
        why = f"{export} holds no {RECORD_NAME}"
    else:
        why = f"{export}/{RECORD_NAME} records no image tokenizer (it was trained on codes that named none)"
    return (f"{why}: pass the image tokenizer whose codes it learned with image_tokenizer= (scripts: "
            "--image-tokenizer), e.g. the config or save_pretrained folder given to scripts/tokenize_dataset.py")


# --- the LLM trainer -----------------------------------------------------------------------------

def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _source_paths(data: Any) -> list[tuple[str, list[str]]]:
    """``(config key, paths)`` of every source of a ``data:`` section."""
    out = []
    if _get(data, "train"):
        out.append(("data.train", [_get(data, "train")]))
    for k, s in enumerate(_get(data, "sources") or []):
        p = _get(s, "path")
        out.append((f"data.sources[{k}]", [p] if isinstance(p, (str, os.PathLike)) else list(p or [])))
    return out


def _has_image_path(row: Any) -> bool:
    """Whether a row holds an image given by path (a messages or parts image without codes)."""
    if not isinstance(row, Mapping):
        return False
    parts: list[Any] = []
    if isinstance(row.get("parts"), (list, tuple)):
        parts += list(row["parts"])
    messages = row.get("messages") if isinstance(row.get("messages"), (list, tuple)) else []
    for m in messages:
        if isinstance(m, Mapping) and isinstance(m.get("content"), (list, tuple)):
            parts += list(m["content"])
    return any(isinstance(p, Mapping) and p.get("codes") is None and isinstance(p.get("image"), str) for p in parts)


def find_image_path(files: Sequence[str], limit: int = SCAN_ROWS) -> str | None:
    """``FILE:LINE`` of the first row holding an image path in the first ``limit`` rows of each
    JSONL file, or None."""
    for f in files:
        if not f.endswith(".jsonl"):
            continue
        try:
            with open(f, "rb") as fh:
                for n, line in enumerate(fh, 1):
                    if n > limit:
                        break
                    if b'"image"' not in line:
                        continue
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError):
                        continue
                    if _has_image_path(row):
                        return f"{f}:{n}"
        except OSError:
            continue
    return None


def training_record(data: Any, base: str | None, base_dir: str | os.PathLike | None = None) -> dict:
    """Which image tokenizer a SEED-LLaMA training run's codes belong to, checked before training.

    Claims, in order of authority: ``data.image_tokenizer`` (`record_for`), the record of
    ``model.base`` when it is an LLM export (`read_export_record`: SFT from a pretraining export
    inherits its tokenizer), each `scripts/tokenize_dataset.py` folder among the sources
    (`record_of_codes_folder`). All must name the same tokenizer (`differences`), else an
    `InputError` naming both. Also refused: an unfinished folder (unless ``data.allow_unfinished``:
    then used and recorded), a folder of mixed models, codes of another variant than
    ``data.image_codes`` (seed2 unless SEED-1 is declared), image paths in the first `SCAN_ROWS`
    rows of a file with no usable image tokenizer.

    Returns the record to write with the export (`write_export_record`; ``folder``: a saved
    tokenizer folder to copy), plus ``sources`` (per source: its key, codes folders and their
    state) and ``image_tokenizer``: the spec the data reads image paths with (or None).
    """
    from .training.llm.data import list_files

    declared = _get(data, "image_codes") or "seed2"
    if declared not in VARIANTS:
        raise InputError(f"data.image_codes must be seed2 (the SEED-LLaMA recipe) or seed1 (SEED-1 codes on "
                         f"purpose, as SEED-1's SEED-OPT), got {declared!r}")
    allow_unfinished = bool(_get(data, "allow_unfinished"))
    claims: list[tuple[str, dict]] = []
    spec = _get(data, "image_tokenizer")
    if spec is not None:
        claims.append(("data.image_tokenizer", record_for(spec, where="data.image_tokenizer")))
    if base and base != "tiny":
        inherited = read_export_record(base) if Path(base).is_dir() else None
        if inherited is not None and not is_unknown(inherited):
            claims.append((f"model.base {base}", inherited))
    sources, scan = [], []
    for key, paths in _source_paths(data):
        files = list_files(paths, base_dir)
        folders = sorted({str(f) for f in (codes_folder_of(x) for x in files) if f is not None})
        entry: dict[str, Any] = {"key": key, "files": len(files), "codes_folders": []}
        for folder in folders:
            rec = record_of_codes_folder(folder)
            run_json = Path(folder) / "run.json"
            if rec["mixed"]:
                raise InputError(f"{key}: {folder} holds rows of more than one image tokenizer (run.json 'forced': "
                                 f"{'; '.join(rec['mixed'][:2])}): tokenize the images again into a new --output")
            if rec["unfinished"]:
                if not allow_unfinished:
                    raise InputError(
                        f"{key}: {folder} is an unfinished tokenization ({codes_folder_note(rec)}, per {run_json} "
                        f"and done/): rerun scripts/tokenize_dataset.py with the same --input and --output to "
                        "finish it, or set data.allow_unfinished=true to train on the rows written so far "
                        "(recorded in the export)")
                logger.warning("%s: %s is unfinished (%s): training on the rows written so far "
                               "(data.allow_unfinished)", key, folder, codes_folder_note(rec))
            entry["codes_folders"].append({"path": rec["path"], "chunks": rec["chunks"], "done": rec["done"],
                                           "unfinished": rec["unfinished"]})
            claims.append((f"{key}: {run_json}", rec))
        sources.append(entry)
        scan.append((key, files))
    run_where, run = claims[0] if claims else (None, None)
    for where, rec in claims[1:]:
        check_same(rec, run, where, run_where)
    record = dict(run) if run is not None else _new(None, None, None)
    # the spec to load: a codes folder's model_spec only if it still names the same tokenizer
    if run is not None and run_where and run_where.endswith("run.json") and record.get("spec"):
        try:
            again = record_for(record["spec"], where=f"{run_where} model_spec")
        except Exception as e:  # noqa: BLE001 - moved or changed since: the codes stay, the name goes
            logger.warning("%s: its model_spec %s cannot be loaded now (%s); the export records the fingerprint "
                           "only", run_where, record["spec"], e)
            again = None
        if again is None or differences(again, run):
            if again is not None:
                logger.warning("%s: its model_spec %s is another tokenizer now; the export records the fingerprint "
                               "only", run_where, record["spec"])
            record["spec"] = None
            record.pop("folder", None)
        elif again.get("folder"):
            record["folder"] = again["folder"]
    for k in ("chunks", "done", "unfinished", "mixed", "path"):
        record.pop(k, None)
    variant = record.get("variant")
    if variant is not None and variant != declared:
        if variant == "seed1":
            raise InputError(f"{run_where}: SEED-1 codes (model.decoder.head: reverse_qformer), but this run learns "
                             "SEED-2 codes (data.image_codes: seed2, the SEED-LLaMA recipe): tokenize with a SEED-2 "
                             "config such as seed2_tokenizer, or declare data.image_codes=seed1 to learn SEED-1 codes "
                             "on purpose")
        raise InputError(f"{run_where}: SEED-2 codes, but data.image_codes=seed1 declares SEED-1 codes: drop "
                         "data.image_codes, or use SEED-1 codes")
    record["variant"] = variant or (declared if declared == "seed1" else None)
    record["declared"] = declared == "seed1"
    record["sources"] = sources
    record["allow_unfinished"] = allow_unfinished
    record["image_tokenizer"] = record.get("spec")
    if record["image_tokenizer"] is None:
        for key, files in scan:
            hit = find_image_path(files)
            if hit:
                raise InputError(f"{key}: {hit} holds an image path, which needs an image tokenizer to become codes, "
                                 "and none is known: set data.image_tokenizer (e.g. data.image_tokenizer=seed2_tokenizer"
                                 ", or the config / save_pretrained folder your other codes came from)")
    return record
