"""Reconstruct photos with SEED: image -> 32 codes -> Stable Diffusion -> images.

    python demo_recon.py                                      # SEED-1 + SD v1.4, weights in pretrained/
    python demo_recon.py --config configs/seed2_tokenizer.yaml   # SEED-2 + SD 2.1 unCLIP, weights in pretrained/
    python demo_recon.py --config configs/seed_tiny.yaml      # tiny random SEED-1 (seed2_tiny: SEED-2), runs anywhere
    python demo_recon.py --image my.jpg --num-samples 4 diffusion.scheduler=dpm

Prints each image's 32 codes, writes every reconstruction as a PNG and a grid (input | samples)
into --out. Config overrides go last as key=value.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image, ImageOps

import seed
from seed.checkpoint import check_weights

HERE = Path(__file__).resolve().parent


def grid(row: list[Image.Image]) -> Image.Image:
    """Images side by side, each padded to the size of the last one."""
    w, h = row[-1].size
    out = Image.new("RGB", (w * len(row), h), "white")
    for i, im in enumerate(row):
        out.paste(ImageOps.pad(im.convert("RGB"), (w, h), color="white"), (i * w, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", nargs="+", default=[str(HERE / "assets" / "chelsea.png")],
                        help="image file(s) to reconstruct (default: assets/chelsea.png)")
    parser.add_argument("--config", default=str(HERE / "configs" / "seed_tokenizer.yaml"))
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--steps", type=int, help="diffusion steps (default: diffusion.steps)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: diffusion.seed)")
    parser.add_argument("--num-samples", type=int, help="images per input (default: diffusion.num_samples)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        cfg = seed.load_config(args.config, *args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    absent = [p for p in args.image if not Path(p).is_file()]
    if absent:
        print(f"error: image file(s) not found: {', '.join(absent)}", file=sys.stderr)
        return 2
    try:
        check_weights(cfg, args.config)  # the tokenizer's files and the diffusion model, before anything loads
    except seed.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    try:
        tok = seed.Tokenizer.from_config(cfg)
        codes = tok.encode(args.image)
        for path, row in zip(args.image, codes.tolist()):
            print(f"{path}: {len(row)} codes: {' '.join(map(str, row))}")
        images = tok.decode(codes, steps=args.steps, seed=args.seed, num_samples=args.num_samples)
    except (seed.CheckpointError, seed.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    k = len(images) // len(args.image)
    for i, path in enumerate(args.image):
        stem = f"{i:02d}_{Path(path).stem}" if len(args.image) > 1 else Path(path).stem
        samples = images[i * k:(i + 1) * k]
        for j, im in enumerate(samples):
            im.save(out / f"{stem}_recon{j}.png")
        grid([Image.open(path)] + samples).save(out / f"{stem}_grid.png")
        print(f"{path}: wrote {k} reconstruction(s) {out / stem}_recon*.png and the grid {out / stem}_grid.png")
    print(f"outputs in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
