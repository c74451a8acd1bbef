"""Every evaluation task end to end on the tiny configs (seed.evaluation.tasks, scripts/evaluate.py).

Models: `configs/seed_tiny.yaml` (reconstruction, codebook), the tiny stage-1 training config
(retrieval), `SeedLlama.from_pretrained("tiny")` with `seed2_tiny` (t2i, vqa, caption); CLIP and
Inception are tiny random stand-ins built in `evaluate_fixtures.py`. Nothing downloads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, PHOTOS, ROOT, TINY, TinyFeatures
from PIL import Image

import seed
from seed.evaluation import data as D
from seed.evaluation import tasks
from seed.evaluation.metrics import Clip, java_available, recall_at_k, vqa_accuracy

DECODE = {"steps": 1, "num_samples": 1, "height": 32, "width": 32}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def clip(tiny_clip_with_tokenizer):
    return Clip(tiny_clip_with_tokenizer)


@pytest.fixture(scope="module")
def pipe():
    from seed.llama import SeedLlama

    return SeedLlama.from_pretrained("tiny")


@pytest.fixture
def images(tmp_path) -> Path:
    """The three photos and a broken PNG in a folder."""
    d = tmp_path / "images"
    d.mkdir()
    for p in PHOTOS:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def items_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def check_report(r: dict, task: str, n: int, errors: int) -> None:
    assert r["task"] == task and r["n"] == n and r["n_errors"] == errors
    assert r["value"] == r["metrics"][r["metric"]]
    assert r["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert r["dataset"]["items"] == n + errors and len(r["dataset"]["ids_sha256"]) == 64
    assert "model" in r and "settings" in r


# --- data layouts ---------------------------------------------------------------------------------

def test_layouts_and_bad_rows_are_reported_and_skipped(tmp_path, images, caplog):
    kp = tmp_path / "dataset_flickr30k.json"
    kp.write_text(json.dumps({"images": [
        {"filename": "chelsea.png", "split": "test", "imgid": 7, "sentences": [{"raw": "A cat."}, {"raw": "Cat!"}]},
        {"filename": "camera.png", "split": "train", "imgid": 8, "sentences": [{"raw": "A man."}]},
        {"filename": "coffee.png", "split": "test", "imgid": 9, "sentences": "not a list"},
        {"filepath": "sub", "filename": "x.png", "split": "test", "cocoid": 10, "sentences": [{"raw": "X."}]},
    ]}))
    ds = D.load_examples(kp, image_root=images)
    assert [e.id for e in ds.examples] == ["7", "10"] and ds.bad == 1 and ds.layout == "karpathy:test"
    assert ds.examples[0].captions == ("A cat.", "Cat!") and ds.examples[1].image == str(images / "sub" / "x.png")

    jl = tmp_path / "pairs.jsonl"
    jl.write_text("\n".join([json.dumps({"image": "images/chelsea.png", "caption": "a cat"}),
                             json.dumps({"image": "images/camera.png", "captions": ["a", "b"]}),
                             json.dumps({"image": "images/coffee.png"}), "{not json", "",
                             json.dumps({"image": "images/chelsea.png", "caption": "the same image again"})]))
    ds = D.load_examples(jl, need_captions=True)
    # rows naming one image are one item with all their captions
    assert [e.captions for e in ds.examples] == [("a cat", "the same image again"), ("a", "b")] and ds.bad == 2
    assert [e.id for e in ds.examples] == ["images/chelsea.png", "images/camera.png"]
    assert "line 3" in caplog.text and "line 4" in caplog.text

    folder = D.load_examples(images)
    assert [e.id for e in folder.examples] == ["broken.png", "camera.png", "chelsea.png", "coffee.png"]
    with pytest.raises(seed.InputError, match="needs captions"):
        D.load_examples(images, need_captions=True)

    q = tmp_path / "questions.json"
    a = tmp_path / "annotations.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 42, "question": "What animal?"},
                                           {"question_id": 2, "image_id": 43, "question": "How many?"},
                                           {"question_id": 3, "question": "no image id"}]}))
    a.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "cat"}] * 10}]}))
    ds = D.load_vqa(q, a, images)
    assert [(e.id, e.question, e.answers[:1]) for e in ds.examples] == [("1", "What animal?", ("cat",))]
    assert ds.examples[0].image == str(images / "COCO_val2014_000000000042.jpg") and ds.bad == 2


# --- tokenizer tasks ------------------------------------------------------------------------------

def test_reconstruction_end_to_end_and_a_rerun_resumes_everything(tiny_tok, clip, images, tmp_path, capsys):
    out = tmp_path / "recon"
    fid = TinyFeatures()
    r = tasks.reconstruction(tiny_tok, D.load_examples(images), out, clip=clip, fid_features=fid,
                             is_logits=TinyFeatures(1), decode=DECODE, batch_size=2, fingerprint={"name": "tiny"})
    check_report(r, "reconstruction", 3, 1)
    assert r["metric"] == "clip_i" and {"clip_i", "FID", "IS"} <= set(r["metrics"])
    assert r["settings"]["decode"]["steps"] == 1 and r["model"] == {"name": "tiny"}
    assert "clip_i" in capsys.readouterr().out  # the table
    rows = {row["id"]: row for row in items_of(out)}
    assert "broken.png" in rows["broken.png"]["error"]
    # CLIP-I by its definition: cosine of projected CLIP embeddings of the input and the saved reconstruction
    for p in PHOTOS:
        recon = Image.open(out / rows[p.name]["images"][0])
        f = clip.image_features([Image.open(p).convert("RGB"), recon])
        assert float(f[0] @ f[1]) == pytest.approx(rows[p.name]["clip_i"], abs=1e-4)
    assert r["value"] == pytest.approx(sum(rows[p.name]["clip_i"] for p in PHOTOS) / 3, abs=1e-6)
    assert Image.open(out / "grid.png").size == (2 * 256, 3 * 256)

    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = tasks.reconstruction(tiny_tok, D.load_examples(images), out, clip=clip, fid_features=fid,
                                 is_logits=TinyFeatures(1), decode=DECODE, batch_size=2, fingerprint={"name": "tiny"})
    assert again["items_resumed"] == 3 and again["metrics"] == r["metrics"]  # the failed item is tried again
    assert again["n_errors"] == 1
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == stamps
    with pytest.raises(seed.InputError, match="decode.steps: 1 in run.json, 2 now"):
        tasks.reconstruction(tiny_tok, D.load_examples(images), out, decode={**DECODE, "steps": 2},
                             fingerprint={"name": "tiny"})


def test_codebook_from_a_tokenize_dataset_folder_and_from_images(tiny_tok, images, tmp_path):
    from seed.llm import codes_to_text

    folder = tmp_path / "codes_run"
    (folder / "codes").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"fingerprint": {"model": {"codebook": {"size": 16}}}}))
    rows = [{"image": "a.png", "codes": [0, 1, 2, 3]}, {"image": "b.png", "codes": [0, 1, 2, 4]},
            {"image": "c.png", "text": codes_to_text(torch.tensor([[0] * 32]))[0]}]
    (folder / "codes" / "000000.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n{torn")
    (folder / "codes" / "000001.jsonl").write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(seed.InputError, match="codes must be"):  # rows of 4 and of 32 codes do not stack
        tasks.codebook(tmp_path / "cb0", codes_folder=folder)
    (folder / "codes" / "000001.jsonl").unlink()
    r = tasks.codebook(tmp_path / "cb", codes_folder=folder)
    # codes used: 0, 1, 2 (twice each), 3, 4 (once): 5 of 16
    assert r["metrics"]["used"] == 5 and r["metrics"]["usage"] == 5 / 16 and r["n_bad_rows"] == 1
    assert r["codebook"]["most_used"][:3] == [[0, 2], [1, 2], [2, 2]]
    assert r["codebook"]["entropy_per_position_bits"] == pytest.approx([0, 0, 0, 1])
    assert (tmp_path / "cb" / "histogram.png").stat().st_size > 1000

    r = tasks.codebook(tmp_path / "cb2", tok=tiny_tok, data=D.load_examples(images), batch_size=2)
    check_report(r, "codebook", 3, 1)
    got = {row["id"]: row["codes"] for row in items_of(tmp_path / "cb2") if "codes" in row}
    assert got == {p.name: c for p, c in zip(PHOTOS, tiny_tok.encode(list(PHOTOS)).tolist())}


def test_retrieval_with_the_tiny_stage1_model_matches_its_training_forward(tmp_path):
    from seed.training.config import load_train_config
    from seed.training.models import build_model

    cfg = load_train_config(ROOT / "configs/train/seed1_stage1_tiny.yaml")
    model = build_model(cfg).eval()
    data = D.load_examples(DATA / "captions.jsonl", need_captions=True)
    r = tasks.retrieval(model, data, tmp_path / "ret", batch_size=2, ks=(1, 2, 10))
    check_report(r, "retrieval", 3, 0)
    # the same features from the training forward (the ITC loss's image_feat / text_feat)
    from seed.images import preprocess_image
    from seed.training.data import clean_caption

    px = torch.stack([preprocess_image(ex.open(), 28, "bicubic") for ex in data.examples for _ in ex.captions])
    caps = [clean_caption(c) for ex in data.examples for c in ex.captions]
    with torch.no_grad():
        out = model(px, caps, intermediates=True)
    img = out["image_feat"][::2]  # each image twice, once per caption
    expected = recall_at_k(img @ out["text_feat"].T, [0, 0, 1, 1, 2, 2], (1, 2, 10))
    assert r["metrics"] == pytest.approx(expected)
    assert r["metrics"]["i2t_R@10"] == 1.0 and r["texts"] == 6
    assert [row["id"] for row in items_of(tmp_path / "ret")] == [ex.id for ex in data.examples]


# --- SEED-LLaMA tasks -----------------------------------------------------------------------------

GREEDY = {"num_beams": 1, "max_new_tokens": 40}


def test_t2i_end_to_end_with_references(pipe, clip, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join([json.dumps({"caption": "a cat", "image": str(PHOTOS[1])}),
                               json.dumps({"caption": "a camera", "image": str(PHOTOS[0])}),
                               json.dumps({"caption": "a cup of coffee"}), json.dumps({"image": "x.png"})]))
    data = D.load_captions(caps)
    assert data.bad == 1 and len(data.examples) == 3
    r = tasks.text_to_image(pipe, data, tmp_path / "t2i", clip=clip, fid_features=TinyFeatures(), batch_size=2,
                            generation=GREEDY, decode=DECODE, seed=0)
    check_report(r, "t2i", 3, 0)
    assert r["metric"] == "clip_i" and {"clip_t", "clip_i", "FID"} <= set(r["metrics"])
    assert r["settings"]["template"] == "raw" and r["settings"]["decode"]["guidance_scale"] == 5.0
    rows = items_of(tmp_path / "t2i")
    assert "clip_i" in rows[0] and "clip_i" not in rows[2]
    neg = json.loads((tmp_path / "t2i" / "negative.json").read_text())["codes"]
    # the generated image is the decode of the generated codes (with the negative image, seeded)
    img = pipe.decode_images(torch.tensor([rows[0]["codes"]]), **DECODE | {"num_samples": 1}, seed=0,
                             guidance_scale=5.0, noise_level=0, negative_codes=torch.tensor(neg))[0]
    saved = Image.open(tmp_path / "t2i" / rows[0]["images"][0])
    diff = np.asarray(img).astype(int) - np.asarray(saved.convert("RGB")).astype(int)
    assert np.abs(diff).max() <= 1
    g, t = clip.image_features([saved]), clip.text_features(["a cat"])
    assert float(g[0] @ t[0]) == pytest.approx(rows[0]["clip_t"], abs=1e-4)


def test_vqa_end_to_end(pipe, tmp_path):
    root = tmp_path / "val2014"
    root.mkdir()
    for i, p in enumerate(PHOTOS[:2], 1):
        Image.open(p).convert("RGB").save(root / f"COCO_val2014_{i:012d}.jpg")
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"question_id": 10 + i, "image_id": i, "question": f"What is {i}?"}
                                           for i in (1, 2, 3)]}))  # image 3 is missing
    humans = ["cat"] * 3 + ["dog"] * 7
    a.write_text(json.dumps({"annotations": [{"question_id": 10 + i, "answers": [{"answer": h} for h in humans]}
                                             for i in (1, 2, 3)]}))
    r = tasks.vqa(pipe, D.load_vqa(q, a, root), tmp_path / "vqa", generation={"max_new_tokens": 6}, batch_size=2)
    check_report(r, "vqa", 2, 1)
    rows = items_of(tmp_path / "vqa")
    first = pipe.generate([[Image.open(root / "COCO_val2014_000000000001.jpg"), "Question: What is 1?\nAnswer:"]],
                          do_sample=False, max_new_tokens=6, decode_images=False)[0].text.strip()
    assert rows[0]["answer"] == (first.splitlines()[0].strip() if first else "")  # batched greedy = alone
    assert rows[0]["accuracy"] == vqa_accuracy(rows[0]["answer"], humans)
    assert "error" in rows[2]
    assert r["value"] == pytest.approx((rows[0]["accuracy"] + rows[1]["accuracy"]) / 2)


@pytest.mark.skipif(not java_available(), reason="CIDEr needs Java")
def test_caption_end_to_end(pipe, tmp_path):
    r = tasks.caption(pipe, D.load_examples(DATA / "captions.jsonl", need_captions=True), tmp_path / "cap",
                      generation={"max_new_tokens": 8}, batch_size=3)
    check_report(r, "caption", 3, 0)
    assert r["metric"] == "CIDEr" and {"CIDEr", "BLEU-4"} <= set(r["metrics"])
    rows = items_of(tmp_path / "cap")
    assert all("CIDEr" in row and isinstance(row["caption"], str) for row in rows)
    assert r["value"] == pytest.approx(sum(row["CIDEr"] for row in rows) / 3, abs=1e-6)


# --- the script -----------------------------------------------------------------------------------

def test_script_reconstruction(tiny_clip_with_tokenizer, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = script("evaluate").main(["reconstruction", "--config", str(TINY), "--images", str(images), "--out", str(out),
                                  "--clip", str(tiny_clip_with_tokenizer), "--inception", "none", "--device", "cpu",
                                  "--no-progress", "diffusion.steps=1", "diffusion.num_samples=1",
                                  "diffusion.height=32", "diffusion.width=32"])
    captured = capsys.readouterr()
    assert rc == 1, "an unreadable image makes the exit status 1"
    assert "broken.png" in captured.err and "clip_i" in captured.out
    r = report_of(out)
    assert r["n"] == 3 and r["model"]["model"]["image_size"] == seed.load_config(TINY).model.image_size
    ev = script("evaluate")
    ev.load_tokenizer = lambda *a: pytest.fail("the tokenizer loaded before the CLIP model was checked")
    rc = ev.main(["reconstruction", "--config", str(TINY), "--images", str(images), "--out", str(out),
                  "--clip", "nobody/no-such-clip", "--inception", "none"])
    assert rc == 2 and "--allow-download" in capsys.readouterr().err


def test_script_reconstruction_offline_reports_psnr_ssim_and_logs_progress_lines(images, tmp_path, capsys, caplog):
    """--clip none --inception none: PSNR and SSIM (no weights to download) make the table; on a
    non-terminal the progress is log lines, not tqdm fragments."""
    import logging

    from seed.evaluation.metrics import pixel_scores

    (images / "broken.png").unlink()
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="seed.evaluation"):
        rc = script("evaluate").main(["reconstruction", "--config", str(TINY), "--images", str(images), "--out",
                                      str(out), "--clip", "none", "--inception", "none", "--device", "cpu",
                                      "diffusion.steps=1", "diffusion.num_samples=1", "diffusion.height=32",
                                      "diffusion.width=32"])
    captured = capsys.readouterr()
    assert rc == 0
    r = report_of(out)
    assert r["metric"] == "psnr" and isinstance(r["value"], float) and 0 < r["value"] < 60
    assert 0 < r["metrics"]["ssim"] < 1 and "psnr" in captured.out and "ssim" in captured.out
    item = items_of(out)[0]  # per item: PSNR / SSIM of its reconstruction vs its input at 256 px
    psnr, ssim = pixel_scores(Image.open(images / item["id"]), [Image.open(out / item["images"][0])], 256)
    assert item["psnr"] == pytest.approx(psnr[0]) and item["ssim"] == pytest.approx(ssim[0])
    assert "reconstruction rank 0/1: 3/3 items (100%)" in caplog.text
    assert "\r" not in captured.err and "it/s" not in captured.err and "item/s" not in captured.err


def test_a_killed_t2i_run_resumes_without_regenerating(tmp_path, capsys):
    n = 12
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(f"a photo of a cat number {i}" for i in range(n)) + "\n")
    out = tmp_path / "t2i"
    args = ["t2i", "--llm", "tiny", "--captions", str(caps), "--out", str(out), "--clip", "none", "--inception", "none",
            "--batch-size", "1", "--no-progress", "--generation", "num_beams=1", "max_new_tokens=40",
            "--decode", "steps=1", "height=32", "width=32"]
    proc = subprocess.Popen([sys.executable, "scripts/evaluate.py", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    items = out / "items" / "rank000.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if items.is_file() and items.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill: no handler runs
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = [json.loads(line) for line in items.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    assert 2 <= len(before) < n, "the run must be killed half-way"
    stamps = {row["id"]: (out / row["images"][0]).stat().st_mtime_ns for row in before}

    assert script("evaluate").main(args) == 0  # the same command again resumes
    r = report_of(out)
    assert r["n"] == n and r["items_resumed"] == len(before)
    assert "t2i" in capsys.readouterr().out
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert rows[:len(before)] == before  # the finished items' rows are untouched...
    assert sorted(row["id"] for row in rows) == sorted(str(i) for i in range(1, n + 1))  # ...and none is done twice
    paths = {row["id"]: row["images"][0] for row in rows}
    assert {i: (out / paths[i]).stat().st_mtime_ns for i in stamps} == stamps  # never regenerated
    assert [row["id"] for row in items_of(out)] == [str(i) for i in range(1, n + 1)]


def test_torchrun_two_processes_share_the_items_and_rank0_reports(tmp_path):
    folder = tmp_path / "codes_run"
    (folder / "codes").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"fingerprint": {"model": {"codebook": {"size": 8192}}}}))
    (folder / "codes" / "000000.jsonl").write_text("".join(
        json.dumps({"image": f"{i:02d}.png", "codes": [i] * 32}) + "\n" for i in range(10)))
    out = tmp_path / "cb"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "scripts/evaluate.py", "codebook", "--codes", str(folder), "--out", str(out),
                          "--batch-size", "2", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("codebook on") == 1  # one table, from rank 0
    ranks = [[json.loads(line)["id"] for line in (out / "items" / f"rank00{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert ranks == [[f"{i:02d}.png" for i in range(0, 10, 2)], [f"{i:02d}.png" for i in range(1, 10, 2)]]
    r = report_of(out)
    assert r["n"] == 10 and r["metrics"]["used"] == 10 and r["metrics"]["entropy_bits"] == pytest.approx(np.log2(10))


# --- resume: what counts as the same run ----------------------------------------------------------

def _finish_all(out: Path, data: D.Dataset, ok: bool = True) -> list[str]:
    """A run of ``data`` in ``out`` that finishes every item left (an error row each unless ``ok``); the ids done."""
    from seed.evaluation.runner import Run

    with Run(out, "t2i", data, {"m": 1}, {"s": 1}, progress=False) as run:
        todo = [ex.id for ex in run.todo]
        run.write([{"id": i, "x": 1} if ok else {"id": i, "error": "no image"} for i in todo])
    return todo


def test_a_rerun_on_other_captions_or_images_with_the_same_ids_is_refused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a red cat\na blue dog\n")
    b.write_text("a green car\na blue dog\n")  # the same ids (line numbers), another caption
    out = tmp_path / "out"
    assert _finish_all(out, D.load_captions(a)) == ["1", "2"]
    assert _finish_all(out, D.load_captions(a)) == []  # the same data resumes: nothing to do
    with pytest.raises(seed.InputError, match=f"dataset {b} differs in content"):
        _finish_all(out, D.load_captions(b))
    # JSONL rows without "id", the same paths under another --image-root: other images
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"image": "chelsea.png", "caption": "a cat"}) + "\n")
    _finish_all(tmp_path / "out2", D.load_examples(rows, image_root=tmp_path / "v1"))
    with pytest.raises(seed.InputError, match="differs in content"):
        _finish_all(tmp_path / "out2", D.load_examples(rows, image_root=tmp_path / "v2"))


def test_failed_items_are_tried_again_and_their_last_result_counts(tmp_path):
    from seed.evaluation.runner import Run

    caps = tmp_path / "caps.txt"
    caps.write_text("one\ntwo\nthree\n")
    data, out = D.load_captions(caps), tmp_path / "out"
    with Run(out, "t2i", data, {}, {}, progress=False) as run:
        run.write([{"id": "1", "x": 1}, {"id": "2", "error": "unreadable"}, {"id": "3", "error": "unreadable"}])
    # an earlier, larger run (2 processes) left a later failure of item 3 in rank001's file
    (out / "items" / "rank001.jsonl").write_text(json.dumps({"id": "3", "error": "old failure"}) + "\n")
    with Run(out, "t2i", data, {}, {}, progress=False) as run:
        assert [ex.id for ex in run.todo] == ["2", "3"] and run.skipped == 1
        run.write([{"id": "2", "error": "still unreadable"}, {"id": "3", "x": 3}])
        rows = run.gather()
    assert rows == [{"id": "1", "x": 1}, {"id": "2", "error": "still unreadable"}, {"id": "3", "x": 3}]


def test_generated_image_names_never_collide(tmp_path):
    from seed.evaluation.runner import Run

    caps = tmp_path / "caps.txt"
    caps.write_text("x\n")
    run = Run(tmp_path / "out", "t2i", D.load_captions(caps), {}, {})
    long = "x" * 150
    names = [run.image_path(i).name for i in ("a/b.png", "a_b.png", long + "1", long + "2")]
    assert len(set(names)) == 4 and all(len(n) < 200 for n in names)
    assert run.image_path("a/b.png") == run.image_path("a/b.png")  # stable: a resumed run finds its images


def test_model_and_codes_fingerprints_see_rewritten_files(tmp_path):
    from safetensors.torch import save_file

    from seed.evaluation.runner import files_fingerprint

    llm = tmp_path / "llm"
    llm.mkdir()
    w = llm / "model.safetensors"
    save_file({"a": torch.zeros(4)}, w)
    before = files_fingerprint(llm)
    save_file({"b": torch.zeros(4)}, w)  # the same size, another tensor name
    os.utime(w, ns=(w.stat().st_atime_ns, before["model.safetensors"][1]))  # even with the same mtime
    assert w.stat().st_size == before["model.safetensors"][0] and files_fingerprint(llm) != before
    mid = files_fingerprint(llm)
    save_file({"b": torch.ones(4)}, w)  # same header, other values: the mtime tells
    os.utime(w, ns=(w.stat().st_atime_ns, mid["model.safetensors"][1] + 10**9))
    assert files_fingerprint(llm) != mid

    folder = tmp_path / "codes_run"
    (folder / "codes").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"fingerprint": {"model": {"codebook": {"size": 16}}}}))
    f = folder / "codes" / "000000.jsonl"
    f.write_text(json.dumps({"image": "a.png", "codes": [1, 2]}) + "\n")
    tasks.codebook(tmp_path / "cb", codes_folder=folder, progress=False)
    mtime = f.stat().st_mtime_ns
    f.write_text(json.dumps({"image": "a.png", "codes": [3, 4]}) + "\n")  # retokenized: same id, same size
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(seed.InputError, match="codes_files"):
        tasks.codebook(tmp_path / "cb", codes_folder=folder, progress=False)


# --- bad input: clear errors, up front ------------------------------------------------------------

def test_bad_vqa_rows_and_patterns_are_named(tmp_path, caplog):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "ok?"},
                                           {"question_id": 2, "image": 5, "question": "image not a path?"},
                                           {"image_id": 3, "question": "no question_id?"}]}))
    ds = D.load_vqa(q, None, tmp_path)
    assert [e.id for e in ds.examples] == ["1"] and ds.bad == 2
    assert "question 3: expected 'question_id'" in caplog.text and "no annotation" not in caplog.text
    with pytest.raises(seed.InputError, match=r"image pattern '\{foo\}.jpg'.*image_id"):
        D.load_vqa(q, None, tmp_path, "{foo}.jpg")
    from seed.evaluation.runner import Run

    none_answered = tmp_path / "a.json"
    none_answered.write_text(json.dumps({"annotations": []}))
    with pytest.raises(seed.InputError, match="no usable items"):  # nothing to run is an error, not an empty report
        Run(tmp_path / "out", "vqa", D.load_vqa(q, none_answered, tmp_path), {}, {})


def test_bad_prompts_and_generation_settings_fail_before_generating(pipe, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("a cat\n")
    data = D.load_captions(caps)
    with pytest.raises(seed.InputError, match=r"prompt 'Q: \{q\}'.*\{question\}"):
        tasks.vqa(pipe, data, tmp_path / "v", prompt="Q: {q}")
    with pytest.raises(seed.InputError, match="generation num_beams='abc': expected int"):
        tasks.vqa(pipe, data, tmp_path / "v", generation={"num_beams": "abc"})
    with pytest.raises(seed.InputError, match="decode steps=1.5: expected int"):
        tasks.text_to_image(pipe, data, tmp_path / "t", decode={"steps": 1.5})
    assert not (tmp_path / "v").exists() and not (tmp_path / "t").exists()


def test_script_bad_input_exits_2_with_a_message(tiny_tok, images, tmp_path, capsys):
    ev = script("evaluate")
    folder = tiny_tok.save_pretrained(tmp_path / "tok")
    out = str(tmp_path / "out")
    rc = ev.main(["reconstruction", "--config", str(folder), "--images", str(images), "--out", out,
                  "--clip", "none", "--inception", "none", "diffusion.steps=1"])
    assert rc == 2 and "overrides apply to a config" in capsys.readouterr().err  # not silently ignored
    rc = ev.main(["retrieval", "--train-config", str(ROOT / "configs/train/seed1_stage2_tiny.yaml"),
                  "--data", str(DATA / "captions.jsonl"), "--out", out])
    assert rc == 2 and "stage-1 training config" in capsys.readouterr().err
    codes = tmp_path / "codes_run"
    (codes / "codes").mkdir(parents=True)
    (codes / "run.json").write_text("{torn")
    assert ev.main(["codebook", "--codes", str(codes), "--out", out]) == 2
    assert "run.json: not a tokenize_dataset.py run record" in capsys.readouterr().err
    # settings are checked before the LLM loads (the captions / questions files do not even exist)
    assert ev.main(["t2i", "--llm", "tiny", "--captions", "x.txt", "--out", out, "--generation", "num_beams"]) == 2
    assert ev.main(["t2i", "--llm", "tiny", "--captions", "x.txt", "--out", out, "--generation", "num_beams=abc"]) == 2
    assert "num_beams='abc': expected int" in capsys.readouterr().err
    assert ev.main(["vqa", "--llm", "tiny", "--questions", "q.json", "--image-root", ".", "--out", out,
                    "--prompt", "Q: {q}"]) == 2
    assert "prompt 'Q: {q}'" in capsys.readouterr().err
    # keys too: a mistyped decode or generation setting, before any data or model is read
    from seed.llama import SeedLlama

    real = SeedLlama.from_pretrained
    SeedLlama.from_pretrained = lambda *a, **k: pytest.fail("the LM loaded before the settings were checked")
    try:
        assert ev.main(["t2i", "--llm", "tiny", "--captions", "x.txt", "--out", out, "--decode", "guidance=5"]) == 2
        err = capsys.readouterr().err
        assert "decode guidance=5: not a decode setting" in err and "did you mean guidance_scale" in err
        assert [line for line in err.splitlines() if line.strip()] == [err.strip()]  # one line
        assert ev.main(["vqa", "--llm", "tiny", "--questions", "q.json", "--image-root", ".", "--out", out,
                        "--generation", "foo=1"]) == 2
        assert "generation foo=1: not a generation setting" in capsys.readouterr().err
        assert ev.main(["t2i", "--llm", "tiny", "--captions", "x.txt", "--out", out, "--decode", "num_samples=4"]) == 2
        assert "one image per caption" in capsys.readouterr().err
    finally:
        SeedLlama.from_pretrained = real
    assert not Path(out).exists()
    with pytest.raises(SystemExit) as e:
        ev.main(["codebook", "--codes", str(codes), "--out", out, "--batch-size", "-1"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_t2i_unreadable_references_are_counted_and_exit_1(pipe, clip, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join([json.dumps({"caption": "a cat", "image": str(PHOTOS[1])}),
                               json.dumps({"caption": "a camera", "image": str(PHOTOS[0])}),
                               json.dumps({"caption": "a dog", "image": str(bad)})]))
    out = tmp_path / "t2i"
    r = tasks.text_to_image(pipe, D.load_captions(caps), out, clip=clip, fid_features=TinyFeatures(), batch_size=3,
                            generation=GREEDY, decode=DECODE, negative=False, seed=0, progress=False)
    assert r["n"] == 3 and r["n_reference_errors"] == 1
    assert r["n_per_metric"] == {"clip_t": 3, "clip_i": 2, "FID_real": 2, "FID_generated": 3}
    assert "bad.png" in items_of(out)[2]["reference_error"]
    ev = script("evaluate")
    monkeypatch.setattr(ev, "run", lambda args: report_of(out))  # the exit status of that report
    assert ev.main(["t2i", "--llm", "tiny", "--captions", str(caps), "--out", str(out)]) == 1
    assert "1 reference image(s) could not be read" in capsys.readouterr().err
    # the reference fixed, a rerun does that item again and scores it (the two others are kept)
    bad.write_bytes(PHOTOS[2].read_bytes())
    r = tasks.text_to_image(pipe, D.load_captions(caps), out, clip=clip, fid_features=TinyFeatures(), batch_size=3,
                            generation=GREEDY, decode=DECODE, negative=False, seed=0, progress=False)
    assert r["items_resumed"] == 2 and r["n"] == 3 and r["n_reference_errors"] == 0
    assert r["n_per_metric"] == {"clip_t": 3, "clip_i": 3, "FID_real": 3, "FID_generated": 3}
    assert "reference_error" not in items_of(out)[2] and "clip_i" in items_of(out)[2]


# --- what a run records and groups ----------------------------------------------------------------

def test_a_resume_with_other_metric_weights_is_refused(tiny_tok, tmp_path):
    from seed.dataset import OutputError

    data = D.load_examples(DATA / "captions.jsonl")
    out = tmp_path / "rec"
    kw = {"batch_size": 3, "decode": DECODE, "grid_rows": 0, "progress": False}
    r = tasks.reconstruction(tiny_tok, data, out, fid_features=TinyFeatures(0), **kw)
    from seed.evaluation.metrics import weights_sha256

    assert r["settings"]["metric_weights"]["inception"] == {"sha256": weights_sha256(TinyFeatures(0)),
                                                            "standard": False}
    assert tasks.reconstruction(tiny_tok, data, out, fid_features=TinyFeatures(0), **kw)["items_resumed"] == 3
    with pytest.raises(OutputError, match="metric_weights.inception.sha256"):
        tasks.reconstruction(tiny_tok, data, out, fid_features=TinyFeatures(1), **kw)


def test_one_row_per_pair_and_one_row_per_image_give_the_same_items_and_numbers(tmp_path):
    from seed.training.config import load_train_config
    from seed.training.models import build_model

    grouped = tmp_path / "grouped.jsonl"
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (DATA / "captions.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(DATA / r["image"])
    grouped.write_text("\n".join(json.dumps(r) for r in rows))
    pairs.write_text("\n".join(json.dumps({"image": r["image"], "caption": c}) for r in rows for c in r["caption"]))
    a, b = D.load_examples(grouped, need_captions=True), D.load_examples(pairs, need_captions=True)
    assert [(e.id, e.image, e.captions) for e in a.examples] == [(e.id, e.image, e.captions) for e in b.examples]
    assert len(b.examples) == 3 and all(len(e.captions) == 2 for e in b.examples)
    model = build_model(load_train_config(ROOT / "configs/train/seed1_stage1_tiny.yaml")).eval()
    ra = tasks.retrieval(model, a, tmp_path / "a", ks=(1, 2), progress=False)
    rb = tasks.retrieval(model, b, tmp_path / "b", ks=(1, 2), progress=False)
    assert ra["metrics"] == rb["metrics"] and rb["images"] == 3 and rb["texts"] == 6


def test_lone_surrogates_in_the_data_are_bad_rows_not_a_crash(tmp_path, caplog):
    from seed.evaluation.runner import Run, content_hash

    half_emoji = "a cat \ud83d"  # a JSON escape of half a surrogate pair: not valid Unicode
    assert len(content_hash([D.Example("x", None, (half_emoji,))])) == 64  # hashing never raises
    jl = tmp_path / "caps.jsonl"
    jl.write_text("\n".join([json.dumps({"image": str(PHOTOS[1]), "caption": half_emoji}),
                             json.dumps({"image": str(PHOTOS[0]), "caption": "a camera"})]))
    for ds in (D.load_examples(jl, need_captions=True), D.load_captions(jl)):
        assert ds.bad == 1 and [e.captions for e in ds.examples] == [("a camera",)]
        with Run(tmp_path / "run", "t2i", ds, {}, {}, progress=False) as run:
            assert len(run.todo) == 1
    assert "valid Unicode" in caplog.text
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "What \ud83d?"},
                                           {"question_id": 2, "image_id": 2, "question": "What?"}]}))
    a.write_text(json.dumps({"annotations": [{"question_id": 2, "answers": [{"answer": "x\udc00"}] * 10}]}))
    ds = D.load_vqa(q, a, tmp_path)
    assert ds.bad == 2 and not ds.examples


def test_a_changed_image_tokenizer_config_is_refused_on_rerun(tmp_path, capsys):
    """vqa with --image-tokenizer a YAML: its model section (and weight files) are in run.json, so a
    rerun after the YAML changed is refused, not resumed with other codes."""
    import shutil

    ev = script("evaluate")
    yaml = tmp_path / "itok.yaml"
    shutil.copy(ROOT / "configs" / "seed2_tiny.yaml", yaml)
    root = tmp_path / "val2014"
    root.mkdir()
    Image.open(PHOTOS[1]).convert("RGB").save(root / "COCO_val2014_000000000001.jpg")
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "What?"}]}))
    out = tmp_path / "vqa"
    argv = ["vqa", "--llm", "tiny", "--image-tokenizer", str(yaml), "--questions", str(q), "--image-root", str(root),
            "--out", str(out), "--generation", "max_new_tokens=2", "--device", "cpu", "--no-progress"]
    assert ev.main(argv) == 0
    rec = json.loads((out / "run.json").read_text())["model"]["image_tokenizer"]
    assert rec["model"]["image_resample"] == "bilinear" and set(rec["weights"].values()) == {None}  # random
    assert ev.main(argv) == 0  # the same: resumed
    yaml.write_text(yaml.read_text().replace("image_resample: bilinear", "image_resample: bicubic"))
    capsys.readouterr()
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.image_tokenizer.model.image_resample" in err and "another run" in err
    # the default image tokenizer is fingerprinted the same way
    assert ev.image_tokenizer_fingerprint("seed2_tiny")["model"] == seed.load_config("seed2_tiny").model
