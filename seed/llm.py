"""SEED-2 codes <-> LLM text and token ids, the SEED-LLaMA way.

One image is the text ``<img>`` + 32 code tokens ``<img_00012>`` (code zero-padded to 5 digits)
in causal order + ``</img>``, with no separators. In SEED-LLaMA's vocabulary the code token
``<img_k>`` has id ``32000 + k`` (`IMAGE_ID_SHIFT`); `add_image_tokens` adds the 8194 image
tokens to any Hugging Face tokenizer and returns their ids there. `encode_text` / `decode_text`
turn text into ids and back exactly as the original SEED-LLaMA stack (transformers 4.30.2's slow
LlamaTokenizer) does, for inference and training alike (rules: ``docs/seed_llama.md``).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError

logger = logging.getLogger(__name__)
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOI = "<img>"
"""Begin-of-image token."""
EOI = "</img>"
"""End-of-image token."""
IMAGE_TOKEN_FORMAT = "<img_{:05d}>"
"""The token of one code: ``IMAGE_TOKEN_FORMAT.format(12) == "<img_00012>"``."""
NUM_IMAGE_TOKENS = 32
"""Code tokens per image."""
NUM_CODES = 8192
"""Codebook size: codes are in ``[0, NUM_CODES)``."""
IMAGE_ID_SHIFT = 32000
"""SEED-LLaMA's token id of ``<img_k>`` is ``IMAGE_ID_SHIFT + k`` (LLaMA's 32000 text tokens come first)."""

_SPAN = re.compile(re.escape(BOI) + r"(.*?)" + re.escape(EOI), re.DOTALL)
_CODE = re.compile(r"<img_(\d{5})>")
_BODY = re.compile(r"\s*(?:<img_\d{5}>\s*)*")


def image_token(code: int) -> str:
    """The token string of one code, ``<img_00012>``."""
    return IMAGE_TOKEN_FORMAT.format(int(code))


def image_tokens() -> list[str]:
    """All `NUM_CODES` code token strings, in code order."""
    return [IMAGE_TOKEN_FORMAT.format(k) for k in range(NUM_CODES)]


def _check_codes(codes: Any) -> torch.Tensor:
    from .quantizer import check_codes

    return check_codes(codes, NUM_CODES, NUM_IMAGE_TOKENS)


def codes_to_text(codes: torch.Tensor | Sequence) -> list[str]:
    """Codes int [B,32] (or one sequence of 32) -> B strings ``<img><img_07170>...<img_02755></img>``.

    Exactly the text SEED-LLaMA's scripts build (363 characters per image). Raises `InputError`
    for codes that are not integers in ``[0, 8192)``, 32 per row.
    """
    codes = _check_codes(codes)
    return [BOI + "".join(IMAGE_TOKEN_FORMAT.format(c) for c in row) + EOI for row in codes.tolist()]


def text_to_codes(text: str, skip_invalid: bool = False) -> list[torch.Tensor]:
    """Every complete ``<img>...</img>`` span of ``text`` -> its codes, int64 [32] each, in order.

    A span must hold exactly 32 code tokens ``<img_ddddd>`` with codes below 8192 (whitespace
    between tokens is tolerated, anything else is not); otherwise it raises `InputError` naming
    the span and its position, or, with ``skip_invalid=True``, the span is left out. Text
    outside spans and an unterminated ``<img>`` at the end are ignored.
    """
    if not isinstance(text, str):
        raise InputError(f"text_to_codes takes a str, got {type(text).__name__}")
    out = []
    for n, m in enumerate(_SPAN.finditer(text)):
        body = m.group(1)
        codes = [int(c) for c in _CODE.findall(body)]
        why = None
        if not _BODY.fullmatch(body):
            why = "it holds text other than code tokens <img_ddddd>"
        elif len(codes) != NUM_IMAGE_TOKENS:
            why = f"it holds {len(codes)} code tokens, not {NUM_IMAGE_TOKENS}"
        elif any(c >= NUM_CODES for c in codes):
            why = f"code(s) {[c for c in codes if c >= NUM_CODES]} are not below {NUM_CODES}"
        if why is None:
            out.append(torch.tensor(codes, dtype=torch.long))
        elif not skip_invalid:
            shown = m.group(0) if len(m.group(0)) <= 80 else m.group(0)[:60] + "..." + m.group(0)[-15:]
            raise InputError(f"image span {n} (characters {m.start()}..{m.end()}) is invalid: {why}: {shown!r}")
    return out


def codes_to_token_ids(codes: torch.Tensor | Sequence) -> torch.Tensor:
    """Codes [B,32] -> SEED-LLaMA token ids int64 [B,32] (``code + 32000``; no ``<img>``/``</img>``)."""
    return _check_codes(codes) + IMAGE_ID_SHIFT


def token_ids_to_codes(ids: torch.Tensor | Sequence) -> torch.Tensor:
    """SEED-LLaMA code token ids [B,32] -> codes int64 [B,32]; an id outside 32000..40191 is an `InputError`."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point():
        raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
    ids = ids.long()
    bad = (ids < IMAGE_ID_SHIFT) | (ids >= IMAGE_ID_SHIFT + NUM_CODES)
    if bad.any():
        raise InputError(f"token ids {ids[bad].tolist()[:8]} are not code tokens "
                         f"[{IMAGE_ID_SHIFT}, {IMAGE_ID_SHIFT + NUM_CODES})")
    return _check_codes(ids - IMAGE_ID_SHIFT)


@dataclass(frozen=True)
class ImageTokenIds:
    """The ids of the image tokens in one tokenizer's vocabulary.

    ``boi``/``eoi``: ids of ``<img>``/``</img>``; ``codes``: int64 [8192], ``codes[k]`` is the
    id of ``<img_k>``. For SEED-LLaMA's own tokenizer ``codes[k] == 32000 + k``.
    """

    boi: int
    eoi: int
    codes: torch.Tensor

    def codes_to_ids(self, codes: torch.Tensor | Sequence, with_boi_eoi: bool = True) -> torch.Tensor:
        """Codes [B,32] -> token ids int64 [B,34] (``<img>`` codes ``</img>``) or [B,32] without them."""
        ids = self.codes[_check_codes(codes)]
        if not with_boi_eoi:
            return ids
        b = ids.shape[0]
        return torch.cat([ids.new_full((b, 1), self.boi), ids, ids.new_full((b, 1), self.eoi)], dim=1)

    def ids_to_codes(self, ids: torch.Tensor | Sequence[int], skip_invalid: bool = False) -> list[torch.Tensor]:
        """Every complete ``<img>`` ... ``</img>`` span of a 1-D id sequence -> codes int64 [32] each.

        A span must hold exactly 32 code token ids; otherwise `InputError` naming the span
        (its index and id positions), or with ``skip_invalid=True`` the span is left out.
        """
        ids = torch.as_tensor(ids).long().flatten().tolist()
        lookup = {int(t): k for k, t in enumerate(self.codes.tolist())}
        out, n, start = [], 0, None
        for pos, t in enumerate(ids):
            if t == self.boi:
                start = pos
            elif t == self.eoi and start is not None:
                body = ids[start + 1:pos]
                codes = [lookup.get(t) for t in body]
                if len(codes) == NUM_IMAGE_TOKENS and None not in codes:
                    out.append(torch.tensor(codes, dtype=torch.long))
                elif not skip_invalid:
                    nonimage = sum(c is None for c in codes)
                    raise InputError(f"image span {n} (ids {start}..{pos}) is invalid: it holds {len(body)} ids, "
                                     f"{nonimage} of them not code tokens; expected {NUM_IMAGE_TOKENS} code tokens")
                n, start = n + 1, None
        return out


def add_image_tokens(tokenizer: PreTrainedTokenizerBase) -> ImageTokenIds:
    """Add the SEED-LLaMA image tokens a Hugging Face tokenizer lacks; return their ids.

    Adds (as ordinary added tokens, kept when decoding) the 8192 ``<img_%05d>`` tokens, then
    ``<img>`` and ``</img>``; a token the vocabulary already has keeps its id. On LLaMA's 32000-token
    tokenizer this gives SEED-LLaMA's layout (``<img_k>`` = 32000 + k, then ``<img>``,
    ``</img>``). Resize the model's embeddings afterwards
    (``model.resize_token_embeddings(len(tokenizer))``). Raises `InputError` if a token does not
    encode to a single id.
    """
    wanted = image_tokens() + [BOI, EOI]
    # Also (re-)add those the vocabulary has as ordinary entries: they keep their id, and become
    # added tokens, so the pre-tokenizer no longer splits them ("<img>" -> "<", "img", ">").
    added = tokenizer.get_added_vocab()
    missing = [t for t in wanted if t not in added]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(wanted)
    for tok in (BOI, EOI, image_token(0), image_token(NUM_CODES - 1)):
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if enc != [ids[wanted.index(tok)]]:
            raise InputError(f"{type(tokenizer).__name__} does not encode {tok!r} as one token (got ids {enc})")
    return ImageTokenIds(boi=int(ids[-2]), eoi=int(ids[-1]), codes=torch.tensor(ids[:-2], dtype=torch.long))


# --------------------------------------------------------------------------- text <-> ids, the original's way


@dataclass
class _TokenRules:
    """What `encode_text` / `decode_text` need from one tokenizer (cached per tokenizer and size)."""

    size: int
    sp: Any  # sentencepiece.SentencePieceProcessor, or None: the fallback rule
    split: re.Pattern | None  # matches any added/special token, leftmost-longest
    ids: dict[str, int]  # added/special token -> id
    strip: dict[str, tuple[bool, bool]]  # token -> (strip the text on its left, on its right)
    skip: frozenset[int]  # ids `decode_text` drops: special tokens, <img>, </img>
    added_ids: frozenset[int]  # ids of added (not SentencePiece) tokens, decoded as their own string


_RULES: weakref.WeakKeyDictionary[Any, _TokenRules] = weakref.WeakKeyDictionary()


def _is_image_token(token: str) -> bool:
    return token in (BOI, EOI) or _CODE.fullmatch(token) is not None


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex matching any of ``words``, preferring the longest at a position (a trie, so it stays
    fast with the 8194 image tokens)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def pattern(node: dict) -> str:
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


def _sentencepiece(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The tokenizer's SentencePiece model if it has one whose ids are the tokenizer's, else None."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if not vocab_file or not str(vocab_file).endswith(".model"):
        return None
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("SentencePiece tokenizers (LLaMA's) need sentencepiece and protobuf: "
                          "pip install sentencepiece protobuf") from e
    from pathlib import Path

    if not Path(vocab_file).is_file():
        return None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
    # The ids must be the tokenizer's own (LLaMA: <unk> 0, <s> 1, </s> 2, pieces after).
    for tok, want in ((tokenizer.unk_token, sp.unk_id()), (tokenizer.bos_token, sp.bos_id())):
        if tok is not None and want >= 0 and tokenizer.convert_tokens_to_ids(tok) != want:
            return None
    if sp.get_piece_size() > len(tokenizer):
        return None
    return sp


def _rules(tokenizer: PreTrainedTokenizerBase) -> _TokenRules:
    size = len(tokenizer)
    try:
        cached = _RULES.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: no cache
        cached = None
    if cached is not None and cached.size == size:
        return cached
    sp = cached.sp if cached is not None else _sentencepiece(tokenizer)
    if sp is None and cached is None and "llama" in type(tokenizer).__name__.lower():
        logger.warning("%s has no SentencePiece model file (tokenizer.model next to its files): its ids follow "
                       "the fallback rule and may differ from the original SEED-LLaMA stack's", type(tokenizer).__name__)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    flags = {str(t): (bool(getattr(t, "lstrip", False)), bool(getattr(t, "rstrip", False))) for t in decoder.values()}
    tokens = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in tokens}
    # Image tokens strip the whitespace on both sides (the original's plain-string added tokens);
    # other tokens as their AddedToken says (an lstrip token eats the space on its left).
    strip = {t: (True, True) if _is_image_token(t) else flags.get(t, (False, False)) for t in tokens}
    special = {ids[t] for t in tokenizer.all_special_tokens} | {ids[t] for t in (BOI, EOI) if t in ids}
    rules = _TokenRules(size=size, sp=sp, split=re.compile(_trie_pattern(sorted(tokens))) if tokens else None,
                        ids=ids, strip=strip, skip=frozenset(special),
                        added_ids=frozenset(i for i in ids.values() if sp is None or i >= sp.get_piece_size()))
    try:
        _RULES[tokenizer] = rules
    except TypeError:  # not weak-referenceable: no cache
        pass
    return rules


def split_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """``text`` cut as the original cuts it before SentencePiece: the added/special tokens, and the
    text pieces between them with the whitespace next to image tokens stripped (empty pieces
    dropped). Tokens and text pieces alternate in order; tell them apart with ``piece in ids``."""
    r = _rules(tokenizer)
    pieces: list[str] = []
    pos = 0
    if r.split is not None:
        for m in r.split.finditer(text):
            pieces += [text[pos:m.start()], m.group()]
            pos = m.end()
    pieces.append(text[pos:])
    # As transformers 4.30 `PreTrainedTokenizer.tokenize`: left to right, each token strips its neighbours.
    for i in range(1, len(pieces), 2):
        left, right = r.strip[pieces[i]]
        if left:
            pieces[i - 1] = pieces[i - 1].rstrip()
        if right:
            pieces[i + 1] = pieces[i + 1].lstrip()
    return [p for p in pieces if p]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` as the original stack (transformers 4.30.2 slow LlamaTokenizer) gives
    them: split on every added/special token, strip whitespace next to image tokens, each
    remaining piece SentencePiece-encoded on its own; no BOS/EOS added.

    Nothing is escaped: ``"<img>"`` or ``"<s>"`` inside ``text`` are those tokens. A tokenizer
    without a SentencePiece model (BPE, GPT-2, ...) follows the same split and strip, and each text
    piece is encoded with ``tokenizer.encode(piece, add_special_tokens=False)``. Returns a list of
    int ids; raises `InputError` if ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise InputError(f"encode_text takes a str, got {type(text).__name__}")
    r = _rules(tokenizer)
    out: list[int] = []
    for piece in split_text(tokenizer, text):
        if piece in r.ids:
            out.append(r.ids[piece])
        elif r.sp is not None:
            out += r.sp.encode(piece)
        else:
            out += tokenizer.encode(piece, add_special_tokens=False)
    return out


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], keep_leading_space: bool = False) -> str:
    """The original's ``decode(ids, skip_special_tokens=True)``.

    Special tokens (``<unk>``, ``<s>``, ``</s>``, ``<img>``, ``</img>``) are dropped; each run of
    SentencePiece ids is decoded by SentencePiece (leading dummy-prefix space removed, bytes joined,
    invalid UTF-8 as U+FFFD); an added token (a code token ``<img_00012>``) stands as its string,
    joined to the runs with single spaces (transformers 4.30's ``spaces_between_special_tokens``);
    no clean-up of spaces. ``ids``: ints (or a 1-D tensor); an id outside the vocabulary is an
    `InputError`. A tokenizer without a SentencePiece model decodes with its own ``decode`` after
    the same tokens are dropped.

    ``keep_leading_space``: put back the space the first token stands for (``▁It`` -> ``" It"``),
    which decoding drops: what a run reads like in the middle of a longer text.
    """
    r = _rules(tokenizer)
    ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
    bad = [i for i in ids if not 0 <= i < r.size]
    if bad:
        raise InputError(f"token ids {bad[:8]} are outside the tokenizer's vocabulary [0, {r.size})")
    ids = [i for i in ids if i not in r.skip]
    text = _decode(tokenizer, r, ids)
    if keep_leading_space and ids and not text[:1].isspace():
        first = r.sp.id_to_piece(ids[0]) if r.sp is not None and ids[0] not in r.added_ids else \
            tokenizer.convert_ids_to_tokens(ids[0])
        if isinstance(first, str) and first.startswith("\u2581"):
            text = " " + text
    return text


def _decode(tokenizer: PreTrainedTokenizerBase, r: _TokenRules, ids: list[int]) -> str:
    if r.sp is None:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    texts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i in r.added_ids:
            if run:
                texts.append(r.sp.decode(run))
                run = []
            texts.append(tokenizer.convert_ids_to_tokens(i))
        else:
            run.append(i)
    if run:
        texts.append(r.sp.decode(run))
    return " ".join(texts)


# --------------------------------------------------------------------------- constrained image spans
# (SEED-LLaMA generation, `seed.llama`; transformers is imported here, at the end, for this class only)

from transformers import LogitsProcessor  # noqa: E402


class ImageSpanConstraint(LogitsProcessor):
    """Makes every image span an LM generates well formed: ``<img>`` + 32 code tokens + ``</img>``.

    Per batch row, from the ids so far: inside a span (the last ``<img>`` comes after the last ``</img>``), with k
    tokens after ``<img>``, only code tokens are allowed while k < 32, then only ``</img>``;
    outside a span, code tokens and ``</img>`` are not allowed. With ``max_length`` (the longest
    the sequences may grow, prompt included), ``<img>`` is not allowed when the span could not
    be finished in time. Disallowed tokens get a score of -inf. Pass it to
    ``model.generate(logits_processor=[...])``; transformers applies it before the sampling
    warpers (temperature, top-k/p), so sampling picks among allowed tokens only.

    ``prompt_length`` (the padded prompt length): only the generated ids and the prompt's last
    token (an ``<img>`` forced there counts) decide whether a span is open, so an ``<img>`` a user
    typed inside the prompt's text never makes the LM answer with a span's inside. Without it,
    the whole sequence counts.
    """

    def __init__(self, image_ids: ImageTokenIds, max_length: int | None = None, prompt_length: int | None = None):
        self.boi, self.eoi = int(image_ids.boi), int(image_ids.eoi)
        self.codes = image_ids.codes.long()
        self.max_length = max_length
        self.prompt_length = prompt_length
        self._is_code: torch.Tensor | None = None

    def _code_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        m = self._is_code
        if m is None or m.shape[0] != vocab or m.device != device:
            if int(self.codes.max()) >= vocab or max(self.boi, self.eoi) >= vocab:
                raise InputError(f"the LM scores {vocab} tokens but the image token ids go up to "
                                 f"{max(int(self.codes.max()), self.boi, self.eoi)}: resize its embeddings")
            m = torch.zeros(vocab, dtype=torch.bool, device=device)
            m[self.codes.to(device)] = True
            self._is_code = m
        return m

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` int64 [B,L], ``scores`` float [B,V] -> ``scores`` with disallowed tokens at -inf."""
        length = input_ids.shape[1]
        is_code = self._code_mask(scores.shape[1], scores.device)
        pos = torch.arange(1, length + 1, device=input_ids.device)
        if self.prompt_length:  # positions before the prompt's last token do not count
            pos = torch.where(pos >= self.prompt_length, pos, 0)
        last_boi = torch.where(input_ids == self.boi, pos, 0).amax(dim=1)  # 1-based; 0 if none
        last_eoi = torch.where(input_ids == self.eoi, pos, 0).amax(dim=1)
        in_span = (last_boi > last_eoi).to(scores.device)
        emitted = (length - last_boi).to(scores.device)  # tokens after the last <img>
        vocab = torch.arange(scores.shape[1], device=scores.device)
        outside = ~is_code & (vocab != self.eoi)
        if self.max_length is not None and length + NUM_IMAGE_TOKENS + 2 > self.max_length:
            outside = outside & (vocab != self.boi)  # no room left for <img> + 32 codes + </img>
        allowed = torch.where(
            in_span[:, None],
            torch.where((emitted < NUM_IMAGE_TOKENS)[:, None], is_code[None], (vocab == self.eoi)[None]),
            outside[None])
        return scores.masked_fill(~allowed, float("-inf"))
