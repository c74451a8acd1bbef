"""Train SEED-LLaMA (any HF causal LM on SEED-2 image codes): pretraining or instruction tuning, LoRA.

    python scripts/train_llama.py --config configs/train/llama_pretrain_tiny.yaml
    torchrun --nproc-per-node 8 scripts/train_llama.py --config configs/train/llama_pretrain.yaml \\
        model.base=pretrained/vicuna-7b-v1.1 data.train=codes/ train.output_dir=runs/pretrain
    ... --resume                       # continue from the newest checkpoint in OUTPUT/checkpoints

Overrides ``key=value`` go before or after the flags (``train.max_steps=1000 train.save_every=500 train.seed=0``).
Many nodes: the same command under ``torchrun --nnodes N --node-rank R --master-addr HOST ...``.
Checkpoints go to OUTPUT/checkpoints/step_XXXXXXXX/, per-step metrics to OUTPUT/metrics.jsonl, and
at the end the merged model + tokenizer (and the LoRA adapter in adapter/) to OUTPUT/export/, which
``seed.SeedLlama.from_pretrained(OUTPUT/export, image_tokenizer=...)`` loads. Exit status: 0 done,
2 bad input/config/checkpoint, 3 non-finite loss (the last good checkpoint is kept), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training config, e.g. configs/train/llama_sft.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags

    from seed.training.run import run_script, script_logger  # heavy imports only after parsing: --help is fast

    log = script_logger("train_llama")
    command = [sys.argv[0], *sys.argv[1:]] if argv is None else [__file__, *argv]  # for the model card

    def body() -> int:
        from seed.training.llm.config import load_llama_train_config
        from seed.training.llm.train import train

        cfg = load_llama_train_config(args.config, *args.overrides)
        summary = train(cfg, resume=args.resume, overrides=args.overrides, command=command)
        log.info("done: step %d, outputs in %s%s", summary["step"], summary["output_dir"],
                 f", export in {summary['export']}" if summary.get("export") else "")
        return 0

    return run_script(body, log)


if __name__ == "__main__":
    sys.exit(main())
