"""Check image files before a big run: will the tokenizer accept each one, and if not, why?

    python scripts/check_image.py assets/chelsea.png photos/ more/*.jpg

A folder stands for every file under it. Prints one line per file, ``OK`` or ``BAD`` with the
reason, then a summary; exits 1 if any file is bad (2 if no file was given or found).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from seed import InputError
from seed.images import open_image


def expand(paths: list[str]) -> list[Path]:
    """Files as given; a folder becomes the files under it (recursively, sorted)."""
    out = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def check(path: Path) -> str | None:
    """None if the tokenizer accepts ``path``, else the reason it does not."""
    try:
        open_image(path)
    except InputError as e:
        return str(e)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the bad files and the summary")
    args = parser.parse_args()

    files = expand(args.paths)
    if not files:
        print("no files found", file=sys.stderr)
        return 2
    bad = 0
    for path in files:
        reason = check(path)
        if reason is not None:
            bad += 1
            print(f"BAD  {reason}")
        elif not args.quiet:
            with Image.open(path) as img:  # header only: format, mode and size for the report
                print(f"OK   {path} ({img.format} {img.mode} {img.width}x{img.height})")
    print(f"{len(files) - bad} of {len(files)} file(s) OK, {bad} bad", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
