"""The paper's reconstruction metric: CLIP image-image cosine similarity, input vs. reconstruction.

    python scripts/eval_reconstruction.py --config configs/seed_tokenizer.yaml --images DIR [--clip MODEL]

Each image in --images is tokenized and decoded (`Tokenizer.reconstruct`); CLIP ViT-L/14
(transformers, default openai/clip-vit-large-patch14) embeds the input and its reconstruction,
and their cosine similarity is printed per image and as a mean (with several samples per image,
an image's score is the mean over its samples). Writes scores.csv, each reconstruction as PNG,
and grid.png (input | reconstructions, one row per image for the first --grid-rows images)
into --out. The CLIP model must be in the local Hugging Face cache or a local folder unless
--allow-download. Unreadable images are reported and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), after the arguments are parsed: --help answers at once
    import torch
    from PIL import Image

TILE = 256


def load_clip(name: str, allow_download: bool, device: torch.device):
    """The CLIP model and its image processor."""
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=not allow_download)
        processor = CLIPImageProcessor.from_pretrained(name, local_files_only=not allow_download)
    except OSError as e:
        hint = "" if allow_download else " (looked in the local cache only: pass --allow-download to fetch it)"
        raise SystemExit(f"error: cannot load the CLIP model {name!r}{hint}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), processor


def clip_embed(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> L2-normalized CLIP image embeddings, float32 [N, projection_dim] on the CPU."""
    import torch

    with torch.inference_mode():
        return _clip_embed(model, processor, images)


def _clip_embed(model, processor, images: list[Image.Image]) -> torch.Tensor:
    import torch

    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    return torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(),
                                         dim=-1).cpu()


def thumbnail(img: Image.Image) -> Image.Image:
    from PIL import Image

    return img.convert("RGB").resize((TILE, TILE), Image.BICUBIC)


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of TILE x TILE thumbnails -> one image."""
    from PIL import Image

    out = Image.new("RGB", (max(len(r) for r in rows) * TILE, len(rows) * TILE), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            out.paste(img, (x * TILE, y * TILE))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/seed_tokenizer.yaml")
    ap.add_argument("--images", required=True,
                    help="a folder of images (found as tokenize_dataset.py finds them: recursively, by "
                         "extension, symlinked folders and .tar shards included), a .tar shard or a list file")
    ap.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model: hub id or local folder")
    ap.add_argument("--allow-download", action="store_true", help="let transformers download the CLIP model")
    ap.add_argument("--out", default="outputs/eval_reconstruction", help="where scores.csv and grid.png go")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grid-rows", type=int, default=16, help="images shown in grid.png (the first N)")
    ap.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. diffusion.steps=25)")
    args = ap.parse_args(argv)

    import torch

    import seed
    from seed.dataset import IMAGE_EXTENSIONS, discover, read_item
    from seed.device import default_device

    try:
        items = discover(args.images)  # the listing a dataset run uses
    except seed.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not items:
        print(f"error: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {args.images}", file=sys.stderr)
        return 1
    device = torch.device(args.device) if args.device else default_device()
    clip, processor = load_clip(args.clip, args.allow_download, device)
    try:
        tok = seed.Tokenizer.from_config(seed.load_config(args.config, *args.overrides), device=device)
    except seed.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    rows: list[list[Image.Image]] = []  # the grid's first --grid-rows rows: input | reconstructions
    skipped = 0
    for start in range(0, len(items), args.batch_size):
        batch, names = [], []
        for item in items[start:start + args.batch_size]:
            try:
                batch.append(read_item(item))
                names.append(item.id)
            except seed.InputError as e:
                skipped += 1
                print(f"skipped: {e}", file=sys.stderr)
        if not batch:
            continue
        recons = tok.reconstruct(batch)
        k = len(recons) // len(batch)  # samples per input, grouped per input
        inputs, outputs = clip_embed(clip, processor, batch), clip_embed(clip, processor, recons)
        sims = (outputs.view(len(batch), k, -1) * inputs[:, None]).sum(-1).mean(1)
        for i, name in enumerate(names):
            scores[name] = sims[i].item()
            samples = recons[i * k:(i + 1) * k]
            p = Path(name.replace("/", "__"))  # ids of nested files: one flat output folder
            for j, img in enumerate(samples):
                img.save(out / f"{p.stem}{p.suffix.replace('.', '_')}_recon{j}.png")
            if len(rows) < args.grid_rows:
                rows.append([thumbnail(img) for img in (batch[i], *samples)])
            print(f"{name}\t{scores[name]:.4f}", flush=True)
    if not scores:
        print("error: no image could be read", file=sys.stderr)
        return 1

    mean = sum(scores.values()) / len(scores)
    print(f"mean CLIP image-image cosine similarity over {len(scores)} images: {mean:.4f}")
    with open(out / "scores.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "clip_similarity"), *scores.items(), ("mean", mean)])
    grid(rows).save(out / "grid.png")
    print(f"wrote {out / 'scores.csv'}, the reconstructions and {out / 'grid.png'} (rows: input | reconstructions)")
    if skipped:
        print(f"{skipped} image(s) skipped, see above", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
