"""scripts/train_llama.py on the tiny recipes (CPU, no downloads): training, export that SeedLlama
chats with, resume after kill -9 bit-exact, refused resume overrides, the non-finite stop, and
2-process torchrun (gloo) equal to 1 process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_llama.py"
PRETRAIN = ROOT / "configs" / "train" / "llama_pretrain_tiny.yaml"
SFT = ROOT / "configs" / "train" / "llama_sft_tiny.yaml"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 6
COMMON = [f"train.max_steps={STEPS}", "train.save_every=2", "train.progress=false", "data.batch_size=4"]


def _main():
    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def train(*args: str) -> int:
    return _main()(["--config", str(PRETRAIN), *COMMON, *args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def values(rows: list[dict], keys=("step", "loss", "lr", "grad_norm", "tokens", "sources")) -> list[tuple]:
    return [tuple(r[k] for k in keys) for r in rows]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted tiny pretraining run (LoRA dropout on: resume must restore the RNG)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert train(f"train.output_dir={out}") == 0
    return out


def test_tiny_pretrain_trains_and_exports(straight):
    rows = metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["lr"] == 0.0  # the original's first step runs at lr 0
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["padding"] < 1 and r["sources"] == {"train": 1}
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004", "step_00000006"]
    export = straight / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.model").is_file()
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(export.rglob("*.bin"))
    # the export is the checkpoint's LoRA merged into the base
    ckpt = load_file(str(straight / "checkpoints" / "step_00000006" / "model.safetensors"))
    merged = load_file(str(export / "model.safetensors"))
    torch.testing.assert_close(merged["lm_head.weight"], ckpt["base_model.model.lm_head.modules_to_save.default.weight"])
    from seed.llama import SeedLlama

    pipe = SeedLlama.from_pretrained(export, image_tokenizer="seed2_tiny", torch_dtype=torch.float32)
    assert pipe.model.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer) == 600 + 8194
    reply = pipe.chat([{"role": "user", "content": "hello"}], max_new_tokens=4, do_sample=False)
    assert isinstance(reply.text, str)


def test_resume_after_kill_is_bit_exact(straight, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--config", str(PRETRAIN), *COMMON, f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step_00000002"
    deadline = time.time() + 120
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "export").exists()
    assert _main()(["--config", str(PRETRAIN), *COMMON, f"train.output_dir={out}", "--resume"]) == 0
    assert values(metrics(out)) == values(metrics(straight))
    for step in ("step_00000006",):
        a = load_file(str(out / "checkpoints" / step / "model.safetensors"))
        b = load_file(str(straight / "checkpoints" / step / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    sb = torch.load(straight / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert sa["data"] == sb["data"]
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])


def test_plain_loss_setting_gives_the_same_run(straight, tmp_path):
    """train.loss_chunk=null (HF's loss over the whole logits) trains the same run as the recipe's
    chunked loss: the same losses and gradient norms within float rounding, the same data."""
    out = tmp_path / "plain"
    assert train(f"train.output_dir={out}", "train.loss_chunk=null", "train.export=false") == 0
    a, b = metrics(straight), metrics(out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert (x["tokens"], x["learned_tokens"]) == (y["tokens"], y["learned_tokens"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_resume_refuses_other_model_or_data(straight, tmp_path, caplog):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(straight, out)
    for override, key in (("model.lora.r=8", "model.lora.r"), ("data.max_length=32", "data.max_length")):
        caplog.clear()
        assert train(f"train.output_dir={out}", override, "--resume") == 2
        assert key in caplog.text and "checkpoint" in caplog.text
    caplog.clear()  # without --resume a folder with checkpoints is refused too
    assert train(f"train.output_dir={out}") == 2
    assert "--resume" in caplog.text
    # max_steps is run-only but the schedule's length is not: a longer resume keeps the first run's curve
    from seed.training.llm.optim import lr_at_step

    caplog.clear()
    assert train(f"train.output_dir={out}", "train.schedule_steps=8", "--resume") == 2
    assert "train.schedule_steps" in caplog.text
    assert train(f"train.output_dir={out}", "--resume", "train.max_steps=8") == 0  # overrides on both sides
    rows = metrics(out)
    assert values(rows[:STEPS]) == values(metrics(straight)) and [r["step"] for r in rows[STEPS:]] == [7, 8]
    for r in rows[STEPS:]:  # the lr of the tiny recipe's 6-step schedule, continued
        assert r["lr"] == pytest.approx(lr_at_step(r["step"] - 1, lr=2e-3, max_steps=STEPS, warmup_ratio=0.25,
                                                   min_lr_ratio=0.1), abs=1e-12)


def test_non_finite_loss_stops_keeping_the_last_checkpoint(tmp_path, caplog):
    out = tmp_path / "out"
    # lr 1e30 from step 2 on (step 1 runs at lr 0): the weights grow to ~1e30 (finite, saved), the
    # next loss is not finite
    assert train(f"train.output_dir={out}", "train.lr=1e30", "train.weight_decay=0", "train.warmup_ratio=0",
                 "train.save_every=1") == 3
    assert "non-finite" in caplog.text
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and not (out / "export").exists()
    last = metrics(out)[-1]["step"]
    assert ckpts[-1] == f"step_{last:08d}"  # every completed step was checkpointed; the bad one was not
    assert last < STEPS


def test_tiny_sft_from_the_pretraining_export(straight, tmp_path):
    """The released path: SFT starts from the MERGED pretraining model with a fresh LoRA."""
    out = tmp_path / "out"
    rc = _main()(["--config", str(SFT), "train.max_steps=2", "train.progress=false", f"train.output_dir={out}",
                  f"model.base={straight / 'export'}"])
    assert rc == 0
    rows = metrics(out)
    assert len(rows) == 2 and all(r["learned_tokens"] < r["tokens"] for r in rows)  # prompts are not learned
    ckpt = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in ckpt.items() if "lora_B" in k)  # a fresh LoRA (B from 0) trained
    merged_pre = load_file(str(straight / "export" / "model.safetensors"))
    # step 1 ran at lr 0, step 2 moved the weights a little from the pretraining export's
    emb = ckpt["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert emb.shape == merged_pre["model.embed_tokens.weight"].shape
    assert 0 < (emb - merged_pre["model.embed_tokens.weight"]).abs().max() < 0.05
    assert (out / "export" / "model.safetensors").is_file()


PARALLEL_ARGS = [*COMMON, "model.lora.dropout=0", "train.export=false", "train.max_steps=3"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    assert train(f"train.output_dir={out}", *PARALLEL_ARGS[len(COMMON):]) == 0
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one(one_process, parallel, tmp_path):
    """Same global batch, LoRA dropout off: 2 gloo processes (data parallel, or FSDP2 sharding)
    give the losses, gradient norms and weights of 1 process within float tolerance."""
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--config", str(PRETRAIN), *PARALLEL_ARGS, f"train.parallel={parallel}", f"train.output_dir={two}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one_process), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["learned_tokens"] == y["learned_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    ta = load_file(str(one_process / "checkpoints" / "step_00000003" / "model.safetensors"))
    tb = load_file(str(two / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)


def test_released_recipes_reproduce_the_original_schedules():
    """The real configs' lr, length, warmup and floor give the original's lr tables (parity fixture)."""
    from seed.training.llm.config import load_llama_train_config
    from seed.training.llm.optim import lr_at_step

    fixtures = sorted((ROOT / "tests" / "data" / "parity" / "llama_train").glob("*/expected_model.json"))
    schedules = json.loads(fixtures[0].read_text())["schedules"]
    for name, table in (("llama_pretrain", "pretrain_real"), ("llama_sft", "sft_real"),
                        ("llama_pretrain_mixture", "pretrain_real"), ("llama_sft_mixture", "sft_real")):
        t = load_llama_train_config(ROOT / "configs" / "train" / f"{name}.yaml").train
        for step, lr in schedules[table]["lr_at_step"].items():
            ours = lr_at_step(int(step), lr=t.lr, max_steps=t.max_steps, warmup_ratio=t.warmup_ratio,
                              min_lr_ratio=t.min_lr_ratio)
            assert ours == pytest.approx(lr, abs=1e-12), (name, step)
        assert (t.betas, t.eps, t.weight_decay, t.grad_clip) == ([0.9, 0.95], 1e-5, 0.05, 1.0)
    pre = load_llama_train_config(ROOT / "configs" / "train" / "llama_pretrain_mixture.yaml")
    sft = load_llama_train_config(ROOT / "configs" / "train" / "llama_sft_mixture.yaml")
    assert len(pre.data.sources) == 6 and sum(s.weight for s in pre.data.sources) == pytest.approx(10.0)
    assert len(sft.data.sources) == 18 and sum(s.weight for s in sft.data.sources) == pytest.approx(3.81)
    assert pre.train.grad_accum == 4 and sft.train.grad_accum == 1


def test_bad_configs_are_input_errors_naming_the_key():
    from seed.errors import InputError
    from seed.training.llm import model as M
    from seed.training.llm.config import load_llama_train_config

    for override, key in (("model.tiny.heads=3", "model.tiny.heads"), ("train.lr=[1,", "train.lr"),
                          ("train.schedule_steps=0", "train.schedule_steps"), ("train.loss_chunk=0", "train.loss_chunk")):
        with pytest.raises(InputError, match=key):
            load_llama_train_config(PRETRAIN, override)
    with pytest.raises(InputError, match="model.lora.target_modules"):
        M.apply_lora(M.tiny_base(600), M.LoraSettings(target_modules=["nope"]))


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, caplog):
    """OUT/.lock: a second train_llama.py (fresh or --resume) into a live run's folder exits 2 naming
    the holder, before it touches anything; the live run's metrics go on intact."""
    from conftest import start_live_run

    out = tmp_path / "out"
    live = start_live_run("llama", PRETRAIN, f"train.output_dir={out}", "train.progress=false")
    try:
        for extra in ((), ("--resume",)):
            assert train(f"train.output_dir={out}", *extra) == 2
            assert f"{out} is in use: pid {live.pid}" in caplog.text and "use another train.output_dir" in caplog.text
            caplog.clear()
    finally:
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2] and not (out / "checkpoints").exists()


def test_a_caption_the_tokenizer_cannot_encode_is_a_bad_row_and_resume_goes_past_it(tmp_path):
    """A lone surrogate in row 10 (read in step 3): the run and its --resume go on, the row is counted."""
    rows = (ROOT / "configs" / "train" / "data" / "llama_pairs_tiny.jsonl").read_text().splitlines()
    bad = json.loads(rows[9])
    bad["caption"] = "A scraped caption \ud83d with half an emoji."
    rows[9] = json.dumps(bad)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = (f"train.output_dir={out}", f"data.train={data}", "data.shuffle=false")
    assert train(*args, "train.max_steps=2") == 0
    assert train(*args, "train.max_steps=4", "--resume") == 0
    last = metrics(out)[-1]
    assert last["step"] == 4 and last["data"]["train"]["bad"] == 1 and last["data"]["train"]["rows"] == 17


def test_a_run_that_learns_nothing_fails_and_exports_nothing(tmp_path, caplog):
    """max_length 4 cuts every SFT answer away: every micro-batch has no learned token (counted and
    warned each step), and the run exits 2 with a clear error, before the last checkpoint and the export."""
    out = tmp_path / "out"
    rc = _main()(["--config", str(SFT), "train.max_steps=2", "train.save_every=1", "train.progress=false",
                  "data.max_length=4", f"train.output_dir={out}"])
    assert rc == 2
    assert "no step of this run learned anything" in caplog.text and "max_length" in caplog.text
    assert "had no learned token" in caplog.text
    rows = metrics(out)
    assert [(r["step"], r["learned_tokens"], r["empty_micro_batches"]) for r in rows] == [(1, 0, 1), (2, 0, 1)]
    assert not (out / "export").exists() and not (out / ".export.tmp").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]


def test_micro_batches_without_a_learned_token_are_counted(tmp_path, caplog):
    """A mixture where one source's answers are all cut away: its micro-batches are counted in
    metrics and warned; the run, which learns from the other source, succeeds."""
    sft = ROOT / "configs" / "train" / "data" / "llama_sft_tiny.jsonl"
    pairs = ROOT / "configs" / "train" / "data" / "llama_pairs_tiny.jsonl"
    out = tmp_path / "out"
    rc = train(f"train.output_dir={out}", "train.max_steps=3", "train.grad_accum=2", "data.train=null",
               f"data.sources=[{{path: {pairs}, name: pairs}}, {{path: {sft}, name: cut, max_length: 4}}]")
    assert rc == 0
    rows = metrics(out)
    assert [r["empty_micro_batches"] for r in rows] == [r["sources"].get("cut", 0) for r in rows]
    assert sum(r["empty_micro_batches"] for r in rows) > 0 and "had no learned token" in caplog.text
    assert (out / "export" / "model.safetensors").is_file()
