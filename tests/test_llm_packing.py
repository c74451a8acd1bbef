"""Packed sequences (``data.pack``): whole samples packed into rows, position ids restarting per
sample, attention kept within samples by transformers' own packed-sequence masks. For the same
samples, each sample's logits and per-token losses equal the unpacked forward's, the step's loss
and gradients equal the unpacked step's (caption pairs, interleaved documents, conversations);
truncation is counted; resume and 2-process torchrun (gloo) hold with packing on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sentencepiece")

from seed.errors import InputError  # noqa: E402
from seed.training.llm import model as M  # noqa: E402
from seed.training.llm import train as T  # noqa: E402
from seed.training.llm.config import load_llama_train_config  # noqa: E402
from seed.training.llm.data import LlmData, Source  # noqa: E402
from seed.training.llm.format import collate_packed, pack_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_llama.py"
SFT = ROOT / "configs" / "train" / "llama_sft_tiny.yaml"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MAX_LENGTH = 160

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(load_llama_train_config(SFT).model)


def _codes(i: int) -> list[int]:
    return [(37 * i + 11 * k) % 8192 for k in range(32)]


WORDS = "a small red house stands near the river under two tall trees at dawn".split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)).capitalize() + "."


def _rows(kind: str, n: int = 12) -> list[dict]:
    """``n`` rows of one kind, of varied lengths; the 12 pairs include 2 captions too long for MAX_LENGTH."""
    if kind == "pairs":
        rows = [{"codes": _codes(i), "caption": _text(i, 3 + 5 * (i % 4))} for i in range(10)]
        return rows + [{"codes": _codes(i), "caption": _text(i, 150)} for i in (10, 11)]
    if kind == "documents":
        return [{"parts": [{"text": _text(i, 2 + i % 3)}, {"codes": _codes(i)}, {"text": _text(i + 1, 4 + i % 5)}]}
                for i in range(12)]
    return [{"messages": [{"role": "user", "content": [{"type": "image", "codes": _codes(i)}, _text(i, 3)]},
                          {"role": "assistant", "content": _text(i + 2, 2 + i % 6)},
                          *([{"role": "user", "content": "And then?"},
                             {"role": "assistant", "content": _text(i, 4)}] if i % 2 else [])]}
            for i in range(n)]


def _source(tmp_path: Path, kind: str, pack: bool, batch_size: int = 6) -> Source:
    path = tmp_path / f"{kind}.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(kind)))
    return Source(name=kind, files=[str(path)], batch_size=batch_size, max_length=MAX_LENGTH, pack=pack)


def _model(tok, impl: str = "sdpa", checkpointing: bool = False) -> torch.nn.Module:
    """The tiny LoRA model, dropout off, lora_B drawn (not 0) so that every LoRA tensor has a gradient."""
    model = M.build_model(M.tiny_base(tok.vocab_size, hidden=32, layers=2, heads=4, intermediate=64), len(tok),
                          lora=M.LoraSettings(dropout=0.0), gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.get_base_model().set_attn_implementation(impl)
    assert M.attn_implementation(model) == impl
    return model.train()


def _samples(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample of a batch: per row of an unpacked batch, per position-id
    run (restarting at 0) within the real tokens of a packed one."""
    mask = batch["attention_mask"]
    if "position_ids" not in batch:
        return [(r, 0, int(mask[r].sum())) for r in range(mask.shape[0])]
    out = []
    for r in range(mask.shape[0]):
        n = int(mask[r].sum())
        starts = (batch["position_ids"][r, :n] == 0).nonzero().flatten().tolist()
        out += [(r, s, e) for s, e in zip(starts, starts[1:] + [n])]
    return out


def test_pack_rows_first_fit_decreasing_and_the_packed_layout():
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_rows([8, 1, 7], 8) == [[0], [2, 1]]
    with pytest.raises(ValueError):
        pack_rows([9], 8)
    samples = [([1, 10, 11, 12, 2], [1, 10, 11, 12, 2]), ([1, 20, 2], [-100, 20, 2]),
               ([1, 30, 31, 2], [-100, -100, 31, 2]), ([1, 2], [1, 2])]
    b = collate_packed(samples, 8, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 10, 11, 12, 2, 1, 20, 2], [1, 30, 31, 2, 1, 2, 0, 0]]
    assert b["labels"].tolist() == [[-100, 10, 11, 12, 2, -100, 20, 2], [-100, -100, 31, 2, -100, 2, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert all(v.dtype == torch.int64 for v in b.values())
    wide = collate_packed(samples[1:], 16, pad_id=0)  # one row, longest first, padded to max_length
    assert wide["input_ids"].shape == (1, 16)
    assert wide["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1] + list(range(7))
    assert collate_packed(samples[1:], 16, longest=True)["input_ids"].shape == (1, 9)


@pytest.mark.parametrize("kind", ["pairs", "documents", "messages"])
def test_packed_forward_equals_unpacked_per_sample(tmp_path, tok, kind):
    """The same global micro-batch packed and unpacked: the same samples (ids; labels but the
    never-learned first), each one's logits and per-token losses within 1e-5 relative; the pairs'
    two over-long captions truncated alike and counted in both."""
    plain = LlmData([_source(tmp_path, kind, False)], tok, seed=0, shuffle=False, pad_to="longest")
    packed = LlmData([_source(tmp_path, kind, True)], tok, seed=0, shuffle=False)
    model = _model(tok)
    rows_total = samples_total = 0
    for _ in range(2):
        a, b = next(plain), next(packed)
        assert set(b) == {"input_ids", "labels", "attention_mask", "position_ids", "source"} and "position_ids" not in a
        assert b["input_ids"].shape[1] == MAX_LENGTH and len(b["source"]) == b["input_ids"].shape[0]
        rows_total, samples_total = rows_total + b["input_ids"].shape[0], samples_total + a["input_ids"].shape[0]
        with torch.no_grad():
            la = model(input_ids=a["input_ids"], use_cache=False).logits
            lb = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        want = defaultdict(list)
        for r, s, e in _samples(a):
            want[tuple(a["input_ids"][r, s:e].tolist())].append((a["labels"][r, s:e], la[r, s:e]))
        got = _samples(b)
        assert len(got) == a["input_ids"].shape[0]
        for r, s, e in got:
            ids = tuple(b["input_ids"][r, s:e].tolist())
            assert want[ids], "a packed sample that is not in the unpacked batch"
            labels, logits = want[ids].pop()
            assert b["labels"][r, s] == -100 and torch.equal(b["labels"][r, s + 1:e], labels[1:])
            torch.testing.assert_close(lb[r, s:e], logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
            ours = torch.nn.functional.cross_entropy(lb[r, s:e - 1], labels[1:], reduction="none")
            theirs = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="none")
            assert (theirs > 0).any()
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
        assert not any(want.values())
    assert rows_total < samples_total  # packing put several samples in a row
    assert plain.counts() == packed.counts()
    assert plain.counts()[kind]["truncated"] == (2 if kind == "pairs" else 0)


@pytest.mark.parametrize("kind,impl,checkpointing", [("pairs", "sdpa", True), ("documents", "eager", False),
                                                     ("messages", "sdpa", False)])
def test_packed_step_loss_and_gradients_equal_unpacked(tmp_path, tok, kind, impl, checkpointing):
    """`micro_step` on the packed and the unpacked (the original's padding to max_length) batch of the
    same samples: the same learned-token count, loss within 1e-5, every gradient within 1e-4."""
    model = _model(tok, impl, checkpointing)
    M.check_packing(model)
    results = []
    for pack in (False, True):
        data = LlmData([_source(tmp_path, kind, pack)], tok, seed=0, shuffle=False)
        batch = next(data)
        model.zero_grad(set_to_none=True)
        loss, count = T.micro_step(model, batch, world=1, scale=1.0, device=torch.device("cpu"))
        grads = {n: p.grad.clone() for n, p in M.trainable_named_parameters(model) if p.grad is not None}
        results.append((loss, count, grads, batch["input_ids"].numel()))
    (la, ca, ga, slots_a), (lb, cb, gb, slots_b) = results
    assert ca == cb > 0 and slots_b < slots_a
    assert lb == pytest.approx(la, rel=1e-5)
    assert ga.keys() == gb.keys() and any("lora_A" in n for n in ga) and any("embed_tokens" in n for n in ga)
    for n in ga:
        scale = ga[n].norm().item()
        assert scale > 0, n
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_flattened_rows_are_the_same_step(tmp_path, tok):
    """flash-attention takes packed rows as one row (`flatten_rows`): the same loss and gradients
    (checked here with sdpa, which separates the samples either way)."""
    model = _model(tok)
    batch = next(LlmData([_source(tmp_path, "messages", True)], tok, seed=0, shuffle=False))
    out = []
    for b in (batch, M.flatten_rows(batch)):
        model.zero_grad(set_to_none=True)
        loss, count = T.micro_step(model, b, world=1, scale=1.0, device=torch.device("cpu"))
        out.append((loss, count, {n: p.grad.clone() for n, p in M.trainable_named_parameters(model)}))
    assert M.flatten_rows(batch)["input_ids"].shape == (1, batch["input_ids"].numel())
    assert out[1][1] == out[0][1] and out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    for n, g in out[0][2].items():
        torch.testing.assert_close(out[1][2][n], g, rtol=1e-4, atol=1e-5 * g.norm().item())


def test_packing_refuses_attention_that_crosses_samples(tok):
    """An attention implementation outside transformers' mask functions (here sdpa registered under
    another name: causal only) and an architecture whose masks ignore position ids (BLOOM) are
    refused naming the implementation to use; the check accumulates no gradient."""
    from transformers import AttentionInterface, BloomConfig, BloomForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = _model(tok)
    M.check_packing(model)
    assert all(p.grad is None for p in model.parameters())
    AttentionInterface.register("causal_only_sdpa", sdpa_attention_forward)
    model.get_base_model().set_attn_implementation("causal_only_sdpa")
    with pytest.raises(InputError, match="data.pack.*'causal_only_sdpa'.*'sdpa'"):
        M.check_packing(model)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(InputError, match="BloomForCausalLM.*'sdpa'"):
        M.check_packing(bloom)


def test_trainer_refuses_packing_for_a_model_that_cannot(tmp_path, caplog):
    """train_llama.py with data.pack on a tiny BLOOM (ALiBi: its masks ignore position ids): exit 2,
    the error names the implementation to use; the same model trains with data.pack=false."""
    from transformers import BloomConfig, BloomForCausalLM

    from seed.llama import TINY_LLAMA_TOKENIZER

    folder = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=600, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(folder)
    args = [f"model.base={folder}", f"model.tokenizer={TINY_LLAMA_TOKENIZER}", "model.lora=null", "model.dtype=float32",
            "train.max_steps=1", "train.progress=false", "train.export=false"]
    assert _train(*args, "data.pack=true", f"train.output_dir={tmp_path / 'a'}") == 2
    assert "data.pack" in caplog.text and "BloomForCausalLM" in caplog.text and "'sdpa'" in caplog.text
    assert _train(*args, "data.pack=false", f"train.output_dir={tmp_path / 'b'}") == 0


def test_pack_is_global_or_per_source(tmp_path):
    from seed.training.llm.data import LlmDataConfig, SourceConfig, sources_from_config

    (tmp_path / "a.jsonl").write_text("{}\n")
    path = str(tmp_path / "a.jsonl")
    cfg = LlmDataConfig(train=path, pack=True, sources=[SourceConfig(path=path, name="b"),
                                                         SourceConfig(path=path, name="c", pack=False)])
    assert [s.pack for s in sources_from_config(cfg)] == [True, True, False]
    cfg.pack, cfg.sources[0].pack = False, True
    assert [s.pack for s in sources_from_config(cfg)] == [False, True, False]
    assert LlmDataConfig().pack is False and SourceConfig().pack is None  # off by default: the original's batches


def test_packed_data_resumes_exactly(tmp_path, tok):
    sources = [_source(tmp_path, "pairs", True, batch_size=4), _source(tmp_path, "messages", False, batch_size=4)]
    run = LlmData(sources, tok, seed=3)
    full = [next(run) for _ in range(10)]
    assert {"position_ids" in b for b in full} == {True, False}  # a per-source setting, both sources drawn
    first = LlmData(sources, tok, seed=3)
    for _ in range(4):
        next(first)
    resumed = LlmData(sources, tok, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for k in range(4, 10):
        b = next(resumed)
        assert b.keys() == full[k].keys() and all(torch.equal(b[n], full[k][n]) for n in b if n != "source"), k
    assert resumed.counts() == run.counts()
    old = first.state_dict()  # a state saved before truncation was counted resumes, counting from 0
    for src in old["sources"]:
        del src["counts"]["truncated"]
    again = LlmData(sources, tok, seed=3)
    again.load_state_dict(old)
    assert all(c["truncated"] == 0 for c in again.counts().values())
    next(again)


# --- the trainer ----------------------------------------------------------------------------------

ARGS = ["train.progress=false", "model.lora.dropout=0", "train.export=false", "train.save_every=2",
        "train.schedule_steps=4", "data.batch_size=4", f"data.max_length={MAX_LENGTH}"]
PACKED = ["data.pack=true", "data.pad_to=longest"]


def _train(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(["--config", str(SFT), *args])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SFT 4 steps on 16 conversations (2 longer than max_length): packed, and unpacked padded to
    max_length (the original's batches)."""
    root = tmp_path_factory.mktemp("pack_runs")
    rows = _rows("messages", 16)
    for r in rows[3], rows[10]:
        r["messages"] = [r["messages"][0], {"role": "assistant", "content": _text(5, 120)}]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"packed": root / "packed", "plain": root / "plain", "args": [*ARGS, f"data.train={root / 'chats.jsonl'}"]}
    assert _train(*out["args"], *PACKED, "train.max_steps=4", f"train.output_dir={out['packed']}") == 0
    assert _train(*out["args"], "data.pack=false", "data.pad_to=max_length", "train.max_steps=4",
                  f"train.output_dir={out['plain']}") == 0
    return out


def test_packed_run_equals_the_unpacked_run(runs):
    a, b = _metrics(runs["plain"]), _metrics(runs["packed"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert (x["tokens"], x["learned_tokens"], x["truncated"]) == (y["tokens"], y["learned_tokens"], y["truncated"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["padding"] <= x["padding"]
    assert sum(r["padding"] for r in b) < sum(r["padding"] for r in a)
    assert b[-1]["data"]["train"]["truncated"] == 2 and sum(r["truncated"] for r in b) == 2 / 4
    ta = load_file(str(runs["plain"] / "checkpoints" / "step_00000004" / "model.safetensors"))
    tb = load_file(str(runs["packed"] / "checkpoints" / "step_00000004" / "model.safetensors"))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)


def test_packed_run_resumes_bit_exact(runs, tmp_path):
    out = tmp_path / "out"
    assert _train(*runs["args"], *PACKED, "train.max_steps=2", f"train.output_dir={out}") == 0
    assert _train(*runs["args"], *PACKED, "train.max_steps=4", f"train.output_dir={out}", "--resume") == 0
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "padding", "truncated")
    assert [[r[k] for k in keys] for r in _metrics(out)] == [[r[k] for k in keys] for r in _metrics(runs["packed"])]
    a = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(runs["packed"] / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(out / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    sb = torch.load(runs["packed"] / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert sa["data"] == sb["data"]


def test_torchrun_two_processes_packed_equal_one(runs, tmp_path):
    """2 gloo processes (DDP), each packing its half of every global micro-batch into its own rows:
    the losses, gradient norms and weights of 1 process packing the whole micro-batch."""
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--config", str(SFT), *runs["args"], *PACKED, "train.max_steps=2", f"train.output_dir={two}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(runs["packed"])[:2], _metrics(two)
    assert [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert (x["tokens"], x["learned_tokens"], x["truncated"]) == (y["tokens"], y["learned_tokens"], y["truncated"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert b[-1]["data"] == a[-1]["data"]  # global counts (truncation summed over the ranks)
    ta = load_file(str(runs["packed"] / "checkpoints" / "step_00000002" / "model.safetensors"))
    tb = load_file(str(two / "checkpoints" / "step_00000002" / "model.safetensors"))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)
