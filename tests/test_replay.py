"""Access streams: batch grouping, next uses, and the replay's per-batch figures."""

from __future__ import annotations

import numpy as np
from cache_helpers import stream_from

from moesim.replay import AccessStream, run_policy
from moesim.storage import LinkIO


def test_batch_accounting_groups_a_prefill_step():
    # two prompt tokens in one step, one layer: experts {0,1} and {1,2} -> unique 0,1,2 once
    ex = np.array([[[0, 1]], [[1, 2]], [[2, 3]]])
    s = stream_from(ex, "batch", steps=np.array([0, 0, 1]), phase=np.array([0, 0, 1]))
    assert s.num_batches == 2
    assert sorted(s.keys[:3].tolist()) == [0, 1, 2]
    assert dict(zip(s.keys[:3].tolist(), s.count[:3].tolist(), strict=True)) == {0: 1, 1: 2, 2: 1}
    # recency inside the batch follows last use: 0 (token 0), then 1 and 2 (token 1)
    assert s.keys[:3].tolist() == [0, 1, 2]
    r = run_policy(s, "lru", capacity_experts=3, record=True)
    assert r.stats["lookups"] == 5 and r.stats["hits"] == 1  # expert 2 hits in the decode step
    assert r.stats["hit_rate_decode"] == 0.5
    assert r.hits[s.row_lookup].shape == (3, 2)


def test_next_use_and_clock():
    s = stream_from(np.array([0, 1, 0, 2, 1]).reshape(5, 1, 1))
    assert s.next_use.tolist() == [2, 4, 5, 5, 5]
    assert s.next_use_after(0, 1) == 2 and s.next_use_after(2, 4) == 5
    assert s.clock_ptr.tolist() == [0, 1, 2, 3, 4, 5]


def test_stall_time_is_demand_bytes_over_the_link():
    s = stream_from(np.array([0, 1, 0, 1]).reshape(4, 1, 1), expert_bytes=1000)
    r = run_policy(s, "lru", capacity_experts=1, io=LinkIO(bandwidth=1e6, latency=1e-3))
    assert r.stats["misses"] == 4
    assert r.stall_s == np.float64(4 * (1e-3 + 1e-3))


def test_from_trace_matches_from_rows():
    from moesim.traces import Trace

    rng = np.random.default_rng(0)
    ex = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(10)])
    t = Trace.from_arrays(ex, np.ones(ex.shape, np.float32), [4, 6], "decode", num_experts=8)
    s = AccessStream.from_trace(t, "token", expert_bytes=5)
    assert s.num_lookups == 60 and s.keys[:2].tolist() == ex[0, 0].tolist()
    assert s.batch_request.tolist()[:12] == [0] * 12 and s.batch_request[12] == 1
    assert run_policy(s, "lru", capacity_experts=24).stats["hit_rate"] > 0
