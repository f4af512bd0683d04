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


def test_shared_disk_two_threads_and_layer_overhead():
    from moesim.storage import SharedDisk

    # one layer, two experts, both missing: two threads read them at once from one disk
    s = stream_from(np.array([[[0, 1]]]), expert_bytes=1000, num_experts=2)
    disk = SharedDisk(latency=0.1, stream_bw=1000.0, total_bw=1000.0)
    cfg = OffloadConfig(dense_s=1.0, expert_s=0.5, load_s=None, channels=2, disk=disk,
                        layer_overhead_s=0.25)
    df = simulate(s, _policy(s, 8), cfg, record=True)
    # dense 1 + overhead 0.25, both reads: 0.1 latency, then 2000 B at 1000 B/s shared = 2 s;
    # then the two experts one after the other: 1.25 + 2.1 + 1.0
    assert df.latency_s.tolist() == pytest.approx([4.35])
    loads = df.attrs["loads"]
    assert (loads["end_s"] - loads["start_s"]).tolist() == pytest.approx([2.1, 2.1])
    independent = OffloadConfig(1.0, 0.5, None, 2, disk=SharedDisk(0.1, 1000.0, 2000.0))
    assert simulate(s, _policy(s, 8), independent).latency_s.tolist() == pytest.approx([3.1])
    with pytest.raises(MoesimError):
        OffloadConfig(1.0, 0.5, None, 2, preempt=True, disk=disk)


def test_record_gives_hits_per_lookup_and_loads():
    rng = np.random.default_rng(1)
    ex = random_experts(rng, 20, 3, 8, 2)
    s = stream_from(ex, expert_bytes=1000)
    cfg = OffloadConfig(dense_s=0.01, expert_s=0.001, load_s=lambda b: 0.002, channels=1)
    df = simulate(s, _policy(s, 6), cfg, record=True)
    hits = df.attrs["lookups"]["hit"]
    # independent per-access LRU over the same key sequence, never evicting a key the current
    # row has already looked up
    from collections import OrderedDict

    od, expected = OrderedDict(), []
    for b in range(s.num_batches):
        row = s.keys[s.batch_ptr[b]:s.batch_ptr[b + 1]].tolist()
        for i, k in enumerate(row):
            if k in od:
                od.move_to_end(k)
                expected.append(1)
                continue
            expected.append(0)
            while len(od) >= 6:
                del od[next(v for v in od if v not in row[:i])]
            od[k] = None
    assert hits.tolist() == expected
    misses = expected.count(0)
    assert len(df.attrs["loads"]["key"]) == misses
    assert df.attrs["lookups"]["miss_bytes"].sum() == 1000 * misses == df.bytes_read.sum()
    assert "lookups" not in simulate(s, _policy(s, 6), cfg).attrs
