"""Training is exactly the original: one forward/backward of the stage-1 and stage-2 training models
against the original code's losses, gradients, codes and parameter groups (tests/data/parity/training/*).

Every fixture folder is checked (one test id per folder); dimensions come from its spec.json. fp32,
CPU, dropout off, as the fixture was made. Gradient norms: within 1e-4 relative, with an absolute
floor of 1e-6 x the overall norm for the attention key biases, whose gradient is mathematically zero
(softmax is shift-invariant) and holds only rounding noise on both sides. Gradients and tensors:
`conftest.assert_close_at_scale` (1e-4 relative + 1e-5 x the norm per element: of the whole
gradient, of each row of an activation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import seed
from conftest import assert_close_at_scale, close_at_scale, fixtures
from seed.config import validate
from seed.training import losses, optim
from seed.training.config import TrainConfig
from seed.training.models import Stage1Model, Stage2Model, build_model

FIXTURES = fixtures("training")
ids = [p.name for p in FIXTURES]


def train_cfg(fixture: Path, stage: int, objective: str = "seed1", **init):
    """A training config (validated by the real schema) with the fixture's dims and files."""
    d = json.loads((fixture / "spec.json").read_text())["dims"]
    v, q, r = d["vision"], d["qformer"], d["reverse_qformer"]
    assert r["encoder_width"] == q["hidden"] and r["heads"] == q["heads"] and r["intermediate"] == q["intermediate"]
    model = {
        "image_size": d["image_size"],
        "vision": {"patch_size": d["patch_size"], "width": v["width"], "depth": v["depth"], "heads": v["heads"],
                   "mlp_ratio": (v["mlp_hidden"] + 0.5) / v["width"]},  # timm: int(width * ratio)
        "qformer": {"hidden_size": q["hidden"], "num_layers": q["layers"], "num_heads": q["heads"],
                    "intermediate_size": q["intermediate"], "cross_attention_every": q["cross_attention_freq"],
                    "num_queries": q["num_queries"]},
        "codebook": {"size": d["codebook"]["size"], "dim": d["codebook"]["dim"]},
        "decoder": {"num_blocks": d["decoder_blocks"]["count"], "num_heads": d["decoder_blocks"]["heads"],
                    "reverse_layers": r["layers"], "num_queries": r["queries_text"],
                    "output_dim": d["sd_text_encoder"]["width"]},
    }
    if objective == "seed2_head":  # the committed code's 1-query head onto the CLIP image embedding
        model["decoder"].update(num_queries=r["queries_image"], output_dim=d["clip_vision"]["image_embed_dim"])
    files = {"vision": "eva_vit_g.pth", "bert_tokenizer": "bert_tokenizer", "bert_config": "qformer_bert_config.json",
             "clip_tokenizer": "clip_tokenizer", "text_encoder": "clip_text_encoder", "clip_vision": "clip_vision"}
    files.update({"qformer": "blip2_pretrained.pth"} if stage == 1 else
                 {"qformer": "causal_qformer_stage1.pth", "stage2": "seed_tokenizer_init.pth"})
    files.update(init)
    return validate([{"stage": stage, "objective": objective, "dropout": 0.0, "model": model,
                      "itc": {"embed_dim": d["itc"]["embed_dim"], "max_txt_len": d["itc"]["max_txt_len"]},
                      "init": {k: (str(fixture / f) if f else None) for k, f in files.items()}}], TrainConfig)


def run_once(fixture: Path, stage: int, entry: str, objective: str = "seed1"):
    """Build, one forward (train mode) + backward on the fixture's batch: (model, outputs, expected)."""
    exp = torch.load(fixture / "expected.pt", weights_only=True)
    model = build_model(train_cfg(fixture, stage, objective))
    batch = exp["batch"]
    out = model(batch["pixel_values"], batch["captions"], intermediates=True)
    out["loss"].backward()
    return model, out, exp[entry], batch


@pytest.fixture(scope="module", params=FIXTURES, ids=ids)
def stage1(request):
    return run_once(request.param, 1, "stage1")


@pytest.fixture(scope="module", params=FIXTURES, ids=ids)
def stage2(request):
    return run_once(request.param, 2, "stage2_seed1")


@pytest.fixture(scope="module", params=FIXTURES, ids=ids)
def stage2_head(request):
    return run_once(request.param, 2, "stage2_head", objective="seed2_head")


def close(a, b, rel=1e-5) -> bool:
    a, b = float(torch.as_tensor(a).detach()), float(b)
    return abs(a - b) <= rel * abs(b)


def check_grads(model, exp):
    """Overall and per-parameter grad norms (original names), the recorded grads, the groups."""
    named = {model.original_name(n): p for n, p in model.trainable_named_parameters()}
    assert set(named) == set(exp["grad_norms"]), "trained parameters differ from the original's"
    assert all(p.grad is not None for p in named.values()), "a trained parameter got no gradient"
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in named.values()))
    assert close(total, exp["grad_norm"], 1e-4), (float(total), float(exp["grad_norm"]))
    floor = 1e-6 * float(exp["grad_norm"])
    bad = {k: (float(p.grad.norm()), exp["grad_norms"][k]) for k, p in named.items()
           if abs(float(p.grad.norm()) - exp["grad_norms"][k]) > 1e-4 * abs(exp["grad_norms"][k]) + floor}
    assert not bad, bad
    for k, g in exp["grads"].items():
        assert_close_at_scale(named[k].grad, g, k)

    groups = optim.param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert {model.original_name(n) for n in groups[0]["names"]} == set(exp["weight_decay_params"])
    assert {model.original_name(n) for n in groups[1]["names"]} == set(exp["no_weight_decay_params"])
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_training_fixture_present():
    assert FIXTURES, "no fixture under tests/data/parity/training: training exactness is unproven"


def test_stage1_matches_original(stage1):
    model, out, exp, batch = stage1
    assert isinstance(model, Stage1Model)
    ids_, mask = model.tokenize(batch["captions"])
    assert torch.equal(ids_, batch["bert_input_ids"]) and torch.equal(mask, batch["bert_attention_mask"])
    assert model.tokenizer.convert_tokens_to_ids("[DEC]") == batch["bert_dec_token_id"]
    for k in ("loss", "loss_itc", "temp"):
        assert out[k].shape == () and close(out[k], exp[k]), (k, float(out[k]), float(exp[k]))
    assert out["loss"].requires_grad and not out["loss_itc"].requires_grad
    # the original records image_embeds after ln_vision
    ln = model.qformer.ln_vision(out["image_embeds"])
    assert_close_at_scale(ln, exp["image_embeds"], "image_embeds", rows=True)
    for k in ("causal_embeds", "text_cls", "image_feat", "text_feat", "sim_i2t", "sim_t2i"):
        assert_close_at_scale(out[k], exp[k], k, rows=True)
    check_grads(model, exp)


def test_stage2_seed1_matches_original(stage2):
    model, out, exp, batch = stage2
    assert isinstance(model, Stage2Model)
    ids_ = model.clip_tokenizer(batch["captions"], truncation=True, max_length=77, padding="max_length",
                                return_tensors="pt")["input_ids"]
    assert torch.equal(ids_, batch["clip_input_ids"])
    assert torch.equal(out["codes"], exp["codes"])
    terms = ("loss_embed", "loss_recon_s", "loss_distil_text")
    for k in ("loss", *terms, *(f"{t}_unweighted" for t in terms)):
        assert close(out[k], exp[k]), (k, float(out[k]), float(exp[k]))
    assert "loss_distil_image" not in out and float(exp["loss_distil_image"]) == 0.0
    pairs = {"causal_embeds": "causal_embeds", "z_e": "z_e", "z_q": "z_q", "decoded": "decoded", "recon": "recon",
             "gen_embeds": "gen_embeds", "target": "text_target"}
    for ours, theirs in pairs.items():
        assert_close_at_scale(out[ours], exp[theirs], ours, rows=True)
    check_grads(model, exp)
    check_codebook_grad(model, exp)


def check_codebook_grad(model, exp):
    codebook = model.quantizer.codebook.weight.grad
    assert_close_at_scale(codebook[exp["codebook_grad_rows"]], exp["codebook_grad"], "codebook grad rows")
    unused = torch.ones(len(codebook), dtype=torch.bool)
    unused[exp["codes"].flatten()] = False
    assert codebook[unused].abs().max() == 0, "codebook rows no vector chose got a gradient"


def test_stage2_head_matches_original(stage2_head):
    """The committed code's flags: the CLIP-image objective with the 1-query Reverse Q-Former head."""
    model, out, exp, batch = stage2_head
    assert torch.equal(out["codes"], exp["codes"])
    terms = ("loss_embed", "loss_recon_s", "loss_distil_image")
    for k in ("loss", *terms, *(f"{t}_unweighted" for t in terms)):
        assert close(out[k], exp[k]), (k, float(out[k]), float(exp[k]))
    pairs = {"causal_embeds": "causal_embeds", "z_e": "z_e", "z_q": "z_q", "decoded": "decoded", "recon": "recon",
             "gen_embeds": "image_pred", "target": "image_target"}
    for ours, theirs in pairs.items():
        assert_close_at_scale(out[ours], exp[theirs], ours, rows=True)
    check_grads(model, exp)
    check_codebook_grad(model, exp)


def test_no_decay_rule():
    """The original's name rule, also where a 2-D name says ln/bn/bias (no fixture parameter does)."""
    assert optim.no_decay("temp", 0) and optim.no_decay("x.weight", 1)
    assert optim.no_decay("ln_proj.weight", 2) and optim.no_decay("bn.weight", 4) and optim.no_decay("a.bias_w", 2)
    assert not optim.no_decay("query_tokens", 3) and not optim.no_decay("quantize.embedding.weight", 2)


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_detached_gather_matters(fixture, monkeypatch):
    """Gathering with gradient (one similarity matrix, grads through both sides) gives the same
    loss but NOT the original's gradients: the detached gather is what makes them match."""
    monkeypatch.setattr(losses, "gather_without_grad", lambda x: x)
    model, out, exp, _ = run_once(fixture, 1, "stage1")
    assert close(out["loss"], exp["loss"])
    named = {model.original_name(n): p for n, p in model.trainable_named_parameters()}
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in named.values()))
    assert not close(total, exp["grad_norm"], 1e-3)
    assert (named["query_tokens"].grad - exp["grads"]["query_tokens"]).abs().max() > 1e-3
    assert not close_at_scale(named["query_tokens"].grad, exp["grads"]["query_tokens"])[0]  # a wrong term fails


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_lr_schedule_matches_original(fixture):
    spec = json.loads((fixture / "spec.json").read_text())
    for stage in ("stage1", "stage2"):
        h = spec["real_hyperparameters"][stage]
        sched = {k: h[k] for k in ("init_lr", "min_lr", "warmup_lr", "warmup_steps", "max_epoch")}
        for epoch, it, lr in spec["lr_schedule_samples"][stage]:
            assert math.isclose(optim.linear_warmup_cosine_lr(epoch, it, **sched), lr, rel_tol=1e-12), (stage, epoch, it)
            step = epoch * h["iters_per_epoch"] + it
            assert optim.lr_at_step(step, h["iters_per_epoch"], **sched) == optim.linear_warmup_cosine_lr(epoch, it, **sched)


def test_frozen_parts(stage2):
    model = stage2[0]
    model.train()
    assert not model.vision.training and not model.target_encoder.training
    assert model.qformer.training, "the frozen Q-Former stays in train mode (its dropout is active, as the original)"
    for part in (model.vision, model.qformer, model.target_encoder):
        assert not any(p.requires_grad for p in part.parameters())
        assert all(p.grad is None for p in part.parameters())
    trained = {n.split(".")[0] for n, _ in model.trainable_named_parameters()}
    assert trained == {"quantizer", "decoder", "recon"}


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_stage2_dropout_is_active_in_the_frozen_qformer(fixture):
    cfg = train_cfg(fixture, 2)
    cfg.dropout = 0.1
    model = build_model(cfg)
    pixels = torch.load(fixture / "expected.pt", weights_only=True)["batch"]["pixel_values"]
    with torch.no_grad():
        a = model.qformer(model.vision(pixels))
        b = model.qformer(model.vision(pixels))
        assert not torch.equal(a, b)
        model.eval()
        assert torch.equal(model.qformer(model.vision(pixels)), model.qformer(model.vision(pixels)))


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_stage2_starts_from_our_stage1_and_exports_a_tokenizer(fixture, tmp_path):
    """Stage 2 takes our own stage-1 weights (our stage-1 model built from the fixture's BLIP-2 file,
    saved as our checkpoints save it) to the same Q-Former as the original's stage-1 file; the export
    loads with Tokenizer.from_pretrained and gives the training model's codes and generation
    embeddings. One fixture folder at a time."""
    from safetensors.torch import save_file

    s1 = build_model(train_cfg(fixture, 1))
    original = build_model(train_cfg(fixture, 2))  # from the original's causal_qformer_stage1.pth
    save_file({k: v.contiguous() for k, v in s1.trainable_state_dict().items()}, tmp_path / "stage1.safetensors")
    model = build_model(train_cfg(fixture, 2, qformer=str(tmp_path / "stage1.safetensors")))
    for k, v in original.qformer.state_dict().items():  # same stage-1 start as the original's file
        assert torch.equal(model.qformer.state_dict()[k], v), k

    folder = model.export(tmp_path / "export")
    tok = seed.Tokenizer.from_pretrained(folder, device="cpu")
    batch = torch.load(fixture / "expected.pt", weights_only=True)["batch"]
    model.eval()
    out = model(batch["pixel_values"], batch["captions"], intermediates=True)
    codes = tok.encode(batch["pixel_values"])
    assert torch.equal(codes, out["codes"])
    assert torch.equal(codes, torch.load(fixture / "expected.pt", weights_only=True)["stage2_seed1"]["codes"])
    assert (tok.embed(codes) - out["gen_embeds"]).abs().max() < 1e-5
    assert (tok.causal_embeddings(batch["pixel_values"]) - out["causal_embeds"]).abs().max() < 1e-5


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_constructor_init_as_the_original(fixture, tmp_path):
    """With no stage-2 file: the original's constructor init, the same from the same init.seed,
    and (init.bert_model) BERT's weights where the original's init_Qformer puts them."""
    from transformers import BertConfig, BertModel

    dims = json.loads((fixture / "spec.json").read_text())["dims"]
    reverse_layers = dims["reverse_qformer"]["layers"]
    bert_cfg = BertConfig.from_json_file(fixture / "qformer_bert_config.json")
    bert_cfg.num_hidden_layers = max(reverse_layers, dims["qformer"]["layers"])
    torch.manual_seed(3)
    BertModel(bert_cfg, add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    bert = BertModel.from_pretrained(tmp_path / "bert").state_dict()

    a = build_model(train_cfg(fixture, 2, stage2=None, bert_model=str(tmp_path / "bert")))
    b = build_model(train_cfg(fixture, 2, stage2=None, bert_model=str(tmp_path / "bert")))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.decoder.pos_embed.abs().max() == 0 and a.recon.pos_embed.abs().max() == 0
    limit = 1 / a.quantizer.codebook.num_embeddings
    assert a.quantizer.codebook.weight.abs().max() <= limit
    rq = a.decoder.qformer
    for i in range(reverse_layers):
        assert torch.equal(rq.encoder.layer[i].attention.attention.query.weight,
                           bert[f"encoder.layer.{i}.attention.self.query.weight"])
        assert torch.equal(rq.encoder.layer[i].attention.output.LayerNorm.weight,
                           bert[f"encoder.layer.{i}.attention.output.LayerNorm.weight"])
        assert not torch.equal(rq.encoder.layer[i].intermediate_query.dense.weight,
                               bert[f"encoder.layer.{i}.intermediate.dense.weight"])  # stage 2: new query FFN
    assert torch.equal(rq.layernorm.bias, bert["embeddings.LayerNorm.bias"])
    assert abs(float(rq.encoder.layer[0].crossattention.attention.key.weight.detach().std()) - 0.02) < 0.005  # new, N(0, 0.02)

    s1 = build_model(train_cfg(fixture, 1, qformer=None, bert_model=str(tmp_path / "bert")))
    qf = s1.qformer.qformer
    for i in range(len(qf.encoder.layer)):
        text = bert[f"encoder.layer.{i}.intermediate.dense.weight"]
        assert torch.equal(qf.encoder.layer[i].intermediate.dense.weight, text)
        assert torch.equal(qf.encoder.layer[i].intermediate_query.dense.weight, text)  # stage 1: copied
        assert torch.equal(qf.encoder.layer[i].output_query.LayerNorm.weight, bert[f"encoder.layer.{i}.output.LayerNorm.weight"])
    words = s1.text_embeddings.word_embeddings.weight
    assert torch.equal(words[:bert_cfg.vocab_size], bert["embeddings.word_embeddings.weight"])
    assert len(words) == bert_cfg.vocab_size + 1  # + [DEC], new
