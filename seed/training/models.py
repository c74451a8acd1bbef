"""Training models for the two SEED tokenizer stages, built from the tokenizer's stage modules.

Interface (shared with the loop in `seed.training.loop`)::

    model = build_model(cfg, device)    # cfg: the whole training config (DictConfig); train mode
    out = model(pixel_values, captions) # pixel_values float32 [B,3,S,S] (CLIP-normalized), captions list[str]
    out["loss"]                         # total loss, 0-d float32 tensor with grad
    out[<term>]                         # each logged term, detached 0-d tensors
    out["codes"]                        # stage 2 only: int64 [B,32]
    model.trainable_named_parameters()  # [(name, Parameter)] with requires_grad
    model.train()                       # keeps frozen parts as the original does
    model.export(folder)                # stage 2: a Tokenizer.save_pretrained folder
    model.trainable_state_dict() / load_trainable_state_dict(state)   # what a checkpoint holds
    model.to_device(device)             # on CUDA the frozen ViT's Linear/Conv become fp16 (as the original)
    model.original_name(name)           # our parameter name -> the original training code's

Training config keys this module reads (others belong to the loop):

    stage: 1 | 2
    objective: seed1 | seed2 | seed2_head   # stage 2 generation target (SEED-1 77 x D text, SEED-2 CLIP image;
                                        # seed2_head: with the committed code's 1-query Reverse Q-Former)
    model: {...}                        # the tokenizer's `model:` section (seed.config.ModelConfig)
    dropout: 0.1                        # Q-Former dropout in train mode (0 for exactness checks)
    itc: {embed_dim: 256, max_txt_len: 32, temp: 0.07, label_smoothing: 0.1}   # stage 1
    diffusion: {...} | null             # stage 2: decode settings written into the export
    init:
      vision: PATH                      # eva_vit_g.pth
      qformer: PATH | null              # stage 1: blip2_pretrained.pth; stage 2: a stage-1 checkpoint
      stage2: PATH | null               # stage 2 modules in training names; null: constructor init
      seed: 0                           # seed of every constructor init
      bert_tokenizer: DIR               # BertTokenizer (bert-base-uncased); [DEC] is added as bos
      bert_config: PATH | null          # BertConfig json (vocab, max positions); null: bert-base's
      clip_tokenizer: DIR               # SEED-1 objective: SD's CLIP tokenizer
      text_encoder: DIR                 # SEED-1 objective: SD's CLIPTextModel
      clip_vision: DIR                  # SEED-2 objective: CLIPVisionModelWithProjection
      bert_model: DIR | null            # bert-base-uncased weights (BertModel folder) for what the
                                        # original initialises from BERT (see `init_from_bert`)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import decoder as decoder_mod
from .. import qformer as qformer_mod
from .. import quantizer as quantizer_mod
from .. import vision as vision_mod
from ..checkpoint import KeyMap, assign_weights, read_state_dict
from ..config import resolve_path
from ..errors import CheckpointError, InputError
from . import losses

logger = logging.getLogger(__name__)

STAGE2_LOSS_WEIGHTS = {"loss_embed": 5.0, "loss_recon_s": 2.0, "loss_distil_text": 0.5, "loss_distil_image": 0.5}
"""The original stage-2 weights (fixed in its ``forward``): VQ, reconstruction, generation terms."""


def _opt(cfg: DictConfig | None, key: str, default: Any = None) -> Any:
    """``cfg.<key>`` (dotted) or ``default`` when absent or null."""
    if cfg is None:
        return default
    value = OmegaConf.select(cfg, key, default=None)
    return default if value is None else value


def _folder(path: str | None, key: str, what: str) -> Path:
    """An existing local folder for ``init.<key>``, else a `CheckpointError` saying what belongs there."""
    if path is None:
        raise CheckpointError(f"init.{key} is not set: it must name a local folder with {what}")
    p = resolve_path(path)
    if not p.is_dir():
        raise CheckpointError(f"init.{key}: folder not found: {p}. Put {what} there "
                              f"(e.g. with transformers' save_pretrained).")
    return p


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def run_frozen_vision(vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixels [B,3,S,S] -> ViT tokens [B,N,width], no grad; on CUDA under fp16 autocast (the
    original ran its fp16 ViT under AMP), on the CPU in fp32."""
    device = pixel_values.device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return vision(pixel_values)


def half_linear_conv(vision: nn.Module) -> None:
    """Cast the Linear/Conv weights to fp16, LayerNorms stay fp32 (BLIP-2's ``convert_weights_to_fp16``)."""
    for m in vision.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            m.half()


class _TrainingModel(nn.Module):
    """What both stages share: the frozen ViT, the interface, the device placement."""

    frozen: tuple[str, ...] = ()
    """Submodules that stay in eval mode whatever ``train()`` says (the original's ``disabled_train``)."""

    def train(self, mode: bool = True) -> _TrainingModel:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters ``[(name, parameter)]`` (requires_grad), in module order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters by name (detached; what a training checkpoint must hold)."""
        return {n: p.detach() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a `trainable_state_dict` back in, strictly (every trained parameter, right shapes)."""
        params = dict(self.trainable_named_parameters())
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        if missing or extra:
            raise CheckpointError(f"{source}: trainable parameters do not match the model: missing {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''}")
        with torch.no_grad():
            for n, p in params.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise CheckpointError(f"{source}: {n} has shape {tuple(state[n].shape)}, the model needs {tuple(p.shape)}")
                p.copy_(state[n])

    def to_device(self, device: str | torch.device) -> _TrainingModel:
        """Move to ``device``; on CUDA the ViT's Linear/Conv weights become fp16 (as the original)."""
        device = torch.device(device)
        self.to(device)
        if device.type == "cuda":
            half_linear_conv(self.vision)
        return self

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device


# --- stage 1 ---------------------------------------------------------------------------------------

TEXT_EMBEDDINGS_KEYMAP = KeyMap((("Qformer.bert.embeddings.word_embeddings.", "word_embeddings."),
                                 ("Qformer.bert.embeddings.position_embeddings.", "position_embeddings.")))
"""BLIP-2 / stage-1 checkpoint -> the Q-Former text embeddings (word + absolute position)."""

ITC_HEAD_KEYMAP = KeyMap((("vision_proj.", "vision_proj."), ("text_proj.", "text_proj."), ("temp", "temp")))
"""BLIP-2 / stage-1 checkpoint -> the two projections and the temperature."""


class ContrastiveHead(nn.Module):
    """``vision_proj``, ``text_proj`` (Linear hidden->embed_dim) and the learned temperature ``temp``."""

    def __init__(self, hidden: int, embed_dim: int, temp: float = 0.07):
        super().__init__()
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))


class Stage1Model(_TrainingModel):
    """Stage 1: the causal Q-Former trained with image-text contrast (ITC) against its own text path.

    Frozen: the ViT (eval, no grad). Trained: ln_vision, the query tokens, the whole Q-Former
    (both FFN paths, text embeddings), both projections, ``temp``. ``forward(pixel_values
    [B,3,S,S] float32, captions list[str])`` -> ``{"loss", "loss_itc", "temp"}``.
    """

    frozen = ("vision",)

    def __init__(self, model_cfg: DictConfig, bert_tokenizer: Any, *, embed_dim: int = 256,
                 max_txt_len: int = 32, max_positions: int = 512, pad_token_id: int = 0,
                 dropout: float = 0.1, temp: float = 0.07, label_smoothing: float = 0.1):
        super().__init__()
        from transformers import Blip2QFormerConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        h = model_cfg.qformer.hidden_size
        self.model_cfg = model_cfg
        self.tokenizer = bert_tokenizer
        self.max_txt_len = max_txt_len
        self.label_smoothing = label_smoothing
        self.vision = _freeze(vision_mod.build_vision_tower(model_cfg))
        self.qformer = qformer_mod.CausalQFormer(model_cfg, text_input=True, dropout=dropout)
        self.text_embeddings = Blip2TextEmbeddings(Blip2QFormerConfig(
            hidden_size=h, vocab_size=len(bert_tokenizer), max_position_embeddings=max_positions,
            pad_token_id=pad_token_id))
        # BERT init (bert-base-uncased is what the original starts from, then BLIP-2's weights)
        for emb in (self.text_embeddings.word_embeddings, self.text_embeddings.position_embeddings):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.text_embeddings.word_embeddings.weight[pad_token_id].zero_()
        self.itc = ContrastiveHead(h, embed_dim, temp)

    def load_start(self, vision_path: str | None, qformer_path: str | None, bert_path: str | None = None) -> None:
        """EVA ViT weights, then (``bert_path``) bert-base-uncased as the original's ``init_Qformer``,
        then a BLIP-2 stage-1 / our stage-1 checkpoint over the rest.

        ``qformer_path``: ``blip2_pretrained.pth`` layout (``ln_vision``, ``query_tokens``,
        ``Qformer.bert.*`` with the text path, ``vision_proj``, ``text_proj``, ``temp``; extras
        like ``itm_head`` and the LM head skipped), or a trainable state dict of this class.
        """
        load_vision(self.vision, vision_path)
        if bert_path is not None:
            init_from_bert(self.qformer.qformer, read_bert(bert_path), copy_query_ffn=True,
                           text_embeddings=self.text_embeddings)
        if qformer_path is None:
            logger.warning("init.qformer is null: the stage-1 Q-Former starts from %s",
                           "BERT (no BLIP-2 checkpoint)" if bert_path else "RANDOM weights")
            return
        qformer_path = weights_file(qformer_path)
        sd = read_state_dict(qformer_path)
        source = str(qformer_path)
        if any(k.startswith("Qformer.bert.") for k in sd):
            parts = [(self.qformer, qformer_mod.checkpoint_filter_fn), (self.text_embeddings, TEXT_EMBEDDINGS_KEYMAP),
                     (self.itc, ITC_HEAD_KEYMAP)]
        else:
            ours = KeyMap((("qformer.", ""),))
            parts = [(self.qformer, ours), (self.text_embeddings, KeyMap((("text_embeddings.", ""),))),
                     (self.itc, KeyMap((("itc.", ""),)))]
        for module, keymap in parts:
            wanted = module.state_dict().keys()
            assign_weights(module, {k: v for k, v in keymap(sd).items() if k in wanted}, source, keymap)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> BERT ids and attention mask, int64 [B,max_txt_len] each (right padding)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise InputError(f"captions must be a list of strings, got {type(captions).__name__}")
        t = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_txt_len,
                           return_tensors="pt")
        return t["input_ids"].to(self.device), t["attention_mask"].to(self.device)

    def forward(self, pixel_values: torch.Tensor, captions: Sequence[str],
                intermediates: bool = False) -> dict[str, torch.Tensor]:
        """-> ``loss`` (0-d, grad), ``loss_itc`` and ``temp`` (detached); with ``intermediates``
        also ``image_embeds``, ``causal_embeds``, ``text_cls``, ``image_feat``, ``text_feat``,
        ``sim_i2t``, ``sim_t2i``."""
        if pixel_values.shape[0] != len(captions):
            raise InputError(f"{pixel_values.shape[0]} images but {len(captions)} captions")
        image_embeds = run_frozen_vision(self.vision, pixel_values.to(self.device))
        causal = self.qformer(image_embeds)
        image_feat = F.normalize(self.itc.vision_proj(causal[:, -1]), dim=-1)
        ids, mask = self.tokenize(captions)
        text = self.qformer.qformer(query_embeds=self.text_embeddings(input_ids=ids), query_length=0,
                                    attention_mask=mask).last_hidden_state
        text_cls = text[:, 0]
        text_feat = F.normalize(self.itc.text_proj(text_cls), dim=-1)
        loss, sim_i2t, sim_t2i = losses.itc_loss(image_feat, text_feat, self.itc.temp, self.label_smoothing)
        out = {"loss": loss, "loss_itc": loss.detach(), "temp": self.itc.temp.detach()}
        if intermediates:
            out.update(image_embeds=image_embeds, causal_embeds=causal, text_cls=text_cls, image_feat=image_feat,
                       text_feat=text_feat, sim_i2t=sim_i2t, sim_t2i=sim_t2i)
        return out

    def original_name(self, name: str) -> str:
        """Our parameter name -> the original training code's (``Qformer.bert...``, ``vision_proj``...)."""
        for prefix, keymap in (("qformer.", qformer_mod.checkpoint_filter_fn),
                               ("text_embeddings.", TEXT_EMBEDDINGS_KEYMAP), ("itc.", ITC_HEAD_KEYMAP)):
            if name.startswith(prefix):
                return keymap.original(name[len(prefix):])
        return name


BERT_KEYMAP = KeyMap((("embeddings.LayerNorm.", "layernorm."), ("encoder.", "encoder.")), qformer_mod.BERT_INNER)
"""transformers ``BertModel`` -> ``Blip2QFormerModel`` keys (the word/position embeddings are separate)."""


def read_bert(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a transformers ``BertModel`` folder (e.g. bert-base-uncased), local files only."""
    from transformers import BertModel

    p = resolve_path(folder)
    if not p.is_dir():
        raise CheckpointError(f"init.bert_model: folder not found: {p}. Put bert-base-uncased there "
                              f"(BertModel.from_pretrained('bert-base-uncased').save_pretrained(...)).")
    return BertModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False).state_dict()


def init_from_bert(qformer: nn.Module, bert: Mapping[str, torch.Tensor], *, copy_query_ffn: bool,
                   text_embeddings: nn.Module | None = None) -> None:
    """The original's ``init_Qformer``: a Q-Former (``Blip2QFormerModel``) takes the BERT weights it
    has a twin for: embeddings LayerNorm, the first layers' self-attention and (with the text path)
    text FFN; cross-attention stays new. ``copy_query_ffn``: the query FFN starts as a copy of the
    text FFN (stage 1); else it stays new (stage 2's reverse Q-Former). ``text_embeddings``: also
    take the word (first rows; extra rows such as ``[DEC]`` stay new) and position embeddings.
    """
    mapped = BERT_KEYMAP(bert)
    own = qformer.state_dict()
    take = {k: v for k, v in mapped.items() if k in own}
    if copy_query_ffn:
        for k in own:
            twin = k.replace(".intermediate_query.", ".intermediate.").replace(".output_query.", ".output.")
            if twin != k and twin in mapped:
                take[k] = mapped[twin]
    wrong = [f"{k}: BERT {tuple(v.shape)}, Q-Former {tuple(own[k].shape)}" for k, v in take.items()
             if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"init.bert_model does not fit the Q-Former (hidden size?): {'; '.join(wrong[:3])}")
    qformer.load_state_dict(take, strict=False)
    if text_embeddings is not None:
        with torch.no_grad():
            for name in ("word_embeddings", "position_embeddings"):
                src, dst = bert[f"embeddings.{name}.weight"], getattr(text_embeddings, name).weight
                if src.shape[1] != dst.shape[1]:
                    raise CheckpointError(f"init.bert_model: {name} width {src.shape[1]}, the Q-Former's {dst.shape[1]}")
                n = min(len(src), len(dst))
                dst[:n].copy_(src[:n])
    logger.info("initialised %d Q-Former tensors from BERT", len(take))


def weights_file(path: str | Path) -> Path:
    """A weight file, or the ``model.safetensors`` of a checkpoint folder (ours: ``step_*/``)."""
    p = resolve_path(path)
    return p / "model.safetensors" if p.is_dir() else p


def load_vision(vision: nn.Module, path: str | None) -> None:
    """``eva_vit_g.pth`` into the ViT, strictly (blocks past the model's depth skipped); None: random."""
    if path is None:
        logger.warning("init.vision is null: the frozen ViT has RANDOM weights")
        return
    sd = vision_mod.checkpoint_filter_fn(read_state_dict(path))
    wanted = vision.state_dict().keys()
    assign_weights(vision, {k: v for k, v in sd.items() if k in wanted}, str(resolve_path(path)),
                   vision_mod.checkpoint_filter_fn)


# --- stage 2 ---------------------------------------------------------------------------------------

OBJECTIVES = {"seed1": "reverse_qformer", "seed2": "image", "seed2_head": "reverse_qformer"}
"""Stage-2 objective -> the decoder head (``model.decoder.head``) it trains. ``seed2_head``: the
committed training code's CLIP-image objective with its 1-query Reverse Q-Former head
(``model.decoder.num_queries: 1``), which the released SEED-2 weights do not have."""

_STAGE2_COMMON = (("encode_task_layer.", "quantizer.down."), ("quantize.embedding.", "quantizer.codebook."),
                  ("decode_task_layer.", "decoder.up."))
_RECON = (("pos_embed", "recon.pos_embed"), ("blocks.", "recon.blocks."))
STAGE2_KEYMAPS = {
    "seed1": KeyMap((*_STAGE2_COMMON, ("pos_embed_text", "decoder.pos_embed"), ("blocks_text.", "decoder.blocks."),
                     ("reverse_tokens_text", "decoder.queries"), ("distill_text_proj.", "decoder.proj."),
                     *qformer_mod.bert_renames("Reverse_Qformer_text", "decoder.qformer"), *_RECON),
                    qformer_mod.BERT_INNER),
    "seed2": KeyMap((*_STAGE2_COMMON, ("pos_embed_image", "decoder.pos_embed"), ("blocks_image.", "decoder.blocks."),
                     ("image_down.", "decoder.down."), ("distill_image_proj.", "decoder.proj."), *_RECON)),
    "seed2_head": KeyMap((*_STAGE2_COMMON, ("pos_embed_image", "decoder.pos_embed"), ("blocks_image.", "decoder.blocks."),
                          ("reverse_tokens", "decoder.queries"), ("distill_image_proj.", "decoder.proj."),
                          *qformer_mod.bert_renames("Reverse_Qformer", "decoder.qformer"), *_RECON),
                         qformer_mod.BERT_INNER),
}
"""The original stage-2 training names (``blip2_qformer_codebook_all_image``) -> our Stage2Model names.
(The released SEED-1 file names ``Reverse_Qformer_text``/``reverse_tokens_text`` without ``_text``.)"""


class Reconstruction(decoder_mod.Decoder):
    """Stage-2 training only: learned positions + the trunk's blocks, rebuilding the causal
    embeddings from the up-projected code vectors U [B,32,hidden] -> [B,32,hidden]."""

    def __init__(self, model_cfg: DictConfig):
        super().__init__(model_cfg)
        del self.up  # shares the decoder's up-projection

    def forward(self, up: torch.Tensor) -> torch.Tensor:
        return self.blocks(up + self.pos_embed)


class Stage2Model(_TrainingModel):
    """Stage 2: codebook, up/down projections, reconstruction and the generation head.

    Frozen: ViT (eval), ln_vision + causal Q-Former + query tokens (no grad, but in train mode,
    so their dropout is active as in the original). Trained: ``quantizer`` (down-projection,
    codebook), ``decoder`` (up-projection, trunk, head), ``recon``. ``objective``: "seed1"
    (77 x D head vs. the SD text encoder's last hidden state of the caption) or "seed2" (the
    SEED-2 image head vs. CLIP ``image_embeds`` of the same pixels).
    ``forward(pixel_values [B,3,S,S], captions)`` -> ``loss`` + ``loss_embed``, ``loss_recon_s``,
    ``loss_distil_text|image`` (weighted as logged by the original) and each ``*_unweighted``,
    ``codes`` int64 [B,32].
    """

    frozen = ("vision", "target_encoder")

    def __init__(self, model_cfg: DictConfig, objective: str, target_encoder: nn.Module,
                 clip_tokenizer: Any = None, *, dropout: float = 0.1, beta: float = 0.25):
        super().__init__()
        if objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        head = model_cfg.decoder.get("head", "reverse_qformer")
        if objective == "seed2_head" and model_cfg.decoder.num_queries != 1:
            raise InputError(f"objective=seed2_head needs model.decoder.num_queries=1, got {model_cfg.decoder.num_queries}")
        if head != OBJECTIVES[objective]:
            raise InputError(f"objective={objective} trains model.decoder.head={OBJECTIVES[objective]}, "
                             f"but the config has head={head}")
        self.model_cfg, self.objective, self.beta = model_cfg, objective, beta
        self.vision = _freeze(vision_mod.build_vision_tower(model_cfg))
        self.qformer = qformer_mod.CausalQFormer(model_cfg, dropout=dropout).requires_grad_(False)
        self.quantizer = quantizer_mod.Quantizer(model_cfg)
        self.decoder = decoder_mod.build_decoder(model_cfg)
        qformer_mod.set_dropout(self.decoder, dropout)
        self.recon = Reconstruction(model_cfg)
        with torch.no_grad():  # the original's constructor init: zero positions
            self.decoder.pos_embed.zero_()
            self.recon.pos_embed.zero_()
        self.target_encoder = _freeze(target_encoder)
        self.clip_tokenizer = clip_tokenizer
        self.gen_term = "loss_distil_text" if objective == "seed1" else "loss_distil_image"

    def load_start(self, vision_path: str | None, qformer_path: str | None, stage2_path: str | None,
                   bert_path: str | None = None) -> None:
        """EVA ViT; ln_vision + query tokens + causal Q-Former from a stage-1 checkpoint (the
        original's layout, e.g. ``causal_qformer_stage1.pth`` / ``causal_qformer.pth``, or our
        Stage1Model's names; its text path, projections and temp are skipped); optionally the
        trained modules in the original training names (``stage2_path``; else constructor init,
        where a Reverse Q-Former takes bert-base's first layers from ``bert_path`` as the original's)."""
        load_vision(self.vision, vision_path)
        if qformer_path is None:
            logger.warning("init.qformer is null: stage 2 starts from a RANDOM causal Q-Former")
        else:
            qformer_path = weights_file(qformer_path)
            sd = read_state_dict(qformer_path)
            keymap = (qformer_mod.checkpoint_filter_fn if any(k.startswith("Qformer.bert.") for k in sd)
                      else KeyMap((("qformer.", ""),)))
            wanted = self.qformer.state_dict().keys()
            assign_weights(self.qformer, {k: v for k, v in keymap(sd).items() if k in wanted},
                           str(resolve_path(qformer_path)), keymap)
        if stage2_path is None and hasattr(self.decoder, "qformer"):
            if bert_path is not None:
                init_from_bert(self.decoder.qformer, read_bert(bert_path), copy_query_ffn=False)
            else:
                logger.warning("init.bert_model is null: the Reverse Q-Former starts from random N(0, 0.02) "
                               "weights (the original: bert-base-uncased's first layers)")
        if stage2_path is not None:
            keymap = STAGE2_KEYMAPS[self.objective]
            sd = keymap(read_state_dict(stage2_path))
            for name in ("quantizer", "decoder", "recon"):
                module, prefix = getattr(self, name), f"{name}."
                assign_weights(module, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                               str(resolve_path(stage2_path)))

    def target(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """The generation target, no grad: SEED-1 the SD text encoder's ``last_hidden_state`` of the
        captions [B,77,D] (CLIP ids padded to 77, no attention mask); SEED-2 CLIP ``image_embeds`` [B,D]."""
        device = self.device
        with torch.no_grad():
            if self.objective == "seed1":
                ids = self.clip_tokenizer(list(captions), truncation=True, max_length=77, padding="max_length",
                                          return_tensors="pt")["input_ids"].to(device)
                return self.target_encoder(input_ids=ids).last_hidden_state.float()
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                return self.target_encoder(pixel_values=pixel_values).image_embeds.float()

    def forward(self, pixel_values: torch.Tensor, captions: Sequence[str],
                intermediates: bool = False) -> dict[str, torch.Tensor]:
        """-> the losses and ``codes``; with ``intermediates`` also ``causal_embeds``, ``z_e``,
        ``z_q``, ``decoded``, ``recon``, ``gen_embeds`` and ``target``."""
        if pixel_values.shape[0] != len(captions):
            raise InputError(f"{pixel_values.shape[0]} images but {len(captions)} captions")
        pixel_values = pixel_values.to(self.device)
        image_embeds = run_frozen_vision(self.vision, pixel_values)
        with torch.no_grad():
            causal = self.qformer(image_embeds)
        z = self.quantizer.down(causal)
        codes = self.quantizer.nearest(z)
        loss_vq, z_q = quantizer_mod.vq_loss(z, self.quantizer.codebook(codes), self.beta)
        up = self.decoder.up(z_q)
        recon = self.recon(up)
        loss_rec = losses.cosine_recon_loss(recon, causal)
        gen = self.decoder.head(self.decoder.trunk(z_q))
        if self.objective == "seed2_head":
            gen = gen[:, 0]  # the one reverse query -> [B,D]
        target = self.target(pixel_values, captions)
        loss_gen = losses.mse(gen, target)
        w = STAGE2_LOSS_WEIGHTS
        terms = {"loss_embed": loss_vq, "loss_recon_s": loss_rec, self.gen_term: loss_gen}
        out = {"loss": sum(w[k] * v for k, v in terms.items())}
        for k, v in terms.items():
            out[k] = (w[k] * v).detach()
            out[f"{k}_unweighted"] = v.detach()
        out["codes"] = codes.detach()
        if intermediates:
            out.update(causal_embeds=causal, z_e=z, z_q=z_q, decoded=up, recon=recon, gen_embeds=gen, target=target)
        return out

    def original_name(self, name: str) -> str:
        """Our parameter name -> the original training code's."""
        return STAGE2_KEYMAPS[self.objective].original(name)

    def tokenizer_config(self, diffusion: DictConfig | Mapping | None = None) -> DictConfig:
        """The `seed.Tokenizer` config of the trained model (``diffusion``: the decode settings)."""
        from ..config import validate

        layers = [{"model": OmegaConf.to_container(self.model_cfg, resolve=True)}]
        if diffusion is not None:
            layers.append({"diffusion": OmegaConf.to_container(diffusion, resolve=True)
                           if isinstance(diffusion, DictConfig) else dict(diffusion)})
        return validate(layers, where="the exported tokenizer config")

    def to_tokenizer(self, diffusion: DictConfig | Mapping | None = None):
        """A `seed.Tokenizer` (CPU, fp32, eval) holding copies of this model's vision tower,
        causal Q-Former, quantizer and decoder weights."""
        from ..tokenizer import Tokenizer

        with torch.device("meta"):
            tok = Tokenizer(self.tokenizer_config(diffusion))
        for name in ("vision", "qformer", "quantizer", "decoder"):
            state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                     for k, v in getattr(self, name).state_dict().items()}
            assign_weights(getattr(tok, name), state, f"the stage-2 model's {name}")
        return tok._ready("cpu", torch.float32)

    def export(self, folder: str | Path, diffusion: DictConfig | Mapping | None = None) -> Path:
        """Write a `seed.Tokenizer.save_pretrained` folder (``config.yaml`` + ``model.safetensors``)
        that `Tokenizer.from_pretrained` loads: encode, embed and decode work as with released weights.

        ``diffusion``: the config's decode settings (default: the training config's ``diffusion``
        section when `build_model` had one, else the tokenizer config's defaults).
        """
        return self.to_tokenizer(diffusion if diffusion is not None else getattr(self, "diffusion_cfg", None)
                                 ).save_pretrained(folder)


# --- building from the training config -------------------------------------------------------------

def bert_tokenizer(folder: str | Path) -> Any:
    """The Q-Former's BertTokenizer (bert-base-uncased's files) with the bos token ``[DEC]`` added."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_model(cfg: DictConfig, device: str | torch.device | None = None) -> Stage1Model | Stage2Model:
    """The training model of ``cfg.stage`` (1 or 2), with its starting weights (see the module doc).

    Constructor init comes from ``init.seed`` (default 0), so every rank builds the same model.
    ``device``: where to put it (`_TrainingModel.to_device`); default: stay on the CPU.
    """
    stage = int(_opt(cfg, "stage", 1))
    init = _opt(cfg, "init", OmegaConf.create({}))
    model_cfg = cfg.model
    dropout = float(_opt(cfg, "dropout", 0.1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_opt(init, "seed", 0)))
        if stage == 1:
            tok = bert_tokenizer(_folder(_opt(init, "bert_tokenizer"), "bert_tokenizer",
                                         "bert-base-uncased's tokenizer files (vocab.txt)"))
            bert_cfg_path = _opt(init, "bert_config")
            bert = json.loads(resolve_path(bert_cfg_path).read_text()) if bert_cfg_path else {}
            model = Stage1Model(model_cfg, tok, embed_dim=int(_opt(cfg, "itc.embed_dim", 256)),
                                max_txt_len=int(_opt(cfg, "itc.max_txt_len", 32)),
                                max_positions=int(bert.get("max_position_embeddings", 512)),
                                pad_token_id=int(bert.get("pad_token_id", 0)), dropout=dropout,
                                temp=float(_opt(cfg, "itc.temp", 0.07)),
                                label_smoothing=float(_opt(cfg, "itc.label_smoothing", 0.1)))
            model.load_start(_opt(init, "vision"), _opt(init, "qformer"), _opt(init, "bert_model"))
        elif stage == 2:
            objective = str(_opt(cfg, "objective", "seed1"))
            if objective == "seed1":
                from transformers import CLIPTextModel, CLIPTokenizer

                clip_tok = CLIPTokenizer.from_pretrained(str(_folder(_opt(init, "clip_tokenizer"), "clip_tokenizer",
                                                         "SD's CLIP tokenizer")), local_files_only=True)
                encoder = CLIPTextModel.from_pretrained(str(_folder(_opt(init, "text_encoder"), "text_encoder",
                                                        "SD v1.4's CLIP text encoder")), local_files_only=True)
            else:
                from transformers import CLIPVisionModelWithProjection

                clip_tok = None
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    str(_folder(_opt(init, "clip_vision"), "clip_vision", "CLIP-ViT-H-14 (with projection)")),
                    local_files_only=True)
            model = Stage2Model(model_cfg, objective, encoder, clip_tok, dropout=dropout)
            model.load_start(_opt(init, "vision"), _opt(init, "qformer"), _opt(init, "stage2"), _opt(init, "bert_model"))
            model.diffusion_cfg = _opt(cfg, "diffusion")
        else:
            raise InputError(f"stage must be 1 or 2, got {stage}")
    model.train()
    return model.to_device(device) if device is not None else model
