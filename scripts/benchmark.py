"""Speed of encode (against the bare vision tower), decode, and loading; prints one JSON object.

    python scripts/benchmark.py --config configs/seed_tokenizer.yaml --device cpu --batch-size 2
    python scripts/benchmark.py --config configs/seed_tokenizer.yaml --device cuda --batch-size 64 --dtype bf16 --compile

Weights are random at the config's dimensions (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    import seed

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""--dtype name -> torch dtype name."""


def import_heavy() -> None:
    """torch and seed, imported once the arguments are parsed, so --help answers at once."""
    global torch, seed, FlopCounterMode, resolve_path, SD_CONFIGS
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import seed
    from seed.config import resolve_path
    from seed.diffusion import SD_CONFIGS

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
"""Dense fp16/bf16 tensor-core peaks (TFLOP/s) for MFU."""


def timed(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, runs interleaved (so drift in machine load hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_encode(tok: seed.Tokenizer, args, device: torch.device) -> dict:
    """Encode images/s and its time over a bare vision-tower forward on the same pixels."""
    g = torch.Generator().manual_seed(0)
    from seed.images import CLIP_MEAN, CLIP_STD  # random [0, 1] images, CLIP-normalized as encode requires

    pixels = torch.rand(args.batch_size, 3, tok.image_size, tok.image_size, generator=g)
    pixels = ((pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]).to(device)
    dtype = tok.vision.patch_embed.proj.weight.dtype

    def bare_vit():
        with torch.inference_mode():
            tok.vision(pixels.to(dtype))

    t = timed({"vit": bare_vit, "encode": lambda: tok.encode(pixels)}, device, args.repeats, args.warmup)
    t_vit, t_enc = t["vit"], t["encode"]
    out = {
        "encode_images_per_s": args.batch_size / t_enc,
        "encode_s_per_batch": t_enc,
        "vit_s_per_batch": t_vit,
        "encode_over_vit": t_enc / t_vit,
    }
    if dtype != torch.float32:  # how many codes the low-precision tower changes (same weights in fp32)
        low = tok.encode(pixels)
        tok.vision.float()
        ref = tok.encode(pixels)
        tok.vision.to(dtype)
        out["codes_equal_vs_fp32"] = (low == ref).float().mean().item()
    if device.type == "cuda":
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            tok.encode(pixels)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        out["encode_tflops"] = fc.get_total_flops() / t_enc / 1e12
        out["encode_mfu"] = out["encode_tflops"] / peak if peak else None
    return out


def fp16_all_agreement(cfg, args, device: torch.device) -> float:
    """Share of codes equal between everything-fp32 and ``model.precision=fp16-all`` (the original
    SEED-2 path, whose codes SEED-LLaMA learned), same weights, on ``--batch-size`` real-looking
    random images (uniform [0, 1] pixels, CLIP-normalized). Random weights give a near-tie-prone
    codebook: use --real-weights for a number that says something about the released model."""
    from omegaconf import OmegaConf

    from seed.images import CLIP_MEAN, CLIP_STD

    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(args.batch_size, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
    pixels = ((rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]).to(device)
    codes = []
    for precision, dtype in (("default", torch.float32), ("fp16-all", None)):
        tok = seed.Tokenizer.from_config(OmegaConf.merge(cfg, {"model": {"precision": precision}}),
                                         device=device, dtype=dtype)  # random weights: the same seed
        codes.append(tok.encode(pixels))
        del tok
    return (codes[0] == codes[1]).float().mean().item()


def random_sd_at_real_size(cfg) -> bool:
    """Point ``cfg.diffusion`` at a RANDOM SD v1.4 of the real dimensions when its weights are absent.

    Returns False when decoding cannot be benchmarked: a SEED-2 config whose unCLIP folder is absent
    (seed ships no SD 2.1 unCLIP component configs to build a random one from).
    """
    if cfg.diffusion.model is None or resolve_path(cfg.diffusion.model).exists():
        return True
    if cfg.model.decoder.head == "image":
        logging.warning("decode not benchmarked: %s is absent (python scripts/download_weights.py --model seed2)",
                        cfg.diffusion.model)
        return False
    spec = {}
    for part in ("unet", "vae", "text_encoder"):
        config = json.loads((SD_CONFIGS / part / "config.json").read_text())
        spec[part] = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.diffusion.model, cfg.diffusion.random = None, spec
    return True


def bench_decode(tok: seed.Tokenizer, args, device: torch.device) -> dict:
    """Seconds per image for each sampler and step count (batch of ``--decode-batch`` code rows)."""
    codes = torch.randint(0, tok.cfg.model.codebook.size, (args.decode_batch, 32))
    tok.diffusion.pipe.set_progress_bar_config(disable=True)
    out = {}
    for spec in args.samplers:
        name, steps = spec.split(":")
        kw = dict(scheduler=name, steps=int(steps), height=args.decode_size, width=args.decode_size, num_samples=1)
        t = timed({"decode": lambda: tok.decode(codes, **kw)}, device, repeats=1, warmup=1)["decode"]
        out[f"{name}_{steps}_s_per_image"] = t / args.decode_batch
    return out


LOAD_SNIPPET = """
import sys, time, torch, seed

def peak_rss_gb():  # this process's high-water mark (ru_maxrss would include the parent's, from fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20

t = time.perf_counter()
tok = seed.Tokenizer.from_pretrained(sys.argv[1], device="cpu")
load_s, load_rss = time.perf_counter() - t, peak_rss_gb()
t = time.perf_counter()
tok.encode(torch.zeros(1, 3, tok.image_size, tok.image_size))
print(load_s, load_rss, time.perf_counter() - t, peak_rss_gb())
"""


def bench_load(tok: seed.Tokenizer) -> dict:
    """`Tokenizer.from_pretrained` in a fresh process: time and peak RSS, then after a first encode.

    The weights are memory-mapped, so the first encode pages them in; the peak RSS after it
    should be about one copy of the weights (``weights_gb``), not two.
    """
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        weights_gb = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**30
        res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, d], capture_output=True, text=True, check=True)
    load_s, load_rss, first_s, rss = map(float, res.stdout.split()[-4:])
    return {"load_s": load_s, "load_peak_rss_gb": load_rss, "first_encode_s": first_s,
            "peak_rss_after_first_encode_gb": rss, "weights_gb": weights_gb}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/seed_tokenizer.yaml")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="encode batch (default 64 on CUDA, 2 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="vision tower dtype (default fp16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the vision tower (CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--samplers", nargs="*", default=None,
                   help="decode runs as scheduler:steps (default pndm:50 dpm:25 on CUDA, none on CPU)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-size", type=int, default=None, help="decode height=width (default: config)")
    p.add_argument("--skip-load", action="store_true", help="skip the save/load measurement")
    p.add_argument("--real-weights", action="store_true",
                   help="load the config's checkpoint files (default: random weights); makes the fp32 vs "
                        "fp16-all code agreement (CUDA) meaningful")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    import_heavy()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 2)
    args.samplers = args.samplers if args.samplers is not None else (["pndm:50", "dpm:25"] if device.type == "cuda" else [])
    logging.basicConfig(level=logging.WARNING)

    no_files = [] if args.real_weights else ["checkpoints.vision=null", "checkpoints.qformer=null",
                                             "checkpoints.codebook=null", "checkpoints.quantizer=null"]
    cfg = seed.load_config(args.config, *no_files, *args.overrides)
    if args.samplers and not random_sd_at_real_size(cfg):
        args.samplers = []
    tok = seed.Tokenizer.from_config(cfg, device=device, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None)
    if args.compile:
        tok.compile_vision()
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "vision_dtype": str(tok.vision.patch_embed.proj.weight.dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "compile": args.compile,
        **bench_encode(tok, args, device),
    }
    if device.type == "cuda":
        result["codes_equal_fp32_vs_fp16_all"] = fp16_all_agreement(cfg, args, device)
    if args.samplers:
        args.decode_size = args.decode_size or int(cfg.diffusion.height)
        result.update(bench_decode(tok, args, device))
    result["peak_memory_gb"] = peak_memory_gb(device)
    if not args.skip_load:
        result.update(bench_load(tok))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
