"""Plot the training loss, the held-out loss and the learning rate of one or more runs into a PNG.

    python scripts/plot_runs.py outputs/llama_pretrain_tiny --out runs.png
    python scripts/plot_runs.py runs/a runs/b runs/c/metrics.jsonl --out compare.png --smooth 20

Each RUN is a training output folder (its ``metrics.jsonl``) or a ``metrics.jsonl`` file, as
written by ``scripts/train_llama.py`` and ``scripts/train_tokenizer.py``: three panels (loss,
val_loss, lr against the step), one line per run, labelled with the run's folder name (or
``--labels``). Runs without ``val_loss`` rows are named in the val panel. Exit status: 0 written;
2 bad input (a folder without metrics.jsonl, a file without usable rows, an unwritable --out):
one ``error:`` line, nothing written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class BadInput(Exception):
    pass


def read_rows(run: str) -> tuple[str, list[dict]]:
    """``(label, rows)`` of a run folder or metrics.jsonl file: the complete JSON objects with an
    integer ``step`` (a torn or unreadable line is skipped, as `seed.training.run.MetricsLog.read`)."""
    p = Path(run)
    path = p / "metrics.jsonl" if p.is_dir() else p
    if not path.is_file():
        raise BadInput(f"{run}: no metrics.jsonl (give a training output folder or its metrics.jsonl)")
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool):
                rows.append(row)
    if not rows:
        raise BadInput(f"{path}: no metrics rows (a JSON object with a 'step' per line)")
    label = (p if p.is_dir() else p.parent).resolve().name
    return label, rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The steps and finite values of ``key`` (later rows of a step replace earlier ones)."""
    by_step = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], window: int) -> list[float]:
    """A trailing moving average over ``window`` points (1: unchanged)."""
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: list[tuple[str, list[dict]]], out: Path, window: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    no_val = []
    for label, rows in runs:
        s, v = series(rows, "loss")
        axes[0].plot(s, smooth(v, window), label=label, linewidth=1.2)
        s, v = series(rows, "val_loss")
        if s:
            axes[1].plot(s, v, marker="o", markersize=3, label=label, linewidth=1.2)
        else:
            no_val.append(label)
        s, v = series(rows, "lr")
        axes[2].plot(s, v, label=label, linewidth=1.2)
    titles = ("loss (train)" + (f", moving mean of {window}" if window > 1 else ""), "val_loss (held out)", "lr")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if no_val:
        axes[1].text(0.5, 0.05, "no val_loss: " + ", ".join(no_val), transform=axes[1].transAxes, ha="center",
                     fontsize=8, color="gray")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training output folders or metrics.jsonl files")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per RUN (default: the folder names)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N", help="moving mean of N steps for the train loss")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise BadInput(f"--out {args.out}: give a .png file name")
        if not out.parent.resolve().is_dir():
            raise BadInput(f"--out {args.out}: the folder {out.parent} does not exist")
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise BadInput(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
        if args.smooth < 1:
            raise BadInput(f"--smooth {args.smooth}: must be >= 1")
        runs = [read_rows(r) for r in args.runs]
        if args.labels:
            runs = [(label, rows) for label, (_, rows) in zip(args.labels, runs)]
        plot(runs, out, args.smooth)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {args.out}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
