"""Tokens/s and MFU of one SEED-LLaMA training step (LoRA or full), CPU or CUDA; nothing downloads.

    python scripts/benchmark_llm_train.py --model tiny                       # CPU, seconds
    python scripts/benchmark_llm_train.py --model llama-1b --device cuda     # random 1.1B LLaMA, bf16
    python scripts/benchmark_llm_train.py --model pretrained/vicuna-7b-v1.1 --device cuda --batch 8 --seq 1024

``--model``: ``tiny`` (seed's tiny random LLaMA), ``llama-1b`` (a random LLaMA of TinyLlama-1.1B's
shape: 22 layers, width 2048, GQA 32/4 heads, MLP 5632, vocabulary 32000) or an HF causal-LM
folder. The vocabulary is resized by the 8194 image tokens and LoRA applied with the original's
settings (``--full``: every parameter trains), exactly as ``scripts/train_llama.py`` does; the
step is the trainer's (forward, token-mean loss, backward, clip 1.0, old HF AdamW, schedule) on
random full-length sequences (no padding).

MFU = achieved model FLOP/s / peak. Model FLOPs per token: forward 2N + attention 4·L·T·D
(scores and values, causal half counted as full, as PaLM's 12·L·T·D for fwd+bwd); backward 2N for
activation gradients + 2·N_trained for the weight gradients of what trains (LoRA: the adapters,
embeddings' and lm_head's matmuls); gradient checkpointing's recomputation is not counted. N = the
parameters used in matmuls (embedding lookups excluded). Peak: ``--peak-tflops``, else a table of
dense bf16 peaks by GPU name (H100/H200 989, A100 312, L40S 362, A10G 70).
Prints one JSON line.

``--compare``: the three batchings side by side on real caption-pair samples (``--samples`` pairs of
32 image codes + a caption of 8-24 words, written like ``benchmark_llm_data.py`` does), each mode in
a fresh subprocess: ``max_length`` (the original's: every micro-batch padded to ``--seq``),
``longest`` (``data.pad_to: longest``) and ``pack`` (``data.pack: true``: whole samples concatenated
into rows). The default model is ``small``: a random LLaMA of hidden 1024, 8 layers (16 heads, MLP
2752), vocabulary 32000 + 8194 = 40194, LoRA r16 as the recipe (dropout ``--lora-dropout``, 0 so that
the modes' losses are comparable), gradient checkpointing on, the loss ``--loss-chunk`` tokens at a
time (the recipes'). Every mode runs the trainer's own code: `LlmData` batches of the same samples
(one pass, ``--batch`` samples per micro-batch), `micro_step`, clip, old HF AdamW. After one warm-up
micro-batch and an lr-0 optimizer step (the optimizer state then exists), ONE optimizer step
accumulates every micro-batch of the pass and is timed. Per mode: ``useful_tokens_per_s`` (non-padding
tokens / seconds of that step), ``padding_share``, ``step_memory_mb`` (what the step adds over what is
resident before it: CUDA max allocated; on the CPU peak RSS growth, VmHWM after the kernel's peak was
reset, glibc told to return large frees) and ``loss`` (token mean over all the samples at the same
weights: equal in every mode). The LAST line is one JSON object keyed by mode; the line before holds
the settings. Exit status 1 if the modes' losses differ by more than 1e-5 (relative).

    python scripts/benchmark_llm_train.py --compare                                  # CPU, minutes
    python scripts/benchmark_llm_train.py --compare --model tiny --samples 16 --batch 4 --seq 64   # seconds
    python scripts/benchmark_llm_train.py --compare --model llama-1b --device cuda --batch 116 --samples 464
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}
SMALL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=2752, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
MODES = ("max_length", "longest", "pack")
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; --compare: samples "
                    "per micro-batch, default 16)")
    ap.add_argument("--seq", type=int, default=200, help="tokens per sequence (the caption sources' max_length)")
    ap.add_argument("--compare", action="store_true", help="max_length vs longest vs pack on caption pairs (see above)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="--compare: the modes to run")
    ap.add_argument("--samples", type=int, default=64, help="--compare: caption pairs (every mode the same ones)")
    ap.add_argument("--tokenizer", default=None, help="--compare: an HF tokenizer folder (default: seed's tiny one)")
    ap.add_argument("--loss-chunk", default="1024",
                    help="--compare: train.loss_chunk (tokens; none: HF's whole-logits loss)")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="--compare: LoRA dropout (recipe 0.05)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--run-mode", default=None, help=argparse.SUPPRESS)  # --compare's subprocess: one mode
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--dtype", default=None, help="frozen base dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args(argv)
    if args.compare or args.run_mode:
        args.batch = args.batch or 16
        if args.model == "tiny" and "--model" not in (argv if argv is not None else sys.argv):
            args.model = "small"
        return compare(args) if args.run_mode is None else run_mode(args)
    args.batch = args.batch or 4

    import torch

    from seed.training.llm import model as M
    from seed.training.llm import optim as O
    from seed.training.llm.train import autocast_dtype

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(0)
    if args.model == "tiny":
        base = M.tiny_base(600).to(M.DTYPES[dtype])
        vocab = 600 + 8194
    elif args.model == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**LLAMA_1B, use_cache=False)
        with torch.device(device):
            base = LlamaForCausalLM(cfg).to(M.DTYPES[dtype])
        vocab = cfg.vocab_size + 8194
    else:
        base = M.load_base(args.model, dtype)
        vocab = base.get_input_embeddings().weight.shape[0] + 8194
    model = M.build_model(base, vocab, lora=None if args.full else M.LoraSettings(),
                          dtype=dtype, gradient_checkpointing=not args.no_checkpointing).to(device)
    model.train()
    named = M.trainable_named_parameters(model)
    opt = O.HFAdamW(O.param_groups(named, 0.05), lr=1e-5, betas=(0.9, 0.95), eps=1e-5)
    sched = O.make_scheduler(opt, max_steps=1000, warmup_ratio=0.03, min_lr_ratio=0.05)
    params = [p for _, p in named]
    amp = autocast_dtype(device, "bf16" if dtype == "bfloat16" else "fp16" if dtype == "float16" else "fp32", dtype)
    ids = torch.randint(3, vocab, (args.batch, args.seq), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False):
            loss = M.lm_loss(model, ids, ids)
        loss.backward()
        O.clip_grad_norm(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps

    conf = (model.get_base_model() if M.is_peft(model) else model).config
    layers, width = conf.num_hidden_layers, conf.hidden_size
    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()}
    matmul = sum(p.numel() for p in model.parameters() if p.ndim == 2 and id(p) not in emb_ids
                 and ".original_module." not in _name(model, p))
    trained = sum(p.numel() for n, p in named if p.ndim == 2 and "embed_tokens" not in n)
    flops_token = 2 * matmul + 4 * layers * args.seq * width + 2 * matmul + 2 * trained
    tokens_s = args.batch * args.seq / dt
    out = {"model": args.model, "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
           else None, "dtype": dtype, "lora": not args.full, "gradient_checkpointing": not args.no_checkpointing,
           "batch": args.batch, "seq": args.seq, "step_s": dt, "tokens_per_s": tokens_s,
           "params": sum(p.numel() for p in model.parameters() if ".original_module." not in _name(model, p)),
           "trainable": sum(p.numel() for _, p in named), "model_tflops_per_s": flops_token * tokens_s / 1e12}
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAKS.items() if k in name), None)
    out["mfu"] = out["model_tflops_per_s"] / peak if peak else None
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(out))
    return 0


def compare(args) -> int:
    """--compare: write the samples, run every mode in its own process, print the settings and the modes."""
    import os
    import subprocess
    import tempfile

    if min(args.samples, args.batch, args.seq) < 1:
        print("error: --samples, --batch and --seq must be >= 1", file=sys.stderr)
        return 2
    from benchmark_llm_data import write_caption_pairs  # scripts/ is sys.path[0]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        write_caption_pairs(path, args.samples, seed=0)
        # large blocks go back to the kernel when freed, so that RSS is what is alive
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        base = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--device", args.device,
                "--batch", str(args.batch), "--seq", str(args.seq), "--samples", str(args.samples),
                "--loss-chunk", args.loss_chunk, "--lora-dropout", str(args.lora_dropout), "--data", path]
        for k, v in (("--tokenizer", args.tokenizer), ("--dtype", args.dtype), ("--threads", args.threads)):
            if v is not None:
                base += [k, str(v)]
        base += ["--full"] if args.full else []
        base += ["--no-checkpointing"] if args.no_checkpointing else []
        for mode in args.modes:
            proc = subprocess.run([*base, "--run-mode", mode], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"error: mode {mode} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}",
                      file=sys.stderr)
                return proc.returncode if proc.returncode == 2 else 1
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    settings = {k: results[args.modes[0]].pop(k) for k in list(results[args.modes[0]]) if k.startswith("_")}
    for r in results.values():
        for k in [k for k in r if k.startswith("_")]:
            r.pop(k)
    print(json.dumps({"settings": {k[1:]: v for k, v in settings.items()}}))
    print(json.dumps(results))
    losses = [r["loss"] for r in results.values()]
    if max(losses) - min(losses) > 1e-5 * abs(losses[0]):
        print(f"the modes' losses differ: {losses}", file=sys.stderr)
        return 1
    return 0


def run_mode(args) -> int:
    """One --compare mode in this process: one timed optimizer step over every micro-batch of the samples."""
    import torch
    from omegaconf import OmegaConf

    from seed.config import validate
    from seed.errors import InputError
    from seed.llama import TINY_LLAMA_TOKENIZER
    from seed.training.llm import model as M
    from seed.training.llm import optim as O
    from seed.training.llm.config import LlamaTrainConfig
    from seed.training.llm.loss import loss_model
    from seed.training.llm.train import autocast_dtype, build_data, load_tokenizer, micro_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    chunk = None if str(args.loss_chunk).lower() in ("none", "null") else int(args.loss_chunk)
    mode = args.run_mode
    data = {"sources": [{"path": args.data, "name": "pairs", "format": "auto", "cycle": 1,
                         "options": {"reverse_ratio": 0.5}}],
            "batch_size": args.batch, "max_length": args.seq, "shuffle": False,
            "pad_to": "max_length" if mode == "max_length" else "longest"}
    if mode == "pack":
        data["pack"] = True
    try:
        cfg = validate([{"model": {"base": "tiny", "tokenizer": args.tokenizer or str(TINY_LLAMA_TOKENIZER),
                                   "dtype": dtype, "lora": None if args.full else {"dropout": args.lora_dropout},
                                   "gradient_checkpointing": not args.no_checkpointing},
                         "data": data, "train": {"loss_chunk": chunk, "seed": 0}}], LlamaTrainConfig, "--compare")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    if args.model in ("small", "llama-1b"):
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(**(SMALL if args.model == "small" else LLAMA_1B), use_cache=False)
        with torch.device(device):
            base = LlamaForCausalLM(conf).to(M.DTYPES[dtype])
        vocab = conf.vocab_size + 8194
    elif args.model == "tiny":
        base, vocab = M.tiny_base(tokenizer.vocab_size).to(M.DTYPES[dtype]), len(tokenizer)
    else:
        base = M.load_base(args.model, dtype)
        vocab = base.get_input_embeddings().weight.shape[0] + 8194
    lora = None if args.full else M.LoraSettings(**OmegaConf.to_container(cfg.model.lora, resolve=True))
    model = M.build_model(base, max(vocab, len(tokenizer)), lora=lora, dtype=dtype,
                          gradient_checkpointing=not args.no_checkpointing).to(device)
    model.train()
    net = loss_model(model, cfg.train.loss_chunk)
    named = M.trainable_named_parameters(model)
    opt = O.HFAdamW(O.param_groups(named, 0.05), lr=0.0, betas=(0.9, 0.95), eps=1e-5)
    params = [p for _, p in named]
    amp = autocast_dtype(device, "bf16" if dtype == "bfloat16" else "fp16" if dtype == "float16" else "fp32", dtype)
    data = build_data(cfg, tokenizer, 0, 1, None)
    batches = list(data)
    samples = data.counts()["pairs"]["samples"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer_step() -> None:
        O.clip_grad_norm(params, 1.0)
        opt.step()  # lr 0: the weights stay as they are, every mode the same
        opt.zero_grad(set_to_none=True)

    # warm-up: one micro-batch and an optimizer step (its state exists before the timed step)
    micro_step(net, batches[0], world=1, scale=1.0, device=device, amp=amp)
    optimizer_step()
    sync()
    before = _memory(device, reset=True)
    t0 = time.perf_counter()
    losses = []
    for b in batches:
        losses.append(micro_step(net, b, world=1, scale=1.0 / len(batches), device=device, amp=amp))
    optimizer_step()
    sync()
    dt = time.perf_counter() - t0
    grown = _memory(device, peak=True) - before
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    learned = sum(n for _, n in losses)
    print(json.dumps({
        "useful_tokens_per_s": real / dt, "padding_share": 1 - real / slots, "step_memory_mb": grown / 2**20,
        "loss": sum(loss * n for loss, n in losses) / learned, "step_s": dt, "micro_batches": len(batches),
        "samples": samples, "useful_tokens": real, "token_slots": slots, "learned_tokens": learned,
        "_model": args.model, "_device": str(device), "_dtype": dtype, "_lora": not args.full,
        "_lora_dropout": args.lora_dropout, "_gradient_checkpointing": not args.no_checkpointing,
        "_loss_chunk": chunk, "_batch": args.batch, "_max_length": args.seq, "_threads": torch.get_num_threads(),
        "_gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}))
    return 0


def _memory(device, reset: bool = False, peak: bool = False) -> int:
    """Bytes in use now (``reset``: and restart the peak), or the peak since the reset (``peak``):
    CUDA allocated memory, or this process's resident set (VmRSS / VmHWM; the peak is reset by
    writing 5 to /proc/self/clear_refs)."""
    import torch

    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


_NAMES: dict[int, str] = {}


def _name(model, p) -> str:
    if not _NAMES:
        _NAMES.update({id(q): n for n, q in model.named_parameters()})
    return _NAMES.get(id(p), "")


if __name__ == "__main__":
    sys.exit(main())
