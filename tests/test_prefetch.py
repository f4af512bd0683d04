"""Prefetchers: a perfect next-layer prefetch turns every demand miss into a prefetch hit;
accuracy orders the hit rate; each predictor proposes keys of the right layer."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import random_experts, stream_from

from moesim.errors import MoesimError
from moesim.prefetch import make_prefetcher, prefetcher_names
from moesim.replay import run_policy


@pytest.fixture(scope="module")
def stream():
    return stream_from(random_experts(np.random.default_rng(2), 200, 4, 16, 2))


def test_pre_gated_prefetch_hits_everything(stream):
    r = run_policy(stream, "lru", capacity_experts=8, prefetcher=make_prefetcher("pre-gated"), record=True)
    assert r.stats["hit_rate"] == 1.0
    # exact predictions are used by the very next batch: every speculative load becomes a hit
    assert r.stats["prefetch_hits"] == r.stats["prefetched"] > 0
    assert r.residency()[2:].min() >= 1  # residency codes 1/2 only


def test_accuracy_orders_hit_rate(stream):
    rates = [run_policy(stream, "lru", capacity_experts=16,
                        prefetcher=make_prefetcher("next-layer", accuracy=a, seed=1)).stats["hit_rate"]
             for a in (0.0, 0.5, 1.0)]
    assert rates[0] < rates[1] < rates[2] == 1.0
    none = run_policy(stream, "lru", capacity_experts=16).stats["hit_rate"]
    assert rates[0] <= none + 0.05  # wrong guesses only evict useful experts


def test_predictors_propose_keys_of_the_next_batch_layer(stream):
    for name in prefetcher_names():
        pf = make_prefetcher(name).bind(stream)
        for b in range(1, 30):
            keys = pf.predict(b)
            layer = int(stream.batch_layer[b])
            assert all(k // stream.num_experts == layer for k in keys), name
            pf.observe(b, stream.keys[stream.batch_ptr[b]:stream.batch_ptr[b + 1]].tolist(), [])
    with pytest.raises(MoesimError):
        make_prefetcher("next-layer", accuracy=2)
    with pytest.raises(MoesimError):
        make_prefetcher("nope")
