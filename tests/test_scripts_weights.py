"""scripts/convert_checkpoint.py, scripts/download_weights.py (scripts/evaluate.py: tests/test_evaluate.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

import seed
from conftest import PARITY, ROOT, TINY, parity_overrides


def script(name: str):
    """A script in scripts/ as a module, to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_convert_parity_fixture_then_from_pretrained_matches_original(parity_cfg, expected, tmp_path):
    out = tmp_path / "seed1-tiny"
    r = run("scripts/convert_checkpoint.py", "--config", str(TINY), "--out", str(out), *parity_overrides(PARITY))
    assert r.returncode == 0, r.stderr
    assert "codes identical" in r.stdout and "OK" in r.stdout
    assert not [p for p in out.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".ckpt")]

    tok = seed.Tokenizer.from_pretrained(out, device="cpu")
    paths = [PARITY / "images" / name for name in expected["images"]]
    assert torch.equal(tok.encode(paths), expected["codes"])
    assert (tok.causal_embeddings(expected["pixel_values"]) - expected["causal_embeds"]).abs().max() < 1e-4
    assert (tok.embed(expected["codes"]) - expected["gen_embeds"]).abs().max() < 1e-4


def test_convert_fails_when_the_folder_does_not_reproduce_the_files(parity_cfg, tmp_path, monkeypatch, capsys):
    load = seed.Tokenizer.from_pretrained.__func__

    def corrupted(cls, *args, **kwargs):
        tok = load(cls, *args, **kwargs)
        tok.quantizer.codebook.weight.data = tok.quantizer.codebook.weight.data.flip(0)
        return tok

    monkeypatch.setattr(seed.Tokenizer, "from_pretrained", classmethod(corrupted))
    rc = script("convert_checkpoint").main(["--config", str(TINY), "--out", str(tmp_path / "x"),
                                            *parity_overrides(PARITY)])
    assert rc == 1
    assert "DIFFER" in capsys.readouterr().out


def test_convert_refuses_a_config_without_files(tmp_path, capsys):
    rc = script("convert_checkpoint").main(["--config", str(TINY), "--out", str(tmp_path / "x")])
    assert rc == 1
    assert "checkpoints.vision" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


UNREACHABLE = "http://127.0.0.1:9/eva_vit_g.pth"  # the discard port: connection refused at once


def test_download_fails_clearly_offline(tmp_path):
    r = run("scripts/download_weights.py", "--dest", str(tmp_path), "--eva-url", UNREACHABLE, "--timeout", "2",
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "FAILED" in r.stderr
    assert "CompVis/stable-diffusion-v1-4" in r.stderr and UNREACHABLE in r.stderr
    for name in ("causal_qformer.pth", "seed_tokenizer.pth"):
        assert f"put it at {tmp_path / name}" in r.stdout
    assert "drive.google.com" in r.stdout
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed download left files behind"


def test_download_skips_what_is_there(tmp_path):
    dl = script("download_weights")
    for f in [f"{dl.SD_DIR}/{f}" for f in dl.SD_FILES] + [dl.EVA_FILE, *dl.BY_HAND]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"present")
    r = run("scripts/download_weights.py", "--dest", str(tmp_path), "--eva-url", UNREACHABLE,
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[skip]") == 3 and "[get" not in r.stdout
    assert "put it at" not in r.stdout


NO_INCEPTION = "http://127.0.0.1:9/inception.pth"


def test_download_evaluation_networks_offline_fails_clearly_and_skips_what_is_there(tmp_path):
    dl = script("download_weights")
    r = run("scripts/download_weights.py", "--model", "clip", "inception", "--dest", str(tmp_path),
            "--inception-url", NO_INCEPTION, "--timeout", "2", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert dl.CLIP_REPO in r.stderr and NO_INCEPTION in r.stderr
    assert "eva_vit_g" not in r.stdout + r.stderr and "put it at" not in r.stdout  # only what was asked
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed download left files behind"

    for f in [f"{dl.CLIP_DIR}/{f}" for f in dl.CLIP_FILES] + [dl.INCEPTION_FILE]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"present")
    r = run("scripts/download_weights.py", "--model", "clip", "inception", "--dest", str(tmp_path),
            "--inception-url", NO_INCEPTION, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[skip]") == 2 and "[get" not in r.stdout
