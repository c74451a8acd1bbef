"""Train a SEED tokenizer: stage 1 (causal Q-Former) or stage 2 (codebook, decoder), resumable.

    python scripts/train_tokenizer.py --config configs/train/seed1_stage1_tiny.yaml
    torchrun --nproc-per-node 8 scripts/train_tokenizer.py --config configs/train/seed1_stage1.yaml \\
        data.train=cc3m.jsonl train.output_dir=runs/stage1
    ... --resume                       # continue from the newest checkpoint in OUTPUT/checkpoints
    ... --export-from CHECKPOINT_DIR   # stage 2: only export a checkpoint as a tokenizer folder

Overrides ``key=value`` go before or after the flags (``train.max_steps=1000 train.save_every=500``). Many
nodes: the same command under ``torchrun --nnodes N --node-rank R --master-addr HOST ...``.
Checkpoints go to OUTPUT/checkpoints/step_XXXXXXXX/, per-step metrics to OUTPUT/metrics.jsonl,
and at the end of stage 2 a `seed.Tokenizer.from_pretrained` folder to OUTPUT/export/.

--resume and --export-from use the checkpoint's saved config: an override that changes what
shapes the model or the data (init.*, model.*, data.train, ...) is refused, naming the key; only
train.max_steps, save_every, keep_last, log_every, tensorboard, progress, output_dir and
data.num_workers may change. See docs/training.md.

Exit status: 0 done; 2 could not start or go on (bad argument, config, data, checkpoint, output
folder); 3 the loss (or the weights) became NaN/inf: stopped before the bad update, the last good
checkpoint kept, nothing exported; 130 interrupted (resume with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys


def default_export_folder(checkpoint: str) -> str:
    """``--export-from RUN/checkpoints/step_N`` without ``--export-to``: ``RUN/export_step_N`` (beside
    the run's own ``export/``, which it never overwrites). Raises `seed.InputError` for a checkpoint
    outside a run's ``checkpoints/`` folder (say where with ``--export-to``)."""
    from seed.errors import InputError

    ckpt = os.path.abspath(checkpoint)
    parent = os.path.dirname(ckpt)
    if os.path.basename(parent) != "checkpoints":
        raise InputError(f"--export-from {checkpoint} is not in a run's checkpoints/ folder: "
                         "say where to write the tokenizer with --export-to DIR")
    return os.path.join(os.path.dirname(parent), f"export_{os.path.basename(ckpt)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training config, e.g. configs/train/seed1_stage2.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    parser.add_argument("--export-from", metavar="CHECKPOINT", default=None,
                        help="stage 2: export this checkpoint folder to --export-to (no training)")
    parser.add_argument("--export-to", metavar="DIR", default=None,
                        help="with --export-from: the tokenizer folder to write (default: RUN/export_step_N beside the "
                             "checkpoint's run folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags

    from seed.training.run import run_script, script_logger  # heavy imports only after parsing: --help is fast

    log = script_logger("train_tokenizer")
    command = [sys.argv[0], *sys.argv[1:]] if argv is None else [__file__, *argv]  # for the model card

    def body() -> int:
        from seed.training.config import load_train_config

        cfg = load_train_config(args.config, *args.overrides)
        if args.export_from:
            from seed.training.loop import export_checkpoint

            out = args.export_to or default_export_folder(args.export_from)
            log.info("exported %s", export_checkpoint(cfg, args.export_from, out, overrides=args.overrides,
                                                      command=command))
            return 0
        from seed.training.loop import train

        summary = train(cfg, resume=args.resume, overrides=args.overrides, command=command)
        log.info("done: step %d, outputs in %s", summary["step"], summary["output_dir"])
        return 0

    return run_script(body, log)


if __name__ == "__main__":
    sys.exit(main())
