"""Chat with SEED-LLaMA (or any causal LM that speaks SEED-2 codes): text and images in, text and images out.

    python scripts/seed_llama.py --llm AILab-CVC/seed-llama-8b-sft --tokenizer AILab-CVC/seed-tokenizer-2 \\
        --prompt "What is this animal?" --image cat.jpg                      # one shot: image in, text out
    python scripts/seed_llama.py --llm ... --prompt "A dog on green grass" --force-image   # text to image
    python scripts/seed_llama.py --llm AILab-CVC/seed-llama-14b-sft --load-in-8bit  # interactive chat (14B: llama2)
    python scripts/seed_llama.py --llm tiny --prompt "Draw a cat." --force-image   # smoke run: random tiny models

Without --prompt it chats in the terminal: each line is a user message; ``/image PATH`` attaches
an image to the next message, ``/draw TEXT`` sends TEXT with the answer forced to start with an
image, ``/reset`` forgets the conversation, ``/quit`` (or end of input) stops. Generated images
(PNG), a Markdown transcript and the codes of every generated image go to --out: the first
run in a folder writes transcript.md, codes.json, input_01.png, image_01.png..., the next run
transcript-2.md, codes-2.json, input-2_01.png, image-2_01.png... (run N gets "-N"), so no run
overwrites another's files.

--image-tokenizer is a SEED-2 config (a shipped name such as seed2_tokenizer, or a YAML file),
a folder written by seed.Tokenizer.save_pretrained, or a Hugging Face Hub repo id (owner/name,
downloaded on first use). Overrides of a config go last as key=value. Default: the one an LLM
export records in its image_tokenizer.json (scripts/train_llama.py writes it; another one passed
is refused), else seed2_tokenizer.

Exit status: 0 done; 2 bad arguments (checked before any model loads: a SEED-1 --image-tokenizer,
--force-image with --max-new-tokens under 33...), an LM or tokenizer that cannot load (checked
before any file is written), or a one-shot turn that failed (the error is printed).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face Hub repo id looks like: owner/name."""


def number(kind: type, low: float, high: float | None = None, *, open_low: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` (int or float) in [low, high] (or (low, high] with ``open_low``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (open_low and value == low) or (high is not None and value > high):
            where = (f"greater than {low}" if open_low else f"at least {low}") + (
                f" and at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    return parse


def multiple_of_8(text: str) -> int:
    value = number(int, 8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--llm", required=True, help="causal LM: Hub id (AILab-CVC/seed-llama-8b-sft), folder, or tiny "
                                                   "(random tiny LLaMA for smoke runs)")
    p.add_argument("--tokenizer", help="its tokenizer: Hub id or folder (default: --llm's; SEED-LLaMA's is "
                                       "AILab-CVC/seed-tokenizer-2)")
    p.add_argument("--image-tokenizer",
                   help="SEED-2 config (name or YAML), saved folder or Hub repo id (default: seed2_tokenizer, "
                        "weights in pretrained/; seed2_tiny for --llm tiny)")
    p.add_argument("--template", choices=["vicuna", "llama2", "chat", "raw"],
                   help="prompt template: vicuna (8B), llama2 (14B), chat (the tokenizer's), raw "
                        "(default: llama2 for AILab-CVC/seed-llama-14b-*, else vicuna)")
    p.add_argument("--system", help="system message (default: none, as the original)")
    p.add_argument("--prompt", help="one-shot: the user's text (images from --image come first)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an input image (repeatable)")
    p.add_argument("--force-image", action="store_true", help="start the answer with <img> (text to image)")
    p.add_argument("--out", default="outputs/seed_llama", help="output folder (default: outputs/seed_llama)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=512, help="at least 1 (default 512)")
    g.add_argument("--temperature", type=number(float, 0, open_low=True), default=1.0,
                   help="sampling temperature, > 0 (default 1.0; --greedy for deterministic replies)")
    g.add_argument("--top-p", type=number(float, 0, 1, open_low=True), default=0.5,
                   help="nucleus sampling, in (0, 1] (default 0.5)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--seed", type=number(int, 0, 2**63 - 1), help="seed for sampling and image decoding")
    g.add_argument("--no-constraint", action="store_true",
                   help="do not constrain image spans (as the original: malformed spans are reported)")
    m = p.add_argument_group("loading")
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="LM dtype (default: fp16 on CUDA, fp32 on CPU)")
    m.add_argument("--device-map", help="accelerate device map for the LM, e.g. auto")
    m.add_argument("--load-in-8bit", action="store_true", help="8-bit LM (bitsandbytes: pip install 'seed[llama]')")
    m.add_argument("--load-in-4bit", action="store_true", help="4-bit LM (bitsandbytes: pip install 'seed[llama]')")
    d = p.add_argument_group("image decoding (default: the image tokenizer config's diffusion settings)")
    d.add_argument("--steps", type=number(int, 1))
    d.add_argument("--guidance-scale", type=number(float, -math.inf))
    d.add_argument("--height", type=multiple_of_8)
    d.add_argument("--width", type=multiple_of_8)
    d.add_argument("--scheduler", choices=["pndm", "ddim", "dpm"])
    p.add_argument("overrides", nargs="*", help="image tokenizer config overrides, key=value")
    args = p.parse_args(argv)
    if args.load_in_8bit and args.load_in_4bit:
        p.error("--load-in-8bit and --load-in-4bit exclude each other")
    if args.force_image and args.max_new_tokens < 33:
        p.error(f"--force-image needs --max-new-tokens of at least 33 (32 image codes + </img>), "
                f"got {args.max_new_tokens}")
    for path in args.image:
        if not Path(path).is_file():
            p.error(f"--image {path}: no such file")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"image tokenizer overrides must look like key=value, got {' '.join(bad)}")
    return args


def export_record(llm: str) -> dict | None:
    """The image tokenizer record of an LLM folder (``image_tokenizer.json``, `seed.provenance`), or None."""
    from seed.provenance import read_export_record

    return read_export_record(llm) if llm != "tiny" and Path(llm).expanduser().is_dir() else None


def image_tokenizer_source(name: str, overrides: list[str], seed1: bool = False) -> Any:
    """What ``--image-tokenizer NAME`` means, decided without loading a model or downloading.

    A folder (``seed.Tokenizer.save_pretrained``) -> its `Path`; a config file or shipped config
    name -> the loaded `DictConfig` with ``overrides`` applied; else a Hub repo id (``owner/name``,
    whose first part is not a local folder) -> the id as a str, which `SeedLlama` downloads on
    first use. Anything else, overrides with a folder or Hub id, or a SEED-1 config or folder
    (``model.decoder.head`` not ``image``; allowed with ``seed1``: an export that declared SEED-1
    codes) is an `InputError`.
    """
    from omegaconf import OmegaConf

    from seed import InputError, load_config
    from seed.config import SHIPPED_CONFIGS, find_config, resolve_path

    def seed2(cfg: Any, what: str) -> Any:
        head = OmegaConf.select(cfg, "model.decoder.head", default="reverse_qformer")
        if head != "image" and not seed1:
            raise InputError(f"--image-tokenizer {name}: {what} is a SEED-1 tokenizer (model.decoder.head={head}); "
                             "SEED-LLaMA speaks SEED-2 codes: use a SEED-2 config such as seed2_tokenizer")
        return cfg

    path = resolve_path(name)
    kind = "a saved folder" if path.is_dir() else None
    if kind and (path / "config.yaml").is_file():
        seed2(OmegaConf.load(path / "config.yaml"), "its config.yaml")
    if kind is None:
        try:
            find_config(name)
        except InputError:
            if not (HUB_ID.fullmatch(name) and Path(name).suffix.lower() not in (".yaml", ".yml")
                    and not resolve_path(name.split("/")[0]).is_dir()):
                shipped = sorted(q.stem for q in SHIPPED_CONFIGS.glob("*.yaml"))
                close = difflib.get_close_matches(Path(name).stem, shipped, n=1)
                raise InputError(
                    f"--image-tokenizer {name}: no such folder or config file, and not a Hugging Face Hub repo id "
                    f"(owner/name)." + (f" Did you mean '{close[0]}'?" if close else "") +
                    f" Shipped configs: {', '.join(shipped)}") from None
            kind = "a Hub repo id"
        else:
            return seed2(load_config(name, *overrides), "this config")
    if overrides:
        raise InputError(f"--image-tokenizer {name} is {kind}: key=value overrides apply to a config "
                         f"(name or YAML) only, got {' '.join(overrides)}")
    return path if path.is_dir() else name


class Transcript:
    """One run's Markdown transcript, images and codes in ``out``, rewritten after every turn.

    The run takes the first free number N: run 1 writes ``transcript.md``, ``codes.json``,
    ``input_01.png``, ``image_01.png``...; run N >= 2 the same names with ``-N`` after the stem
    (``transcript-2.md``, ``image-2_01.png``). A number is free when none of its files exist; the
    transcript is created exclusively, so two runs started at once never share one.
    """

    def __init__(self, out: Path, header: str):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lines = ["# SEED-LLaMA transcript", "", header, ""]
        self.codes: dict[str, list[int]] = {}
        self.n_in = self.n_out = 0
        run = 1
        while True:
            self.tag = "" if run == 1 else f"-{run}"
            self.path, self.codes_path = out / f"transcript{self.tag}.md", out / f"codes{self.tag}.json"
            taken = self.codes_path.exists() or any(out.glob(f"input{self.tag}_*")) or \
                any(out.glob(f"image{self.tag}_*"))
            if not taken:
                try:
                    with open(self.path, "x"):
                        break
                except FileExistsError:
                    pass
            run += 1
        self.save()

    def user(self, text: str, images: list[Path]) -> None:
        shown = []
        for src in images:
            self.n_in += 1
            name = f"input{self.tag}_{self.n_in:02d}{src.suffix.lower() or '.png'}"
            shutil.copyfile(src, self.out / name)
            shown.append(f"![{src.name}]({name})")
        self.lines += [f"**User:** {' '.join(shown + [text])}".rstrip(), ""]
        self.save()

    def assistant(self, reply) -> list[Path]:
        from PIL import Image

        from seed.llama import MalformedSpan

        written, shown, codes = [], [], iter(reply.codes)
        for part in reply.parts:
            if isinstance(part, str):
                shown.append(part)
            elif isinstance(part, MalformedSpan):
                shown.append(f" *[{part}]* ")
            else:
                self.n_out += 1
                name = f"image{self.tag}_{self.n_out:02d}.png"
                if isinstance(part, Image.Image):
                    part.save(self.out / name)
                    written.append(self.out / name)
                    shown.append(f" ![generated image {self.n_out}]({name}) ")
                self.codes[name] = next(codes).tolist()
        self.lines += [f"**Assistant:** {''.join(shown).strip()}", ""]
        self.save()
        return written

    def discard_if_empty(self) -> bool:
        """Remove this run's files if no turn was recorded (a failed one-shot leaves nothing behind)."""
        if len(self.lines) > 4:
            return False
        self.path.unlink(missing_ok=True)
        self.codes_path.unlink(missing_ok=True)
        return True

    def save(self) -> None:
        self.path.write_text("\n".join(self.lines))
        self.codes_path.write_text(json.dumps(self.codes, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad arguments exit 2 here, before anything loads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from seed import CheckpointError, InputError
    from seed.hub import log_once

    log_once()

    loading: dict[str, Any] = {"template": args.template} if args.template else {}
    try:
        for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
            if text is not None:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # an undecodable byte of the command line
                    c = ord(text[e.start])
                    what = f"the byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
                    raise InputError(f"{flag}: not valid UTF-8 text ({what} at character {e.start}); "
                                     "pass the text in UTF-8") from None
        record = export_record(args.llm)
        seed1 = record is not None and record.get("variant") == "seed1"
        if args.image_tokenizer is not None:
            loading["image_tokenizer"] = image_tokenizer_source(args.image_tokenizer, args.overrides, seed1)
        elif args.overrides:
            default = "seed2_tiny" if args.llm == "tiny" else "seed2_tokenizer"
            if record is not None and record.get("spec") is None:
                from seed.provenance import no_tokenizer_message

                raise InputError(no_tokenizer_message(args.llm, record))
            loading["image_tokenizer"] = image_tokenizer_source(
                record["spec"] if record is not None else default, args.overrides, seed1)
        if record is not None and "image_tokenizer" in loading:  # checked before anything is written
            from seed.provenance import export_image_tokenizer

            export_image_tokenizer(args.llm, record, loading["image_tokenizer"])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        print(f"error: --out {out}: cannot write there: {e.strerror}", file=sys.stderr)
        return 2

    import torch  # heavy imports only after the arguments are known

    from seed.llama import SeedLlama

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    try:
        pipe = SeedLlama.from_pretrained(args.llm, tokenizer=args.tokenizer, **loading, system=args.system,
                                         constrain_images=not args.no_constraint, torch_dtype=dtype,
                                         device_map=args.device_map, load_in_8bit=args.load_in_8bit,
                                         load_in_4bit=args.load_in_4bit)
        _ = pipe.model  # loads the LM now: a broken checkpoint stops here, before any file is written
    except (ImportError, CheckpointError, InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy}
    if not args.greedy:
        generation.update(temperature=args.temperature, top_p=args.top_p)
    decode = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                ("height", args.height), ("width", args.width),
                                ("scheduler", args.scheduler)) if v is not None}
    transcript = Transcript(out, f"LM `{args.llm}`, template `{pipe.template}`, "
                                 f"image tokenizer `{args.image_tokenizer or pipe.image_tokenizer_spec or 'default'}`")
    history: list[dict] = []

    def turn(text: str, images: list[str], force: bool) -> bool:
        message = {"role": "user", "content": [Path(p) for p in images] + ([text] if text else [])}
        try:
            reply = pipe.chat(history + [message], force_image=force, seed=args.seed, decode=decode, **generation)
        except (InputError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return False
        transcript.user(text, [Path(p) for p in images])
        written = transcript.assistant(reply)
        history.extend([message, reply.as_message()])
        print(f"ASSISTANT: {reply.text.strip()}")
        for path in written:
            print(f"  image: {path}")
        for err in reply.errors:
            print(f"  warning: {err}")
        return True

    if args.prompt is not None:
        if not turn(args.prompt, args.image, args.force_image):
            transcript.discard_if_empty()
            return 2
        print(f"transcript: {transcript.path}")
        return 0

    pending = list(args.image)
    print("SEED-LLaMA chat. /image PATH attaches an image, /draw TEXT asks for an image, /reset, /quit.")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history.clear()
            pending.clear()
            print("(conversation reset)")
        elif line.startswith("/image "):
            path = line[len("/image "):].strip()
            if Path(path).is_file():
                pending.append(path)
                print(f"(attached {path})")
            else:
                print(f"error: {path}: no such file", file=sys.stderr)
        elif line.startswith("/draw "):
            turn(line[len("/draw "):].strip(), pending, True)
            pending = []
        elif line.startswith("/"):
            print("commands: /image PATH, /draw TEXT, /reset, /quit", file=sys.stderr)
        else:
            turn(line, pending, args.force_image)
            pending = []
    if not transcript.discard_if_empty():
        print(f"transcript: {transcript.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
