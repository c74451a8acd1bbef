"""scripts/seed_llama.py: what --image-tokenizer names (folder, config, Hub id; a typo is `error:`
and exit 2), generation arguments checked before any model loads, and runs that never overwrite
an earlier run's transcript, codes and images in --out.

The chats run `SeedLlama.from_pretrained("tiny")` (a seeded random tiny LLaMA with a real small
SentencePiece tokenizer) with the random `seed2_tiny` image tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
from unittest import mock

import pytest
from conftest import PHOTOS, ROOT
from omegaconf import DictConfig, OmegaConf

from seed import CheckpointError, InputError
from seed.llama import SeedLlama

SCRIPT = ROOT / "scripts" / "seed_llama.py"


def load_script():
    spec = importlib.util.spec_from_file_location("seed_llama_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> tuple[int, str, str]:
    """main(args) in this process: (exit status, stdout, stderr); argparse's exit counts as a status."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = load_script().main(list(args))
        except SystemExit as e:
            rc = e.code
    return rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def tiny_pipe(one_thread) -> SeedLlama:
    return SeedLlama.from_pretrained("tiny", image_tokenizer="seed2_tiny")


def no_model_loads():
    return mock.patch.object(SeedLlama, "from_pretrained", side_effect=AssertionError("a model started loading"))


# --------------------------------------------------------------------------- --image-tokenizer


def test_image_tokenizer_is_a_folder_a_config_or_a_hub_id(tmp_path):
    source = load_script().image_tokenizer_source
    cfg = source("seed2_tiny", ["diffusion.steps=3"])
    assert isinstance(cfg, DictConfig) and cfg.diffusion.steps == 3 and cfg.model.decoder.head == "image"
    assert source(str(ROOT / "configs" / "seed2_tiny.yaml"), []).model.image_size == 56
    saved = tmp_path / "saved"
    saved.mkdir()
    assert source(str(saved), []) == saved
    # a Hub id is passed on as it is: SeedLlama downloads it on first use, not now
    assert source("AILab-CVC/seed-tokenizer-2", []) == "AILab-CVC/seed-tokenizer-2"
    for name, overrides, message in (
            ("seed2_tokenzer", [], "Did you mean 'seed2_tokenizer'"),
            ("configs/seed2_tokenzer", [], "not a Hugging Face Hub repo id"),  # configs/ is a local folder
            (str(tmp_path / "nowhere.yaml"), [], "no such folder or config file"),
            ("AILab-CVC/seed-tokenizer-2", ["model.precision=fp16-all"], "is a Hub repo id: key=value overrides"),
            (str(saved), ["diffusion.steps=2"], "is a saved folder: key=value overrides"),
            ("seed2_tiny", ["diffusion.stepz=2"], "Did you mean 'diffusion.steps'")):
        with pytest.raises(InputError, match=message):
            source(name, overrides)


def test_image_tokenizer_typo_is_an_error_line_and_exit_2(tmp_path):
    with no_model_loads():
        rc, _, err = run("--llm", "tiny", "--image-tokenizer", "seed2_tokenzer", "--prompt", "hi",
                         "--out", str(tmp_path / "out"))
    assert rc == 2 and err.startswith("error: --image-tokenizer seed2_tokenzer: ") and "Traceback" not in err, err
    assert "Did you mean 'seed2_tokenizer'?" in err


def test_image_tokenizer_hub_id_reaches_the_hub_loader(one_thread, tmp_path, monkeypatch):
    """Offline, a Hub id is tried on the Hub when the first image needs the tokenizer: a clean
    error naming the id, and the failed one-shot leaves no transcript behind."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    rc, _, err = run("--llm", "tiny", "--image-tokenizer", "AILab-CVC/seed-tokenizer-2", "--image", str(PHOTOS[0]),
                     "--prompt", "What is this?", "--greedy", "--max-new-tokens", "4", "--out", str(out))
    assert rc == 2 and "Traceback" not in err, err
    assert "error: cannot load a pretrained tokenizer from 'AILab-CVC/seed-tokenizer-2'" in err
    assert "HF_HUB_OFFLINE" in err
    assert list(out.iterdir()) == []


UNREACHABLE_HUB = "http://127.0.0.1:9"
"""A Hub endpoint nobody answers at (the discard port on this machine: connection refused)."""


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No network: the Hub endpoint refuses connections, and the Hugging Face cache is empty."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def test_a_hub_id_without_network_fails_at_once_saying_how_to_work_offline(no_hub):
    """One line naming the model, the unreachable endpoint and the ways to work offline; in
    seconds, not huggingface_hub's minute of retries."""
    t = time.monotonic()
    rc, _, err = run("--llm", "someone/some-llm", "--prompt", "hi", "--out", str(no_hub / "out"))
    took = time.monotonic() - t
    assert rc == 2 and took < 5, (took, err)
    assert err.count("\n") == 1 and err.startswith("error: llm: cannot load 'someone/some-llm': "), err
    for words in ("the network or the Hugging Face Hub", UNREACHABLE_HUB, "unreachable", "local folder",
                  "hf download someone/some-llm --local-dir", "scripts/download_weights.py", "HF_HUB_OFFLINE=1"):
        assert words in err, (words, err)
    assert "Retrying" not in err
    from seed.llama import TINY_LLAMA_TOKENIZER

    t = time.monotonic()  # the tokenizer from a folder: the LM (loaded before any turn) fails as fast
    rc, _, err2 = run("--llm", "someone/some-llm", "--tokenizer", str(TINY_LLAMA_TOKENIZER), "--prompt", "hi",
                      "--out", str(no_hub / "out"))
    assert rc == 2 and time.monotonic() - t < 5 and err2 == err, err2


def test_a_hub_tokenizer_without_network_fails_at_once(no_hub):
    t = time.monotonic()
    with pytest.raises(CheckpointError, match="tokenizer: cannot load 'someone/some-tokenizer': the network"):
        SeedLlama.from_pretrained("tiny", tokenizer="someone/some-tokenizer")
    assert time.monotonic() - t < 5


def test_hub_log_records_print_once(monkeypatch):
    """huggingface_hub's own handler and the script's root handler would print each record twice."""
    import logging

    from seed.hub import log_once

    hub_logger, root = logging.getLogger("huggingface_hub"), logging.getLogger()
    monkeypatch.setattr(hub_logger, "handlers", list(hub_logger.handlers))  # put back afterwards
    printed = io.StringIO()
    mine = logging.StreamHandler(printed)
    for h in hub_logger.handlers:
        monkeypatch.setattr(h, "stream", printed)
    root.addHandler(mine)
    try:
        log_once()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    finally:
        root.removeHandler(mine)
    assert printed.getvalue() == "Retrying in 1s [Retry 1/5].\n"


# --------------------------------------------------------------------------- generation arguments


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "argument --temperature: must be greater than 0, got 0"),
    (["--temperature", "-1"], "argument --temperature: must be greater than 0"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: not an integer"),
    (["--top-p", "0"], "argument --top-p: must be greater than 0 and at most 1"),
    (["--top-p", "-0.5"], "argument --top-p: must be greater than 0 and at most 1"),
    (["--top-p", "1.5"], "argument --top-p: must be greater than 0 and at most 1, got 1.5"),
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--height", "60"], "argument --height: must be a positive multiple of 8, got 60"),
    (["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number"),
    (["--load-in-8bit", "--load-in-4bit"], "--load-in-8bit and --load-in-4bit exclude each other"),
    (["--force-image", "--max-new-tokens", "32"], "--force-image needs --max-new-tokens of at least 33"),
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["not_an_override"], "overrides must look like key=value, got not_an_override"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_generation_arguments_exit_2_before_loading(flags, message, tmp_path):
    with no_model_loads():
        rc, _, err = run("--llm", "tiny", "--prompt", "hi", "--out", str(tmp_path / "out"), *flags)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- --out


def test_two_one_shot_runs_keep_both(tiny_pipe, tmp_path):
    """The README's two one-shot commands (image in, text out; then text to image) into one --out."""
    out = tmp_path / "out"
    with mock.patch.object(SeedLlama, "from_pretrained", return_value=tiny_pipe):
        rc, printed, err = run("--llm", "tiny", "--prompt", "What is this animal?", "--image", str(PHOTOS[0]),
                               "--greedy", "--max-new-tokens", "6", "--out", str(out))
        assert rc == 0, err
        assert printed.rstrip().endswith(f"transcript: {out / 'transcript.md'}")
        first = {p.name: p.read_bytes() for p in out.iterdir()}
        rc, printed, err = run("--llm", "tiny", "--prompt", "A dog on the green grass.", "--force-image",
                               "--greedy", "--max-new-tokens", "40", "--steps", "1", "--height", "64", "--width",
                               "64", "--out", str(out))
        assert rc == 0, err
    assert printed.rstrip().endswith(f"transcript: {out / 'transcript-2.md'}")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in first} == first  # run 1 untouched
    assert "What is this animal?" in first["transcript.md"].decode()
    assert first["input_01" + PHOTOS[0].suffix] == PHOTOS[0].read_bytes()
    second = (out / "transcript-2.md").read_text()
    assert "A dog on the green grass." in second and "What is this animal?" not in second
    assert "![generated image 1](image-2_01.png)" in second and (out / "image-2_01.png").is_file()
    codes = json.loads((out / "codes-2.json").read_text())
    assert list(codes) == ["image-2_01.png"] and len(codes["image-2_01.png"]) == 32
    assert not any(p.name.startswith(("image_", "input-2")) for p in out.iterdir())


def test_a_run_number_is_free_only_if_none_of_its_files_exist(tmp_path):
    Transcript = load_script().Transcript
    (tmp_path / "image_01.png").write_bytes(b"an earlier run's image, its transcript deleted")
    (tmp_path / "codes-2.json").write_text("{}")
    t = Transcript(tmp_path, "header")
    assert t.path.name == "transcript-3.md" and t.codes_path.name == "codes-3.json" and t.path.is_file()
    assert Transcript(tmp_path, "header").path.name == "transcript-4.md"  # the file claims the number
    assert (tmp_path / "codes-2.json").read_text() == "{}"


# --------------------------------------------------------------------------- review r1


def test_a_seed1_image_tokenizer_is_refused_before_loading(tmp_path):
    """SEED-LLaMA speaks SEED-2 codes: a SEED-1 config, or a folder whose config.yaml is SEED-1, is
    `error:` and exit 2 before any model loads."""
    from seed import load_config

    source = load_script().image_tokenizer_source
    folder = tmp_path / "seed1-saved"
    folder.mkdir()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(load_config("seed_tiny")))
    for name in ("seed_tiny", str(ROOT / "configs" / "seed_tiny.yaml"), str(folder)):
        with pytest.raises(InputError, match=r"is a SEED-1 tokenizer \(model.decoder.head=reverse_qformer\)"):
            source(name, [])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(load_config("seed2_tiny")))
    assert source(str(folder), []) == folder
    with no_model_loads():
        rc, _, err = run("--llm", "tiny", "--image-tokenizer", "seed_tiny", "--prompt", "hi", "--out",
                         str(tmp_path / "out"))
    assert rc == 2 and err.startswith("error: --image-tokenizer seed_tiny: this config is a SEED-1") and \
        "Traceback" not in err, err


def test_a_broken_lm_folder_is_an_error_line_and_leaves_no_files(tiny_pipe, tmp_path):
    """A truncated model.safetensors: `error: llm: cannot load the LM from FOLDER`, exit 2, and no
    transcript or codes file in --out (interactive or one-shot: the LM loads before any file)."""
    folder = tmp_path / "lm"
    tiny_pipe.model.save_pretrained(folder)
    tiny_pipe.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for prompt in (["--prompt", "hi"], []):
        out = tmp_path / f"out{len(prompt)}"
        with mock.patch("sys.stdin", io.StringIO("hi\n")):
            rc, _, err = run("--llm", str(folder), "--image-tokenizer", "seed2_tiny", *prompt, "--out", str(out))
        assert rc == 2 and err.startswith(f"error: llm: cannot load the LM from {folder}") and \
            "Traceback" not in err, err
        assert list(out.iterdir()) == []


def test_a_prompt_that_is_not_utf8_is_an_error_and_writes_nothing(tmp_path):
    """A non-UTF-8 byte on the command line (Python reads it as a lone surrogate): one error line,
    exit 2, before any model loads, and no transcript.md / codes.json (no --out folder at all)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "chat"
    proc = subprocess.run([sys.executable, os.fsencode(SCRIPT), b"--llm", b"tiny", b"--prompt", b"a cat \xff",
                           b"--out", os.fsencode(out)], capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: --prompt: not valid UTF-8 text (the byte 0xff at character 6); pass the text in UTF-8"]
    assert not out.exists()
    with no_model_loads():
        rc, _, err = run("--llm", "tiny", "--prompt", "half an emoji \ud83d", "--out", str(out))
    assert rc == 2 and "a lone surrogate U+D83D" in err and not out.exists()
