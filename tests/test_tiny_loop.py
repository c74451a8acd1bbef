"""The tiny loop end to end, through the real scripts (docs/llm_training.md, "The tiny loop"):
the repo's three photos -> codes (tokenize_dataset.py with the shipped trained tiny tokenizer) ->
pretraining (train_llama.py, LoRA, merged into the export) -> instruction tuning on the same caption
rows (train_llama.py, format sft_caption) -> SeedLlama: asked about each photo it answers that photo's
caption, asked for a picture of a caption it writes that photo's 32 codes.

Every joint matters: codes that do not tell the photos apart, shifted image token ids, labels
without the image part, an unmerged LoRA, a broken export or chat make the answers wrong. The
schedule is shorter than the configs' (the README's) but still learns the answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seed import SeedLlama
from seed.training.llm.data import DESCRIBE_QUESTION
from seed.training.llm.format import GEN_PROMPT

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "tiny_seed2_tokenizer"
CAPTIONS = ROOT / "tests" / "data" / "captions.jsonl"
PRETRAIN = ROOT / "configs" / "train" / "llama_pretrain_loop_tiny.yaml"
SFT = ROOT / "configs" / "train" / "llama_sft_loop_tiny.yaml"
RUN = ["train.log_every=10", "train.progress=false"]
PRETRAIN_SHORT = ["train.max_steps=60", *RUN]
SFT_SHORT = ["train.max_steps=100", *RUN]
"""The test's schedules (the configs': 150 and 100 steps of 6 samples); one checkpoint each, at the end."""


def _run(script: str, *args: str, cwd: Path) -> str:
    # one thread: faster for a model this small, and much faster on a busy machine
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{script} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _same_caption(answer: str, captions: list[str]) -> bool:
    """The answer is one of the captions (the SFT answers end in one added "." unless they had one)."""
    return answer.strip().rstrip(".") in {c.strip().rstrip(".") for c in captions}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_loop_learns_each_photo_both_ways(tmp_path, one_thread):
    # 1. images -> codes: the README's command, run from tmp_path (the configs' relative paths land there)
    out = _run("tokenize_dataset.py", "--config", str(TOKENIZER), "--input", str(CAPTIONS),
               "--output", "outputs/tiny_loop/codes", "--num-workers", "0", cwd=tmp_path)
    assert "done 3, skipped 0" in out and "failed 0" in out
    rows = [json.loads(line) for f in sorted((tmp_path / "outputs/tiny_loop/codes/codes").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == ["camera.png", "chelsea.png", "coffee.png"]
    for a in rows:  # the trained tokenizer tells the photos apart (the random seed2_tiny does not)
        for b in rows:
            if a is not b:
                assert sum(x != y for x, y in zip(a["codes"], b["codes"])) >= 20, (a["image"], b["image"])

    # 2. pretraining (LoRA, merged into export/), 3. instruction tuning from that export (full fine-tuning)
    _run("train_llama.py", "--config", str(PRETRAIN), *PRETRAIN_SHORT, cwd=tmp_path)
    assert (tmp_path / "outputs/tiny_loop/pt/export/adapter").is_dir()  # LoRA was trained and merged
    _run("train_llama.py", "--config", str(SFT), *SFT_SHORT, cwd=tmp_path)
    export = tmp_path / "outputs/tiny_loop/sft/export"

    # 4. chat with the export, greedy
    # the export names its image tokenizer (a copy of the trained folder the codes came from) and chat uses it
    record = json.loads((export / "image_tokenizer.json").read_text())
    assert record["variant"] == "seed2" and record["spec"] == "image_tokenizer"
    assert (export / "image_tokenizer" / "model.safetensors").read_bytes() == (TOKENIZER / "model.safetensors").read_bytes()
    pipe = SeedLlama.from_pretrained(export)
    greedy = dict(do_sample=False, max_new_tokens=40, decode_images=False)
    wrong = []
    for r in rows:
        image = CAPTIONS.parent / r["image"]
        reply = pipe.chat([image, DESCRIBE_QUESTION], **greedy)
        if not _same_caption(reply.text, r["caption"]):
            wrong.append(f"{image.name}: answered {reply.text!r}, captions {r['caption']}")
        for caption in r["caption"]:  # text -> image: a request of the SFT's generation branch, answered by an image
            reply = pipe.chat(f"{GEN_PROMPT[13]} {caption.rstrip('.')}.", force_image=True, **greedy)
            got = reply.codes[0].tolist() if reply.codes else None
            if got != r["codes"]:
                wrong.append(f"{caption!r}: generated {reply.text!r} with codes {got}, not {image.name}'s {r['codes']}")
    assert not wrong, "\n".join(wrong)
