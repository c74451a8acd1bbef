"""Shared fixtures: the tiny config, the parity fixture, real photos, the evaluation stand-ins
(a tiny random CLIP with a real tiny tokenizer, a tiny Inception-like feature module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seed

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PARITY_ROOT = DATA / "parity"
"""One folder per kind (seed1, seed2, training); each fixture folder under it is drop-in."""
PARITY = PARITY_ROOT / "seed1" / "seed1-tiny"
TINY = ROOT / "configs" / "seed_tiny.yaml"
TINY2 = ROOT / "configs" / "seed2_tiny.yaml"
"""SEED-2 at tiny widths; `seed2_overrides` makes it match a tests/data/parity/seed2 fixture."""
PHOTOS = sorted((DATA / "images").glob("*.png"))


def fixtures(kind: str) -> list[Path]:
    """Every fixture folder of a kind (``tests/data/parity/<kind>/*`` holding a spec.json)."""
    return sorted(p for p in (PARITY_ROOT / kind).glob("*") if (p / "spec.json").is_file())


torch.set_num_threads(min(2, torch.get_num_threads()))


def parity_overrides(fixture: Path) -> list[str]:
    """Config overrides that make configs/seed_tiny.yaml match a parity fixture's spec.json."""
    spec = json.loads((fixture / "spec.json").read_text())
    v, q, c, d = spec["vision"], spec["qformer"], spec["codebook"], spec["decoder"]
    return [
        f"model.image_size={spec['image_size']}",
        f"model.vision.patch_size={v['patch_size']}", f"model.vision.width={v['width']}",
        f"model.vision.depth={v['depth']}", f"model.vision.heads={v['heads']}",
        f"model.vision.mlp_ratio={(v['mlp_hidden'] + 0.5) / v['width']}",  # timm: int(width * ratio)
        f"model.qformer.hidden_size={q['hidden']}", f"model.qformer.num_layers={q['layers']}",
        f"model.qformer.num_heads={q['heads']}", f"model.qformer.intermediate_size={q['intermediate']}",
        f"model.qformer.cross_attention_every={q['cross_attention_every']}",
        f"model.qformer.num_queries={q['num_queries']}",
        f"model.codebook.size={c['size']}", f"model.codebook.dim={c['dim']}",
        f"model.decoder.num_blocks={d['blocks']}", f"model.decoder.num_heads={d['block_heads']}",
        f"model.decoder.reverse_layers={d['reverse_qformer_layers']}",
        f"model.decoder.num_queries={d['num_reverse_queries']}", f"model.decoder.output_dim={d['out_dim']}",
        f"checkpoints.vision={fixture / 'eva_vit_g.pth'}",
        f"checkpoints.qformer={fixture / 'causal_qformer.pth'}",
        f"checkpoints.codebook={fixture / 'seed_tokenizer.pth'}",
    ]


def seed2_overrides(fixture: Path, vision: Path | None = None, quantizer: Path | None = None) -> list[str]:
    """Overrides that make configs/seed2_tiny.yaml match a SEED-2 fixture's spec.json."""
    spec = json.loads((fixture / "spec.json").read_text())
    v, q, c, d = spec["vision"], spec["qformer"], spec["quantizer"], spec["decoder"]
    return [
        f"model.image_size={spec['image_size']}",
        f"model.vision.patch_size={v['patch_size']}", f"model.vision.width={v['width']}",
        f"model.vision.depth={v['depth']}", f"model.vision.heads={v['heads']}",
        f"model.vision.mlp_ratio={(v['mlp_hidden'] + 0.5) / v['width']}",  # timm: int(width * ratio)
        f"model.qformer.hidden_size={q['hidden']}", f"model.qformer.num_layers={q['layers']}",
        f"model.qformer.num_heads={q['heads']}", f"model.qformer.intermediate_size={q['intermediate']}",
        f"model.qformer.cross_attention_every={q['cross_attention_every']}",
        f"model.qformer.num_queries={q['num_queries']}",
        f"model.codebook.size={c['codebook_size']}", f"model.codebook.dim={c['dim']}",
        f"model.decoder.num_blocks={d['blocks']}", f"model.decoder.num_heads={d['block_heads']}",
        f"model.decoder.output_dim={d['out_dim']}",
        f"checkpoints.vision={vision or fixture / 'eva_vit_g.pth'}",
        f"checkpoints.quantizer={quantizer or fixture / 'seed_quantizer.pt'}",
    ]


@pytest.fixture(scope="session")
def parity_cfg():
    return seed.load_config(TINY, *parity_overrides(PARITY))


@pytest.fixture(scope="session")
def parity_tok(parity_cfg):
    return seed.Tokenizer.from_config(parity_cfg, device="cpu")


@pytest.fixture(scope="session")
def expected():
    return torch.load(PARITY / "expected.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_cfg():
    return seed.load_config(TINY)


@pytest.fixture(scope="session")
def tiny_tok(tiny_cfg):
    return seed.Tokenizer.from_config(tiny_cfg, device="cpu")


@pytest.fixture(scope="session")
def photos():
    return PHOTOS


def seed2_tokenizer(fixture: Path, *extra: str, **files) -> seed.Tokenizer:
    """The SEED-2 tokenizer of a seed2 parity fixture (configs/seed2_tiny.yaml at its dimensions), on the CPU."""
    return seed.Tokenizer.from_config(seed.load_config(TINY2, *seed2_overrides(fixture, **files), *extra), device="cpu")


WORDS = ["a", "an", "the", "cat", "camera", "coffee", "cup", "man", "dog", "photo", "of", "with", "on", "red"]


@pytest.fixture(scope="session")
def tiny_clip_with_tokenizer(tmp_path_factory):
    """A random CLIP (32 x 32 images, 16-d projections) with a word-level tokenizer that adds
    <|startoftext|> ... <|endoftext|> as CLIP's does, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-clip-tok")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


class TinyFeatures(nn.Module):
    """A tiny random feature extractor standing in for InceptionV3: uint8 [N,3,H,W] -> float [N,6]."""

    num_features = 6

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is much faster than two when the CPUs are shared (OpenMP spin).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_in_threads(run, jobs: list[tuple], threads: int = 4) -> tuple[dict, list[str]]:
    """Run ``run(job)`` for every job, ``job[0]`` naming its thread (0..threads-1); the threads start
    together. Returns ({job: result}, [error messages])."""
    import threading

    barrier = threading.Barrier(threads)
    results, errors = {}, []

    def worker(t):
        barrier.wait()
        for job in (j for j in jobs if j[0] == t):
            try:
                results[job] = run(job)
            except Exception as e:  # noqa: BLE001 - collected and reported by the caller
                errors.append(f"{job}: {type(e).__name__}: {e}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return results, errors


_LIVE_RUN = """
import importlib, sys
module, loader, schema = sys.argv[1:4]
m = importlib.import_module(module)
from seed.training.run import Run
run = Run(getattr(m, loader)(*sys.argv[4:]), schema=getattr(m, schema))
run.begin(2)
run.log({"step": 1, "loss": 1.0})
print("live", flush=True)
sys.stdin.read()
run.log({"step": 2, "loss": 0.5})
run.close()
"""


def start_live_run(kind: str, config: Path, *overrides: str):
    """A live training run in another process: a trainer's `seed.training.run.Run` on ``config``
    (``kind`` llama or tokenizer) that has begun, logged step 1 and waits; closing its stdin lets
    it log step 2 and end. Returns the Popen once it is live."""
    import subprocess
    import sys

    module, loader, schema = {"llama": ("seed.training.llm.config", "load_llama_train_config", "LlamaTrainConfig"),
                              "tokenizer": ("seed.training.config", "load_train_config", "TrainConfig")}[kind]
    p = subprocess.Popen([sys.executable, "-c", _LIVE_RUN, module, loader, schema, str(config), *overrides],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "live", f"the live run did not start (exit {p.wait()})"
    return p


PARITY_RTOL, PARITY_SCALE = 1e-4, 1e-5
"""Parity tolerances: each element within ``PARITY_RTOL`` of its expected value plus
``PARITY_SCALE`` x the expected tensor's norm (see `assert_close_at_scale`)."""


def close_at_scale(actual, expected, rtol: float = PARITY_RTOL, scale: float = PARITY_SCALE,
                   rows: bool = False) -> tuple[bool, str]:
    """``(ok, why)``: ``actual`` equals ``expected`` (same shape) up to float order at the tensor's
    scale: every element ``|a - e| <= scale * ||e|| + rtol * |e|`` (``||e||``: the L2 norm of the
    whole expected tensor, e.g. a gradient row or a parameter's gradient; ``rows``: of the
    element's row along the last dimension, e.g. one token's hidden state in a batch of them).

    Summing the same terms in another order (another BLAS, thread count, fixture dims) moves an
    element by about eps x the norm of what was summed, whatever the element's own size; a fixed
    absolute tolerance then fails a correct small element of a large row. A real error (a wrong or
    swapped row, a flipped sign, a missing term) moves elements by their own size or more and fails."""
    import torch

    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    if a.shape != e.shape:
        return False, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    atol = scale * (e.norm(dim=-1, keepdim=True) if rows and e.dim() else e.norm())
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if not bool(torch.isfinite(a).all()) or bool(bad.any()):
        allowed = (atol + rtol * e.abs()).flatten()
        i = int((diff.flatten() - allowed).nan_to_num(float("inf")).argmax())
        return False, (f"{int(bad.sum())} of {e.numel()} elements differ; worst at flat index {i}: "
                       f"{a.flatten()[i].item():.6g} vs {e.flatten()[i].item():.6g} (|diff| {diff.flatten()[i].item():.3g}, "
                       f"allowed {allowed[i].item():.3g}; tensor norm {e.norm().item():.4g})")
    return True, ""


def assert_close_at_scale(actual, expected, name: str = "", rtol: float = PARITY_RTOL,
                          scale: float = PARITY_SCALE, rows: bool = False) -> None:
    """Assert `close_at_scale` (the parity tests' one comparison of gradients and tensors)."""
    ok, why = close_at_scale(actual, expected, rtol, scale, rows)
    assert ok, f"{name}: {why}" if name else why
