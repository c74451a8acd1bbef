"""The web demo: SEED-LLaMA chat with images in and out, and the tokenizer's round trip (Gradio).

One process, no back end to start: `Demo` holds the models (loaded once, lazily, on first use,
shared by every browser tab) and thin handlers over `seed.Tokenizer` and `seed.llama.SeedLlama`;
`Demo.build` lays them out as a Gradio page with two tabs, **Chat** and **Tokenizer**. Each
browser tab keeps its own conversation in a `gr.State`; the queue runs at most
`CHAT_CONCURRENCY` chat turns and `TOKENIZER_CONCURRENCY` tokenizer jobs at once (the rest
wait, in order, up to `QUEUE_SIZE`). Bad input (a file that is not an image, a decompression
bomb, an image over `MAX_PIXELS`, codes that are not 32 integers in range, an empty message, a
setting that is not a finite number in range) becomes a message on the page, never a traceback;
an unexpected error in one user's turn is logged and shown to that user, and leaves everyone's
conversation as it was. A turn whose user leaves stops generating at the next token. Uploaded
files are only read (by the library's image reader); generated images are written to a private
temporary folder (removed at exit, SIGTERM included) and served by Gradio's cache.

``demo_app.py`` (top level) is the command line; ``main`` here does the work.
"""

from __future__ import annotations

import argparse
import logging
import math
import numbers
import os
import random
import re
import signal
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, InputError

# Gradio and the Hub must not phone home: set here, before gradio (imported where it is used, so
# that `demo_app.py --help` is instant) or huggingface_hub is imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    import gradio as gr
    from omegaconf import DictConfig
    from PIL import Image

    from .llama import SeedLlama
    from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CHAT_CONCURRENCY = 1
"""Chat turns that run at once (one LM on one device: more would only share it and risk running
out of memory); the others wait in Gradio's queue."""
TOKENIZER_CONCURRENCY = 2
"""Tokenizer-tab jobs (encode / decode) that run at once, beside the chat (`seed.Tokenizer` is thread-safe)."""
QUEUE_SIZE = 64
"""Requests that may wait in the queue; beyond that a user is told the queue is full."""
MAX_FILE_SIZE = "25mb"
"""The largest upload Gradio accepts."""
MAX_IMAGES_PER_TURN = 8
MAX_PIXELS = 25_000_000
"""The largest image the demo reads, in pixels (a 24-megapixel photo fits). Pillow's bomb guard only
warns up to ~179 megapixels, and a small file can claim that many (a 15 KB 1-bit PNG of 11000x11000
costs ~1.6 GB to read): this demo limit keeps one upload from taking the server's memory."""
THUMBNAIL = 1024
"""The longest side of the copy of an uploaded image that the Tokenizer tab sends back for display."""
DEFAULT_LLM = "AILab-CVC/seed-llama-8b-sft"
TINY = "tiny"
"""``--llm tiny``: a tiny random LM and tokenizer, no downloads (for smoke runs and tests)."""

_THEME_FONTS = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}
"""System fonts: the default theme would fetch Google Fonts from the browser."""


class _UserError(Exception):
    """A message for the page (bad input, a model that cannot load): shown, never a traceback."""


def _page_error(e: BaseException) -> gr.Error:
    """Any exception -> a `gr.Error` for the page: our errors as they are, others by type (logged)."""
    import gradio as gr

    if isinstance(e, (InputError, CheckpointError, _UserError)):
        return gr.Error(str(e), print_exception=False)
    if isinstance(e, gr.Error):
        return e
    logger.exception("unexpected error in a demo handler")
    return gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The app keeps running; try again.",
                    print_exception=False)


def parse_codes(text: str) -> list[int]:
    """Pasted codes -> a list of ints: any of ``1 2 3``, ``1, 2, 3``, ``[1, 2, 3]``.

    Raises `InputError` for an empty text or a token that is not an integer (`Demo.decode_codes`
    checks the count and the range).
    """
    tokens = [t for t in re.split(r"[\s,;]+", re.sub(r"[\[\]()]", " ", text or "")) if t]
    if not tokens:
        raise InputError("codes: paste 32 integers (e.g. the codes shown after encoding an image)")
    bad = [t for t in tokens if not re.fullmatch(r"[+-]?\d+", t)]
    if bad:
        raise InputError(f"codes: {bad[0]!r} is not an integer; paste 32 integers separated by spaces or commas")
    return [int(t) for t in tokens]


def format_codes(codes: Sequence[int]) -> str:
    """Codes -> ``"[1, 2, ...]"`` (the form `parse_codes` reads back, and JSON)."""
    return "[" + ", ".join(str(int(c)) for c in codes) + "]"


class Demo:
    """The models and the handlers of the page.

    ``image_tokenizer``: a config (name, YAML path or DictConfig; SEED-1 or SEED-2) or a
    `seed.Tokenizer` folder / Hub id, or a `seed.Tokenizer`; the Tokenizer tab uses it, and the
    chat too (SEED-LLaMA needs SEED-2). ``llm``: a Hub id or folder of a causal LM, ``"tiny"`` for
    a tiny random one, or None for no Chat tab. ``llm_options``: the rest of
    `SeedLlama.from_pretrained`'s arguments (``tokenizer``, ``template``, ``load_in_8bit``, ...).
    Only the LM's tokenizer loads here; the image tokenizer loads on the first encode / decode,
    the LM on the first chat turn, the diffusion model on the first decode.
    """

    def __init__(self, image_tokenizer: Any = "seed2_tokenizer", llm: str | Path | None = None,
                 **llm_options: Any):
        self._image_tokenizer_spec = image_tokenizer
        self._tokenizer: Tokenizer | None = None
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="seed-demo-")  # generated images; removed at exit or close
        self._out = Path(self._tmp.name)
        self.llm = llm
        self.pipe: SeedLlama | None = None
        if llm is not None:
            from .llama import SeedLlama

            # The LM's tokenizer loads now (a bad name fails at once); the LM on the first turn.
            self.pipe = SeedLlama.from_pretrained(str(llm) if isinstance(llm, Path) else llm,
                                                  image_tokenizer=lambda: self.tokenizer, **llm_options)

    # ----------------------------------------------------------------------- models (lazy, shared)

    @property
    def tokenizer(self) -> Tokenizer:
        """The image tokenizer (`seed.Tokenizer`), loaded once on first use; the chat shares it."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self) -> Tokenizer:
        from .tokenizer import Tokenizer

        return Tokenizer.load(self._image_tokenizer_spec)

    @property
    def random_notice(self) -> str | None:
        """A sentence for the page when any model has random weights (the tiny configs), else None."""
        random_parts = []
        if self.pipe is not None and self.pipe.random_weights:
            random_parts.append("the language model")
        cfg = self._config()
        if cfg is not None:
            if any(v is None for v in cfg.get("checkpoints", {}).values()):
                random_parts.append("the image tokenizer")
            if cfg.get("diffusion", {}).get("model", "") is None:
                random_parts.append("the diffusion model")
        if not random_parts:
            return None
        return (f"**Random weights:** {', '.join(random_parts)} {'has' if len(random_parts) == 1 else 'have'} "
                "random weights, so the answers and images are noise. This setup only shows that the page works; "
                "see docs/web_demo.md for the real models.")

    def _config(self) -> DictConfig | None:
        from omegaconf import DictConfig

        from .config import load_config, resolve_path

        spec = self._image_tokenizer_spec
        if self._tokenizer is not None:
            return self._tokenizer.cfg
        if isinstance(spec, DictConfig):
            return spec
        if isinstance(spec, (str, Path)) and not resolve_path(spec).is_dir():
            try:
                return load_config(spec)
            except (FileNotFoundError, InputError):
                return None
        return None

    def _decode_defaults(self) -> dict[str, Any]:
        cfg = self._config()
        d = cfg.diffusion if cfg is not None else {}
        return {"steps": int(d.get("steps") or 20), "seed": int(d.get("seed") or 0),
                "num_samples": int(d.get("num_samples") or 1)}

    def close(self) -> None:
        """Remove the folder of generated images (done at exit too; `main` also does it on SIGTERM)."""
        self._tmp.cleanup()

    def _save(self, image: Image.Image) -> str:
        path = self._out / f"{uuid.uuid4().hex}.png"
        image.save(path)
        return str(path)

    # ----------------------------------------------------------------------- Tokenizer tab

    def encode_image(self, file: str | None, seed: float, steps: float, samples: float,
                     progress: gr.Progress | None = None) -> tuple[str, list[tuple[str, str]]]:
        """An uploaded image file -> (its 32 codes as text, [input, reconstructions] for a gallery)."""
        progress = progress or (lambda *a, **k: None)
        try:
            if not file:
                raise _UserError("upload an image first")
            settings = _decode_settings(seed, steps)
            n = _integer(samples, "samples", 1, 8)
            progress(0.1, desc="encoding")
            image = _read_upload(file)
            codes = self.tokenizer.encode([image])[0].tolist()
            progress(0.4, desc="decoding")
            images = self._decode(codes, settings, n)
            image.thumbnail((THUMBNAIL, THUMBNAIL))  # the page shows it: no need to send a big one back
            return format_codes(codes), [(self._save(image), "input")] + images
        except Exception as e:  # noqa: BLE001 (every failure becomes a message on the page)
            raise _page_error(e) from None

    def decode_codes(self, text: str, seed: float, steps: float, samples: float,
                     progress: gr.Progress | None = None) -> list[tuple[str, str]]:
        """Pasted codes -> their decoded images for a gallery."""
        progress = progress or (lambda *a, **k: None)
        try:
            codes = parse_codes(text)
            settings, samples = _decode_settings(seed, steps), _integer(samples, "samples", 1, 8)
            n, size = self.tokenizer.cfg.model.qformer.num_queries, self.tokenizer.cfg.model.codebook.size
            if len(codes) != n:
                raise InputError(f"codes: expected {n} integers, got {len(codes)}")
            bad = next(((i, c) for i, c in enumerate(codes) if not 0 <= c < size), None)
            if bad:
                raise InputError(f"codes: {bad[1]} (code {bad[0] + 1}) is outside [0, {size})")
            progress(0.1, desc="decoding")
            return self._decode(codes, settings, samples)
        except Exception as e:  # noqa: BLE001
            raise _page_error(e) from None

    def _decode(self, codes: list[int], settings: dict[str, Any], n: int) -> list[tuple[str, str]]:
        images = self.tokenizer.decode([codes], num_samples=n, **settings)
        return [(self._save(im), f"sample {k + 1} (seed {settings['seed']})") for k, im in enumerate(images)]

    # ----------------------------------------------------------------------- Chat tab

    def chat(self, message: dict[str, Any] | str | None, state: dict[str, Any] | None, force_image: bool = False,
             temperature: float = 1.0, top_p: float = 0.5, max_new_tokens: float = 512, seed: float = -1,
             steps: float | None = None, constrain: bool = True, template: str | None = None,
             progress: gr.Progress | None = None) -> Iterator[tuple[list[dict], dict, Any, list[str]]]:
        """One chat turn: yields (chat messages, new state, the message box's value, generated images).

        ``message``: the multimodal box's ``{"text": str, "files": [paths]}`` (or a str).
        ``state``: this browser tab's ``{"turns": [...]}`` (see `new_state`); it is replaced, never
        changed in place, so a failed turn leaves it as it was. ``temperature`` 0 is greedy decoding;
        ``seed`` < 0 draws one. The reply shows first, then its images, one by one, as they decode.
        """
        import gradio as gr

        from .llm import NUM_IMAGE_TOKENS

        progress = progress or (lambda *a, **k: None)
        state = state if state is not None else new_state()
        before = _display(state)
        try:
            text, files = _message_parts(message)
            if not text and not files:
                raise InputError("type a message or attach an image (the message is empty)")
            if len(files) > MAX_IMAGES_PER_TURN:
                raise InputError(f"{len(files)} images in one message; at most {MAX_IMAGES_PER_TURN}")
            pipe = self.pipe
            if pipe is None:
                raise _UserError("no LM: start the demo with --llm (e.g. --llm AILab-CVC/seed-llama-8b-sft) to chat")
            for f in files:
                _check_pixels(f)
            seed_value = _seed(seed)
            decode = _decode_settings(seed_value, steps)
            generation: dict[str, Any] = {"max_new_tokens": _integer(max_new_tokens, "max new tokens", 1, 4096)}
            if force_image and generation["max_new_tokens"] < NUM_IMAGE_TOKENS + 1:
                raise InputError(f"force image: an image takes {NUM_IMAGE_TOKENS + 1} new tokens (32 codes and </img>); "
                                 f"max new tokens is {generation['max_new_tokens']}")
            temperature = _number(temperature, "temperature", 0, 10)
            top_p = _number(top_p, "top-p", 0.01, 1)
            if temperature > 0:
                generation.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                generation["do_sample"] = False
            shown_user = [{"role": "user", "content": {"path": f}} for f in files]
            if text:
                shown_user.append({"role": "user", "content": text})
            pending = [{"role": "assistant", "content": "…",
                        "metadata": {"title": "thinking", "status": "pending"}}]
            yield before + shown_user + pending, state, gr.update(value=None, interactive=False), _images(state)
            codes = []
            if files:
                progress(0.05, desc="encoding the images")
                try:
                    codes = pipe.image_tokenizer.encode(files).tolist()
                except InputError as e:
                    msg = str(e)
                    for f in files:
                        msg = msg.replace(str(f), Path(f).name)
                    raise InputError(msg) from None
            user = {"role": "user", "content": [{"type": "image", "codes": c} for c in codes] + ([text] if text else [])}
            history = [m for t in state["turns"] for m in (t["user"], t["assistant"])]
            logger.info("chat turn: %d image(s), %d earlier turn(s), force_image=%s, seed=%d, %s", len(codes),
                        len(state["turns"]), bool(force_image), seed_value, generation)
            progress(0.1, desc="generating")
            reply = None
            stream = _stream(pipe, history + [user], force_image=bool(force_image), seed=seed_value,
                             decode_images=False, constrain_images=bool(constrain), template=template or None,
                             **generation)
            try:
                for partial in stream:
                    if isinstance(partial, str):
                        yield before + shown_user + [{"role": "assistant", "content": partial}], state, gr.update(), \
                            _images(state)
                    else:
                        reply = partial
            finally:  # closed here (the user left: Gradio closes this generator): the LM stops at once
                stream.close()
            shown: list[dict] = []
            images: list[str] = []
            n_images = len(reply.codes)
            text_so_far = ""
            for part in reply.parts:
                if isinstance(part, str):
                    text_so_far += part
                    continue
                if text_so_far.strip():
                    shown.append({"role": "assistant", "content": text_so_far.strip()})
                text_so_far = ""
                if hasattr(part, "reason"):  # a MalformedSpan (constraint off)
                    shown.append({"role": "assistant", "content": f"⚠️ *malformed image span: {part.reason}*"})
                    continue
                k = len(images)
                yield before + shown_user + shown + [{"role": "assistant", "content": f"decoding image {k + 1} …",
                                                      "metadata": {"title": "drawing", "status": "pending"}}], \
                    state, gr.update(), _images(state) + images
                progress(0.5 + 0.5 * k / max(n_images, 1), desc=f"decoding image {k + 1} of {n_images}")
                image = pipe.decode_images(part[None], **decode)[0]
                images.append(self._save(image))
                shown.append({"role": "assistant", "content": {"path": images[-1]}})
                shown.append({"role": "assistant", "content": format_codes(part.tolist()),
                              "metadata": {"title": f"codes of image {k + 1} (32)", "status": "done"}})
            if text_so_far.strip():
                shown.append({"role": "assistant", "content": text_so_far.strip()})
            if not shown:
                shown.append({"role": "assistant", "content": "*(empty reply)*"})
            turn = {"user": user, "assistant": reply.as_message(), "display": shown_user + shown, "images": images}
            state = {"turns": state["turns"] + [turn]}
            yield _display(state), state, gr.update(value=None, interactive=True), _images(state)
        except Exception as e:  # noqa: BLE001 (the turn fails alone; the state is the one before it)
            error = _page_error(e)
            yield before, state, gr.update(value=message, interactive=True), _images(state)
            raise error from None

    @staticmethod
    def undo(state: dict[str, Any] | None) -> tuple[list[dict], dict, list[str]]:
        """Forget the last turn: (chat messages, new state, generated images)."""
        turns = (state or new_state())["turns"][:-1]
        state = {"turns": turns}
        return _display(state), state, _images(state)

    @staticmethod
    def clear() -> tuple[list[dict], dict, list[str]]:
        """Forget the whole conversation."""
        state = new_state()
        return [], state, []

    # ----------------------------------------------------------------------- the page

    def build(self) -> gr.Blocks:
        """The Gradio page (call ``.queue(...)`` and ``.launch(...)``, or use `launch`)."""
        import gradio as gr

        d = self._decode_defaults()
        with gr.Blocks(title="SEED demo", delete_cache=(3600, 24 * 3600)) as page:  # uploads kept a day
            gr.Markdown("# SEED: images as 32 causal codes\nSEED-LLaMA chat with images in and out, and the "
                        "SEED tokenizer's round trip (image -> 32 codes -> images).")
            notice = self.random_notice
            if notice:
                gr.Markdown(notice, elem_id="random-notice")
            with gr.Tabs():
                if self.pipe is not None:
                    with gr.Tab("Chat", id="chat"):
                        self._chat_tab(d)
                with gr.Tab("Tokenizer", id="tokenizer"):
                    self._tokenizer_tab(d)
            if self.pipe is None:
                gr.Markdown("No language model: start with `--llm` (e.g. `--llm AILab-CVC/seed-llama-8b-sft`) "
                            "for the Chat tab.")
        return page

    def _chat_tab(self, d: dict[str, Any]) -> None:
        import gradio as gr

        from .llama import TEMPLATES

        state = gr.State(new_state())
        gr.Markdown(f"LM `{self.llm}`. Attach images with the clip, type, press Enter. Generated images can be "
                    "downloaded from the chat or the gallery below; their 32 codes are under *codes of image k*.")
        # Labels name the API's inputs and outputs (`Client.view_api()`). No file_types: Gradio's own
        # check of a file's extension logs a traceback; the image reader's message names the file.
        chatbot = gr.Chatbot(label="chat", show_label=False, elem_id="chatbot", height=460,
                             placeholder="Ask about an image, or ask for one.", buttons=["copy"])
        box = gr.MultimodalTextbox(label="message", elem_id="chat-input", file_count="multiple",
                                   placeholder="Message (attach images with the clip)", show_label=False,
                                   sources=["upload"])
        with gr.Row():
            force = gr.Checkbox(label="Force image (the answer starts with an image)", value=False, elem_id="force")
            undo = gr.Button("Undo", elem_id="undo", size="sm")
            clear = gr.Button("Clear", elem_id="clear", size="sm")
        with gr.Accordion("Generation settings", open=False, elem_id="settings"):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Top-p")
                max_new = gr.Slider(1, 1024, value=512, step=1, label="Max new tokens", elem_id="max-new-tokens")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="chat-seed")
                steps = gr.Slider(1, 100, value=d["steps"], step=1, label="Image decoding steps")
                constrain = gr.Checkbox(value=True, label="Constrain image spans (off: as the original; "
                                                          "malformed spans are shown)")
                template = gr.Dropdown(list(TEMPLATES), value=self.pipe.template, label="Prompt template (from the model)")
        gallery = gr.Gallery(label="Generated images", elem_id="chat-images", columns=8, height=160,
                             preview=False, fit_columns=False, object_fit="contain",
                             buttons=["download", "fullscreen"])
        inputs = [box, state, force, temperature, top_p, max_new, seed, steps, constrain, template]

        # The parameter names are the API's (a client passes them by keyword; the state is the session's).
        def chat(message, state, force_image, temperature, top_p, max_new_tokens, seed, steps, constrain, template,
                 progress=gr.Progress(track_tqdm=True)):  # a Progress default: Gradio reports it on the page
            yield from self.chat(message, state, force_image, temperature, top_p, max_new_tokens, seed, steps,
                                 constrain, template, progress=progress)

        # One API endpoint per action (docs/web_demo.md): /chat, /undo, /clear.
        box.submit(chat, inputs, [chatbot, state, box, gallery], concurrency_limit=CHAT_CONCURRENCY,
                   concurrency_id="chat", show_progress_on=[chatbot], api_name="chat",
                   api_description="One chat turn: the message (text and image files) with the settings; returns "
                                   "the conversation, the message box's new value and the generated images.")
        undo.click(self.undo, [state], [chatbot, state, gallery], queue=False, api_name="undo",
                   api_description="Forget the last turn.")
        gr.on([clear.click, chatbot.clear], self.clear, None, [chatbot, state, gallery], queue=False,
              api_name="clear", api_description="Forget the whole conversation.")  # the button and the chat's trash

    def _tokenizer_tab(self, d: dict[str, Any]) -> None:
        import gradio as gr

        gr.Markdown("Upload an image to see its 32 codes and reconstructions, or paste 32 codes and decode them.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", type="filepath", elem_id="tok-upload")  # no file_types: see chat
                encode = gr.Button("Encode and reconstruct", variant="primary", elem_id="encode")
                codes = gr.Textbox(label="codes", info="32 codes: edit or paste, then Decode codes", lines=3,
                                   buttons=["copy"], elem_id="codes")
                decode = gr.Button("Decode codes", elem_id="decode")
                with gr.Row():
                    seed = gr.Number(value=d["seed"], precision=0, label="Seed")
                    steps = gr.Slider(1, 100, value=d["steps"], step=1, label="Steps")
                    samples = gr.Slider(1, 4, value=min(d["num_samples"], 4), step=1, label="Samples")
            with gr.Column():
                gallery = gr.Gallery(label="Input and reconstructions", elem_id="tok-images", columns=3,
                                     buttons=["download", "fullscreen"])

        def encode_image(image, seed, steps, samples, progress=gr.Progress(track_tqdm=True)):
            return self.encode_image(image, seed, steps, samples, progress=progress)

        def decode_codes(codes, seed, steps, samples, progress=gr.Progress(track_tqdm=True)):
            return self.decode_codes(codes, seed, steps, samples, progress=progress)

        # One API endpoint per action, whichever control triggers it: /encode_image, /decode_codes.
        kw = {"concurrency_limit": TOKENIZER_CONCURRENCY, "concurrency_id": "tokenizer"}
        gr.on([encode.click, upload.upload], encode_image, [upload, seed, steps, samples], [codes, gallery],
              api_name="encode_image", api_description="An image file -> its 32 codes (text) and [the input, its "
                                                       "reconstructions] (a gallery).", **kw)
        gr.on([decode.click, codes.submit], decode_codes, [codes, seed, steps, samples], [gallery],
              api_name="decode_codes", api_description="32 codes (text: [1, 2, ...], 1 2 ... or 1,2,...) -> "
                                                       "their decoded images (a gallery).", **kw)

    def launch(self, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs: Any) -> Any:
        """Build, queue and serve the page (blocks unless ``prevent_thread_lock=True``)."""
        import gradio as gr

        page = self.build().queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
        return page.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                           theme=gr.themes.Default(**_THEME_FONTS), show_error=False, ssr_mode=False,
                           footer_links=[], **kwargs)


_IMAGE_TOKENS = re.compile(r"(?:\s*(?:</?img>|<img_\d{5}>))+")


STOP_TIMEOUT = 60.0
"""Seconds a closed turn waits for its generate thread to stop. It stops at the next token, so the
wait (on Gradio's event loop, which closes the generator) is one decoding step."""


def _stream(pipe: SeedLlama, conversation: list[dict], **kwargs: Any) -> Iterator[str | Any]:
    """`SeedLlama.chat` in a worker thread, streamed: yields the text so far (image spans shown as
    ``[image]``) as tokens come, then the `seed.llama.Reply`. An error of the turn is raised here.

    Closing this generator (the user left) stops the generation at the next token (a stopping
    criterion) and waits for the thread, so the queue's slot frees only when the LM is free.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    import torch

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    pipe.model  # noqa: B018 (the LM loads here, on the first turn, not in the thread that a stop cannot interrupt)
    streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    result: dict[str, Any] = {}
    threads = torch.get_num_threads()  # a new thread starts with the default: keep the caller's

    def work() -> None:
        try:
            torch.set_num_threads(threads)
            result["reply"] = pipe.chat(conversation, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Cancelled()]), **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=work, name="seed-demo-generate", daemon=True)
    worker.start()
    try:
        text = ""
        for chunk in streamer:
            text += chunk
            shown = _IMAGE_TOKENS.sub(" [image] ", text).strip()
            if shown:
                yield shown
    finally:  # done, or closed (GeneratorExit at the yield): stop the LM and wait for it
        stop.set()
        worker.join(STOP_TIMEOUT)
        if worker.is_alive():
            logger.warning("a cancelled chat turn's generation did not stop within %.0f s", STOP_TIMEOUT)
    if "error" in result:
        raise result["error"]
    yield result["reply"]


def new_state() -> dict[str, Any]:
    """A browser tab's state: ``{"turns": [{"user", "assistant" (SeedLlama messages, images as codes),
    "display" (chat messages), "images" (paths of generated images)}]}``."""
    return {"turns": []}


def _display(state: dict[str, Any]) -> list[dict]:
    return [m for t in state["turns"] for m in t["display"]]


def _images(state: dict[str, Any]) -> list[str]:
    return [p for t in state["turns"] for p in t["images"]]


def _message_parts(message: dict[str, Any] | str | None) -> tuple[str, list[str]]:
    if message is None:
        return "", []
    if isinstance(message, str):
        return message.strip(), []
    files = [f["path"] if isinstance(f, dict) else str(f) for f in message.get("files") or []]
    return (message.get("text") or "").strip(), files


def _number(value: Any, name: str, low: float, high: float) -> float:
    """A setting from the page (a client may send anything) as a float in [low, high], or an
    `InputError` naming it: NaN, inf, None and text are refused, not converted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InputError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    """As `_number`, for a whole number (``3.0`` is 3; ``2.5``, NaN and inf are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise InputError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def _seed(seed: Any) -> int:
    """The seed setting: None or a negative number draws one; else an integer in [0, 2**63)."""
    if seed is None or (isinstance(seed, numbers.Real) and not isinstance(seed, bool) and -math.inf < seed < 0):
        return random.randrange(2**31)
    try:
        return _integer(seed, "seed", 0, 2**63 - 1)
    except InputError as e:
        raise InputError(f"{e} (-1 draws one)") from None


def _decode_settings(seed: Any, steps: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": _seed(seed)}
    if steps is not None:
        settings["steps"] = _integer(steps, "steps", 1, 1000)
    return settings


def _check_pixels(path: str) -> None:
    """Refuse an image over `MAX_PIXELS` from its header alone (nothing is decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 (not an image, a bomb...: the library's reader says what is wrong)
        return
    if width * height > MAX_PIXELS:
        raise InputError(f"{Path(path).name}: {width}x{height} is {width * height / 1e6:.0f} megapixels; this demo "
                         f"reads images of at most {MAX_PIXELS / 1e6:.0f} megapixels: downscale it first")


def _read_upload(path: str) -> Image.Image:
    """An uploaded image file -> RGB (`seed.images.open_image`), at most `MAX_PIXELS`; errors name the
    file, not the server's folder."""
    from .images import open_image

    _check_pixels(path)
    try:
        return open_image(path)
    except InputError as e:
        raise InputError(str(e).replace(str(path), Path(path).name)) from None


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="demo_app.py", description="The SEED web demo: SEED-LLaMA chat and the tokenizer's round trip.",
        epilog="Tiny random models, no downloads: demo_app.py --llm tiny --config configs/seed2_tiny.yaml\n"
               "SEED-LLaMA 8B: demo_app.py --llm AILab-CVC/seed-llama-8b-sft\n"
               "14B in 8 bit:  demo_app.py --llm AILab-CVC/seed-llama-14b-sft --template llama2 --load-in-8bit",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default=DEFAULT_LLM,
                   help=f"causal LM: Hub id or folder (default {DEFAULT_LLM}); 'tiny' for a tiny random one; "
                        "'none' for the Tokenizer tab only")
    p.add_argument("--tokenizer", help="the LM's tokenizer: Hub id or folder (default: as scripts/seed_llama.py)")
    p.add_argument("--config", "--image-tokenizer", dest="config",
                   help="image tokenizer: config (name or YAML; SEED-2 for chat) or saved folder (default: "
                        "seed2_tokenizer, weights in pretrained/; with --llm tiny the random seed2_tiny)")
    p.add_argument("--template", choices=["vicuna", "llama2", "chat", "raw"],
                   help="prompt template (default: llama2 for SEED-LLaMA 14B, else vicuna)")
    p.add_argument("--system", help="system message (default: none)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="LM dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device-map", help="accelerate device map for the LM, e.g. auto")
    p.add_argument("--load-in-8bit", action="store_true", help="8-bit LM (bitsandbytes: pip install 'seed[llama]')")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit LM (bitsandbytes: pip install 'seed[llama]')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link (off)")
    p.add_argument("overrides", nargs="*", help="image tokenizer config overrides, key=value")
    return p.parse_args(argv)


def demo_from_args(args: argparse.Namespace) -> Demo:
    """The `Demo` the flags describe (models chosen as scripts/seed_llama.py does); loads only the LM's tokenizer."""
    import torch

    from .config import load_config, resolve_path

    llm = None if str(args.llm).lower() == "none" else args.llm
    record = None
    if llm is not None and llm != TINY and resolve_path(llm).is_dir():  # an LLM export names its image tokenizer
        from .provenance import read_export_record

        record = read_export_record(resolve_path(llm))
        if record is not None:
            if args.config is None and record.get("spec") is None:
                from .provenance import no_tokenizer_message

                raise InputError(no_tokenizer_message(llm, record).replace("image_tokenizer= (scripts: "
                                                                           "--image-tokenizer)", "--image-tokenizer"))
    config = args.config or (record or {}).get("spec") or ("seed2_tiny" if llm == TINY else "seed2_tokenizer")
    image_tokenizer: Any = config  # a saved folder loads on first use; a config is checked now
    if record is not None and record.get("variant") == "seed1":
        raise InputError(f"--llm {llm} learned SEED-1 codes (its image_tokenizer.json); the web demo chats in SEED-2 "
                         "codes only: use scripts/seed_llama.py or seed.SeedLlama")
    if resolve_path(config).is_dir():
        if args.overrides:  # as seed.Tokenizer.load
            raise InputError(f"key=value overrides apply to a config name or YAML file, not to the saved tokenizer "
                             f"folder {config}: drop them, or pass a config with --config")
    else:
        image_tokenizer = load_config(config, *args.overrides)
    if record is not None:  # another tokenizer than the export's (also by overrides of its model) is refused
        from .provenance import export_image_tokenizer

        export_image_tokenizer(llm, record, image_tokenizer)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    return Demo(image_tokenizer, llm, tokenizer=args.tokenizer, template=args.template, system=args.system,
                torch_dtype=dtype, device_map=args.device_map, load_in_8bit=args.load_in_8bit,
                load_in_4bit=args.load_in_4bit)


_STOPPED_BY: list[str] = []
"""The signal that stopped the server, for `main`'s last log line."""


def _interrupt(signum: int, frame: Any) -> None:
    _STOPPED_BY.append(signal.Signals(signum).name)
    raise KeyboardInterrupt  # Gradio closes the server on it; then main cleans up


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse the flags, build the page, serve it until Ctrl-C or SIGTERM; then
    remove the generated images and return 0."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .hub import log_once

    log_once()  # huggingface_hub's records once, through the handler above
    try:
        demo = demo_from_args(args)
    except (InputError, CheckpointError, FileNotFoundError, ImportError, OSError) as e:
        print(f"error: {e}")
        return 2
    if threading.current_thread() is threading.main_thread():  # a stop (kill, systemd, docker) ends as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(host=args.host, port=args.port, share=args.share)
    except KeyboardInterrupt:  # before the server was up
        pass
    finally:
        demo.close()
    logger.info("stopped (%s): the server is closed and the generated images are removed",
                _STOPPED_BY[-1] if _STOPPED_BY else "Ctrl-C")
    return 0
