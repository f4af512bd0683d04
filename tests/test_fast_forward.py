"""Fast-forward (windows of steps costed at once) gives the step-by-step simulation exactly.

Every scenario runs twice, ``simulation.fast_forward`` on and off; per-request timestamps,
the step table and the layer columns must agree to 1e-12 (relative), and the written
invariants still hold. The seeded set covers chunked prefill, the decode role, Poisson and
burst arrivals, KV preemption, two-micro-batch overlap, trace and counts routing, tp > 1,
per-layer and pair dispatchers, and both stopping limits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim import comm
from moesim.engine import ExpectedSlots, build
from moesim.scenario import scenario_from_dict
from tests.helpers import with_changes


def scenario(**changes) -> dict:
    """DeepSeek-V2-Lite-like small MoE (2 MoE layers + 1 dense) on 2 nodes of 2 GPUs."""
    sc = {
        "name": "ff",
        "model": {"preset": "deepseek-v2-lite", "overrides": {"num_layers": 3}},
        "cluster": {"preset": "h800-ib", "num_nodes": 2, "gpus_per_node": 2},
        "execution": {"dispatcher": "deepep-ll", "overlap": "two-microbatch"},
        "workload": {"arrival": "poisson", "rate_per_s": 400, "num_requests": 24, "seed": 1,
                     "prompt_tokens": {"dist": "uniform", "min": 1, "max": 90},
                     "output_tokens": {"dist": "uniform", "min": 1, "max": 40}},
        "serving": {"max_tokens_per_step": 48, "max_running": 4},
        "routing": {"source": "synthetic", "synth_tokens": 512, "synth_requests": 8, "seed": 2},
    }
    return with_changes(sc, changes)


def run_both(sc: dict):
    out = []
    for ff in (True, False):
        s = scenario_from_dict({**sc, "simulation": {**sc.get("simulation", {}),
                                                     "fast_forward": ff}})
        sim = build(s)
        out.append((sim, sim.run()))
    return out


def assert_same(sc: dict) -> tuple:
    (sim_ff, ff), (sim_ref, ref) = run_both(sc)
    assert all(ff.invariants.values()) and all(ref.invariants.values())
    cols = ["arrival_s", "admitted_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s",
            "generated_tokens", "preemptions"]
    pd.testing.assert_frame_equal(ff.requests[cols], ref.requests[cols], rtol=1e-12, atol=0)
    assert len(ff.steps) == len(ref.steps) > 0
    pd.testing.assert_frame_equal(ff.steps, ref.steps, rtol=1e-12, atol=0)
    pd.testing.assert_frame_equal(ff.layers, ref.layers, rtol=1e-12, atol=0)
    assert ff.summary["simulated_s"] == pytest.approx(ref.summary["simulated_s"], rel=1e-12)
    assert np.allclose(sim_ff.gpu_busy, sim_ref.gpu_busy, rtol=1e-12, atol=0)
    return sim_ff, ff, ref


CASES = {
    "colocated-chunked-poisson-trace": {},
    "no-chunking-overlap-off": {"serving.chunked_prefill": False,
                                "serving.max_tokens_per_step": 96,
                                "execution.overlap": "off"},
    "kv-preemption": {"memory.kv_capacity_tokens": 260, "workload.num_requests": 30,
                      "workload.rate_per_s": 2000},
    "decode-role-burst-trace": {"serving.role": "decode", "workload.arrival": "burst",
                                "workload.num_requests": 40, "serving.max_tokens_per_step": 4},
    "decode-role-burst-counts": {"serving.role": "decode", "workload.arrival": "burst",
                                 "workload.num_requests": 40, "serving.max_tokens_per_step": 4,
                                 "routing.source": "uniform"},
    "counts-colocated": {"routing.source": "uniform"},
    "tp2-flat": {"parallelism.tp": 2, "execution.dispatcher": "flat"},
    "tp2-counts": {"parallelism.tp": 2, "routing.source": "uniform"},
    "per-layer-dispatcher": {"execution.dispatcher": "deepep-normal"},
    "replicas-balanced": {"placement": {"kind": "balanced", "redundant_experts": 8}},
    "resample-short-trace": {"routing.on_short": "resample", "routing.synth_tokens": 128,
                             "routing.synth_requests": 2},
    "slow-arrivals-idle-gaps": {"workload.rate_per_s": 20},
    "step-limit": {"simulation.max_steps": 37, "serving.role": "decode",
                   "workload.arrival": "burst", "workload.num_requests": 40},
    "time-limit": {"simulation.max_sim_time_s": 0.05},
    "record-gpu": {"simulation.record_gpu": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_forward_equals_step_by_step(name):
    sim, ff, ref = assert_same(scenario(**CASES[name]))
    if name.startswith("kv-preemption"):
        assert ref.requests.preemptions.sum() > 0  # the case does preempt
    if name == "record-gpu":
        pd.testing.assert_frame_equal(ff.gpu_loads, ref.gpu_loads, rtol=1e-12, atol=0)
    if name in ("step-limit", "time-limit"):
        assert ff.summary["finished"] < len(ff.requests)  # the limit cut the run


def test_decode_windows_are_long_and_restore_on_arrivals():
    """The burst decode case runs in few windows; Poisson arrivals cut some windows short."""
    sim, _, _ = assert_same(scenario(**CASES["decode-role-burst-trace"]))
    assert sim._closed_decode and sim.windows * 4 < sim.num_steps
    sim, _, _ = assert_same(scenario(**{**CASES["decode-role-burst-trace"],
                                        "workload.arrival": "poisson"}))
    assert sim._closed_decode and sim.windows_cut > 0
    sim, _, _ = assert_same(scenario(**CASES["colocated-chunked-poisson-trace"]))
    assert sim.windows_cut > 0


@settings(max_examples=10, deadline=None)
@given(
    rate=st.floats(20, 3000),
    n=st.integers(1, 30),
    budget=st.sampled_from([8, 32, 128]),
    running=st.integers(1, 6),
    kv=st.integers(200, 1500),
    overlap=st.booleans(),
    role=st.sampled_from(["colocated", "decode"]),
    arrival=st.sampled_from(["poisson", "burst"]),
    source=st.sampled_from(["synthetic", "uniform"]),
    seed=st.integers(0, 1000),
)
def test_fast_forward_equals_step_by_step_on_random_scenarios(rate, n, budget, running, kv,
                                                               overlap, role, arrival, source,
                                                               seed):
    assert_same(scenario(**{
        "workload.arrival": arrival, "workload.rate_per_s": rate, "workload.num_requests": n,
        "workload.seed": seed, "serving.max_tokens_per_step": budget,
        "serving.max_running": running, "serving.role": role,
        "memory.kv_capacity_tokens": kv,
        "execution.overlap": "two-microbatch" if overlap else "off",
        "routing.source": source, "routing.seed": seed % 5}))


@pytest.mark.parametrize("dispatcher", ["deepep-ll", "flat"])
@pytest.mark.parametrize("placement", ["contiguous", "balanced"])
def test_route_window_equals_route_tokens_step_by_step(dispatcher, placement):
    """One windowed routing call gives, per step, what ``route_tokens`` (through
    ``comm.pair_comm_layers``) gives for that step alone."""
    sc = scenario(**{"execution.dispatcher": dispatcher,
                     "placement": {"kind": placement,
                                   "redundant_experts": 8 if placement == "balanced" else 0}})
    router = build(scenario_from_dict(sc)).router
    rng = np.random.default_rng(5)
    W, L, G = 5, router.L, router.G
    sizes = [3, 0, 17, 1, 40]
    step = np.repeat(np.arange(W), sizes)
    rows = rng.integers(0, router.T, len(step))
    src = rng.integers(0, G, len(step))
    req = rng.integers(0, 50, len(step))
    win = router.route_window(rows, src, req, step, W, 0.5)
    names = np.array(comm.LL_TERMS)
    for k in range(W):
        sel = step == k
        one = router.route_tokens(rows[sel], src[sel], 0.5, req[sel])
        part = slice(k * L, (k + 1) * L)
        assert np.array_equal(win["slot_rows"][part], one.slot_rows)
        for key in ("gpu_load", "dispatch_s", "combine_s", "sent_bytes", "recv_bytes"):
            assert np.allclose(win[key][part], getattr(one, key), rtol=1e-12, atol=0), key
        b = win["bottleneck"]
        got = names[b[part]].tolist() if isinstance(b, np.ndarray) else b[part]
        assert got == one.bottleneck


@pytest.mark.parametrize("dispatcher", ["deepep-ll", "flat"])
def test_route_expected_many_equals_route_expected(dispatcher):
    """Memo misses computed together give what ``route_expected`` gives row by row (also
    for a row repeated inside the call and a row already memoised)."""
    sc = scenario_from_dict(scenario(**{"execution.dispatcher": dispatcher,
                                        "routing.source": "uniform"}))
    many, one = build(sc), build(sc)
    rows = np.array([[3, 0, 2, 5], [1, 1, 1, 1], [3, 0, 2, 5], [0, 0, 0, 7]], dtype=float)
    many.router.route_expected(rows[3], 0.5)  # memoised before the call
    got = many.router.route_expected_many(rows, 0.5, many.costs)
    assert got[0] is got[2]
    for row, r in zip(rows, got, strict=True):
        ref = one.router.route_expected(row, 0.5)
        # (batched misses keep expert times and their statistics, not P(active))
        for key in ("slot_load", "gpu_load", "dispatch_s", "combine_s", "sent_bytes",
                    "recv_bytes"):
            assert np.allclose(getattr(r, key), getattr(ref, key), rtol=1e-12, atol=0), key
        assert r.bottleneck == ref.bottleneck
        expert_t = one._expected_experts(ref)
        assert np.allclose(many._expected_experts(r), expert_t, rtol=1e-12, atol=0)
        if r is not got[3]:  # (row 3 was memoised by route_expected, without statistics)
            assert np.allclose(r.expert_stats[0], expert_t.max(axis=1), rtol=1e-12, atol=0)
            assert np.allclose(r.expert_stats[1], expert_t.mean(axis=1), rtol=1e-12, atol=0)
            assert np.allclose(r.expert_stats[2], expert_t.sum(axis=0), rtol=1e-12, atol=0)
            assert np.allclose(r.load_stats[0], ref.gpu_load.max(axis=1), rtol=1e-12, atol=0)
            assert np.allclose(r.load_stats[1], ref.gpu_load.mean(axis=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("totals", [[0.5, 3.0, 40.0], [150.0, 300.5], [900.0, 1.0e5]])
def test_experts_expected_equals_the_whole_roofline(totals):
    """The per-GPU memory-bound sums (hot slots corrected on the whole roofline, a never-idle
    slot, the fallback once many slots may be compute-bound) give what ``experts`` gives
    slot by slot from P(active)."""
    sim = build(scenario_from_dict(scenario(**{"routing.source": "uniform"})))
    r, costs, G = sim.router, sim.costs, sim.layout.num_gpus
    # skewed picks per token (a few hot slots), one slot every token picks (never idle)
    kshare = np.random.default_rng(4).pareto(1.5, r.expected.kshare.shape) * r.expected.kshare
    kshare = np.minimum(kshare, 0.97)
    kshare[0, 0] = 1.0
    log_idle = np.log1p(-np.minimum(kshare, 1 - 1e-12))
    always = kshare >= 1.0
    T = np.array(totals)
    got = costs.experts_expected(T, ExpectedSlots.of(kshare, log_idle, always, r.S), G)
    lg = T[:, None, None] * log_idle
    lg[:, always] = np.log1p(-(1.0 - 1e-15))
    active = -np.expm1(lg)
    active[:, always] = 1.0
    n, (L, R) = len(T), kshare.shape
    want = costs.experts((T[:, None, None] * kshare).reshape(n * L, R), G,
                         active.reshape(n * L, R)).reshape(n, L, G)
    assert np.allclose(got, want, rtol=1e-12, atol=0)


def test_compiled_slot_counter_equals_numpy(monkeypatch):
    """The optional numba kernel counts exactly what numpy's gather + bincount count."""
    from moesim import engine

    if engine.SLOT_COUNTER is None:
        pytest.skip("numba is not installed (the numpy path is the one in use)")
    sc = scenario(**{"placement": {"kind": "balanced", "redundant_experts": 8}})
    router = build(scenario_from_dict(sc)).router
    rng = np.random.default_rng(9)
    step = np.repeat(np.arange(4), [5, 0, 30, 2])
    rows, src = rng.integers(0, router.T, len(step)), rng.integers(0, router.G, len(step))
    req = rng.integers(0, 50, len(step))
    compiled = router.route_window(rows, src, req, step, 4, 0.5)
    monkeypatch.setattr(engine, "SLOT_COUNTER", None)
    plain = router.route_window(rows, src, req, step, 4, 0.5)
    assert compiled["slot_rows"].sum() == len(step) * router.L * router.K
    for key in ("slot_rows", "gpu_load", "dispatch_s", "combine_s", "sent_bytes", "recv_bytes",
                "bottleneck"):
        assert np.array_equal(compiled[key], plain[key]), key


def test_parallel_slot_count_equals_one_thread(monkeypatch):
    """Counting split across threads (each slice into its own array, then summed) equals one
    pass; also with more tokens than slices and unsorted steps."""
    from moesim import engine

    if engine.SLOT_COUNTER is None:
        pytest.skip("numba is not installed (the numpy path is the one in use)")
    rng = np.random.default_rng(4)
    nb = 97
    row_slot = rng.integers(0, nb, (300, 12)).astype(np.int32)
    key = rng.integers(0, 300, 20_000).astype(np.intp)
    step = rng.integers(0, 6, len(key)).astype(np.intp)
    one = np.zeros(6 * nb, np.int32)
    engine.SLOT_COUNTER(row_slot, key, step, nb, one)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 4)
    split = np.zeros(6 * nb, np.int32)
    engine.count_slots(row_slot, key, step, nb, split)
    assert np.array_equal(one, split) and split.sum() == len(key) * 12
    expect = np.bincount((row_slot[key] + (step * nb)[:, None]).ravel(), minlength=6 * nb)
    assert np.array_equal(split, expect)
