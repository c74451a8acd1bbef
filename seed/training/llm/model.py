"""The SEED-LLaMA training model: an HF causal LM with the image tokens, LoRA or full fine-tuning.

What the original does (``src/model/peft_model.py``, spec section 1), step by step:

1. `load_base`: any Hugging Face causal LM (LLaMA/Vicuna by default), in the dtype asked for.
2. `resize_for_tokens`: ``resize_token_embeddings(len(tokenizer))`` with the new rows of the
   embedding and of ``lm_head`` drawn from N(0, ``initializer_range``) (transformers 4.30's
   init; current transformers default to mean-resizing, which we turn off), or copied from a
   file (`load_init`, the parity fixture's recorded rows).
3. `apply_lora`: ``peft`` LoRA (r 16, alpha 32, dropout 0.05 on the 7 projections) with
   ``embed_tokens``, ``lm_head`` and every RMSNorm trained in full (`modules_to_save`: the
   model's own input/output embeddings and norm layers, any architecture; a name matching no
   module is refused), or nothing (full fine-tuning: every parameter trains).
4. `merge`: ``merge_and_unload`` (``W + alpha/r * B A``, the trained copies replace the
   originals), as ``merge_lora_weights.py``; `export` writes the merged model (safetensors), the
   tokenizer with the image tokens, and the adapter alone (peft format).

Parameter names are peft's (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``);
`trainable_named_parameters` lists what trains, without peft's unused ``original_module`` copies
(peft 0.4.0, the original's, also marked those trainable; they never get a gradient).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ...errors import CheckpointError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
"""The original's LoRA targets: every attention and MLP projection."""
MODULES_TO_SAVE = ("embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm")
"""The original's ``modules_to_save`` (LLaMA names; peft matches by name suffix, so ``norm`` is the
final RMSNorm): what `modules_to_save` picks by default on a LLaMA."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """``peft.LoraConfig`` values; the defaults are the original's (``configs/model/vicuna_7b_lora.yaml``).
    Also the ``model.lora`` section of the training config."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    modules_to_save: Optional[list[str]] = None
    """Trained in full next to LoRA (peft's name-suffix match; see `modules_to_save`). null: the
    model's input and output embeddings and every normalization layer (on a LLaMA the original's
    `MODULES_TO_SAVE`). ``embed_tokens`` / ``lm_head`` always name the model's own input / output
    embeddings (GPT-2 ``wte``, GPT-NeoX ``embed_in``...); a name that matches no module is an error."""


def load_base(path: str | os.PathLike, dtype: str = "float32") -> PreTrainedModel:
    """An HF causal LM from a folder (or a hub name, when the cache or network has it), weights in ``dtype``.

    ``use_cache`` is turned off (training). Raises `CheckpointError` when it cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise InputError(f"model dtype {dtype!r}: must be one of {sorted(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    except Exception as e:  # transformers raises OSError/ValueError/... with its own messages
        raise CheckpointError(f"{path}: cannot load a causal LM ({type(e).__name__}: {e})") from None
    model.config.use_cache = False
    return model


def tiny_base(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
              seed: int = 0) -> PreTrainedModel:
    """A tiny random LLaMA (fp32), the same on every call with the same arguments (tests, tiny recipes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def resize_for_tokens(model: PreTrainedModel, vocab_size: int) -> PreTrainedModel:
    """Resize the input embedding and ``lm_head`` to ``vocab_size`` rows, as transformers 4.30.2.

    The new rows of both are N(0, ``config.initializer_range``) draws from the global torch RNG
    (not mean-resized); the old rows are kept; no ``padding_idx``. A model already that large is
    left as it is (an SFT start from a merged pretraining model); a smaller target is an `InputError`.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size == old:
        return model
    if vocab_size < old:
        raise InputError(f"the tokenizer has {vocab_size} tokens but the model already has {old} embedding rows")
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:].normal_(0.0, std)
    model.get_input_embeddings().padding_idx = None
    return model


def _matches(module: str, name: str) -> bool:
    """peft's rule for ``modules_to_save``: the module's name is ``name`` or ends with ``.name``."""
    return module == name or module.endswith("." + name)


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer with its own weights (LayerNorm, RMSNorm, LlamaRMSNorm, ...)."""
    kind = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")
    return kind and any(True for _ in module.parameters(recurse=False))


def modules_to_save(model: PreTrainedModel, names: Sequence[str] | None = None) -> list[str]:
    """The ``modules_to_save`` for peft on ``model``, each matching at least one of its modules.

    ``names`` None: the input and output embeddings (found with the model's own
    ``get_input_embeddings()``/``get_output_embeddings()``) and every normalization layer (by
    last name, e.g. LLaMA ``input_layernorm``, ``post_attention_layernorm``, ``norm``; GPT-2
    ``ln_1``, ``ln_2``, ``ln_f``). In ``names``, ``embed_tokens`` and ``lm_head`` stand for the
    model's own input and output embeddings whatever they are called (GPT-2 ``transformer.wte``,
    GPT-NeoX ``gpt_neox.embed_in``); any other name is matched as peft does (by name suffix).
    Raises `seed.InputError` naming an entry that matches no module (peft would ignore it and
    leave, say, the image tokens' embedding rows random for the whole run)."""
    paths = {id(m): n for n, m in model.named_modules()}
    out_emb = model.get_output_embeddings()
    aliases = {"embed_tokens": paths.get(id(model.get_input_embeddings())),
               "lm_head": paths.get(id(out_emb)) if out_emb is not None else None}
    modules = dict(model.named_modules())
    if names is None:
        norms = [n for n, m in modules.items() if _is_norm(m)]
        leaves = dict.fromkeys(n.rsplit(".", 1)[-1] for n in norms)
        # a last name that also names another kind of module: the norms' full names instead
        exact = all(_is_norm(m) for n, m in modules.items() if any(_matches(n, leaf) for leaf in leaves))
        names = [a for a in aliases.values() if a] + list(leaves if exact else norms)
    out = []
    for name in names:
        name = aliases.get(name) or name
        if not any(_matches(n, name) for n in modules):
            emb = ", ".join(f"{k}: {v}" for k, v in aliases.items() if v)
            norms = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_norm(m)})
            raise InputError(f"model.lora.modules_to_save: {name!r} matches no module of {type(model).__name__} "
                             f"(its embeddings: {emb}; its norm layers: {', '.join(norms) or 'none'}); name modules "
                             f"it has, or leave the key null for the embeddings and every norm layer")
        if name not in out:
            out.append(name)
    return out


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model (``bias="none"``, task CAUSAL_LM, peft's init:
    A kaiming-uniform, B zero); the `modules_to_save` are trained in full (tied input and output
    embeddings stay tied: one trained copy)."""
    from peft import LoraConfig, get_peft_model

    save = modules_to_save(model, None if lora.modules_to_save is None else list(lora.modules_to_save))
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        task_type="CAUSAL_LM", target_modules=list(lora.target_modules),
                        modules_to_save=save or None, ensure_weight_tying=tied)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. peft's NoMatchingPeftModuleError: no module matches target_modules
        raise InputError(f"model.lora.target_modules {list(lora.target_modules)} / modules_to_save "
                         f"{save}: {e}") from None


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of what trains, in ``named_parameters`` order, without peft's unused
    ``original_module`` copies."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".original_module." not in n]


def freeze_originals(model: nn.Module) -> None:
    """Turn ``requires_grad`` off on peft's ``original_module`` copies (never used in the forward)."""
    for n, p in model.named_parameters():
        if ".original_module." in n:
            p.requires_grad_(False)


def load_init(model: nn.Module, path: str | os.PathLike, old_vocab: int) -> None:
    """Copy recorded initial values into a resized LoRA model: ``embed_tokens_new_rows`` and
    ``lm_head_new_rows`` [V_new - old_vocab, D] (rows ``old_vocab..``) and every
    ``...lora_A.default.weight`` by its peft name (the parity fixture's ``init.safetensors``).

    The embedding/lm_head rows go into the base weights and into peft's trained copies. Raises
    `CheckpointError` for a missing LoRA name or a wrong shape.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, suffix in (("embed_tokens_new_rows", "embed_tokens"), ("lm_head_new_rows", "lm_head")):
            if key not in tensors:
                continue
            rows = tensors.pop(key)
            hits = [p for n, p in params.items()
                    if (n.endswith(f"{suffix}.weight") or n.endswith(f"{suffix}.modules_to_save.default.weight")
                        or n.endswith(f"{suffix}.original_module.weight"))]
            if not hits:
                raise CheckpointError(f"{path}: {key}: the model has no {suffix}")
            for p in hits:
                if p.shape[0] != old_vocab + rows.shape[0] or p.shape[1] != rows.shape[1]:
                    raise CheckpointError(f"{path}: {key} {tuple(rows.shape)} does not fit {suffix} "
                                          f"{tuple(p.shape)} from row {old_vocab}")
                p[old_vocab:] = rows.to(p.dtype)
        for name, value in tensors.items():
            if name not in params:
                raise CheckpointError(f"{path}: {name}: no such parameter in the model")
            if params[name].shape != value.shape:
                raise CheckpointError(f"{path}: {name}: shape {tuple(value.shape)}, the model's is "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(value)


def build_model(base: str | os.PathLike | PreTrainedModel, vocab_size: int, *, lora: LoraSettings | None,
                dtype: str = "float32", gradient_checkpointing: bool = False,
                init: str | os.PathLike | None = None) -> nn.Module:
    """The training model: ``base`` (a folder, hub name or model) resized to ``vocab_size`` tokens,
    LoRA per ``lora`` (None: full fine-tuning), trainable parameters in fp32 (the frozen base stays
    in ``dtype``), ``init``: recorded new rows + lora_A (`load_init`) instead of fresh draws.
    """
    model = load_base(base, dtype) if isinstance(base, (str, os.PathLike)) else base
    model.config.use_cache = False
    old_vocab = model.get_input_embeddings().weight.shape[0]
    resize_for_tokens(model, vocab_size)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, lora)
        freeze_originals(model)
    else:
        model.requires_grad_(True)
    if init is not None:
        load_init(model, init, old_vocab)
    for _, p in trainable_named_parameters(model):
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's loss: the model's own shifted cross-entropy, token mean over ``labels != -100``.

    ``input_ids``/``labels`` int64 [B, T]. No attention mask is passed: as the original (causal
    attention only), which with right padding gives the same loss (pads come after every real
    token and carry label -100) and lets attention use its causal fast path.
    """
    return model(input_ids=input_ids, labels=labels, use_cache=False).loss


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation of ``model``'s config (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def flat_packing(model: nn.Module) -> bool:
    """Whether packed rows must go to ``model`` as ONE row ([1, R x L], `flatten_rows`):
    flash-attention separates packed samples by their position ids only in a batch of one row."""
    return "flash" in attn_implementation(model)


def flatten_rows(batch: dict) -> dict:
    """A packed batch's tensors [R, L] -> [1, R x L] (the same samples and labels: every row starts
    with a sample whose first label is -100, so the shifted loss does not cross rows)."""
    return {k: v.reshape(1, -1) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_packing(model: nn.Module, amp: torch.dtype | None = None) -> None:
    """Refuse (`InputError`) a model whose attention lets packed samples see each other.

    A probe of two rows, each two 4-token samples with position ids [0..3, 0..3] (flattened to one
    row for flash-attention, as the trainer does), in eval mode (no dropout, no random draws) under
    ``amp`` autocast: the gradient of every second sample's logits with respect to its row's first
    sample's input embeddings must be exactly zero. Masked attention weights are exactly 0, so a
    model that keeps samples apart passes whatever its dtype; one whose mask ignores the position
    ids (an attention implementation outside transformers' mask functions, an architecture whose
    masks do not follow position ids) fails. No parameter gradient is accumulated."""
    import contextlib

    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device).reshape(2, 8) * 7 + 3) % int(model.config.vocab_size)
    pos = torch.arange(4, device=device).repeat(2, 2)
    second = torch.arange(8, device=device).repeat(2, 1) >= 4  # the second sample of each row
    batch = {"ids": ids, "pos": pos, "second": second}
    if flat_packing(model):
        batch = flatten_rows(batch)
    was_training = model.training
    model.eval()
    try:
        cast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.enable_grad(), cast:
            x = model.get_input_embeddings()(batch["ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, position_ids=batch["pos"], use_cache=False).logits
            (grad,) = torch.autograd.grad(logits[batch["second"]].float().sum(), x)
    finally:
        model.train(was_training)
    second = batch["second"]
    if grad[~second].abs().max().item() != 0 or grad[second].abs().max().item() == 0:
        impl = attn_implementation(model)
        name = type(model.get_base_model() if is_peft(model) else model).__name__
        raise InputError(f"data.pack: this model's attention ({name}, attn_implementation {impl!r}) "
                         "lets packed samples attend to each other; use attn_implementation 'sdpa' or 'eager' "
                         "(or 'flash_attention_2' on GPUs) with a model whose attention masks follow position ids "
                         "(LLaMA, Mistral, Qwen2, GPT-2...), or set data.pack=false (and data.pad_to=longest)")


def merge(model: nn.Module) -> PreTrainedModel:
    """A plain HF model: LoRA merged (``W + alpha/r * B A``), peft's trained copies in place of the
    originals (``merge_and_unload``); a model without LoRA is returned as it is."""
    return model.merge_and_unload() if is_peft(model) else model


def export(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out: str | os.PathLike,
           dtype: str | None = None, in_place: bool = False) -> Path:
    """Write ``out/`` = the merged model (``model.safetensors``, ``config.json``) + the tokenizer
    (with its image tokens) + ``out/adapter/`` (the peft adapter alone, when ``model`` has LoRA).

    ``dtype``: cast the merged weights (e.g. ``bfloat16``); None: as trained. ``in_place``: merge
    into ``model`` itself (no second copy in memory; ``model`` is then spent), else into a copy.
    """
    import copy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    merged = merge(model if in_place else copy.deepcopy(model))
    if dtype is not None:
        merged = merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def peft040_name(name: str) -> str:
    """A current peft parameter name -> the name peft 0.4.0 (the original's) gave it: LoRA-wrapped
    layers keep their own weight as ``<module>.base_layer.weight`` now, ``<module>.weight`` then;
    LoRA (``lora_A.default.weight``) and ``modules_to_save`` names are unchanged."""
    return name.replace(".base_layer.", ".")


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """``{"trainable": n, "total": n}`` (unique parameters; peft's unused originals counted as frozen)."""
    trainable = sum(p.numel() for _, p in trainable_named_parameters(model))
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
