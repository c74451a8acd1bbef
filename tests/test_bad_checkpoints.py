"""Bad checkpoint files give a clear `seed.CheckpointError`, and nothing in a file can run code.

Every file is a real copy of the parity fixture's SEED-1 files, damaged on purpose, in tmp_path.
"""

from __future__ import annotations

import builtins
import copy
import pickle

import pytest
import torch
from safetensors.torch import save_file

import seed
from conftest import PARITY
from seed.checkpoint import read_state_dict


def build(cfg, **files):
    """A tokenizer from the parity config with some checkpoint paths replaced."""
    cfg = copy.deepcopy(cfg)
    for name, path in files.items():
        cfg.checkpoints[name] = str(path)
    return seed.Tokenizer.from_config(cfg, device="cpu")


@pytest.fixture(scope="module")
def original():
    """The parity fixture's seed_tokenizer.pth as torch.load gives it: {"model": {...}, "config": ..., ...}."""
    return torch.load(PARITY / "seed_tokenizer.pth", weights_only=True)


def test_good_copies_load(parity_cfg, parity_tok, original, tmp_path):
    """The control: unmodified copies (pickle and safetensors) load and give the fixture's codes."""
    torch.save(original, tmp_path / "seed_tokenizer.pth")
    save_file(original["model"], tmp_path / "seed_tokenizer.safetensors")
    x = torch.load(PARITY / "expected.pt", weights_only=True)["pixel_values"]
    for name in ("seed_tokenizer.pth", "seed_tokenizer.safetensors"):
        tok = build(parity_cfg, codebook=tmp_path / name)
        assert torch.equal(tok.encode(x), parity_tok.encode(x)), name


@pytest.mark.parametrize("name, where", [
    ("seed_tokenizer.pth", "drive.google.com"),
    ("eva_vit_g.pth", "scripts/download_weights.py"),
    ("mine.safetensors", "pretrained/README.md"),
])
def test_missing_file_names_it_and_where_to_get_it(parity_cfg, tmp_path, name, where):
    path = tmp_path / "nowhere" / name
    with pytest.raises(seed.CheckpointError) as err:
        build(parity_cfg, vision=path) if name == "eva_vit_g.pth" else build(parity_cfg, codebook=path)
    assert str(path) in str(err.value) and "not found" in str(err.value) and where in str(err.value)


def damaged(tmp_path, original) -> dict[str, object]:
    """name -> a damaged copy of seed_tokenizer.pth (or how to make it)."""
    data = (PARITY / "seed_tokenizer.pth").read_bytes()
    save_file(original["model"], tmp_path / "good.safetensors")
    st = (tmp_path / "good.safetensors").read_bytes()
    return {
        "empty.pth": b"",
        "truncated.pth": data[: len(data) // 2],
        "truncated_start.pth": data[:100],
        "flipped.pth": data[:30] + bytes(b ^ 0xFF for b in data[30:200]) + data[200:],
        "text.pth": b"this is not a checkpoint\n" * 20,
        "truncated.safetensors": st[: len(st) - 100],
        "header.safetensors": st[:50],
    }


@pytest.mark.parametrize("name", ["empty.pth", "truncated.pth", "truncated_start.pth", "flipped.pth", "text.pth",
                                  "truncated.safetensors", "header.safetensors"])
def test_damaged_file(parity_cfg, original, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(damaged(tmp_path, original)[name])
    with pytest.raises(seed.CheckpointError, match="empty|truncated or corrupt|corrupt") as err:
        build(parity_cfg, codebook=path)
    assert str(path) in str(err.value)
    with pytest.raises(seed.CheckpointError):
        read_state_dict(path)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(seed.CheckpointError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_absent_weight_is_named(parity_cfg, original, tmp_path):
    sd = dict(original["model"])
    del sd["quantize.embedding.weight"]  # the codebook
    path = tmp_path / "seed_tokenizer.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(seed.CheckpointError) as err:
        build(parity_cfg, codebook=path)
    msg = str(err.value)
    assert str(path) in msg and "1 weight(s)" in msg and "Quantizer" in msg
    # the file's own name for it, ours, and the shape it must have
    assert "quantize.embedding.weight (our codebook.weight) (8192, 32)" in msg
    # a Reverse Q-Former weight is named as the file names it too
    sd = dict(original["model"])
    del sd["Reverse_Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(seed.CheckpointError, match=r"Reverse_Qformer\.bert\.encoder\.layer\.2\.crossattention\.self"
                                                   r"\.key\.weight \(our qformer\.encoder\.layer\.2\.crossattention"
                                                   r"\.attention\.key\.weight\)"):
        build(parity_cfg, codebook=path)

    # the wrong file given for a stage: every weight is absent; the message stays short
    with pytest.raises(seed.CheckpointError, match=r"lacks \d+ weight\(s\) the Eva needs: cls_token .*more\)"):
        build(parity_cfg, vision=PARITY / "causal_qformer.pth")


def test_wrong_shape_is_named_with_both_shapes(parity_cfg, original, tmp_path):
    sd = dict(original["model"])
    sd["quantize.embedding.weight"] = torch.zeros(100, 32)
    path = tmp_path / "seed_tokenizer.safetensors"
    save_file(sd, path)
    with pytest.raises(seed.CheckpointError) as err:
        build(parity_cfg, codebook=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "quantize.embedding.weight (our codebook.weight): file has (100, 32), the Quantizer needs (8192, 32)" in msg


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused(parity_cfg, original, tmp_path, how):
    marker = tmp_path / "marker"
    path = tmp_path / "seed_tokenizer.pth"
    obj = {"model": original["model"], "extra": Payload(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # a plain pickle, as torch.load's legacy format reads

    with pytest.raises(seed.CheckpointError, match="refused to load") as err:
        build(parity_cfg, codebook=path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()

    # the control: an unsafe load of the same file would have created the marker
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert marker.exists()
