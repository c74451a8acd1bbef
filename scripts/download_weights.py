"""Fetch the weights that can be fetched, and say which ones must be fetched by hand.

    python scripts/download_weights.py [--dest pretrained]

Fetches Stable Diffusion v1.4 in diffusers format (fp32 safetensors; the UNet, VAE, text
encoder, tokenizer and scheduler only) through huggingface_hub, and BLIP-2's EVA ViT-g file
from its public URL. Files already in --dest are skipped. The two SEED-1 files are only on the
authors' Google Drive: the script prints where to get them and where to put them. Exits 1 if a
download failed (no network, HF_HUB_OFFLINE=1, ...), after trying every file.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from huggingface_hub import snapshot_download
from tqdm import tqdm

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
EVA_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
EVA_FILE = "eva_vit_g.pth"
from seed.checkpoint import SEED1_WEIGHTS_URL as SEED1_DRIVE
BY_HAND = {
    "causal_qformer.pth": "the SEED-1 causal Q-Former (with ln_vision and the 32 query tokens)",
    "seed_tokenizer.pth": "the SEED-1 codebook, projections and Reverse Q-Former",
}


def fetch_sd(dest: Path, timeout: float) -> str | None:
    """Download the missing SD v1.4 files into dest/stable-diffusion-v1-4; an error message or None."""
    folder = dest / SD_DIR
    missing = [f for f in SD_FILES if not (folder / f).is_file()]
    if not missing:
        print(f"[skip] {folder}: already there")
        return None
    print(f"[get ] {SD_REPO} -> {folder} ({len(missing)} files, about 4 GB in all)")
    try:
        snapshot_download(SD_REPO, local_dir=folder, allow_patterns=missing, etag_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure is reported, the other downloads still run
        return f"{SD_REPO}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    still = [f for f in missing if not (folder / f).is_file()]
    return f"{SD_REPO}: not downloaded: {', '.join(still)}" if still else None


def fetch_url(url: str, path: Path, timeout: float) -> str | None:
    """Download url to path (through path.part, with a progress bar); an error message or None."""
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
    ap.add_argument("--dest", default="pretrained", help="folder for the weights (default: pretrained)")
    ap.add_argument("--eva-url", default=EVA_URL, help="where to get eva_vit_g.pth")
    ap.add_argument("--timeout", type=float, default=10.0, help="network timeout in seconds")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)

    errors = [e for e in (fetch_sd(dest, args.timeout), fetch_url(args.eva_url, dest / EVA_FILE, args.timeout)) if e]

    todo = {name: what for name, what in BY_HAND.items() if not (dest / name).is_file()}
    if todo:
        print(f"\nTo fetch by hand (the SEED-1 release is only on the authors' Google Drive, {SEED1_DRIVE},\n"
              f"linked from https://github.com/AILab-CVC/SEED/blob/main/SEED-1.md; the Hugging Face repo\n"
              f"AILab-CVC/SEED holds the different SEED-2 tokenizer):")
        for name, what in todo.items():
            print(f"  {name:20s} {what}\n  {'':20s} -> put it at {dest / name}")
    else:
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
