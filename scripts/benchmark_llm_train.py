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
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=200, help="tokens per sequence (the caption sources' max_length)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--dtype", default=None, help="frozen base dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args(argv)

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


_NAMES: dict[int, str] = {}


def _name(model, p) -> str:
    if not _NAMES:
        _NAMES.update({id(q): n for n, q in model.named_parameters()})
    return _NAMES.get(id(p), "")


if __name__ == "__main__":
    sys.exit(main())
