"""seed.llm: codes <-> SEED-LLaMA text and token ids, and extending a real HF tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import fixtures
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from seed import InputError
from seed.llm import (
    BOI, EOI, IMAGE_ID_SHIFT, NUM_CODES, NUM_IMAGE_TOKENS, add_image_tokens, codes_to_text, codes_to_token_ids,
    text_to_codes, token_ids_to_codes,
)

SEED2 = fixtures("seed2")


@pytest.fixture(scope="module", params=SEED2, ids=[p.name for p in SEED2])
def expected(request):
    return torch.load(request.param / "expected.pt", weights_only=True)


def test_constants():
    assert (BOI, EOI, NUM_IMAGE_TOKENS, NUM_CODES, IMAGE_ID_SHIFT) == ("<img>", "</img>", 32, 8192, 32000)


def test_codes_to_text_matches_original(expected):
    """The original's text for the fixture's codes, character for character."""
    assert codes_to_text(expected["codes"]) == expected["llm_text"]
    assert all(len(t) == 363 for t in expected["llm_text"])


def test_codes_to_text_literal():
    codes = [8191] + [0] * 30 + [12]
    assert codes_to_text(codes) == ["<img><img_08191>" + "<img_00000>" * 30 + "<img_00012></img>"]


def test_text_to_codes_round_trip(expected):
    text = "USER: " + expected["llm_text"][0] + "what is this?\nASSISTANT: " + "".join(expected["llm_text"][1:])
    got = text_to_codes(text)
    assert len(got) == len(expected["llm_text"])
    assert torch.equal(torch.stack(got), expected["codes"])
    assert all(c.dtype == torch.int64 and c.shape == (32,) for c in got)


def test_token_ids_match_original(expected):
    assert torch.equal(codes_to_token_ids(expected["codes"]), expected["llm_image_token_ids"])
    assert torch.equal(token_ids_to_codes(expected["llm_image_token_ids"]), expected["codes"])


def span(codes) -> str:
    return "<img>" + "".join(f"<img_{c:05d}>" for c in codes) + "</img>"


@pytest.mark.parametrize("bad, why", [
    (span(range(31)), "31 code tokens"),
    (span(range(33)), "33 code tokens"),
    (span([8192] + [0] * 31), "8192"),
    ("<img>" + "<img_00001>" * 16 + "cat" + "<img_00001>" * 16 + "</img>", "other than code tokens"),
    ("<img>" + "<img_0001>" * 32 + "</img>", "other than code tokens"),
    ("<img></img>", "0 code tokens"),
])
def test_malformed_span_is_named(bad, why):
    good = span(range(32))
    with pytest.raises(InputError, match=rf"image span 1 \(characters {len(good) + 1}\.\..*{why}"):
        text_to_codes(good + " " + bad + good)
    got = text_to_codes(good + " " + bad + good, skip_invalid=True)
    assert [c.tolist() for c in got] == [list(range(32))] * 2


def test_incomplete_and_spaced_spans():
    codes = list(range(100, 132))
    assert text_to_codes("no image here") == []
    assert text_to_codes("<img><img_00001><img_00002>") == []  # unterminated: generation cut short
    spaced = "<img> " + " ".join(f"<img_{c:05d}>" for c in codes) + " </img>"
    assert text_to_codes(spaced)[0].tolist() == codes


@pytest.mark.parametrize("bad", [[0] * 31, [0.5] * 32, [-1] + [0] * 31, [8192] + [0] * 31])
def test_codes_to_text_refuses_bad_codes(bad):
    with pytest.raises(InputError):
        codes_to_text(bad)


def test_token_ids_to_codes_refuses_text_ids():
    with pytest.raises(InputError, match="not code tokens"):
        token_ids_to_codes([31999] + [32000] * 31)


def word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A real (tiny) fast tokenizer: word-level vocabulary, whitespace pre-tokenizer."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    model = HFTokenizerModel(WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def test_add_image_tokens_to_a_real_tokenizer(tmp_path, expected):
    tok = word_level_tokenizer(["USER:", "ASSISTANT:", "what", "is", "this", "?"])
    v = len(tok)
    ids = add_image_tokens(tok)
    assert len(tok) == v + NUM_CODES + 2
    assert ids.codes.tolist() == list(range(v, v + NUM_CODES))
    assert (ids.boi, ids.eoi) == (v + NUM_CODES, v + NUM_CODES + 1)

    codes = expected["codes"]
    prompt = "USER: " + codes_to_text(codes[:1])[0] + "what is this ?"
    enc = tok(prompt, add_special_tokens=False)["input_ids"]
    vocab = tok.get_vocab()
    assert enc == ([vocab["USER:"], ids.boi] + (codes[0] + v).tolist() + [ids.eoi]
                   + [vocab[w] for w in ("what", "is", "this", "?")])
    assert torch.equal(ids.codes_to_ids(codes[:1])[0], torch.tensor(enc[1:35]))
    assert torch.equal(torch.stack(ids.ids_to_codes(enc)), codes[:1])
    assert torch.equal(torch.stack(text_to_codes(tok.decode(enc))), codes[:1])

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    n = len(again)
    ids2 = add_image_tokens(again)  # all present: nothing added, same ids
    assert len(again) == n == len(tok)
    assert (ids2.boi, ids2.eoi) == (ids.boi, ids.eoi) and torch.equal(ids2.codes, ids.codes)


def test_add_image_tokens_only_missing_ones():
    tok = word_level_tokenizer(["hello", "<img>", "<img_00005>"])
    ids = add_image_tokens(tok)
    assert ids.boi == 2 and ids.codes[5] == 3
    assert len(tok) == 4 + NUM_CODES + 2 - 2
    assert ids.codes[:7].tolist() == [4, 5, 6, 7, 8, 3, 9] and ids.eoi == len(tok) - 1


def test_seed_llama_layout_on_a_32000_token_vocabulary():
    """On a LLaMA-sized vocabulary, <img_k> gets SEED-LLaMA's id 32000 + k; <img>, </img> follow."""
    tok = word_level_tokenizer([f"w{i}" for i in range(IMAGE_ID_SHIFT - 1)])
    ids = add_image_tokens(tok)
    assert torch.equal(ids.codes, torch.arange(NUM_CODES) + IMAGE_ID_SHIFT)
    assert (ids.boi, ids.eoi) == (40192, 40193)


def test_ids_to_codes_malformed_span():
    tok = word_level_tokenizer(["a"])
    ids = add_image_tokens(tok)
    good = ids.codes_to_ids(list(range(32)))[0].tolist()
    short = [ids.boi, *ids.codes[:31].tolist(), ids.eoi]
    with pytest.raises(InputError, match=r"image span 1 \(ids 35\.\.67\).*31 ids"):
        ids.ids_to_codes(good + [1] + short + good)
    assert len(ids.ids_to_codes(good + [1] + short + good, skip_invalid=True)) == 2
