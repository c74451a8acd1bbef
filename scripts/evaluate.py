"""Measure SEED tokenizers and SEED-LLaMA the way the papers do.

    python scripts/evaluate.py TASK --out DIR [options] [key=value config overrides]

Tasks:
  reconstruction  images -> codes -> images: CLIP-I (input vs reconstruction), PSNR / SSIM, FID / IS, grid.png
  codebook        codes of a dataset (a tokenize_dataset.py folder, or images): usage, perplexity, entropy
  retrieval       zero-shot image <-> text retrieval of a stage-1 model, R@1/5/10 both ways (SEED-1 Table 1)
  t2i             SEED-LLaMA text-to-image: CLIP-T, CLIP-I vs the reference image, FID / IS
  vqa             SEED-LLaMA on VQAv2-style questions: VQA accuracy (official normalization), exact match
  caption         SEED-LLaMA captions: CIDEr and BLEU-4 (pycocoevalcap; needs Java)

Each run writes OUT/report.json (metric, value, n, dataset, model fingerprint, settings, library
versions), OUT/items.jsonl (per item) and prints a table. A run stopped for any reason resumes
when the same command is run again: finished items are never recomputed. Under torchrun the items
are shared between the processes (OUT on a filesystem they all see). CLIP and Inception weights
are read locally (scripts/download_weights.py --model clip inception); --allow-download lets
transformers fetch CLIP. Exit status: 0, 1 if items (or t2i reference images) failed (reported,
skipped; a rerun tries failed items again), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLIP = ROOT / "pretrained" / "clip-vit-large-patch14"
DEFAULT_CLIP = str(LOCAL_CLIP) if LOCAL_CLIP.is_dir() else "openai/clip-vit-large-patch14"
"""CLIP ViT-L/14: the folder `download_weights.py --model clip` writes, else the Hub id (local cache)."""
DEFAULT_INCEPTION = ROOT / "pretrained" / "weights-inception-2015-12-05-6726825d.pth"


def _kv(values: list[str] | None, flag: str) -> dict:
    """["steps=20", "guidance_scale=5"] -> {"steps": 20, "guidance_scale": 5.0} (YAML scalars)."""
    import yaml

    from seed import InputError

    out = {}
    for v in values or []:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise InputError(f"{flag} takes key=value, got {v!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise InputError(f"{flag} {v!r}: not a YAML value ({e})") from None
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    sub = ap.add_subparsers(dest="task", required=True, metavar="TASK")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder (resumed if it holds a run of the same command)")
        p.add_argument("--batch-size", type=_positive, default=None)
        p.add_argument("--device", default=None, help="default: this process's GPU if any, else the CPU")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def clip_args(p: argparse.ArgumentParser, inception: bool = True) -> None:
        p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP model (folder or Hub id); 'none' to skip CLIP scores")
        p.add_argument("--allow-download", action="store_true", help="let transformers download the CLIP model")
        if inception:
            p.add_argument("--inception", default=None,
                           help=f"torch-fidelity InceptionV3 weights for FID / IS (default {DEFAULT_INCEPTION} "
                                "if present); 'none' to skip FID / IS")

    def llama_args(p: argparse.ArgumentParser, template: str | None) -> None:
        p.add_argument("--llm", required=True, help="SEED-LLaMA: Hub id (AILab-CVC/seed-llama-8b-sft), folder, or "
                                                    "'tiny' (random, for smoke runs)")
        p.add_argument("--tokenizer", default=None, help="its text tokenizer (default: as SeedLlama.from_pretrained)")
        p.add_argument("--image-tokenizer", default=None,
                       help="SEED-2 tokenizer: config name / YAML, or a save_pretrained folder (default "
                            "seed2_tokenizer; seed2_tiny for --llm tiny)")
        p.add_argument("--template", default=template,
                       help=f"prompt template (default: {template or 'the pipeline default'})")
        p.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"), help="LM dtype")
        p.add_argument("--load-in-8bit", action="store_true")
        p.add_argument("--generation", nargs="*", metavar="KEY=VALUE", help="model.generate settings (over the task's)")
        p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("reconstruction", help="tokenizer: CLIP-I, PSNR, SSIM, FID, IS of reconstructions")
    common(p)
    clip_args(p)
    p.add_argument("--config", default="configs/seed_tokenizer.yaml", help="tokenizer config (name / YAML) or folder")
    p.add_argument("--images", required=True, help="images: folder / .tar / list file, JSONL or Karpathy JSON")
    p.add_argument("--image-root", default=None, help="folder the data file's image paths are relative to")
    p.add_argument("--grid-rows", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. diffusion.steps=25 diffusion.num_samples=1 "
                                                "(a config name / YAML only, not a folder)")

    p = sub.add_parser("codebook", help="tokenizer: codebook usage, perplexity, entropy per position")
    common(p)
    p.add_argument("--codes", default=None, help="a tokenize_dataset.py output folder")
    p.add_argument("--config", default=None, help="or: tokenizer config / folder, with --images")
    p.add_argument("--images", default=None)
    p.add_argument("--image-root", default=None)
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("retrieval", help="stage-1 model: image <-> text R@1/5/10")
    common(p)
    p.add_argument("--train-config", required=True,
                   help="the stage-1 training config (configs/train/seed1_stage1.yaml)")
    p.add_argument("--checkpoint", default=None,
                   help="stage-1 weights: a checkpoint folder / model.safetensors of train_tokenizer.py, or a "
                        "BLIP-2-layout .pth (default: the config's init.qformer)")
    p.add_argument("--data", required=True, help="JSONL of {image, caption(s)} or a Karpathy split JSON")
    p.add_argument("--split", default="test", help="Karpathy split (default test)")
    p.add_argument("--image-root", default=None)
    p.add_argument("overrides", nargs="*", help="training config overrides")

    p = sub.add_parser("t2i", help="SEED-LLaMA text-to-image: CLIP-T, CLIP-I, FID, IS")
    common(p)
    clip_args(p)
    llama_args(p, "raw")
    p.add_argument("--captions", required=True, help="a text file (one caption a line), JSONL {caption, image?} "
                                                     "or a Karpathy split JSON (first caption of each test image)")
    p.add_argument("--image-root", default=None, help="folder the reference images' paths are relative to")
    p.add_argument("--split", default="test", help="Karpathy split (default test)")
    p.add_argument("--decode", nargs="*", metavar="KEY=VALUE", help="unCLIP decode settings (steps, guidance_scale...)")
    p.add_argument("--no-negative", action="store_true", help="no negative image (the original uses one)")

    p = sub.add_parser("vqa", help="SEED-LLaMA VQA accuracy")
    common(p)
    llama_args(p, None)
    p.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    p.add_argument("--annotations", default=None, help="VQAv2 annotations JSON (without it: answers only)")
    p.add_argument("--image-root", required=True, help="the images folder (e.g. val2014/)")
    p.add_argument("--image-pattern", default="COCO_val2014_{image_id:012d}.jpg")
    p.add_argument("--prompt", default=None, help="after the image; {question} is replaced (default: the original's)")

    p = sub.add_parser("caption", help="SEED-LLaMA captioning: CIDEr, BLEU-4")
    common(p)
    llama_args(p, None)
    p.add_argument("--data", required=True, help="JSONL of {image, captions} or a Karpathy split JSON")
    p.add_argument("--split", default="test")
    p.add_argument("--image-root", default=None)
    p.add_argument("--prompt", default=None)
    return ap


# --- models ---------------------------------------------------------------------------------------

def device_for_rank(name: str | None):
    import torch

    from seed.device import default_device

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(d)
        return d
    return default_device()


def load_tokenizer(spec: str, overrides: list[str], device):
    """A seed.Tokenizer and its fingerprint: a save_pretrained folder, or a config (+ overrides,
    validated by `seed.load_config`; with a folder they are an `InputError`, as `seed.Tokenizer.load`)."""
    import seed
    from seed.dataset import file_identity, model_fingerprint

    p = Path(spec)
    if p.is_dir():
        if overrides:
            raise seed.InputError(f"key=value overrides apply to a config name or YAML file, not to the folder "
                                  f"{spec!r} ({' '.join(overrides)}): save the tokenizer with the settings you want")
        tok = seed.Tokenizer.from_pretrained(p, device=device)
        return tok, {"folder": str(p), "weights": file_identity(p / "model.safetensors") if
                     (p / "model.safetensors").is_file() else None}
    cfg = seed.load_config(spec, *overrides)
    tok = seed.Tokenizer.from_config(cfg, device=device)
    return tok, model_fingerprint(cfg, tok.precision)


def load_clip(args, device):
    from seed.evaluation.metrics import Clip

    return None if args.clip.lower() == "none" else Clip(args.clip, device, args.allow_download)


def load_inception(args):
    from seed.evaluation.metrics import inception_modules

    if args.inception is not None and args.inception.lower() == "none":
        return None, None
    path = Path(args.inception) if args.inception else DEFAULT_INCEPTION
    if args.inception is None and not path.is_file():
        print(f"note: no Inception weights at {path}: FID / IS skipped "
              f"(scripts/download_weights.py --model inception fetches them)", file=sys.stderr)
        return None, None
    return inception_modules(path)


def image_tokenizer_spec(args) -> str:
    """The image tokenizer the pipeline will use: --image-tokenizer (checked against the export's
    record, `seed.provenance`), else the one an LLM export records, else SeedLlama's default.
    An export whose record names no tokenizer needs --image-tokenizer (`InputError`)."""
    from seed.provenance import export_image_tokenizer, no_tokenizer_message, read_export_record

    record = read_export_record(args.llm) if args.llm and args.llm != "tiny" and Path(args.llm).is_dir() else None
    if record is not None:
        spec = export_image_tokenizer(args.llm, record, args.image_tokenizer)
        if spec is None:
            from seed import InputError

            raise InputError(no_tokenizer_message(args.llm, record))
        return str(spec)
    return args.image_tokenizer or ("seed2_tiny" if args.llm == "tiny" else "seed2_tokenizer")


def image_tokenizer_fingerprint(spec: str, decode: bool = False) -> dict:
    """What identifies the image tokenizer ``spec`` names, as `Tokenizer.load` reads it: a config
    (name / YAML) or a save_pretrained folder by `seed.dataset.model_fingerprint` (its ``model``
    section, each weight file's size and sha256, the vision dtype), as tokenize_dataset.py does;
    ``decode`` (t2i): also the config's ``diffusion`` section (what draws the images); a Hub id by
    its cached snapshot's files. A config whose weight file is missing is an `InputError` here,
    before anything loads."""
    from omegaconf import OmegaConf

    import seed
    from seed.config import resolve_path
    from seed.dataset import model_fingerprint
    from seed.device import default_device, default_dtype
    from seed.evaluation.runner import files_fingerprint

    dtype = str(default_dtype(default_device())).replace("torch.", "")
    path = resolve_path(spec)
    if not path.is_dir() and (path.suffix in (".yaml", ".yml") or "/" not in spec):
        cfg = seed.load_config(spec)
        fp = {"config": spec, **model_fingerprint(cfg, dtype)}
    elif path.is_dir():
        from seed.hub import read_config

        cfg = read_config(path)
        fp = {"folder": str(path), **model_fingerprint(cfg, dtype, saved_folder=path)}
    else:
        return {"hub": spec, "files": files_fingerprint(_local(spec))}
    if decode and "diffusion" in cfg:
        fp["diffusion"] = OmegaConf.to_container(cfg.diffusion, resolve=True)
    return fp


def load_llama(args, image_tokenizer_fp: dict | None = None):
    """SeedLlama and its fingerprint: each file of the LM folder (size, mtime, safetensors header
    hash: hashing 16 GB is too slow; for a Hub id, its cached snapshot's) and the image tokenizer's
    (`image_tokenizer_fingerprint`, computed before the LM loads)."""
    import torch

    from seed.evaluation.runner import files_fingerprint
    from seed.llama import SeedLlama

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    pipe = SeedLlama.from_pretrained(args.llm, tokenizer=args.tokenizer, image_tokenizer=args.image_tokenizer,
                                     torch_dtype=dtype, load_in_8bit=args.load_in_8bit,
                                     **({"template": args.template} if args.template else {}))
    return pipe, {"llm": str(args.llm), "llm_files": files_fingerprint(_local(args.llm)), "tokenizer": args.tokenizer,
                  "dtype": args.dtype, "load_in_8bit": args.load_in_8bit, "vocab": len(pipe.tokenizer),
                  "image_tokenizer": image_tokenizer_fp if image_tokenizer_fp is not None else
                  image_tokenizer_fingerprint(image_tokenizer_spec(args))}


def _local(spec: str) -> Path:
    """A model's folder: ``spec`` itself, or a Hub id's cached snapshot (its name is the commit)."""
    if Path(spec).is_dir() or spec.count("/") != 1:
        return Path(spec)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a repo id): the name alone identifies it
        return Path(spec)


# --- main -----------------------------------------------------------------------------------------

def run(args) -> dict | None:
    import seed
    from seed.evaluation import data as D
    from seed.evaluation import tasks

    device = device_for_rank(args.device)
    progress = not args.no_progress
    out = args.out
    if args.task == "reconstruction":
        dataset = D.load_examples(args.images, args.image_root)
        fid, is_ = load_inception(args)  # metric networks first: a missing one stops before the tokenizer loads
        clip = load_clip(args, device)
        tok, fp = load_tokenizer(args.config, args.overrides, device)
        return tasks.reconstruction(tok, dataset, out, clip=clip, fid_features=fid, is_logits=is_,
                                    batch_size=args.batch_size or 4, grid_rows=args.grid_rows, fingerprint=fp,
                                    progress=progress)
    if args.task == "codebook":
        if args.codes:
            if args.overrides:
                raise seed.InputError(f"codebook --codes takes no config overrides ({' '.join(args.overrides)})")
            return tasks.codebook(out, codes_folder=args.codes, batch_size=args.batch_size or 1024,
                                  fingerprint={"codes": str(args.codes)}, progress=progress)
        if not (args.config and args.images):
            raise seed.InputError("codebook needs --codes FOLDER, or --config and --images")
        dataset = D.load_examples(args.images, args.image_root)
        tok, fp = load_tokenizer(args.config, args.overrides, device)
        return tasks.codebook(out, tok=tok, data=dataset, batch_size=args.batch_size or 32, fingerprint=fp,
                              progress=progress)
    if args.task == "retrieval":
        from seed.dataset import file_identity
        from seed.training.config import load_train_config
        from seed.training.models import build_model, weights_file

        overrides = list(args.overrides) + ([f"init.qformer={args.checkpoint}"] if args.checkpoint else [])
        cfg = load_train_config(args.train_config, *overrides)
        if int(cfg.stage) != 1:
            raise seed.InputError(f"{args.train_config}: retrieval needs a stage-1 training config (stage: 1), "
                                  f"not stage {cfg.stage}")
        dataset = D.load_examples(args.data, args.image_root, args.split, need_captions=True)
        model = build_model(cfg, device)
        from omegaconf import OmegaConf

        fp = {"model": OmegaConf.to_container(cfg.model, resolve=True), "itc": OmegaConf.to_container(cfg.itc),
              "weights": {k: (file_identity(weights_file(v)) if v and weights_file(v).is_file() else v)
                          for k, v in (("vision", cfg.init.vision), ("qformer", cfg.init.qformer))}}
        return tasks.retrieval(model, dataset, out, batch_size=args.batch_size or 32, fingerprint=fp, progress=progress)

    # settings and data first: a typo is an error before the LLM loads
    defaults = {"t2i": tasks.T2I_GENERATION, "vqa": tasks.VQA_GENERATION, "caption": tasks.CAPTION_GENERATION}
    generation = _kv(args.generation, "--generation")
    tasks.generation_settings(defaults[args.task], generation)
    seed_kw = {"seed": args.seed} if args.seed is not None else {}
    prompt = {"prompt": args.prompt} if getattr(args, "prompt", None) else {}
    template = args.template
    if args.task == "t2i":
        decode = tasks.decode_settings(tasks.T2I_DECODE, _kv(args.decode, "--decode"))
        dataset = D.load_captions(args.captions, args.image_root, args.split)
        fid, is_ = load_inception(args)
        clip = load_clip(args, device)
        itok = image_tokenizer_fingerprint(image_tokenizer_spec(args), decode=True)
        pipe, fp = load_llama(args, itok)
        return tasks.text_to_image(pipe, dataset, out, clip=clip, fid_features=fid, is_logits=is_,
                                   batch_size=args.batch_size or 8, template=template, generation=generation,
                                   decode=decode, negative=not args.no_negative, fingerprint=fp, progress=progress,
                                   **seed_kw)
    if args.task == "vqa":
        tasks.check_vqa_prompt(args.prompt or tasks.VQA_PROMPT)
        dataset = D.load_vqa(args.questions, args.annotations, args.image_root, args.image_pattern)
        pipe, fp = load_llama(args, image_tokenizer_fingerprint(image_tokenizer_spec(args)))
        return tasks.vqa(pipe, dataset, out, batch_size=args.batch_size or 8, template=template,
                         generation=generation, fingerprint=fp, progress=progress, **prompt, **seed_kw)
    dataset = D.load_examples(args.data, args.image_root, args.split, need_captions=True)
    pipe, fp = load_llama(args, image_tokenizer_fingerprint(image_tokenizer_spec(args)))
    return tasks.caption(pipe, dataset, out, batch_size=args.batch_size or 8, template=template, generation=generation,
                         fingerprint=fp, progress=progress, **prompt, **seed_kw)

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    import seed

    try:
        report = run(args)
    except (seed.InputError, seed.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished item is saved; run the same command again to resume", file=sys.stderr)
        return 130
    if report is None:  # not rank 0
        return 0
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'items.jsonl'}")
    if report["n_errors"]:
        import json

        failed = [row for row in map(json.loads, (Path(args.out) / "items.jsonl").read_text().splitlines())
                  if "error" in row]
        print(f"{len(failed)} item(s) failed and were skipped:", file=sys.stderr)
        for row in failed[:20]:
            print(f"  {row['error']}", file=sys.stderr)
    if report["n_bad_rows"]:
        print(f"{report['n_bad_rows']} malformed row(s) in the data were skipped (see the log)", file=sys.stderr)
    if report.get("n_reference_errors"):
        print(f"{report['n_reference_errors']} reference image(s) could not be read: not in CLIP-I / FID "
              f"(see the log and 'reference_error' in items.jsonl)", file=sys.stderr)
    return 1 if report["n_errors"] or report["n_bad_rows"] or report.get("n_reference_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
