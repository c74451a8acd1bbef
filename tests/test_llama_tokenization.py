"""SEED-LLaMA sees the token ids the original stack gave it (issue 16, section 1).

Every folder under ``tests/data/parity/seed_llama_tokenizer/`` is a fixture made by running the
ORIGINAL stack (AILab-CVC/SEED + transformers 4.30.2's slow LlamaTokenizer): a tokenizer folder laid
out like ``AILab-CVC/seed-tokenizer-2``, prompt cases (conversation -> prompt string -> input ids)
and decode cases (generated ids -> the original's decoded text). One test id per folder; a fixture
made the same way, dropped in beside it, is tested with no code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PARITY_ROOT
from transformers import AutoTokenizer, LlamaTokenizer, LogitsProcessor

from seed.llama import TINY_LLAMA_TOKENIZER, Reply, SeedLlama, parse_generated, tiny_llama
from seed.llm import decode_text, encode_text, split_text

FIXTURES = sorted(p for p in (PARITY_ROOT / "seed_llama_tokenizer").glob("*") if (p / "cases.json").is_file())


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.name for p in FIXTURES])
def fixture(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def cases(fixture) -> dict:
    return json.loads((fixture / "cases.json").read_text())


@pytest.fixture(scope="module")
def tok(fixture):
    """Loaded as users load AILab-CVC/seed-tokenizer-2: AutoTokenizer on the folder (tokenizer.model +
    added_tokens.json, no tokenizer.json)."""
    return AutoTokenizer.from_pretrained(fixture / "tokenizer")


def no_model():
    raise AssertionError("building prompts must not load the LM")


def test_fixture_tokenizer_loads_with_the_original_ids(tok, cases):
    ids = cases["ids"]
    assert (len(tok), tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (
        ids["len"], ids["unk"], ids["bos"], ids["eos"])
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<img_00000>", "<img_08191>"]) == [
        ids["boi"], ids["eoi"], ids["img_00000"], ids["img_08191"]]


@pytest.mark.parametrize("loader", [AutoTokenizer, LlamaTokenizer], ids=["AutoTokenizer", "LlamaTokenizer"])
def test_encode_text_gives_the_original_ids(fixture, cases, loader):
    """Every prompt string -> the original stack's ids, and the text pieces it handed SentencePiece."""
    tok = loader.from_pretrained(fixture / "tokenizer")
    wrong = [c["name"] for c in cases["prompts"] if encode_text(tok, c["prompt"]) != c["input_ids"]]
    assert wrong == []
    added = set(tok.get_added_vocab()) | set(tok.all_special_tokens)
    wrong = [c["name"] for c in cases["prompts"]
             if [p for p in split_text(tok, c["prompt"]) if p not in added] != c["sentencepiece_chunks"]]
    assert wrong == []


def test_seed_llama_prompts_and_ids_equal_the_original(tok, cases):
    """SeedLlama builds the original's prompt string and ids for every conversation of the fixture;
    a batch of them is the same ids, left-padded with the pad id (unk, as the original sets it)."""
    pipe = SeedLlama(no_model, tok, no_model)
    for template in sorted({c["template"] for c in cases["prompts"]}):
        group = [c for c in cases["prompts"] if c["template"] == template]
        convs, forces = [c["conversation"] for c in group], [c["force_image"] for c in group]
        assert pipe.prompts(convs, template=template, force_image=forces) == [c["prompt"] for c in group]
        enc = pipe.prompt_ids(convs, template=template, force_image=forces)
        width = max(len(c["input_ids"]) for c in group)
        assert enc["input_ids"].shape == enc["attention_mask"].shape == (len(group), width)
        for k, c in enumerate(group):
            n = len(c["input_ids"])
            assert enc["input_ids"][k, width - n:].tolist() == c["input_ids"], c["name"]
            assert enc["input_ids"][k, :width - n].eq(cases["ids"]["pad"]).all()
            assert enc["attention_mask"][k].tolist() == [0] * (width - n) + [1] * n


def test_replies_decode_as_the_original(tok, cases):
    """Generated ids -> reply parts equal the original's per-run decode and codes; decode_text is the
    original's decode(skip_special_tokens=True); Reply.text of a text-only reply is what the
    original script prints, and text after an image keeps its word's space."""
    pipe = SeedLlama(no_model, tok, no_model)
    for c in cases["decodes"]:
        parts, errors, spaced = parse_generated(c["ids"], pipe.image_ids, tok, with_spaced=True)
        assert errors == [], c["name"]
        want = [p["text"] if "text" in p else p["codes"] for p in c["parts"]]
        assert [p if isinstance(p, str) else p.tolist() for p in parts] == want, c["name"]
        for p in c["parts"]:
            if "text" in p:
                assert decode_text(tok, p["ids"]) == p["text"], c["name"]
        reply = Reply(parts=parts, spaced=spaced)
        if all("text" in p for p in c["parts"]):
            assert reply.text == c["script_text"], c["name"]
        # An image, then text whose first generated token is a word start: one space between them.
        shown, at = "", 0
        for k, p in enumerate(c["parts"]):
            if "codes" in p:
                at = c["ids"].index(cases["ids"]["eoi"], at) + 1
                shown += "<image>"
            else:
                at = next(i for i in range(at, len(c["ids"])) if c["ids"][i:i + len(p["ids"])] == p["ids"])
                word_start = c["tokens"][at].startswith("\u2581")
                shown += (" " if k and "codes" in c["parts"][k - 1] and word_start else "") + p["text"]
                at += len(p["ids"])
        assert reply.text == shown, c["name"]


class Script(LogitsProcessor):
    """Makes the LM generate ``script`` (then EOS) after a prompt of ``start`` ids."""

    def __init__(self, start: int, script: list[int], eos: int):
        self.start, self.script, self.eos = start, script, eos

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[k] if k < len(self.script) else self.eos] = 0
        return forced


def replayable(cases: dict) -> list[tuple[dict, list[int]]]:
    """The multi-turn cases whose one assistant answer an LM can be made to generate: a single image
    (its code ids), or a text that a decode case holds as generated ids (the same sentence)."""
    texts = {d["script_text"]: d["ids"] for d in cases["decodes"] if all("text" in p for p in d["parts"])}
    out = []
    for c in cases["prompts"]:
        roles = [m["role"] for m in c["conversation"]]
        if roles != ["user", "assistant", "user"] or c["force_image"] or len(c["conversation"][1]["content"]) != 1:
            continue
        said = c["conversation"][1]["content"][0]
        if said["type"] == "image":
            ids = cases["ids"]
            out.append((c, [ids["boi"], *[ids["image_id_shift"] + x for x in said["codes"]], ids["eoi"]]))
        elif said["text"].lstrip() in texts:
            out.append((c, texts[said["text"].lstrip()]))
    return out


def test_reply_fed_back_gives_the_original_demos_history_ids(tok, cases):
    """A generated answer, fed back with Reply.as_message(), gives the next prompt the ids the
    original demo gave that history (the fixture's multi-turn cases)."""
    found = replayable(cases)
    assert found  # the dev case set has a text answer and an image answer
    lm = tiny_llama(len(tok))
    for case, script in found:
        user, _, follow_up = case["conversation"]
        pipe = SeedLlama(lm, tok, no_model, template=case["template"])
        start = pipe.prompt_ids([[user]])["input_ids"].shape[1]
        reply = pipe.chat([user], do_sample=False, max_new_tokens=len(script) + 1, decode_images=False,
                          logits_processor=[Script(start, script, tok.eos_token_id)])
        assert reply.token_ids.tolist() == script
        ids = pipe.prompt_ids([[user, reply.as_message(), follow_up]])["input_ids"][0].tolist()
        assert ids == case["input_ids"], case["name"]


# --------------------------------------------------------------------------- the tiny tokenizer shipped with seed

# The original stack's ids for two texts on this tokenizer (the LLM training fixture's tokenized segments).
TINY_CODES = [0, 4271, 6950, 4946, 6705, 3857, 1709, 1665, 4120, 4331, 2428, 1564, 4091, 2306, 2141, 6174, 1530,
              4519, 6, 7075, 7354, 6597, 5658, 2034, 6499, 1555, 5204, 8060, 1243, 5488, 973, 8191]
TINY_CASES = [
    ("<s>A man in a dark coat looks through a camera on a tripod.<img>"
     + "".join(f"<img_{c:05d}>" for c in TINY_CODES) + "</img></s>",
     [1, 272, 352, 286, 260, 289, 385, 328, 277, 436, 561, 457, 260, 273, 461, 511, 305, 260, 259, 303, 547, 569,
      8792, *[600 + c for c in TINY_CODES], 8793, 2]),
    ("USER: Can you show me an illustration of two dogs running on the beach?\nASSISTANT:",
     [434, 584, 417, 429, 266, 518, 407, 275, 262, 311, 568, 325, 563, 277, 560, 301, 282, 427, 419, 561, 491, 401,
      274, 305, 263, 267, 366, 308, 581, 13, 576, 357, 439, 584]),
]


def test_tiny_seed_llama_is_random_and_speaks_the_original_ids():
    pipe = SeedLlama.from_pretrained("tiny")
    assert pipe.random_weights and pipe.template == "vicuna" and pipe._model is None
    assert Path(pipe.tokenizer.vocab_file).parent == TINY_LLAMA_TOKENIZER
    assert (pipe.image_ids.boi, pipe.image_ids.eoi, pipe.image_ids.codes[0].item()) == (8792, 8793, 600)
    for text, ids in TINY_CASES:
        assert encode_text(pipe.tokenizer, text) == ids
    assert pipe.model.get_input_embeddings().num_embeddings == len(pipe.tokenizer) == 8794
    again = SeedLlama.from_pretrained("tiny")
    assert torch.equal(again.model.lm_head.weight, pipe.model.lm_head.weight)  # seeded: the same tiny LM
