"""The SEED-LLaMA training recipe: model + data + the original's step, on the shared run machinery.

``train(cfg, resume=...)`` (``scripts/train_llama.py``) does, on every rank of a torchrun job (or
one process):

1. `seed.training.run.Run`: process group, output folder, the resumed checkpoint and its config.
2. The tokenizer with the image tokens (`load_tokenizer`) and the model (`build`): the base LM
   resized to the tokenizer, LoRA or full fine-tuning (`seed.training.llm.model`), built from
   ``train.seed`` so that every rank starts from the same weights; a resumed run then loads the
   checkpoint's trainable tensors.
3. The original's optimizer and schedule (`seed.training.llm.optim`): old HF AdamW on every
   trainable tensor, warmup + cosine to ``min_lr_ratio`` over ``train.schedule_steps`` (null:
   ``max_steps`` of the run's start, saved in the checkpoints), clip, lr 0 on the first step.
4. The data (`seed.training.llm.data.LlmData`): one source per global micro-batch, each rank its
   share; resumed from the checkpoint's position.
5. The step: ``grad_accum`` micro-batches, each loss the token mean of its GLOBAL micro-batch
   (sum over all ranks' learned tokens / their count: the same number for 1 process x 2B and
   2 processes x B), divided by ``grad_accum``; clip; step; schedule. A non-finite loss stops the
   run before the update (exit status 3), keeping the last good checkpoint. The loss's logits are
   computed ``train.loss_chunk`` learned tokens at a time (`seed.training.llm.loss`; null: HF's
   plain loss over the whole logits).
6. ``OUT/metrics.jsonl`` per step (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
   ``padding``, ``truncated`` (share of the step's samples cut by ``max_length``), ``sources``,
   ``learned_tokens``, ``empty_micro_batches``: micro-batches without a learned token, warned; a
   run in which no step learned anything is an `InputError` before its last checkpoint and export;
   on checkpoint steps ``data``: the per-source counts of rows, samples, dropped, bad rows and
   truncated samples); checkpoints ``OUT/checkpoints/step_XXXXXXXX/`` (trainable tensors by
   name + optimizer, scheduler, data position, every rank's RNG states); at the end ``OUT/export/``
   (`seed.training.llm.model.export`).

Parallelism: ``train.parallel=ddp`` wraps the model in DistributedDataParallel; ``fsdp`` shards
parameters, gradients and optimizer state with FSDP2 (``fully_shard`` per decoder layer) for
7B-14B models. Both run on gloo (CPU) and NCCL (GPUs) and write the same checkpoint contents
(whole trainable tensors; the optimizer state keyed by parameter name), so a checkpoint resumes
under either on any number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ...errors import CheckpointError, InputError
from .. import card
from ..run import Run, unwrap
from . import model as M
from . import optim as O
from .config import LlamaTrainConfig, check_llama_train_config
from .loss import loss_model

logger = logging.getLogger(__name__)


# --- tokenizer and model -------------------------------------------------------------------------

def load_tokenizer(mcfg: DictConfig) -> Any:
    """The HF tokenizer of ``model.tokenizer`` (null: the base's; ``tiny``: seed's tiny
    SentencePiece tokenizer) with the image tokens (added when missing); pad = unk, as the original."""
    from ... import llm
    from ...llama import TINY_LLAMA_TOKENIZER, _load_tokenizer

    source = mcfg.tokenizer or (TINY_LLAMA_TOKENIZER if mcfg.base == "tiny" else mcfg.base)
    try:
        tokenizer = _load_tokenizer(source)
    except ImportError:
        raise
    except Exception as e:
        raise CheckpointError(f"model.tokenizer {source}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    llm.add_image_tokens(tokenizer)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def build(cfg: DictConfig, tokenizer: Any) -> torch.nn.Module:
    """The training model of ``cfg.model`` for ``tokenizer``, its random draws (new embedding
    rows, LoRA A) from ``train.seed`` (every rank the same; the global RNG is left as it was)."""
    m = cfg.model
    lora = None if m.lora is None else M.LoraSettings(**OmegaConf.to_container(m.lora, resolve=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if m.base == "tiny":
            t = m.tiny
            base = M.tiny_base(tokenizer.vocab_size, hidden=t.hidden, layers=t.layers, heads=t.heads,
                               intermediate=t.intermediate, seed=t.seed).to(M.DTYPES[m.dtype])
        else:
            base = m.base
        return M.build_model(base, len(tokenizer), lora=lora, dtype=m.dtype,
                             gradient_checkpointing=m.gradient_checkpointing, init=m.init)


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy a checkpoint's trainable tensors into ``model`` (names and shapes must match)."""
    params = dict(M.trainable_named_parameters(model))
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(f"{where}: its tensors do not fit this model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise CheckpointError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the model's is {tuple(p.shape)}")
            p.copy_(tensors[name])


# --- the step ------------------------------------------------------------------------------------

def autocast_dtype(device: torch.device, precision: str, base_dtype: str) -> torch.dtype | None:
    """The autocast dtype of the forward: ``train.precision`` on CUDA (bf16/fp16; fp32: none); on
    the CPU none, unless the frozen base is stored in bf16/fp16 (then that, so that it meets the
    fp32 trainable weights)."""
    if device.type == "cuda" and precision != "fp32":
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return None if base_dtype == "float32" else M.DTYPES[base_dtype]


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def micro_step(model: torch.nn.Module, batch: dict, *, world: int, scale: float, device: torch.device,
               amp: torch.dtype | None = None, scaler: Any = None) -> tuple[float, int]:
    """Forward + backward of one micro-batch (this rank's share of a global micro-batch).

    The loss is the token mean over the GLOBAL micro-batch's learned tokens (labels != -100 after
    the shift), times ``world`` (DDP averages gradients over ranks) and ``scale`` (1/grad_accum).
    Returns (the global micro-batch's token-mean loss, its learned-token count). A micro-batch
    without a learned token contributes nothing (the original's token mean would be NaN).

    ``model``: the HF/peft model, or `seed.training.llm.loss.ChunkedLossLM` (the loss without the
    whole logits), or either in DDP/FSDP. ``batch["position_ids"]`` (packed rows), when present, is
    passed on. The model's outputs are released before ``backward()`` (as the original's
    ``compute_loss``): only the loss tensor stays."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    extra = {}
    if batch.get("position_ids") is not None:
        extra["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    n_local = (labels[:, 1:] != -100).sum()
    n_global = _all_sum(n_local.detach().to(torch.float64), world)
    count = int(n_global.item())
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        out = model(input_ids=ids, labels=labels, use_cache=False,
                    num_items_in_batch=torch.tensor(float(max(count, 1)), device=device), **extra)
    loss = out.loss
    del out  # the logits ([B, T, V]) of the plain loss go before backward
    reported = _all_sum(loss.detach().double(), world)
    loss = loss * world * scale
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return float(reported.item()), count


def _trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in M.trainable_named_parameters(unwrap(model))}


# --- data ----------------------------------------------------------------------------------------

def build_data(cfg: DictConfig, tokenizer: Any, rank: int, world: int, state: dict | None,
               device: torch.device | None = None, image_tokenizer: Any = None):
    """`seed.training.llm.data.LlmData` over ``cfg.data`` for this rank, at ``state`` (None: the
    start); with several ranks its truncation counts are summed over them (on ``device``);
    ``image_tokenizer``: for image paths in rows (default ``data.image_tokenizer``)."""
    from .data import LlmData

    def all_sum(n: int) -> int:
        return int(_all_sum(torch.tensor(float(n), dtype=torch.float64, device=device), world).item())

    data = LlmData.from_config(cfg.data, tokenizer, seed=cfg.train.seed, rank=rank, world_size=world,
                               all_sum=all_sum if world > 1 else None, image_tokenizer=image_tokenizer)
    if state is not None:
        data.load_state_dict(state)
    return data


def build_val(cfg: DictConfig, tokenizer: Any, d, data: Any = None):
    """The held-out set of ``data.val`` for this rank (`seed.training.llm.val.LlmValSet`), or None.
    ``data``: the training data, whose image tokenizer it shares."""
    if cfg.data.val is None:
        return None
    from .val import LlmValSet

    if cfg.train.eval_every is None:
        logger.info("data.val without train.eval_every: evaluated at the last step only")
    return LlmValSet(cfg.data, tokenizer, seed=cfg.train.seed, rank=d.rank, world_size=d.world_size, device=d.device,
                     images=getattr(data, "images", None))


# --- the run -------------------------------------------------------------------------------------

def train(cfg: DictConfig, resume: bool = False, overrides: list[str] | None = None,
          command: list[str] | None = None) -> dict:
    """Train per ``cfg`` (`seed.training.llm.config.LlamaTrainConfig`); returns ``step``,
    ``output_dir``, ``export`` (or None) and the last step's metrics. ``command``: the script's
    ``[script, *args]`` for the export's model card (None: ``sys.argv``)."""
    from ...provenance import training_record

    # a fresh run checks whose codes it reads before its output folder is made (a resume: the checkpoint's config)
    codes_record = None if resume else training_record(cfg.data, cfg.model.base)
    run = Run(cfg, resume=resume, overrides=overrides, schema=LlamaTrainConfig, command=command)
    try:
        return _train(run, codes_record)
    finally:
        run.close()


def _train(run: Run, codes_record: dict | None = None) -> dict:
    cfg, d = run.cfg, run.dist
    check_llama_train_config(cfg, "the run's config")
    t = cfg.train
    # the schedule's length: fixed when the run starts and saved, so a resume with another max_steps keeps it
    schedule = int(t.schedule_steps or (run.state.get("schedule_steps") if run.resumed else None) or t.max_steps)
    if t.max_steps > schedule:
        logger.warning("train.max_steps %d > the schedule's %d steps (train.schedule_steps): past its end the "
                       "original's cosine rises again", t.max_steps, schedule)
    if cfg.data.train is None and not cfg.data.sources:
        raise InputError("no training data: pass data.train=FILE_OR_FOLDER or list data.sources")
    if codes_record is None or run.resumed:  # whose codes these are, before the model is built
        from ...provenance import training_record

        codes_record = training_record(cfg.data, cfg.model.base)
    tokenizer = load_tokenizer(cfg.model)
    model = build(cfg, tokenizer)
    if run.resumed:
        load_trainable(model, run.tensors, str(run.checkpoint))
    model.to(d.device)
    model.train()
    dc = cfg.data
    if (dc.train and dc.pack) or any(dc.pack if s.pack is None else s.pack for s in dc.sources):
        M.check_packing(model, autocast_dtype(d.device, t.precision, cfg.model.dtype))  # before any wrapper
    flat = M.flat_packing(model)  # flash-attention: packed rows go in as one row
    net = loss_model(model, t.loss_chunk)  # the same parameter names as model
    net = _wrap(model, t.parallel, d, net) if d.world_size > 1 else net
    fsdp = t.parallel == "fsdp" and d.world_size > 1
    named = M.trainable_named_parameters(net if fsdp else model)
    groups = O.param_groups(named, t.weight_decay, dict(model.named_modules()))
    optimizer = O.HFAdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    scheduler = O.make_scheduler(optimizer, max_steps=schedule, warmup_ratio=t.warmup_ratio,
                                 min_lr_ratio=t.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if d.device.type == "cuda" and t.precision == "fp16" else None
    if run.resumed:
        _load_optimizer_state(net, optimizer, run.state["optimizer"], fsdp)
        scheduler.load_state_dict(run.state["scheduler"])
        if scaler is not None and run.state.get("scaler"):
            scaler.load_state_dict(run.state["scaler"])
    amp = autocast_dtype(d.device, t.precision, cfg.model.dtype)
    counts = M.count_parameters(model)
    logger.info("model %s: %d trainable of %d parameters (%s)", cfg.model.base, counts["trainable"], counts["total"],
                "LoRA" if cfg.model.lora is not None else "full fine-tuning")
    data = build_data(cfg, tokenizer, d.rank, d.world_size, run.state.get("data") if run.resumed else None,
                      d.device, image_tokenizer=codes_record["image_tokenizer"])
    val = build_val(cfg, tokenizer, d, data)

    # learned tokens over the whole run (saved; an older checkpoint without the count: assume some)
    learned_total = int(run.state.get("learned_tokens", 1)) if run.resumed else 0
    empty_total = empty_steps = 0

    def check_learned(at: int) -> None:
        """A run whose every micro-batch had no learned token trained nothing: an error, no export."""
        if at > 0 and learned_total == 0:
            raise InputError(
                f"no step of this run learned anything: in steps 1-{at} every micro-batch had no learned token "
                f"(every label -100 after the shift), so the loss and the gradients were 0. Usually data.max_length "
                f"(or a source's max_length) cuts every answer away, or the format learns nothing; check them "
                f"against your samples. Nothing exported")

    def save(at: int) -> None:
        state = {"optimizer": _optimizer_state(net, optimizer, fsdp), "scheduler": scheduler.state_dict(),
                 "schedule_steps": schedule, "data": data.state_dict(), "learned_tokens": learned_total}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        run.save(at, _full_trainable(net, fsdp), state)

    run.begin(t.max_steps)
    params = [p for _, p in named]
    step, last = run.start_step, {}
    while step < t.max_steps:
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        losses, tokens, real, slots, sources, empty = [], 0, 0, 0, Counter(), 0
        before = data.counts()
        for micro in range(t.grad_accum):
            batch = next(data, None)
            if batch is None:
                break
            if flat and "position_ids" in batch:
                batch = M.flatten_rows(batch)
            sync = micro == t.grad_accum - 1 or not hasattr(net, "no_sync")
            with contextlib.nullcontext() if sync else net.no_sync():
                loss, n = micro_step(net, batch, world=d.world_size, scale=1.0 / t.grad_accum, device=d.device,
                                     amp=amp, scaler=scaler)
            losses.append(loss)
            tokens += n
            empty += int(n == 0)  # nothing learned in this global micro-batch (it adds nothing to the gradient)
            mask = batch["attention_mask"]
            real += int(_all_sum(mask.sum().to(torch.float64), d.world_size).item())
            slots += int(mask.numel()) * d.world_size
            src = batch.get("source") or ["train"]
            sources[src[0] if isinstance(src, list) else str(src)] += 1
        if len(losses) < t.grad_accum:
            logger.warning("step %d: every data source has run out of its cycle passes; stopping", step + 1)
            break
        loss = sum(losses) / len(losses)
        learned_total += tokens
        if empty:
            empty_total += empty
            empty_steps += 1
            if empty_steps <= 10 or empty_steps % 100 == 0:  # the first 10 such steps, then every 100th
                logger.warning("step %d: %d of %d micro-batch(es) had no learned token (%d so far): every answer cut "
                               "away by max_length, or nothing marked learned; they add nothing to the gradient",
                               step + 1, empty, len(losses), empty_total)
        run.check_finite(step + 1, {"loss": loss})
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = O.clip_grad_norm(params, t.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        after = data.counts()
        cut, seen = (sum(after[k][c] - before[k][c] for k in after) for c in ("truncated", "samples"))
        last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": real,
                "learned_tokens": tokens, "empty_micro_batches": empty, "tokens_per_s": real / dt if dt > 0 else 0.0,
                "padding": 1.0 - real / slots if slots else 0.0, "truncated": cut / seen if seen else 0.0,
                "sources": dict(sources)}
        if val is not None and (step == t.max_steps or (t.eval_every and step % t.eval_every == 0)):
            last["val_loss"] = val.evaluate(net if fsdp else unwrap(net), device=d.device, amp=amp)
        if run.save_due(step):
            last["data"] = data.counts()  # rows read, samples, dropped, bad rows, batches, passes, truncated
        run.log(last)
        if step == t.max_steps:
            check_learned(step)
        if run.save_due(step):
            save(step)
    check_learned(step)
    if step > run.start_step and not run.save_due(step):  # stopped early: the data ran out
        save(step)
    export = None
    gathered = _full_trainable(net, fsdp) if t.export and fsdp else None  # collective
    if t.export and d.main:
        export, tmp = run.out_dir / "export", run.out_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if fsdp:  # a whole copy on the CPU from the gathered tensors
            model = build(cfg, tokenizer)
            load_trainable(model, gathered, "the trained FSDP model")
        M.export(model, tokenizer, tmp, dtype=t.export_dtype or cfg.model.dtype,
                 in_place=True)
        _copy_sentencepiece(tokenizer, tmp)
        _write_codes_record(tmp, codes_record)
        card.write_card(tmp, card.llm_record(cfg, data, val, out_dir=run.out_dir, folder=tmp, step=step,
                                             world_size=d.world_size, command=run.command))  # after image_tokenizer.json
        shutil.rmtree(export, ignore_errors=True)
        tmp.rename(export)
        logger.info("exported %s", export)
    d.barrier()
    return {"step": step, "output_dir": str(run.out_dir), "export": str(export) if export else None, **last}


def _write_codes_record(out: Path, record: dict) -> None:
    """``out/image_tokenizer.json`` (+ ``out/image_tokenizer/``, a copy of a trained tokenizer folder):
    which image tokenizer the exported LLM's codes belong to (`seed.provenance`)."""
    from ...provenance import write_export_record

    keep = {k: v for k, v in record.items() if k != "image_tokenizer"}
    write_export_record(out, keep, copy_from=record.get("folder"))
    logger.info("export's image tokenizer: %s", record.get("spec") or "unknown (no codes named one: pass "
                "data.image_tokenizer to record it)")


def _copy_sentencepiece(tokenizer: Any, out: Path) -> None:
    """Put the SentencePiece model next to the saved tokenizer: `seed.llm.encode_text` needs it for the
    original's ids (transformers 5 saves only tokenizer.json)."""
    vocab = getattr(tokenizer, "vocab_file", None)
    if vocab and Path(vocab).is_file() and not (out / "tokenizer.model").exists():
        shutil.copy(vocab, out / "tokenizer.model")


# --- parallelism ---------------------------------------------------------------------------------

def _wrap(model: torch.nn.Module, parallel: str, d, net: torch.nn.Module | None = None) -> torch.nn.Module:
    """``net`` (``model`` or its `ChunkedLossLM`: what runs the whole forward; None: ``model``) in
    DDP, or FSDP2 (``fully_shard`` on every decoder layer of ``model``, then on ``net``: parameters,
    gradients and optimizer state sharded across ranks; gloo on the CPU, NCCL on GPUs)."""
    net = model if net is None else net
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if M.is_peft(model) else model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(net)
    return net


def _optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer's state dict keyed by parameter NAME, whole tensors (FSDP: gathered to the CPU),
    so that a checkpoint resumes under ddp or fsdp on any number of processes."""
    if not fsdp:
        return _by_name(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _by_name(state: dict) -> dict:
    """A torch optimizer state dict keyed by index -> keyed by the names in its groups' ``names``
    (torch.distributed.checkpoint's full layout); one keyed by name is returned as is."""
    if all(isinstance(p, str) for g in state["param_groups"] for p in g["params"]):
        return state
    try:
        name = {i: n for g in state["param_groups"] for i, n in zip(g["params"], g["names"], strict=True)}
        return {"state": {name[i]: v for i, v in state["state"].items()},
                "param_groups": [dict(g, params=[name[i] for i in g["params"]]) for g in state["param_groups"]]}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not name its parameters ({e})") from None


def _load_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load `_optimizer_state` (or an older one keyed by index) into this run's optimizer."""
    state = _by_name(state)
    saved = [list(g["params"]) for g in state["param_groups"]]
    if saved != [list(g["names"]) for g in optimizer.param_groups]:
        raise CheckpointError("the checkpoint's optimizer state holds other trainable parameters than this model's")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(net, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(n for names in saved for n in names)}
    optimizer.load_state_dict({"state": {index[n]: v for n, v in state["state"].items()},
                               "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                                                for g in state["param_groups"]]})


def _full_trainable(net: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, whole (FSDP: gathered on every rank, collective)."""
    if fsdp:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for n, p in M.trainable_named_parameters(net)}
    return _trainable_tensors(net)
