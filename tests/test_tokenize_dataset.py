"""scripts/tokenize_dataset.py and seed/dataset.py: every good image once with tok.encode's codes, bad
ones in the errors files, chunked output with bounded crash-safe resume, a lock against a second
run, a model fingerprint against mixed codes, symlinked folders, Ctrl-C, exit statuses, argument
checks before the model loads, UTF-8 names, the SEED-LLaMA text form, and a 2-process torchrun run.

Weights come from the parity fixtures' files (not random): their codes vary with the input, and
every process has the same model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image, ImageOps

import seed
import seed.dataset
from conftest import PARITY, PARITY_ROOT, PHOTOS, ROOT, TINY, parity_overrides, seed2_overrides
from seed.dataset import discover, signals_deferred

SCRIPT = ROOT / "scripts" / "tokenize_dataset.py"
BAD = {"broken/truncated.jpg", "fake.jpg", "empty.png"}
ODD = "odd/bad\udcffname.png"
"""A file name that is not valid UTF-8 (byte 0xff), as Python holds it."""
UNICODE = "café/東京.png"


def _load_script(name: str = "tokenize_dataset"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(src, out, *flags: str, config=TINY, overrides=None) -> tuple[int, str, str]:
    """Run the script in this process as a plain single-process run: (exit status, stdout, stderr)."""
    args = ["--config", str(config), "--input", str(src), "--output", str(out), "--batch-size", "4",
            "--num-workers", "2", *flags, *(parity_overrides(PARITY) if overrides is None else overrides)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), torch.random.fork_rng(), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = _load_script().main(args)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, stdout.getvalue(), stderr.getvalue()


def counts(printed: str) -> tuple[int, int, int]:
    """(done, skipped, failed) from the summary line."""
    m = re.search(r"done (\d+), skipped (\d+) .*failed (\d+)", printed)
    assert m, printed
    return int(m[1]), int(m[2]), int(m[3])


def tear(out: Path, k: int, keep: int) -> int:
    """Chunk k as a crash mid-write leaves it: no marker, ``keep`` codes lines and a torn one;
    returns how many of its images a resume must redo."""
    marker = out / "done" / f"{k:06d}.json"
    info = json.loads(marker.read_text())
    marker.unlink()
    f = out / "codes" / f"{k:06d}.jsonl"
    kept = f.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(kept) > keep
    f.write_text("".join(kept[:keep]) + kept[keep][:40], encoding="utf-8")
    return info["images"] - keep - info["errors"]


def full_chunks(out: Path, n: int) -> list[int]:
    """Chunks whose codes file has at least n lines."""
    return sorted(int(p.stem) for p in (out / "codes").glob("*.jsonl") if len(p.read_bytes().splitlines()) >= n)


def lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def rows(out: Path, kind: str) -> list[dict]:
    return [r for p in sorted((out / kind).glob("*.jsonl")) for r in lines(p)]


def as_dict(rs: list[dict], key: str) -> dict:
    ids = [r["image"] for r in rs]
    assert len(ids) == len(set(ids)), "an image appears more than once"
    return {r["image"]: r[key] for r in rs}


def snapshot(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real-photo variants (crops, flips, resizes, gray, RGBA; png/jpg; nested), a symlinked folder
    (plus a second link to it and a link back up: a cycle), names not in ASCII or not UTF-8, bad files."""
    d = tmp_path_factory.mktemp("photos")
    outside = tmp_path_factory.mktemp("elsewhere")
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
    photo = Image.open(PHOTOS[0]).convert("RGB")
    (outside / "sub").mkdir()
    photo.rotate(90, expand=True).save(outside / "sub" / "rotated.png")
    os.symlink(outside, d / "linked")
    os.symlink(outside, d / "linked_again")  # the same folder twice: listed once
    os.symlink(d, d / "crops" / "loop")  # a cycle
    (d / "café").mkdir()
    photo.resize((80, 80)).save(d / UNICODE)
    os.makedirs(d / "odd")
    with open(os.path.join(os.fsencode(d), os.fsencode(ODD)), "wb") as f:
        photo.transpose(Image.Transpose.TRANSPOSE).save(f, format="PNG")
    jpg = (d / "crops" / f"{PHOTOS[0].stem}_center.jpg").read_bytes()
    (d / "broken").mkdir()
    (d / "broken" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "fake.jpg").write_text("this is not a picture\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image, ignored\n")
    return d


@pytest.fixture(scope="module")
def good_ids():
    ids = {f"{p.stem}.png" for p in PHOTOS}
    for p in PHOTOS:
        ids |= {f"crops/{p.stem}_center.jpg", f"crops/deep/{p.stem}_corner.png", f"flips/{p.stem}_mirror.jpg",
                f"flips/{p.stem}_flip.PNG", f"resized/{p.stem}_small.JPG", f"resized/deep/er/{p.stem}_gray.jpg",
                f"resized/{p.stem}_rgba.png"}
    return ids | {"linked/sub/rotated.png", UNICODE, ODD}


@pytest.fixture(scope="module")
def expected(photo_dir, good_ids, parity_tok):
    """tok.encode, one image at a time, for every good image in photo_dir."""
    return {i: parity_tok.encode([os.path.join(photo_dir, i)])[0].tolist() for i in sorted(good_ids)}


@pytest.fixture(scope="module")
def single_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    return out, run(photo_dir, out, "--chunk-size", "4")


@pytest.fixture(scope="module")
def torchrun_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--config", str(TINY), "--input", str(photo_dir), "--output", str(out), "--batch-size", "3",
           "--num-workers", "1", "--chunk-size", "3", *parity_overrides(PARITY)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]  # some images failed
    return out, proc.stdout


def test_discover_folder_tree_follows_symlinks_once(photo_dir, good_ids):
    ids = [it.id for it in discover(photo_dir)]
    # nested, any case of extension, the symlinked folder once (not via the second link or the
    # cycle), names not in ASCII; notes.txt ignored
    assert ids == sorted(good_ids | BAD)
    with pytest.raises(seed.InputError, match="no such file or folder"):
        discover(photo_dir / "nowhere")
    with pytest.raises(seed.InputError, match="not UTF-8 text"):
        discover(PHOTOS[0])  # an image is not a list of paths


def test_check_image_lists_what_a_run_lists(photo_dir, good_ids, capsys):
    rc = _load_script("check_image").main([str(photo_dir)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"{len(good_ids)} of {len(good_ids) + len(BAD)} file(s) OK, {len(BAD)} bad" in err
    assert os.path.join(photo_dir, "linked/sub/rotated.png") in out and "loop" not in out
    assert out.count("BAD ") == len(BAD) and "truncated.jpg" in out


def test_folder_all_good_images_once_with_encode_codes(single_run, expected, photo_dir):
    out, (rc, printed, _) = single_run
    assert rc == 1, "some images failed: exit status 1"
    n = len(expected) + len(BAD)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "codes", "done", "errors", "run.json"]
    assert sorted(p.name for p in (out / "done").iterdir()) == [f"{k:06d}.json" for k in range(-(-n // 4))]
    assert as_dict(rows(out, "codes"), "codes") == expected
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == BAD
    for image_id, message in errors.items():
        assert str(photo_dir / image_id) in message
    assert "truncated" in errors["broken/truncated.jpg"] and "empty" in errors["empty.png"]
    assert f"done {len(expected)}, skipped 0 " in printed and "failed 3 " in printed and "images/s" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["images"] == n and record["chunk_size"] == 4 and record["format"] == "codes"
    assert record["fingerprint"]["weights"]["codebook"]["size"] == os.path.getsize(PARITY / "seed_tokenizer.pth")


def test_names_not_ascii_are_utf8(single_run, expected):
    out = single_run[0]
    data = b"".join(p.read_bytes() for p in (out / "codes").glob("*.jsonl"))
    assert UNICODE.encode("utf-8") in data and b"\\u" not in data.replace(b"\\udcff", b"")
    assert b'"odd/bad\\udcffname.png"' in data  # not valid Unicode: a JSON escape keeps the line valid UTF-8
    data.decode("utf-8")


def test_resume_reads_only_unfinished_chunks(single_run, expected, photo_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_run[0], out, symlinks=True)
    n = len(expected) + len(BAD)
    last = len(list((out / "done").iterdir())) - 1
    # a crash while writing chunk k (marker missing, torn last line) and before chunk `last` began
    k = next(c for c in full_chunks(out, 3) if c != last)
    redo = tear(out, k, 2) + json.loads((out / "done" / f"{last:06d}.json").read_text())["images"]
    for kind in ("codes", "errors", "done"):
        for p in (out / kind).glob(f"{last:06d}.*"):
            p.unlink()
    intact = next(c for c in full_chunks(out, 1) if c not in (k, last))
    garbage = out / "codes" / f"{intact:06d}.jsonl"
    garbage.write_text("garbage: never read again, its chunk is done\n")

    read = []
    real = seed.dataset.read_ids
    with mock.patch.object(seed.dataset, "read_ids", lambda p: read.append(p.name) or real(p)):
        rc, printed, _ = run(photo_dir, out)
    assert sorted(set(read)) == sorted({f"{k:06d}.jsonl", f"{last:06d}.jsonl"})
    done, skipped, failed = counts(printed)
    assert done + failed == redo and skipped == n - redo and rc == (1 if failed else 0), printed
    garbage.write_bytes((single_run[0] / "codes" / garbage.name).read_bytes())
    assert as_dict(rows(out, "codes"), "codes") == expected
    assert set(as_dict(rows(out, "errors"), "error")) == BAD

    before = snapshot(out)
    rc, printed, _ = run(photo_dir, out)  # nothing left to do; earlier failures are not this run's
    assert rc == 0 and f"done 0, skipped {len(expected) + len(BAD)} " in printed and "failed 0" in printed
    assert snapshot(out) == before


def test_torchrun_two_processes_union_equals_single(torchrun_run, single_run, expected):
    out, printed = torchrun_run
    record = json.loads((out / "run.json").read_text())
    shares = [{}, {}]
    for p in (out / "codes").glob("*.jsonl"):
        shares[int(p.stem) % 2].update(as_dict(lines(p), "codes"))  # chunk k is rank k % 2's
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert record["chunks"] == len(list((out / "done").iterdir()))
    assert as_dict(rows(out, "codes"), "codes") == as_dict(rows(single_run[0], "codes"), "codes") == expected
    assert as_dict(rows(out, "errors"), "error") == as_dict(rows(single_run[0], "errors"), "error")
    assert f"done {len(expected)}, skipped 0 " in printed and "failed 3 " in printed
    assert "over 2 process(es)" in printed


def test_resume_with_a_different_world_size(torchrun_run, expected, photo_dir, tmp_path):
    """A 2-process run that crashed in one chunk of each rank, resumed by a single process."""
    out = tmp_path / "out"
    shutil.copytree(torchrun_run[0], out, symlinks=True)
    full = full_chunks(out, 2)
    torn = [next(k for k in full if k % 2 == r) for r in (0, 1)]  # one chunk of each rank
    redo = sum(tear(out, k, 1) for k in torn)
    rc, printed, _ = run(photo_dir, out)
    done, skipped, failed = counts(printed)
    assert done + failed == redo and skipped == len(expected) + len(BAD) - redo, printed
    assert as_dict(rows(out, "codes"), "codes") == expected
    assert len(list((out / "done").iterdir())) == json.loads((out / "run.json").read_text())["chunks"]


def test_second_run_is_locked_out_and_ctrl_c_leaves_complete_lines(tmp_path, parity_tok):
    """A real run in another process: a second run on its folder fails at once naming it; Ctrl-C
    then stops it with status 130, no traceback and only complete lines; a rerun finishes the job."""
    src, out = tmp_path / "many", tmp_path / "out"
    src.mkdir()
    for i in range(80):
        os.symlink(PHOTOS[i % len(PHOTOS)], src / f"img{i:03d}.png")
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--input", str(src), "--output", str(out),
           "--batch-size", "1", "--num-workers", "0", *parity_overrides(PARITY)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        codes = out / "codes" / "000000.jsonl"
        deadline = time.monotonic() + 120
        while not (codes.is_file() and codes.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)

        t = time.monotonic()
        rc, _, err = run(src, out)
        assert rc == 2 and time.monotonic() - t < 10
        assert f"pid {proc.pid} on host {socket.gethostname()} (since " in err and "in use" in err, err

        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    written = as_dict(lines(codes), "codes")  # every line complete
    assert 0 < len(written) < 80
    assert (out / ".lock").read_bytes() == b""  # released

    codes = parity_tok.encode(PHOTOS).tolist()
    want = {f"img{i:03d}.png": codes[i % len(PHOTOS)] for i in range(80)}
    rc, printed, _ = run(src, out, "--batch-size", "16")
    assert rc == 0 and f"done {80 - len(written)}, skipped {len(written)} " in printed
    assert as_dict(rows(out, "codes"), "codes") == want


def test_a_killed_run_with_workers_is_rerun_at_once(tmp_path, caplog):
    """kill -9 of a run whose DataLoader workers are alive: the lock dies with the run (the workers
    do not keep it), so an immediate rerun takes it over instead of naming the dead pid."""
    src, out = tmp_path / "many", tmp_path / "out"
    src.mkdir()
    for i in range(60):
        os.symlink(PHOTOS[i % len(PHOTOS)], src / f"img{i:03d}.png")
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--input", str(src), "--output", str(out),
           "--batch-size", "1", "--num-workers", "2", "--chunk-size", "20", *parity_overrides(PARITY)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        codes = out / "codes" / "000000.jsonl"
        deadline = time.monotonic() + 120
        while not (codes.is_file() and codes.stat().st_size > 0):  # the workers are decoding images
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        rc, printed, err = run(src, out, "--batch-size", "16")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert f"stale lock of pid {proc.pid}" in caplog.text
    assert len(rows(out, "codes")) == 60


def test_missing_weights_say_where_they_were_looked_for_and_how_to_get_them(tmp_path, monkeypatch):
    """The one missing-weights message (seed.checkpoint.check_weights, as demo_recon.py): every
    missing file with the absolute path looked at and how to get it, and the tiny config; exit 2,
    before the model loads, no output folder contents."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc, _, err = run(PHOTOS[0].parent, out, config=ROOT / "configs" / "seed2_tokenizer.yaml",
                     overrides=["checkpoints.vision=nowhere/eva_vit_g.pth", "checkpoints.quantizer=nowhere/q.pt"])
    assert rc == 2 and err.startswith("error: 2 weight file(s) not found:\n"), err
    lines = err.splitlines()
    assert f"  - checkpoints.vision: {tmp_path / 'nowhere' / 'eva_vit_g.pth'} not found. " in lines[1]
    assert "scripts/download_weights.py" in lines[1]
    assert f"checkpoints.quantizer: {tmp_path / 'nowhere' / 'q.pt'} not found" in lines[2]
    assert lines[3] == "See pretrained/README.md, or try the tiny random model: --config configs/seed2_tiny.yaml"
    assert not (out / "codes").exists()
    cfg = seed.load_config("seed2_tokenizer", "checkpoints.vision=nowhere/eva_vit_g.pth",
                           "checkpoints.quantizer=nowhere/q.pt")
    with pytest.raises(seed.CheckpointError) as e:  # what evaluate.py, seed_llama.py and the web demo load with
        seed.Tokenizer.from_config(cfg)
    assert str(e.value) == err.removeprefix("error: ").rstrip("\n")


def test_default_workers_are_what_the_machine_has(tmp_path):
    """Without --num-workers, a process allowed one CPU starts one DataLoader worker: torch does
    not warn that it would create more than the suggested maximum."""
    src, out = tmp_path / "some", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        os.symlink(PHOTOS[i % len(PHOTOS)], src / f"img{i}.png")
    cpu = min(os.sched_getaffinity(0))
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--input", str(src), "--output", str(out),
           "--batch-size", "1", *parity_overrides(PARITY)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "suggested max number of worker" not in proc.stderr, proc.stderr[-3000:]
    assert len(rows(out, "codes")) == 8
    with mock.patch("os.sched_getaffinity", return_value=set(range(16))):
        assert seed.dataset.default_workers() == 4
    with mock.patch("os.sched_getaffinity", return_value={0, 1}):
        assert seed.dataset.default_workers() == 2


def test_progress_off_a_terminal_is_log_lines(tmp_path, caplog):
    """stderr not a terminal (here a StringIO; a log file, a scheduler): no progress bar fragments
    between the log lines, one readable progress line per interval instead."""
    src, out = tmp_path / "some", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        os.symlink(PHOTOS[i % len(PHOTOS)], src / f"img{i}.png")
    with caplog.at_level("INFO", logger="seed.dataset"), mock.patch.object(seed.dataset, "PROGRESS_LOG_S", 0.0):
        rc, _, err = run(src, out, "--batch-size", "2", "--num-workers", "0")
    assert rc == 0, err
    assert "img/s" not in err and "\r" not in err and "|" not in err, err  # no tqdm
    progress = [r.getMessage() for r in caplog.records if "images/s, about" in r.getMessage()]
    assert [p.split(" images")[0] for p in progress] == ["rank 0/1: 2/6", "rank 0/1: 4/6"], progress
    assert re.fullmatch(r"rank 0/1: 2/6 images \(33\.3%\), 0 failed, [\d.]+ images/s, about \d+ s left", progress[0])


def test_stale_lock_is_taken_over_and_another_hosts_is_refused(tmp_path, caplog):
    src, out = PHOTOS[0].parent, tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                           "since": "2020-01-01T00:00:00+00:00", "start": "1"}))
    rc, printed, _ = run(src, out)
    assert rc == 0 and f"done {len(PHOTOS)}, skipped 0 " in printed
    assert f"stale lock of pid {dead.pid}" in caplog.text

    (out / ".lock").write_text(json.dumps({"pid": 4242, "host": "some-other-node", "since": "2020-01-01"}))
    rc, _, err = run(src, out)
    assert rc == 2 and "pid 4242 on host some-other-node" in err and f"delete {out / '.lock'}" in err


def test_another_model_or_input_is_refused_unless_forced(single_run, photo_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_run[0], out, symlinks=True)
    before = snapshot(out)

    sd = torch.load(PARITY / "seed_tokenizer.pth", weights_only=True)
    sd["model"]["quantize.embedding.weight"] += 0.01  # fine-tuned weights: same file name and size, other codes
    other = tmp_path / "seed_tokenizer.pth"
    torch.save(sd, other)
    overrides = [*parity_overrides(PARITY), f"checkpoints.codebook={other}"]
    rc, _, err = run(photo_dir, out, overrides=overrides)
    assert rc == 2 and "another model or config" in err and "weights.codebook.sha256" in err, err
    rc, _, err = run(photo_dir, out, overrides=[*parity_overrides(PARITY), "model.image_size=28"])
    assert rc == 2 and "model.image_size: 56 in run.json, 28 now" in err, err
    assert snapshot(out) == before

    bigger = tmp_path / "bigger"
    shutil.copytree(photo_dir, bigger, symlinks=True)
    shutil.copy(PHOTOS[0], bigger / "new.png")
    rc, _, err = run(bigger, out)
    assert rc == 2 and "the input changed" in err, err
    assert snapshot(out) == before

    rc, printed, _ = run(photo_dir, out, "--force-mismatch", overrides=overrides)
    assert rc == 0 and "done 0, skipped" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["forced"][0]["fingerprint"]["weights"]["codebook"]["sha256"] != \
        record["fingerprint"]["weights"]["codebook"]["sha256"]


def test_bad_arguments_fail_before_the_model_loads(photo_dir, tmp_path):
    with mock.patch.object(seed.Tokenizer, "from_config", side_effect=AssertionError("the model loaded")):
        for flags, message in ((["--batch-size", "0"], "--batch-size: must be at least 1"),
                               (["--num-workers", "-1"], "--num-workers: must be at least 0")):
            rc, _, err = run(photo_dir, tmp_path / "out", *flags)
            assert rc == 2 and message in err, err
        rc, _, err = run(tmp_path / "nowhere", tmp_path / "out")
        assert rc == 2 and "nowhere: no such file or folder" in err, err
        assert not (tmp_path / "out").exists()
        empty = tmp_path / "empty"
        empty.mkdir()
        rc, _, err = run(empty, tmp_path / "out")
        assert rc == 2 and "no images found" in err


def test_read_only_output_fails_at_once(tmp_path):
    """A folder this process cannot write: read-only by its mode, or (as root, whom modes do not
    stop) a read-only tmpfs mounted over it."""
    out = tmp_path / "out"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {r.stderr!r}")
        mounted = True
    else:
        out.chmod(0o555)
    try:
        with mock.patch.object(seed.Tokenizer, "from_config", side_effect=AssertionError("the model loaded")):
            rc, _, err = run(PHOTOS[0].parent, out)
        assert rc == 2 and f"cannot write to the output folder {out}: " in err, err
        assert "Read-only file system" in err or "Permission denied" in err
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
        out.chmod(0o755)


def test_ctrl_c_is_held_until_a_write_is_complete(tmp_path):
    w = seed.dataset.JsonlWriter(tmp_path / "x.jsonl")
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
            w.write([{"image": "a", "codes": [1, 2]}])
        pytest.fail("the interrupt must be delivered when the block ends")
    w.close()
    assert lines(tmp_path / "x.jsonl") == [{"image": "a", "codes": [1, 2]}]


def test_tar_shards(photo_dir, expected, tmp_path, capsys):
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    good = sorted(i for i in expected if "/" not in i)[:3] + sorted(i for i in expected if i.startswith("crops/"))[:2]
    with tarfile.open(shards / "000.tar", "w") as tf:
        for i, image_id in enumerate(good[:3]):
            tf.add(photo_dir / image_id, arcname=f"{i:04d}{Path(image_id).suffix}")
            tf.add(photo_dir / "notes.txt", arcname=f"{i:04d}.txt")  # a WebDataset sidecar, ignored
        tf.add(photo_dir / "broken" / "truncated.jpg", arcname="bad/0003.jpg")
    with tarfile.open(shards / "sub" / "001.tar", "w") as tf:
        for i, image_id in enumerate(good[3:]):
            tf.add(photo_dir / image_id, arcname=f"{i:04d}{Path(image_id).suffix}")
    with tarfile.open(shards / "sub" / "001.tar") as tf:
        last = tf.getmembers()[-1]
    data = (shards / "sub" / "001.tar").read_bytes()
    (shards / "sub" / "002.tar").write_bytes(data[: last.offset_data + last.size // 2])  # cut mid-member

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

    rc = _load_script("check_image").main(["-q", str(shards)])  # the same members, the same bad ones
    printed = capsys.readouterr()
    assert rc == 1 and f"{len(want)} of {len(want) + len(errors)} file(s) OK" in printed.err


def test_list_file(photo_dir, expected, tmp_path):
    good = sorted(expected)[:3]
    listing = tmp_path / "list.txt"
    rel = os.path.relpath(photo_dir / good[1], tmp_path)
    listing.write_text(f"# my images\n{photo_dir / good[0]}\n\n{rel}\n{photo_dir / good[2]}\n"
                       f"{photo_dir / good[0]}\nmissing/photo.jpg\n{photo_dir / 'fake.jpg'}\n")
    out = tmp_path / "out"
    rc, printed, _ = run(listing, out)
    assert as_dict(rows(out, "codes"), "codes") == {str(photo_dir / good[0]): expected[good[0]], rel: expected[good[1]],
                                                    str(photo_dir / good[2]): expected[good[2]]}
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == {"missing/photo.jpg", str(photo_dir / "fake.jpg")}
    assert "no such file" in errors["missing/photo.jpg"]
    assert rc == 1 and "done 3, skipped 0 " in printed and "failed 2 " in printed


@pytest.mark.parametrize("fixture", sorted((PARITY_ROOT / "seed2").glob("*/spec.json")), ids=lambda p: p.parent.name)
def test_seed2_text_form_is_the_originals(fixture, tmp_path):
    """SEED-2 through the dataset run: --format text gives the original's SEED-LLaMA text per image."""
    fixture = fixture.parent
    want = torch.load(fixture / "expected.pt", weights_only=True)
    overrides = seed2_overrides(fixture)
    config = ROOT / "configs" / "seed2_tiny.yaml"
    rc, _, err = run(fixture / "images", tmp_path / "text", "--format", "text", config=config, overrides=overrides)
    assert rc == 0, err
    got = rows(tmp_path / "text", "codes")
    assert all(set(r) == {"image", "text"} for r in got)
    assert as_dict(got, "text") == dict(zip(want["images"], want["llm_text"]))
    rc, _, err = run(fixture / "images", tmp_path / "text", "--format", "codes", config=config, overrides=overrides)
    assert rc == 2 and "its rows are --format text, this run asks for --format codes" in err, err
    rc, _, err = run(fixture / "images", tmp_path / "both", "--format", "codes+text", config=config,
                     overrides=overrides)
    got = rows(tmp_path / "both", "codes")
    assert as_dict(got, "codes") == dict(zip(want["images"], want["codes"].tolist()))
    assert as_dict(got, "text") == dict(zip(want["images"], want["llm_text"]))


def test_text_format_is_refused_for_a_seed1_config(photo_dir, parity_tok, tmp_path):
    """SEED-LLaMA strings of SEED-1 codes mean nothing to SEED-LLaMA: refused before the model loads."""
    with mock.patch.object(seed.Tokenizer, "from_config", side_effect=AssertionError("the model loaded")):
        for fmt in ("text", "codes+text"):
            rc, _, err = run(photo_dir, tmp_path / "out", "--format", fmt)
            assert rc == 2 and f"error: --format {fmt} writes SEED-LLaMA text" in err and "SEED-1 config" in err, err
    assert not (tmp_path / "out" / "run.json").exists()
    with pytest.raises(seed.InputError, match="SEED-1 config"):  # the library call too
        seed.dataset.tokenize_items(parity_tok, discover(PHOTOS[0].parent), tmp_path / "lib", 4, fmt="text")
    assert not (tmp_path / "lib").exists()


def test_jsonl_rows_keep_their_fields_resume_and_report_bad_rows(photo_dir, expected, tmp_path):
    """A JSONL of {"image", caption, any other fields}: each row's fields travel with its codes; an
    image on two rows gets both; bad rows are error rows; chunked, torn and resumed like any input."""
    a, b = sorted(i for i in expected if "/" not in i and i.endswith(".png"))[:2]
    c = next(i for i in sorted(expected) if i.startswith("crops/"))
    (tmp_path / "imgs").mkdir()
    for name, src in (("a.png", a), ("b.png", b), ("c" + Path(c).suffix, c)):
        os.symlink(photo_dir / src, tmp_path / "imgs" / name)
    c_name = "imgs/c" + Path(c).suffix
    lines_in = [
        {"image": "imgs/a.png", "caption": "a cat", "meta": {"source": "coco", "id": 7}},
        {"image": "imgs/b.png", "caption": "東京の写真", "tags": ["x", "y"]},
        {"image": "imgs/a.png", "caption": "another caption of the same image"},
        "",  # blank: skipped
        "{not json",
        {"caption": "no image"},
        [1, 2],
        {"image": c_name},
        {"image": "imgs/missing.png", "caption": "gone"},
        {"image": c_name, "codes": [1, 2]},  # would be overwritten by the output's codes
        {"image": "imgs/b.png", "text": "a field named text is kept with --format codes"},
    ]
    listing = tmp_path / "rows.jsonl"
    listing.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines_in)
                       + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, printed, err = run(listing, out, "--chunk-size", "3")
    assert rc == 1 and "done 5, skipped 0 " in printed and "failed 5 " in printed, err
    want = {
        "imgs/a.png": {"image": "imgs/a.png", "caption": "a cat", "meta": {"source": "coco", "id": 7},
                       "codes": expected[a]},
        "imgs/a.png#2": {"image": "imgs/a.png#2", "caption": "another caption of the same image", "codes": expected[a]},
        "imgs/b.png": {"image": "imgs/b.png", "caption": "東京の写真", "tags": ["x", "y"], "codes": expected[b]},
        "imgs/b.png#2": {"image": "imgs/b.png#2", "text": "a field named text is kept with --format codes",
                         "codes": expected[b]},
        c_name: {"image": c_name, "codes": expected[c]},
    }
    got = rows(out, "codes")
    assert {r["image"]: r for r in got} == want and len(got) == len(want)
    assert all(list(r)[0] == "image" and list(r)[-1] == "codes" for r in got)
    errors = as_dict(rows(out, "errors"), "error")
    assert set(errors) == {"rows.jsonl:5", "rows.jsonl:6", "rows.jsonl:7", "imgs/missing.png", c_name + "#2"}
    assert "line 5: not valid JSON" in errors["rows.jsonl:5"]
    assert 'not a JSON object with an "image" path' in errors["rows.jsonl:6"]
    assert 'line 7: not a JSON object with an "image" path' in errors["rows.jsonl:7"]
    assert "no such file" in errors["imgs/missing.png"] and "codes would be overwritten" in errors[c_name + "#2"]

    redo = tear(out, 0, 1)  # a crash mid-chunk 0: one row kept, the next torn
    rc, printed, _ = run(listing, out)
    assert counts(printed)[0] == redo == 2
    assert {r["image"]: r for r in rows(out, "codes")} == want

    listing.write_text(listing.read_text(encoding="utf-8").replace("a cat", "a dog"), encoding="utf-8")
    rc, _, err = run(listing, out)
    assert rc == 2 and "the input changed" in err, err  # an edited caption would leave stale rows


def test_scripts_help_imports_nothing_heavy():
    code = """
import runpy, sys, time
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    t = time.perf_counter()
    try:
        runpy.run_path(name, run_name="__main__")
    except SystemExit:
        pass
    heavy = [m for m in ("torch", "transformers", "diffusers", "timm") if m in sys.modules]
    print(name, round(time.perf_counter() - t, 2), heavy, file=sys.stderr)
"""
    scripts = [f"scripts/{s}.py" for s in ("tokenize_dataset", "check_image", "seed_llama", "benchmark")]
    r = subprocess.run([sys.executable, "-c", code, *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = r.stderr.splitlines()
    assert len(report) == len(scripts), r.stderr
    for line in report:
        name, seconds, heavy = line.split(" ", 2)
        assert heavy == "[]" and float(seconds) < 3, line


def test_evaluation_lists_what_a_run_lists(tmp_path):
    """evaluate.py's image inputs (seed.evaluation.data) on a nested folder with a symlinked
    sub-folder: the images a run finds, by the same ids."""
    from seed.evaluation.data import load_examples

    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (images / "nested").mkdir(parents=True)
    elsewhere.mkdir()
    Image.open(PHOTOS[0]).convert("RGB").resize((64, 48)).save(images / "nested" / "a.png")
    Image.open(PHOTOS[1]).convert("RGB").resize((64, 48)).save(elsewhere / "b.jpg")
    os.symlink(elsewhere, images / "linked")
    (images / "notes.txt").write_text("ignored\n")
    listed = [e.id for e in load_examples(images).examples]
    assert listed == [it.id for it in discover(images)] == ["linked/b.jpg", "nested/a.png"]


def test_benchmark_resume_runs(tmp_path):
    r = subprocess.run([sys.executable, "scripts/benchmark_resume.py", "--rows", "2000", "--chunk-size", "300",
                        "--compare-old", "--dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # 7 chunks: 6 done; the last (200 images) half written with a torn line
    assert out["images_skipped"] == 1900 and out["images_to_do"] == 100
    for key in ("listing_s", "resume_plan_s", "peak_rss_gb", "old_resume_s"):
        assert out[key] > 0, key


def test_a_saved_tokenizer_folder_is_a_config(parity_tok, tmp_path):
    """A trained tokenizer (save_pretrained, a training run's export/) tokenizes a dataset with its own
    weights; overrides with a folder are refused; another folder's weights are another model."""
    saved = parity_tok.save_pretrained(tmp_path / "saved")
    want = {p.name: parity_tok.encode([p])[0].tolist() for p in PHOTOS}
    rc, _, err = run(PHOTOS[0].parent, tmp_path / "out", config=saved, overrides=[])
    assert rc == 0, err
    assert {r["image"]: r["codes"] for r in rows(tmp_path / "out", "codes")} == want
    rc, _, err = run(PHOTOS[0].parent, tmp_path / "out2", config=saved, overrides=["model.image_size=28"])
    assert rc == 2 and "saved tokenizer folder" in err, err
    # the folder's weights are in run.json: the same folder with other weights is refused
    from safetensors.torch import load_file, save_file

    w = load_file(saved / "model.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, saved / "model.safetensors", metadata={"format": "pt"})
    rc, _, err = run(PHOTOS[0].parent, tmp_path / "out", config=saved, overrides=[])
    assert rc == 2 and "model.safetensors" in err, err


def test_jsonl_ids_stay_unique_and_odd_rows_are_error_rows(tmp_path):
    """A BOM is not part of row 1; a literal ``a.png#2`` row keeps its own id beside a repeated
    ``a.png``; an image path that is not valid Unicode is an error row, not a crash."""
    src = tmp_path / "rows.jsonl"
    rows = [{"image": "a.png", "caption": "first"}, {"image": "a.png", "caption": "second"},
            {"image": "a.png#2", "caption": "a file whose name ends in #2"}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"image": "\\ud800.png", "caption": "x"}\n'
    src.write_bytes(b"\xef\xbb\xbf" + text.encode())
    items = discover(str(src))
    by_id = {it.id: it for it in items}
    assert by_id["a.png"].fields == {"caption": "first"}
    assert by_id["a.png#2"].fields == {"caption": "a file whose name ends in #2"}
    assert by_id["a.png#3"].fields == {"caption": "second"} and by_id["a.png#3"].file == "a.png"
    assert by_id["rows.jsonl:4"].error and "surrogate" in by_id["rows.jsonl:4"].error
    assert len(items) == 4
    seed.dataset.listing_hash(items)  # hashes without a crash
