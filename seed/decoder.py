"""Stage 4: codes -> generation embeddings (up-projection, 4 blocks, Reverse Q-Former, projection)."""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import Block
from torch import nn

from .checkpoint import KeyMap
from .qformer import BERT_INNER, bert_renames, build_qformer


class Decoder(nn.Module):
    """Code vectors [B,32,dim] -> generation embeddings [B,77,output_dim] (the SD text conditioning).

    Linear dim->dim, tanh, Linear dim->hidden; + learned positions; ``num_blocks`` bidirectional
    pre-norm timm blocks; a Reverse Q-Former whose 77 queries cross-attend to the block outputs;
    Linear hidden->output_dim.
    """

    def __init__(self, model_cfg: DictConfig):
        super().__init__()
        q, d, c = model_cfg.qformer, model_cfg.decoder, model_cfg.codebook
        h = q.hidden_size
        self.up = nn.Sequential(nn.Linear(c.dim, c.dim), nn.Tanh(), nn.Linear(c.dim, h))
        self.pos_embed = nn.Parameter(torch.randn(1, q.num_queries, h) * 0.02)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(h, d.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(d.num_blocks)])
        self.queries = nn.Parameter(torch.randn(1, d.num_queries, h) * 0.02)
        self.qformer = build_qformer(q, d.reverse_layers, h)
        self.proj = nn.Linear(h, d.output_dim)

    def forward(self, code_vectors: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.up(code_vectors) + self.pos_embed)
        queries = self.queries.expand(x.shape[0], -1, -1)
        return self.proj(self.qformer(query_embeds=queries, encoder_hidden_states=x).last_hidden_state)


checkpoint_filter_fn = KeyMap(
    (
        ("decode_task_layer.", "up."),
        ("pos_embed_text", "pos_embed"),
        ("blocks_text.", "blocks."),
        ("reverse_tokens", "queries"),
        ("distill_text_proj.", "proj."),
        *bert_renames("Reverse_Qformer", "qformer"),
    ),
    BERT_INNER,
)
"""``seed_tokenizer.pth`` -> `Decoder` keys (its image-side ``pos_embed``/``blocks`` are training-only)."""
