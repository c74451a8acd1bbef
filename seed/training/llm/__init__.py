"""Training SEED-LLaMA: sample formatting, data, LoRA model, the recipe."""
