"""Speed of the SEED-LLaMA training data path on one CPU core; prints one JSON object.

    python scripts/benchmark_llm_data.py                       # caption pairs, the tiny tokenizer
    python scripts/benchmark_llm_data.py --tokenizer PATH --samples 50000 --batch-size 116 --max-length 200

Writes ``--samples`` synthetic caption pairs (``{"codes": [32 ints], "caption": str}``, captions
of 8-24 words) to a temporary JSONL file, then times `seed.training.llm.data.LlmData` over it:
reading the rows, formatting (the original's caption rule, image first with P 0.5), tokenizing
and collating into padded tensors, in this process (torch limited to one thread). Reports
samples and tokens (real, non-pad) per second of this process's CPU time (per core, whatever else
runs on the machine) and of wall time, the format + tokenize + collate part alone (rows already
parsed), and the padding share of the batches (each batch is padded to ``--max-length``, as
the original pads every micro-batch to its source's max length; ``--pad-to longest`` and
``--pack`` show the other settings).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

WORDS = ("a the dog cat man woman red blue green small large old young street table bowl fruit sitting "
         "running on in with near under beside holding looking at river beach city market camera photo").split()


def write_caption_pairs(path: str, samples: int, seed: int = 0) -> None:
    """``samples`` JSONL caption pairs ``{"codes": [32 ints], "caption": 8-24 words}`` into ``path``
    (the recipe's caption length distribution; also used by benchmark_llm_train.py --compare)."""
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(samples):
            caption = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 24))).capitalize() + "."
            f.write(json.dumps({"codes": [rnd.randrange(8192) for _ in range(32)], "caption": caption}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None,
                    help="an HF tokenizer folder with the image tokens (default: seed's tiny one)")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=116, help="global micro-batch (the original's cc3m source: 116)")
    ap.add_argument("--max-length", type=int, default=200, help="sequence length (the original's cc3m source: 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pad-to", default="max_length", choices=("max_length", "longest"),
                    help="max_length: the original's padding; longest: to each batch's longest sequence")
    ap.add_argument("--pack", action="store_true", help="pack whole samples into rows of up to --max-length (data.pack)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from seed.llama import TINY_LLAMA_TOKENIZER
    from seed.training.llm.data import LlmData, Source, read_file
    from seed.training.llm.format import FORMATTERS, SampleEncoder, collate

    torch.set_num_threads(1)
    args.tokenizer = str(args.tokenizer or TINY_LLAMA_TOKENIZER)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        write_caption_pairs(path, args.samples, args.seed)

        src = Source(name="pairs", files=[path], format="auto", batch_size=args.batch_size,
                     max_length=args.max_length, cycle=1, options={"reverse_ratio": 0.5}, pack=args.pack)
        s0 = time.perf_counter()
        data = LlmData([src], tok, seed=args.seed, pad_to=args.pad_to)
        data.encoder.encode_parts(["warm-up: builds the tokenizer's split rules once"])
        setup = time.perf_counter() - s0
        real = slots = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in data:
            real += int(batch["attention_mask"].sum())
            slots += batch["attention_mask"].numel()
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        samples = data.counts()["pairs"]["samples"]

        # The format + tokenize + collate part alone, on rows already parsed.
        rows = [load() for _, load in read_file(path)]
        enc = SampleEncoder(tok)
        from seed.training.llm.format import RandomDraws

        draws = RandomDraws(args.seed)
        fmt = FORMATTERS["caption"]
        c0 = time.process_time()
        for i in range(0, len(rows), args.batch_size):
            plans = [fmt({"image_ids": r["codes"], "text": r["caption"]}, draws, reverse_ratio=0.5)
                     for r in rows[i:i + args.batch_size]]
            collate([enc.encode(p, args.max_length) for p in plans if p is not None], args.max_length, enc.pad)
        core = time.process_time() - c0

    print(json.dumps({
        "tokenizer": args.tokenizer, "samples": samples, "batch_size": args.batch_size, "max_length": args.max_length,
        "pad_to": args.pad_to, "pack": args.pack,
        "samples_per_cpu_s": round(samples / cpu), "tokens_per_cpu_s": round(real / cpu),
        "samples_per_wall_s": round(samples / total),
        "format_collate_samples_per_cpu_s": round(len(rows) / core),
        "setup_s": round(setup, 2), "padding_share": round(1 - real / slots, 4), "mean_tokens_per_sample": round(real / samples, 1),
        "python": sys.version.split()[0], "torch_threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()
