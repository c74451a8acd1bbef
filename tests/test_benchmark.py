"""The benchmark script keeps working (tiny config; no timing assertions)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_runs_on_tiny_config():
    cmd = [sys.executable, "scripts/benchmark.py", "--config", "configs/seed_tiny.yaml", "--device", "cpu",
           "--batch-size", "2", "--dtype", "bf16", "--repeats", "1", "--samplers", "pndm:2", "dpm:2", "--decode-batch", "2",
           "--decode-size", "32"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("encode_images_per_s", "vit_s_per_batch", "encode_over_vit", "pndm_2_s_per_image",
                "dpm_2_s_per_image", "peak_memory_gb", "load_s", "load_peak_rss_gb", "first_encode_s",
                "peak_rss_after_first_encode_gb", "weights_gb"):
        assert out[key] > 0, key
    assert out["batch_size"] == 2 and out["vision_dtype"] == "bfloat16"
    assert 0 <= out["codes_equal_vs_fp32"] <= 1
