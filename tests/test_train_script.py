"""scripts/train_tokenizer.py end to end on the CPU: torchrun with 2 processes (gloo), checkpoints,
bit-for-bit resume, the stage-2 export, and the stage-1 gather (1 process == 2 processes)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import seed
from conftest import PHOTOS, ROOT
from seed.training.config import load_train_config
from seed.training.loop import CodebookUsage, restart_dead_codes
from seed.training.optim import linear_warmup_cosine_lr
from seed.training.run import checkpoints, read_checkpoint

SCRIPT = ROOT / "scripts" / "train_tokenizer.py"
STAGE1 = ROOT / "configs" / "train" / "seed1_stage1_tiny.yaml"
STAGE2 = ROOT / "configs" / "train" / "seed1_stage2_tiny.yaml"
CAPTIONS = {"camera": ["A man in a dark coat looks through a camera on a tripod.", "An old camera on a tripod!"],
            "chelsea": ["A tabby cat with green eyes, looking to the side!", "A striped cat (close-up)."],
            "coffee": ["A cup of coffee (with latte art) on a saucer.", "Coffee in a white cup."]}
STEPS, HALF = 24, 12


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A captioned folder: photos/ + pairs.jsonl (relative paths, caption lists, one missing image)
    and the same pairs as a WebDataset tar shard."""
    root = tmp_path_factory.mktemp("data")
    (root / "photos").mkdir()
    rows = []
    for p in PHOTOS:
        shutil.copy(p, root / "photos" / p.name)
        rows.append({"image": f"photos/{p.name}", "caption": CAPTIONS[p.stem]})
    rows.append({"image": "photos/missing.png", "caption": "gone"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with tarfile.open(root / "shard-000.tar", "w") as tf:
        for p in PHOTOS:
            for name, payload in ((f"{p.stem}.png", p.read_bytes()), (f"{p.stem}.txt", CAPTIONS[p.stem][0].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return root


@pytest.fixture(scope="module")
def stage2_run(data, tmp_path_factory):
    """2 processes x 1 image, STEPS steps of the tiny stage-2 config, checkpoints every HALF."""
    out = tmp_path_factory.mktemp("stage2")
    r = torchrun(2, "--config", str(STAGE2), f"data.train={data / 'pairs.jsonl'}", f"train.output_dir={out}",
                 f"train.max_steps={STEPS}", f"train.save_every={HALF}", "data.batch_size=1", "train.log_every=2")
    return out, r


def test_stage2_trains_with_torchrun_and_the_loss_falls(stage2_run):
    out, r = stage2_run
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in rows]
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    for m in rows:  # the weighted terms add up to the total, as the original's forward
        assert m["loss"] == pytest.approx(m["loss_embed"] + m["loss_recon_s"] + m["loss_distil_text"], rel=1e-5)
        assert 1 <= m["perplexity"] <= 8192 and 0 < m["codes_used"] <= 1
    assert f"step {STEPS}/{STEPS}" in r.stderr and "images_per_s" in r.stderr and "perplexity" in r.stderr


def test_lr_follows_the_original_schedule(stage2_run):
    """Per step: warmup_lr at iteration 0, linear warmup, then init_lr (the tiny config's numbers)."""
    out, _ = stage2_run
    cfg = load_train_config(STAGE2)
    assert [m["lr"] for m in metrics(out)][:3] == pytest.approx([1e-4, 5.5e-4, 1e-3])
    t = cfg.train
    for m in metrics(out):
        step = m["step"] - 1
        assert m["lr"] == linear_warmup_cosine_lr(step // t.iters_per_epoch, step % t.iters_per_epoch,
                                                  init_lr=t.init_lr, min_lr=t.min_lr, warmup_lr=t.warmup_lr,
                                                  warmup_steps=t.warmup_steps, max_epoch=t.max_epoch)


def test_missing_image_is_skipped_and_counted(stage2_run):
    out, r = stage2_run
    assert metrics(out)[-1]["skipped_images"] >= 1
    assert "missing.png: no such file" in r.stderr


def test_checkpoints_hold_everything_to_resume(stage2_run):
    out, _ = stage2_run
    folders = checkpoints(out)
    assert [f.name for f in folders] == [f"step_{HALF:08d}", f"step_{STEPS:08d}"]
    tensors, state = read_checkpoint(folders[-1])  # torch.load(weights_only=True) inside
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert set(state["position"]) == {"epoch", "index"}
    assert state["optimizer"]["state"] and "scaler" in state
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seed + rank
    assert "quantizer.codebook.weight" in tensors and not any(k.startswith(("vision.", "qformer.")) for k in tensors)
    assert (folders[-1] / "config.yaml").is_file() and not list((out / "checkpoints").glob(".*"))


def test_sigkill_mid_run_then_resume_ends_with_the_same_weights(stage2_run, data, tmp_path):
    """A real kill: SIGKILL the whole torchrun job (agent and both ranks) as soon as its step-8
    checkpoint lands, wherever the job is then (training, writing the next checkpoint), and rerun
    with --resume: the same final weights as the uninterrupted run."""
    out, _ = stage2_run
    args = ["--config", str(STAGE2), f"data.train={data / 'pairs.jsonl'}", f"train.output_dir={tmp_path}",
            f"train.max_steps={STEPS}", "train.save_every=4", "data.batch_size=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *args]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoints" / "step_00000008").is_dir() and job.poll() is None:
        assert time.monotonic() < deadline, "no step-8 checkpoint in time"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    done = [c.name for c in checkpoints(tmp_path)]
    assert f"step_{STEPS:08d}" not in done, "the job finished before the kill: nothing was tested"
    torchrun(2, *args, "--resume")
    a = load_file(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, STEPS + 1))


def test_resume_after_a_kill_ends_with_the_same_weights(stage2_run, data, tmp_path):
    """A run killed after its step-12 checkpoint (metrics of later steps already written), resumed
    with --resume: the same losses at every later step and bit-identical final weights."""
    out, _ = stage2_run
    shutil.copytree(out / "checkpoints" / f"step_{HALF:08d}", tmp_path / "checkpoints" / f"step_{HALF:08d}")
    shutil.copy(out / "metrics.jsonl", tmp_path / "metrics.jsonl")
    r = torchrun(2, "--config", str(STAGE2), "--resume", f"data.train={data / 'pairs.jsonl'}", f"train.output_dir={tmp_path}",
                 f"train.max_steps={STEPS}", f"train.save_every={HALF}", "data.batch_size=1")
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{HALF:08d}'}" in r.stderr
    a = load_file(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first, second = metrics(out), metrics(tmp_path)
    assert [m["step"] for m in second] == list(range(1, STEPS + 1))  # the killed run's later lines were dropped
    for m1, m2 in zip(first, second):
        assert {k: v for k, v in m1.items() if k != "images_per_s"} == {k: v for k, v in m2.items()
                                                                        if k != "images_per_s"}


def test_export_encodes_with_from_pretrained(stage2_run):
    out, _ = stage2_run
    tok = seed.Tokenizer.from_pretrained(out / "export", device="cpu")
    codes = tok.encode(PHOTOS)
    assert codes.shape == (3, 32) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 8192
    assert tok.embed(codes).shape == (3, 77, 24)
    exported = load_file(out / "export" / "model.safetensors")
    trained = load_file(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    shared = [k for k in trained if k.startswith(("quantizer.", "decoder."))]
    assert "quantizer.codebook.weight" in shared
    assert all(torch.equal(exported[k], trained[k]) for k in shared)


def test_stage1_one_process_equals_two_processes(data, tmp_path):
    """The same global batch (2 images) in 1 process and in 2 processes x 1: the same first-step
    contrastive loss, so features are gathered across ranks correctly (dropout off)."""
    common = [f"data.train={data / 'shard-000.tar'}", "train.max_steps=1", "dropout=0"]
    torchrun(2, "--config", str(STAGE1), *common, f"train.output_dir={tmp_path / 'two'}", "data.batch_size=1")
    _train_in_process(load_train_config(STAGE1, *common, f"train.output_dir={tmp_path / 'one'}", "data.batch_size=2",
                                        "train.progress=false"))
    one, two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert one["loss_itc"] > 0.05
    assert two["loss_itc"] == pytest.approx(one["loss_itc"], rel=1e-5)


def _train_in_process(cfg, **kwargs):
    from seed.training.loop import train

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return train(cfg, **kwargs)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def script(*args) -> int:
    """scripts/train_tokenizer.py's main in this process (no torchrun start): its exit status."""
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return module.main([str(a) for a in args])
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """One step of 2 images at once vs. 2 micro-batches of 1 (dropout off): the same loss, and
    AdamW's first update (about lr x sign(grad)) the same except where a gradient is ~0. Were
    only the last micro-batch's gradient kept, ~4% of the weights would move by 2 x lr."""
    runs = {}
    for batch, accum in ((2, 1), (1, 2)):
        out = tmp_path / f"b{batch}a{accum}"
        _train_in_process(load_train_config(STAGE2, f"train.output_dir={out}", "train.max_steps=1", "dropout=0",
                                            f"data.batch_size={batch}", f"train.grad_accum={accum}",
                                            "train.progress=false"))
        runs[accum] = out
    assert metrics(runs[1])[0]["loss"] == pytest.approx(metrics(runs[2])[0]["loss"], rel=1e-6)
    a, b = (load_file(runs[k] / "checkpoints" / "step_00000001" / "model.safetensors") for k in (1, 2))
    lr = metrics(runs[1])[0]["lr"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < lr / 2
    moved = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a) / sum(t.numel() for t in a.values())
    assert moved < 0.01


def test_seed2_objective_trains_and_exports(tmp_path):
    """The SEED-2 tiny config in one process: the CLIP image-embedding term is trained and logged,
    and the export is a SEED-2 tokenizer (one D-wide embedding per image)."""
    _train_in_process(load_train_config(ROOT / "configs" / "train" / "seed2_stage2_tiny.yaml",
                                        f"train.output_dir={tmp_path}", "train.max_steps=2", "train.progress=false"))
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(m["loss_distil_image"] > 0 and "loss_distil_text" not in m for m in rows)
    tok = seed.Tokenizer.from_pretrained(tmp_path / "export", device="cpu")
    assert tok.embed(tok.encode(PHOTOS)).shape == (3, 20)


# --- runs that survive: the checkpoint's config, non-finite losses, torn metrics, bad folders ----

QFORMER = ROOT / "tests" / "data" / "parity" / "training" / "training-tiny" / "causal_qformer_stage1.pth"
OTHER_QFORMER = QFORMER.with_name("blip2_pretrained.pth")


@pytest.fixture(scope="module")
def qformer_run(tmp_path_factory):
    """The tiny stage 2 started from a stage-1 file (the README's init.qformer=...), in this
    process: 3 steps, checkpoints at 2 and 3, and its export."""
    out = tmp_path_factory.mktemp("qformer_run")
    _train_in_process(load_train_config(STAGE2, f"init.qformer={QFORMER}", f"train.output_dir={out}",
                                        "train.max_steps=3", "train.save_every=2", "train.progress=false",
                                        "data.batch_size=1"))
    return out


def killed_copy(run, dest, step=2):
    """``dest`` as a run killed after its step-``step`` checkpoint (later metric lines kept)."""
    name = f"step_{step:08d}"
    shutil.copytree(run / "checkpoints" / name, dest / "checkpoints" / name)
    shutil.copy(run / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


def same_weights(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_speed(rows):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def test_export_from_without_export_to_writes_beside_the_checkpoints_run(qformer_run, tmp_path):
    """No --export-to: RUN/export_step_N, never the config file's output folder nor the run's export/."""
    ckpt = qformer_run / "checkpoints" / "step_00000003"
    final = (qformer_run / "export" / "model.safetensors").read_bytes()
    assert script("--config", STAGE2, "--export-from", ckpt) == 0
    assert same_weights(qformer_run / "export" / "model.safetensors",
                        qformer_run / "export_step_00000003" / "model.safetensors")
    assert (qformer_run / "export" / "model.safetensors").read_bytes() == final
    loose = tmp_path / "step_00000003"
    shutil.copytree(ckpt, loose)
    assert script("--config", STAGE2, "--export-from", loose) == 2  # not in a run: say --export-to


def test_export_from_builds_the_frozen_parts_from_the_checkpoints_config(qformer_run, tmp_path, caplog):
    """--export-from with the plain config (no init.qformer): the same tokenizer as the run's own
    export; with another init.qformer on the command line: refused, naming the key, nothing written."""
    ckpt = qformer_run / "checkpoints" / "step_00000003"
    assert script("--config", STAGE2, "--export-from", ckpt, "--export-to", tmp_path / "again") == 0
    assert same_weights(qformer_run / "export" / "model.safetensors", tmp_path / "again" / "model.safetensors")
    caplog.clear()
    code = script("--config", STAGE2, "--export-from", ckpt, "--export-to", tmp_path / "other",
                  f"init.qformer={OTHER_QFORMER}")
    assert code == 2 and "init.qformer (checkpoint:" in caplog.text and not (tmp_path / "other").exists()


def test_resume_without_the_init_overrides_continues_the_same_run(qformer_run, tmp_path, caplog):
    """A resume that leaves out init.qformer=... (and data.batch_size=1) trains on with the
    checkpoint's stage-1 weights and batch, as the uninterrupted run, and keeps OUTPUT/config.yaml's
    init.qformer; giving another init.qformer is refused, naming the key."""
    out = killed_copy(qformer_run, tmp_path)
    given = [f"train.output_dir={out}", "train.progress=false"]
    with pytest.raises(seed.InputError, match=r"init\.qformer \(checkpoint: '.*causal_qformer_stage1.pth', given"):
        _train_in_process(load_train_config(STAGE2, *given, f"init.qformer={OTHER_QFORMER}"), resume=True,
                          overrides=[*given, f"init.qformer={OTHER_QFORMER}"])
    with caplog.at_level(logging.WARNING):
        _train_in_process(load_train_config(STAGE2, *given), resume=True, overrides=given)
    assert "init.qformer (config file: None, checkpoint:" in caplog.text
    assert same_weights(qformer_run / "checkpoints" / "step_00000003" / "model.safetensors",
                        out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert without_speed(metrics(out)) == without_speed(metrics(qformer_run))
    assert OmegaConf.load(out / "config.yaml").init.qformer == str(QFORMER)


def test_a_torn_metrics_line_does_not_break_resume(qformer_run, tmp_path):
    """A crash (or a full disk) mid-line leaves a torn last line in metrics.jsonl: --resume drops it."""
    out = killed_copy(qformer_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lr": 0.001, "lo')
    args = ["--config", STAGE2, "--resume", f"train.output_dir={out}", "train.progress=false"]
    assert script(*args) == 0
    assert without_speed(metrics(out)) == without_speed(metrics(qformer_run))


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, caplog):
    """lr 1e12 (the loss turns NaN): exit status 3 with a clear error, no NaN checkpoint or export,
    and keep_last=1 does not delete the last good checkpoint."""
    code = script("--config", STAGE2, f"train.output_dir={tmp_path}", "train.max_steps=8", "train.save_every=1",
                  "train.keep_last=1", "train.init_lr=1e12", "data.batch_size=1", "train.progress=false")
    assert code == 3 and "non-finite" in caplog.text, caplog.text[-2000:]
    assert "The last good checkpoint is" in caplog.text
    [good] = checkpoints(tmp_path)
    tensors, state = read_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert not (tmp_path / "export").exists()
    rows = metrics(tmp_path)
    assert rows and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["step"] < 8 and state["step"] <= rows[-1]["step"]


def test_an_output_folder_that_cannot_be_made_fails_before_the_model_is_built(tmp_path, caplog):
    from seed.training.loop import train

    (tmp_path / "file").write_text("a file where the output folder's parent should be")
    cfg = load_train_config(STAGE2, f"train.output_dir={tmp_path / 'file' / 'out'}")

    def build_model(cfg):
        raise AssertionError("the model was built before the output folder was checked")

    with pytest.raises(seed.InputError, match=r"train.output_dir .*file/out: cannot create or write"):
        train(cfg, build_model=build_model)
    assert script("--config", STAGE2, f"train.output_dir={tmp_path / 'file' / 'out'}") == 2
    assert "train.output_dir" in caplog.text


# --- pieces of the loop -------------------------------------------------------------------------

def test_codebook_usage_over_a_window():
    usage = CodebookUsage(size=4, window=2)
    usage.add(torch.tensor([3, 0, 0, 0]))
    usage.add(torch.tensor([1, 2, 2, 0]))
    stats = usage.stats()  # p = (.5, .25, .25, 0): entropy 1.5 bits
    assert stats["codes_used"] == 0.75 and stats["perplexity"] == pytest.approx(2 ** 1.5)
    usage.add(torch.tensor([0, 0, 0, 5]))  # the first step leaves the window
    assert usage.total().tolist() == [1, 2, 2, 5]
    restored = CodebookUsage(4, 2)
    restored.load(usage.state())
    assert restored.total().tolist() == [1, 2, 2, 5]


def test_dead_codes_move_onto_encoder_outputs():
    codebook = torch.zeros(5, 2)
    candidates = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    dead = torch.tensor([True, False, True, False, False])
    assert restart_dead_codes(codebook, dead, candidates, torch.Generator().manual_seed(0)) == 2
    assert all(row in candidates.tolist() for row in codebook[dead].tolist())
    assert codebook[~dead].abs().sum() == 0


def test_tensorboard_without_the_package_says_how_to_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    from seed.training.loop import train

    cfg = load_train_config(STAGE2, f"train.output_dir={tmp_path}", "train.tensorboard=true")
    with pytest.raises(seed.InputError, match=r"install\.sh installs it into \.venv .*-m pip install tensorboard"):
        train(cfg)


def test_help_is_fast_and_bad_overrides_name_the_key():
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--resume" in r.stdout
    assert time.perf_counter() - start < 3.0
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(STAGE2), "train.max_step=3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "train.max_step" in r.stderr and "train.max_steps" in r.stderr


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, caplog):
    """OUT/.lock: train_tokenizer.py (fresh or --resume) into a live run's folder exits 2 naming
    the holder; the live run's metrics go on intact."""
    from conftest import start_live_run

    live = start_live_run("tokenizer", STAGE2, f"train.output_dir={tmp_path}", "train.progress=false")
    try:
        for extra in ((), ("--resume",)):
            assert script("--config", STAGE2, f"train.output_dir={tmp_path}", *extra) == 2
            assert f"{tmp_path} is in use: pid {live.pid}" in caplog.text
            caplog.clear()
    finally:
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_zero_sizes_are_errors_naming_the_key():
    """A 0 means 0: a setting that would quietly train on something else (empty captions, no text
    tokens, a batch of nothing) is refused at load time, naming the key."""
    for override, key in (("data.batch_size=0", "data.batch_size"), ("data.max_words=0", "data.max_words"),
                          ("data.image_size=0", "data.image_size"), ("itc.max_txt_len=0", "itc.max_txt_len"),
                          ("itc.embed_dim=0", "itc.embed_dim"), ("itc.temp=0", "itc.temp"),
                          ("train.warmup_steps=-1", "train.warmup_steps"), ("train.init_lr=-1", "train.init_lr")):
        with pytest.raises(seed.InputError, match=rf"bad value for '{key}'"):
            load_train_config(STAGE2, override)
