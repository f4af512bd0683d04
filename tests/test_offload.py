"""SimPy offload model: closed-form latencies, overlap of prefetch with compute, CPU offload."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import random_experts, stream_from

from moesim.cache import make_layout, make_policy
from moesim.errors import MoesimError
from moesim.offload import OffloadConfig, simulate, summarize
from moesim.prefetch import make_prefetcher
from moesim.schedule import HybridCosts


def _policy(s, cap):
    return make_policy("lru", make_layout(s.num_layers, s.num_experts, s.expert_bytes, capacity_experts=cap))


def test_closed_form_hits_and_misses():
    s = stream_from(np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]]]), expert_bytes=1000, num_experts=2)
    cfg = OffloadConfig(dense_s=1.0, expert_s=0.5, load_s=lambda b: b / 1000 * 2.0, channels=1)
    df = simulate(s, _policy(s, 8), cfg)
    # token 0: each layer dense 1 + two serial loads (2 + 2), the second expert computes after
    # its load: 1 + 4 + 0.5 = 5.5 per layer; token 1 all hits: 1 + 0.5 + 0.5 = 2 per layer
    assert df.latency_s.tolist() == pytest.approx([11.0, 4.0])
    assert df.stall_s.tolist() == pytest.approx([2 * (5.5 - 1 - 1.0), 0.0])
    assert df.bytes_read.tolist() == [4000, 0]


def test_prefetch_overlaps_compute_and_cpu_offload():
    s = stream_from(random_experts(np.random.default_rng(0), 30, 4, 8, 2), expert_bytes=1000)
    cfg = OffloadConfig(dense_s=1.0, expert_s=0.1, load_s=lambda b: 0.4, channels=2)
    base = summarize(simulate(s, _policy(s, 8), cfg))
    pre_df = simulate(s, _policy(s, 8), cfg, prefetcher=make_prefetcher("pre-gated"))
    pre = summarize(pre_df)
    assert pre["latency_s_mean"] < base["latency_s_mean"]
    # only the very first layer waits (0.4 s, two loads on two channels); every later load
    # was issued a layer ahead and hides under 1 s of dense compute
    assert pre_df.stall_s.iloc[0] == pytest.approx(0.4)
    assert pre_df.stall_s.iloc[1:].max() == pytest.approx(0.0, abs=1e-9)
    pro = summarize(simulate(s, _policy(s, 8), OffloadConfig(1.0, 0.1, lambda b: 0.4, 2, preempt=True),
                             prefetcher=make_prefetcher("promoe", accuracy=0.5)))
    assert pro["latency_s_mean"] <= base["latency_s_mean"] + 1e-9
    costs = HybridCosts(cpu_a=0.05, cpu_b=0.0, gpu_a=0.1, gpu_b=0.0, link_bw=1000 / 0.4, expert_bytes=1000)
    hyb = simulate(s, _policy(s, 8), OffloadConfig(1.0, 0.1, lambda b: 0.4, 2, scheduler="fiddler", costs=costs))
    assert hyb.cpu_experts.sum() > 0 and summarize(hyb)["latency_s_mean"] < base["latency_s_mean"]
    with pytest.raises(MoesimError):
        OffloadConfig(1.0, 0.1, lambda b: 0.4, 0)
