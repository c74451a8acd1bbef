"""SEED-2 against the original implementation's outputs (tests/data/parity/seed2/*).

Every fixture folder is loaded through configs/seed2_tiny.yaml with its spec.json dimensions and
its original-format files (eva_vit_g.pth, the flat seed_quantizer.pt).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY2, assert_close_at_scale, fixtures, seed2_overrides, seed2_tokenizer

import seed
import seed.checkpoint
from seed import CheckpointError, InputError
from seed.llm import codes_to_text, codes_to_token_ids

SEED2 = fixtures("seed2")


build = seed2_tokenizer


@pytest.fixture(scope="module", params=SEED2, ids=[p.name for p in SEED2])
def fixture(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def expected(fixture):
    return torch.load(fixture / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def paths(fixture, expected):
    return [fixture / "images" / name for name in expected["images"]]


@pytest.fixture(scope="module")
def tok(fixture):
    return build(fixture)


@pytest.fixture(scope="module")
def tok_bicubic(fixture):
    return build(fixture, "model.image_resample=bicubic")


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item() < tol


def test_variant_and_shapes(tok, expected):
    assert tok.variant == "seed2"
    codes = tok.encode(expected["pixel_values"])
    assert codes.dtype == torch.int64 and codes.shape == (len(expected["images"]), 32)
    emb = tok.embed(codes)
    assert emb.dtype == torch.float32 and emb.shape == (codes.shape[0], 1024) and not emb.requires_grad


def test_preprocess_both_filters(tok, tok_bicubic, paths, expected):
    assert close(tok.preprocess(paths), expected["pixel_values"], 1e-3)
    assert close(tok_bicubic.preprocess(paths), expected["pixel_values_bicubic"], 1e-3)
    # the two filters differ by far more than the tolerance: the check above tells them apart
    assert not close(expected["pixel_values"], expected["pixel_values_bicubic"], 1e-2)


def test_codes_from_image_files(tok, tok_bicubic, paths, expected):
    assert torch.equal(tok.encode(paths), expected["codes"])
    assert torch.equal(tok_bicubic.encode(paths), expected["codes_bicubic"])


def test_quant_inputs_tell_the_paths_apart(tok, tok_bicubic, paths, expected):
    """The fixture's codes coincide for both filters at this size; the down-projections do not."""
    assert_close_at_scale(tok.quantizer.down(tok.causal_embeddings(paths)), expected["quant_inputs"], rows=True)
    bicubic = tok_bicubic.quantizer.down(tok_bicubic.causal_embeddings(paths))
    assert_close_at_scale(bicubic, expected["quant_inputs_bicubic"], rows=True)


def test_encoder_intermediates(tok, expected):
    x = expected["pixel_values"]
    with torch.no_grad():
        feats = torch.nn.functional.layer_norm(tok.vision(x), tok.qformer.ln_vision.normalized_shape,
                                               tok.qformer.ln_vision.weight, tok.qformer.ln_vision.bias, 1e-5)
    assert_close_at_scale(feats, expected["vision_features"], rows=True)
    assert_close_at_scale(tok.causal_embeddings(x), expected["causal_embeds"], rows=True)
    assert torch.equal(tok.encode(x), expected["codes"])


def test_decoder_intermediates_and_embeddings(tok, expected):
    with torch.no_grad():
        hidden = tok.decoder.trunk(tok.quantizer.codebook(expected["codes"]))
        assert_close_at_scale(hidden, expected["decoder_hidden"], rows=True)
        assert_close_at_scale(tok.decoder.down(hidden), expected["decoder_down"], rows=True)
    assert_close_at_scale(tok.embed(expected["codes"]), expected["image_embeds"], rows=True)
    assert_close_at_scale(tok.embed(expected["codes_bicubic"]), expected["image_embeds_bicubic"], rows=True)
    assert_close_at_scale(tok.embed(expected["decode_codes"]), expected["decode_image_embeds"], rows=True)


def test_llm_text_of_the_codes(tok, paths, expected):
    codes = tok.encode(paths)
    assert codes_to_text(codes) == expected["llm_text"]
    assert torch.equal(codes_to_token_ids(codes), expected["llm_image_token_ids"])


def test_unused_keys_skipped_and_counted(fixture, caplog):
    spec = json.loads((fixture / "spec.json").read_text())
    sd = torch.load(fixture / "seed_quantizer.pt", weights_only=True)
    unused = [k for k in sd if k == "pos_embed" or k.startswith("blocks.") or k.endswith("position_ids")
              or k in spec["synthetic_extra_keys"]]
    assert "pos_embed" in unused and any(k.startswith("blocks.") for k in unused)
    with caplog.at_level(logging.INFO, logger="seed.checkpoint"):
        build(fixture)
    assert f"seed_quantizer.pt: loaded {len(sd) - len(unused)} tensors, skipped {len(unused)}" in caplog.text


def test_fp16_vision_file_loads_and_gives_the_codes(fixture, paths, expected, tmp_path):
    sd = torch.load(fixture / "eva_vit_g.pth", weights_only=True)
    half = tmp_path / "eva_vit_g.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half)
    tok = build(fixture, vision=half)
    assert tok.vision.patch_embed.proj.weight.dtype == torch.float32  # cast on load
    assert torch.equal(tok.vision.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"].half().float())
    assert torch.equal(tok.encode(paths), expected["codes"])


@pytest.mark.parametrize("key", ["distill_image_proj.weight", "image_down.2.weight", "pos_embed_image",
                                 "blocks_image.3.mlp.fc2.bias", "quantize.embedding.weight", "query_tokens",
                                 "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
def test_missing_quantizer_key_is_named(fixture, tmp_path, key):
    sd = torch.load(fixture / "seed_quantizer.pt", weights_only=True)
    del sd[key]
    path = tmp_path / "seed_quantizer.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*lacks 1 weight.*{re.escape(key)}"):
        build(fixture, quantizer=path)


def test_save_and_from_pretrained_round_trip(tok, paths, expected, tmp_path):
    out = tok.save_pretrained(tmp_path / "seed2")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    again = seed.Tokenizer.from_pretrained(out, device="cpu")
    assert again.variant == "seed2"
    assert torch.equal(again.encode(paths), expected["codes"])  # bilinear came along in config.yaml
    assert_close_at_scale(again.embed(expected["decode_codes"]), expected["decode_image_embeds"], rows=True)
    half = seed.Tokenizer.from_pretrained(out, device="cpu", precision="fp16-all")
    assert half.quantizer.codebook.weight.dtype == torch.float16
    assert torch.equal(half.encode(paths), expected["codes"])


def test_fp16_all_precision(fixture, paths, expected):
    """The original's all-fp16 path: every weight, the codebook and the input halved."""
    tok = build(fixture, "model.precision=fp16-all")
    assert {p.dtype for p in tok.parameters()} == {torch.float16}
    assert tok.pixel_values(paths).dtype == torch.float16
    assert torch.equal(tok.encode(paths), expected["codes"])  # the fixture's codes are far from ties
    emb = tok.embed(expected["decode_codes"])
    assert emb.dtype == torch.float32 and close(emb, expected["decode_image_embeds"], 0.05)
    assert tok.causal_embeddings(paths).dtype == torch.float32


def test_config_mistakes_are_named(fixture):
    with pytest.raises(InputError, match="checkpoints.codebook is set.*checkpoints.vision and checkpoints.quantizer"):
        build(fixture, f"checkpoints.codebook={fixture / 'seed_quantizer.pt'}")
    with pytest.raises(InputError, match="model.decoder.head must be one of reverse_qformer, image, got 'imag'"):
        build(fixture, "model.decoder.head=imag")
    with pytest.raises(InputError, match="model.precision must be one of default, fp16-all, got 'fp8'"):
        build(fixture, "model.precision=fp8")
    bad = build(fixture, "model.image_resample=lanczos")
    with pytest.raises(InputError, match="model.image_resample must be one of bicubic, bilinear, got 'lanczos'"):
        bad.encode([fixture / "images" / "camera.png"])


def test_seed1_configs_stay_seed1(tiny_tok):
    assert tiny_tok.variant == "seed1"
    assert tiny_tok.embed([0] * 32).shape == (1, 77, 768)


def script(name: str):
    """A script in scripts/ as a module, to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_script_then_from_pretrained(fixture, paths, expected, tmp_path, capsys):
    out = tmp_path / "seed2"
    rc = script("convert_checkpoint").main(["--config", str(TINY2), "--out", str(out), *seed2_overrides(fixture)])
    stdout = capsys.readouterr().out
    assert rc == 0 and "codes identical" in stdout and "OK" in stdout
    tok = seed.Tokenizer.from_pretrained(out, device="cpu")
    assert torch.equal(tok.encode(paths), expected["codes"])
    assert_close_at_scale(tok.embed(expected["codes"]), expected["image_embeds"], rows=True)


def test_convert_script_needs_the_seed2_files(tmp_path, capsys):
    rc = script("convert_checkpoint").main(["--config", str(TINY2), "--out", str(tmp_path / "x")])
    assert rc == 1 and "checkpoints.vision, checkpoints.quantizer not set" in capsys.readouterr().err


def test_missing_quantizer_file_says_where_to_get_it(fixture, tmp_path):
    gone = tmp_path / "seed_quantizer.pt"
    hint = r"not found.*AILab-CVC/seed-tokenizer-2.*download_weights.py --model seed2"
    with pytest.raises(CheckpointError, match=hint):
        build(fixture, quantizer=gone)


UNREACHABLE = "http://127.0.0.1:9/eva_vit_g.pth"  # the discard port: connection refused at once


def test_download_seed2_offline_fails_clearly(tmp_path):
    r = subprocess.run([sys.executable, "scripts/download_weights.py", "--model", "seed2", "--dest", str(tmp_path),
                        "--eva-url", UNREACHABLE, "--timeout", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    for what in ("AILab-CVC/seed-tokenizer-2/seed_quantizer.pt", "stabilityai/stable-diffusion-2-1-unclip",
                 UNREACHABLE):
        assert what in r.stderr
    assert "CompVis" not in r.stdout + r.stderr and "put it at" not in r.stdout  # nothing of SEED-1
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed download left files behind"


def test_download_seed2_skips_what_is_there(tmp_path, monkeypatch, capsys):
    dl = script("download_weights")
    for f in [f"{dl.UNCLIP_DIR}/{f}" for f in dl.UNCLIP_FILES] + [dl.EVA_FILE, dl.SEED2_FILE]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main(["--model", "seed2", "--dest", str(tmp_path), "--eva-url", UNREACHABLE]) == 0
    out = capsys.readouterr().out
    assert out.count("[skip]") == 3 and "[get" not in out
    assert dl.SEED1_DRIVE == seed.checkpoint.SEED1_WEIGHTS_URL
