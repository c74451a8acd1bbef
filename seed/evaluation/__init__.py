"""Evaluation: metrics and one runner per task, as the papers measure."""
