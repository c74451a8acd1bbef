"""demo_recon.py end to end: the tiny config writes PNGs; the real config without weights says what is missing."""

from __future__ import annotations

import re
import subprocess
import sys

from PIL import Image

from conftest import ROOT, TINY


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "demo_recon.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_demo_tiny_writes_pngs(tmp_path):
    out = tmp_path / "demo"
    r = run_demo("--config", str(TINY), "--image", str(ROOT / "assets" / "camera.png"), "--out", str(out),
                 "--steps", "2", "--num-samples", "2", "diffusion.height=32", "diffusion.width=48")
    assert r.returncode == 0, r.stderr
    codes = re.search(r"camera\.png: 32 codes: ([\d ]+)", r.stdout)
    assert codes and len(codes.group(1).split()) == 32
    assert all(0 <= int(c) < 8192 for c in codes.group(1).split())
    assert "RANDOM" in r.stderr  # the random weights are announced
    recons = sorted(out.glob("camera_recon*.png"))
    assert [p.name for p in recons] == ["camera_recon0.png", "camera_recon1.png"]
    assert all(Image.open(p).size == (48, 32) for p in recons)
    grid = Image.open(out / "camera_grid.png")
    assert grid.size == (3 * 48, 32)  # input | sample 0 | sample 1
    assert str(out.resolve()) in r.stdout


def test_demo_missing_weights_names_each_file(tmp_path):
    files = {"checkpoints.vision": tmp_path / "eva_vit_g.pth", "checkpoints.qformer": tmp_path / "causal_qformer.pth",
             "checkpoints.codebook": tmp_path / "seed_tokenizer.pth",
             "diffusion.model": tmp_path / "stable-diffusion-v1-4"}
    r = run_demo("--out", str(tmp_path / "out"), *(f"{k}={v}" for k, v in files.items()))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    for key, path in files.items():
        line = next((ln for ln in r.stderr.splitlines() if key in ln and str(path) in ln), None)
        assert line, f"{key} ({path}) not named in:\n{r.stderr}"
    assert r.stderr.count("download_weights.py") >= 2  # the EVA ViT and Stable Diffusion
    assert not (tmp_path / "out").exists()


def test_demo_seed2_tiny_decodes_with_a_random_unclip(tmp_path):
    out = tmp_path / "demo"
    r = run_demo("--config", str(ROOT / "configs" / "seed2_tiny.yaml"), "--image", str(ROOT / "assets" / "chelsea.png"),
                 "--out", str(out), "--steps", "1", "--num-samples", "1", "diffusion.height=32", "diffusion.width=48")
    assert r.returncode == 0, r.stderr
    assert re.search(r"chelsea\.png: 32 codes: [\d ]+", r.stdout)
    assert "RANDOM" in r.stderr
    assert Image.open(out / "chelsea_recon0.png").size == (48, 32)
    assert Image.open(out / "chelsea_grid.png").size == (2 * 48, 32)


def test_demo_seed2_missing_weights_says_where_to_get_them(tmp_path):
    files = {"checkpoints.vision": tmp_path / "eva_vit_g.pth", "checkpoints.quantizer": tmp_path / "seed_quantizer.pt",
             "diffusion.model": tmp_path / "stable-diffusion-2-1-unclip"}
    r = run_demo("--config", str(ROOT / "configs" / "seed2_tokenizer.yaml"), "--out", str(tmp_path / "out"),
                 *(f"{k}={v}" for k, v in files.items()))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for key, path in files.items():
        assert any(key in ln and str(path) in ln for ln in r.stderr.splitlines()), f"{key} not named in:\n{r.stderr}"
    unclip = next(ln for ln in r.stderr.splitlines() if "diffusion.model" in ln)
    assert "stabilityai/stable-diffusion-2-1-unclip" in unclip
    assert "configs/seed2_tiny.yaml" in r.stderr
    assert not (tmp_path / "out").exists()
