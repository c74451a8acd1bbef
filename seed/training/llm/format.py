"""SEED-LLaMA training samples, formatted exactly as the original (spec sections 6-8).

One function per sample kind (`FORMATTERS`) turns a row (the original's pickle payload, or one of
our JSONL layouts) into a `Plan`: the strings and image spans the original tokenizes, each marked
learned or not. `SampleEncoder.encode` then tokenizes a plan with `seed.llm.encode_text` (the ONE
implementation of the original stack's tokenization) and applies the original's truncation and
labels; `collate` right-pads a list of them into tensors, `collate_packed` packs them whole
into rows (position ids restarting at 0 for each sample).

Random choices are made by a `Draws` (Python's ``random`` for indices and choices, numpy's legacy
generator for uniforms, drawn in the original's order, so a `RandomDraws` seeded like the
original's global generators makes the original's decisions), unless the caller passes them in
``decisions`` (keys: ``image_first``, ``swap_pairs``, ``branch``, ``prompt_index``,
``response_index``, ``layout``, as the parity fixture records them); every formatter returns the
decisions it used in `Plan.decisions`.

A formatter returns None for a sample the original drops (blank caption or text, a malformed
interleaved document, a visual question without data) and raises `seed.InputError` where the
original crashes (a qa sample without ``question`` on the answer branch, a difference sample whose
draw leaves no layout, an edit sample without ``source_image_ids``) or the row is not what the
kind needs.
"""

from __future__ import annotations

import random
import weakref
from itertools import chain
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ...errors import InputError
from ...llm import BOI, EOI, IMAGE_TOKEN_FORMAT, NUM_CODES, encode_text

USER = "USER:"
ASSISTANT = "ASSISTANT:"
SEP = "\n"
FILTER_STRIP = " ;,[]{}'\".?:"
"""A caption or text made only of these characters is dropped (the original's ``filter_flag``)."""

GEN_PROMPT = [
    "Please show me a picture of", "Please design an image of", "Please produce a photo of",
    "Please generate an image of", "Please draw a painting of", "I'd like to see a drawing of",
    "I'd love to see an illustration of", "I'd like to view an image of", "I want to see a picture of",
    "I would like to see a photo of", "Show me a photo of", "Generate a picture of", "Show me a photograph of",
    "Generate an image of", "Can you make an image of", "Can you draw a painting of",
    "Can you produce a picture of", "Can you generate a photo of", "Can you depict a picture of",
    "Can you show me an illustration of"]
GEN_RESPONSE = [
    "Here is a picture.", "I have designed an image.", "Here is a photo.", "I have generated an image.",
    "Here's a painting.", "Here's a drawing.", "Enjoy this illustration.", "Take a look at this image.",
    "Here is a picture.", "I have created a photo.", "Enjoy this photo.", "I have generated a picture.",
    "Here is a photograph.", "Here's an image.", "Certainly, here's an image.", "Absolutely, here is a painting.",
    "Sure, here is a picture.", "Of course, here is a photo.", "Certainly, please enjoy this picture.",
    "Sure, please enjoy this illustration."]
EDIT_RESPONSE = [
    "Here is a picture.", "I have created an image.", "Enjoy this picture.", "I have generated an image.",
    "Here's a picture.", "Here's an image.", "Certainly, here's an image.", "Sure, here is a picture."]
STORY_PROMPT = [
    "Can you use images and texts to tell me what will happen next?",
    "Would you utilize pictures and texts to show me the following story?",
    "Can you show me with images and texts what will occur then?",
    "Can you tell me the following event using images and written descriptions?",
    "Can you use images and texts to express to me the forthcoming happenings?",
    "Please use images and text to inform me what will happen next.",
    "Through pictures and text, let me know what will happen later.",
    "Show me with images and texts what will occur then.",
    "Please utilize pictures and descriptions to tell me what will happen subsequently.",
    "Please generate the following story using both images and texts."]
STORY_RESPONSE = [
    "Sure, let me tell you what will happen next using images and texts.",
    "I would be happy to utilize pictures and texts to show you the following story.",
    "Certainly, I can show you with images and texts what will occur then.",
    "Of course! Let me tell you the following event using images and written descriptions.",
    "Sure, here are images and texts to let you know the forthcoming happenings.",
    "Here are images and text to inform you what will happen next.",
    "Please see the pictutres and text to know what will happen later.",
    "Here are images and texts for you to know what will occur then.",
    "Let me show you what will happen subsequently with pictures and descriptions.",
    "I have generated the following story using both images and texts."]
STORY_REQUEST_SUFFIX = " Please generate an image."
STORY_RESPONSE_PER_IMAGE = "Here is an image."
DIFFERENCE_RENAMES = [("image a", "the first image"), ("image A", "the first image"),
                      ("image b", "the second image"), ("image B", "the second image")]
VIDEO_NOISE_MARKER = "\nQA_GT_caption_based_noisy"


class OptionError(InputError):
    """A formatter option that cannot work for any row (e.g. a ``caption_prompt`` without ``{}``):
    the source's config is wrong, not one row."""


# --------------------------------------------------------------------------- draws


class Draws(Protocol):
    """The random draws a formatter may make, in the original's order and kinds."""

    def uniform(self) -> float:
        """``np.random.uniform(0, 1)``."""

    def randint(self, a: int, b: int) -> int:
        """``random.randint(a, b)`` (both ends included)."""

    def choice(self, seq: Sequence[Any]) -> Any:
        """``random.choice(seq)``."""


class RandomDraws:
    """Draws from a Python ``random.Random`` and a numpy legacy ``RandomState``, both seeded with
    ``seed``: seeded like the original's global generators, it makes the original's decisions.
    `state_dict` / `load_state_dict` (JSON-able) continue the stream exactly."""

    def __init__(self, seed: int):
        self.py = random.Random(seed)
        self.np = np.random.RandomState(seed % 2**32)

    def uniform(self) -> float:
        return float(self.np.uniform(0, 1))

    def randint(self, a: int, b: int) -> int:
        return self.py.randint(a, b)

    def choice(self, seq: Sequence[Any]) -> Any:
        return self.py.choice(seq)

    def state_dict(self) -> dict:
        version, internal, gauss = self.py.getstate()
        name, keys, pos, has_gauss, cached = self.np.get_state()
        return {"py": [version, list(internal), gauss],
                "np": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}

    def load_state_dict(self, state: Mapping) -> None:
        version, internal, gauss = state["py"]
        self.py.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["np"]
        self.np.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _decide(decisions: Mapping | None, key: str, draw: Callable[[], Any] | None) -> Any:
    if decisions is not None and key in decisions:
        return decisions[key]
    if draw is None:
        raise InputError(f"decision {key!r} is needed: pass it in decisions or give a Draws")
    return draw()


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Image:
    """An image span ``<img>`` + one ``<img_%05d>`` per code + ``</img>`` (a video frame may hold
    fewer than 32 codes, even none, as the original cuts frames)."""

    codes: tuple[int, ...]


Part = str | Image


@dataclass
class Plan:
    """A sample before tokenization.

    ``segments``: ``(parts, learned)``; each segment's parts are tokenized as ONE string (the
    original's one ``tokenizer(...)``/``encode`` call). ``one_string``: the pretraining rule
    (``bos + segment + eos`` tokenized together, labels = ids with the pad id masked, bos
    learned); otherwise the SFT rule (``[bos] + ids + [eos]``, labels -100 on bos and every
    unlearned id, eos learned). ``decisions``: the random decisions taken.
    """

    segments: list[tuple[list[Part], bool]]
    one_string: bool = False
    decisions: dict[str, Any] = field(default_factory=dict)


_INT = {int}


def _codes(value: Any, where: str, count: int | None = 32) -> tuple[int, ...]:
    """A list of ints in [0, NUM_CODES) (of ``count`` items when given) -> a tuple."""
    if isinstance(value, np.ndarray) or hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not set(map(type, value)) <= _INT:
        raise InputError(f"{where}: codes must be a list of ints, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise InputError(f"{where}: {len(value)} codes, expected {count}")
    if value and (min(value) < 0 or max(value) >= NUM_CODES):
        raise InputError(f"{where}: codes must be in [0, {NUM_CODES}), got {min(value)}..{max(value)}")
    return tuple(value)


def _get(row: Mapping, key: str, kind: str, types: type | tuple = str) -> Any:
    if not isinstance(row, Mapping):
        raise InputError(f"a {kind} sample must be a dict, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise InputError(f"a {kind} sample needs {key!r} (it has {sorted(map(str, row))})")
    value = row[key]
    if not isinstance(value, types):
        raise InputError(f"{kind} sample: {key!r} must be {getattr(types, '__name__', types)}, got {type(value).__name__}")
    return value


def _period(text: str) -> str:
    """The original's answer rule: strip, then add ``.`` unless it ends with one."""
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _blank(text: str) -> bool:
    return text.strip(FILTER_STRIP) == ""


def _sft(turns: Sequence[tuple[list[Part], list[Part]]], prefix: list[Part] | None = None, **decisions: Any) -> Plan:
    segments: list[tuple[list[Part], bool]] = [(prefix, False)] if prefix else []
    for prompt, answer in turns:
        segments += [(prompt, False), (answer, True)]
    return Plan(segments, one_string=False, decisions=decisions)


def _turn(first: bool, *content: Part) -> list[Part]:
    """``USER: content\\nASSISTANT:`` (a later turn starts with the separator)."""
    return [("" if first else SEP) + USER + " ", *content, SEP + ASSISTANT]


# --------------------------------------------------------------------------- pretraining kinds


def format_caption(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5,
                   caption_prompt: str | Sequence[str] | None = None, use_caption_in_metadata: bool = False,
                   caption_key_in_metadata: str = "", mask_left_label: bool = False,
                   decisions: Mapping | None = None) -> Plan | None:
    """An image-caption pair (``image_ids``, ``text``): ``<s>`` + IMG + caption + ``</s>`` when
    the image comes first (P = ``reverse_ratio``), else ``<s>`` + caption + IMG + ``</s>``; all
    learned. None if the text is blank (only ``FILTER_STRIP`` characters)."""
    if mask_left_label:
        raise InputError("caption: mask_left_label is not supported (off in every original config)")
    codes = _codes(_get(row, "image_ids", "caption", (list, tuple)), "caption: image_ids")
    if use_caption_in_metadata:
        text = _get(_get(row, "metadata", "caption", Mapping), caption_key_in_metadata, "caption metadata")
    else:
        text = _get(row, "text", "caption")
    prompts = [caption_prompt or "{}"] if caption_prompt is None or isinstance(caption_prompt, str) else list(caption_prompt)
    if rng is None and len(prompts) == 1:
        index = 0
    else:
        index = _decide(decisions, "prompt_index", rng and (lambda: prompts.index(rng.choice(prompts))))
    try:
        caption = prompts[index].format(text)
    except (IndexError, KeyError, ValueError, AttributeError) as e:
        raise OptionError(f"caption_prompt {prompts[index]!r}: must be a str holding one '{{}}' for the caption "
                          f"({type(e).__name__}: {e})") from None
    image_first = bool(_decide(decisions, "image_first", rng and (lambda: rng.uniform() < reverse_ratio)))
    if _blank(text):
        return None
    parts: list[Part] = [Image(codes), caption] if image_first else [caption, Image(codes)]
    return Plan([(parts, True)], one_string=True, decisions={"image_first": image_first})


def format_mmc4(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5, max_images: int | None = None,
                decisions: Mapping | None = None) -> Plan | None:
    """An interleaved document (``image_ids``/``texts``: aligned lists, one of the two set per
    position): with P = ``reverse_ratio`` each image trades places with the element after it;
    ``<s>`` + elements + ``</s>`` with no separators, at most ``max_images`` images (and the text
    after the last one). None if a position reached holds both or neither."""
    images = list(_get(row, "image_ids", "mmc4", (list, tuple)))
    texts = list(_get(row, "texts", "mmc4", (list, tuple)))
    if len(images) != len(texts):
        raise InputError(f"mmc4 sample: image_ids ({len(images)}) and texts ({len(texts)}) differ in length")
    swap = bool(_decide(decisions, "swap_pairs", rng and (lambda: rng.uniform() < reverse_ratio)))
    if swap:
        i = 0
        while i < len(images) - 1:
            if images[i] is not None:
                images[i], images[i + 1] = images[i + 1], images[i]
                texts[i], texts[i + 1] = texts[i + 1], texts[i]
                i += 2
            else:
                i += 1
    parts: list[Part] = []
    n = 0
    for k, (image, text) in enumerate(zip(images, texts)):
        if (image is None) == (text is None):
            return None
        if image is not None:
            if max_images is not None and n >= max_images:
                break
            parts.append(Image(_codes(image, f"mmc4: image_ids[{k}]")))
            n += 1
        else:
            if not isinstance(text, str):
                raise InputError(f"mmc4 sample: texts[{k}] must be a str, got {type(text).__name__}")
            parts.append(text)
            if max_images is not None and n >= max_images:
                break
    return Plan([(parts, True)], one_string=True, decisions={"swap_pairs": swap})


def format_video_caption(row: Mapping, rng: Draws | None = None, *, num_frames: int = 4, image_id_length: int = 32,
                         flat: bool = True, decisions: Mapping | None = None) -> Plan:
    """A video caption (``image_ids`` flat, ``answer``): ``num_frames`` spans of the next
    ``image_id_length`` codes each (short or empty when the codes run out), not learned, then the
    answer and ``</s>``, learned."""
    codes = _codes(_get(row, "image_ids", "video_caption", (list, tuple)), "video_caption: image_ids", None)
    answer = _get(row, "answer", "video_caption")
    frames = [Image(codes[i * image_id_length:(i + 1) * image_id_length]) for i in range(num_frames)]
    return _sft([(frames, [answer])])


def format_text(row: Mapping, rng: Draws | None = None, *, decisions: Mapping | None = None) -> Plan | None:
    """Plain text (``text``): ``<s>`` + text + ``</s>``, all learned; None if blank."""
    text = _get(row, "text", "text")
    if _blank(text):
        return None
    return Plan([([text], True)], one_string=True)


# --------------------------------------------------------------------------- instruction-tuning kinds


def format_sft_qa(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.0,
                  caption_prompt: Any = None, decisions: Mapping | None = None) -> Plan:
    """A question-answer pair (``image_ids`` + ``question``/``answer``, or ``text`` as the answer).
    Branch "answer" (always when ``reverse_ratio`` is 0, else with P = ``reverse_ratio``):
    ``USER: IMG question\\nASSISTANT:`` -> answer with a final ``.``; branch "generate": a random
    text-to-image request built from the answer -> a canned response + IMG."""
    codes = _codes(_get(row, "image_ids", "sft_qa", (list, tuple)), "sft_qa: image_ids")
    if isinstance(row.get("question"), str):
        question, answer = row["question"].strip(), _get(row, "answer", "sft_qa")
    else:
        question, answer = None, _get(row, "text", "sft_qa")
    answer = answer.strip()

    def draw_branch() -> str:
        return "answer" if reverse_ratio == 0.0 or rng.uniform() < reverse_ratio else "generate"

    branch = _decide(decisions, "branch", rng and draw_branch if reverse_ratio != 0.0 else (lambda: "answer"))
    if branch == "answer":
        if question is None:
            raise InputError("sft_qa sample without 'question' on the answer branch (the original raises "
                             "TypeError here): give it a question, or use reverse_ratio -1 (always generate)")
        return _sft([(_turn(True, Image(codes), question), [_period(answer)])], branch="answer")
    i = int(_decide(decisions, "prompt_index", rng and (lambda: rng.randint(0, len(GEN_PROMPT) - 1))))
    request = GEN_PROMPT[i] + " " + answer.rstrip(".") + ("?" if i >= 14 else ".")
    return _sft([(_turn(True, request), [GEN_RESPONSE[i], Image(codes)])], branch="generate", prompt_index=i)


def format_sft_caption(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5,
                       caption_prompt: Any = None, decisions: Mapping | None = None) -> Plan:
    """An image caption as instruction data, both directions (our name for the original's caption
    instruction sources, e.g. coco_caption: `format_sft_qa` on what its caption tool writes).
    ``image_ids`` + ``text`` (or ``answer``): with P = ``reverse_ratio`` (0.5) the answer branch
    ``USER: IMG <describe question>\nASSISTANT:`` -> the caption with a final ``.``, else the
    generate branch: a random text-to-image request built from the caption -> a canned response +
    IMG. The question is ``question`` if the row has one, else
    `seed.training.llm.data.DESCRIBE_QUESTION`. A pair row ``{"codes", "caption"}`` (a
    ``scripts/tokenize_dataset.py`` caption row; a list of captions: one picked) arrives here as
    ``image_ids`` + ``text``."""
    from .data import DESCRIBE_QUESTION

    if not isinstance(row.get("question"), str):
        answer = row.get("answer") if isinstance(row.get("answer"), str) else _get(row, "text", "sft_caption")
        row = {**row, "question": DESCRIBE_QUESTION, "answer": answer}
    return format_sft_qa(row, rng, reverse_ratio=reverse_ratio, caption_prompt=caption_prompt, decisions=decisions)


def format_sft_conversation(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5,
                            caption_prompt: Any = None, decisions: Mapping | None = None) -> Plan:
    """A multi-turn conversation about one image (``question`` = ``"Question: q1 Question: q2..."``,
    ``answer`` = ``"Answer: a1 Answer: a2..."``), paired up to the shorter list; no turn at all when
    the question holds ``Image Descriptions``."""
    codes = _codes(_get(row, "image_ids", "sft_conversation", (list, tuple)), "sft_conversation: image_ids")
    question = _get(row, "question", "sft_conversation")
    answer = _get(row, "answer", "sft_conversation")
    turns = []
    if "Image Descriptions" not in question:
        qs, ans = question.split("Question: ")[1:], answer.split("Answer: ")[1:]
        for i, (q, a) in enumerate(zip(qs, ans)):
            q = q.strip().replace("Question: ", "")
            a = _period(a.strip().replace("Answer: ", ""))
            turns.append((_turn(True, Image(codes), q) if i == 0 else _turn(False, q), [a]))
    return _sft(turns)


def format_sft_visual_question(row: Mapping, rng: Draws | None = None, *, system_message: str = "",
                               roles: Any = None, sep: str = SEP, decisions: Mapping | None = None) -> Plan | None:
    """LLaVA-style instructions (``image_ids``: a list of code lists, all shown first): ``data``
    (alternating user/assistant strings) or ``instruction``/``inputs``/``outputs``. None (dropped, as
    the original) without ``image_ids`` or without either layout. ``system_message``/``roles``/``sep``
    are ignored, as by the original."""
    if not isinstance(row, Mapping) or "image_ids" not in row:
        return None
    images = [Image(_codes(c, f"sft_visual_question: image_ids[{k}]"))
              for k, c in enumerate(_get(row, "image_ids", "sft_visual_question", (list, tuple)))]
    turns = []
    if "data" in row:
        data = _get(row, "data", "sft_visual_question", (list, tuple))
        prompt: list[Part] | None = None
        for i, content in enumerate(data):
            if not isinstance(content, str):
                raise InputError(f"sft_visual_question: data[{i}] must be a str, got {type(content).__name__}")
            content = content.strip()
            if i % 2 == 0:
                if prompt is not None:  # two user turns in a row: the first has no answer
                    turns.append((prompt, []))
                prompt = _turn(True, *images, content) if i == 0 else _turn(False, content)
            else:
                turns.append((prompt, [_period(content)]))
                prompt = None
        if prompt is not None:
            turns.append((prompt, []))
    elif "instruction" in row:
        instruction = _get(row, "instruction", "sft_visual_question")
        inputs = _get(row, "inputs", "sft_visual_question")
        outputs = _get(row, "outputs", "sft_visual_question")
        turns.append((_turn(True, *images, instruction if inputs.strip() == "" else inputs), [outputs]))
    else:
        return None
    return _sft(turns)


def format_sft_edit(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5, caption_prompt: Any = None,
                    decisions: Mapping | None = None) -> Plan:
    """An image edit (``source_image_ids``, ``target_image_ids``): ``USER: IMG(src) instruction
    \\nASSISTANT:`` -> ``response`` (with ``instruction_gpt``) or a canned response, + IMG(tgt)."""
    if not isinstance(row, Mapping) or "source_image_ids" not in row:
        raise InputError("sft_edit sample without 'source_image_ids' (the original raises UnboundLocalError here)")
    src = Image(_codes(row["source_image_ids"], "sft_edit: source_image_ids"))
    tgt = Image(_codes(_get(row, "target_image_ids", "sft_edit", (list, tuple)), "sft_edit: target_image_ids"))
    if "instruction_gpt" in row:
        return _sft([(_turn(True, src, _get(row, "instruction_gpt", "sft_edit")),
                      [_get(row, "response", "sft_edit"), tgt])])
    instruction = _get(row, "instruction", "sft_edit")
    j = int(_decide(decisions, "response_index", rng and (lambda: rng.randint(0, 5))))
    return _sft([(_turn(True, src, instruction), [EDIT_RESPONSE[j], tgt])], response_index=j)


def format_sft_difference(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.0,
                          caption_prompt: Any = None, decisions: Mapping | None = None) -> Plan:
    """Spot the difference (``image_ids``: 64 codes = 2 images, ``question``, ``answer``), in one
    of two layouts (P 0.5 each). With ``reverse_ratio`` other than 0 a first draw >= it leaves no
    layout: the original raises there, and so does this (`InputError`)."""
    codes = _codes(_get(row, "image_ids", "sft_difference", (list, tuple)), "sft_difference: image_ids", 64)
    question = _get(row, "question", "sft_difference").strip()
    answer = _get(row, "answer", "sft_difference").strip()
    for old, new in DIFFERENCE_RENAMES:
        question, answer = question.replace(old, new), answer.replace(old, new)
    answer = answer if answer.endswith(".") else answer + "."

    def draw_layout() -> str:
        if reverse_ratio != 0.0 and not rng.uniform() < reverse_ratio:
            return "skipped"
        return "image_then_label" if rng.uniform() < 0.5 else "label_then_image"

    layout = _decide(decisions, "layout", rng and draw_layout)
    img0, img1 = Image(codes[:32]), Image(codes[32:])
    if layout == "image_then_label":
        prompt = _turn(True, img0, "This is the first image.", img1, "This is the second image. " + question)
    elif layout == "label_then_image":
        prompt = _turn(True, "This is the first image.", img0, "This is the second image.", img1, question)
    else:
        raise InputError(f"sft_difference: reverse_ratio {reverse_ratio} and a draw >= it leave no layout (the "
                         "original raises UnboundLocalError here); use reverse_ratio 0 as the original config")
    return _sft([(prompt, [answer])], layout=layout)


def format_sft_story(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.0, caption_prompt: Any = None,
                     decisions: Mapping | None = None) -> Plan:
    """A visual story (``image_ids``: 160 codes = 5 images, ``caption0..4``). ``reverse_ratio`` 0
    (the config): 4 turns asking for the next image; otherwise one turn with a random story prompt
    and the 4 captions + images as the answer."""
    codes = _codes(_get(row, "image_ids", "sft_story", (list, tuple)), "sft_story: image_ids", 160)
    caps = [_get(row, f"caption{k}", "sft_story").strip() for k in range(5)]
    imgs = [Image(codes[32 * k:32 * k + 32]) for k in range(5)]
    if reverse_ratio == 0.0:
        turns = [(_turn(True, caps[0], imgs[0], caps[1] + STORY_REQUEST_SUFFIX), [STORY_RESPONSE_PER_IMAGE, imgs[1]])]
        turns += [(_turn(False, caps[k] + STORY_REQUEST_SUFFIX), [STORY_RESPONSE_PER_IMAGE, imgs[k]]) for k in (2, 3, 4)]
        return _sft(turns, branch="per_image")
    j = int(_decide(decisions, "prompt_index", rng and (lambda: rng.randint(0, 9))))
    answer: list[Part] = [STORY_RESPONSE[j]]
    for k in (1, 2, 3, 4):
        answer += [SEP + caps[k], imgs[k]]
    return _sft([(_turn(True, caps[0], imgs[0], STORY_PROMPT[j]), answer)], branch="one_shot", prompt_index=j)


def format_sft_video(row: Mapping, rng: Draws | None = None, *, reverse_ratio: float = 0.5, caption_prompt: Any = None,
                     decisions: Mapping | None = None) -> Plan:
    """A video question (``image_ids`` flat: one span per 32 codes, ``question``, ``answer``):
    ``USER: spans question\\nASSISTANT:`` -> the answer without the noise marker, with a final ``.``."""
    codes = _codes(_get(row, "image_ids", "sft_video", (list, tuple)), "sft_video: image_ids", None)
    question = _get(row, "question", "sft_video").strip()
    answer = _get(row, "answer", "sft_video").strip().replace(VIDEO_NOISE_MARKER, "")
    answer = answer if answer.endswith(".") else answer + "."
    frames = [Image(codes[32 * i:32 * i + 32]) for i in range(len(codes) // 32)]
    return _sft([(_turn(True, *frames, question), [answer])])


# --------------------------------------------------------------------------- our layouts


def format_messages(row: Mapping, rng: Draws | None = None, *, decisions: Mapping | None = None) -> Plan:
    """A conversation ``{"messages": [{"role", "content"}, ...]}`` in the SFT style above: an
    optional first ``system`` message (+ ``\\n``, not learned), then user/assistant turns
    alternating from the user; ``USER: content\\nASSISTANT:`` not learned, each assistant content
    learned (as is), then ``</s>``. Content: a str or a list of parts (a str, ``{"type": "text",
    "text"}``, ``{"type": "image", "codes": [32 ints]}``; image paths must already be codes, see
    `seed.training.llm.data`). The last message must be the assistant's."""
    messages = _get(row, "messages", "messages", (list, tuple))
    if not messages:
        raise InputError("messages sample: 'messages' is empty")
    prefix: list[Part] | None = None
    turns: list[tuple[list[Part], list[Part]]] = []
    expect = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"{where}: must be a dict with role system, user or assistant")
        content = message_parts(m.get("content", ""), where)
        if m["role"] == "system":
            if i:
                raise InputError(f"{where}: a system message must come first")
            text = "".join(p for p in content if isinstance(p, str))
            if len(content) != sum(isinstance(p, str) for p in content):
                raise InputError(f"{where}: a system message holds text only")
            prefix = [text if text.endswith("\n") else text + "\n"] if text else None
            continue
        if m["role"] != expect:
            raise InputError(f"{where}: expected a {expect} message (turns alternate, starting with the user)")
        if expect == "user":
            turns.append((_turn(not turns, *content), []))
        else:
            turns[-1][1].extend(content)
        expect = "assistant" if expect == "user" else "user"
    if expect != "user":
        raise InputError("messages sample: the last message must be the assistant's (nothing to learn otherwise)")
    return _sft(turns, prefix)


def message_parts(content: Any, where: str) -> list[Part]:
    """A message's content -> parts: a str, or a list of str / ``{"type": "text", "text"}`` /
    ``{"type": "image", "codes"}`` items."""
    items = content if isinstance(content, (list, tuple)) else [content]
    parts: list[Part] = []
    for k, p in enumerate(items):
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, Mapping) and isinstance(p.get("text"), str) and p.get("type", "text") == "text":
            parts.append(p["text"])
        elif isinstance(p, Mapping) and p.get("codes") is not None and p.get("type", "image") == "image":
            parts.append(Image(_codes(p["codes"], f"{where}, part {k}")))
        elif isinstance(p, Mapping) and p.get("image") is not None:
            raise InputError(f"{where}, part {k}: an image path ({p['image']!r}) needs an image tokenizer "
                             "(data.image_tokenizer) to become codes")
        else:
            raise InputError(f"{where}, part {k}: a part is a str, {{'type': 'text', 'text': ...}} or "
                             f"{{'type': 'image', 'codes': [...]}}, got {p!r:.80}")
    return parts


FORMATTERS: dict[str, Callable[..., Plan | None]] = {
    "caption": format_caption,
    "mmc4": format_mmc4,
    "video_caption": format_video_caption,
    "text": format_text,
    "sft_qa": format_sft_qa,
    "sft_caption": format_sft_caption,
    "sft_conversation": format_sft_conversation,
    "sft_visual_question": format_sft_visual_question,
    "sft_edit": format_sft_edit,
    "sft_difference": format_sft_difference,
    "sft_story": format_sft_story,
    "sft_video": format_sft_video,
    "messages": format_messages,
}
"""Sample kind -> formatter ``f(row, rng, **options, decisions=None) -> Plan | None``. The first
eleven are the original's (``torchdata_train.py`` / ``torchdata_sft.py``); ``messages`` is ours."""


# --------------------------------------------------------------------------- tokenization


class _Sized:
    """The tokenizer with its size read once: `seed.llm.encode_text` checks ``len(tokenizer)`` on
    every call, which costs more than the encoding itself with transformers 5."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._len = len(tokenizer)

    def __len__(self) -> int:
        return self._len

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


_SIZED: weakref.WeakKeyDictionary[Any, _Sized] = weakref.WeakKeyDictionary()


def _sized(tokenizer: Any) -> _Sized:
    """One `_Sized` per tokenizer and size, so `encode_text`'s per-tokenizer cache is built once."""
    try:
        sized = _SIZED.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _Sized(tokenizer)
    if sized is None or len(sized) != len(tokenizer):
        sized = _SIZED[tokenizer] = _Sized(tokenizer)
    return sized


class SampleEncoder:
    """Tokenizes plans for one tokenizer (with the image tokens): ``encode(plan, max_length) ->
    (ids, labels)``, lists of ints of length <= max_length (the original's truncation keeps the head).

    Ids follow `seed.llm.encode_text` exactly. For speed each image span is encoded as an empty
    ``<img></img>`` and its code ids are put between the two afterwards: whitespace next to any
    image token is stripped either way, so the ids are the same (checked: if the text itself holds
    ``<img></img>``, the whole string is encoded instead). Pad id = the tokenizer's unk id (the
    original sets pad = unk), else its pad id, else 0.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = _sized(tokenizer)
        ids = tokenizer.convert_tokens_to_ids([BOI, EOI, IMAGE_TOKEN_FORMAT.format(0), IMAGE_TOKEN_FORMAT.format(NUM_CODES - 1)])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unk for i in ids):
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}) lacks the image tokens: "
                             "add them with seed.llm.add_image_tokens")
        self.boi, self.eoi, first, last = (int(i) for i in ids)
        if last - first == NUM_CODES - 1:
            self.code_ids: Any = None
            self.code_offset = first
        else:
            self.code_ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN_FORMAT.format(k) for k in range(NUM_CODES)])
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}) needs a bos and an eos token")
        pad = unk if unk is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else 0

    def _code_ids(self, codes: tuple[int, ...]) -> list[int]:
        if self.code_ids is None:
            o = self.code_offset
            return [o + c for c in codes]
        return [self.code_ids[c] for c in codes]

    def encode_parts(self, parts: Sequence[Part]) -> list[int]:
        """Ids of the parts rendered as one string (images as ``<img><img_%05d>...</img>``)."""
        images = [p.codes for p in parts if isinstance(p, Image)]
        if not images:
            return encode_text(self.tokenizer, "".join(parts))
        ids = encode_text(self.tokenizer, "".join(p if isinstance(p, str) else BOI + EOI for p in parts))
        out: list[int] = []
        n = start = 0
        boi, eoi = self.boi, self.eoi
        while True:
            try:
                i = ids.index(boi, start) + 1
            except ValueError:
                break
            if i < len(ids) and ids[i] == eoi:
                out += ids[start:i]
                if n < len(images):
                    out += self._code_ids(images[n])
                n += 1
                start = i
            else:
                out += ids[start:i]
                start = i
        out += ids[start:]
        if n == len(images):
            return out
        text = "".join(p if isinstance(p, str) else BOI + "".join(map(IMAGE_TOKEN_FORMAT.format, p.codes)) + EOI
                       for p in parts)
        return encode_text(self.tokenizer, text)

    def encode(self, plan: Plan, max_length: int) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a plan, cut to ``max_length`` (not padded)."""
        ids, labels = self.encode_whole(plan)
        return ids[:max_length], labels[:max_length]

    def encode_whole(self, plan: Plan) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a plan, not cut: `encode` keeps their first ``max_length``
        (a sample longer than that is truncated)."""
        if plan.one_string:
            ids = [self.bos, *self.encode_parts(plan.segments[0][0]), self.eos]
            pad = self.pad
            return ids, ([-100 if t == pad else t for t in ids] if pad in ids else ids[:])
        ids, labels = [self.bos], [-100]
        for parts, learned in plan.segments:
            seg = self.encode_parts(parts)
            ids += seg
            labels += seg if learned else [-100] * len(seg)
        ids.append(self.eos)
        labels.append(self.eos)
        return ids, labels


def collate(samples: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, pad_id: int = 0) -> dict[str, Any]:
    """``(ids, labels)`` pairs (each at most ``max_length`` long) -> ``input_ids``, ``attention_mask``,
    ``labels``: int64 tensors [B, max_length], right-padded with ``pad_id`` / 0 / -100."""
    import torch

    b = len(samples)
    lengths = np.fromiter((len(x) for x, _ in samples), dtype=np.int64, count=b)
    real = np.arange(max_length) < lengths[:, None]  # row-major order = the samples' ids, in order
    total = int(lengths.sum())
    ids = np.full((b, max_length), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(chain.from_iterable(x for x, _ in samples), dtype=np.int64, count=total)
    labels = np.full((b, max_length), -100, dtype=np.int64)
    labels[real] = np.fromiter(chain.from_iterable(y for _, y in samples), dtype=np.int64, count=total)
    mask = real.astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of samples of ``lengths`` (each <= ``max_length``) grouped into rows of at most
    ``max_length`` tokens: first-fit decreasing (longest first, each into the first row with room;
    ties in input order), deterministic. Every sample lands whole in exactly one row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    return rows


def collate_packed(samples: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, pad_id: int = 0,
                   longest: bool = False) -> dict[str, Any]:
    """``(ids, labels)`` pairs (each at most ``max_length`` long) packed whole into rows (`pack_rows`)
    -> ``input_ids``, ``attention_mask``, ``labels``, ``position_ids``: int64 tensors [R, L], L =
    ``max_length`` (``longest``: the longest row's tokens).

    In a row the samples follow each other; ``position_ids`` restart at 0 for every sample (the
    row's padding at the end counts from 0 again, as one more segment), which is how transformers
    tells packed samples apart (their attention never crosses a boundary). The first label of every
    sample is -100: the shifted loss never predicts a sample's first token from the previous one
    (unpacked, that token is never a target either), so the learned tokens are those of the
    unpacked batch. ``attention_mask`` is 1 on samples' tokens, 0 on the padding."""
    import torch

    lengths = [len(x) for x, _ in samples]
    rows = pack_rows(lengths, max_length)
    width = max(sum(lengths[i] for i in row) for row in rows) if longest else max_length
    n = len(rows)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = samples[i]
            k = len(x)
            ids[r, at:at + k] = x
            labels[r, at:at + k] = y
            labels[r, at] = -100
            positions[r, at:at + k] = np.arange(k)
            at += k
        mask[r, :at] = 1
        positions[r, at:] = np.arange(width - at)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(positions)}
