"""Check image files before a big run: will the tokenizer accept each one, and if not, why?

    python scripts/check_image.py assets/chelsea.png photos/ more/*.jpg

A folder or a .tar shard stands for the images a dataset run would find there (the same listing,
`seed.dataset.discover`: image files by extension, recursively, symlinked folders followed, tar
members); ``--list FILE`` checks a text file listing paths as a run's ``--input FILE`` would. Any
other file is checked as an image. Prints one line per file, ``OK`` or ``BAD`` with the
reason, then a summary; exits 1 if any file is bad (2 if no file was given or found).
"""

from __future__ import annotations

import argparse
import sys


def expand(paths: list[str], lists: list[str] = ()) -> list:
    """`seed.dataset.Item`s: a folder or .tar shard as a dataset run lists it, a file as itself."""
    import os

    from seed.dataset import Item, discover

    out = []
    for p in paths:
        if os.path.isdir(p) or (p.lower().endswith(".tar") and os.path.isfile(p)):
            out += discover(p)
        else:
            out.append(Item(p, ""))
    for p in lists:
        out += discover(p)
    return out


def printable(text: str) -> str:
    """A name with undecodable bytes (held as surrogates) shown with \\x escapes instead of failing to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check(item) -> str | None:
    """None if the tokenizer accepts ``item``, else the reason it does not."""
    from seed import InputError
    from seed.dataset import read_item

    try:
        read_item(item)
    except InputError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="image files, folders or .tar shards")
    parser.add_argument("--list", action="append", default=[], metavar="FILE",
                        help="a text file listing image paths, one per line (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the bad files and the summary")
    args = parser.parse_args(argv)
    if not args.paths and not args.list:
        parser.error("give image files, folders or --list FILE")

    from PIL import Image

    from seed import InputError
    from seed.dataset import item_source

    try:
        items = expand(args.paths, args.list)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not items:
        print("no files found", file=sys.stderr)
        return 2
    bad = 0
    for item in items:
        reason = check(item)
        if reason is not None:
            bad += 1
            print(f"BAD  {printable(reason)}")
        elif not args.quiet:
            with Image.open(item_source(item)) as img:  # header only: format, mode and size for the report
                print(f"OK   {printable(item.name)} ({img.format} {img.mode} {img.width}x{img.height})")
    print(f"{len(items) - bad} of {len(items)} file(s) OK, {bad} bad", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
