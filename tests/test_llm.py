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
    decode_text, encode_text, text_to_codes, token_ids_to_codes,
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


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A real (tiny) GPT-2-style tokenizer: byte-level BPE (spaces are part of the next token, ``Ġ``)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    model = HFTokenizerModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(["USER: what is this? ASSISTANT: a cat on a mat."] * 4,
                              trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                  show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_encode_and_decode_text_without_sentencepiece_split_strip_and_encode_each_piece():
    """A tokenizer without a SentencePiece model: the text is cut at every added/special token, the
    whitespace next to image tokens stripped, each piece encoded by the tokenizer on its own; decoding
    drops the special tokens and <img>/</img> and keeps code tokens as text."""
    tok = byte_level_tokenizer()
    ids = add_image_tokens(tok)
    eos = tok.eos_token_id

    def own(piece: str) -> list[int]:
        return tok(piece, add_special_tokens=False)["input_ids"]

    text = "<|endoftext|>USER: " + span([5] * 32) + "\n what is this?<|endoftext|> a cat"
    assert encode_text(tok, text) == ([eos] + own("USER:") + [ids.boi] + [ids.codes[5].item()] * 32 + [ids.eoi]
                                      + own("what is this?") + [eos] + own(" a cat"))
    assert encode_text(tok, "") == [] and encode_text(tok, "  ") == own("  ")
    assert decode_text(tok, [eos, *own(" a cat"), ids.boi, ids.eoi]) == " a cat"
    assert decode_text(tok, own("a cat") + [ids.codes[7].item()]).replace(" ", "") == "acat<img_00007>"
    with pytest.raises(InputError, match="outside the tokenizer's vocabulary"):
        decode_text(tok, [len(tok)])
    with pytest.raises(InputError, match="takes a str"):
        encode_text(tok, ["a"])


def test_decode_text_keeps_the_leading_space_on_request():
    """SentencePiece / Metaspace drop the space a run's first ``▁word`` stands for; it can be kept."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    model = HFTokenizerModel(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.train_from_iterator(["and a cat on a mat"] * 4, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    words = tok.convert_tokens_to_ids(["\u2581and", "\u2581a", "\u2581cat"])
    assert tok.unk_token_id not in words
    assert decode_text(tok, words) == "and a cat"
    assert decode_text(tok, words, keep_leading_space=True) == " and a cat"
    assert decode_text(tok, words[1:] + words[:1], keep_leading_space=True) == " a cat and"
