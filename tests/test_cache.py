"""Cache policies: accounting invariants, Belady optimality, stack inclusion, closed-form cases,
literature policies' rules, and the phone run's recorded residency."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import random_experts, stream_from
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cache import CacheError, make_layout, make_policy, policy_names
from moesim.cache.literature import adapmoe_expected_loads, dp_allocation
from moesim.replay import AccessStream, belady_curve, lru_curve, lru_hits, replay, run_policy

MUST_ADMIT = ["lru", "fifo", "lifo", "lfu", "random", "expert-buffering", "moe-infinity", "hybrimoe", "edgemoe"]


def _small_trace(seed, T, L, E, K):
    return random_experts(np.random.default_rng(seed), T, L, E, K)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(3, 30), L=st.integers(1, 3), E=st.integers(3, 8),
       K=st.integers(1, 3), extra=st.integers(0, 6), accounting=st.sampled_from(["token", "batch"]),
       scope=st.sampled_from(["global", "per-layer"]))
def test_invariants_and_belady_is_optimal(seed, T, L, E, K, extra, accounting, scope):
    K = min(K, E)
    ex = _small_trace(seed, T, L, E, K)
    steps = np.arange(T) // 2 if accounting == "batch" else None  # 2 tokens per forward step
    s = stream_from(ex, accounting, expert_bytes=7, steps=steps)
    per_pool = max(s.batch_ptr[1:] - s.batch_ptr[:-1])  # a pool never smaller than one batch
    cap = (per_pool + extra) * (L if scope == "per-layer" else 1)
    best = run_policy(s, "belady", capacity_experts=cap, scope=scope)
    for name in MUST_ADMIT:
        r = run_policy(s, name, capacity_experts=cap, scope=scope, seed=seed, record=True)
        st_ = r.stats
        assert st_["hits"] + st_["misses"] == st_["lookups"] == s.num_lookups
        if name == "edgemoe":  # low-bit experts read fewer bytes by design
            assert st_["bytes_read"] <= st_["misses"] * 7
        else:
            assert st_["bytes_read"] == st_["misses"] * 7 == int((~r.hits).sum()) * 7
        assert best.stats["misses"] <= st_["misses"], name
    # bypass may only do better than forced admission (token accounting, per access)
    if accounting == "token":
        byp = run_policy(s, "belady-bypass", capacity_experts=cap, scope=scope)
        assert byp.stats["misses"] <= best.stats["misses"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(5, 40), L=st.integers(1, 3), E=st.integers(4, 10),
       K=st.integers(1, 3), scope=st.sampled_from(["global", "per-layer"]))
def test_stack_algorithms_never_lose_hits_with_more_capacity(seed, T, L, E, K, scope):
    ex = _small_trace(seed, T, L, E, K)
    s = stream_from(ex)
    per = L if scope == "per-layer" else 1
    caps = [c * per for c in range(K, E + 1)]
    for name in ("lru", "belady"):
        rates = [run_policy(s, name, capacity_experts=c, scope=scope).stats["hit_rate"] for c in caps]
        assert all(b >= a - 1e-12 for a, b in zip(rates, rates[1:], strict=False)), (name, rates)


def test_closed_form_cyclic_pattern():
    # a b c a b c with room for 2: LRU never hits; MIN hits a (4th) and c (6th)
    s = stream_from(np.array([0, 1, 2, 0, 1, 2]).reshape(6, 1, 1))
    assert run_policy(s, "lru", capacity_experts=2).stats["hits"] == 0
    assert run_policy(s, "belady", capacity_experts=2).stats["hits"] == 2
    assert run_policy(s, "fifo", capacity_experts=3).stats["hits"] == 3
    # LIFO: c evicts b, a hits, b evicts c, c evicts b -> one hit
    assert run_policy(s, "lifo", capacity_experts=2).stats["hits"] == 1


def test_fast_paths_match_policy_objects():
    ex = _small_trace(3, 300, 4, 16, 2)
    s = stream_from(ex)
    for cap in (2, 5, 9, 20, 40):
        obj = run_policy(s, "lru", capacity_experts=cap).stats["hits"]
        assert lru_hits(s.keys.tolist(), cap) == obj
        assert lru_curve(s, [cap])[0] * s.num_lookups == pytest.approx(obj)
        assert belady_curve(s, [cap])[0] * s.num_lookups == pytest.approx(
            run_policy(s, "belady", capacity_experts=cap).stats["hits"])
    for cap in (8, 20, 40):
        assert lru_curve(s, [cap], "per-layer")[0] * s.num_lookups == pytest.approx(
            run_policy(s, "lru", capacity_experts=cap, scope="per-layer").stats["hits"])


def test_mixed_sizes_bytes_and_capacity():
    ex = np.array([0, 1, 2, 0, 1, 2]).reshape(3, 2, 1)  # layer 0 reads 100 B, layer 1 300 B
    s = AccessStream.from_rows(2, 3, np.zeros(6), np.repeat(np.arange(3), 2), np.repeat(np.arange(3), 2),
                               np.zeros(6), np.tile([0, 1], 3), ex.reshape(6, 1), np.ones((6, 1)), "token",
                               np.array([100, 300]))
    r = run_policy(s, "lru", capacity_bytes=1000, record=True)
    assert r.stats["bytes_read"] == int(((~r.hits) * s.key_bytes[s.keys]).sum())
    lay = make_layout(2, 3, [100, 300], capacity_bytes=400)
    pol = make_policy("lru", lay)
    replay(s, pol)
    assert max(pol.used) <= 400


def test_static_random_placement_hits_its_resident_fraction():
    # uniform routing: a random placement of a quarter of the keys hits a quarter of lookups
    rng = np.random.default_rng(0)
    s = stream_from(random_experts(rng, 2000, 4, 16, 2))
    rates = [run_policy(s, "static", capacity_experts=16, placement="random", seed=k).stats["hit_rate"]
             for k in range(5)]
    assert np.mean(rates) == pytest.approx(0.25, abs=0.02)
    freq = run_policy(s, "static", capacity_experts=16).stats["hit_rate"]
    assert freq >= max(rates) - 0.01  # most popular keys at least as good as random


def test_dp_allocation_matches_brute_force():
    rng = np.random.default_rng(1)
    cost = np.sort(rng.random((3, 5)), axis=1)[:, ::-1]  # decreasing in slots
    best = min(((a, b, c) for a in range(1, 5) for b in range(1, 5) for c in range(1, 5) if a + b + c == 7),
               key=lambda x: cost[0, x[0]] + cost[1, x[1]] + cost[2, x[2]])
    got = dp_allocation(cost, 7)
    assert sum(cost[i, got[i]] for i in range(3)) == pytest.approx(sum(cost[i, best[i]] for i in range(3)))
    f = adapmoe_expected_loads(8, 0.0, 0.0)
    assert f[8] == 0 and f[0] == pytest.approx(2.0)  # top-2, nothing cached: both experts load
    g = adapmoe_expected_loads(8, 0.0, 1.0)  # always top-1: loads = uncached fraction
    assert g[2] == pytest.approx(6 / 8)


def test_hobbit_precision_rule_and_bytes():
    # weights 0.7, 0.25, 0.05 -> unimportance 0, 0.7, 0.95: high, low, skipped
    ex = np.array([[[0, 1, 2]]])
    w = np.array([[[0.7, 0.25, 0.05]]])
    s = stream_from(ex, weights=w, expert_bytes=1000, num_experts=4)
    r = run_policy(s, "hobbit", capacity_bytes=10_000)
    assert r.stats["dropped"] == 1 and r.stats["misses"] == 2
    assert r.stats["bytes_read"] == 1000 + 250


def test_adapmoe_drops_low_weight_experts():
    ex = np.array([[[0, 1]], [[0, 1]]])
    w = np.array([[[0.95, 0.05]], [[0.5, 0.5]]])
    s = stream_from(ex, weights=w, num_experts=4)
    r = run_policy(s, "adapmoe", capacity_experts=2, threshold=0.1)
    assert r.stats["dropped"] == 1 and r.stats["lookups"] == 3


def test_d2moe_reads_only_missing_slices():
    ex = np.array([[[0, 1]], [[0, 1]]])
    w = np.array([[[0.2, 0.8]], [[0.9, 0.1]]])
    s = stream_from(ex, weights=w, expert_bytes=400, num_experts=2)
    r = run_policy(s, "d2moe", capacity_bytes=10_000)
    # token 0: expert 0 at 3 bits (300 B), expert 1 at 4 bits (400 B); token 1: expert 0 needs
    # its 4th bit-slice (100 B), expert 1 needs only 2 bits it already has
    assert r.stats["bytes_read"] == 300 + 400 + 100 and r.stats["misses"] == 3 and r.stats["hits"] == 1


def test_every_policy_runs_and_bad_input_is_a_clear_error():
    s = stream_from(_small_trace(0, 20, 2, 6, 2))
    for name in policy_names():
        kw = {"capacity_bytes": 800} if name == "d2moe" else {"capacity_experts": 6}
        r = run_policy(s, name, **kw)
        assert r.stats["lookups"] + r.stats["dropped"] == s.num_lookups, name
    with pytest.raises(CacheError):
        run_policy(s, "lru", capacity_experts=-1)
    with pytest.raises(CacheError):
        run_policy(s, "lru", capacity_experts=4, bogus=1)
    with pytest.raises(CacheError):
        make_layout(2, 6, 0, capacity_bytes=100)


# ----- real data -----------------------------------------------------------------------------------------
def _phone(phone_trace_dir):
    from moesim.traces.importers import import_trace

    return import_trace(phone_trace_dir / "qwen.route.csv", "route-trace-v1")


def test_phone_global_lru_batch_accounting_reproduces_every_row(phone_trace_dir):
    t = _phone(phone_trace_dir)
    s = AccessStream.from_trace(t, "batch")
    r = run_policy(s, "lru", capacity_bytes=4000 * 2**20, record=True)
    recorded = np.concatenate([b.extras["residency"] for b in t.iter_batches(columns=["residency"])])
    mine = r.hits[s.row_lookup].astype(np.int8)
    assert (mine == recorded).all()
    assert round(r.stats["hit_rate"] * 100, 1) == 74.9  # the run's summary line
    read = np.concatenate([b.extras["read_bytes"] for b in t.iter_batches(columns=["read_bytes"])])
    assert r.stats["bytes_read"] == int(read.sum())


def test_esft_policies_sit_between_nothing_and_belady(esft_npz):
    from moesim.traces import Trace

    d = np.load(esft_npz["law"])
    t = Trace.from_arrays(d["experts"][:600], d["weights"][:600], None, "prefill", num_experts=64)
    s = AccessStream.from_trace(t, "token", expert_bytes=1)
    bel = run_policy(s, "belady", capacity_experts=416).stats["hit_rate"]
    for name in ("lru", "lfu", "hybrimoe", "moe-infinity", "sch"):
        hr = run_policy(s, name, capacity_experts=416).stats["hit_rate"]
        assert 0.2 < hr <= bel + 1e-12, name


def test_cli_cache_json_lists_and_errors(tmp_path, capsys):
    import json

    from moesim.cli import main
    from moesim.traces import Trace

    ex = _small_trace(5, 40, 2, 8, 2)
    path = tmp_path / "t.parquet"
    Trace.from_arrays(ex, np.ones(ex.shape, np.float32), None, "decode", num_experts=8,
                      expert_bytes=[1000, 1000]).write(path)
    assert main(["cache", str(path), "--policy", "lru", "--sizes", "4,8,16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    s = stream_from(ex, expert_bytes=1000)
    want = [run_policy(s, "lru", capacity_experts=c) for c in (4, 8, 16)]
    assert out["hit_rate"] == pytest.approx([w.stats["hit_rate"] for w in want])
    assert out["hit_rate_decode"] == out["hit_rate"]
    assert out["bytes_read"] == [w.stats["bytes_read"] for w in want]
    assert out["gap_recovered"] == [0.0, 0.0, 0.0] or None in out["gap_recovered"]
    assert main(["cache", str(path), "--policy", "nope", "--capacity-experts", "4"]) == 2
    assert "unknown cache policy" in capsys.readouterr().err
    assert main(["cache", str(path), "--capacity-bytes", "lots"]) == 2


def test_cli_cache_takes_expert_bytes_from_the_traces_model_preset(tmp_path, capsys):
    import json

    from moesim.cli import main
    from moesim.model import get_model
    from moesim.traces import Trace

    ex = _small_trace(5, 40, 2, 8, 2)
    path = tmp_path / "t.parquet"
    Trace.from_arrays(ex, np.ones(ex.shape, np.float32), None, "decode", num_experts=8,
                      model="mixtral-8x7b").write(path)
    assert main(["cache", str(path), "--policy", "lru", "--capacity-experts", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lookups = 40 * 2 * 2
    misses = round(lookups * (1 - out["hit_rate"]))
    assert out["bytes_read"] == misses * get_model("mixtral-8x7b").expert_bytes()
