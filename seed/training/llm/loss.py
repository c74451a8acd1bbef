"""The causal-LM loss of SEED-LLaMA training without the whole logits: chunked ``lm_head`` + cross-entropy.

The plain Hugging Face loss computes ``lm_head`` on every position of the micro-batch ([B, T, V]
logits, upcast to fp32 for the loss) and keeps them until ``backward()``: at the recipe's micro-batch
(116 x 200 tokens, V = 40194) about 1.9 GB of bf16 logits plus their fp32 copy, most of them at
padding positions. Here (`chunked_causal_lm_loss`) only the positions that are learned (the shifted
``labels != -100``) get logits, a chunk of ``chunk`` tokens at a time; each chunk's logits are
dropped after its cross-entropy and recomputed in backward (`torch.utils.checkpoint`), so at most
one chunk's [chunk, V] logits exist at any time. The loss is the same sum of the same per-token
cross-entropies (fp32, as HF upcasts) divided by the same count: equal to HF's within float rounding
of the sum's order.

`ChunkedLossLM` puts that behind a causal LM's own forward signature, so that DistributedDataParallel
and FSDP2 wrap it (they must see the whole forward, body and loss, in their call) and the trainer's
`micro_step` calls it like the HF model. It has the SAME parameter names as the model it wraps (it
holds the model's children, not the model), so checkpoints, optimizer state and the FSDP state dicts
are named as without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (upcast to fp32 as HF does) against ``targets``."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int,
                           num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
    """HF's shifted causal-LM loss from the last hidden states, logits a chunk at a time.

    ``hidden``: [B, T, D] (the decoder's output, any float dtype; ``head`` runs under the caller's
    autocast); ``labels``: int64 [B, T], -100 = not learned; ``head``: the output embedding
    (``nn.Linear``, peft's ``ModulesToSaveWrapper``, a LoRA layer...), called on [n, D] chunks of
    at most ``chunk`` rows of the learned positions (position t predicts ``labels[:, t + 1]``).
    Returns the fp32 scalar ``sum of per-token cross-entropies / num_items_in_batch`` (None: / the
    number of learned tokens, HF's mean). Every chunk's logits are recomputed in backward instead of
    kept. A batch without a learned token gives 0 (with ``num_items_in_batch``) that still reaches
    every parameter of the graph (zero gradients, as HF's), so DDP sees all of them used.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    shift = labels[:, 1:]
    keep = shift != IGNORE
    h = hidden[:, :-1][keep]  # [N, D]
    t = shift[keep]  # [N]
    n = t.shape[0]
    sums = [checkpoint(_chunk_loss, head, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
            for i in range(0, max(n, 1), chunk)]  # n = 0: one empty chunk, to keep the graph whole
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    if num_items_in_batch is None:
        return total / n
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class ChunkedLossLM(nn.Module):
    """A causal LM (plain HF or peft) whose forward returns only the loss, by `chunked_causal_lm_loss`.

    ``forward(input_ids, labels, num_items_in_batch=None, **kwargs)`` runs the model's decoder body
    (``get_decoder()``, with its LoRA layers and trained copies) on ``input_ids`` and ``kwargs``
    (``position_ids``, ``attention_mask``, ``use_cache``...) and returns
    ``CausalLMOutputWithPast(loss=...)`` with no logits: the same loss as
    ``model(input_ids, labels=labels, num_items_in_batch=...)``. ``lm_head`` is the model's output
    embedding, called per chunk (a peft ``ModulesToSaveWrapper`` uses its trained copy).

    The model's children are this module's children under the same names (``named_parameters`` are
    the model's, in the same order); the model itself is ``.lm``, not registered. Wrap THIS module
    in DDP / ``fully_shard`` (as the root) so that the whole forward runs inside their call.
    """

    def __init__(self, model: nn.Module, chunk: int):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if model._parameters or model._buffers:
            raise ValueError(f"{type(model).__name__} holds parameters or buffers of its own; ChunkedLossLM "
                             "needs them in submodules")
        for name, child in model.named_children():
            self.add_module(name, child)
        self._lm = (model,)  # a tuple: not registered as a submodule (no name prefix)
        self.chunk = int(chunk)

    @property
    def lm(self) -> nn.Module:
        """The wrapped causal LM (plain HF or peft)."""
        return self._lm[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch: torch.Tensor | float | None = None, **kwargs: Any):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        lm = self.lm
        base = lm.get_base_model() if hasattr(lm, "peft_config") else lm
        hidden = base.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state
        loss = chunked_causal_lm_loss(hidden, labels, base.get_output_embeddings(), self.chunk, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)


def loss_model(model: nn.Module, chunk: int | None) -> nn.Module:
    """What the trainer calls for a micro-batch's loss: `ChunkedLossLM` (``chunk`` tokens of logits at
    a time), or ``model`` itself (None: HF's plain loss over the whole logits)."""
    return model if chunk is None else ChunkedLossLM(model, chunk)
