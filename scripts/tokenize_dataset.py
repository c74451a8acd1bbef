"""Tokenize a whole dataset into JSON Lines of SEED codes: resumable, crash-safe, scales out with torchrun.

    python scripts/tokenize_dataset.py --config configs/seed_tokenizer.yaml --input IMAGES --output OUT
    torchrun --nproc_per_node 8 scripts/tokenize_dataset.py --config ... --input ... --output ...

IMAGES is a folder (recursive), a text file listing paths, or a .tar shard. Each process writes
OUT/codes-rankNNNNN.jsonl ({"image": id, "codes": [32 ints]}) and OUT/errors-rankNNNNN.jsonl
({"image": id, "error": message}). Rerun the same command to resume; ids already in OUT are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os

import torch
import torch.distributed as dist

import seed
from seed.dataset import Summary, discover, tokenize_items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config YAML, e.g. configs/seed_tokenizer.yaml")
    parser.add_argument("--input", required=True, help="a folder of images, a text file listing paths, or a .tar shard")
    parser.add_argument("--output", required=True, help="folder for codes-rank*.jsonl and errors-rank*.jsonl")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding images")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    # Set by torchrun; a plain `python` run is rank 0 of 1.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if world_size > 1:
        # Only for the summary at the end (a sum of 4 CPU numbers), so gloo on CPU and CUDA alike.
        # Ranks may finish far apart; torchrun tears the group down if one of them fails.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    cfg = seed.load_config(args.config, *args.overrides)
    tok = seed.Tokenizer.from_config(cfg, device=device)
    items = discover(args.input)
    if rank == 0:
        logging.getLogger("tokenize_dataset").info("%d images in %s, %d process(es)", len(items), args.input, world_size)
    s = tokenize_items(tok, items, args.output, rank=rank, world_size=world_size, batch_size=args.batch_size,
                       num_workers=args.num_workers, progress=rank == 0)

    if world_size > 1:
        counts = torch.tensor([s.done, s.skipped, s.failed], dtype=torch.int64)
        seconds = torch.tensor([s.seconds], dtype=torch.float64)
        dist.all_reduce(counts)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        s = Summary(*counts.tolist(), seconds.item())
        dist.destroy_process_group()
    if rank == 0:
        print(f"done {s.done}, skipped {s.skipped} (already in {args.output}), failed {s.failed} "
              f"(see errors-rank*.jsonl), {s.images_per_second:.1f} images/s over {world_size} "
              f"process(es), {s.seconds:.1f} s")

if __name__ == "__main__":
    main()
