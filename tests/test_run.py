"""The run machinery shared by the trainers (seed.training.run): checkpoints, resume with the saved
config, crash-safe metrics, the non-finite stop, the output-folder check, exit statuses; and a toy
trainer on it, resumed bit-for-bit."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import seed
from seed.config import validate
from seed.training.run import (EXIT_DIVERGED, EXIT_INPUT, EXIT_INTERRUPTED, MetricsLog, NonFiniteError, Run,
                               RunSection, checkpoints, config_for_resume, prepare_output_dir, read_checkpoint,
                               rng_state, run_script, set_rng_state, write_checkpoint)


# --- a toy trainer: what a trainer brings (model, data, step) on the shared run -----------------

@dataclass
class ToyModel:
    width: int = 4


@dataclass
class ToyData:
    train: str = "toy"
    num_workers: int = 0


@dataclass
class ToyConfig:
    model: ToyModel = field(default_factory=ToyModel)
    data: ToyData = field(default_factory=ToyData)
    train: RunSection = field(default_factory=RunSection)
    lr: float = 0.1


def toy_cfg(*overrides: str):
    return validate([OmegaConf.from_dotlist(list(overrides))], ToyConfig)


def toy_train(cfg, resume=False, overrides=None) -> Run:
    """A linear model on random batches drawn from the global RNG, with dropout: a resume is
    bit-exact only if the weights, the optimizer and every RNG state come back."""
    run = Run(cfg, resume=resume, overrides=overrides, schema=ToyConfig)
    cfg = run.cfg
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(cfg.model.width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    if run.resumed:
        model.load_state_dict(run.tensors)
        opt.load_state_dict(run.state["optimizer"])
    total = cfg.train.max_steps
    run.begin(total)
    step = run.start_step
    try:
        while step < total:
            x = torch.randn(8, cfg.model.width)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            run.check_finite(step + 1, {"loss": loss.item()})
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            run.log({"step": step, "loss": loss.item()})
            if run.save_due(step):
                run.save(step, model.state_dict(), {"optimizer": opt.state_dict()})
    finally:
        run.close()
    return run


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_toy_trainer_resumes_bit_for_bit(tmp_path):
    common = ["train.max_steps=6", "train.save_every=3", "train.progress=false"]
    toy_train(toy_cfg(f"train.output_dir={tmp_path / 'a'}", *common))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    # a run killed after its step-3 checkpoint, with a torn metrics line and rows of later steps
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # whatever ran before: the saved states count
    toy_train(toy_cfg(f"train.output_dir={tmp_path / 'b'}", *common), resume=True,
              overrides=[f"train.output_dir={tmp_path / 'b'}", *common])
    a, _ = read_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000006")
    b, state = read_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a) and state["step"] == 6 and len(state["rng"]) == 1
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


def test_resume_refuses_a_changed_model_value_and_keeps_the_saved_config(tmp_path, caplog):
    out = tmp_path / "run"
    toy_train(toy_cfg(f"train.output_dir={out}", "model.width=3", "train.max_steps=2", "train.progress=false"))
    with pytest.raises(seed.InputError, match=r"model\.width \(checkpoint: 3, given: 5\)"):
        toy_train(toy_cfg(f"train.output_dir={out}", "model.width=5", "train.max_steps=4"), resume=True,
                  overrides=["model.width=5", "train.max_steps=4"])
    # not on the command line (the config file's default 4): the checkpoint's 3 is used, and said
    with caplog.at_level(logging.WARNING):
        run = toy_train(toy_cfg(f"train.output_dir={out}", "train.max_steps=4", "train.progress=false"),
                        resume=True, overrides=["train.max_steps=4", "train.progress=false"])
    assert run.cfg.model.width == 3 and run.start_step == 2
    assert "model.width (config file: 4, checkpoint: 3)" in caplog.text
    assert OmegaConf.load(out / "config.yaml").model.width == 3
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


def test_config_for_resume_rules(tmp_path):
    saved = toy_cfg("train.output_dir=/old", "train.max_steps=10", "train.save_every=5", "lr=0.5")
    current = toy_cfg("train.output_dir=/new", "train.max_steps=20", "train.save_every=7", "lr=0.1")
    cfg = config_for_resume(saved, current, ["train.max_steps=20"])
    # run-only and given: taken; run-only not given: the saved one; output_dir: where we are
    assert (cfg.train.max_steps, cfg.train.save_every, cfg.train.output_dir, cfg.lr) == (20, 5, "/new", 0.5)
    with pytest.raises(seed.InputError, match=r"lr \(checkpoint: 0.5, given: 0.1\)"):
        config_for_resume(saved, current, ["lr=0.1"])
    with pytest.raises(seed.InputError, match=r"lr"):  # a config built in Python: every value counts as given
        config_for_resume(saved, current, None)
    assert config_for_resume(saved, toy_cfg("lr=0.5"), ["lr=0.5"]).lr == 0.5  # the same value again is fine
    assert saved.train.max_steps == 10  # the saved config is not modified


def test_metrics_log_drops_torn_lines_and_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n\x00\x00garbage\n{"step": 2, "loss": 0.5}\n'
                     b'{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2, 3]
    log = MetricsLog(path)
    log.start(2)
    log.write({"step": 3, "loss": float("nan"), "lr": 0.1})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": None, "lr": 0.1}]


def test_a_non_finite_checkpoint_is_never_written_nor_prunes_good_ones(tmp_path):
    cfg = toy_cfg(f"train.output_dir={tmp_path}", "train.keep_last=1", "train.progress=false")
    run = Run(cfg)
    run.begin(3)
    run.save(1, {"w": torch.ones(2)}, {})
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite weights in w.*step_00000001"):
        run.save(2, {"w": torch.tensor([1.0, float("inf")])}, {})
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss nan.*step_00000001"):
        run.check_finite(2, {"loss": torch.tensor(float("nan")), "other": 1.0})
    run.close()
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001"]
    with pytest.raises(NonFiniteError):
        write_checkpoint(tmp_path / "checkpoints" / "step_00000009", {"w": torch.tensor([float("nan")])}, {}, "")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001"]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_an_output_folder_that_cannot_be_made_is_refused_at_once(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(seed.InputError, match=r"train.output_dir .*file/out: cannot create or write"):
        prepare_output_dir(tmp_path / "file" / "out")
    with pytest.raises(seed.InputError, match="exists and is not a folder"):
        Run(toy_cfg(f"train.output_dir={tmp_path / 'file'}"))
    assert prepare_output_dir(tmp_path / "a" / "b").is_dir()


def test_a_fresh_run_refuses_an_output_folder_with_checkpoints(tmp_path):
    write_checkpoint(tmp_path / "checkpoints" / "step_00000005", {"w": torch.ones(1)}, {"step": 5}, "")
    with pytest.raises(seed.InputError, match="--resume"):
        Run(toy_cfg(f"train.output_dir={tmp_path}"))


def test_run_script_exit_statuses():
    log = logging.getLogger("test")

    def raising(e):
        def body():
            raise e
        return body

    assert run_script(lambda: None, log) == 0
    assert run_script(raising(seed.InputError("x")), log) == EXIT_INPUT == 2
    assert run_script(raising(seed.CheckpointError("x")), log) == 2
    assert run_script(raising(NonFiniteError("x")), log) == EXIT_DIVERGED == 3
    assert run_script(raising(KeyboardInterrupt()), log) == EXIT_INTERRUPTED == 130


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_checkpoint_write_is_atomic(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000002"
    state = {"step": 2, "position": {"epoch": 0, "index": 1}}
    write_checkpoint(folder, {"w": torch.ones(2)}, state, "a: 1\n")
    # a crash while writing step 4 leaves only a hidden temporary folder, never a step_ folder
    (tmp_path / "checkpoints" / ".step_00000004.tmp").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000002"]
    write_checkpoint(folder, {"w": torch.zeros(2)}, {**state, "step": 3}, "a: 2\n")  # replaces in place
    tensors, st = read_checkpoint(folder)
    assert torch.equal(tensors["w"], torch.zeros(2)) and st["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step_00000004.tmp", "step_00000002"]
    (folder / "state.pt").unlink()
    with pytest.raises(seed.CheckpointError, match="state.pt: missing"):
        read_checkpoint(folder)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_log_lines_in_a_file(tmp_path, monkeypatch, caplog, tty):
    """A bar (with the last loss and val_loss) only when stderr is a terminal; either way a log
    line every log_every steps and on every step with a val_ value, numbers only."""
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    run = Run(toy_cfg(f"train.output_dir={tmp_path}", "train.log_every=3", "train.tensorboard=false"))
    run.begin(4)
    with caplog.at_level(logging.INFO, logger="seed.training.run"):
        for step in range(1, 5):
            row = {"step": step, "loss": 1.0 / step, "lr": 0.1, "sources": {"a": 1}}
            if step == 2:
                row["val_loss"] = 0.75
            run.log(row)
    run.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "3/4", "4/4"]
    assert lines[0].startswith("step 2/4 (50%)  loss 0.5  val_loss 0.75  lr 0.1") and "eta" in lines[0]
    assert all("sources" not in line for line in lines)
    assert ("step/s" in err.getvalue() and "val_loss=0.75" in err.getvalue()) == tty
    if not tty:
        assert err.getvalue() == ""


def test_one_run_per_output_folder(tmp_path, caplog):
    """A second run into a live run's folder (fresh or --resume) is refused naming the holder, and
    the first run's metrics stay; once it ends (or its process died) the folder is free again."""
    common = [f"train.output_dir={tmp_path}", "train.max_steps=4", "train.save_every=2", "train.progress=false"]
    first = Run(toy_cfg(*common), schema=ToyConfig)
    first.begin(4)
    first.log({"step": 1, "loss": 1.0})
    for resume in (False, True):
        with pytest.raises(seed.InputError, match=rf"{tmp_path} is in use: pid {os.getpid()} on host .* "
                                                  r"use another train.output_dir"):
            Run(toy_cfg(*common), resume=resume, schema=ToyConfig)
    first.log({"step": 2, "loss": 0.5})
    first.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    Run(toy_cfg(*common), schema=ToyConfig).close()  # released: the folder is free
    # a run killed with -9 leaves its pid in the lock: taken over, with a warning naming it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "x"}))
    with caplog.at_level(logging.WARNING):
        Run(toy_cfg(*common), schema=ToyConfig).close()
    assert f"stale lock of pid {pid}" in caplog.text
