"""Stage 4: codes -> generation embeddings.

Shared by SEED-1 and SEED-2: the up-projection, learned positions and 4 bidirectional timm
blocks (`Decoder`). Then one head per variant, chosen by ``model.decoder.head``:

- ``reverse_qformer`` (SEED-1, `ReverseQFormerDecoder`): a 77-query Reverse Q-Former and a
  projection -> [B,77,output_dim], the SD v1.4 text conditioning.
- ``image`` (SEED-2, `ImageDecoder`): ``image_down`` per token, flatten, ``distill_image_proj``
  -> [B,output_dim], the SD 2.1 unCLIP image embedding.
"""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import Block
from torch import nn

from .checkpoint import KeyMap
from .errors import InputError
from .qformer import BERT_INNER, bert_renames, build_qformer

HEADS = ("reverse_qformer", "image")
"""The values of ``model.decoder.head``."""


class Decoder(nn.Module):
    """The shared trunk: code vectors [B,32,dim] -> hidden states [B,32,hidden].

    Linear dim->dim, tanh, Linear dim->hidden; + learned positions; ``num_blocks`` bidirectional
    pre-norm timm blocks (qkv bias, exact GELU, MLP ratio 4, LayerNorm eps 1e-6). Subclasses add
    the head (`head`).
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

    def trunk(self, code_vectors: torch.Tensor) -> torch.Tensor:
        """Code vectors [B,32,dim] -> block outputs [B,32,hidden]."""
        return self.blocks(self.up(code_vectors) + self.pos_embed)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, code_vectors: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(code_vectors))


class ReverseQFormerDecoder(Decoder):
    """SEED-1: code vectors [B,32,dim] -> generation embeddings [B,77,output_dim] (SD text conditioning).

    The trunk, then a Reverse Q-Former whose 77 queries cross-attend to the block outputs;
    Linear hidden->output_dim.
    """

    def __init__(self, model_cfg: DictConfig):
        super().__init__(model_cfg)
        q, d = model_cfg.qformer, model_cfg.decoder
        h = q.hidden_size
        self.queries = nn.Parameter(torch.randn(1, d.num_queries, h) * 0.02)
        self.qformer = build_qformer(q, d.reverse_layers, h)
        self.proj = nn.Linear(h, d.output_dim)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(hidden.shape[0], -1, -1)
        return self.proj(self.qformer(query_embeds=queries, encoder_hidden_states=hidden).last_hidden_state)


class ImageDecoder(Decoder):
    """SEED-2: code vectors [B,32,dim] -> one image embedding [B,output_dim] (SD 2.1 unCLIP's).

    The trunk, then per token ``down``: Linear hidden->256, ReLU, Linear 256->128, ReLU,
    Linear 128->32 (no biases); flatten row-major to [B,32*32]; ``proj`` Linear 1024->output_dim.
    """

    DOWN = (256, 128, 32)

    def __init__(self, model_cfg: DictConfig):
        super().__init__(model_cfg)
        q, d = model_cfg.qformer, model_cfg.decoder
        a, b, c = self.DOWN
        self.down = nn.Sequential(nn.Linear(q.hidden_size, a, bias=False), nn.ReLU(),
                                  nn.Linear(a, b, bias=False), nn.ReLU(), nn.Linear(b, c, bias=False))
        self.proj = nn.Linear(q.num_queries * c, d.output_dim)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.down(hidden).flatten(1))


def head_of(model_cfg: DictConfig) -> str:
    """``model.decoder.head``, checked: one of `HEADS` (default ``reverse_qformer``), else `InputError`."""
    head = model_cfg.decoder.get("head", "reverse_qformer")
    if head not in HEADS:
        raise InputError(f"model.decoder.head must be one of {', '.join(HEADS)}, got {head!r}")
    return head


def build_decoder(model_cfg: DictConfig) -> Decoder:
    """The decoder ``model.decoder.head`` names (see `HEADS`)."""
    return {"reverse_qformer": ReverseQFormerDecoder, "image": ImageDecoder}[head_of(model_cfg)](model_cfg)


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
"""SEED-1 ``seed_tokenizer.pth`` -> `ReverseQFormerDecoder` keys (its image-side ``pos_embed``/``blocks``
are training-only)."""

image_checkpoint_filter_fn = KeyMap(
    (
        ("decode_task_layer.", "up."),
        ("pos_embed_image", "pos_embed"),
        ("blocks_image.", "blocks."),
        ("image_down.", "down."),
        ("distill_image_proj.", "proj."),
    ),
)
"""SEED-2 ``seed_quantizer.pt`` -> `ImageDecoder` keys (its ``pos_embed``/``blocks``, the training-time
reconstruction of the causal embeddings, are not used)."""

KEYMAPS = {"reverse_qformer": checkpoint_filter_fn, "image": image_checkpoint_filter_fn}
"""The original file's key map of each head."""
