"""One runner per task: reconstruction, codebook, retrieval, t2i (text-to-image), vqa, caption.

Each takes a model, a `seed.evaluation.data.Dataset` and an output folder, runs the items this
process has left to do (`seed.evaluation.runner.Run`: resumable, torchrun-sharded), and on rank 0
returns the report (also ``OUT/report.json``, the per-item ``OUT/items.jsonl`` in dataset order
and a table on stdout); other ranks return None. Images a task generates go to ``OUT/images/``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dataset import _write_json_atomic
from ..errors import InputError
from .data import Dataset, Example
from .metrics import (
    Clip, caption_scores, codebook_stats, metric_weights, image_set_scores, normalize_answer, pixel_scores, recall_at_k,
    retrieval_ranks, vqa_accuracy, vqa_overall,
)
from .runner import Run, files_fingerprint, write_jsonl

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T2I_GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 4, "max_new_tokens": 120}
"""The original ``eval_caption_to_images.py``: beam search 4, at most 120 new tokens."""
T2I_DECODE: dict[str, Any] = {"steps": 20, "guidance_scale": 5.0, "noise_level": 0}
"""... and its unCLIP decode: 20 steps, guidance 5, noise level 0 (with a negative image)."""
VQA_GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 1, "max_new_tokens": 32}
VQA_PROMPT = "Question: {question}\nAnswer:"
"""The original ``eval_vqa.py`` prompt (after the image)."""
CAPTION_GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 1, "max_new_tokens": 64}
CAPTION_PROMPT = "Please provide a short description of the image."


def _batches(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


class LogProgress:
    """A progress report for a log file: one readable line every ``interval`` seconds (and at the
    end) through `logging`, instead of tqdm's carriage-return fragments."""

    def __init__(self, total: int, desc: str, interval: float = 30.0):
        self.total, self.desc, self.interval = total, desc, interval
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        eta = f", about {(self.total - self.n) / rate:.0f} s left" if 0 < rate and self.n < self.total else ""
        logger.info("%s: %d/%d items (%.0f%%), %.2f items/s%s", self.desc, self.n, self.total,
                    100 * self.n / max(self.total, 1), rate, eta)

    def close(self) -> None:
        if self.total:
            self._log(time.monotonic())


def _bar(total: int, run: Run, desc: str):
    """A tqdm bar on a terminal; on anything else (a log file, a pipe) `LogProgress` lines."""
    from tqdm import tqdm

    desc = f"{desc} rank {run.rank}/{run.world_size}"
    if run.progress and not sys.stderr.isatty():
        return LogProgress(total, desc)
    return tqdm(total=total, disable=not run.progress, desc=desc, unit="item", dynamic_ncols=True)


def _open(batch: Sequence[Example]) -> tuple[list[Example], list[Any], list[dict]]:
    """(examples whose image opened, their PIL images, error rows of the others)."""
    good, images, errors = [], [], []
    for ex in batch:
        try:
            images.append(ex.open())
            good.append(ex)
        except InputError as e:
            errors.append({"id": ex.id, "error": str(e)})
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            errors.append({"id": ex.id, "error": f"{ex.id}: {type(e).__name__}: {e}"})
    return good, images, errors


def _each_batch(run: Run, desc: str, batch_size: int, work: Callable[[Sequence[Example]], list[dict]]) -> list[dict] | None:
    """``work`` over this process's remaining items, a batch at a time, each batch's rows written as
    it finishes (what makes a killed run resume), with a progress bar; then every rank's rows in
    dataset order on rank 0, None on the others."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    bar = _bar(len(run.todo), run, desc)
    for batch in _batches(run.todo, batch_size):
        run.write(work(batch))
        bar.update(len(batch))
    bar.close()
    return run.gather()


def _on_images(work: Callable[[list[Example], list[Any]], list[dict]]) -> Callable[[Sequence[Example]], list[dict]]:
    """A batch's images opened (`_open`): ``work(examples, images)`` on those that open, error rows for the rest."""
    def run_batch(batch: Sequence[Example]) -> list[dict]:
        good, images, rows = _open(batch)
        return rows + (work(good, images) if good else [])
    return run_batch


def _check_types(values: Mapping[str, Any], reference: Mapping[str, Any], what: str) -> None:
    """`InputError` for a setting whose value has not the type of the reference's (a number for a
    number...): ``num_beams=abc`` is refused before any generation, not deep inside it."""
    for key, value in values.items():
        ref = reference.get(key)
        if isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif isinstance(ref, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(ref, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            raise InputError(f"{what} {key}={value!r}: expected {type(ref).__name__} (as {key}={ref!r})")


def generation_settings(defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The task's generation settings with ``given`` over them: each key must be a setting of
    transformers' `GenerationConfig` (an `InputError` naming it otherwise, e.g. ``foo=1``) and
    each value of the type of the task's default or of `GenerationConfig`'s."""
    import difflib

    from transformers import GenerationConfig

    fields = {k: v for k, v in vars(GenerationConfig()).items() if not k.startswith("_") and k != "transformers_version"}
    for key in given or {}:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            raise InputError(f"generation {key}={given[key]!r}: not a generation setting (model.generate takes "
                             f"GenerationConfig's{f'; did you mean {near[0]}?' if near else ', e.g. num_beams, max_new_tokens'})")
    base = {k: v for k, v in fields.items() if isinstance(v, (bool, int, float))}
    _check_types(given or {}, {**base, **defaults}, "generation")
    return {**defaults, **(given or {})}


DECODE_SET_BY_TASK = ("codes", "negative_codes")
"""`seed.Tokenizer.decode` arguments the t2i task sets itself (not settings: the codes, --no-negative)."""


def decode_settings(defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The task's decode settings with ``given`` over them: each key must be a keyword of
    `seed.Tokenizer.decode` (``steps``, ``guidance_scale``, ``height``...; an `InputError` naming it
    otherwise, e.g. ``guidance=5``), each value of the type of the task's default."""
    import difflib
    import inspect

    from ..tokenizer import Tokenizer

    names = [k for k in inspect.signature(Tokenizer.decode).parameters if k != "self" and k not in DECODE_SET_BY_TASK]
    for key in given or {}:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise InputError(f"decode {key}={given[key]!r}: not a decode setting (one of {', '.join(names)}"
                             f"{f'; did you mean {near[0]}?' if near else ''})")
    _check_types(given or {}, defaults, "decode")
    if (given or {}).get("num_samples", 1) != 1:
        raise InputError(f"decode num_samples={given['num_samples']!r}: t2i draws one image per caption (leave it out)")
    return {**defaults, **(given or {})}


def _readable(rows: list[dict], task: str) -> list[dict]:
    """The rows without an error; none is an `InputError`."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise InputError(f"{task}: no item could be read or generated")
    return ok


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _set_scores(run: Run, rows: Sequence[dict], real: Sequence[Any], fid_features, is_logits, load) -> dict:
    """FID/IS over the generated images in ``rows`` (``"images"``) against ``real``; {} if not asked."""
    from PIL import Image

    if fid_features is None and is_logits is None:
        return {}
    fake = [run.out / p for r in rows if "error" not in r for p in r.get("images", [])]
    if fid_features is not None and (len(real) < 2 or len(fake) < 2):
        logger.warning("FID needs at least 2 real and 2 generated images (%d, %d): not computed", len(real), len(fake))
        fid_features = None

    def load_any(x: Any):
        return Image.open(x).convert("RGB") if isinstance(x, Path) else load(x)

    return image_set_scores(real, fake, fid_features=fid_features, is_logits=is_logits, load=load_any)


def _relative(run: Run, path: Path) -> str:
    return str(path.relative_to(run.out))


def _thumb(img, size: int = 256):
    from PIL import Image

    return img.convert("RGB").resize((size, size), Image.BICUBIC)


def grid(rows: Sequence[Sequence[Any]], size: int = 256) -> Any:
    """Rows of PIL images -> one image of ``size`` x ``size`` tiles."""
    from PIL import Image

    out = Image.new("RGB", (max(len(r) for r in rows) * size, len(rows) * size), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            out.paste(_thumb(img, size), (x * size, y * size))
    return out


def _finish(run: Run, rows: list[dict], metrics: dict, headline: str, extra: dict | None = None,
            items: list[dict] | None = None) -> dict:
    write_jsonl(run.out / "items.jsonl", items if items is not None else rows)
    return run.report(metrics, headline, rows, extra)


# --- reconstruction -------------------------------------------------------------------------------

PIXEL_SIZE = 256
PIXEL_METRICS = (f"PSNR (dB, data range 1) and SSIM (Gaussian 11x11, sigma 1.5) of each reconstruction vs its "
                 f"input, both resized to {PIXEL_SIZE}x{PIXEL_SIZE} (bicubic, aspect not kept, as the tokenizer "
                 f"resizes), per image, then averaged (torchmetrics)")

def reconstruction(tok, data: Dataset, out: str | os.PathLike, *, clip: Clip | None = None,
                   fid_features: torch.nn.Module | None = None, is_logits: torch.nn.Module | None = None,
                   batch_size: int = 4, decode: Mapping[str, Any] | None = None, grid_rows: int = 8,
                   fingerprint: dict | None = None, progress: bool = True) -> dict | None:
    """Images -> codes -> images with a `seed.Tokenizer`: CLIP-I (cosine of CLIP image embeddings,
    input vs each reconstruction, mean over samples), PSNR and SSIM (`pixel_scores`: input and
    reconstruction both resized to ``PIXEL_SIZE`` px, mean over samples and items; no downloaded
    weights), FID / IS of the reconstructions vs the inputs, and ``grid.png`` (input |
    reconstructions, the first ``grid_rows`` items).

    ``decode``: `seed.Tokenizer.decode` settings over the config's ``diffusion`` section.
    """
    from omegaconf import OmegaConf

    decode = dict(decode or {})
    settings = {"decode": {**OmegaConf.to_container(tok.cfg.diffusion, resolve=True), **decode},
                "metric_weights": metric_weights(clip, fid_features, is_logits), "pixel_metrics": PIXEL_METRICS}
    with Run(out, "reconstruction", data, fingerprint or {}, settings, progress=progress) as run:
        def work(good: list[Example], images: list[Any]) -> list[dict]:
            recons = tok.reconstruct(images, **decode)
            k = len(recons) // len(good)
            sims = [None] * len(good)
            if clip is not None:
                a, b = clip.image_features(images), clip.image_features(recons)
                sims = (b.view(len(good), k, -1) * a[:, None]).sum(-1).mean(1).tolist()
            rows = []
            for i, ex in enumerate(good):
                paths = []
                mine = recons[i * k:(i + 1) * k]
                for j, img in enumerate(mine):
                    p = run.image_path(ex.id, j)
                    img.save(p)
                    paths.append(_relative(run, p))
                psnr, ssim = pixel_scores(images[i], mine, PIXEL_SIZE)
                rows.append({"id": ex.id, "clip_i": sims[i], "psnr": sum(psnr) / k, "ssim": sum(ssim) / k,
                             "images": paths})
            return rows

        rows = _each_batch(run, "reconstruction", batch_size, _on_images(work))
        if rows is None:
            return None
        metrics: dict[str, Any] = {}
        if clip is not None:
            metrics["clip_i"] = _mean([r.get("clip_i") for r in rows])
        metrics["psnr"] = _mean([r.get("psnr") for r in rows])
        metrics["ssim"] = _mean([r.get("ssim") for r in rows])
        by_id = {ex.id: ex for ex in data.examples}
        ok = [r for r in rows if "error" not in r]
        metrics.update(_set_scores(run, ok, [by_id[r["id"]] for r in ok], fid_features, is_logits,
                                   lambda ex: ex.open()))
        if ok and grid_rows > 0:
            from PIL import Image

            grid([[by_id[r["id"]].open(), *(Image.open(run.out / p) for p in r["images"])]
                  for r in ok[:grid_rows]]).save(run.out / "grid.png")
        return _finish(run, rows, metrics, "clip_i" if clip is not None else "psnr",
                       {"pixel_metrics": PIXEL_METRICS})


# --- codebook -------------------------------------------------------------------------------------

def read_codes_folder(folder: str | os.PathLike) -> tuple[Dataset, dict[str, list[int]], int]:
    """A `scripts/tokenize_dataset.py` output folder -> (dataset of its ids, id -> codes, codebook size)."""
    import json

    from ..llm import text_to_codes

    folder = Path(folder)
    run_json = folder / "run.json"
    if not run_json.is_file() or not (folder / "codes").is_dir():
        raise InputError(f"{folder}: not a tokenize_dataset.py output folder (no run.json and codes/)")
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
        size = int(((record.get("fingerprint") or {}).get("model") or {}).get("codebook", {}).get("size", 8192))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{run_json}: not a tokenize_dataset.py run record ({type(e).__name__}: {e})") from None
    codes: dict[str, list[int]] = {}
    bad = 0
    for f in sorted((folder / "codes").glob("*.jsonl")):
        for n, line in enumerate(f.read_bytes().splitlines(), 1):
            try:
                row = json.loads(line)
                c = row["codes"] if "codes" in row else text_to_codes(row["text"])[0].tolist()
                codes[row["image"]] = list(c)
            except Exception:  # noqa: BLE001 - a torn or foreign line is counted, not fatal
                logger.warning("%s, line %d: not a codes row; skipped", f, n)
                bad += 1
    ids = sorted(codes)
    return Dataset(str(folder), "codes", [Example(i, None) for i in ids], bad), codes, size


def codebook(out: str | os.PathLike, *, codes_folder: str | os.PathLike | None = None, tok=None,
             data: Dataset | None = None, batch_size: int = 32, codebook_size: int | None = None,
             fingerprint: dict | None = None, progress: bool = True, top: int = 10) -> dict | None:
    """Codebook health from a tokenize_dataset.py folder (``codes_folder``) or from images
    (``tok`` + ``data``): share of codes used, perplexity, entropy per position, the most / least
    used codes, and ``histogram.png`` (code counts, sorted; entropy per position)."""
    import json

    if codes_folder is not None:
        data, known, size = read_codes_folder(codes_folder)
        # the codes are the data: their run's fingerprint and each codes file's size and mtime
        folder = Path(codes_folder)
        fingerprint = {**(fingerprint or {}), "codes_run": json.loads((folder / "run.json").read_text()).get(
            "fingerprint"), "codes_files": files_fingerprint(folder / "codes")}
    elif tok is not None and data is not None:
        known, size = {}, int(tok.cfg.model.codebook.size)
    else:
        raise InputError("codebook: give a tokenize_dataset.py output folder, or a tokenizer and images")
    size = codebook_size or size
    with Run(out, "codebook", data, fingerprint or {}, {"codebook_size": size}, progress=progress) as run:
        def encode(good: list[Example], images: list[Any]) -> list[dict]:
            return [{"id": ex.id, "codes": c} for ex, c in zip(good, tok.encode(images).tolist())]

        def stored(batch: Sequence[Example]) -> list[dict]:
            return [{"id": ex.id, "codes": known[ex.id]} for ex in batch]

        rows = _each_batch(run, "codebook", batch_size, stored if known else _on_images(encode))
        if rows is None:
            return None
        import torch

        ok = [r["codes"] for r in rows if "error" not in r]
        if not ok:
            raise InputError("codebook: no codes (every image failed)")
        if len({len(c) for c in ok}) > 1:
            raise InputError(f"codes must be the same number per image; found rows of {sorted({len(c) for c in ok})}")
        stats = codebook_stats(torch.tensor(ok), size, top)
        _histogram(stats, run.out / "histogram.png")
        metrics = {k: stats[k] for k in ("usage", "used", "perplexity", "entropy_bits")}
        metrics["mean_entropy_per_position_bits"] = _mean(stats["entropy_per_position_bits"])
        extra = {"codebook": {k: stats[k] for k in ("entropy_per_position_bits", "most_used", "least_used")}}
        return _finish(run, rows, metrics, "usage", extra)


def _histogram(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = stats["counts"].sort(descending=True).values.numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    used = counts[counts > 0]
    a.fill_between(range(1, len(used) + 1), used, step="post")  # one patch, not 8192 bars
    a.set_yscale("log")
    a.set_xlim(0, len(counts))
    a.set_xlabel("codes, most used first")
    a.set_ylabel("count")
    a.set_title(f"{stats['used']} of {len(counts)} codes used; perplexity {stats['perplexity']:.1f}")
    ent = stats["entropy_per_position_bits"]
    b.bar(range(len(ent)), ent)
    b.set_xlabel("position")
    b.set_ylabel("entropy (bits)")
    b.set_title("entropy of the codes at each position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- retrieval ------------------------------------------------------------------------------------

def stage1_features(model, pixel_values: torch.Tensor | None = None,
                    captions: Sequence[str] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A `seed.training.models.Stage1Model`'s contrastive features, as its ITC loss uses them:
    image: ``vision_proj`` of the last causal query, L2-normalized, float32 [B, embed_dim];
    text: ``text_proj`` of the text path's [CLS] output, L2-normalized, float32 [T, embed_dim]."""
    import torch
    import torch.nn.functional as F

    from ..training.models import run_frozen_vision

    img = txt = None
    with torch.inference_mode():
        if pixel_values is not None:
            causal = model.qformer(run_frozen_vision(model.vision, pixel_values.to(model.device)))
            img = F.normalize(model.itc.vision_proj(causal[:, -1]).float(), dim=-1).cpu()
        if captions is not None:
            ids, mask = model.tokenize(list(captions))
            text = model.qformer.qformer(query_embeds=model.text_embeddings(input_ids=ids), query_length=0,
                                         attention_mask=mask).last_hidden_state
            txt = F.normalize(model.itc.text_proj(text[:, 0]).float(), dim=-1).cpu()
    return img, txt


def retrieval(model, data: Dataset, out: str | os.PathLike, *, batch_size: int = 32, ks: Sequence[int] = (1, 5, 10),
              fingerprint: dict | None = None, progress: bool = True) -> dict | None:
    """Zero-shot image <-> text retrieval with a stage-1 model's causal Q-Former and text path
    (SEED-1 Table 1): R@1/5/10 both ways on every image and all its captions (captions cleaned
    as in training). Features are kept per item, so a killed run resumes."""
    import torch

    from ..images import preprocess_image
    from ..training.data import clean_caption

    if any(not ex.captions for ex in data.examples):
        raise InputError("retrieval needs captions for every image (JSONL or Karpathy JSON)")
    model.eval()
    size = int(model.model_cfg.image_size)
    resample = model.model_cfg.get("image_resample", "bicubic")
    settings = {"ks": list(ks), "image_size": size, "resample": resample, "caption": "clean_caption (training)"}
    with Run(out, "retrieval", data, fingerprint or {}, settings, progress=progress) as run:
        def work(good: list[Example], images: list[Any]) -> list[dict]:
            px = torch.stack([preprocess_image(im, size, resample) for im in images])
            img, txt = stage1_features(model, px, [clean_caption(c) for ex in good for c in ex.captions])
            rows, at = [], 0
            for i, ex in enumerate(good):
                n = len(ex.captions)
                rows.append({"id": ex.id, "image_feat": img[i].tolist(), "text_feats": txt[at:at + n].tolist()})
                at += n
            return rows

        rows = _each_batch(run, "retrieval", batch_size, _on_images(work))
        if rows is None:
            return None
        ok = _readable(rows, "retrieval")
        img = torch.tensor([r["image_feat"] for r in ok])
        txt = torch.tensor([t for r in ok for t in r["text_feats"]])
        owner = [i for i, r in enumerate(ok) for _ in r["text_feats"]]
        sim = img @ txt.T
        metrics = recall_at_k(sim, owner, ks)
        # per item: rank (0 = first; ties count against it) of its best caption, and of the image for each caption
        i2t_rank, t2i_rank = retrieval_ranks(sim, owner)
        items = []
        for i, r in enumerate(ok):
            t2i = [int(t2i_rank[j]) for j, o in enumerate(owner) if o == i]
            items.append({"id": r["id"], "i2t_rank": int(i2t_rank[i]), "t2i_ranks": t2i})
        items += [r for r in rows if "error" in r]
        return _finish(run, rows, metrics, "mean_recall", {"images": len(ok), "texts": len(owner)}, items)


# --- SEED-LLaMA: text-to-image --------------------------------------------------------------------

def _llama_settings(pipe, template: str | None, generation: Mapping[str, Any], **more: Any) -> dict:
    return {"template": template or pipe.template, "generation": dict(generation), **more}


def text_to_image(pipe, data: Dataset, out: str | os.PathLike, *, clip: Clip | None = None,
                  fid_features: torch.nn.Module | None = None, is_logits: torch.nn.Module | None = None,
                  batch_size: int = 8, template: str | None = "raw", generation: Mapping[str, Any] | None = None,
                  decode: Mapping[str, Any] | None = None, negative: bool = True, seed: int = 42,
                  fingerprint: dict | None = None, progress: bool = True) -> dict | None:
    """SEED-LLaMA text-to-image on captions: CLIP-T (generated image vs its caption), CLIP-I
    (vs the reference image, when the data has one), FID / IS vs the references.

    Defaults are the original ``eval_caption_to_images.py``'s: prompt bos + caption + ``<img>``
    (``template="raw"``, ``force_image``), beam search 4, 120 new tokens, unCLIP 20 steps,
    guidance 5 and a negative image: the codes the LM writes from bos + ``<img>`` alone, computed
    once and kept in ``OUT/negative.json`` (so a resumed run uses the same). Each image's noise
    is seeded with ``seed`` (the original drew one fixed latent for all), so an item's image does
    not depend on the batch or on resuming. A caption's first one is the prompt.
    """
    import json

    import torch

    generation = generation_settings(T2I_GENERATION, generation)
    decode = decode_settings(T2I_DECODE, decode)
    settings = _llama_settings(pipe, template, generation, decode=decode, negative=negative, seed=seed,
                               force_image=True, metric_weights=metric_weights(clip, fid_features, is_logits))
    with Run(out, "t2i", data, fingerprint or {}, settings, progress=progress) as run:
        neg_file = run.out / "negative.json"
        if negative:
            if neg_file.is_file():
                neg = torch.tensor(json.loads(neg_file.read_text())["codes"])
            else:
                reply = pipe.generate([""], force_image=True, template=template, decode_images=False, seed=seed,
                                      **generation)[0]
                if not reply.codes:
                    raise InputError(f"the LM wrote no image for the negative prompt: {reply.errors}")
                neg = reply.codes[0]
                if run.main:
                    _write_json_atomic(neg_file, {"codes": neg.tolist()})
            decode["negative_codes"] = neg

        def work(batch: Sequence[Example]) -> list[dict]:
            replies = pipe.generate([ex.captions[0] for ex in batch], force_image=True, template=template,
                                    decode=decode, seed=seed, **generation)
            rows, made = [], []
            for ex, reply in zip(batch, replies):
                if not reply.images:
                    rows.append({"id": ex.id, "error": f"no image generated ({'; '.join(reply.errors)})"})
                    continue
                p = run.image_path(ex.id)
                reply.images[0].save(p)
                made.append((ex, reply, p))
            if clip is not None and made:
                gen = clip.image_features([r.images[0] for _, r, _ in made])
                txt = clip.text_features([ex.captions[0] for ex, _, _ in made])
                clip_t = (gen * txt).sum(-1).tolist()
            for n, (ex, reply, p) in enumerate(made):
                row = {"id": ex.id, "caption": ex.captions[0], "images": [_relative(run, p)],
                       "codes": reply.codes[0].tolist()}
                reference = None
                if ex.image is not None and (clip is not None or fid_features is not None):  # CLIP-I, FID
                    try:
                        reference = ex.open()
                    except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
                        row["reference_error"] = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
                        logger.warning("%s: the reference image cannot be read (%s); not in CLIP-I / FID",
                                       ex.id, row["reference_error"])
                if clip is not None:
                    row["clip_t"] = clip_t[n]
                    if reference is not None:
                        row["clip_i"] = float(clip.image_features([reference])[0] @ gen[n])
                rows.append(row)
            return rows

        rows = _each_batch(run, "t2i", batch_size, work)
        if rows is None:
            return None
        ok = [r for r in rows if "error" not in r]
        metrics: dict[str, Any] = {}
        if clip is not None:
            metrics["clip_t"] = _mean([r.get("clip_t") for r in ok])
            if any("clip_i" in r for r in ok):
                metrics["clip_i"] = _mean([r.get("clip_i") for r in ok])
        by_id = {ex.id: ex for ex in data.examples}
        real = [by_id[r["id"]] for r in ok if by_id[r["id"]].image is not None and "reference_error" not in r]
        metrics.update(_set_scores(run, ok, real, fid_features if real else None, is_logits, lambda ex: ex.open()))
        headline = "clip_i" if "clip_i" in metrics else ("clip_t" if "clip_t" in metrics else next(iter(metrics), "n"))
        extra = {"prompt": "bos + caption + <img>" if (template or pipe.template) == "raw" else "template",
                 "n_reference_errors": sum("reference_error" in r for r in ok),
                 "n_per_metric": {"clip_t": sum("clip_t" in r for r in ok), "clip_i": sum("clip_i" in r for r in ok),
                                  "FID_real": len(real) if "FID" in metrics else 0,
                                  "FID_generated": len(ok) if "FID" in metrics else 0}}
        return _finish(run, rows, metrics, headline, extra)


# --- SEED-LLaMA: VQA and captions -----------------------------------------------------------------

def _answer(reply) -> str:
    text = reply.text.strip()
    return text.splitlines()[0].strip() if text else ""


def check_vqa_prompt(prompt: str) -> None:
    """`InputError` unless ``prompt.format(question=...)`` works (``{q}`` or a stray brace do not)."""
    try:
        prompt.format(question="?")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise InputError(f"prompt {prompt!r}: {type(e).__name__}: {e}; it may use only {{question}} "
                         f"(write {{{{ and }}}} for literal braces)") from None


def vqa(pipe, data: Dataset, out: str | os.PathLike, *, batch_size: int = 8, template: str | None = None,
        prompt: str = VQA_PROMPT, generation: Mapping[str, Any] | None = None, seed: int = 0,
        fingerprint: dict | None = None, progress: bool = True) -> dict | None:
    """SEED-LLaMA answers VQAv2-style questions: the VQA accuracy (official normalization, 10
    human answers) and exact match (normalized answer == the most common normalized human answer).
    The prompt is the image, then ``prompt.format(question=...)``; the answer is the reply's first line."""
    generation = generation_settings(VQA_GENERATION, generation)
    check_vqa_prompt(prompt)
    settings = _llama_settings(pipe, template, generation, prompt=prompt, seed=seed)
    with Run(out, "vqa", data, fingerprint or {}, settings, progress=progress) as run:
        def work(good: list[Example], images: list[Any]) -> list[dict]:
            replies = pipe.generate([[im, prompt.format(question=ex.question)] for ex, im in zip(good, images)],
                                    template=template, decode_images=False, seed=seed, **generation)
            rows = []
            for ex, reply in zip(good, replies):
                answer = _answer(reply)
                row: dict[str, Any] = {"id": ex.id, "question": ex.question, "answer": answer}
                if ex.answers:
                    norm = [normalize_answer(a) for a in ex.answers]
                    common = max(sorted(set(norm)), key=norm.count)
                    row.update(accuracy=vqa_accuracy(answer, ex.answers),
                               exact_match=float(normalize_answer(answer) == common))
                rows.append(row)
            return rows

        rows = _each_batch(run, "vqa", batch_size, _on_images(work))
        if rows is None:
            return None
        metrics = {"vqa_accuracy": _mean([r.get("accuracy") for r in rows]),
                   "exact_match": _mean([r.get("exact_match") for r in rows])}
        scored = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
        extra = {"vqa_official_overall": vqa_overall(scored) if scored else None,
                 "vqa_evaluation": "GT-Vision-Lab/VQA vqaEval.py before 'Fixed processing answers bug' (2021)"}
        return _finish(run, rows, metrics, "vqa_accuracy", extra)


def caption(pipe, data: Dataset, out: str | os.PathLike, *, batch_size: int = 8, template: str | None = None,
            prompt: str = CAPTION_PROMPT, generation: Mapping[str, Any] | None = None, seed: int = 0,
            fingerprint: dict | None = None, progress: bool = True) -> dict | None:
    """SEED-LLaMA captions images (the image, then ``prompt``); CIDEr-D and BLEU-4 against the
    references (pycocoevalcap, PTB tokenization: needs Java)."""
    from .metrics import java_available

    if not java_available():  # fail before generating, not after
        raise InputError("the caption task scores with pycocoevalcap, whose PTB tokenizer needs Java; install a JRE")
    if any(not ex.captions for ex in data.examples):
        raise InputError("caption needs reference captions for every image (JSONL or Karpathy JSON)")
    generation = generation_settings(CAPTION_GENERATION, generation)
    settings = _llama_settings(pipe, template, generation, prompt=prompt, seed=seed)
    with Run(out, "caption", data, fingerprint or {}, settings, progress=progress) as run:
        def work(good: list[Example], images: list[Any]) -> list[dict]:
            replies = pipe.generate([[im, prompt] for im in images], template=template, decode_images=False,
                                    seed=seed, **generation)
            return [{"id": ex.id, "caption": _answer(r)} for ex, r in zip(good, replies)]

        rows = _each_batch(run, "caption", batch_size, _on_images(work))
        if rows is None:
            return None
        ok = _readable(rows, "caption")
        by_id = {ex.id: ex for ex in data.examples}
        scores = caption_scores({r["id"]: r["caption"] for r in ok},
                                {r["id"]: list(by_id[r["id"]].captions) for r in ok})
        items = [{**r, **scores["per_item"].get(r["id"], {})} for r in rows]
        metrics = {k: v for k, v in scores.items() if k != "per_item"}
        return _finish(run, rows, metrics, "CIDEr", items=items)
