"""CPU-GPU hybrid decisions against closed forms (Fiddler's published constants)."""

from __future__ import annotations

import pytest

from moesim.errors import MoesimError
from moesim.hardware import get_machine
from moesim.model import get_model
from moesim.schedule import HybridCosts, plan_layer

# Fiddler's released decision constants: CPU 7 per token, GPU + transfer 70 per missing expert
FIDDLER = HybridCosts(cpu_a=7.0, cpu_b=0.0, gpu_a=0.0, gpu_b=0.0, link_bw=1.0, expert_bytes=70.0)


def test_fiddler_threshold_is_ten_tokens():
    plan = plan_layer("fiddler", {1: 9, 2: 10, 3: 30, 4: 5}, resident={4}, costs=FIDDLER)
    assert plan.cpu == [1] and sorted(plan.load) == [2, 3] and plan.gpu == [4]
    assert plan.cpu_s == 63 and plan.gpu_s == 140 and plan.time_s == 140


def test_static_split_and_hybrimoe_never_worse():
    tokens = {1: 1, 2: 3, 3: 40, 4: 2, 5: 12}
    kt = plan_layer("ktransformers", tokens, {5}, FIDDLER)
    assert sorted(kt.cpu) == [1, 2, 3, 4] and kt.cpu_s == 7 * 46
    gpu = plan_layer("gpu-only", tokens, {5}, FIDDLER)
    assert gpu.gpu_s == 4 * 70
    hy = plan_layer("hybrimoe", tokens, {5}, FIDDLER)
    assert hy.time_s <= min(kt.time_s, gpu.time_s)
    assert 3 in hy.load  # the heaviest expert moves to the GPU
    with pytest.raises(MoesimError):
        plan_layer("nope", tokens, set(), FIDDLER)


def test_costs_from_hardware():
    c = HybridCosts.from_hardware(get_model("mixtral-8x7b"), get_machine("desktop-4090"))
    assert c.transfer() == pytest.approx(5e-6 + get_model("mixtral-8x7b").expert_bytes() / 23.9e9)
    assert c.cpu(1) > c.gpu(1)  # one token: the CPU is slower than the GPU
    with pytest.raises(MoesimError):
        HybridCosts.from_hardware(get_model("mixtral-8x7b"), get_machine("phone-sd8g3"))
