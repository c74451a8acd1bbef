"""The tokenizer in real use: outputs usable in training, its own config, typos, notebook inputs,
chunked encoding, honest saving, odd images, threads, a short repr.

Tests that compare codes use the seed1 parity fixture's weights: their codes vary with the input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import seed
from conftest import PHOTOS, TINY, run_in_threads


@pytest.fixture(scope="module")
def paths():
    return [str(p) for p in PHOTOS]


def test_parity_codes_vary_with_the_input(parity_tok, paths):
    # The premise of every code comparison below.
    codes = parity_tok.encode(paths)
    assert len({tuple(c.tolist()) for c in codes}) == len(paths)


def test_outputs_are_ordinary_tensors_usable_in_training(parity_tok, paths):
    codes = parity_tok.encode(paths)
    assert not codes.is_inference()
    emb = torch.nn.Embedding(8192, 4)
    emb(codes).sum().backward()  # raised "Inference tensors cannot be saved for backward"
    assert emb.weight.grad.abs().sum() > 0
    logits = torch.randn(codes.shape[0], 32, 8192, requires_grad=True)
    F.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
    codes[0, 0] = 7  # in-place edits work
    for out in (parity_tok.causal_embeddings(paths[:1]), parity_tok.embed(codes)):
        assert not out.is_inference() and not out.requires_grad
        out.mul_(2)


def test_gradients_through_the_stages_as_documented(parity_tok, paths):
    q = parity_tok.qformer.query_tokens
    q.requires_grad_(True)
    try:
        out = parity_tok.qformer(parity_tok.vision(parity_tok.pixel_values(paths[:1])))
        out.sum().backward()
        assert q.grad is not None and q.grad.abs().sum() > 0
    finally:
        q.requires_grad_(False)
        q.grad = None


def test_tokenizer_owns_a_read_only_copy_of_its_config(tmp_path):
    cfg = seed.load_config(TINY)
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    x = tok.preprocess(PHOTOS[:1])
    cfg.model.image_size = 28  # the caller edits their config afterwards
    cfg.model.codebook.dim = 8
    assert tok.encode(x).shape == (1, 32)
    with pytest.raises(Exception, match="read-only"):
        tok.cfg.model.image_size = 28
    back = seed.Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "saved"), device="cpu")
    assert back.cfg.model.image_size == 56 and back.cfg.model.codebook.dim == 32


@pytest.mark.parametrize("override, key, suggestion", [
    ("checkpoints.vison=x.pth", "checkpoints.vison", "checkpoints.vision"),
    ("model.qformer.num_layer=3", "model.qformer.num_layer", "model.qformer.num_layers"),
    ("model.vison.width=3", "model.vison", "model.vision"),
])
def test_config_typos_are_errors_naming_the_key(override, key, suggestion):
    with pytest.raises(seed.InputError, match=rf"unknown config key '{key}'.*Did you mean '{suggestion}'"):
        seed.load_config(TINY, override)


def test_config_wrong_types_are_errors_naming_the_key(tmp_path):
    with pytest.raises(seed.InputError, match="'model.image_size'.*abc"):
        seed.load_config(TINY, "model.image_size=abc")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("checkpoints:", "chekpoints:"))
    with pytest.raises(seed.InputError, match="chekpoints.*Did you mean 'checkpoints'"):
        seed.load_config(bad)
    from omegaconf import OmegaConf  # a config built by hand is checked too
    with pytest.raises(seed.InputError, match="vison"):
        seed.Tokenizer(OmegaConf.create({"model": {"vison": {}}}))


def test_pixels_that_were_never_normalized_are_refused(parity_tok, paths):
    s = parity_tok.image_size
    for x in (torch.rand(1, 3, s, s) * 255, torch.full((1, 3, s, s), -5.0)):
        with pytest.raises(seed.InputError, match="not CLIP-normalized.*tok.preprocess"):
            parity_tok.encode(x)
    x = parity_tok.preprocess(paths)
    assert torch.equal(parity_tok.encode(x), parity_tok.encode(paths))  # preprocess output is fine


def test_notebook_arrays_and_uint8_tensors_are_images(parity_tok, paths):
    expected = parity_tok.encode(paths)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert torch.equal(parity_tok.encode(arrays[1]), expected[1:2])  # HxWx3: one image, not H inputs
    assert torch.equal(parity_tok.encode(arrays), expected)
    gray = np.asarray(Image.open(PHOTOS[0]).convert("L"))  # HxW
    assert torch.equal(parity_tok.encode(gray), expected[0:1])
    chw = torch.from_numpy(arrays[2]).permute(2, 0, 1)
    assert torch.equal(parity_tok.encode(chw), expected[2:3])
    assert torch.equal(parity_tok.encode(torch.stack([chw, chw])), expected[[2, 2]])
    with pytest.raises(seed.InputError, match="uint8"):
        parity_tok.encode(arrays[0].astype(np.float64))
    with pytest.raises(seed.InputError, match="None"):
        parity_tok.encode(None)


def test_encode_runs_long_lists_in_chunks_with_the_same_codes(parity_cfg, parity_tok, paths):
    many = paths * 3
    expected = torch.cat([parity_tok.encode(p) for p in many])
    small = seed.Tokenizer.from_config(seed.load_config(TINY, *_as_overrides(parity_cfg), "encode.batch_size=2"),
                                       device="cpu")
    seen = []
    small.vision.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    assert torch.equal(small.encode(many), expected)
    assert max(seen) == 2 and sum(seen) == len(many)
    with pytest.raises(seed.InputError, match=r"image 5 of 9: .*nope\.png: no such file"):
        small.encode(many[:5] + ["nope.png"] + many[6:])  # the position in the whole list, not the chunk
    seen.clear()
    pixels = small.preprocess(many)
    assert torch.equal(small.causal_embeddings(pixels), parity_tok.causal_embeddings(pixels))
    assert max(seen) == 2


def _as_overrides(cfg) -> list[str]:
    from omegaconf import OmegaConf

    flat = OmegaConf.to_container(cfg, resolve=True)
    out = []
    for section in ("model", "checkpoints"):
        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out.append(f"{prefix}{k}={'null' if v is None else v}")
        walk(flat[section], f"{section}.")
    return out


def test_saving_a_half_precision_tower_says_so_and_keeps_its_dtype(parity_cfg, tmp_path, caplog):
    tok = seed.Tokenizer.from_config(parity_cfg, device="cpu", dtype=torch.float16)
    with caplog.at_level("WARNING"):
        folder = tok.save_pretrained(tmp_path / "half")
    assert "float16" in caplog.text and "full precision" in caplog.text
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert all(d == "F16" for k, d in dtypes.items() if k.startswith("vision."))
    assert all(d != "F16" for k, d in dtypes.items() if not k.startswith("vision."))
    back = seed.Tokenizer.from_pretrained(folder, device="cpu", dtype=torch.float16)
    for (k, a), (_, b) in zip(tok.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_int32_image_holding_8bit_values_is_not_darkened(parity_tok):
    gray = Image.open(PHOTOS[0]).convert("L")
    as_int32 = gray.convert("I")  # the same 0..255 values in a 32-bit integer image
    assert np.asarray(as_int32).max() <= 255
    assert torch.equal(parity_tok.preprocess(as_int32), parity_tok.preprocess(gray))


def test_rgb_with_a_transparent_key_colour_goes_on_white(tmp_path):
    from seed.images import open_image

    a = np.zeros((8, 8, 3), np.uint8)
    a[:4] = (10, 200, 30)  # the key colour, transparent
    a[4:] = (0, 0, 255)
    path = tmp_path / "key.png"
    Image.fromarray(a).save(path, transparency=(10, 200, 30))
    assert "transparency" in Image.open(path).info
    out = np.asarray(open_image(path))
    assert (out[:4] == 255).all() and (out[4:] == (0, 0, 255)).all()


def test_concurrent_encodes_on_one_tokenizer(parity_tok, paths):
    expected = parity_tok.encode(paths)
    jobs = [(t, i) for t in range(4) for i in range(3)]
    results, errors = run_in_threads(lambda job: parity_tok.encode(paths[(job[0] + job[1]) % len(paths)]), jobs)
    assert not errors and len(results) == 12
    for (t, i), codes in results.items():
        assert torch.equal(codes, expected[(t + i) % len(paths)].unsqueeze(0))


def test_repr_is_a_short_summary(parity_tok):
    r = repr(parity_tok)
    assert len(r) < 300 and "\n" not in r
    assert "seed1" in r and "codebook 8192x32" in r and "device=cpu" in r and "float32" in r


def test_load_takes_whatever_names_a_tokenizer(parity_tok, parity_cfg, paths, tmp_path):
    """`Tokenizer.load`: a tokenizer, a config, a save_pretrained folder; overrides only with a config."""
    assert seed.Tokenizer.load(parity_tok) is parity_tok
    want = parity_tok.encode(paths)
    parity_tok.save_pretrained(tmp_path / "saved")
    assert torch.equal(seed.Tokenizer.load(tmp_path / "saved").encode(paths), want)
    assert torch.equal(seed.Tokenizer.load(parity_cfg).encode(paths), want)
    assert seed.Tokenizer.load(TINY, "model.image_size=28").cfg.model.image_size == 28
    with pytest.raises(seed.InputError, match="overrides"):
        seed.Tokenizer.load(tmp_path / "saved", "model.image_size=28")


def test_an_override_yaml_cannot_parse_is_an_input_error():
    with pytest.raises(seed.InputError, match="cannot parse"):
        seed.load_config(TINY, "model.image_size=[{a:1")
