"""SEED-2 codes <-> LLM text and token ids, the SEED-LLaMA way.

One image is the text ``<img>`` + 32 code tokens ``<img_00012>`` (code zero-padded to 5 digits)
in causal order + ``</img>``, with no separators. In SEED-LLaMA's vocabulary the code token
``<img_k>`` has id ``32000 + k`` (`IMAGE_ID_SHIFT`); `add_image_tokens` adds the 8194 image
tokens to any Hugging Face tokenizer and returns their ids there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError

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


# --------------------------------------------------------------------------- constrained image spans
# (SEED-LLaMA generation, `seed.llama`; transformers is imported here, at the end, for this class only)

from transformers import LogitsProcessor  # noqa: E402


class ImageSpanConstraint(LogitsProcessor):
    """Makes every image span an LM generates well formed: ``<img>`` + 32 code tokens + ``</img>``.

    Per batch row, from the ids so far (prompt included, so an ``<img>`` forced at the end of the
    prompt counts): inside a span (the last ``<img>`` comes after the last ``</img>``), with k
    tokens after ``<img>``, only code tokens are allowed while k < 32, then only ``</img>``;
    outside a span, code tokens and ``</img>`` are not allowed. With ``max_length`` (the longest
    the sequences may grow, prompt included), ``<img>`` is not allowed when the span could not
    be finished in time. Disallowed tokens get a score of -inf. Pass it to
    ``model.generate(logits_processor=[...])``; transformers applies it before the sampling
    warpers (temperature, top-k/p), so sampling picks among allowed tokens only.
    """

    def __init__(self, image_ids: ImageTokenIds, max_length: int | None = None):
        self.boi, self.eoi = int(image_ids.boi), int(image_ids.eoi)
        self.codes = image_ids.codes.long()
        self.max_length = max_length
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
