"""SEED-LLaMA (seed.llama): prompts, constrained image spans, batching, lazy loading, the script.

The LM is a tiny random `LlamaForCausalLM` and its tokenizer a real (tiny) BPE tokenizer with
a Metaspace pre-tokenizer like LLaMA's, holding the image tokens; both are written with
`save_pretrained` and loaded back from the folder. Images go through SEED-2: the parity
fixture's original-format weights where codes are compared, `seed2_tiny` elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import PHOTOS, ROOT, fixtures, seed2_tokenizer
from PIL import Image
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessor, PreTrainedTokenizerFast,
)

import seed
from seed import CheckpointError, InputError
from seed.llama import MalformedSpan, Reply, SeedLlama
from seed.llm import add_image_tokens

SEED2 = fixtures("seed2")
TOKENIZATION = fixtures("seed_llama_tokenizer")
CORPUS = ["USER: What is this animal? ASSISTANT: A cat sitting on a table.",
          "Can you generate an image of a dog on the green grass?",
          "[INST] Can you make the cat wear sunglasses? [/INST] Here it is.",
          "A coffee cup and an old camera: the photo shows both."] * 4
QUESTION = "What is this animal?"


def bpe_tokenizer(with_image_tokens: bool) -> PreTrainedTokenizerFast:
    """A real fast tokenizer trained here: BPE, Metaspace (LLaMA-like), <unk>/<s>/</s>; pad unset."""
    model = HFTokenizerModel(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                                          show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_image_tokens:
        add_image_tokens(tok)
    return tok


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> Path:
    """An LM folder as on the Hub: config, weights, tokenizer with the image tokens (save_pretrained)."""
    folder = tmp_path_factory.mktemp("tiny-seed-llama")
    tok = bpe_tokenizer(with_image_tokens=True)
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(llm_folder) -> SeedLlama:
    return SeedLlama.from_pretrained(llm_folder, image_tokenizer="seed2_tiny")


DECODE = {"steps": 2, "height": 64, "width": 64}


# --------------------------------------------------------------------------- prompts


def img_text(codes) -> str:
    """The spec's image text, built independently: <img> + <img_%05d> per code + </img>."""
    return "<img>" + "".join("<img_{:05d}>".format(int(c)) for c in codes) + "</img>"


def image_question_case(cases: dict, template: str) -> dict:
    """The tokenization fixture's case of one user turn: an image, then a question."""
    return next(c for c in cases["prompts"] if c["template"] == template and not c["force_image"]
                and [m["role"] for m in c["conversation"]] == ["user"]
                and [p["type"] for p in c["conversation"][0]["content"]] == ["image", "text"])


@pytest.mark.parametrize("tokenization", TOKENIZATION, ids=[p.name for p in TOKENIZATION])
@pytest.mark.parametrize("fixture", SEED2, ids=[p.name for p in SEED2])
@pytest.mark.parametrize("template", ["vicuna", "llama2"])
def test_prompt_ids_equal_the_original_template(tokenization, fixture, template):
    """Photos -> the codes the original image tokenizer gave (expected.pt) -> the ids the original stack
    gives the prompt: the tokenization fixture's ids for the same question, with these codes' ids in
    place of its image's. One row per photo, left-padded in a batch."""
    cases = json.loads((tokenization / "cases.json").read_text())
    case = image_question_case(cases, template)
    expected = torch.load(fixture / "expected.pt", weights_only=True)
    paths = [fixture / "images" / name for name in expected["images"]]
    tok = AutoTokenizer.from_pretrained(tokenization / "tokenizer")
    pipe = SeedLlama(tiny_llama(8), tok, seed2_tokenizer(fixture), template=template)
    question = case["conversation"][0]["content"][1]["text"]
    enc = pipe.prompt_ids([[p, question] for p in paths])
    start = case["input_ids"].index(cases["ids"]["boi"]) + 1
    for i, codes in enumerate(expected["codes"].tolist()):
        want = case["input_ids"][:start] + [cases["ids"]["image_id_shift"] + c for c in codes] \
            + case["input_ids"][start + 32:]
        n = len(want)
        assert enc["input_ids"][i, -n:].tolist() == want
        assert enc["attention_mask"][i].tolist() == [0] * (enc["input_ids"].shape[1] - n) + [1] * n


def test_multi_turn_and_chat_templates(pipe, llm_folder):
    """Multi-turn prompts as the original demo's conversation.py; the tokenizer's own chat template."""
    codes = torch.arange(32) * 5
    conv = [{"role": "user", "content": ["Draw a dog."]},
            {"role": "assistant", "content": ["Here: ", codes]},
            {"role": "user", "content": [{"type": "image", "codes": codes.tolist()}, "Make it red."]}]
    assert pipe.prompts([conv])[0] == ("<s>USER: Draw a dog.\nASSISTANT: Here: " + img_text(codes)
                                       + "\nUSER: " + img_text(codes) + "Make it red.\nASSISTANT:")
    assert pipe.prompts([conv], template="llama2")[0] == (
        "<s>[INST] Draw a dog. [/INST]\nHere: " + img_text(codes) + "\n[INST] " + img_text(codes)
        + "Make it red. [/INST]\n")
    reply = Reply(parts=["Here:", codes, MalformedSpan("cut", [1]), "!"], codes=[codes], spaced=frozenset({3}))
    assert reply.as_message() == {"role": "assistant", "content": ["Here:", codes, " !"]}
    assert reply.text == "Here:<image><image> !"
    again = pipe.prompt_ids([[conv[0], reply.as_message(), conv[2]]])["input_ids"]
    assert again.tolist() == pipe.prompt_ids([[conv[0], {"role": "assistant", "content": ["Here: ", codes, "!"]},
                                               conv[2]]])["input_ids"].tolist()  # whitespace at images: stripped
    assert pipe.prompts(["hi"], system="Be brief.", template="llama2")[0] == (
        "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] hi [/INST]\n")

    tok = AutoTokenizer.from_pretrained(llm_folder)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    chat = SeedLlama(tiny_llama(len(tok)), tok, "seed2_tiny", template="chat")
    assert chat.prompts([[codes, "hi"]])[0] == "<user>" + img_text(codes) + "hi<assistant>"
    with pytest.raises(InputError, match="no chat template"):
        pipe.prompts(["hi"], template="chat")


# --------------------------------------------------------------------------- constrained spans


class Bias(LogitsProcessor):
    """Adds ``value`` to one token's logit: makes the random LM open image spans often."""

    def __init__(self, token: int, value: float):
        self.token, self.value = token, value

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += self.value
        return scores


def spans_of(ids: list[int], boi: int, eoi: int) -> list[list[int]]:
    out, start = [], None
    for k, t in enumerate(ids):
        if t == boi:
            start = k
        elif t == eoi and start is not None:
            out.append(ids[start + 1:k])
            start = None
    return out


def test_constrained_sampling_gives_only_well_formed_spans(pipe):
    """Random weights, sampling, <img> made likely: every span is <img> + 32 codes + </img>, decoded."""
    ids = pipe.image_ids
    code_ids = set(ids.codes.tolist())
    replies = pipe.generate(["Draw a dog.", "Draw a cat."], force_image=[True, False], seed=0, max_new_tokens=120,
                            logits_processor=[Bias(ids.boi, 4.0)], decode=DECODE)
    total = 0
    for reply, forced in zip(replies, [True, False]):
        gen = ([ids.boi] if forced else []) + reply.token_ids.tolist()
        spans = spans_of(gen, ids.boi, ids.eoi)
        assert reply.errors == [] and not any(isinstance(p, MalformedSpan) for p in reply.parts)
        assert gen.count(ids.boi) == gen.count(ids.eoi) == len(spans) == len(reply.codes) == len(reply.images)
        assert all(len(s) == 32 and set(s) <= code_ids for s in spans)
        outside = [t for t in gen if t not in code_ids]  # code tokens only inside spans
        assert len(outside) == len(gen) - 32 * len(spans)
        for s, c in zip(spans, reply.codes):
            assert c.dtype == torch.int64 and c.tolist() == [int(ids.codes.tolist().index(t)) for t in s]
        assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in reply.images)
        total += len(spans)
    assert total >= 3  # the bias opened several spans (the forced one included)


def test_without_constraint_malformed_spans_are_reported(pipe):
    """The same sampling with the constraint off (the original's behaviour): reported, not raised."""
    replies = pipe.generate(["Draw a dog.", "Draw a cat."], force_image=True, seed=0, max_new_tokens=60,
                            constrain_images=False, decode_images=False)
    for reply in replies:
        assert reply.errors and all("<img>" in e for e in reply.errors)
        assert isinstance(reply.parts[0], MalformedSpan) and reply.parts[0].token_ids[0] == pipe.image_ids.boi


class Script(LogitsProcessor):
    """Forces the generated tokens to follow ``script`` (then EOS)."""

    def __init__(self, prompt_len: int, script: list[int], eos: int):
        self.start, self.script, self.eos = prompt_len, script, eos

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[k] if k < len(self.script) else self.eos] = 0
        return forced


def test_malformed_span_kinds_are_parsed_and_good_ones_decoded(pipe):
    ids = pipe.image_ids
    c = ids.codes.tolist()
    text = pipe.tokenizer("a cat", add_special_tokens=False)["input_ids"]
    good = [ids.boi, *c[100:132], ids.eoi]
    script = ([ids.boi, *c[:5], ids.eoi] + text + good + [ids.eoi] + c[7:9] + text
              + [ids.boi, *c[:3], *text, ids.eoi] + [ids.boi, *c[:2]])
    prompt_len = pipe.prompt_ids(["Draw."])["input_ids"].shape[1]
    reply = pipe.chat("Draw.", constrain_images=False, do_sample=False, max_new_tokens=len(script) + 2,
                      logits_processor=[Script(prompt_len, script, pipe.tokenizer.eos_token_id)], decode=DECODE)
    kinds = [type(p).__name__ for p in reply.parts]
    assert kinds == ["MalformedSpan", "str", "Image", "MalformedSpan", "MalformedSpan", "str",
                     "MalformedSpan", "MalformedSpan"]
    assert [c.tolist() for c in reply.codes] == [list(range(100, 132))]
    assert reply.parts[1].strip() == "a cat" and reply.parts[2].size == (64, 64)
    assert len(reply.errors) == 5
    for want, err in zip(["5 tokens", "</img> without <img>", "2 code token(s) outside",
                          f"({len(text)} not code tokens)",
                          "generation ended after 2 tokens"], reply.errors):
        assert want in err
    assert reply.token_ids.tolist() == script


# --------------------------------------------------------------------------- batching


def test_batch_equals_each_prompt_alone_greedy(pipe):
    photos = [Path(p) for p in PHOTOS]
    convs = ["Can you generate an image of a dog on the green grass?",
             [photos[0], QUESTION],
             [{"role": "user", "content": [photos[1], "Describe it."]},
              {"role": "assistant", "content": "An old camera."},
              {"role": "user", "content": [photos[2], "And this one?"]}],
             "A cup of coffee."]
    forces = [True, False, False, True]
    settings = {"do_sample": False, "max_new_tokens": 40, "decode_images": False}
    batch = pipe.generate(convs, force_image=forces, **settings)
    assert len(batch) == len(convs)
    for conv, force, got in zip(convs, forces, batch):
        alone = pipe.chat(conv, force_image=force, **settings)
        assert got.token_ids.tolist() == alone.token_ids.tolist()
        assert [c.tolist() for c in got.codes] == [c.tolist() for c in alone.codes]
        assert got.text == alone.text
    assert len(batch[0].codes) == len(batch[3].codes) == 1  # forced rows: an image each
    several = pipe.generate(convs[:2], force_image=[True, False], num_return_sequences=2, seed=0,
                            max_new_tokens=40, decode_images=False)
    assert len(several) == 4 and [len(r.codes) >= 1 for r in several[:2]] == [True, True]
    assert not any(r.errors for r in several)


# --------------------------------------------------------------------------- loading


def test_tokenizer_without_image_tokens_is_extended_and_lm_resized(tmp_path):
    tok = bpe_tokenizer(with_image_tokens=False)
    n = len(tok)
    tiny_llama(n).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pipe = SeedLlama.from_pretrained(tmp_path, image_tokenizer="seed2_tiny")
    assert len(pipe.tokenizer) == n + 8192 + 2 and pipe.image_ids.codes.tolist() == list(range(n, n + 8192))
    assert pipe._model is None  # lazy: nothing loaded yet
    assert pipe.model.get_input_embeddings().num_embeddings == len(pipe.tokenizer)
    reply = pipe.chat("Draw a dog.", force_image=True, seed=1, max_new_tokens=40, decode_images=False)
    assert reply.errors == [] and len(reply.codes) == 1


def in_threads(fn, n: int = 4) -> list:
    got = []
    threads = [threading.Thread(target=lambda: got.append(fn())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_lm_and_image_tokenizer_load_lazily_once_across_threads(llm_folder):
    calls = []

    def load_lm():
        calls.append("lm")
        time.sleep(0.2)
        return tiny_llama(len(tok))

    def load_image_tokenizer():
        calls.append("image")
        time.sleep(0.2)
        return seed.Tokenizer.from_config(seed.load_config("seed2_tiny"), device="cpu")

    tok = AutoTokenizer.from_pretrained(llm_folder)
    pipe = SeedLlama(load_lm, tok, load_image_tokenizer)
    assert calls == []
    models = in_threads(lambda: pipe.model)
    assert calls == ["lm"] and len(models) == 4 and all(m is models[0] for m in models)
    reply = pipe.chat("hello", do_sample=False, max_new_tokens=5)  # text only: no image tokenizer needed
    assert calls == ["lm"] and isinstance(reply.text, str)
    toks = in_threads(lambda: pipe.image_tokenizer)
    assert calls == ["lm", "image"] and all(t is toks[0] for t in toks)


def test_quantized_loading_and_device_map_need_the_llama_extra(llm_folder):
    import importlib.util

    with pytest.raises(InputError, match="exclude"):
        SeedLlama.from_pretrained(llm_folder, load_in_8bit=True, load_in_4bit=True)
    missing = [m for m in ("accelerate", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if not missing:
        pytest.skip("the llama extra is installed")
    with pytest.raises(ImportError, match=rf"8-bit/4-bit loading needs {' and '.join(missing)}: .*seed\[llama\]"):
        SeedLlama.from_pretrained(llm_folder, load_in_4bit=True)
    if "accelerate" in missing:
        with pytest.raises(ImportError, match=r"device_map='auto' needs accelerate"):
            SeedLlama.from_pretrained(llm_folder, device_map="auto")


def test_bad_inputs_are_named(pipe, tmp_path):
    with pytest.raises(CheckpointError, match="nothing-here"):
        SeedLlama.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(InputError, match="unknown template 'alpaca'"):
        pipe.prompts(["hi"], template="alpaca")
    with pytest.raises(InputError, match="last message must be the user's"):
        pipe.prompts([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])
    with pytest.raises(InputError, match="conversation 1, part 1"):
        pipe.prompts(["fine", ["text", 3.5]])
    with pytest.raises(InputError, match="bad codes"):
        pipe.prompts([[{"type": "image", "codes": [1] * 31}]])
    with pytest.raises(InputError, match="list of conversations"):
        pipe.generate("hi")
    with pytest.raises(InputError, match="force_image has 1 values for 2"):
        pipe.prompts(["a", "b"], force_image=[True])
    seed1 = SeedLlama(pipe.model, pipe.tokenizer, "seed_tiny")
    with pytest.raises(InputError, match="image tokenizer is seed1"):
        seed1.prompts([[PHOTOS[0], "hi"]])


def test_text_that_is_not_unicode_is_an_input_error(pipe):
    """A lone surrogate (half an emoji, from a JSON escape or an undecodable command-line byte) is
    named, not SentencePiece's RuntimeError from deep inside the tokenizer."""
    with pytest.raises(InputError, match=r"conversation 0: the text is not valid Unicode .*'\\ud83d'"):
        pipe.chat("a cat \ud83d", max_new_tokens=2)
    with pytest.raises(InputError, match="conversation 0, message 0, part 1: the text is not valid Unicode"):
        pipe.chat([{"role": "user", "content": [PHOTOS[0], {"type": "text", "text": "\udcff"}]}], max_new_tokens=2)


# --------------------------------------------------------------------------- the script


SCRIPT = ROOT / "scripts" / "seed_llama.py"


def test_script_help_is_fast():
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--force-image" in out.stdout
    assert time.perf_counter() - t < 3


def test_script_one_shot_writes_images_and_transcript(llm_folder, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--llm", str(llm_folder), "--image-tokenizer", "seed2_tiny",
           "--prompt", "Make the cat wear sunglasses.", "--image", str(PHOTOS[0]), "--force-image",
           "--max-new-tokens", "50", "--seed", "0", "--steps", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    md = (out / "transcript.md").read_text()
    assert "Make the cat wear sunglasses." in md and "![generated image 1](image_01.png)" in md
    assert (out / "input_01.png").read_bytes() == Path(PHOTOS[0]).read_bytes()
    with Image.open(out / "image_01.png") as im:
        assert im.size == (64, 64)
    codes = json.loads((out / "codes.json").read_text())
    assert list(codes) == ["image_01.png"] and len(codes["image_01.png"]) == 32


def test_script_interactive_chat(llm_folder, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import seed_llama as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    lines = [f"/image {PHOTOS[1]}", "What is this?", "/draw a red car", "/image missing.png", "/quit", "ignored"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = tmp_path / "chat"
    assert script.main(["--llm", str(llm_folder), "--image-tokenizer", "seed2_tiny", "--greedy",
                        "--max-new-tokens", "40", "--out", str(out), "diffusion.steps=2"]) == 0
    md = (out / "transcript.md").read_text()
    assert md.count("**User:**") == 2 and md.count("**Assistant:**") == 2
    assert "What is this?" in md and "a red car" in md and "![generated image 1](image_01.png)" in md
    assert "ignored" not in md
    assert (out / "image_01.png").is_file() and "missing.png: no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 16: defects 5-10 and details


@pytest.fixture(scope="module")
def tiny() -> SeedLlama:
    """The tiny random SEED-LLaMA shipped with seed: a real SentencePiece tokenizer, nothing downloaded."""
    return SeedLlama.from_pretrained("tiny")


def test_unseeded_sampling_differs_and_a_seed_repeats(tiny):
    """Defect 5: unseeded calls draw from the global RNG (and move it on); ``seed=`` repeats."""
    settings = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "decode_images": False}
    free = [tiny.chat("Tell me a story.", **settings).token_ids.tolist() for _ in range(2)]
    assert free[0] != free[1]
    state = torch.get_rng_state()
    seeded = [tiny.chat("Tell me a story.", seed=3, **settings).token_ids.tolist() for _ in range(2)]
    assert seeded[0] == seeded[1] and torch.equal(torch.get_rng_state(), state)


def test_typed_img_tag_never_gives_a_malformed_span(tiny, caplog):
    """Defect 6: "<img>" typed in a question is read as the image token, as the original reads it
    (the tokenization fixture's edge-literal-img-tag case), with a warning; the constraint only
    counts spans the LM opens, so the answer is never the inside of a span."""
    question = "What does the <img> tag do in HTML?"
    ids = tiny.prompt_ids([question])["input_ids"][0].tolist()
    assert ids.count(tiny.image_ids.boi) == 1
    with caplog.at_level("WARNING", logger="seed.llama"):
        replies = tiny.generate([question] * 3, seed=0, max_new_tokens=60, logits_processor=[Bias(tiny.image_ids.boi,
                                                                                                    3.0)],
                                decode_images=False)
    assert "holds an image token" in caplog.text
    code_ids = set(tiny.image_ids.codes.tolist())
    for r in replies:
        assert r.errors == [] and not any(isinstance(p, MalformedSpan) for p in r.parts)
        gen = r.token_ids.tolist()
        assert gen[0] not in code_ids and gen[0] != tiny.image_ids.eoi  # not answered from inside a span
        assert all(len(s) == 32 for s in spans_of(gen, tiny.image_ids.boi, tiny.image_ids.eoi))


def test_text_after_a_generated_image_keeps_its_space_and_feeds_back_the_same_ids(tiny):
    """Defect 7: "<img>...</img> and a man" reads "<image> and a man"; as_message() gives the next
    turn exactly the ids the LM generated for this answer."""
    ids = tiny.image_ids
    words = [tiny.tokenizer.convert_tokens_to_ids(p) for p in ("\u2581and", "\u2581a", "\u2581man")]
    assert tiny.tokenizer.unk_token_id not in words
    script = [ids.boi, *ids.codes[10:42].tolist(), ids.eoi, *words]
    conv = [{"role": "user", "content": "Draw a cat."}]
    start = tiny.prompt_ids([conv])["input_ids"].shape[1]
    reply = tiny.chat(conv, do_sample=False, max_new_tokens=len(script) + 1, decode_images=False,
                      logits_processor=[Script(start, script, tiny.tokenizer.eos_token_id)])
    assert reply.token_ids.tolist() == script
    assert reply.text == "<image> and a man" and reply.parts[1] == "and a man"
    nxt = tiny.prompt_ids([conv + [reply.as_message(), {"role": "user", "content": "Thanks."}]])["input_ids"][0]
    nxt = nxt.tolist()
    assert any(nxt[k:k + len(script)] == script for k in range(len(nxt)))


def test_conversation_longer_than_the_context_is_a_clear_error(tiny):
    """Defect 8: RoPE LLaMA (max_position_embeddings) and GPT-2 (n_positions): a prompt that does not
    fit is an InputError; the new tokens are cut to what fits (never past the positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    long = "word " * 2100
    with pytest.raises(InputError, match=r"conversation 0 is \d+ tokens long; the LM reads at most 2048"):
        tiny.chat(long, max_new_tokens=4)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny.tokenizer), n_positions=64, n_embd=16, n_layer=1,
                                      n_head=2, bos_token_id=1, eos_token_id=2)).eval()
    pipe = SeedLlama(gpt2, tiny.tokenizer, "seed2_tiny")
    with pytest.raises(InputError, match="reads at most 64"):
        pipe.chat("word " * 70, max_new_tokens=4)
    prompt = "one two three four five six seven"
    n = pipe.prompt_ids([prompt])["input_ids"].shape[1]
    reply = pipe.chat(prompt, max_new_tokens=200, seed=0, constrain_images=False, decode_images=False,
                      logits_processor=[Bias(tiny.tokenizer.eos_token_id, -1e9)])
    assert len(reply.token_ids) == 64 - n


def test_generate_wants_a_list_of_conversations_and_keeps_its_own_ids(tiny):
    """Defects 9 and 10: one conversation's messages given to generate; pad_token_id / input_ids."""
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="one conversation's messages: use chat"):
        tiny.generate(messages)
    assert len(tiny.generate([messages], max_new_tokens=2, decode_images=False)) == 1
    reply = tiny.chat("hi", pad_token_id=tiny.tokenizer.eos_token_id, max_new_tokens=3, decode_images=False)
    assert isinstance(reply.text, str)
    with pytest.raises(InputError, match="makes input_ids from the conversations"):
        tiny.chat("hi", input_ids=torch.tensor([[1, 2]]))


def test_empty_system_is_no_system_and_14b_picks_llama2(tiny):
    assert tiny.prompts(["hi"], system="") == tiny.prompts(["hi"]) == ["<s>USER: hi\nASSISTANT:"]
    assert tiny.prompts([[{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]],
                        template="llama2") == ["<s>[INST] hi [/INST]\n"]
    for name, template in [("AILab-CVC/seed-llama-14b-sft", "llama2"), ("AILab-CVC/seed-llama-8b-sft", "vicuna")]:
        pipe = SeedLlama.from_pretrained(name, tokenizer=tiny.tokenizer)  # the LM would load on first use only
        assert pipe.template == template and pipe._model is None and not pipe.random_weights


# --------------------------------------------------------------------------- review r1: loading, limits, threads


def copy_folder(src: Path, dst: Path, leave_out: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in leave_out:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_lm_folder_is_a_checkpoint_error_naming_it(llm_folder, tmp_path):
    """A truncated or missing model.safetensors fails on first use (the LM loads lazily) with a
    CheckpointError naming the folder; a folder without tokenizer files says to pass --tokenizer."""
    truncated = copy_folder(llm_folder, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_weights = copy_folder(llm_folder, tmp_path / "no-weights", leave_out=("model.safetensors",))
    for folder in (truncated, no_weights):
        pipe = SeedLlama.from_pretrained(folder, image_tokenizer="seed2_tiny")
        with pytest.raises(CheckpointError, match=f"cannot load the LM from {folder}"):
            _ = pipe.model
    no_tokenizer = copy_folder(llm_folder, tmp_path / "seed-llama-8b-sft",
                               leave_out=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(CheckpointError, match=rf"{no_tokenizer} holds no tokenizer files.*--tokenizer "
                                              "AILab-CVC/seed-tokenizer-2"):
        SeedLlama.from_pretrained(no_tokenizer)
    unreadable = copy_folder(llm_folder, tmp_path / "config-only-tokenizer", leave_out=("tokenizer.json",))
    with pytest.raises(CheckpointError, match=rf"from {unreadable}: no tokenizer.json.*tokenizer="):
        SeedLlama.from_pretrained(unreadable)  # transformers itself would blame sentencepiece or tiktoken


def test_a_forced_image_needs_room_for_33_new_tokens(tiny):
    """force_image puts <img> in the prompt: 32 codes + </img> must fit in the new tokens, else an
    InputError before generating; 33 gives exactly one well-formed image."""
    with pytest.raises(InputError, match=r"conversation 1 starts the answer with <img>, which needs 33 new tokens.*"
                                         r"max_new_tokens allows 32"):
        tiny.generate(["hi", "Draw a cat."], force_image=[False, True], max_new_tokens=32, decode_images=False)
    with pytest.raises(InputError, match="needs 33 new tokens"):  # a raw prompt ending in <img> is forced too
        tiny.chat("A cat.<img>", template="raw", max_new_tokens=20, decode_images=False)
    reply = tiny.chat("Draw a cat.", force_image=True, seed=0, max_new_tokens=33, decode_images=False)
    assert reply.errors == [] and len(reply.codes) == 1 and len(reply.token_ids) == 33
    n = tiny.prompt_ids(["Draw a cat."], force_image=True)["input_ids"].shape[1]
    with pytest.raises(InputError, match="needs 33 new tokens"):  # max_length counts the prompt
        tiny.chat("Draw a cat.", force_image=True, max_length=n + 32, decode_images=False)
    small = SeedLlama(tiny_llama(len(tiny.tokenizer)), tiny.tokenizer, "seed2_tiny")
    small.model.config.max_position_embeddings = n + 20  # the context trims the 512 new tokens to 20
    with pytest.raises(InputError, match="the LM's context allows 20"):
        small.chat("Draw a cat.", force_image=True, decode_images=False)


class Pause(LogitsProcessor):
    """Sleeps a little at every step, so that threads generating at once interleave."""

    def __call__(self, input_ids, scores):
        time.sleep(0.002)
        return scores


def test_seeded_calls_repeat_while_other_threads_generate(tiny):
    """torch's RNG is process-wide: seeded calls in two threads (and an unseeded one in a third) give
    what each gives alone, and unseeded calls still differ from each other."""
    settings = {"max_new_tokens": 16, "top_p": 1.0, "decode_images": False, "logits_processor": [Pause()]}
    alone = {s: tiny.chat("Tell me a story.", seed=s, **settings).token_ids.tolist() for s in (0, 1)}
    assert alone[0] != alone[1]
    got: dict[int, list] = {0: [], 1: [], -1: []}

    def seeded(s: int) -> None:
        for _ in range(3):
            got[s].append(tiny.chat("Tell me a story.", seed=s, **settings).token_ids.tolist())

    def unseeded() -> None:
        for _ in range(3):
            got[-1].append(tuple(tiny.chat("Tell me a story.", **settings).token_ids.tolist()))

    threads = [threading.Thread(target=seeded, args=(s,)) for s in (0, 1)] + [threading.Thread(target=unseeded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == [alone[0]] * 3 and got[1] == [alone[1]] * 3
    assert len(set(got[-1])) == 3


def test_chat_takes_one_message_and_an_empty_system_message_means_none(tiny):
    settings = {"do_sample": False, "max_new_tokens": 4, "decode_images": False}
    one = tiny.chat({"role": "user", "content": "hi"}, **settings)
    assert one.token_ids.tolist() == tiny.chat("hi", **settings).token_ids.tolist()
    pirate = SeedLlama(tiny.model, tiny.tokenizer, "seed2_tiny", system="You are a pirate.")
    assert pirate.prompts(["hi"]) == ["<s>You are a pirate.\nUSER: hi\nASSISTANT:"]
    assert pirate.prompts([[{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]]) == \
        ["<s>USER: hi\nASSISTANT:"]


class Fail(LogitsProcessor):
    def __call__(self, input_ids, scores):
        raise AssertionError("generation started")


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, "3", True])
def test_a_bad_seed_is_an_input_error_before_anything_loads(tiny, seed):
    pipe = SeedLlama(lambda: pytest.fail("the LM started loading"), tiny.tokenizer, "seed2_tiny")
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*63\), got"):
        pipe.chat("hi", seed=seed, max_new_tokens=2, decode_images=False)


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"temperature": 0.0}, "temperature must be a positive number when sampling, got 0.0"),
    ({"max_length": 3}, r"max_length=3 leaves no room for new tokens: conversation 0's prompt is \d+ tokens"),
    ({"num_return_sequences": 2, "do_sample": False}, "num_return_sequences=2 needs sampling"),
    ({"max_new_token": 5}, r"generation settings \(max_new_token\)"),  # a typo transformers rejects by name
], ids=["max_new_tokens=0", "max_new_tokens=2.5", "temperature=0", "max_length=3", "num_return_sequences=2",
         "typo"])
def test_bad_generation_settings_are_input_errors(tiny, settings, message):
    with pytest.raises(InputError, match=message):
        tiny.chat("hello there", decode_images=False, logits_processor=[Fail()], **settings)
