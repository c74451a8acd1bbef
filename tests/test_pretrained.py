"""save_pretrained / from_pretrained: a self-contained safetensors folder, local or from the Hub."""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import seed
from conftest import PARITY, TINY, parity_overrides


@pytest.fixture(scope="module")
def tok():
    """The parity weights (codes vary with the input) with the diffusion section changed, so the
    test sees that it survives."""
    cfg = seed.load_config(TINY, *parity_overrides(PARITY), "diffusion.steps=3", "diffusion.seed=7")
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    g = torch.Generator().manual_seed(3)
    for p in tok.parameters():  # weights no fresh random init has: a round trip must really carry them
        p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return tok


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return tok.save_pretrained(tmp_path_factory.mktemp("saved") / "seed-tiny")


def test_round_trip_gives_identical_outputs(tok, saved, photos, tmp_path):
    moved = shutil.copytree(saved, tmp_path / "elsewhere")  # loads from the folder alone
    back = seed.Tokenizer.from_pretrained(moved, device="cpu")
    assert torch.equal(back.encode(photos), tok.encode(photos))
    assert torch.equal(back.causal_embeddings(photos), tok.causal_embeddings(photos))
    codes = tok.encode(photos)
    assert torch.equal(back.embed(codes), tok.embed(codes))
    for name, value in tok.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name

    expected = OmegaConf.to_container(tok.cfg, resolve=True)
    expected["checkpoints"] = {k: None for k in expected["checkpoints"]}  # the folder holds the weights
    assert OmegaConf.to_container(back.cfg, resolve=True) == expected
    assert back.cfg.diffusion.steps == 3 and back.cfg.diffusion.seed == 7


def test_folder_holds_safetensors_in_our_names_and_no_pickle(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.yaml", "model.safetensors"]
    for p in saved.iterdir():
        head = p.read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", f"{p.name} looks like a torch pickle"
    with safe_open(saved / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"vision.patch_embed.proj.weight", "qformer.query_tokens", "quantizer.codebook.weight",
            "decoder.proj.weight"} <= keys
    assert "checkpoints" not in OmegaConf.load(saved / "config.yaml")


def test_dtype_and_device_arguments(saved):
    back = seed.Tokenizer.from_pretrained(str(saved), device="cpu", dtype=torch.bfloat16)
    assert back.vision.patch_embed.proj.weight.dtype == torch.bfloat16
    assert back.quantizer.codebook.weight.dtype == torch.float32
    assert back.device == torch.device("cpu")


def test_unreachable_hub_id_raises_checkpoint_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: must still count
    with pytest.raises(seed.CheckpointError, match="nobody/no-such-seed-tokenizer") as e:
        seed.Tokenizer.from_pretrained("nobody/no-such-seed-tokenizer")
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_no_such_repo_raises_checkpoint_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # no network here: a connection error; with a network: the Hub answers that the repo is not there
    with pytest.raises(seed.CheckpointError, match="nobody-at-all-xyz/no-such-seed-tokenizer"):
        seed.Tokenizer.from_pretrained("nobody-at-all-xyz/no-such-seed-tokenizer")


def test_incomplete_folder_names_what_is_missing(saved, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    with pytest.raises(seed.CheckpointError, match="config.yaml"):
        seed.Tokenizer.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.yaml").write_text((saved / "config.yaml").read_text())
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(seed.CheckpointError, match="model.safetensors"):
        seed.Tokenizer.from_pretrained(tmp_path, device="cpu")
