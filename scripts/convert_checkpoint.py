"""Convert the original SEED-1 or SEED-2 files into a `save_pretrained` folder, and check it.

    python scripts/convert_checkpoint.py --config configs/seed_tokenizer.yaml --out pretrained/seed-tokenizer-1
    python scripts/convert_checkpoint.py --config configs/seed2_tokenizer.yaml --out pretrained/seed-tokenizer-2

Loads the files named in the config's ``checkpoints`` section (SEED-1: vision, qformer,
codebook; SEED-2: vision, quantizer), writes ``config.yaml`` + ``model.safetensors`` into
``--out``, re-loads that folder with `Tokenizer.from_pretrained` and checks both give the same
codes and embeddings on a batch of random images. Exits 1 if anything fails or differs.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/seed_tokenizer.yaml", help="config naming the original files")
    ap.add_argument("--out", required=True, help="folder to write (created)")
    ap.add_argument("--device", default="cpu", help="device for the check (default cpu)")
    ap.add_argument("--batch-size", type=int, default=4, help="random images in the check")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)

    import torch  # heavy imports after parsing: --help stays fast

    import seed
    from seed.decoder import head_of
    from seed.images import CLIP_MEAN, CLIP_STD
    from seed.tokenizer import CHECKPOINT_FILES

    try:
        cfg = seed.load_config(args.config, *args.overrides)
        needed = CHECKPOINT_FILES[head_of(cfg.model)]
    except seed.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    missing = [k for k in needed if not (cfg.get("checkpoints") or {}).get(k)]
    if missing:
        print(f"error: checkpoints.{', checkpoints.'.join(missing)} not set in {args.config}: nothing to convert",
              file=sys.stderr)
        return 1
    try:
        original = seed.Tokenizer.from_config(cfg, device=args.device, dtype=torch.float32)
        out = original.save_pretrained(args.out)
        converted = seed.Tokenizer.from_pretrained(out, device=args.device, dtype=torch.float32)
    except (seed.CheckpointError, seed.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'config.yaml'} and {out / 'model.safetensors'}")

    s = original.image_size
    rgb = torch.rand(args.batch_size, 3, s, s, generator=torch.Generator().manual_seed(0))  # images in [0, 1]
    pixels = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    codes_a, codes_b = original.encode(pixels), converted.encode(pixels)
    causal = (original.causal_embeddings(pixels) - converted.causal_embeddings(pixels)).abs().max().item()
    gen = (original.embed(codes_a) - converted.embed(codes_a)).abs().max().item()
    same = torch.equal(codes_a, codes_b)
    print(f"check on {args.batch_size} random images: codes {'identical' if same else 'DIFFER'}, "
          f"max |diff| causal embeddings {causal:.2e}, generation embeddings {gen:.2e}")
    if not same or causal > 1e-5 or gen > 1e-5:
        print("error: the converted folder does not reproduce the original files", file=sys.stderr)
        return 1
    print(f"OK: load it with seed.Tokenizer.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
