"""A normal (non-editable) install works on its own, and `import seed` stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

HEAVY = ("torch", "transformers", "timm", "diffusers")
SCRIPTS = sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "demo_recon.py"]


def run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed into a folder of its own (no source tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: the checkout stays clean, and the build cannot see tests/
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "outputs", "build", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # every folder of the package is declared: setuptools warns of none ("Package would be ignored")
    assert "would be ignored" not in r.stdout + r.stderr and "is absent from the `packages`" not in r.stdout + r.stderr
    wheel = next((tmp / "dist").glob("seed-*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return tmp / "site"


def test_wheel_runs_without_the_source_tree(installed, tmp_path):
    # The installed package's own deps come from this venv; `seed` itself only from the wheel.
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    code = f"""
import sys, pathlib
sys.path[:0] = [{str(installed)!r}, {venv_site!r}]
import seed
assert pathlib.Path(seed.__file__).is_relative_to({str(installed)!r}), seed.__file__
assert (pathlib.Path(seed.__file__).parent / "py.typed").is_file()
cfg = seed.load_config("seed_tiny")
assert cfg.model.image_size == 56
import pkgutil, importlib
for m in pkgutil.walk_packages(seed.__path__, "seed."):
    if m.name != "seed.configs":
        importlib.import_module(m.name)
tok = seed.Tokenizer.from_config(cfg, device="cpu")
print(tok.encode({str(ROOT / 'tests' / 'data' / 'images' / 'chelsea.png')!r}).shape)
"""
    r = run(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 32])" in r.stdout


def test_demo_tiny_run_with_the_installed_package(installed, tmp_path):
    shutil.copy(ROOT / "demo_recon.py", tmp_path / "demo_recon.py")  # beside no source tree
    image = ROOT / "tests" / "data" / "images" / "camera.png"
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    r = subprocess.run([sys.executable, "demo_recon.py", "--config", "seed_tiny", "--image", str(image),
                        "--out", str(tmp_path / "out"), "--steps", "1", "--num-samples", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{installed}:{venv_site}"})
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "out").glob("camera_recon*.png")), r.stdout + r.stderr


def test_import_seed_is_light(tmp_path):
    r = run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import seed; "
            "print(sorted(m for m in " + repr(HEAVY) + " if m in sys.modules))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import seed pulled in {r.stdout.strip()}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_imports_no_model_library(script):
    # --help must not wait for transformers/timm/diffusers (seconds each); count imports, not seconds.
    code = (f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = [{str(script)!r}, '--help']\n"
            f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('transformers', 'timm', 'diffusers') if m in sys.modules))")
    r = run(code, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()
    assert r.stdout.strip().endswith("HEAVY []"), r.stdout.splitlines()[-1]
