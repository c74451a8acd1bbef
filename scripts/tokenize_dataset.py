"""Tokenize a whole dataset into JSON Lines of SEED codes: resumable, crash-safe, scales out with torchrun.

    python scripts/tokenize_dataset.py --config configs/seed_tokenizer.yaml --input IMAGES --output OUT
    torchrun --nproc_per_node 8 scripts/tokenize_dataset.py --config ... --input ... --output ...

IMAGES is a folder (recursive, symlinked folders followed), a text file listing paths, a .tar
shard, or a .jsonl file of rows {"image": path, any other fields} (paths relative to its folder).
The sorted ids are cut into chunks; rows go to OUT/codes/K.jsonl ({"image": id, "codes": [32
ints]}, or "text": the SEED-LLaMA form with --format text, SEED-2 configs only) and
OUT/errors/K.jsonl ({"image": id, "error": message}); OUT/done/K.json marks a finished chunk.
Rerun the same command to resume.

A .jsonl input keeps each row's other fields in its output row, so captions travel with codes:
{"image": "cats/1.jpg", "caption": "a cat"} -> {"image": "cats/1.jpg", "caption": "a cat",
"codes": [...]}. An image on several rows is tokenized for each; the n-th row's id is
"path#n" from the second on. A line that is not a JSON object with an "image" path is an error
row (id "file.jsonl:LINE"), as is a row with a field the output writes itself ("codes", "text").
See docs/datasets.md.

OUT/run.json records the model (config + weight hashes) and the input; a rerun with another model
is refused unless --force-mismatch. One run at a time per OUT (OUT/.lock).

Exit status: 0 all images tokenized; 1 some images failed (see OUT/errors/); 2 could not start
(bad arguments, input, output folder or weights); 130 interrupted by Ctrl-C (143 by SIGTERM),
with every line written complete: rerun to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config YAML (e.g. configs/seed_tokenizer.yaml) or a saved "
                        "tokenizer folder (Tokenizer.save_pretrained, a training run's export/)")
    parser.add_argument("--input", required=True,
                        help="a folder of images, a text file listing paths, a .tar shard, or a .jsonl file of "
                             '{"image": path, ...} rows whose other fields are kept')
    parser.add_argument("--output", required=True, help="output folder (run.json, codes/, errors/, done/)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--num-workers", type=int_at_least(0), default=None,
                        help="DataLoader processes decoding images (default: the CPUs this process may use, at most 4)")
    parser.add_argument("--format", choices=("codes", "text", "codes+text"), default="codes",
                        help="codes: 32 ints per image; text: the SEED-LLaMA string <img><img_00012>...</img> "
                             "(seed.llm.codes_to_text; SEED-2 configs only); codes+text: both")
    parser.add_argument("--chunk-size", type=int_at_least(1), default=None,
                        help="images per output chunk (default: about 4 chunks per process, at most 10000); "
                             "fixed by the first run of an output folder")
    parser.add_argument("--force-mismatch", action="store_true",
                        help="resume even if OUT/run.json names another model or config (rows of both are mixed)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if not os.path.exists(args.input):
        parser.error(f"--input {args.input}: no such file or folder")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output}: exists and is not a folder")
    return args


class Terminated(Exception):
    """SIGTERM (a scheduler stopping the job): stop like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before any heavy import: --help and bad arguments answer at once
    from seed.errors import CheckpointError, InputError

    # Set by torchrun; a plain `python` run is rank 0 of 1.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args, rank, world_size)
    except KeyboardInterrupt:
        print(f"[rank {rank}] interrupted: every row written is complete; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Terminated:
        print(f"[rank {rank}] terminated (SIGTERM): every row written is complete; rerun to resume", file=sys.stderr)
        return 143
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old_term)


def take_lock(output: str):
    """Create the output folder and lock it (`seed.dataset.OutputLock`): fails at once if another
    run holds it or the folder cannot be written."""
    from seed.dataset import OutputError, OutputLock

    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {output}: {e.strerror}") from None
    lock = OutputLock(output)
    lock.acquire()
    return lock


def run(args: argparse.Namespace, rank: int, world_size: int) -> int:
    from seed.errors import CheckpointError, InputError

    log = logging.getLogger("tokenize_dataset")
    # A single process locks the folder before anything slow; under torchrun rank 0 does, below.
    lock = take_lock(args.output) if world_size == 1 else None
    try:
        import datetime

        import torch
        import torch.distributed as dist

        import seed
        from seed.dataset import OutputError, Summary, check_format, discover, listing_hash, model_fingerprint, \
            prepare_output, tokenize_items
        from seed.config import resolve_path
        from seed.device import default_dtype
        from seed.hub import read_config

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if world_size > 1:
            # For rank 0's verdict on the output folder and the summary: gloo on CPU and CUDA alike.
            # Ranks may finish far apart; torchrun tears the group down if one of them fails.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

        # Rank 0 locks the folder and checks run.json against this model and input; every rank
        # lists the input itself. All of it before the model loads.
        verdict: dict = {}
        try:
            saved = resolve_path(args.config)  # a trained tokenizer (save_pretrained / training export/)
            saved = saved if saved.is_dir() else None
            if saved is not None:
                if args.overrides:
                    raise InputError(f"--config {args.config} is a saved tokenizer folder: key=value overrides "
                                     "apply to a config YAML only")
                cfg = read_config(saved)
            else:
                cfg = seed.load_config(args.config, *args.overrides)
            check_format(cfg.model, args.format)
            items = discover(args.input)
            if not items:
                raise InputError(f"--input {args.input}: no images found")
            if rank == 0:
                if lock is None:
                    lock = take_lock(args.output)
                fingerprint = model_fingerprint(cfg, str(default_dtype(device)).replace("torch.", ""), saved)
                from seed.provenance import spec_name

                verdict["record"] = prepare_output(args.output, items, fingerprint, args.format, args.chunk_size,
                                                   world_size, args.force_mismatch,
                                                   input_name=os.path.abspath(args.input),
                                                   model_spec=None if args.overrides else spec_name(args.config))
        except (InputError, CheckpointError) as e:
            if world_size == 1:
                raise
            verdict["error"] = e
        if world_size > 1:
            shipped = [{"record": verdict.get("record"), "failed": "error" in verdict}]
            dist.broadcast_object_list(shipped, src=0)
            if "error" in verdict:
                raise verdict["error"]
            if shipped[0]["failed"]:
                return 2  # rank 0 says why
            verdict["record"] = shipped[0]["record"]
        record = verdict["record"]
        if rank != 0 and listing_hash(items) != record["listing_sha256"]:
            raise OutputError(f"rank {rank} lists {len(items)} images in {args.input}, unlike rank 0 "
                              f"({record['images']}): the input must look the same from every node")
        if rank == 0:
            log.info("%d images in %s, %d process(es), %d chunk(s) of %d", len(items), args.input, world_size,
                     record["chunks"], record["chunk_size"])

        tok = (seed.Tokenizer.from_pretrained(saved, device=device) if saved is not None
               else seed.Tokenizer.from_config(cfg, device=device))
        s = tokenize_items(tok, items, args.output, record["chunk_size"], rank=rank, world_size=world_size,
                           batch_size=args.batch_size, num_workers=args.num_workers, fmt=args.format,
                           progress=rank == 0)
        if world_size > 1:
            counts = torch.tensor([s.done, s.skipped, s.failed], dtype=torch.int64)
            seconds = torch.tensor([s.seconds], dtype=torch.float64)
            dist.all_reduce(counts)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            s = Summary(*counts.tolist(), seconds.item())
            dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()
    if rank == 0:
        print(f"done {s.done}, skipped {s.skipped} (already in {args.output}), failed {s.failed}"
              f"{' (see errors/*.jsonl)' if s.failed else ''}, {s.images_per_second:.1f} images/s over "
              f"{world_size} process(es), {s.seconds:.1f} s")
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
