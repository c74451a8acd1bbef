"""Which image tokenizer made the codes, at every joint of the loop (seed.provenance): a tokenize_dataset
folder names its model, the LLM trainer checks its sources against one image tokenizer before the model is
built, the export records it (and copies a trained tokenizer folder), and SeedLlama / seed_llama.py use it
by default and refuse another. Tiny models on the CPU; real tokenize_dataset folders, real training runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seed
from seed import InputError
from seed.llm import codes_to_text

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
CAPTIONS = ROOT / "tests" / "data" / "captions.jsonl"
PRETRAIN = ROOT / "configs" / "train" / "llama_pretrain_tiny.yaml"
SFT = ROOT / "configs" / "train" / "llama_sft_tiny.yaml"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["train.max_steps=1", "train.save_every=1", "train.progress=false", "data.batch_size=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def tokenize(config, out: Path, *args: str) -> Path:
    assert _script("tokenize_dataset")(["--config", str(config), "--input", str(CAPTIONS), "--output", str(out),
                                        "--num-workers", "0", *args]) == 0
    return out


def train(config: Path, out: Path, *overrides: str) -> dict:
    """Train in this process (`seed.training.llm.train.train`); returns its summary."""
    from seed.training.llm.config import load_llama_train_config
    from seed.training.llm.train import train as run

    overrides = (*FAST, f"train.output_dir={out}", *overrides)
    return run(load_llama_train_config(config, *overrides), overrides=list(overrides))


def record(export) -> dict:
    return json.loads((Path(export) / "image_tokenizer.json").read_text())


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    """Two 'trained' tiny SEED-2 tokenizer folders: A (seed2_tiny saved) and B (another codebook)."""
    root = tmp_path_factory.mktemp("toks")
    tok = seed.Tokenizer.load("seed2_tiny")
    a = tok.save_pretrained(root / "tokA")
    with torch.no_grad():
        tok.quantizer.codebook.weight.mul_(-1.0)
    b = tok.save_pretrained(root / "tokB")
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def codes_a(toks, tmp_path_factory) -> Path:
    """tests/data/captions.jsonl tokenized by folder A, one image per chunk (3 chunks)."""
    return tokenize(toks["A"], tmp_path_factory.mktemp("codes") / "a", "--chunk-size", "1")


@pytest.fixture(scope="module")
def pre_export(codes_a, tmp_path_factory) -> Path:
    """A tiny pretraining run on codes_a (its export)."""
    summary = train(PRETRAIN, tmp_path_factory.mktemp("pre") / "out", f"data.train={codes_a}")
    return Path(summary["export"])


def test_tokenize_folder_names_its_model(codes_a, toks):
    run = json.loads((codes_a / "run.json").read_text())
    assert run["model_spec"] == str(toks["A"].resolve())
    from seed.provenance import record_for, record_of_codes_folder

    rec = record_of_codes_folder(codes_a)
    assert rec["variant"] == "seed2" and not rec["unfinished"] and (rec["done"], rec["chunks"]) == (3, 3)
    assert rec["fingerprint"]["weights"] == record_for(toks["A"])["fingerprint"]["weights"]


def test_export_records_its_tokenizer_and_chats_with_it(pre_export, toks):
    rec = record(pre_export)
    assert rec["variant"] == "seed2" and rec["spec"] == "image_tokenizer" and rec["declared"] is False
    copy = pre_export / "image_tokenizer"
    assert (copy / "model.safetensors").read_bytes() == (toks["A"] / "model.safetensors").read_bytes()
    assert rec["sources"][0]["codes_folders"][0]["done"] == 3

    from seed.llama import SeedLlama

    pipe = SeedLlama.from_pretrained(pre_export)  # no image_tokenizer: the export's own
    image = IMAGES / "chelsea.png"
    want = seed.Tokenizer.from_pretrained(toks["A"]).encode(image)
    other = seed.Tokenizer.from_pretrained(toks["B"]).encode(image)
    assert not torch.equal(want, other)
    prompt = pipe.prompts([[image, "What is this?"]])[0]
    assert codes_to_text(want)[0] in prompt
    reply = pipe.chat([image, "What is this?"], max_new_tokens=3, do_sample=False, decode_images=False)
    assert reply.token_ids.numel() > 0


def test_mismatching_image_tokenizer_is_refused(pre_export, toks):
    from seed.llama import SeedLlama

    with pytest.raises(InputError, match=r"(?s)image_tokenizer\.json.*tokB.*Leave image_tokenizer unset"):
        SeedLlama.from_pretrained(pre_export, image_tokenizer=str(toks["B"]))
    with pytest.raises(InputError, match="seed2_tiny"):  # a config is not the export's trained folder
        SeedLlama.from_pretrained(pre_export, image_tokenizer="seed2_tiny")
    pipe = SeedLlama.from_pretrained(pre_export, image_tokenizer=str(toks["A"]))  # the same one: accepted
    assert pipe.image_tokenizer.cfg.model.image_size == 56


def test_sft_inherits_the_pretraining_exports_tokenizer(pre_export, codes_a, toks, tmp_path):
    """SFT from the pretraining export on raw-code conversations (nothing else names a tokenizer): the
    export's record is the base's; with the caption rows as sft_caption and another data.image_tokenizer: refused."""
    summary = train(SFT, tmp_path / "sft", f"model.base={pre_export}")  # data.train: llama_sft_tiny.jsonl
    export = Path(summary["export"])
    assert record(export)["fingerprint"] == record(pre_export)["fingerprint"]
    assert record(export)["spec"] == "image_tokenizer" and (export / "image_tokenizer" / "model.safetensors").is_file()
    # another image tokenizer than the base's is refused, naming both
    src = f"data.sources=[{{path: '{codes_a}', format: sft_caption}}]"
    with pytest.raises(InputError, match=rf"(?s)model\.base {pre_export}.*data\.image_tokenizer"):
        train(SFT, tmp_path / "sft2", f"model.base={pre_export}", "data.train=null", src,
              f"data.image_tokenizer={toks['B']}")
    assert not (tmp_path / "sft2").exists()  # refused before the output folder is made


def test_codes_of_another_trained_tokenizer_are_refused(codes_a, toks, tmp_path, caplog):
    code = _script("train_llama")(["--config", str(PRETRAIN), *FAST, f"train.output_dir={tmp_path / 'o'}",
                                   f"data.train={codes_a}", f"data.image_tokenizer={toks['B']}"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(codes_a / "run.json") in errors[0] and str(toks["B"]) in errors[0]
    assert not (tmp_path / "o").exists()


def test_seed1_folder_refused_under_the_seed2_recipe_and_declared_on_purpose(tmp_path):
    folder = tokenize("seed_tiny", tmp_path / "seed1")
    with pytest.raises(InputError, match=r"(?s)run\.json: SEED-1 codes.*data\.image_codes=seed1"):
        train(PRETRAIN, tmp_path / "o", f"data.train={folder}")
    assert not (tmp_path / "o").exists()
    summary = train(PRETRAIN, tmp_path / "o1", f"data.train={folder}", "data.image_codes=seed1")
    rec = record(summary["export"])
    assert rec["variant"] == "seed1" and rec["declared"] is True and rec["spec"] == "seed_tiny"
    from seed.llama import SeedLlama

    pipe = SeedLlama.from_pretrained(summary["export"])  # chats in SEED-1 codes with the recorded tokenizer
    assert pipe.image_tokenizer.variant == "seed1"
    with pytest.raises(InputError, match="seed1 codes vs seed2 codes"):
        SeedLlama.from_pretrained(summary["export"], image_tokenizer="seed2_tiny")


def test_unfinished_folder_refused_or_used_and_recorded(codes_a, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(codes_a, part)
    for k in (1, 2):  # as a run killed after its first chunk
        (part / "done" / f"00000{k}.json").unlink()
        (part / "codes" / f"00000{k}.jsonl").unlink()
    with pytest.raises(InputError, match=r"(?s)unfinished tokenization \(1 of 3 chunks done.*data\.allow_unfinished"):
        train(PRETRAIN, tmp_path / "o", f"data.train={part}")
    assert not (tmp_path / "o").exists()
    summary = train(PRETRAIN, tmp_path / "o2", f"data.train={part}", "data.allow_unfinished=true")
    rec = record(summary["export"])
    assert rec["allow_unfinished"] is True
    assert rec["sources"][0]["codes_folders"] == [{"path": str(part.resolve()), "chunks": 3, "done": 1,
                                                   "unfinished": True}]


def _conversations(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(IMAGES / f"{n}.png")},
                                                        {"type": "text", "text": "What is it?"}]},
                          {"role": "assistant", "content": f"A {n}."}]} for n in ("camera", "chelsea", "coffee")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_paths_without_a_usable_image_tokenizer_fail_before_the_model(tmp_path, toks, monkeypatch):
    convs = _conversations(tmp_path / "convs.jsonl")
    import seed.training.llm.train as T

    def no_build(*a, **k):
        raise AssertionError("the model must not be built")

    with monkeypatch.context() as m:
        m.setattr(T, "build", no_build)
        with pytest.raises(InputError, match=r"(?s)convs\.jsonl:1 holds an image path.*data\.image_tokenizer"):
            train(SFT, tmp_path / "o", f"data.train={convs}")
        with pytest.raises(InputError, match="data.image_tokenizer 'seed2_tinny'"):
            train(SFT, tmp_path / "o", f"data.train={convs}", "data.image_tokenizer=seed2_tinny")
    assert not (tmp_path / "o").exists()
    summary = train(SFT, tmp_path / "ok", f"data.train={convs}", f"data.image_tokenizer={toks['A']}")
    rec = record(summary["export"])
    assert rec["spec"] == "image_tokenizer" and rec["copied_from"] == str(toks["A"].resolve())


def test_raw_codes_record_unknown_and_ask_for_image_tokenizer(tmp_path):
    summary = train(PRETRAIN, tmp_path / "o", "data.train=configs/train/data/llama_pairs_tiny.jsonl")
    export = Path(summary["export"])
    rec = record(export)
    assert rec["variant"] is None and rec["spec"] is None
    from seed.llama import SeedLlama

    pipe = SeedLlama.from_pretrained(export)
    assert pipe.chat("hello", max_new_tokens=2, do_sample=False).token_ids.numel() > 0  # text needs no tokenizer
    with pytest.raises(InputError, match=r"records no image tokenizer.*image_tokenizer="):
        pipe.chat([IMAGES / "chelsea.png", "What is it?"], max_new_tokens=2)
    # naming one is accepted (nothing recorded to contradict it)
    named = SeedLlama.from_pretrained(export, image_tokenizer="seed2_tiny")
    assert "<img>" in named.prompts([[IMAGES / "chelsea.png", "?"]])[0]
    # an older export without the record: the assumed seed2_tokenizer cannot load here -> the same advice
    if not (ROOT / "pretrained" / "eva_vit_g.pth").exists():
        (export / "image_tokenizer.json").unlink()
        old = SeedLlama.from_pretrained(export)
        with pytest.raises(InputError, match=r"holds no image_tokenizer\.json: pass .*image_tokenizer="):
            old.chat([IMAGES / "chelsea.png", "What is it?"], max_new_tokens=2)


def test_sft_caption_gives_both_directions(codes_a):
    from seed.training.llm.data import DESCRIBE_QUESTION, ImageCodes, normalize_row
    from seed.training.llm.format import FORMATTERS, RandomDraws

    row = json.loads((codes_a / "codes" / "000001.jsonl").read_text().splitlines()[0])
    assert row["image"] == "images/chelsea.png" and isinstance(row["caption"], list)
    rng, seen = RandomDraws(0), {}
    for _ in range(40):
        kind, payload = normalize_row(dict(row), "sft_caption", rng, ImageCodes(), str(codes_a), "row")
        plan = FORMATTERS[kind](payload, rng)
        texts = [p for seg, _ in plan.segments for p in seg if isinstance(p, str)]
        seen.setdefault(plan.decisions["branch"], []).append(" ".join(texts))
    assert set(seen) == {"answer", "generate"}
    assert all(DESCRIBE_QUESTION in t for t in seen["answer"])
    for caption in row["caption"]:  # a list of captions: one picked each time, both appear
        assert any(caption.rstrip("!.") in t for t in seen["answer"] + seen["generate"])


def test_seed_llama_script_uses_the_exports_tokenizer(pre_export, toks, tmp_path, capsys):
    cmd = ["--llm", str(pre_export), "--prompt", "What?", "--image", str(IMAGES / "coffee.png"), "--greedy",
           "--max-new-tokens", "3"]
    ok = subprocess.run([sys.executable, str(ROOT / "scripts" / "seed_llama.py"), *cmd, "--out", str(tmp_path / "ok")],
                        capture_output=True, text=True, env=ENV, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "image tokenizer `" + str(pre_export / "image_tokenizer") in (tmp_path / "ok" / "transcript.md").read_text()
    capsys.readouterr()
    assert _script("seed_llama")([*cmd, "--image-tokenizer", str(toks["B"]), "--out", str(tmp_path / "bad")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(toks["B"]) in lines[0] and "image_tokenizer.json" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_demo_and_evaluate_default_to_the_exports_tokenizer(pre_export, toks):
    import argparse

    from seed.app import demo_from_args, parse_args

    copy = str((pre_export / "image_tokenizer").resolve())
    demo = demo_from_args(parse_args(["--llm", str(pre_export)]))
    try:
        assert demo._image_tokenizer_spec == copy
        assert demo.tokenizer.encode(IMAGES / "camera.png").tolist() == \
            seed.Tokenizer.from_pretrained(toks["A"]).encode(IMAGES / "camera.png").tolist()
    finally:
        demo.close()
    with pytest.raises(InputError, match="tokB"):
        demo_from_args(parse_args(["--llm", str(pre_export), "--config", str(toks["B"])]))

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    args = argparse.Namespace(llm=str(pre_export), tokenizer=None, image_tokenizer=None, dtype=None,
                              load_in_8bit=False, template=None)
    assert ev.image_tokenizer_spec(args) == copy  # what evaluate.py fingerprints before the LM loads
    pipe, fingerprint = ev.load_llama(args)
    assert pipe.image_tokenizer_spec == copy
    assert fingerprint["image_tokenizer"]["folder"] == copy
    assert "model.safetensors" in fingerprint["image_tokenizer"]["weights"]
    with pytest.raises(InputError, match="tokB"):
        ev.image_tokenizer_spec(argparse.Namespace(**{**vars(args), "image_tokenizer": str(toks["B"])}))
    with pytest.raises(InputError, match="tokB"):
        ev.load_llama(argparse.Namespace(**{**vars(args), "image_tokenizer": str(toks["B"])}))


def test_overrides_of_a_recorded_config_may_change_decoding_not_the_model(tmp_path, capsys):
    """An export recording a config (seed2_tiny): diffusion overrides are fine, model overrides are another tokenizer."""
    from seed.provenance import record_for, write_export_record

    export = tmp_path / "export"
    export.mkdir()
    write_export_record(export, record_for("seed2_tiny"))
    from seed.llama import SeedLlama

    pipe = SeedLlama.from_pretrained(export, tokenizer=str(seed.llama.TINY_LLAMA_TOKENIZER))
    assert pipe.image_tokenizer_spec == "seed2_tiny"
    same = seed.load_config("seed2_tiny", "diffusion.steps=2", "model.precision=fp16-all")
    SeedLlama.from_pretrained(export, tokenizer=str(seed.llama.TINY_LLAMA_TOKENIZER), image_tokenizer=same)
    with pytest.raises(InputError, match=r"model\.image_size: 56 vs 28"):
        SeedLlama.from_pretrained(export, tokenizer=str(seed.llama.TINY_LLAMA_TOKENIZER),
                                  image_tokenizer=seed.load_config("seed2_tiny", "model.image_size=28"))
    assert _script("seed_llama")(["--llm", str(export), "--tokenizer", str(seed.llama.TINY_LLAMA_TOKENIZER),
                                  "--prompt", "hi", "--out", str(tmp_path / "o"), "model.image_size=28"]) == 2
    assert "model.image_size: 56 vs 28" in capsys.readouterr().err and not (tmp_path / "o").exists()
