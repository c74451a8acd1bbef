"""Training the SEED tokenizer: stage 1 (causal Q-Former, contrastive) and stage 2 (codebook, decoder).

`models` builds the training models from the tokenizer's own stage modules, `losses` holds the
original loss terms, `optim` the parameter groups and learning-rate schedule. Heavy modules are
imported on use: ``from seed.training.models import build_model``.
"""
