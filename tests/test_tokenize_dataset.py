"""scripts/tokenize_dataset.py: every good image once with tok.encode's codes, bad ones in the
errors file, crash-safe resume, folder / list / .tar inputs, and a 2-process torchrun run.

Weights come from the parity fixture's files (not random), so every process has the same model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image, ImageOps

import seed
from conftest import PARITY, PHOTOS, ROOT, TINY, parity_overrides
from seed.dataset import discover

SCRIPT = ROOT / "scripts" / "tokenize_dataset.py"
BAD = {"broken/truncated.jpg", "fake.jpg", "empty.png"}


def _load_script():
    spec = importlib.util.spec_from_file_location("tokenize_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(src, out, *flags: str) -> str:
    """Run the script in this process as a plain single-process run; returns what it printed."""
    args = ["--config", str(TINY), "--input", str(src), "--output", str(out), "--batch-size", "4",
            "--num-workers", "2", *flags, *parity_overrides(PARITY)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    stdout = io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), torch.random.fork_rng(), contextlib.redirect_stdout(stdout):
        _load_script().main(args)
    return stdout.getvalue()


def lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def rows(out: Path, kind: str) -> list[dict]:
    return [r for p in sorted(out.glob(f"{kind}-rank*.jsonl")) for r in lines(p)]


def as_dict(rs: list[dict], key: str) -> dict:
    ids = [r["image"] for r in rs]
    assert len(ids) == len(set(ids)), "an image appears more than once"
    return {r["image"]: r[key] for r in rs}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, parity_cfg):
    """Real-photo variants (crops, flips, resizes, gray, RGBA; png/jpg; nested) plus bad files."""
    d = tmp_path_factory.mktemp("photos")
    for p in PHOTOS:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        variants = {
            f"{p.stem}.png": img,
            f"crops/{p.stem}_center.jpg": img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
            f"crops/deep/{p.stem}_corner.png": img.crop((0, 0, w // 2, h // 3)),
            f"flips/{p.stem}_mirror.jpg": ImageOps.mirror(img),
            f"flips/{p.stem}_flip.PNG": ImageOps.flip(img),
            f"resized/{p.stem}_small.JPG": img.resize((61, 47)),
            f"resized/deep/er/{p.stem}_gray.jpg": img.convert("L").resize((200, 150)),
            f"resized/{p.stem}_rgba.png": img.convert("RGBA").resize((90, 120)),
        }
        for name, v in variants.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            v.save(d / name)
    jpg = (d / "crops" / f"{PHOTOS[0].stem}_center.jpg").read_bytes()
    (d / "broken").mkdir()
    (d / "broken" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "fake.jpg").write_text("this is not a picture\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image, ignored\n")
    return d


@pytest.fixture(scope="module")
def expected(photo_dir, parity_tok):
    """tok.encode, one image at a time, for every good image in photo_dir."""
    good = [p for p in photo_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg")
            and p.relative_to(photo_dir).as_posix() not in BAD]
    assert len(good) == 8 * len(PHOTOS)
    return {p.relative_to(photo_dir).as_posix(): parity_tok.encode([p])[0].tolist() for p in good}


@pytest.fixture(scope="module")
def single_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run(photo_dir, out)


@pytest.fixture(scope="module")
def torchrun_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--config", str(TINY), "--input", str(photo_dir), "--output", str(out), "--batch-size", "3",
           "--num-workers", "1", *parity_overrides(PARITY)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def test_discover_folder_tree(photo_dir, expected):
    items = discover(photo_dir)
    ids = [it.id for it in items]
    assert ids == sorted(set(expected) | BAD)  # nested, any case of extension; notes.txt ignored
    with pytest.raises(seed.InputError, match="no such file or folder"):
        discover(photo_dir / "nowhere")
    with pytest.raises(seed.InputError, match="not UTF-8 text"):
        discover(PHOTOS[0])  # an image is not a list of paths


def test_folder_all_good_images_once_with_encode_codes(single_run, expected, photo_dir):
    out, printed = single_run
    assert sorted(p.name for p in out.iterdir()) == ["codes-rank00000.jsonl", "errors-rank00000.jsonl"]
    assert as_dict(rows(out, "codes"), "codes") == expected
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == BAD
    for image_id, message in errors.items():
        assert str(photo_dir / image_id) in message
    assert "truncated" in errors["broken/truncated.jpg"] and "empty" in errors["empty.png"]
    assert f"done {len(expected)}, skipped 0 " in printed and "failed 3 " in printed and "images/s" in printed


def test_resume_after_crash_mid_write(single_run, expected, photo_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_run[0], out)
    codes_file, errors_file = out / "codes-rank00000.jsonl", out / "errors-rank00000.jsonl"
    kept = codes_file.read_text().splitlines(keepends=True)
    codes_file.write_text("".join(kept[:5]) + kept[5][:40])  # a crash while writing line 6
    errors_file.write_text(errors_file.read_text().splitlines(keepends=True)[0] + '{"image": "fa')

    printed = run(photo_dir, out)
    assert f"done {len(expected) - 5}, skipped 6 " in printed and "failed 2 " in printed
    assert as_dict(rows(out, "codes"), "codes") == expected
    assert set(as_dict(rows(out, "errors"), "error")) == BAD

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    printed = run(photo_dir, out)  # nothing left to do
    assert f"done 0, skipped {len(expected) + len(BAD)} " in printed and "failed 0 " in printed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_torchrun_two_processes_union_equals_single(torchrun_run, single_run, expected):
    out, printed = torchrun_run
    shares = [as_dict(lines(out / f"codes-rank{r:05d}.jsonl"), "codes") for r in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert as_dict(rows(out, "codes"), "codes") == as_dict(rows(single_run[0], "codes"), "codes") == expected
    assert as_dict(rows(out, "errors"), "error") == as_dict(rows(single_run[0], "errors"), "error")
    assert f"done {len(expected)}, skipped 0 " in printed and "failed 3 " in printed
    assert "over 2 process(es)" in printed


def test_resume_with_a_different_world_size(torchrun_run, expected, photo_dir, tmp_path):
    """A 2-process run that crashed, resumed by a single process: it also repairs rank 1's file."""
    out = tmp_path / "out"
    shutil.copytree(torchrun_run[0], out)
    for r in (0, 1):
        f = out / f"codes-rank{r:05d}.jsonl"
        kept = f.read_text().splitlines(keepends=True)
        f.write_text("".join(kept[:2]) + kept[2][:-30])
    printed = run(photo_dir, out)
    assert f"done {len(expected) - 4}, skipped {4 + len(BAD)} " in printed
    assert as_dict(rows(out, "codes"), "codes") == expected


def test_tar_shards(photo_dir, expected, tmp_path):
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    good = sorted(expected)[:5]
    with tarfile.open(shards / "000.tar", "w") as tf:
        for i, image_id in enumerate(good[:3]):
            tf.add(photo_dir / image_id, arcname=f"{i:04d}{Path(image_id).suffix}")
            tf.add(photo_dir / "notes.txt", arcname=f"{i:04d}.txt")  # a WebDataset sidecar, ignored
        tf.add(photo_dir / "broken" / "truncated.jpg", arcname="bad/0003.jpg")
    with tarfile.open(shards / "sub" / "001.tar", "w") as tf:
        for i, image_id in enumerate(good[3:]):
            tf.add(photo_dir / image_id, arcname=f"{i:04d}{Path(image_id).suffix}")
    data = (shards / "sub" / "001.tar").read_bytes()
    (shards / "sub" / "002.tar").write_bytes(data[: len(data) - 1024 - os.path.getsize(photo_dir / good[4]) // 2])

    out = tmp_path / "out"
    run(shards / "000.tar", out)  # one shard
    want = {f"000.tar/{i:04d}{Path(k).suffix}": expected[k] for i, k in enumerate(good[:3])}
    assert as_dict(rows(out, "codes"), "codes") == want
    assert set(as_dict(rows(out, "errors"), "error")) == {"000.tar/bad/0003.jpg"}

    out = tmp_path / "out_all"
    run(shards, out)  # a folder of shards, one of them truncated in its last member
    want = {f"{s}/{i:04d}{Path(k).suffix}": expected[k] for s, ks in (("000.tar", good[:3]), ("sub/001.tar", good[3:]))
            for i, k in enumerate(ks)}
    want["sub/002.tar/0000" + Path(good[3]).suffix] = expected[good[3]]
    assert as_dict(rows(out, "codes"), "codes") == want
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == {"000.tar/bad/0003.jpg", "sub/002.tar", "sub/002.tar/0001" + Path(good[4]).suffix}
    assert "sub/002.tar" in errors["sub/002.tar"]


def test_list_file(photo_dir, expected, tmp_path):
    good = sorted(expected)[:3]
    listing = tmp_path / "list.txt"
    rel = os.path.relpath(photo_dir / good[1], tmp_path)
    listing.write_text(f"# my images\n{photo_dir / good[0]}\n\n{rel}\n{photo_dir / good[2]}\n"
                       f"{photo_dir / good[0]}\nmissing/photo.jpg\n{photo_dir / 'fake.jpg'}\n")
    out = tmp_path / "out"
    printed = run(listing, out)
    assert as_dict(rows(out, "codes"), "codes") == {str(photo_dir / good[0]): expected[good[0]], rel: expected[good[1]],
                                                    str(photo_dir / good[2]): expected[good[2]]}
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == {"missing/photo.jpg", str(photo_dir / "fake.jpg")}
    assert "no such file" in errors["missing/photo.jpg"]
    assert "done 3, skipped 0 " in printed and "failed 2 " in printed
