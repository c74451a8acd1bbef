"""De-tokenizing: codes -> generation embeddings -> SD UNet -> images, on a tiny real diffusers SD folder."""

from __future__ import annotations

import json
import logging
import re
import shutil
import string
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import seed
from seed import diffusion
from seed.diffusion import Diffusion

from conftest import TINY, run_in_threads

FAST = dict(steps=2, height=64, width=48)  # small and quick; non-square to catch a swapped size


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion saved with save_pretrained: random UNet, VAE, CLIP text encoder, a small
    CLIP tokenizer built from a vocab written to disk, SD v1.4's PNDM scheduler settings."""
    root = tmp_path_factory.mktemp("tiny-sd")
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    folder = root / "sd"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_tok(sd_folder):
    return seed.Tokenizer.from_config(seed.load_config(TINY, f"diffusion.model={sd_folder}"), device="cpu")


@pytest.fixture(scope="session")
def codes(sd_tok, photos):
    return sd_tok.encode(photos[:2])


def test_decode_count_size_grouping(sd_tok, codes):
    images = sd_tok.decode(codes, num_samples=2, **FAST)
    assert len(images) == 4
    assert all(im.mode == "RGB" and im.size == (48, 64) for im in images)
    # grouped per code sequence: images 2,3 are sequence 1's samples, the same as decoding it alone
    alone = sd_tok.decode(codes[1], num_samples=2, **FAST)
    for batched, single in zip(images[2:], alone):
        assert np.abs(pixels(batched) - pixels(single)).max() <= 1
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 0, "two samples of one sequence are identical"


def test_seed_determinism(sd_tok, codes):
    a = sd_tok.decode(codes[:1], seed=7, **FAST)[0]
    b = sd_tok.decode(codes[:1], seed=7, **FAST)[0]
    c = sd_tok.decode(codes[:1], seed=8, **FAST)[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1


def test_embeddings_condition_the_images(sd_tok):
    # (the tiny random SEED maps most codes to near-identical embeddings, so feed the UNet distinct ones)
    embeds = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(0))
    a, b = sd_tok.diffusion.generate(embeds, num_samples=1, **FAST)  # same seed, different conditioning
    assert np.abs(pixels(a) - pixels(b)).mean() > 1
    unguided = sd_tok.diffusion.generate(embeds[:1], num_samples=1, guidance_scale=1.0, **FAST)[0]
    assert np.abs(pixels(a) - pixels(unguided)).mean() > 1


def stock_images(folder, scheduler, embeds, negative, latents, steps, guidance_scale=7.5):
    """What stock diffusers' StableDiffusionPipeline makes of the same embeddings and starting latents."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    h, w = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative,
                num_images_per_prompt=len(latents) // len(embeds),
                num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.0, height=h, width=w,
                latents=latents).images


@pytest.mark.parametrize("name,cls", [("pndm", PNDMScheduler), ("ddim", DDIMScheduler),
                                      ("dpm", DPMSolverMultistepScheduler)])
def test_every_scheduler_gives_stock_diffusers_images(sd_tok, sd_folder, codes, name, cls):
    """Each sampler is built from the model's scheduler config, and the images are exactly stock
    diffusers' StableDiffusionPipeline with that scheduler, the empty-prompt unconditional branch and
    starting latents drawn per sequence from a CPU generator seeded with `seed`."""
    sched = sd_tok.diffusion.make_scheduler(name)
    assert type(sched) is cls
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert sched.config.steps_offset == 1  # from the model's scheduler config, not the class defaults
    if name == "pndm":
        assert sched.config.skip_prk_steps
    if name == "dpm":
        assert sched.config.algorithm_type == "dpmsolver++"
    loaded = sd_tok.diffusion.pipe.scheduler
    images = sd_tok.decode(codes, scheduler=name, num_inference_steps=3, height=32, width=48, num_samples=2, seed=5)
    assert len(images) == 4 and images[0].size == (48, 32)
    assert sd_tok.diffusion.pipe.scheduler is loaded  # each call has its own sampler: nothing shared is swapped
    embeds = sd_tok.embed(codes)
    latents = torch.cat([torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(5)) for _ in codes])
    uncond = sd_tok.diffusion.uncond_embeddings().expand_as(embeds)
    want = stock_images(sd_folder, sched, embeds, uncond, latents, steps=3)
    for got, ref in zip(images, want, strict=True):
        assert np.array_equal(pixels(got), pixels(ref))
    assert np.asarray(images[0]).std() > 0


def test_negative_codes_are_the_unconditional_branch(sd_tok, sd_folder, codes):
    """negative_codes (SEED-2's negative_indices, here for SEED-1 too): their embedding replaces the
    empty prompt's in guidance, as stock diffusers' negative_prompt_embeds."""
    negative = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(3))
    plain = sd_tok.decode(codes[:1], num_samples=1, **FAST)[0]
    neg = sd_tok.decode(codes[:1], negative_codes=negative, num_samples=1, **FAST)[0]
    assert np.abs(pixels(plain) - pixels(neg)).mean() > 1
    latents = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(42))
    want = stock_images(sd_folder, sd_tok.diffusion.make_scheduler("pndm"), sd_tok.embed(codes[:1]),
                        sd_tok.embed(negative), latents, steps=2)[0]
    assert np.array_equal(pixels(neg), pixels(want))
    with pytest.raises(seed.InputError):
        sd_tok.decode(codes, negative_codes=torch.zeros(3, 32, dtype=torch.long), **FAST)  # 3 rows for 2 sequences


def test_schedulers_differ(sd_tok, codes):
    run = lambda s: pixels(sd_tok.decode(codes[:1], scheduler=s, steps=3, height=32, width=32, num_samples=1)[0])  # noqa: E731
    out = {s: run(s) for s in ("pndm", "ddim", "dpm")}
    assert np.abs(out["pndm"] - out["ddim"]).max() > 0 and np.abs(out["ddim"] - out["dpm"]).max() > 0
    assert np.array_equal(run("pndm"), out["pndm"])  # switching samplers leaves no state behind


def test_one_unet_call_per_step_with_batched_guidance(sd_tok, codes):
    batches = []
    hook = sd_tok.diffusion.pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        sd_tok.decode(codes, scheduler="ddim", steps=3, num_samples=2, height=32, width=32)
        assert batches == [2 * 2 * 2] * 3  # (uncond + cond) x 2 sequences x 2 samples, once per step
        batches.clear()
        sd_tok.decode(codes[:1], scheduler="ddim", steps=2, num_samples=1, guidance_scale=1.0, height=32, width=32)
        assert batches == [1, 1]  # guidance 1: no unconditional branch
    finally:
        hook.remove()


def test_uncond_is_text_encoder_output_for_empty_prompt(sd_tok, sd_folder):
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder")
    ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    vocab = json.loads((sd_folder.parent / "vocab" / "vocab.json").read_text())
    assert ids[0].tolist() == [vocab["<|startoftext|>"]] + [vocab["<|endoftext|>"]] * 76
    with torch.no_grad():
        expected = text_encoder(ids).last_hidden_state
    got = sd_tok.diffusion.uncond_embeddings()
    assert got.shape == (1, 77, 768)
    torch.testing.assert_close(got, expected)
    assert sd_tok.diffusion.uncond_embeddings() is got  # computed once


def test_reconstruct_is_encode_then_decode(sd_tok, photos):
    rec = sd_tok.reconstruct(photos[0], num_samples=1, **FAST)
    dec = sd_tok.decode(sd_tok.encode(photos[0]), num_samples=1, **FAST)
    assert len(rec) == 1 and np.array_equal(pixels(rec[0]), pixels(dec[0]))


def test_bad_settings_and_codes(sd_tok, codes):
    for bad in (dict(scheduler="euler"), dict(height=60), dict(width=0), dict(steps=0), dict(num_samples=0),
                dict(seed=1.5), dict(steps=2, num_inference_steps=3), dict(guidance_scale=float("nan")),
                dict(guidance_scale=float("inf")), dict(guidance_scale="7"), dict(steps=1001), dict(seed=2**64),
                dict(seed=-1), dict(height=-64), dict(width=-8), dict(num_samples=-2), dict(steps=True),
                dict(noise_level=3)):
        name = next(k for k in bad if k != "num_inference_steps")
        with pytest.raises(seed.InputError, match=name):  # the message names the setting
            sd_tok.decode(codes[:1], **bad)
    assert len(sd_tok.decode(codes[:1], steps=1, seed=2**63 - 1, height=32, width=32, num_samples=1)) == 1
    with pytest.raises(seed.InputError, match="out of range"):
        sd_tok.decode([[8192] * 32])
    with pytest.raises(seed.InputError):
        sd_tok.decode([[1] * 31])


def test_concurrent_decodes_load_once_and_match_sequential(sd_folder, codes, monkeypatch):
    """4 threads x 3 decodes with mixed samplers on one fresh tokenizer: all succeed, each equals the
    same decode run alone, and Stable Diffusion is loaded once (the lazy load holds a lock)."""
    loads = []
    real_load = diffusion.load_pipeline

    def counting_load(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.2)  # widen the window in which a second thread could start its own load
        return real_load(*args, **kwargs)

    monkeypatch.setattr(diffusion, "load_pipeline", counting_load)
    tok = seed.Tokenizer.from_config(seed.load_config(TINY, f"diffusion.model={sd_folder}"), device="cpu")
    jobs = [(t, i, ("pndm", "ddim", "dpm")[(t + i) % 3], t * 3 + i) for t in range(4) for i in range(3)]
    run = lambda name, s: pixels(tok.decode(codes[:1], scheduler=name, seed=s, steps=2, height=16, width=16,  # noqa: E731
                                            num_samples=1)[0])
    results, errors = run_in_threads(lambda job: run(job[2], job[3]), jobs)
    assert not errors, errors
    assert len(loads) == 1, f"Stable Diffusion loaded {len(loads)} times"
    for job in jobs:
        assert np.array_equal(results[job], run(job[2], job[3])), job


def test_encode_only_never_loads_sd(tmp_path, photos):
    cfg = seed.load_config(TINY, f"diffusion.model={tmp_path / 'absent'}")
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    assert tok.encode(photos[:1]).shape == (1, 32)
    assert tok.embed(tok.encode(photos[:1])).shape == (1, 77, 768)
    with pytest.raises(seed.CheckpointError, match="download_weights.py") as e:
        tok.decode(tok.encode(photos[:1]))
    assert str(tmp_path / "absent") in str(e.value)


def test_missing_or_incomplete_model(tmp_path, sd_folder):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "sd-v1-4.ckpt", tmp_path / "empty"):
        with pytest.raises(seed.CheckpointError, match="download_weights.py") as e:
            Diffusion.from_config(seed.load_config(TINY, f"diffusion.model={path}"), torch.device("cpu"))
        assert str(path) in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(seed.CheckpointError, match=re.escape(str(broken))):
        Diffusion.from_config(seed.load_config(TINY, f"diffusion.model={broken}"), torch.device("cpu"))
    for name, data in (("truncated.ckpt", b"not a checkpoint"), ("other.safetensors", None)):
        path = tmp_path / name
        if data is None:
            save_file({"first_stage_model.x": torch.zeros(1)}, path)  # a real file, but not SD
        else:
            path.write_bytes(data)
        with pytest.raises(seed.CheckpointError, match=re.escape(str(path))):
            Diffusion.from_config(seed.load_config(TINY, f"diffusion.model={path}"), torch.device("cpu"))


def test_cross_attention_width_must_match(sd_folder):
    cfg = seed.load_config(TINY, f"diffusion.model={sd_folder}", "model.decoder.output_dim=512")
    with pytest.raises(seed.CheckpointError, match="768.*512"):
        Diffusion.from_config(cfg, torch.device("cpu"))


def test_tiny_config_decodes_with_random_weights(caplog, photos):
    cfg = seed.load_config(TINY)
    tok = seed.Tokenizer.from_config(cfg, device="cpu")
    with caplog.at_level(logging.WARNING):
        images = tok.reconstruct(photos[:1], steps=2)
    assert any("RANDOM" in r.message and r.name == "seed.diffusion" for r in caplog.records)
    assert len(images) == cfg.diffusion.num_samples and images[0].size == (cfg.diffusion.width, cfg.diffusion.height)
    assert tok.diffusion.pipe.unet.config.cross_attention_dim == cfg.model.decoder.output_dim == 768


# --- the original single-file format (sd-v1-4.ckpt) --------------------------------------------------

def rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def to_ldm(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The tiny pipeline's weights under the original CompVis (LDM) key names of an sd-v1-x .ckpt.

    Written for this test's layout (layers_per_block 1 in the UNet and VAE); the round trip through
    diffusers' single-file loader below checks every name.
    """
    out = {}
    n = pipe.unet.config.layers_per_block + 1
    res = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    unet_keys = pipe.unet.state_dict().keys()
    for key, value in pipe.unet.state_dict().items():
        p = key.split(".")
        if key.rsplit(".", 1)[0] in top:
            new = top[key.rsplit(".", 1)[0]] + "." + p[-1]
        elif p[0] == "mid_block":  # mid_block.{resnets,attentions}.i.* -> middle_block.{0,1,2}.*
            rest = rename(".".join(p[3:]), res) if p[1] == "resnets" else ".".join(p[3:])
            new = f"middle_block.{2 * int(p[2]) if p[1] == 'resnets' else 1}.{rest}"
        elif p[0] in ("down_blocks", "up_blocks"):  # {down,up}_blocks.b.{resnets,attentions,...}.j.*
            b, kind, j = int(p[1]), p[2], int(p[3])
            rest = rename(".".join(p[4:]), res) if kind == "resnets" else ".".join(p[4:])
            if p[0] == "down_blocks":
                if kind == "downsamplers":
                    new = f"input_blocks.{1 + b * n + n - 1}.0.op.{'.'.join(p[5:])}"
                else:
                    new = f"input_blocks.{1 + b * n + j}.{0 if kind == 'resnets' else 1}.{rest}"
            elif kind == "upsamplers":
                has_attn = f"up_blocks.{b}.attentions.0.proj_in.weight" in unet_keys
                new = f"output_blocks.{b * n + n - 1}.{2 if has_attn else 1}.conv.{'.'.join(p[5:])}"
            else:
                new = f"output_blocks.{b * n + j}.{0 if kind == 'resnets' else 1}.{rest}"
        else:
            raise AssertionError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = value
    nup = len(pipe.vae.config.up_block_types)
    attn = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    for key, value in pipe.vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for a, b in attn:
                new = new.replace(f".{a}.", f".{b}.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        new = new.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        p = new.split(".")
        if p[1] == "down_blocks":
            new = ".".join([p[0], "down", p[2]] + (["block"] + p[4:] if p[3] == "resnets" else p[3:]))
        elif p[1] == "up_blocks":
            new = ".".join([p[0], "up", str(nup - 1 - int(p[2]))] + (["block"] + p[4:] if p[3] == "resnets" else p[3:]))
        out["first_stage_model." + new] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return out


def test_single_file_checkpoint(sd_folder, sd_tok, codes, tmp_path, monkeypatch):
    """An original-format .safetensors loads offline with shipped-style configs (no tokenizer) and
    gives the same model, the same empty-prompt conditioning and the same images as the folder."""
    reference = sd_tok.diffusion.pipe
    ckpt = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(reference).items()}, ckpt)
    configs = tmp_path / "configs"  # like seed/sd_configs: component configs, no weights, no tokenizer
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (configs / sub).mkdir(parents=True)
        for f in (sd_folder / sub).glob("*.json"):
            shutil.copy(f, configs / sub)
    index = json.loads((sd_folder / "model_index.json").read_text())
    index["tokenizer"] = [None, None]
    (configs / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setattr(diffusion, "SD_CONFIGS", configs)

    cfg = seed.load_config(TINY, f"diffusion.model={ckpt}")
    single = Diffusion.from_config(cfg, torch.device("cpu"))
    assert single.pipe.tokenizer is None
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(reference, name).state_dict(), getattr(single.pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name}.{k}")
    torch.testing.assert_close(single.uncond_embeddings(), sd_tok.diffusion.uncond_embeddings())
    embeds = sd_tok.embed(codes[:1])
    a = single.generate(embeds, num_samples=1, **FAST)[0]
    b = sd_tok.diffusion.generate(embeds, num_samples=1, **FAST)[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_shipped_sd_v1_4_configs():
    """The configs shipped for sd-v1-4.ckpt describe SD v1.4: parameter counts of its UNet, VAE and
    CLIP ViT-L/14 text encoder (859.52M, 83.65M, 123.06M), the empty prompt's CLIP ids, PLMS."""
    root = diffusion.SD_CONFIGS
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    assert unet.config.cross_attention_dim == 768
    c = text.config
    assert [c.bos_token_id] + [c.eos_token_id] * (c.max_position_embeddings - 1) == [49406] + [49407] * 76
    sched = PNDMScheduler.from_pretrained(root, subfolder="scheduler")
    assert sched.config.skip_prk_steps and sched.config.beta_schedule == "scaled_linear"
    index = StableDiffusionPipeline.load_config(root)
    assert index["safety_checker"] == [None, None] and index["tokenizer"] == [None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_by_default(sd_folder, codes):
    tok = seed.Tokenizer.from_config(seed.load_config(TINY, f"diffusion.model={sd_folder}"), device="cuda")
    images = tok.decode(codes[:1], num_samples=1, **FAST)
    assert tok.diffusion.dtype == torch.float16 and images[0].size == (48, 64)
