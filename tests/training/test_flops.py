"""The FLOP model behind MFU, against torch's own FLOP counter on real training steps, and the peak table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora
from moss.training.flops import flop_model, peak_tflops, peak_tflops_of, step_flops


def counted_step(rows: list[int], lora: bool = False) -> tuple[float, dict]:
    """FLOPs torch counts for forward + backward of one sample per length in `rows` (eager attention: the full
    square is computed), and the model's FLOP counts."""
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation="eager").train()
    counts = flop_model(model)
    if lora:
        model = apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    total = 0
    for s in rows:
        ids = torch.randint(0, 300, (1, s, 8), generator=torch.Generator().manual_seed(s))
        ids[..., 1:] = torch.randint(0, 1024, (1, s, 7), generator=torch.Generator().manual_seed(s + 1))
        with FlopCounterMode(display=False) as counter:
            model(ids, labels=ids.clone()).loss.backward()
        total += counter.get_total_flops()
    return total, counts


@pytest.mark.parametrize("rows", [[64], [256], [32, 200]])
def test_full_fine_tuning_flops_match_torchs_count(rows):
    counted, counts = counted_step(rows)
    rows_total, sum_sq = sum(rows), sum(s * s for s in rows)
    foundry = step_flops(counts, rows_total, sum_sq, lora=False, convention="foundry")
    assert counted == pytest.approx(foundry, rel=0.02)  # the last row has no label: its head matmul is skipped
    # Ours counts causal attention as half the square: exactly foundry's attention term less half.
    ours = step_flops(counts, rows_total, sum_sq, lora=False)
    assert foundry - ours == 6 * counts["layers"] * counts["d_attn"] * sum_sq


def test_a_frozen_base_costs_two_thirds():
    counted, counts = counted_step([128], lora=True)
    foundry = step_flops(counts, 128, 128 * 128, lora=True, convention="foundry")
    assert counted == pytest.approx(foundry, rel=0.06)  # plus the adapters' own small matmuls


def test_hfu_adds_the_recomputed_forward_of_the_layers_only():
    counts = {"params": 1000, "head_params": 300, "layers": 2, "d_attn": 8}
    ours = step_flops(counts, 10, 100, lora=True)
    assert step_flops(counts, 10, 100, lora=True, convention="hfu") == ours  # no checkpointing: nothing more
    assert step_flops(counts, 10, 100, True, "hfu", recompute=True) == ours + 2 * 700 * 10 + 2 * 2 * 8 * 100
    with pytest.raises(ValueError, match="convention="):
        step_flops(counts, 1, 1, True, "palm")


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_the_peak_table_knows_the_cards_lightning_gets_wrong(name, tflops):
    assert peak_tflops_of(name) == tflops
    assert peak_tflops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "name, category",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float>", "elementwise"),
        ("triton_red_fused_logsumexp_0", "loss"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise",
        ),
        ("aten::addmm", "gemm"),
        ("aten::copy_", "copy"),
    ],
)
def test_profile_kernels_fall_into_their_groups(name, category):
    from benchmarks.profile_step import kernel_category

    assert kernel_category(name) == category


@pytest.mark.slow  # profiles two tiny steps (about 20 s)
def test_the_profile_groups_the_step_time_on_the_cpu():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark("profile_step.py", "--tiny", "--steps", "1", "--warmup", "1")
    groups = result["ms_per_step_by_category"]
    assert {"gemm", "attention", "elementwise"} <= set(groups) and all(v >= 0 for v in groups.values())
