"""SEED-2 de-tokenizing: codes -> 1024-d image embedding -> SD 2.1 unCLIP -> images, on a tiny real
diffusers StableUnCLIPImg2ImgPipeline folder built here with save_pretrained, and the seed2-tiny
parity weights (whose embeddings vary with the codes)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import string
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, PNDMScheduler, StableUnCLIPImg2ImgPipeline,
                       UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

import seed
from seed import diffusion
from seed.diffusion import Diffusion, ImageConditioned

from conftest import PARITY_ROOT, ROOT, TINY, run_in_threads

TINY2 = ROOT / "configs" / "seed2_tiny.yaml"
FIXTURE = PARITY_ROOT / "seed2" / "seed2-tiny"
FAST = dict(steps=2, height=32, width=48)  # non-square to catch a swapped size
DIM = 1024


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def unclip_folder(tmp_path_factory):
    """A tiny SD 2.1 unCLIP saved with save_pretrained, laid out as stabilityai/stable-diffusion-2-1-unclip:
    random UNet with a 2048-wide projection class embedding, VAE, CLIP text encoder, a small CLIP
    tokenizer (SD 2's "!" padding), the repo's samplers (PNDM v-prediction; cosine DDPM for the
    embedding noise), an image normalizer with non-trivial statistics, and a CLIP image encoder +
    feature extractor (which decoding must not load)."""
    root = tmp_path_factory.mktemp("tiny-unclip")
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    vocab = {"!": 0}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77, pad_token="!")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=32, use_linear_projection=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * DIM, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=0))
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=DIM)
    with torch.no_grad():
        normalizer.mean.normal_(0, 0.5)
        normalizer.std.uniform_(0.5, 2.0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=DIM))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=image_encoder, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                prediction_type="v_prediction", skip_prk_steps=True, set_alpha_to_one=False,
                                steps_offset=1))
    folder = root / "stable-diffusion-2-1-unclip"
    pipe.save_pretrained(folder)
    return folder


def seed2_config(*overrides: str):
    return seed.load_config(TINY2, f"checkpoints.vision={FIXTURE / 'eva_vit_g.pth'}",
                            f"checkpoints.quantizer={FIXTURE / 'seed_quantizer.pt'}", *overrides)


@pytest.fixture(scope="module")
def tok(unclip_folder):
    return seed.Tokenizer.from_config(seed2_config(f"diffusion.model={unclip_folder}"), device="cpu")


@pytest.fixture(scope="module")
def codes(tok, photos):
    codes = tok.encode(photos)
    assert len({tuple(c) for c in codes.tolist()}) == len(photos)  # the fixture's weights: codes vary
    return codes


def stock(folder, embeds, seed_, num_samples, guidance_scale=10.0, steps=2, height=32, width=48):
    """Stock diffusers' StableUnCLIPImg2ImgPipeline with image_embeds, as the original SEED-2 called it."""
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(image_embeds=embeds, noise_level=0, guidance_scale=guidance_scale, num_inference_steps=steps,
                height=height, width=width, num_images_per_prompt=num_samples,
                generator=torch.Generator().manual_seed(seed_)).images


def test_loads_the_unclip_folder_without_its_image_encoder(tok, codes):
    model = tok.diffusion
    assert isinstance(model, ImageConditioned) and isinstance(model.pipe, StableUnCLIPImg2ImgPipeline)
    assert model.pipe.image_encoder is None  # SEED-2 gives the embedding: the CLIP ViT-H is never loaded
    assert tok.embed(codes).shape == (3, DIM)
    images = tok.decode(codes[:2], num_samples=2, **FAST)
    assert len(images) == 4 and all(im.mode == "RGB" and im.size == (48, 32) for im in images)


def test_a_folder_without_image_encoder_loads(unclip_folder, tmp_path, codes, tok):
    """What the download fetches: the repo without image_encoder/ and feature_extractor/ (never used)."""
    slim = tmp_path / "slim"
    shutil.copytree(unclip_folder, slim)
    shutil.rmtree(slim / "image_encoder")
    shutil.rmtree(slim / "feature_extractor")
    model = Diffusion.from_config(seed2_config(f"diffusion.model={slim}"), torch.device("cpu"))
    a = model.generate(tok.embed(codes[:1]), num_samples=1, **FAST)[0]
    b = tok.decode(codes[:1], num_samples=1, **FAST)[0]
    assert np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize("num_samples", [1, 2])
def test_equals_stock_diffusers_with_a_seeded_generator(tok, codes, unclip_folder, num_samples):
    """With one sequence, our decode is exactly stock diffusers' unCLIP pipeline called with
    image_embeds=embed(codes), noise_level 0, guidance 10, the empty prompt and a CPU generator seeded
    with `seed` (so: zeros as the unconditional embedding, the embedding noise then the latents drawn
    from that generator)."""
    ours = tok.decode(codes[1], seed=11, num_samples=num_samples, **FAST)
    want = stock(unclip_folder, tok.embed(codes[1:2]), 11, num_samples)
    assert len(ours) == len(want) == num_samples
    for a, b in zip(ours, want):
        assert np.array_equal(pixels(a), pixels(b))
    assert pixels(ours[0]).std() > 0


def test_seeded_and_grouped_per_sequence(tok, codes):
    a = tok.decode(codes[:1], seed=7, num_samples=1, **FAST)[0]
    b = tok.decode(codes[:1], seed=7, num_samples=1, **FAST)[0]
    c = tok.decode(codes[:1], seed=8, num_samples=1, **FAST)[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1
    # images b*K .. b*K+K-1 come from codes[b], the same as decoding codes[b] alone
    batch = tok.decode(codes, seed=7, num_samples=2, **FAST)
    assert len(batch) == 6
    for i in range(3):
        alone = tok.decode(codes[i], seed=7, num_samples=2, **FAST)
        for got, want in zip(batch[2 * i:2 * i + 2], alone, strict=True):
            assert np.abs(pixels(got) - pixels(want)).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 0, "two samples of one sequence are identical"
    assert np.abs(pixels(batch[0]) - pixels(batch[2])).mean() > 1, "two sequences give the same image"


def class_labels_seen(tok, *args, **kwargs) -> torch.Tensor:
    """The UNet's image conditioning (class_labels) at the first step of a decode: [2*B*K, 2*DIM]."""
    seen = []
    hook = tok.diffusion.pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    try:
        tok.decode(*args, **kwargs)
    finally:
        hook.remove()
    return seen[0]


def expected_noised(folder, embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """unCLIP's noising at level 0, written out from the saved files: normalize with the folder's
    image_normalizer, mix in sqrt(1 - alpha_bar_0) of the noise, unnormalize, append the sinusoidal
    embedding of level 0 (flip_sin_to_cos: cos(0) = 1 first, then sin(0) = 0)."""
    normalizer = StableUnCLIPImageNormalizer.from_pretrained(folder / "image_normalizer")
    ac0 = DDPMScheduler.from_pretrained(folder / "image_noising_scheduler").alphas_cumprod[0]
    scaled = (embeds - normalizer.mean) / normalizer.std
    noised = (math.sqrt(ac0) * scaled + math.sqrt(1 - ac0) * noise) * normalizer.std + normalizer.mean
    level = torch.cat([torch.ones(len(embeds), DIM // 2), torch.zeros(len(embeds), DIM // 2)], dim=1)
    return torch.cat([noised, level], dim=1).detach()


def test_embedding_noise_at_level_0_is_seeded_per_sequence(tok, codes, unclip_folder):
    """The conditional half is embed(codes) noised at level 0 with noise drawn first from each sequence's
    own generator; the unconditional half is zeros. The noise is there (not the bare embedding), and it
    follows the seed: same seed, same conditioning; another seed, another."""
    labels = class_labels_seen(tok, codes[:2], seed=3, num_samples=2, **FAST)
    assert labels.shape == (2 * 2 * 2, 2 * DIM)
    uncond, cond = labels.chunk(2)
    assert torch.equal(uncond, torch.zeros_like(uncond))
    noise = torch.cat([torch.randn(1, DIM, generator=torch.Generator().manual_seed(3)) for _ in range(2)])
    want = expected_noised(unclip_folder, tok.embed(codes[:2]), noise).repeat_interleave(2, dim=0)
    torch.testing.assert_close(cond, want, rtol=1e-5, atol=1e-5)
    bare = expected_noised(unclip_folder, tok.embed(codes[:2]), torch.zeros(2, DIM)).repeat_interleave(2, dim=0)
    assert (cond - bare)[:, :DIM].abs().max() > 1e-3  # level 0 still adds noise
    again = class_labels_seen(tok, codes[:2], seed=3, num_samples=2, **FAST)
    other = class_labels_seen(tok, codes[:2], seed=4, num_samples=2, **FAST)
    assert torch.equal(again, labels) and not torch.equal(other, labels)


def test_negative_codes_are_the_unconditional_branch(tok, codes, unclip_folder):
    """negative_codes (the original's negative_indices): their embedding, noised at level 0 with noise from
    the same per-sequence generator (drawn after the latents), replaces the zero unconditional embedding;
    the conditional half and the latents are unchanged, and so the images differ."""
    negative = codes[2]
    plain = class_labels_seen(tok, codes[:2], seed=3, num_samples=1, **FAST)
    labels = class_labels_seen(tok, codes[:2], negative_codes=negative, seed=3, num_samples=1, **FAST)
    uncond, cond = labels.chunk(2)
    assert torch.equal(cond, plain.chunk(2)[1])
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        torch.randn(1, DIM, generator=g), torch.randn(1, 4, 4, 6, generator=g)  # the embedding noise, the latents
        draws.append(torch.randn(1, DIM, generator=g))
    want = expected_noised(unclip_folder, tok.embed(negative).expand(2, -1), torch.cat(draws))
    torch.testing.assert_close(uncond, want, rtol=1e-5, atol=1e-5)
    a = tok.decode(codes[:1], seed=3, num_samples=1, **FAST)[0]
    b = tok.decode(codes[:1], negative_codes=negative, seed=3, num_samples=1, **FAST)[0]
    assert np.abs(pixels(a) - pixels(b)).mean() > 1


def test_one_unet_call_per_step_with_batched_guidance(tok, codes):
    batches = []
    hook = tok.diffusion.pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        tok.decode(codes[:2], scheduler="ddim", steps=3, num_samples=2, height=32, width=32)
        assert batches == [2 * 2 * 2] * 3  # (uncond + cond) x 2 sequences x 2 samples, once per step
        batches.clear()
        tok.decode(codes[:1], scheduler="ddim", steps=2, num_samples=1, guidance_scale=1.0, height=32, width=32)
        assert batches == [1, 1]  # guidance 1: no unconditional branch
    finally:
        hook.remove()


def test_concurrent_decodes_load_once_and_match_sequential(unclip_folder, codes, monkeypatch):
    """4 threads x 3 decodes (mixed samplers, seeds, negative codes) on one fresh tokenizer: all succeed,
    each equals the same decode run alone, and the unCLIP pipeline is loaded once."""
    loads = []
    real_load = diffusion.load_pipeline

    def counting_load(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.2)  # widen the window in which a second thread could start its own load
        return real_load(*args, **kwargs)

    monkeypatch.setattr(diffusion, "load_pipeline", counting_load)
    tok = seed.Tokenizer.from_config(seed2_config(f"diffusion.model={unclip_folder}"), device="cpu")
    jobs = [(t, i, ("pndm", "ddim", "dpm")[(t + i) % 3], t * 3 + i) for t in range(4) for i in range(3)]

    def run(job):
        _, i, name, s = job
        return pixels(tok.decode(codes[i % 3], scheduler=name, seed=s, num_samples=1, steps=2, height=16, width=16,
                                 negative_codes=codes[2] if s % 2 else None)[0])

    results, errors = run_in_threads(run, jobs)
    assert not errors, errors
    assert len(loads) == 1, f"the unCLIP pipeline was loaded {len(loads)} times"
    for job in jobs:
        assert np.array_equal(results[job], run(job)), job


def test_bad_settings_name_the_setting(tok, codes):
    for bad in (dict(noise_level=1000), dict(noise_level=-1), dict(noise_level=0.5), dict(guidance_scale=float("nan")),
                dict(steps=1001), dict(seed=2**64), dict(height=0), dict(width=-48), dict(scheduler="euler")):
        name = next(iter(bad))
        with pytest.raises(seed.InputError, match=name):
            tok.decode(codes[:1], **bad)
    with pytest.raises(seed.InputError, match="negative"):
        tok.decode(codes[:2], negative_codes=codes, **FAST)  # 3 negative rows for 2 sequences
    with pytest.raises(seed.InputError, match="out of range"):
        tok.decode(codes[:1], negative_codes=[[8192] * 32])
    with pytest.raises(seed.InputError, match="1024"):
        tok.diffusion.generate(torch.zeros(1, 77, 768))


def test_missing_folder_says_how_to_get_it(tmp_path, codes):
    tok = seed.Tokenizer.from_config(seed2_config(f"diffusion.model={tmp_path / 'absent'}"), device="cpu")
    with pytest.raises(seed.CheckpointError, match="stabilityai/stable-diffusion-2-1-unclip") as e:
        tok.decode(codes[:1])
    assert str(tmp_path / "absent") in str(e.value)


def test_seed1_tokenizer_with_unclip_model_is_refused(unclip_folder):
    tok = seed.Tokenizer.from_config(seed.load_config(TINY, f"diffusion.model={unclip_folder}"), device="cpu")
    with pytest.raises(seed.CheckpointError, match=r"\[77, 768\]"):
        tok.decode([[0] * 32])


def test_tiny_config_decodes_with_a_random_unclip(caplog, photos):
    cfg = seed.load_config(TINY2)
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    with caplog.at_level(logging.WARNING):
        images = tok.reconstruct(photos[:1], steps=2)
    assert any("RANDOM" in r.message and r.name == "seed.diffusion" for r in caplog.records)
    assert isinstance(tok.diffusion, ImageConditioned)
    assert len(images) == cfg.diffusion.num_samples and images[0].size == (cfg.diffusion.width, cfg.diffusion.height)
    assert cfg.diffusion.guidance_scale == 10 and cfg.diffusion.noise_level == 0


def test_released_config_has_the_original_settings():
    d = seed.load_config(ROOT / "configs" / "seed2_tokenizer.yaml").diffusion
    assert (d.steps, d.guidance_scale, d.height, d.width, d.noise_level) == (20, 10.0, 768, 768, 0)
    assert d.model.endswith("stable-diffusion-2-1-unclip")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_and_follows_the_tokenizer(unclip_folder, codes):
    tok = seed.Tokenizer.from_config(seed2_config(f"diffusion.model={unclip_folder}"), device="cpu")
    assert tok.decode(codes[:1], num_samples=1, **FAST)[0].size == (48, 32)
    assert tok.diffusion.device.type == "cpu"
    tok.to("cuda")
    gpu = tok.decode(codes[:1], num_samples=1, **FAST)[0]  # the cached pipeline followed the tokenizer
    assert tok.diffusion.device.type == "cuda" and tok.diffusion.dtype == torch.float16
    assert gpu.size == (48, 32) and pixels(gpu).std() > 0
