"""Evaluation: metrics and one runner per task, as the papers measure (`scripts/evaluate.py`).

- `seed.evaluation.metrics`: R@K, VQA accuracy, CIDEr/BLEU (pycocoevalcap), CLIP-I/CLIP-T
  (transformers CLIP), FID/IS (torchmetrics), codebook usage;
- `seed.evaluation.data`: the dataset layouts (image folders, JSONL, Karpathy JSON, VQAv2);
- `seed.evaluation.runner`: the resumable, torchrun-aware run (per-item JSONL, report.json);
- `seed.evaluation.tasks`: reconstruction, codebook, retrieval, text_to_image, vqa, caption.

Nothing is imported here: ``import seed`` stays light (see ``docs/evaluation.md``).
"""
