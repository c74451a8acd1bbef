"""What resuming a dataset run costs at scale: time and peak RSS of listing the input and planning the resume.

    python scripts/benchmark_resume.py --rows 10000000              # ~2.3 GB of synthetic output in a temp folder
    python scripts/benchmark_resume.py --rows 1000000 --compare-old # also the old way: parse every row's id

Synthesizes what an interrupted `scripts/tokenize_dataset.py` run leaves: a list file of ROWS image
paths, ``run.json``, every chunk's rows (``codes/K.jsonl``, 32 codes a row) with its done marker,
and the last chunk half written with a torn line. Then, in a fresh process (the measurement is not
polluted by the synthesis), it times and measures the start of a rerun as the script does it:
``discover`` (the listing), ``prepare_output`` (run.json and the listing hash) and ``plan_chunks``
(the resume: the done-marker names plus the unfinished chunk's rows). The model is not loaded:
its cost does not depend on the output. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MEASURE = r"""
import json, sys, time

def rss():
    s = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))}
    return s["VmRSS"] / 2**20, s["VmHWM"] / 2**20  # GiB

from seed.dataset import discover, plan_chunks, prepare_output

listing, out, chunk_size, old = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
r = {"rss_start_gb": rss()[0]}
t = time.perf_counter()
items = discover(listing)
r["listing_s"], r["rss_after_listing_gb"] = time.perf_counter() - t, rss()[0]
t = time.perf_counter()
record = prepare_output(out, items, {"model": "synthetic"}, "codes", None, 1)
r["check_run_json_s"] = time.perf_counter() - t
t = time.perf_counter()
plan, skipped = plan_chunks(out, items, chunk_size)
r["resume_plan_s"] = time.perf_counter() - t
r["rss_after_resume_gb"], r["peak_rss_gb"] = rss()
r["resume_rss_increase_gb"] = r["rss_after_resume_gb"] - r["rss_after_listing_gb"]
r["images_skipped"], r["images_to_do"] = skipped, sum(len(c.todo) for c in plan)
if old:  # the previous version: every rank parsed every row of every output file into a set of ids
    import glob, os
    before = rss()[0]
    t = time.perf_counter()
    done = set()
    for p in sorted(glob.glob(os.path.join(out, "codes", "*.jsonl"))):
        with open(p, "rb") as f:
            for line in f.read().split(b"\n")[:-1]:
                done.add(json.loads(line)["image"])
    r["old_resume_s"], r["old_resume_rss_increase_gb"] = time.perf_counter() - t, rss()[0] - before
print(json.dumps(r))
"""


def synthesize(root: str, rows: int, chunk_size: int) -> tuple[str, str]:
    """The list file and the output folder of an interrupted run over ``rows`` images."""
    from seed.dataset import Item, prepare_output

    listing, out = os.path.join(root, "images.txt"), os.path.join(root, "out")
    ids = [f"shard{i // 100_000:04d}/{i:09d}.jpg" for i in range(rows)]  # sorted as discover sorts
    with open(listing, "w") as f:
        for start in range(0, rows, 1_000_000):
            f.write("\n".join(ids[start:start + 1_000_000]) + "\n")
    os.makedirs(out)
    items = [Item(i, root) for i in ids]
    prepare_output(out, items, {"model": "synthetic"}, "codes", chunk_size, 1)
    codes = json.dumps(list(range(4000, 4032)))
    chunks = -(-rows // chunk_size)
    for k in range(chunks):
        part = ids[k * chunk_size:(k + 1) * chunk_size]
        last = k == chunks - 1
        if last:  # interrupted: half written, a torn line, no marker
            part = part[: len(part) // 2]
        text = "".join(f'{{"image": "{i}", "codes": {codes}}}\n' for i in part)
        with open(os.path.join(out, "codes", f"{k:06d}.jsonl"), "w") as f:
            f.write(text + ('{"image": "torn' if last else ""))
        if not last:
            with open(os.path.join(out, "done", f"{k:06d}.json"), "w") as f:
                json.dump({"chunk": k, "images": len(part), "codes": len(part), "errors": 0}, f)
    return listing, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="images in the dataset (rows in the output)")
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--dir", default=None, help="where to synthesize (default: a temporary folder, removed after)")
    p.add_argument("--compare-old", action="store_true", help="also time the old resume (parse every row)")
    args = p.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="seed-resume-")
    os.makedirs(root, exist_ok=True)
    try:
        t = time.perf_counter()
        listing, out = synthesize(root, args.rows, args.chunk_size)
        synth_s = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        r = subprocess.run([sys.executable, "-c", MEASURE, listing, out, str(args.chunk_size),
                            "1" if args.compare_old else "0"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        result = {"rows": args.rows, "chunk_size": args.chunk_size, "output_gb": size / 2**30,
                  "synthesize_s": synth_s, **json.loads(r.stdout.splitlines()[-1])}
        print(json.dumps(result, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
