"""Make the tiny trained SEED-2 tokenizer shipped in assets/tiny_seed2_tokenizer/ (CPU, a few minutes).

    python scripts/make_tiny_tokenizer.py                  # writes assets/tiny_seed2_tokenizer/
    python scripts/make_tiny_tokenizer.py --out DIR --work RUNS

The random ``seed2_tiny`` config gives the repo's photos nearly the same 32 codes (its random
causal Q-Former barely looks at the image), so nothing trained on them can tell them apart. This
script trains a tokenizer of the same structure on the repo's three photos and captions
(tests/data/captions.jsonl) with scripts/train_tokenizer.py, in the two stages of the original:

1. stage 1, the causal Q-Former by image-text contrast (configs/train/seed1_stage1_tiny.yaml; stage 1
   is the same for SEED-1 and SEED-2), 20 steps from the training fixture's BLIP-2 stand-in;
2. stage 2, SEED-2 objective (configs/train/seed2_stage2_tiny.yaml) from that stage-1 checkpoint, with a
   smaller codebook vector (``model.codebook.dim=4``) and one decoder block (so the weights stay small),
   all three photos in every step and ``train.dead_code_restart`` (unused codes moved onto encoder
   outputs every 10 steps: without it the codebook collapses onto a dozen codes), 40 steps.

Then it checks that every pair of photos differs in at least ``--min-differ`` of the 32 code
positions, stores the weights in float16 (half the bytes; `seed.Tokenizer.from_pretrained` loads
them into float32, the codes checked again after the rounding) and writes ``--out``: config.yaml,
model.safetensors (~0.45 MB) and README.md (the commands that made it and the photos' codes). Use
the folder wherever a tokenizer is named: ``seed.Tokenizer.load(DIR)``, ``tokenize_dataset.py
--config DIR``, ``data.image_tokenizer: DIR``, ``SeedLlama.from_pretrained(..., image_tokenizer=DIR)``.
Its diffusion model is the tiny RANDOM unCLIP of the training config: decoded images are noise.

Deterministic on one machine (CPU training is); another CPU type may round differently and give
other codes. Exit status: 0 written; 1 the photos' codes are not different enough (nothing written);
2 bad arguments or a training step failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("camera", "chelsea", "coffee")
STAGE1_STEPS = 20
STAGE2_STEPS = 40


def stage_commands(work: Path) -> list[list[str]]:
    """The two scripts/train_tokenizer.py command lines (run from the repository root)."""
    train = [sys.executable, "scripts/train_tokenizer.py"]
    stage1 = work / "stage1"
    return [
        [*train, "--config", "configs/train/seed1_stage1_tiny.yaml", f"train.output_dir={stage1}",
         f"train.max_steps={STAGE1_STEPS}", "train.progress=false"],
        [*train, "--config", "configs/train/seed2_stage2_tiny.yaml", f"train.output_dir={work / 'stage2'}",
         f"init.qformer={stage1}/checkpoints/step_{STAGE1_STEPS:08d}/model.safetensors",
         "model.codebook.dim=4", "model.decoder.num_blocks=1", "data.batch_size=3",
         "train.dead_code_restart=true", "train.usage_window=10", f"train.max_steps={STAGE2_STEPS}",
         f"train.iters_per_epoch={STAGE2_STEPS // 2}", f"train.save_every={STAGE2_STEPS}", "train.progress=false"],
    ]


def differing(codes) -> list[tuple[str, str, int]]:
    """(name, name, positions where their codes differ) for every pair of photos."""
    return [(IMAGES[i], IMAGES[j], int((codes[i] != codes[j]).sum()))
            for i in range(len(IMAGES)) for j in range(i + 1, len(IMAGES))]


def readme(commands: list[list[str]], work: Path, codes, pairs, size: int) -> str:
    shown = "\n".join(" ".join([".venv/bin/python", *c[1:]]) for c in commands).replace(str(work), "WORK")
    rows = "\n".join(f"| {n}.png | {' '.join(map(str, c.tolist()))} |" for n, c in zip(IMAGES, codes))
    diff = ", ".join(f"{a}/{b} {k}" for a, b, k in pairs)
    return f"""# Tiny trained SEED-2 tokenizer (test and tutorial asset)

A SEED-2 tokenizer of the `seed2_stage2_tiny` structure (28 px, ViT 32x2, Q-Former 48x2, codebook
8192x4, one decoder block), trained on the repo's three photos (`tests/data/captions.jsonl`) so that
they get clearly different codes; for the tiny SEED-LLaMA loop (docs/llm_training.md, "Tiny loop").
It knows nothing else: any other image gets some mixture of these photos' codes. Its diffusion model
is a tiny RANDOM unCLIP: decoded images are noise. Weights in float16 ({size / 1e3:.0f} kB), loaded as float32.

Made by `python scripts/make_tiny_tokenizer.py`, which ran (work folder shown as WORK):

```
{shown}
```

then stored the stage-2 export's weights in float16. Codes of the photos (CPU):

| image | codes |
| --- | --- |
{rows}

Positions that differ, per pair (of 32): {diff}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/tiny_seed2_tokenizer", help="the tokenizer folder to write "
                        "(replaced if it exists)")
    parser.add_argument("--work", default=None, help="a new folder for the two training runs (kept); default: a "
                        "temporary folder, deleted at the end")
    parser.add_argument("--min-differ", type=int, default=20, help="code positions (of 32) in which every pair of "
                        "photos must differ (default 20)")
    args = parser.parse_args(argv)
    if args.work is not None and os.path.exists(args.work):
        parser.error(f"--work {args.work} exists: name a new folder")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="tiny_seed2_"))
    try:
        commands = stage_commands(work)
        for cmd in commands:
            print("+", " ".join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"error: {' '.join(cmd[1:3])} failed (see above)", file=sys.stderr)
                return 2
        import torch

        import seed

        paths = [str(ROOT / "tests" / "data" / "images" / f"{n}.png") for n in IMAGES]
        tok = seed.Tokenizer.from_pretrained(work / "stage2" / "export", device="cpu", dtype=torch.float32)
        codes = tok.encode(paths)
        pairs = differing(codes)
        if min(k for *_, k in pairs) < args.min_differ:
            print(f"error: the photos' codes differ in too few positions ({pairs}; need {args.min_differ})",
                  file=sys.stderr)
            return 1
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.to(torch.float16).save_pretrained(tmp)  # half the bytes; loads back into float32
        half = seed.Tokenizer.from_pretrained(tmp, device="cpu", dtype=torch.float32).encode(paths)
        pairs = differing(half)
        if min(k for *_, k in pairs) < args.min_differ:
            shutil.rmtree(tmp)
            print(f"error: after rounding to float16 the photos' codes differ in too few positions ({pairs})",
                  file=sys.stderr)
            return 1
        size = (tmp / "model.safetensors").stat().st_size
        (tmp / "README.md").write_text(readme(commands, work, half, pairs, size))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        print(f"wrote {out} ({size / 1e3:.0f} kB of weights); codes differ per pair in "
              + ", ".join(f"{a}/{b} {k}" for a, b, k in pairs) + " of 32 positions"
              + ("" if torch.equal(half, codes) else " (float16 rounding changed "
                 f"{int((half != codes).sum())} codes)"))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
