"""The FLOP model behind MFU, and the prepared GPU benchmark runs (smoke, tiny model, any device)."""

import json
import subprocess
import sys

import pytest
import torch

from moss.model import MossTTSD, MossTTSDConfig
from moss.training.flops import flop_model, peak_tflops
from tests.conftest import REPO


def test_flop_model_of_the_real_architecture():
    with torch.device("meta"):
        model = MossTTSD(MossTTSDConfig.v05())
    counts = flop_model(model)
    # 28 layers (1,409,408,000 incl. norms) + heads 152697 x 2048 + 7 x 1025 x 2048
    heads = 312_723_456 + 14_694_400
    assert counts == {"params": 1_409_408_000 + heads, "head_params": heads, "layers": 28, "d_attn": 2048}
    assert peak_tflops(torch.device("cpu")) is None


def run_benchmark(script: str, *args: str) -> dict:
    """Run benchmarks/<script> and return its final `RESULT {json}` line."""
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1].removeprefix("RESULT "))


@pytest.mark.slow  # a smoke run of a benchmark script (20 s); .ci/run runs slow tests too
def test_gpu_benchmark_script_runs_on_the_tiny_model():
    result = run_benchmark("gpu_train.py", "--tiny", "--warmup", "0", "--samples", "8")
    rates = {k: v["real_frames_per_s"] for k, v in result["results"].items() if "error" not in v}
    assert {"packed varlen_sdpa ckpt=on", "padded bs1 sdpa ckpt=on", "padded bs4 sdpa ckpt=on"} <= set(rates)
    losses = result["loss"]
    assert losses["fused head frozen"]["rel_err_loss"] < 1e-6 and losses["fused head frozen"]["max_err_grad"] < 1e-6


@pytest.mark.slow
def test_generation_benchmark_runs_on_the_tiny_model():
    result = run_benchmark("generation.py", "--sizes", "tiny", "--seconds", "2", "--device", "cpu", "--batch", "1", "3")
    runs = result["results"]
    assert list(runs) == [f"tiny 2 s b{b} {e}" for b in (1, 3) for e in ("dynamic", "static")]
    assert [r["frames"] for r in runs.values()] == [25, 25, 75, 75]  # 2 s at 12.5 frames/s, forced to keep speaking


@pytest.mark.slow  # seven tiny training passes, one compiled (about 50 s)
def test_perf_ablation_runs_every_stage_on_the_same_function():
    result = run_benchmark("perf_ablation.py", "--tiny", "--samples", "6", "--warmup", "0")
    stages = result["stages"]
    assert list(stages) == [
        "baseline",
        "ckpt=selective",
        "ckpt=off",
        "+fused lora",
        "+liger",  # off CUDA: the switched classes' eager fallback
        "+static varlen",
        "+compile",
    ]
    assert not [r["error"] for r in stages.values() if "error" in r]
    losses = {r["first_pack_loss"] for r in stages.values()}
    assert max(losses) - min(losses) < 1e-5  # each speed-up computes the same loss from the same weights
    assert all(abs(r["grad_norm_vs_baseline"] - 1) < 1e-4 and r["real_frames_per_s"] > 0 for r in stages.values())


@pytest.mark.slow  # tiny codec, 8 clips, two batch sizes, two passes each (about 10 s)
def test_codec_benchmark_batches_without_changing_a_code():
    args = ("--tiny", "--device", "cpu", "--clips", "8", "--seconds", "3", "--batch", "1", "4", "--passes", "2")
    result = run_benchmark("codec.py", *args, "--dtypes", "float32", "bfloat16")
    cases = result["cases"]
    assert list(cases) == ["float32 b1", "float32 b4", "bfloat16 b1", "bfloat16 b4"]
    assert cases["float32 b4"]["codes_equal_float32_batch1"] == 1.0  # batching changes no code
    assert 0 < cases["bfloat16 b4"]["codes_equal_float32_batch1"] <= 1.0
    assert all(c["encode_audio_s_per_s"] > 0 and c["decode_audio_s_per_s"] > 0 for c in cases.values())


@pytest.mark.slow  # a 6-record corpus: CPU stage, tiny codec alone, and the whole preprocessing run (about 15 s)
def test_preprocess_benchmark_names_the_bottleneck():
    result = run_benchmark(
        "preprocess.py", "--files", "6", "--seconds", "10", "--workers", "2", "--encoder", "cpu", "--tiny-codec"
    )
    pipeline = result["pipeline"]
    assert pipeline["samples"] == 6 and pipeline["bottleneck"] in ("CPU loaders", "codec encoder")
    assert pipeline["encoder_audio_hours_per_hour"] > 0 and 0 < pipeline["end_to_end_vs_bottleneck"] <= 1.5
