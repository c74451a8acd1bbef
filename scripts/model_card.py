"""Rewrite the model card (README.md) of a training export, adding evaluation numbers.

    python scripts/model_card.py outputs/llama_sft_tiny/export --report results/caption/report.json
    python scripts/model_card.py runs/stage2/export --report results/recon/report.json --license apache-2.0

Every export of ``scripts/train_llama.py`` and ``scripts/train_tokenizer.py`` already holds a card
(``README.md`` with Hugging Face metadata) and its facts (``card.json``). Each ``--report`` is a
``report.json`` of ``scripts/evaluate.py`` run ON THIS FOLDER (checked with the report's model
fingerprint: a report of other weights is refused); its metrics go into the card's table and into
the ``model-index`` of its front matter (a later report of the same task and dataset replaces
the earlier one). ``--license`` / ``--name`` set those fields. Exit status: 0 written; 2 bad input
(one ``error:`` line; nothing changed).

The folder can then be uploaded as it is, e.g. ``huggingface_hub.upload_folder(repo_id=...,
folder_path=FOLDER)`` (not done or tested here: no network).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an export folder of train_llama.py / train_tokenizer.py (holds card.json)")
    parser.add_argument("--report", action="append", default=[], metavar="REPORT_JSON",
                        help="a scripts/evaluate.py report.json made with this folder (repeatable)")
    parser.add_argument("--license", default=None, help="the license id of the front matter, e.g. apache-2.0")
    parser.add_argument("--name", default=None, help="the model's name in the card's model-index")
    args = parser.parse_args(argv)

    from seed.errors import InputError
    from seed.training.card import add_reports

    try:
        card = add_reports(args.export, args.report, license=args.license, name=args.name)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
