"""Stage 1: the EVA-CLIP ViT-g/14 vision tower (BLIP-2's, without its final norm), from timm."""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig
from timm.models.eva import Eva
from torch import nn

from .checkpoint import KeyMap


def build_vision_tower(model_cfg: DictConfig) -> Eva:
    """The vision tower: images [B,3,S,S] -> all tokens [B,1+(S/p)^2,width] (no pooling, no head).

    Pre-norm blocks, q/v biases (no k bias), exact GELU, class token, learned absolute
    positions, no final norm (all tokens leave the last block as they are).
    """
    v = model_cfg.vision
    return Eva(
        img_size=model_cfg.image_size,
        patch_size=v.patch_size,
        embed_dim=v.width,
        depth=v.depth,
        num_heads=v.heads,
        mlp_ratio=v.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="",
        use_fc_norm=False,
        use_post_transformer_norm=False,
    )


checkpoint_filter_fn = KeyMap((("", ""),))
"""``eva_vit_g.pth`` holds bare EVA keys, our names too. BLIP-2 builds the 40-block EVA and drops
its last block; blocks past ``depth`` in the file are skipped (the model has no such keys)."""
