"""SEED-LLaMA: multimodal chat and image generation with a causal LM that speaks SEED-2 codes.

`SeedLlama` composes three parts: a Hugging Face causal LM, its tokenizer (holding the image
tokens ``<img>``, ``</img>``, ``<img_00000>`` .. ``<img_08191>``; `seed.llm.add_image_tokens`
adds them to a tokenizer that lacks them) and a SEED-2 `seed.Tokenizer`. Images in a
conversation become ``<img>`` + 32 code tokens + ``</img>`` inline in the prompt, exactly as the
original SEED-LLaMA scripts build it, tokenized to the original stack's ids (`seed.llm.encode_text`); image spans the LM generates become codes, then pixels
through the SEED-2 decoder and Stable Diffusion 2.1 unCLIP.

A conversation is either one user turn (a ``str``, an image, or a list of such parts) or a list
of messages ``{"role": "system" | "user" | "assistant", "content": part | [parts]}``. A part is:

- text: a ``str`` or ``{"type": "text", "text": str}``;
- an image: a ``pathlib.Path``, PIL image, bytes, numpy array / uint8 tensor (anything
  `seed.Tokenizer.encode` takes), or ``{"type": "image", "image": x}`` (there a ``str`` is a path);
- codes: an integer tensor of 32 codes, or ``{"type": "image", "codes": [32 ints]}``.

A plain ``str`` part is always text, never a path.
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image

from . import llm
from .errors import CheckpointError, InputError
from .llm import BOI, EOI, NUM_CODES, NUM_IMAGE_TOKENS, ImageSpanConstraint, ImageTokenIds

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TEMPLATES = ("vicuna", "llama2", "chat", "raw")
"""Prompt templates: ``vicuna`` (SEED-LLaMA 8B: ``USER: ... ASSISTANT:``), ``llama2`` (14B:
``[INST] ... [/INST]``), ``chat`` (the tokenizer's own chat template), ``raw`` (bos + every turn's
contents concatenated, no role markers or separators: the original flask backend sends the request
text of a pre-trained, not instruction-tuned, model as bos + that text, and the original eval scripts
prompt text-to-image as bos + caption + ``<img>``)."""

DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 512, "do_sample": True, "temperature": 1.0, "top_p": 0.5,
                                      "num_beams": 1}
"""Generation settings of the original scripts (`seed_llama_inference_8B.py`); any may be overridden."""

SEED_LLAMA_TOKENIZER = "AILab-CVC/seed-tokenizer-2"
"""Where SEED-LLaMA's tokenizer lives on the Hub (LLaMA's SentencePiece model plus the image tokens)."""

TINY_LLAMA_TOKENIZER = Path(__file__).parent / "assets" / "tiny_llama_tokenizer"
"""The tokenizer of ``SeedLlama.from_pretrained("tiny")``: a real SentencePiece BPE model of 600 pieces
(``<unk>``/``<s>``/``</s>`` = 0/1/2, byte fallback) + the image tokens ``<img_k>`` = 600 + k, ``<img>`` =
8792, ``</img>`` = 8793, laid out like ``AILab-CVC/seed-tokenizer-2`` (the LLM training fixture's)."""

TINY_LLAMA: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
"""``LlamaConfig`` keyword arguments of the tiny random LLaMA (``vocab_size``: the tokenizer's)."""

_RNG_LOCK = threading.RLock()
"""Held around every ``model.generate`` of `SeedLlama.generate` (and `tiny_llama`'s seeded init): torch's
RNG is process-global, so a seeded call must not interleave with another draw, nor an unseeded one with
a seeded call's restore. Concurrent generate calls therefore run one at a time."""


def tiny_llama(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A tiny random ``LlamaForCausalLM`` (`TINY_LLAMA`, fp32, ~0.6M parameters), the same for the same
    ``seed`` and ``vocab_size``; the global RNG is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with _RNG_LOCK, torch.random.fork_rng(devices=[]):  # no seeded generate in another thread meanwhile
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TINY_LLAMA)).eval()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_PASS_TOKENIZER = (f"pass the LM's tokenizer with tokenizer= (the script: --tokenizer); SEED-LLaMA's is "
                   f"{SEED_LLAMA_TOKENIZER} (--tokenizer {SEED_LLAMA_TOKENIZER})")


def _load_tokenizer(source: str | Path, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source)``; a SentencePiece folder without sentencepiece or
    protobuf installed is a clear ImportError (transformers would blame tiktoken); a folder without
    tokenizer files, or one transformers cannot read, is a `CheckpointError` naming it."""
    from transformers import AutoTokenizer

    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"tokenizer: {folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}): "
                              + _PASS_TOKENIZER)
    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        missing = [m for m in ("sentencepiece", "google.protobuf") if not _installed(m)]
        if missing:
            raise ImportError(f"the tokenizer in {folder} is a SentencePiece model (tokenizer.model): it needs "
                              "sentencepiece and protobuf: pip install sentencepiece protobuf")
    try:
        return AutoTokenizer.from_pretrained(str(source), **({"local_files_only": True} if local_files_only else {}))
    except (OSError, ValueError) as e:  # ImportError is neither: a missing package stays an ImportError
        if "sentencepiece or tiktoken" in str(e):  # transformers found no vocabulary it can read
            e = f"no tokenizer.json, and no vocabulary transformers can convert; {_PASS_TOKENIZER}"
        raise CheckpointError(f"tokenizer: cannot load a tokenizer from {source}: {e}") from None


_TYPED_IMAGE_TOKEN = re.compile(re.escape(BOI) + "|" + re.escape(EOI) + r"|<img_\d{5}>")
_RESERVED = ("input_ids", "attention_mask", "inputs", "inputs_embeds")
"""``model.generate`` arguments `SeedLlama.generate` makes from the conversations itself."""

Part = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor, Mapping[str, Any]]
Conversation = Union[Part, Sequence[Part], Sequence[Mapping[str, Any]]]


@dataclass
class MalformedSpan:
    """An image span the LM generated that is not ``<img>`` + 32 code tokens + ``</img>``.

    Only possible with the constraint off (or a span cut short by ``max_new_tokens``). It stands
    in the reply's ``parts`` where the image would be; ``token_ids`` are the ids from ``<img>``
    (or the stray token) on, as generated.
    """

    reason: str
    token_ids: list[int]

    def __str__(self) -> str:
        return f"[malformed image span: {self.reason}]"


@dataclass
class Reply:
    """What the LM answered to one conversation.

    ``parts``: text (``str``), generated images (PIL, or the codes int64 [32] when
    ``decode_images=False``) and `MalformedSpan` markers, in the order generated.
    ``codes``: int64 [32] per well-formed generated image, in order (``codes[i]`` belongs to
    ``images[i]``). ``errors``: one message per malformed span. ``token_ids``: the generated
    ids (int64 [T], without the prompt, cut at the first EOS).

    A text part is its run of ids decoded on its own, as the original does
    (`seed.llm.decode_text`: ``decode(run, skip_special_tokens=True)``), so it never starts with
    the space its first token (``▁word``) stands for; ``spaced`` holds the indices of the parts
    where that space was dropped. `text` and `as_message` put it back where it matters.
    """

    parts: list[str | Image.Image | torch.Tensor | MalformedSpan]
    codes: list[torch.Tensor] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    token_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    spaced: frozenset[int] = field(default_factory=frozenset)

    @property
    def text(self) -> str:
        """The parts joined, each image (or malformed span) shown as ``<image>``; a text part right
        after an image keeps the space its first token stands for (``"<image> and a cat"``)."""
        out = []
        for i, p in enumerate(self.parts):
            if not isinstance(p, str):
                out.append("<image>")
            else:
                after_image = i > 0 and not isinstance(self.parts[i - 1], str)
                out.append(" " + p if after_image and i in self.spaced else p)
        return "".join(out)

    @property
    def images(self) -> list[Image.Image | torch.Tensor]:
        """The generated images (PIL; codes if not decoded), in order."""
        return [p for p in self.parts if not isinstance(p, (str, MalformedSpan))]

    def as_message(self) -> dict[str, Any]:
        """This reply as an assistant message for the next turn, as the original demo re-sends it:
        images as their codes, malformed spans dropped, every text part with the space its first
        token stands for (``" There are four dogs."``). The next prompt then holds the ids the
        original demo gives that history (with ``vicuna`` that is ``ASSISTANT:`` + ``▁`` + ``▁There``,
        one ``▁`` more than the LM generated; with ``llama2`` exactly the generated ids)."""
        content: list[Any] = []
        images = iter(self.codes)
        for i, p in enumerate(self.parts):
            if isinstance(p, str):
                content.append(" " + p if i in self.spaced else p)
            elif not isinstance(p, MalformedSpan):
                content.append(next(images))
        return {"role": "assistant", "content": content}


# --------------------------------------------------------------------------- conversations


@dataclass
class _Image:
    """An image part: ``source`` to encode, or ``codes`` (int64 [32]) already known."""

    source: Any = None
    codes: torch.Tensor | None = None


def _is_codes(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.uint8
            and x.numel() == NUM_IMAGE_TOKENS)


def _text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (``"\\ud83d"``, or an undecodable byte
    of a command line) is an `InputError`, not the tokenizer's RuntimeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: the text is not valid Unicode ({e.reason} at position {e.start}: "
                         f"{text[e.start]!r}); pass UTF-8 text") from None
    return text


def _part(p: Any, where: str) -> str | _Image:
    """One content part -> text (str) or `_Image`."""
    if isinstance(p, str):
        return _text(p, where)
    if _is_codes(p):
        return _Image(codes=llm._check_codes(p.flatten())[0])
    if isinstance(p, (os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)) \
            or hasattr(p, "read"):
        return _Image(source=p)
    if isinstance(p, Mapping):
        kind = p.get("type") or next((k for k in ("text", "image", "codes") if k in p), None)
        if kind == "text" and isinstance(p.get("text"), str):
            return _text(p["text"], where)
        if kind in ("image", "codes") and p.get("codes") is not None:
            try:
                return _Image(codes=llm._check_codes(p["codes"])[0])
            except InputError as e:
                raise InputError(f"{where}: bad codes: {e}") from None
        if kind == "image" and p.get("image") is not None:
            img = p["image"]
            return _part(Path(img) if isinstance(img, str) else img, where)
        raise InputError(f"{where}: a dict part needs 'text', 'image' or 'codes' (got keys {sorted(p)})")
    raise InputError(f"{where}: cannot use a {type(p).__name__} as a message part (text is a str; "
                     "an image a Path, PIL image, bytes or array; codes an integer tensor of 32)")


def _content(content: Any, where: str) -> list[str | _Image]:
    if isinstance(content, (list, tuple)):
        return [_part(p, f"{where}, part {i}") for i, p in enumerate(content)]
    return [_part(content, where)]


def _is_message(m: Any) -> bool:
    return isinstance(m, Mapping) and "role" in m


def normalize(conversation: Conversation, where: str = "conversation") -> list[tuple[str, list[str | _Image]]]:
    """A conversation -> [(role, parts)], roles in system/user/assistant, the last one "user"."""
    if isinstance(conversation, (list, tuple)) and conversation and all(_is_message(m) for m in conversation):
        messages = []
        for i, m in enumerate(conversation):
            role = m["role"]
            if role not in ("system", "user", "assistant"):
                raise InputError(f"{where}, message {i}: role must be system, user or assistant, got {role!r}")
            if role == "system" and i != 0:
                raise InputError(f"{where}, message {i}: a system message must come first")
            messages.append((role, _content(m.get("content", ""), f"{where}, message {i}")))
    elif isinstance(conversation, (list, tuple)) and any(_is_message(m) for m in conversation):
        raise InputError(f"{where}: mixes messages (dicts with a 'role') and bare parts")
    else:
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise InputError(f"{where} is empty")
        messages = [("user", _content(conversation, where))]
    if messages[-1][0] != "user":
        raise InputError(f"{where}: the last message must be the user's (got {messages[-1][0]!r})")
    return messages


def render(messages: Sequence[tuple[str, str]], template: str, tokenizer: PreTrainedTokenizerBase,
           force_image: bool = False) -> str:
    """Messages with their contents as text (images already ``<img>...</img>``) -> the prompt string.

    ``vicuna``: ``bos + "USER: " + content + "\\n" + ... + "ASSISTANT:"`` (assistant turns as
    ``"ASSISTANT: " + content + "\\n"``; a system message as ``system + "\\n"`` first).
    ``llama2``: ``bos + "[INST] " + content + " [/INST]" + "\\n"`` per user turn, ``content + "\\n"``
    per assistant turn (a system message as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n`` first). These are the
    original's prompts (scripts and demo ``conversation.py``); tokenize with ``add_special_tokens=False``.
    ``force_image`` appends ``<img>``.
    """
    bos = tokenizer.bos_token or ""
    if template == "vicuna":
        text = bos
        for role, c in messages:
            text += c + "\n" if role == "system" else {"user": "USER", "assistant": "ASSISTANT"}[role] + ": " + c + "\n"
        text += "ASSISTANT:"
    elif template == "llama2":
        text = bos
        for role, c in messages:
            if role == "system":
                text += f"<<SYS>>\n{c}\n<</SYS>>\n\n"
            else:
                text += ("[INST] " + c + " [/INST]" if role == "user" else c) + "\n"
    elif template == "raw":
        text = bos + "".join(c for _, c in messages)
    elif template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"template 'chat': the tokenizer ({type(tokenizer).__name__}) has no chat template; "
                             f"use one of {[t for t in TEMPLATES if t != 'chat']}")
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=True)
    else:
        raise InputError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    return text + BOI if force_image else text


# --------------------------------------------------------------------------- generated ids -> parts


def parse_generated(ids: Sequence[int], image_ids: ImageTokenIds, tokenizer: PreTrainedTokenizerBase,
                    with_spaced: bool = False) -> tuple[Any, ...]:
    """Generated ids -> parts (text str, codes int64 [32], `MalformedSpan`) and error messages
    (and, with ``with_spaced``, the indices of the text parts whose first token stands for a space
    the decode dropped: `Reply.spaced`).

    A span is ``<img>`` up to the next ``</img>``; it becomes codes only if it holds exactly 32
    code tokens (the demo backend's rule). A span with another length or a non-code token, an
    ``<img>`` never closed (or followed by another ``<img>``), and stray ``</img>`` or code tokens
    outside a span are reported, not raised. Each run of text ids between spans is decoded on its
    own as the original does (`seed.llm.decode_text`); a run that decodes to ``""`` is left out.
    """
    code_of = {int(t): k for k, t in enumerate(image_ids.codes.tolist())}
    parts: list[str | torch.Tensor | MalformedSpan] = []
    errors: list[str] = []
    text: list[int] = []
    spaced: set[int] = set()

    def flush() -> None:
        if text:
            s = llm.decode_text(tokenizer, text)
            if s:
                if llm.decode_text(tokenizer, text, keep_leading_space=True) != s:
                    spaced.add(len(parts))
                parts.append(s)
            text.clear()

    def bad(reason: str, span: list[int]) -> None:
        flush()
        parts.append(MalformedSpan(reason, span))
        errors.append(f"image {sum(not isinstance(p, str) for p in parts) - 1}: {reason}")

    ids = [int(t) for t in ids]
    i, n = 0, len(ids)
    while i < n:
        t = ids[i]
        if t == image_ids.boi:
            j = i + 1
            while j < n and ids[j] not in (image_ids.boi, image_ids.eoi):
                j += 1
            body = ids[i + 1:j]
            closed = j < n and ids[j] == image_ids.eoi
            codes = [code_of.get(b) for b in body]
            if not closed:
                why = "generation ended" if j == n else "another <img> came"
                bad(f"<img> without </img>: {why} after {len(body)} tokens", ids[i:j])
                i = j
                continue
            if len(body) == NUM_IMAGE_TOKENS and None not in codes:
                flush()
                parts.append(torch.tensor(codes, dtype=torch.long))
            else:
                others = sum(c is None for c in codes)
                bad(f"{len(body)} tokens between <img> and </img> ({others} not code tokens), "
                    f"not {NUM_IMAGE_TOKENS} code tokens", ids[i:j + 1])
            i = j + 1
        elif t == image_ids.eoi:
            bad("</img> without <img>", [t])
            i += 1
        elif t in code_of:
            j = i
            while j < n and ids[j] in code_of:
                j += 1
            bad(f"{j - i} code token(s) outside <img>...</img>", ids[i:j])
            i = j
        else:
            text.append(t)
            i += 1
    flush()
    return (parts, errors, frozenset(spaced)) if with_spaced else (parts, errors)


# --------------------------------------------------------------------------- the pipeline


def _lazy(value: Any) -> Callable[[], Any]:
    return value if callable(value) and not isinstance(value, torch.nn.Module) else (lambda: value)


class SeedLlama:
    """A causal LM + its tokenizer + a SEED-2 image tokenizer: conversations in, text and images out.

    ``model`` and ``image_tokenizer`` may be given as zero-argument callables: they are then
    called once, on first use, under a lock (`from_pretrained` does this: nothing heavy loads
    until a prompt needs it; a text-only chat never loads the image tokenizer, and unCLIP loads
    on the first generated image). ``tokenizer`` must hold the image tokens or is extended with
    them here (and the LM's embeddings resized, the new rows untrained).

    ``template``: see `TEMPLATES`. ``constrain_images``: the default of `generate`'s setting.
    """

    def __init__(self, model: PreTrainedModel | Callable[[], PreTrainedModel],
                 tokenizer: PreTrainedTokenizerBase,
                 image_tokenizer: Tokenizer | Callable[[], Tokenizer] | str | Path | DictConfig,
                 *, template: str = "vicuna", system: str | None = None, constrain_images: bool = True):
        if template not in TEMPLATES:
            raise InputError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
        self.tokenizer = tokenizer
        self.template = template
        self.random_weights = False
        """True when the LM's weights are random (``from_pretrained("tiny")``): say so in a UI."""
        self.system = system
        self.constrain_images = constrain_images
        n = len(tokenizer)
        self.image_ids: ImageTokenIds = llm.add_image_tokens(tokenizer)
        if len(tokenizer) > n:
            logger.warning("added %d image tokens to the tokenizer: the LM's embeddings of them are new, untrained",
                           len(tokenizer) - n)
        if tokenizer.pad_token is None:  # the original sets pad = unk
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if tokenizer.pad_token is None:
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}) has no pad, unk or eos token to pad with")
        self._load_model = _lazy(model)
        self.image_codes = "seed2"
        """The codes the LM speaks: "seed2", or "seed1" for an export that declared SEED-1 codes."""
        self.image_tokenizer_spec: Any = image_tokenizer if isinstance(image_tokenizer, (str, Path)) else None
        """What names the image tokenizer (a config name, folder or Hub id), when a name does."""
        self._load_image_tokenizer = _lazy(_image_tokenizer_loader(image_tokenizer))
        self._model: PreTrainedModel | None = None
        self._image_tokenizer: Tokenizer | None = None
        self._model_lock, self._image_lock = threading.Lock(), threading.Lock()

    @classmethod
    def from_pretrained(cls, llm_name: str | Path, *, tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
                        image_tokenizer: Tokenizer | str | Path | DictConfig | None = None,
                        template: str | None = None, system: str | None = None, constrain_images: bool = True,
                        torch_dtype: torch.dtype | str | None = None, device_map: str | Mapping | None = None,
                        load_in_8bit: bool = False, load_in_4bit: bool = False,
                        **model_kwargs: Any) -> SeedLlama:
        """SEED-LLaMA from a Hub id or folder (``AILab-CVC/seed-llama-8b-sft``, ``...-14b-sft``), any
        causal LM, or ``"tiny"``: a seeded random tiny LLaMA (`TINY_LLAMA`) with a real small
        SentencePiece tokenizer shipped with seed (`TINY_LLAMA_TOKENIZER`), for demos and tests;
        nothing is downloaded and ``random_weights`` is True.

        ``template``: default ``llama2`` for a name containing ``seed-llama-14b``, else ``vicuna``
        (SEED-LLaMA 8B, and ``tiny``).

        ``tokenizer``: a Hub id, folder or tokenizer object (default: ``llm_name``'s, or for
        ``AILab-CVC/seed-llama-*`` SEED-LLaMA's, `SEED_LLAMA_TOKENIZER`); loaded now. The LM loads
        on first use with ``torch_dtype`` (default fp16 on CUDA, fp32 on the CPU), ``device_map`` (e.g. ``"auto"``,
        needs accelerate) and ``load_in_8bit``/``load_in_4bit`` (bitsandbytes + accelerate:
        ``pip install 'seed[llama]'``; ``device_map`` then defaults to ``"auto"``); other keyword
        arguments go to ``AutoModelForCausalLM.from_pretrained``. ``image_tokenizer``: a
        `seed.Tokenizer`, a config (name such as ``"seed2_tokenizer"``, YAML path or DictConfig)
        or a `seed.Tokenizer.save_pretrained` folder / Hub id; loaded on first use (default
        ``"seed2_tokenizer"``, for ``tiny`` the random ``"seed2_tiny"``).

        An LLM folder holding ``image_tokenizer.json`` (an export of ``scripts/train_llama.py``, see
        `seed.provenance`) uses the image tokenizer recorded there by default (its own copy in
        ``image_tokenizer/``, or the config it names); an ``image_tokenizer`` passed that is another
        tokenizer (another variant, config or weights) is an `InputError` naming both. When the
        record names none (its codes had no provenance), or a local folder has no record and the
        default ``seed2_tokenizer`` cannot load, the first image fails asking for ``image_tokenizer=``.
        """
        if load_in_8bit and load_in_4bit:
            raise InputError("load_in_8bit and load_in_4bit exclude each other")
        quantized = load_in_8bit or load_in_4bit
        needs = (["bitsandbytes", "accelerate"] if quantized else []) + (["accelerate"] if device_map else [])
        missing = sorted({m for m in needs if importlib.util.find_spec(m) is None})
        if missing:
            what = "8-bit/4-bit loading" if quantized else f"device_map={device_map!r}"
            raise ImportError(f"{what} needs {' and '.join(missing)}: pip install 'seed[llama]'")
        tiny = isinstance(llm_name, str) and llm_name == "tiny"
        if template is None:
            template = "llama2" if "seed-llama-14b" in str(llm_name).lower() else "vicuna"
        if not tiny:
            _check_source(llm_name, "llm")
        image_tokenizer, image_codes = _export_image_tokenizer(llm_name, image_tokenizer, tiny)
        if isinstance(tokenizer, (str, Path)) or tokenizer is None:
            source = tokenizer if tokenizer is not None else (
                TINY_LLAMA_TOKENIZER if tiny else
                SEED_LLAMA_TOKENIZER if str(llm_name).startswith("AILab-CVC/seed-llama") else llm_name)
            _check_source(source, "tokenizer")
            tokenizer = _load_tokenizer(source, local_files_only=_hub_only(
                source, "llm" if str(source) == str(llm_name) else "tokenizer"))  # no network: fails at once
        if tiny:
            pipe = cls(lambda: tiny_llama(len(tokenizer)), tokenizer, image_tokenizer, template=template,
                       system=system, constrain_images=constrain_images)
            pipe.random_weights = True
            return pipe

        def load_model() -> PreTrainedModel:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            from .device import default_device

            device = default_device()
            dtype = torch_dtype if torch_dtype is not None else (
                torch.float16 if device.type == "cuda" else torch.float32)
            kwargs = dict(model_kwargs, dtype=dtype)
            if quantized:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                    bnb_4bit_compute_dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
            if device_map is not None or quantized:
                kwargs["device_map"] = device_map if device_map is not None else "auto"
            if _hub_only(llm_name, "llm"):  # no network: fails at once; unreachable but cached: the cache
                kwargs.setdefault("local_files_only", True)
            logger.info("loading the LM from %s (%s)", llm_name, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
            from safetensors import SafetensorError

            try:
                model = AutoModelForCausalLM.from_pretrained(str(llm_name), **kwargs)
            except (OSError, ValueError, SafetensorError) as e:  # ImportError (a missing package) stays
                raise CheckpointError(f"llm: cannot load the LM from {llm_name}: {e}") from None
            return model if "device_map" in kwargs else model.to(device)

        pipe = cls(load_model, tokenizer, image_tokenizer, template=template, system=system,
                   constrain_images=constrain_images)
        pipe.image_codes = image_codes
        return pipe

    # ----------------------------------------------------------------------- lazy parts

    @property
    def model(self) -> PreTrainedModel:
        """The causal LM, eval mode, embeddings covering every tokenizer id (loaded once, on first use)."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    model = self._load_model().eval()
                    rows = model.get_input_embeddings().num_embeddings
                    if rows < len(self.tokenizer):
                        logger.warning("resizing the LM's token embeddings from %d to %d (the new rows are untrained)",
                                       rows, len(self.tokenizer))
                        model.resize_token_embeddings(len(self.tokenizer))
                    self._model = model
        return self._model

    @property
    def image_tokenizer(self) -> Tokenizer:
        """The SEED-2 `seed.Tokenizer` (loaded once, on first use)."""
        if self._image_tokenizer is None:
            with self._image_lock:
                if self._image_tokenizer is None:
                    tok = self._load_image_tokenizer()
                    if getattr(tok, "variant", "seed2") != self.image_codes:
                        raise InputError(f"the image tokenizer is {tok.variant}; SEED-LLaMA speaks SEED-2 codes "
                                         "(configs/seed2_tokenizer.yaml)" if self.image_codes == "seed2" else
                                         f"the image tokenizer is {tok.variant}; this LM learned {self.image_codes} "
                                         "codes (its image_tokenizer.json)")
                    if tok.quantizer.codebook.weight.shape[0] != NUM_CODES:
                        raise InputError(f"the image tokenizer has {tok.quantizer.codebook.weight.shape[0]} codes; "
                                         f"SEED-LLaMA needs {NUM_CODES}")
                    self._image_tokenizer = tok
        return self._image_tokenizer

    def decode_images(self, codes: torch.Tensor, **settings: Any) -> list[Image.Image]:
        """Codes int64 [N,32] -> N PIL images through the image tokenizer's unCLIP decode (``settings``
        as `seed.Tokenizer.decode`; one sample per code sequence). unCLIP loads once, on first use
        (`seed.Tokenizer.diffusion`, thread-safe)."""
        return self.image_tokenizer.decode(codes, **{**settings, "num_samples": 1})

    # ----------------------------------------------------------------------- prompts

    def _image_texts(self, conversations: list[list[tuple[str, list[str | _Image]]]]) -> None:
        """Fill every `_Image`'s codes: all images to encode go through the image tokenizer at once."""
        pending = [p for conv in conversations for _, parts in conv for p in parts
                   if isinstance(p, _Image) and p.codes is None]
        if pending:
            codes = self.image_tokenizer.encode([p.source for p in pending]).cpu()
            for p, c in zip(pending, codes):
                p.codes = c

    def prompts(self, conversations: Sequence[Conversation], *, force_image: bool | Sequence[bool] = False,
                template: str | None = None, system: str | None = None) -> list[str]:
        """The prompt string of each conversation (images encoded to ``<img>...</img>``)."""
        convs = [normalize(c, f"conversation {i}") for i, c in enumerate(conversations)]
        forces = _per_row(force_image, len(convs), "force_image")
        self._image_texts(convs)
        system = system if system is not None else self.system
        out = []
        for i, (conv, force) in enumerate(zip(convs, forces)):
            for role, parts in conv:
                typed = [p for p in parts if isinstance(p, str) and _TYPED_IMAGE_TOKEN.search(p)]
                if typed:
                    logger.warning("conversation %d: %s text %r holds an image token: it is read as that token, "
                                   "as the original does", i, role, _TYPED_IMAGE_TOKEN.search(typed[0]).group())
            msgs = [(r, "".join(p if isinstance(p, str) else llm.codes_to_text(p.codes)[0] for p in parts))
                    for r, parts in conv]
            own_system = msgs[0][0] == "system"  # even an empty one: it means no system prompt
            msgs = [(r, c) for r, c in msgs if r != "system" or c]  # the original skips an empty system prompt
            if system and not own_system:
                msgs.insert(0, ("system", system))
            out.append(render(msgs, template or self.template, self.tokenizer, force))
        return out

    def prompt_ids(self, conversations: Sequence[Conversation], **kwargs: Any) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, int64 [B,L], left-padded with the pad id: each prompt
        tokenized as the original stack does (`seed.llm.encode_text`: no BOS/EOS added, the
        template holds them). ``kwargs`` as `prompts`."""
        rows = [llm.encode_text(self.tokenizer, p) for p in self.prompts(conversations, **kwargs)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            if r:
                ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[k, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # ----------------------------------------------------------------------- generation

    def chat(self, conversation: Conversation, **kwargs: Any) -> Reply:
        """One conversation -> its `Reply` (a lone message dict is a one-message conversation).
        ``kwargs`` as `generate`."""
        if _is_message(conversation):
            conversation = [conversation]
        return self.generate([conversation], **kwargs)[0]

    def generate(self, conversations: Sequence[Conversation], *, force_image: bool | Sequence[bool] = False,
                 template: str | None = None, system: str | None = None, constrain_images: bool | None = None,
                 decode_images: bool = True, decode: Mapping[str, Any] | None = None, seed: int | None = None,
                 logits_processor: Sequence[Any] | None = None, **generation: Any) -> list[Reply]:
        """Several independent conversations -> one `Reply` each, in one ``model.generate`` call.

        Prompts are left-padded; each conversation has its own images. ``force_image`` (one bool,
        or one per conversation) appends ``<img>`` to the prompt, so the answer is an image
        (the original's ``force_boi``). ``constrain_images`` (default: the pipeline's, on): an
        `ImageSpanConstraint` makes every generated span ``<img>`` + 32 codes + ``</img>``; off,
        malformed spans are reported in `Reply.errors`, never raised. ``generation``: settings for
        ``model.generate`` over `DEFAULT_GENERATION` (``do_sample``, ``temperature``, ``top_p``,
        ``max_new_tokens``, ...). ``seed``: seeds the sampling and, unless ``decode`` sets one,
        the image decode. ``decode``: settings of `seed.Tokenizer.decode` (``steps``,
        ``guidance_scale``, ``height``, ``width``, ``scheduler``, ``seed``); ``decode_images=False``
        leaves generated images as codes. With ``num_return_sequences=n``, replies ``i*n .. i*n+n-1``
        answer conversation ``i``.

        Checked before anything generates (`InputError`): ``seed`` an int in [0, 2**63); a forced image
        needs room for 33 new tokens (32 codes + ``</img>``); ``max_new_tokens`` >= 1, ``max_length``
        past the prompt, ``temperature`` > 0 when sampling, ``num_return_sequences`` > 1 only with
        sampling or as many beams; other settings transformers rejects by name are `InputError` too.
        torch's RNG is process-wide, so ``model.generate`` runs one call at a time (concurrent calls
        from several threads are serialized) and a seeded call repeats whatever other threads do.
        """
        from transformers import LogitsProcessorList

        if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
            raise InputError("generate takes a list of conversations; use chat() for one")
        if conversations and all(_is_message(m) for m in conversations):
            raise InputError("generate takes a list of conversations, and this is one conversation's messages: "
                             "use chat(messages) or generate([messages])")
        reserved = sorted(k for k in generation if k in _RESERVED)
        if reserved:
            raise InputError(f"generate makes {', '.join(reserved)} from the conversations itself: do not pass "
                             "them (call pipe.model.generate for ids of your own)")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
                raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
            seed = int(seed)
        if not conversations:
            return []
        settings = {"pad_token_id": self.tokenizer.pad_token_id, **DEFAULT_GENERATION, **generation}
        if not settings.get("do_sample"):
            for k in ("temperature", "top_p"):  # unused without sampling: keep generate from warning
                if k not in generation:
                    settings.pop(k, None)
        _check_settings(settings)
        forces = _per_row(force_image, len(conversations), "force_image")
        enc = self.prompt_ids(conversations, force_image=forces, template=template, system=system)
        # A prompt ending in <img> (forced, or a raw prompt "caption<img>") is answered by an image.
        forces = [f or bool(row[-1] == self.image_ids.boi) for f, row in zip(forces, enc["input_ids"].tolist())]
        model = self.model
        length = enc["input_ids"].shape[1]
        longest = int(enc["attention_mask"].sum(dim=1).argmax())
        if "max_length" in generation and "max_new_tokens" not in generation:
            settings.pop("max_new_tokens")
            max_length = generation["max_length"]
            if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length <= length:
                raise InputError(f"max_length={max_length!r} leaves no room for new tokens: conversation {longest}'s "
                                 f"prompt is {length} tokens (use max_new_tokens)")
            max_length = int(max_length)
        else:
            max_length = length + int(settings["max_new_tokens"])
        context = _context_length(model)
        if context is not None:
            if length >= context:
                raise InputError(f"conversation {longest} is {length} tokens long; the LM reads at most {context} "
                                 "(its config's max positions): shorten it or leave out old turns")
            if max_length > context:
                logger.warning("generating at most %d new tokens, not %d: the LM reads at most %d positions and the "
                               "prompt takes %d", context - length, max_length - length, context, length)
                settings.pop("max_length", None)
                settings["max_new_tokens"] = context - length
                max_length = context
        room, needed = max_length - length, NUM_IMAGE_TOKENS + 1  # the prompt holds <img>: 32 codes + </img>
        short = [i for i, f in enumerate(forces) if f]
        if short and room < needed:
            limit = "the LM's context" if context is not None and max_length == context else "max_new_tokens"
            raise InputError(f"conversation {short[0]} starts the answer with <img>, which needs {needed} new tokens "
                             f"(32 codes + </img>), but {limit} allows {room}: raise max_new_tokens (or max_length) "
                             "or shorten the prompt")
        processors = LogitsProcessorList(logits_processor or [])
        constrain = self.constrain_images if constrain_images is None else constrain_images
        if constrain:
            processors.append(ImageSpanConstraint(self.image_ids, max_length=max_length, prompt_length=length))
        device = model.device
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                  "logits_processor": processors}
        try:
            with _RNG_LOCK:  # torch's RNG is process-wide: one generate at a time (see _RNG_LOCK)
                if seed is None:  # unseeded: the global RNG draws (and moves on), so calls differ
                    out = model.generate(**inputs, **settings)
                else:  # seeded: repeatable, and the global RNG is left as it was
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.manual_seed(seed)
                        out = model.generate(**inputs, **settings)
        except ValueError as e:  # transformers' check of the settings, if it names one we were given
            named = [k for k in generation if re.search(rf"\b{re.escape(k)}\b", str(e))]
            if not named:
                raise
            raise InputError(f"generation settings ({', '.join(named)}): {e}") from None
        new = out[:, length:].cpu()
        eos = _eos_ids(model, self.tokenizer)
        per_prompt = new.shape[0] // len(forces)  # num_return_sequences: consecutive rows per conversation
        replies = []
        for row, force in zip(new, [f for f in forces for _ in range(per_prompt)]):
            ids = row.tolist()
            stop = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:stop]
            parts, errors, spaced = parse_generated(([self.image_ids.boi] if force else []) + ids, self.image_ids,
                                                    self.tokenizer, with_spaced=True)
            replies.append(Reply(parts=parts, codes=[p for p in parts if isinstance(p, torch.Tensor)],
                                 errors=errors, token_ids=torch.tensor(ids, dtype=torch.long), spaced=spaced))
        if decode_images:
            self._decode_into(replies, {**({"seed": seed} if seed is not None else {}), **(decode or {})})
        for r in replies:
            for e in r.errors:
                logger.warning("generated %s", e)
        return replies

    def _decode_into(self, replies: list[Reply], settings: Mapping[str, Any]) -> None:
        """Replace the codes parts of ``replies`` by PIL images, all decoded in one call."""
        codes = [c for r in replies for c in r.codes]
        if not codes:
            return
        images = iter(self.decode_images(torch.stack(codes), **settings))
        for r in replies:
            r.parts = [next(images) if isinstance(p, torch.Tensor) else p for p in r.parts]


def _check_settings(settings: Mapping[str, Any]) -> None:
    """The common bad generation settings, as `InputError` before anything runs: ``max_new_tokens`` < 1,
    ``temperature`` <= 0 when sampling, ``num_return_sequences`` > 1 that neither sampling nor enough
    beams can give."""
    def integer(key: str, low: int) -> int | None:
        v = settings.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low):
            raise InputError(f"{key} must be an integer >= {low}, got {v!r}")
        return v

    integer("max_new_tokens", 1)
    beams, n = integer("num_beams", 1) or 1, integer("num_return_sequences", 1) or 1
    sampling = bool(settings.get("do_sample"))
    t = settings.get("temperature")
    if sampling and t is not None and not (isinstance(t, numbers.Real) and 0 < t < float("inf")):
        raise InputError(f"temperature must be a positive number when sampling, got {t!r} (do_sample=False "
                         "for greedy decoding)")
    if n > 1 and not sampling and n > beams:
        raise InputError(f"num_return_sequences={n} needs sampling (do_sample=True) or at least as many beams "
                         f"(num_beams={beams})")


def _per_row(value: bool | Sequence[bool], n: int, name: str) -> list[bool]:
    if isinstance(value, (bool, int)):
        return [bool(value)] * n
    value = list(value)
    if len(value) != n:
        raise InputError(f"{name} has {len(value)} values for {n} conversations")
    return [bool(v) for v in value]


def _context_length(model: PreTrainedModel) -> int | None:
    """The most positions the LM reads (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})


def _check_source(name: str | Path, what: str) -> None:
    """A name that looks like a local path must exist (else it would be tried as a Hub id)."""
    s = str(name)
    looks_local = isinstance(name, Path) or s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep + os.sep in s
    if looks_local and not Path(s).expanduser().exists():
        raise CheckpointError(f"{what}: {s} does not exist (give a folder or a Hugging Face Hub id such as "
                              "AILab-CVC/seed-llama-8b-sft)")


def _export_image_tokenizer(llm_name: str | Path, given: Any, tiny: bool) -> tuple[Any, str]:
    """The image tokenizer of `SeedLlama.from_pretrained` and the codes' variant: an LLM folder's
    record (`seed.provenance`) decides the default and checks ``given``; otherwise ``given`` or the
    default (``seed2_tiny`` for tiny, ``seed2_tokenizer``), which for a local folder without a
    record fails at the first image with a message asking for ``image_tokenizer=``."""
    from . import provenance

    if tiny:
        return (given if given is not None else "seed2_tiny"), "seed2"
    folder = Path(str(llm_name)).expanduser()
    record = provenance.read_export_record(folder) if folder.is_dir() else None
    if record is None:
        if given is not None or not folder.is_dir():
            return (given if given is not None else "seed2_tokenizer"), "seed2"
        return _explained_loader("seed2_tokenizer", provenance.no_tokenizer_message(folder, None)), "seed2"
    codes = record.get("variant") or "seed2"
    chosen = provenance.export_image_tokenizer(folder, record, given)
    if chosen is None:
        message = provenance.no_tokenizer_message(folder, record)

        def refuse() -> Tokenizer:
            raise InputError(message)
        return refuse, codes
    return chosen, codes


def _explained_loader(spec: str, why: str) -> Callable[[], Tokenizer]:
    """Load ``spec``; if it cannot load (its weight files missing), say ``why`` it was assumed."""
    def load() -> Tokenizer:
        from .tokenizer import Tokenizer

        try:
            return Tokenizer.load(spec)
        except (CheckpointError, InputError, FileNotFoundError) as e:
            raise InputError(f"{why}. (The default {spec} did not load: {e})") from None
    return load


def _hub_only(name: str | Path, what: str) -> bool:
    """For a Hub id (not a folder): `seed.hub.hub_access` (fails at once without network and cache;
    True: read the cache only). A folder or a name that is no repo id: False."""
    from huggingface_hub.errors import HFValidationError

    from .hub import hub_access

    if isinstance(name, Path) or Path(str(name)).expanduser().exists():
        return False
    try:
        return hub_access(str(name), what)
    except HFValidationError:
        return False  # not a repo id: transformers says what is wrong with it


def _image_tokenizer_loader(spec: Any) -> Any:
    """A `seed.Tokenizer` as is; a config (name, YAML path, DictConfig) or folder / Hub id -> a loader."""
    from omegaconf import DictConfig

    if isinstance(spec, (DictConfig, str, Path)):
        def load() -> Tokenizer:
            from .tokenizer import Tokenizer

            return Tokenizer.load(spec)
        return load
    return spec
