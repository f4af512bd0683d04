"""Roofline compute times, tile efficiency, measured tables, transfer times."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cost import CostError, CostModel, CostTable, tile_efficiency, transfer_time
from moesim.hardware import get_device, get_link
from moesim.model import get_model

H100 = get_device("h100-sxm")
DSV3 = get_model("deepseek-v3")


def test_gemm_compute_and_memory_bound_closed_forms():
    cm = CostModel(H100)
    m, n, k = 8192, 8192, 8192
    big = cm.gemm_time(m, n, k, "bf16")
    rate = H100.peak_flops("bf16") * H100.compute_efficiency
    assert big == pytest.approx(2 * m * n * k / rate + H100.kernel_overhead)
    one = cm.gemm_time(1, n, k, "bf16")
    bw = H100.memory.read_bw * H100.memory_efficiency
    assert one == pytest.approx((n * k * 2 + (k + n) * 2) / bw + H100.kernel_overhead)


def test_tile_efficiency():
    np.testing.assert_allclose(tile_efficiency([0, 1, 64, 65, 128], 64),
                               [0, 1 / 64, 1, 65 / 128, 1])


def test_expert_times_are_per_expert_rooflines():
    cm = CostModel(H100)
    t = cm.expert_times(DSV3, [0, 1, 64, 4096])
    assert t[0] == 0
    weights = DSV3.expert_bytes() / (H100.memory.read_bw * H100.memory_efficiency)
    assert t[1] == pytest.approx(weights, rel=0.01)  # one token: weight streaming
    assert t[1] == pytest.approx(t[2], rel=0.1)  # still memory-bound at 64 tokens (FP8)
    flops = 4096 * DSV3.expert_flops_per_token()
    assert t[3] == pytest.approx(flops / (H100.peak_flops("fp8") * 0.7), rel=1e-6)
    grouped = cm.grouped_gemm_time(DSV3, [0, 1, 64, 4096])
    assert grouped == pytest.approx(t.sum() + H100.kernel_overhead)
    assert cm.grouped_gemm_time(DSV3, [0, 0]) == 0.0


def test_skewed_tokens_cost_more_than_balanced_at_equal_total():
    cm = CostModel(H100)
    balanced = cm.grouped_gemm_time(DSV3, [520] * 8)
    skewed = cm.grouped_gemm_time(DSV3, [4000, 40, 40, 40, 0, 0, 0, 40])
    # the hot expert is compute-bound while the cold ones still stream their weights
    assert skewed > balanced
    hot = 4000 * DSV3.expert_flops_per_token() / (H100.peak_flops("fp8") * 0.7 * 4000 / 4032)
    assert skewed > hot


def test_attention_prefill_and_decode():
    cm = CostModel(H100)
    mix = get_model("mixtral-8x7b")
    short = cm.decode_attention_time(mix, [128] * 64)
    long = cm.decode_attention_time(mix, [8192] * 64)
    kv = mix.kv_bytes_per_token() / mix.num_layers
    bw = H100.memory.read_bw * H100.memory_efficiency
    assert long - short == pytest.approx(64 * (8192 - 128) * kv / bw, rel=0.01)  # KV streaming
    p1 = cm.prefill_attention_time(mix, [4096])
    p2 = cm.prefill_attention_time(mix, [8192])
    assert p2 > 2 * p1  # quadratic core
    assert cm.attention_time(DSV3, [1, 1], [100, 100]) > 0  # MLA absorbed decode path
    with pytest.raises(CostError):
        cm.attention_time(mix, [1, 2], [3])


def test_dense_shared_router():
    cm = CostModel(H100)
    assert cm.shared_expert_time(DSV3, 1024) > 0 and cm.dense_ffn_time(DSV3, 1024) > 0
    assert cm.shared_expert_time(get_model("mixtral-8x7b"), 1024) == 0.0
    assert cm.router_time(DSV3, 0) == 0.0 and cm.router_time(DSV3, 4096) > 0


def test_table_overrides_and_interpolates(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("operation,shape,dtype,tokens,seconds\n"
                 "expert_ffn,7168x2048,fp8,1,0.0001\nexpert_ffn,7168x2048,fp8,101,0.0003\n"
                 "gemm,4096x4096,bf16,16,0.001\n")
    table = CostTable.from_csv(p)
    cm = CostModel(H100, table)
    np.testing.assert_allclose(cm.expert_times(DSV3, [0, 1, 51, 202]),
                               [0, 1e-4, 2e-4, 6e-4])
    assert cm.gemm_time(16, 4096, 4096, "bf16") == 0.001
    assert cm.gemm_time(16, 4096, 4096, "fp8") != 0.001  # other dtype: roofline
    a, b = cm.linear_expert_coeffs(DSV3)
    assert a == pytest.approx(2e-6) and b == pytest.approx(0.98e-4)


def test_bad_table(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("operation,shape,dtype,tokens\nx,1,bf16,3\n")
    with pytest.raises(CostError, match="row 1"):
        CostTable.from_csv(p)
    with pytest.raises(CostError, match="no such"):
        CostTable.from_csv(tmp_path / "missing.csv")


def test_linear_coeffs_on_a_phone_cpu():
    cpu = get_device("snapdragon-8-gen3")
    qwen = get_model("qwen3-30b-a3b")
    a, b = CostModel(cpu).linear_expert_coeffs(qwen)
    assert b == pytest.approx(qwen.expert_bytes() / (76.8e9 * 0.6) + cpu.kernel_overhead)
    assert a == pytest.approx(qwen.expert_flops_per_token() / (0.25e12 * 0.5))


def test_transfer_time():
    pcie = get_link("pcie4-x16")
    assert transfer_time(pcie, 44e6) == pytest.approx(5e-6 + 44e6 / 23.9e9)
    assert transfer_time(pcie, 0) == 0
