"""The tokenizer computes exactly SEED-1: parity with the original's outputs, causality, API."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

import seed
from conftest import PARITY, TINY, assert_close_at_scale, fixtures, parity_overrides

FIXTURES = fixtures("seed1")


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_matches_original_outputs(fixture):
    cfg = seed.load_config(TINY, *parity_overrides(fixture))
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    exp = torch.load(fixture / "expected.pt", weights_only=True)
    paths = [fixture / "images" / name for name in exp["images"]]

    pixels = tok.preprocess(paths)
    assert pixels.shape == exp["pixel_values"].shape and pixels.dtype == torch.float32
    assert (pixels - exp["pixel_values"]).abs().max() < 1e-3

    assert torch.equal(tok.encode(paths), exp["codes"])
    assert torch.equal(tok.encode(exp["pixel_values"]), exp["codes"])
    causal = tok.causal_embeddings(exp["pixel_values"])
    assert_close_at_scale(causal, exp["causal_embeds"], "causal_embeds", rows=True)
    gen = tok.embed(exp["codes"])
    assert_close_at_scale(gen, exp["gen_embeds"], "gen_embeds", rows=True)


def test_parity_fixture_present():
    assert FIXTURES, f"no parity fixture under {PARITY.parent}: parity with the original is unproven"


def test_codes_are_causal(tiny_cfg):
    torch.manual_seed(1)
    tok = seed.Tokenizer.from_config(tiny_cfg, device="cpu")
    pixels = torch.randn(2, 3, tok.image_size, tok.image_size).clamp(-1.5, 1.5)
    base_embeds = tok.causal_embeddings(pixels)
    base_codes = tok.encode(pixels)
    queries = tok.qformer.query_tokens
    original = queries.detach().clone()
    n = queries.shape[1]
    for k in (0, 5, n // 2, n - 1):
        with torch.no_grad():
            queries[:, k] += torch.randn(queries.shape[-1]) * 3  # not a constant: LayerNorm would remove one
        try:
            embeds, codes = tok.causal_embeddings(pixels), tok.encode(pixels)
        finally:
            with torch.no_grad():
                queries.copy_(original)
        assert torch.equal(embeds[:, :k], base_embeds[:, :k]), f"query {k} changed earlier outputs"
        assert torch.equal(codes[:, :k], base_codes[:, :k])
        assert not torch.allclose(embeds[:, k], base_embeds[:, k]), "the perturbation had no effect at all"


def test_shapes_and_batches(parity_tok, photos):
    one = parity_tok.encode(photos[0])
    assert one.shape == (1, 32) and one.dtype == torch.int64
    many = parity_tok.encode(list(photos) * 2)
    assert many.shape == (2 * len(photos), 32)
    assert ((many >= 0) & (many < 8192)).all()
    # batching does not change the result: row i equals encoding image i alone
    for i, p in enumerate(photos):
        assert torch.equal(many[i], parity_tok.encode([p])[0])
    pil = Image.open(photos[0])
    assert torch.equal(parity_tok.encode(pil), one)
    assert torch.equal(parity_tok.encode(photos[0].read_bytes()), one)

    causal = parity_tok.causal_embeddings(photos[:1])
    assert causal.shape == (1, 32, 96) and causal.dtype == torch.float32
    gen = parity_tok.embed(many)
    assert gen.shape == (len(many), 77, 768) and gen.dtype == torch.float32
    assert torch.equal(parity_tok.embed(many[0]), parity_tok.embed(many[:1]))
    assert torch.equal(parity_tok.embed(many[0].tolist()), parity_tok.embed(many[:1]))


def test_load_config_and_overrides(tmp_path):
    cfg = seed.load_config(TINY)
    assert cfg.model.image_size == 56 and cfg.checkpoints.vision is None
    cfg = seed.load_config(TINY, "model.image_size=112", "checkpoints.vision=null")
    assert cfg.model.image_size == 112 and cfg.checkpoints.vision is None
    assert seed.load_config("seed_tokenizer").model.vision.depth == 39
    with pytest.raises(seed.InputError, match="key=value"):
        seed.load_config(TINY, "model.image_size")
    with pytest.raises(seed.InputError, match="nope.yaml"):
        seed.load_config(tmp_path / "nope.yaml")
    tok = seed.Tokenizer.from_config(seed.load_config(TINY, "model.image_size=28"), device="cpu")
    assert tok.encode(torch.zeros(1, 3, 28, 28)).shape == (1, 32)


def test_real_config_dimensions():
    cfg = seed.load_config("configs/seed_tokenizer.yaml")
    with torch.device("meta"):
        tok = seed.Tokenizer(cfg)
    assert tok.vision.blocks[0].mlp.fc1.out_features == 6144
    assert len(tok.vision.blocks) == 39 and tok.vision.pos_embed.shape == (1, 257, 1408)
    assert tok.decoder.proj.out_features == 768
    n_vit = sum(p.numel() for p in tok.vision.parameters())
    assert 0.98e9 < n_vit < 1.0e9  # EVA ViT-g/14 minus its last block


def test_random_weights_are_the_same_for_the_same_config(tiny_cfg, tiny_tok):
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    again = seed.Tokenizer.from_config(tiny_cfg, device="cpu")
    assert torch.equal(torch.rand(3), expected_draw), "building a model must not move the global RNG"
    for (name, a), b in zip(tiny_tok.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
