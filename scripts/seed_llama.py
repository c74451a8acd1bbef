"""Chat with SEED-LLaMA (or any causal LM that speaks SEED-2 codes): text and images in, text and images out.

    python scripts/seed_llama.py --llm AILab-CVC/seed-llama-8b-sft --tokenizer AILab-CVC/seed-tokenizer-2 \\
        --prompt "What is this animal?" --image cat.jpg                      # one shot: image in, text out
    python scripts/seed_llama.py --llm ... --prompt "A dog on green grass" --force-image   # text to image
    python scripts/seed_llama.py --llm ... --template llama2 --load-in-8bit              # interactive chat (14B)

Without --prompt it chats in the terminal: each line is a user message; ``/image PATH`` attaches
an image to the next message, ``/draw TEXT`` sends TEXT with the answer forced to start with an
image, ``/reset`` forgets the conversation, ``/quit`` (or end of input) stops. Generated images
(PNG), a Markdown transcript (transcript.md) and the codes of every generated image
(codes.json) go to --out. Overrides of the image tokenizer's config go last as key=value.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--llm", required=True, help="causal LM: Hub id (AILab-CVC/seed-llama-8b-sft) or folder")
    p.add_argument("--tokenizer", help="its tokenizer: Hub id or folder (default: --llm's; SEED-LLaMA's is "
                                       "AILab-CVC/seed-tokenizer-2)")
    p.add_argument("--image-tokenizer", default="seed2_tokenizer",
                   help="SEED-2 config (name or YAML) or saved folder "
                        "(default: seed2_tokenizer, weights in pretrained/)")
    p.add_argument("--template", default="vicuna", choices=["vicuna", "llama2", "chat", "raw"],
                   help="prompt template: vicuna (8B, default), llama2 (14B), chat (the tokenizer's), raw")
    p.add_argument("--system", help="system message (default: none, as the original)")
    p.add_argument("--prompt", help="one-shot: the user's text (images from --image come first)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an input image (repeatable)")
    p.add_argument("--force-image", action="store_true", help="start the answer with <img> (text to image)")
    p.add_argument("--out", default="outputs/seed_llama", help="output folder (default: outputs/seed_llama)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.5)
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--seed", type=int, help="seed for sampling and image decoding")
    g.add_argument("--no-constraint", action="store_true",
                   help="do not constrain image spans (as the original: malformed spans are reported)")
    m = p.add_argument_group("loading")
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="LM dtype (default: fp16 on CUDA, fp32 on CPU)")
    m.add_argument("--device-map", help="accelerate device map for the LM, e.g. auto")
    m.add_argument("--load-in-8bit", action="store_true", help="8-bit LM (bitsandbytes: pip install 'seed[llama]')")
    m.add_argument("--load-in-4bit", action="store_true", help="4-bit LM (bitsandbytes: pip install 'seed[llama]')")
    d = p.add_argument_group("image decoding (default: the image tokenizer config's diffusion settings)")
    d.add_argument("--steps", type=int)
    d.add_argument("--guidance-scale", type=float)
    d.add_argument("--height", type=int)
    d.add_argument("--width", type=int)
    d.add_argument("--scheduler", choices=["pndm", "ddim", "dpm"])
    p.add_argument("overrides", nargs="*", help="image tokenizer config overrides, key=value")
    return p.parse_args(argv)


class Transcript:
    """The Markdown transcript, generated images and codes.json in ``out``, rewritten after every turn."""

    def __init__(self, out: Path, header: str):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lines = ["# SEED-LLaMA transcript", "", header, ""]
        self.codes: dict[str, list[int]] = {}
        self.n_in = self.n_out = 0

    def user(self, text: str, images: list[Path]) -> None:
        shown = []
        for src in images:
            self.n_in += 1
            name = f"input_{self.n_in:02d}{src.suffix.lower() or '.png'}"
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
                name = f"image_{self.n_out:02d}.png"
                if isinstance(part, Image.Image):
                    part.save(self.out / name)
                    written.append(self.out / name)
                    shown.append(f" ![generated image {self.n_out}]({name}) ")
                self.codes[name] = next(codes).tolist()
        self.lines += [f"**Assistant:** {''.join(shown).strip()}", ""]
        self.save()
        return written

    def save(self) -> None:
        (self.out / "transcript.md").write_text("\n".join(self.lines))
        (self.out / "codes.json").write_text(json.dumps(self.codes, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in args.image:
        if not Path(path).is_file():
            print(f"error: --image {path}: no such file", file=sys.stderr)
            return 2

    import torch  # heavy imports only after the arguments are known

    from seed import CheckpointError, InputError, load_config
    from seed.config import resolve_path
    from seed.llama import SeedLlama

    image_tokenizer = args.image_tokenizer
    if args.overrides or not resolve_path(image_tokenizer).is_dir():
        try:
            image_tokenizer = load_config(args.image_tokenizer, *args.overrides)
        except FileNotFoundError:
            if args.overrides:
                raise
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    try:
        pipe = SeedLlama.from_pretrained(args.llm, tokenizer=args.tokenizer, image_tokenizer=image_tokenizer,
                                         template=args.template, system=args.system,
                                         constrain_images=not args.no_constraint, torch_dtype=dtype,
                                         device_map=args.device_map, load_in_8bit=args.load_in_8bit,
                                         load_in_4bit=args.load_in_4bit)
    except (ImportError, CheckpointError, InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy}
    if not args.greedy:
        generation.update(temperature=args.temperature, top_p=args.top_p)
    decode = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                ("height", args.height), ("width", args.width),
                                ("scheduler", args.scheduler)) if v is not None}
    transcript = Transcript(Path(args.out), f"LM `{args.llm}`, template `{args.template}`, "
                                            f"image tokenizer `{args.image_tokenizer}`")
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
            return 2
        print(f"transcript: {transcript.out / 'transcript.md'}")
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
    print(f"transcript: {transcript.out / 'transcript.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
