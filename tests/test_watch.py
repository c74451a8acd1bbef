"""Watching and handing on a training run (tiny recipes, CPU): the held-out loss (data.val,
train.eval_every) of both trainers, checked against a direct computation on the exported weights,
on 2 processes, across a resume, and without disturbing training; the progress in a log file;
TensorBoard; scripts/plot_runs.py; the model cards and scripts/model_card.py."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT

LLM_SCRIPT = ROOT / "scripts" / "train_llama.py"
TOK_SCRIPT = ROOT / "scripts" / "train_tokenizer.py"
PRETRAIN = ROOT / "configs" / "train" / "llama_pretrain_tiny.yaml"
STAGE2 = ROOT / "configs" / "train" / "seed1_stage2_tiny.yaml"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 5
COMMON = [f"train.max_steps={STEPS}", "train.save_every=2", "train.progress=false", "data.batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def script(path: Path, *args) -> int:
    """A script's main in this process, leaving the global RNGs as they were."""
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _load(path, path.stem).main([str(a) for a in args])
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def llm_data(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny caption pairs split: 39 rows to train on, 9 held out (batches of 4, 4, 1: on 2
    processes the last batch leaves one rank without a sample)."""
    root = tmp_path_factory.mktemp("llm_data")
    rows = (ROOT / "configs" / "train" / "data" / "llama_pairs_tiny.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:39]) + "\n")
    (root / "val.jsonl").write_text("\n".join(rows[39:]) + "\n")
    return root / "train.jsonl", root / "val.jsonl"


def llm(out: Path, data: tuple[Path, Path], *args: str, val: bool = True) -> int:
    extra = [f"data.val={data[1]}", "train.eval_every=2"] if val else []
    return script(LLM_SCRIPT, "--config", PRETRAIN, *COMMON, f"data.train={data[0]}", f"train.output_dir={out}",
                  *extra, *args)


@pytest.fixture(scope="module")
def llm_run(llm_data, tmp_path_factory) -> Path:
    """5 steps of tiny pretraining (LoRA dropout on) with the held-out set every 2 steps."""
    out = tmp_path_factory.mktemp("llm_val") / "out"
    assert llm(out, llm_data) == 0
    return out


def direct_val_loss(export: Path, val_file: Path, seed: int = 42) -> float:
    """The token-mean loss of the exported (merged) model over the held-out set, one sample at a time
    with the HF model's own loss: the samples as the training data reads one pass of the file in
    order (seeded draws), weighted by their learned tokens."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from seed.training.llm.data import LlmData, sources_from_config
    from seed.training.llm.train import load_tokenizer

    tok = load_tokenizer(OmegaConf.create({"base": str(export), "tokenizer": None}))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    sources = sources_from_config({"sources": [{"path": str(val_file), "name": "val", "cycle": 1}],
                                   "batch_size": 1, "max_length": 64})
    total = count = 0.0
    with torch.no_grad():
        for batch in LlmData(sources, tok, seed=seed, shuffle=False):
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            total += float(loss) * n
            count += n
    return total / count


def test_llm_val_loss_at_the_eval_steps_equals_the_exported_models_loss(llm_run, llm_data):
    rows = metrics(llm_run)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]  # every 2 steps and the last
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0]
    assert vals[-1] == pytest.approx(direct_val_loss(llm_run / "export", llm_data[1]), rel=1e-6)


def test_evaluation_does_not_disturb_training(llm_run, llm_data, tmp_path):
    out = tmp_path / "noval"
    assert llm(out, llm_data, "train.export=false", val=False) == 0
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "learned_tokens", "sources")
    assert [tuple(r[k] for k in keys) for r in metrics(out)] == [tuple(r[k] for k in keys) for r in metrics(llm_run)]
    a = load_file(llm_run / "checkpoints" / "step_00000005" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step_00000005" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_the_uninterrupted_val_loss_and_a_log_file_has_no_bar(llm_run, llm_data, tmp_path):
    """Resumed from the step-2 checkpoint in a subprocess whose stderr is a file (progress on):
    the same rows (val_loss included) as the uninterrupted run, and readable log lines, no tqdm frames."""
    out = tmp_path / "out"
    shutil.copytree(llm_run / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    shutil.copy(llm_run / "metrics.jsonl", out / "metrics.jsonl")
    log = tmp_path / "train.log"
    args = [c for c in COMMON if c != "train.progress=false"]
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(LLM_SCRIPT), "--config", str(PRETRAIN), *args, "--resume",
                            f"data.train={llm_data[0]}", f"train.output_dir={out}", f"data.val={llm_data[1]}",
                            "train.eval_every=2"], cwd=ROOT, env=ENV, stdout=f, stderr=f,
                           timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    drop = ("tokens_per_s",)
    clean = [{k: v for k, v in row.items() if k not in drop} for row in metrics(out)]
    assert clean == [{k: v for k, v in row.items() if k not in drop} for row in metrics(llm_run)]
    assert "\r" not in text and "it/s]" not in text and "step/s]" not in text  # no bar (nor "Writing model shards")
    assert "exported" in text
    line = next(x for x in text.splitlines() if "step 4/5" in x)
    assert "val_loss" in line and "loss" in line and "sources" not in line


def test_two_processes_give_the_val_loss_of_one(llm_data, tmp_path):
    """torchrun with 2 gloo processes (ddp; the last val batch leaves rank 0 empty): the val_loss
    is the direct computation on its exported weights, i.e. what 1 process computes."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LLM_SCRIPT),
           "--config", str(PRETRAIN), *COMMON, "train.max_steps=1", "train.lr=0", f"data.train={llm_data[0]}",
           f"data.val={llm_data[1]}", f"train.output_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [1]  # no eval_every: the last step only
    assert rows[-1]["val_loss"] == pytest.approx(direct_val_loss(out / "export", llm_data[1]), rel=1e-5)
    card = json.loads((out / "export" / "card.json").read_text())
    assert card["world_size"] == 2 and card["command"].startswith("torchrun --nproc-per-node 2")


def test_eval_settings_are_checked(llm_data, tmp_path, caplog):
    from seed.errors import InputError
    from seed.training.llm.config import load_llama_train_config

    with pytest.raises(InputError, match="train.eval_every=2 but no held-out set: pass data.val"):
        load_llama_train_config(PRETRAIN, "train.eval_every=2")
    with pytest.raises(InputError, match="train.eval_every"):
        load_llama_train_config(PRETRAIN, f"data.val={llm_data[1]}", "train.eval_every=0")
    assert llm(tmp_path / "a", llm_data, "data.val.nope=1") == 2  # data.val {nope: 1}: not a source's key
    caplog.clear()
    assert script(LLM_SCRIPT, "--config", PRETRAIN, *COMMON, f"train.output_dir={tmp_path / 'b'}",
                  f"data.val={tmp_path / 'missing.jsonl'}") == 2
    assert "missing.jsonl" in caplog.text and not list((tmp_path / "b").glob("checkpoints/*"))


# --- the tokenizer trainer -------------------------------------------------------------------------

TOK_COMMON = ["train.max_steps=2", "train.progress=false", "data.batch_size=1", "train.save_every=2"]


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok_val")
    assert script(TOK_SCRIPT, "--config", STAGE2, *TOK_COMMON, f"train.output_dir={out}", "train.eval_every=1",
                  f"data.val={ROOT / 'tests' / 'data' / 'captions.jsonl'}", "data.val_batch_size=3") == 0
    return out


def test_tokenizer_val_loss_equals_the_checkpoints_loss_on_the_val_images(tok_run):
    from seed.images import open_image, preprocess_image
    from seed.training.config import load_train_config
    from seed.training.data import clean_caption, sample_seed
    from seed.training.models import build_model

    rows = metrics(tok_run)
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2]
    cfg = load_train_config(STAGE2)
    model = build_model(cfg)
    model.load_trainable_state_dict(load_file(tok_run / "checkpoints" / "step_00000002" / "model.safetensors"))
    model.eval()
    pairs = [json.loads(x) for x in (ROOT / "tests" / "data" / "captions.jsonl").read_text().splitlines()]
    pixels = torch.stack([preprocess_image(open_image(ROOT / "tests" / "data" / p["image"]).convert("RGB"), 28)
                          for p in pairs])
    captions = [clean_caption(random.Random(sample_seed(42, 0, i)).choice(p["caption"])) for i, p in enumerate(pairs)]
    with torch.no_grad():
        loss = float(model(pixels, captions)["loss"])
    assert rows[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_tokenizer_evaluation_does_not_disturb_training(tok_run, tmp_path):
    assert script(TOK_SCRIPT, "--config", STAGE2, *TOK_COMMON, f"train.output_dir={tmp_path}") == 0
    skip = ("images_per_s", "val_loss")
    assert [{k: v for k, v in r.items() if k not in skip} for r in metrics(tmp_path)] == \
           [{k: v for k, v in r.items() if k not in skip} for r in metrics(tok_run)]


def test_tokenizer_export_card_and_tensorboard(tok_run):
    from huggingface_hub import ModelCard, metadata_load

    card = tok_run / "export" / "README.md"
    meta = front_matter(card)
    assert meta["library_name"] == "seed" and "image-tokenizer" in meta["tags"]
    assert metadata_load(card) == meta and ModelCard.load(card).data.to_dict() == meta
    record = json.loads((tok_run / "export" / "card.json").read_text())
    assert record["steps"] == 2 and record["data"][0]["rows"] == 3 and record["val"]["samples"] == 3
    assert record["val_loss"]["value"] == metrics(tok_run)[-1]["val_loss"]
    assert "data.val_batch_size=3" in record["command"] and "| final val loss |" in card.read_text()
    # TensorBoard is on by default when installed: train/loss and val/loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tok_run / "tensorboard"))
    ev.Reload()
    assert {"train/loss", "val/loss"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("val/loss")] == [1, 2]


# --- plots and cards ----------------------------------------------------------------------------

def test_plot_runs_draws_two_runs_and_refuses_bad_input(llm_run, tok_run, tmp_path):
    from PIL import Image

    plot = ROOT / "scripts" / "plot_runs.py"
    out = tmp_path / "runs.png"
    r = subprocess.run([sys.executable, str(plot), str(llm_run), str(tok_run / "metrics.jsonl"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (420, 1500, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # lines, labels, legends: not blank
    for bad in (tmp_path / "empty_run", tmp_path / "no_rows"):
        bad.mkdir()
    (tmp_path / "no_rows" / "metrics.jsonl").write_text('{"loss": 1}\n{"step": 1, "lo')
    for bad in ("empty_run", "no_rows"):
        dest = tmp_path / f"{bad}.png"
        r = subprocess.run([sys.executable, str(plot), str(llm_run), str(tmp_path / bad), "--out", str(dest)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
        assert bad in r.stderr and not dest.exists()


def test_llm_export_card_and_model_card_reports(llm_run, tmp_path):
    from huggingface_hub import ModelCard, metadata_load

    from seed.evaluation.runner import files_fingerprint

    export = tmp_path / "export"
    shutil.copytree(llm_run / "export", export)  # a copied folder keeps its identity (sizes, headers)
    card = export / "README.md"
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "seed-llama" in meta["tags"] and "base_model" not in meta
    assert metadata_load(card) == meta
    record = json.loads((export / "card.json").read_text())
    rows = metrics(llm_run)
    assert record["steps"] == STEPS and record["val_loss"] == {"step": 5, "value": rows[-1]["val_loss"]}
    assert record["train_loss"] == {"step": 5, "value": rows[-1]["loss"]}
    [src] = record["data"]
    assert src["name"] == "train" and src["rows"] == STEPS * 4 and src["samples"] == STEPS * 4
    assert record["val"]["samples"] == 9 and "train.eval_every=2" in record["command"]
    assert "a tiny random LLaMA" in card.read_text()
    # a report of scripts/evaluate.py on this folder (its fingerprint as evaluate.py writes it)
    report = {"task": "caption", "metric": "CIDEr", "value": 0.5, "metrics": {"CIDEr": 0.5, "BLEU-4": 0.1},
              "n": 3, "dataset": {"name": "tiny-captions"},
              "model": {"llm": str(llm_run / "export"), "llm_files": files_fingerprint(llm_run / "export")}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    tool = ROOT / "scripts" / "model_card.py"
    r = subprocess.run([sys.executable, str(tool), str(export), "--report", str(tmp_path / "report.json"),
                        "--license", "apache-2.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["name"] == "tiny-captions"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"CIDEr": 0.5, "BLEU-4": 0.1}
    assert ModelCard.load(card).data.eval_results[0].metric_value in (0.5, 0.1)
    assert "| caption | tiny-captions | 3 | CIDEr | 0.5000 |" in card.read_text()
    # a report of other weights is refused, nothing changed
    before = card.read_bytes()
    fp = files_fingerprint(llm_run / "export")
    fp["model.safetensors"][2] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps({**report, "model": {"llm_files": fp}}))
    r = subprocess.run([sys.executable, str(tool), str(export), "--report", str(tmp_path / "other.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "other weights" in r.stderr
    assert card.read_bytes() == before
