"""Stage 2: ln_vision and the causal Q-Former (32 queries), from transformers' ``Blip2QFormerModel``.

Also home of the BERT -> transformers key mapping that the Reverse Q-Former shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from .checkpoint import KeyMap


def build_qformer(q: DictConfig, num_layers: int, encoder_width: int) -> Blip2QFormerModel:
    """A BLIP-2 Q-Former: BERT-base shaped, cross-attention every ``q.cross_attention_every`` layers."""
    config = Blip2QFormerConfig(
        hidden_size=q.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_every,
        encoder_hidden_size=encoder_width,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "sdpa"
    return Blip2QFormerModel(config)


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

    def __init__(self, model_cfg: DictConfig):
        super().__init__()
        q = model_cfg.qformer
        self.ln_vision = nn.LayerNorm(model_cfg.vision.width, eps=1e-5)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_queries, q.hidden_size) * 0.02)
        self.qformer = build_qformer(q, q.num_layers, model_cfg.vision.width)
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
