"""Stage 2: ln_vision and the causal Q-Former (32 queries), from transformers' ``Blip2QFormerModel``.

Also home of the BERT -> transformers key mapping that the Reverse Q-Former shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

from .checkpoint import KeyMap


def build_qformer(q: DictConfig, num_layers: int, encoder_width: int, *, text_input: bool = False,
                  dropout: float = 0.0) -> Blip2QFormerModel:
    """A BLIP-2 Q-Former: BERT-base shaped, cross-attention every ``q.cross_attention_every`` layers.

    ``text_input``: each layer also gets the text FFN (``intermediate``/``output``), for the
    text-only forward of stage-1 training (``query_length=0``). ``dropout``: hidden and
    attention dropout in train mode (BERT's 0.1 in training; 0 for inference).
    """
    config = Blip2QFormerConfig(
        use_qformer_text_input=text_input,
        hidden_size=q.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_every,
        encoder_hidden_size=encoder_width,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = "sdpa"
    return Blip2QFormerModel(config)


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout of the Q-Formers in ``module`` (hidden and attention) to ``p``, in place."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, Blip2QFormerMultiHeadAttention):
            m.attention_dropout = p


def bert_renames(original: str, ours: str) -> tuple[tuple[str, str], ...]:
    """Prefix renames from a LAVIS BERT Q-Former (``<original>.bert.*``) onto ``Blip2QFormerModel``.

    Only the query branch is mapped; the text branch (word/position embeddings, ``intermediate``,
    ``output``) has no counterpart and is skipped.
    """
    return ((f"{original}.bert.embeddings.LayerNorm.", f"{ours}.layernorm."),
            (f"{original}.bert.encoder.", f"{ours}.encoder."))


BERT_INNER = ((".attention.self.", ".attention.attention."), (".crossattention.self.", ".crossattention.attention."))
"""LAVIS ``attention.self`` is transformers' ``attention.attention``."""


class CausalQFormer(nn.Module):
    """ViT tokens [B,N,width] -> causal embeddings [B,32,hidden] (float32).

    ``ln_vision`` (eps 1e-5, computed in fp32), then the Q-Former whose 32 learned queries
    attend to each other causally (query i sees 0..i) and to the image tokens.
    """

    def __init__(self, model_cfg: DictConfig, *, text_input: bool = False, dropout: float = 0.0):
        """``text_input``/``dropout``: see `build_qformer` (training only; the defaults give the
        inference module, whose state dict is exactly the released file's)."""
        super().__init__()
        q = model_cfg.qformer
        self.ln_vision = nn.LayerNorm(model_cfg.vision.width, eps=1e-5)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_queries, q.hidden_size) * 0.02)
        self.qformer = build_qformer(q, q.num_layers, model_cfg.vision.width, text_input=text_input, dropout=dropout)
        self.register_buffer("causal_mask", torch.empty(1, 1, q.num_queries, q.num_queries), persistent=False)
        self._init_buffers()

    def _init_buffers(self) -> None:
        # Additive float mask: a boolean 4-D mask would be *added* as 0/1 under eager attention.
        n = self.causal_mask.shape[-1]
        if not self.causal_mask.is_meta:
            self.causal_mask.copy_(torch.full((n, n), float("-inf")).triu(1))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(image_tokens.float(), self.ln_vision.normalized_shape, self.ln_vision.weight.float(),
                         self.ln_vision.bias.float(), self.ln_vision.eps)
        dtype = self.query_tokens.dtype
        queries = self.query_tokens.expand(x.shape[0], -1, -1)
        return self.qformer(
            query_embeds=queries,
            attention_mask=self.causal_mask.to(dtype),
            encoder_hidden_states=x.to(dtype),
        ).last_hidden_state


checkpoint_filter_fn = KeyMap(
    (("ln_vision.", "ln_vision."), ("query_tokens", "query_tokens"), *bert_renames("Qformer", "qformer")),
    BERT_INNER,
)
"""``causal_qformer.pth`` (``ln_vision``, ``query_tokens``, ``Qformer.bert``) -> `CausalQFormer` keys."""
