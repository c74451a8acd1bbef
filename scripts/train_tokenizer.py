"""Train a SEED tokenizer: stage 1 (causal Q-Former) or stage 2 (codebook, decoder), resumable.

    python scripts/train_tokenizer.py --config configs/train/seed1_stage1_tiny.yaml
    torchrun --nproc-per-node 8 scripts/train_tokenizer.py --config configs/train/seed1_stage1.yaml \\
        data.train=cc3m.jsonl train.output_dir=runs/stage1
    ... --resume                       # continue from the newest checkpoint in OUTPUT/checkpoints
    ... --export-from CHECKPOINT_DIR   # stage 2: only export a checkpoint as a tokenizer folder

Overrides ``key=value`` follow the flags (``train.max_steps=1000 train.save_every=500``). Many
nodes: the same command under ``torchrun --nnodes N --node-rank R --master-addr HOST ...``.
Checkpoints go to OUTPUT/checkpoints/step_XXXXXXXX/, per-step metrics to OUTPUT/metrics.jsonl,
and at the end of stage 2 a `seed.Tokenizer.from_pretrained` folder to OUTPUT/export/.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training config, e.g. configs/train/seed1_stage2.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    parser.add_argument("--export-from", metavar="CHECKPOINT", default=None,
                        help="stage 2: export this checkpoint folder to --export-to (no training)")
    parser.add_argument("--export-to", metavar="DIR", default=None,
                        help="with --export-from: the tokenizer folder to write (default OUTPUT/export)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    import logging  # heavy imports only after parsing, so --help is fast

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("train_tokenizer")

    import seed
    from seed.training.config import load_train_config

    try:
        cfg = load_train_config(args.config, *args.overrides)
        if args.export_from:
            from seed.training.loop import export_checkpoint

            out = args.export_to or os.path.join(cfg.train.output_dir, "export")
            log.info("exported %s", export_checkpoint(cfg, args.export_from, out))
            return 0
        from seed.training.loop import train

        summary = train(cfg, resume=args.resume)
    except (seed.InputError, seed.CheckpointError) as e:
        log.error("%s", e)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    log.info("done: step %d, outputs in %s", summary["step"], summary["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
