"""Fetch the weights that can be fetched, and say which ones must be fetched by hand.

    python scripts/download_weights.py [--model seed1 seed2 clip inception | all] [--dest pretrained]

SEED-1 (default): Stable Diffusion v1.4 in diffusers format (fp32 safetensors; the UNet, VAE,
text encoder, tokenizer and scheduler only) through huggingface_hub, and BLIP-2's EVA ViT-g file
from its public URL; the two SEED-1 files are only on the authors' Google Drive: the script
prints where to get them and where to put them.
SEED-2: the EVA ViT-g file, ``seed_quantizer.pt`` from the Hub repo AILab-CVC/seed-tokenizer-2,
and Stable Diffusion 2.1 unCLIP in diffusers format (without its CLIP image encoder, which
decoding SEED-2 codes does not use).
For evaluation (scripts/evaluate.py): ``clip``, OpenAI CLIP ViT-L/14 (transformers format, the CLIP
of the CLIP-I / CLIP-T scores), and ``inception``, torch-fidelity's InceptionV3 weights (the TF FID
network) for FID and Inception Score.
Files already in --dest are skipped. Exits 1 if a download failed (no network,
HF_HUB_OFFLINE=1, ...), after trying every file.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

SD_REPO = "CompVis/stable-diffusion-v1-4"
SD_DIR = "stable-diffusion-v1-4"
SD_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",  # 0.5 kB, named in model_index.json
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
UNCLIP_DIR = "stable-diffusion-2-1-unclip"
UNCLIP_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "image_noising_scheduler/scheduler_config.json",
    "image_normalizer/config.json", "image_normalizer/diffusion_pytorch_model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
"""SD 2.1 unCLIP without ``image_encoder``/``feature_extractor`` (seed passes the image embedding itself)."""
SEED2_REPO = "AILab-CVC/seed-tokenizer-2"
SEED2_FILE = "seed_quantizer.pt"
EVA_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
EVA_FILE = "eva_vit_g.pth"
SEED1_DRIVE = "https://drive.google.com/drive/folders/1xmVXuttQfBPBOe4ZR96Wu1X34uzPkxsS"
"""= seed.checkpoint.SEED1_WEIGHTS_URL (not imported: --help must not import torch)."""
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_DIR = "clip-vit-large-patch14"
CLIP_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt"]
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""= seed.evaluation.metrics.INCEPTION_FILE (not imported: --help must not import torch)."""
MODELS = ("seed1", "seed2", "clip", "inception")
BY_HAND = {
    "causal_qformer.pth": "the SEED-1 causal Q-Former (with ln_vision and the 32 query tokens)",
    "seed_tokenizer.pth": "the SEED-1 codebook, projections and Reverse Q-Former",
}


def fetch_repo(repo: str, folder: Path, files: list[str], size: str, timeout: float) -> str | None:
    """Download the missing ``files`` of a Hub repo into ``folder``; an error message or None.

    A ``.safetensors`` file the repo lacks may come as its ``.bin`` twin (diffusers reads both).
    """
    from huggingface_hub import snapshot_download

    def have(f: str) -> bool:
        return (folder / f).is_file() or (f.endswith(".safetensors") and (folder / bin_twin(f)).is_file())

    missing = [f for f in files if not have(f)]
    if not missing:
        print(f"[skip] {folder}: already there")
        return None
    print(f"[get ] {repo} -> {folder} ({len(missing)} files, {size} in all)")
    try:
        snapshot_download(repo, local_dir=folder, allow_patterns=missing, etag_timeout=timeout)
        twins = [bin_twin(f) for f in missing if f.endswith(".safetensors") and not (folder / f).is_file()]
        if twins:
            snapshot_download(repo, local_dir=folder, allow_patterns=twins, etag_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure is reported, the other downloads still run
        return f"{repo}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    still = [f for f in missing if not have(f)]
    return f"{repo}: not downloaded: {', '.join(still)}" if still else None


def bin_twin(name: str) -> str:
    """``unet/diffusion_pytorch_model.safetensors`` -> ``unet/diffusion_pytorch_model.bin``
    (``model.safetensors`` -> ``pytorch_model.bin``)."""
    stem = name.removesuffix(".safetensors")
    head, _, leaf = stem.rpartition("/")
    leaf = "pytorch_model" if leaf == "model" else leaf
    return f"{head}/{leaf}.bin" if head else f"{leaf}.bin"


def fetch_hub_file(repo: str, filename: str, path: Path, size: str, timeout: float) -> str | None:
    """Download one file of a Hub repo to ``path``; an error message or None."""
    from huggingface_hub import snapshot_download

    if path.is_file():
        print(f"[skip] {path}: already there")
        return None
    print(f"[get ] {repo}/{filename} -> {path} ({size})")
    try:
        # snapshot_download rather than hf_hub_download: offline, it fails before writing anything
        snapshot_download(repo, local_dir=path.parent, allow_patterns=[filename], etag_timeout=timeout)
    except Exception as e:  # noqa: BLE001
        return f"{repo}/{filename}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return None if path.is_file() else f"{repo}/{filename}: not downloaded"


def fetch_url(url: str, path: Path, timeout: float) -> str | None:
    """Download url to path (through path.part, with a progress bar); an error message or None."""
    from tqdm import tqdm

    if path.is_file():
        print(f"[skip] {path}: already there")
        return None
    print(f"[get ] {url} -> {path}")
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "seed"}), timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=path.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            return f"{url}: got {part.stat().st_size} of {total} bytes (connection cut?); run again"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{url}: {getattr(e, 'reason', e)}"
    part.replace(path)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=(*MODELS, "all"), default=["seed1"],
                    help="what to fetch (default seed1; seed2 = SEED-LLaMA's tokenizer; clip and inception: "
                         "the evaluation networks; all = every one)")
    ap.add_argument("--dest", default="pretrained", help="folder for the weights (default: pretrained)")
    ap.add_argument("--eva-url", default=EVA_URL, help="where to get eva_vit_g.pth")
    ap.add_argument("--inception-url", default=INCEPTION_URL, help=f"where to get {INCEPTION_FILE}")
    ap.add_argument("--timeout", type=float, default=10.0, help="network timeout in seconds")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(MODELS) if "all" in args.model else set(args.model)
    seed1, seed2 = "seed1" in wanted, "seed2" in wanted

    results = []
    if seed1:
        results.append(fetch_repo(SD_REPO, dest / SD_DIR, SD_FILES, "about 4 GB", args.timeout))
    if seed1 or seed2:
        results.append(fetch_url(args.eva_url, dest / EVA_FILE, args.timeout))
    if seed2:
        results.append(fetch_hub_file(SEED2_REPO, SEED2_FILE, dest / SEED2_FILE, "about 1.2 GB", args.timeout))
        results.append(fetch_repo(UNCLIP_REPO, dest / UNCLIP_DIR, UNCLIP_FILES, "about 5 GB", args.timeout))
    if "clip" in wanted:
        results.append(fetch_repo(CLIP_REPO, dest / CLIP_DIR, CLIP_FILES, "about 1.7 GB", args.timeout))
    if "inception" in wanted:
        results.append(fetch_url(args.inception_url, dest / INCEPTION_FILE, args.timeout))
    errors = [e for e in results if e]

    todo = {name: what for name, what in BY_HAND.items() if seed1 and not (dest / name).is_file()}
    if todo:
        print(f"\nTo fetch by hand (the SEED-1 release is only on the authors' Google Drive, {SEED1_DRIVE},\n"
              f"linked from https://github.com/AILab-CVC/SEED/blob/main/SEED-1.md; the Hugging Face repo\n"
              f"{SEED2_REPO} holds the different SEED-2 tokenizer: --model seed2):")
        for name, what in todo.items():
            print(f"  {name:20s} {what}\n  {'':20s} -> put it at {dest / name}")
    elif seed1:
        print(f"[skip] {', '.join(BY_HAND)}: already there")

    if errors:
        sys.stdout.flush()
        print("\nFAILED (no network? HF_HUB_OFFLINE=1? fix that and run again):", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    print("\nall downloadable weights are in place" + (" (the files above are still needed)" if todo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
