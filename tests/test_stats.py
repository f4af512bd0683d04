"""Trace statistics (moesim.traces.stats): closed forms, invariants, naive references, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import TraceError
from moesim.traces import Trace
from moesim.traces.stats import (
    compute_stats,
    imbalance,
    lru_hit_curve,
    pair_pmi,
    pair_pmi_of,
    routing_entropy,
    stack_distances,
)


# ----- independent reference implementations ---------------------------------------------------------
def naive_stack_distances(experts: np.ndarray, scope: str) -> np.ndarray:
    """Move-to-front list per stack: the distance is the key's index in the list."""
    stacks: dict[int, list] = {}
    out = []
    T, L, K = experts.shape
    for t in range(T):
        for layer in range(L):
            for s in range(K):
                e = int(experts[t, layer, s])
                if e < 0:
                    continue
                stack = stacks.setdefault(layer if scope == "per-layer" else 0, [])
                key = (layer, e)
                if key in stack:
                    d = stack.index(key)
                    stack.pop(d)
                else:
                    d = -1
                stack.insert(0, key)
                out.append(d)
    return np.array(out, dtype=np.int64)


def naive_srp(seqs: list[np.ndarray], E: int, m: int) -> float:
    """Best F1 over thresholds of 'experts used >= t times in the window', all windows pooled."""
    best = 0.0
    for t in range(m + 1):
        matched = predicted = actual = 0
        for seq in seqs:  # seq: [n, L, K]
            n, L, _ = seq.shape
            for start in range(n - m + 1):
                for layer in range(L):
                    ids = seq[start:start + m, layer].reshape(-1)
                    counts = np.bincount(ids[ids >= 0], minlength=E)
                    chosen = counts >= t
                    matched += int(counts[chosen].sum())
                    predicted += int(chosen.sum()) * m
                    actual += int(counts.sum())
        if predicted + actual:
            best = max(best, 2 * matched / (predicted + actual))
    return best


def naive_sch(seqs: list[np.ndarray], m: int, C: int) -> float:
    """Cache of C experts per layer; evict the fewest uses in the next m tokens, then the LRU."""
    hits = accesses = 0
    for seq in seqs:
        n, L, K = seq.shape
        for layer in range(L):
            cache: set[int] = set()
            seen: set[int] = set()
            last: dict[int, int] = {}
            for t in range(n):
                need = [int(e) for e in seq[t, layer] if e >= 0]
                accesses += len(need)
                hits += sum(e in cache for e in need)
                new = [e for e in need if e not in seen]
                hits += min(max(C - len(seen), 0), len(new))
                seen.update(need)
                for s, e in enumerate(need):
                    last[e] = t * K + s
                cache.update(need)
                future = seq[t + 1:t + 1 + m, layer].reshape(-1)
                while len(cache) > C:
                    candidates = [x for x in cache if x not in need]
                    if not candidates:
                        break
                    cache.remove(min(candidates, key=lambda x: (int((future == x).sum()), last[x])))
    return hits / accesses


def random_routing(rng, T, L, E, K, absent=0.0) -> np.ndarray:
    experts = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int64)
    drop = rng.random((T, L)) < absent
    drop[:, 0] &= ~drop[:, 1:].all(axis=1) if L > 1 else False  # every token keeps one layer
    experts[drop] = -1
    return experts


routing_cases = st.builds(
    lambda seed, T, L, E, k_frac, absent: random_routing(
        np.random.default_rng(seed), T, L, E, max(1, int(round(k_frac * E))), absent),
    seed=st.integers(0, 2**32 - 1), T=st.integers(1, 25), L=st.integers(1, 4), E=st.integers(1, 8),
    k_frac=st.floats(0.1, 1.0), absent=st.sampled_from([0.0, 0.2]),
)


# ----- stack distances and LRU ---------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(experts=routing_cases, scope=st.sampled_from(["global", "per-layer"]))
def test_stack_distances_match_move_to_front_reference(experts, scope):
    assert np.array_equal(stack_distances(experts, scope), naive_stack_distances(experts, scope))


@settings(max_examples=25, deadline=None)
@given(experts=routing_cases, batch_rows=st.integers(1, 9))
def test_trace_streamed_in_small_batches_gives_the_same_distances(experts, batch_rows):
    if (experts[:, :, 0] < 0).all():
        return
    trace = Trace.from_arrays(experts, num_experts=int(experts.max()) + 1)
    from moesim.traces.stats import StackDistanceTracker, _trace_chunks

    for scope in ("global", "per-layer"):
        tracker = StackDistanceTracker(trace.meta.num_layers, trace.meta.num_experts, scope)
        parts = [tracker.feed(c.layer, c.experts, c.token_start) for c in _trace_chunks(trace, batch_rows)]
        assert np.array_equal(np.concatenate(parts), naive_stack_distances(experts, scope))


def test_lru_curve_of_a_cyclic_scan_is_a_step():
    # one layer, top-1, experts 0..4 visited cyclically 10 times: LRU misses everything below 5
    experts = np.tile(np.arange(5), 10).reshape(-1, 1, 1)
    curve = lru_hit_curve(experts)
    assert curve.shape == (6,)
    np.testing.assert_allclose(curve, [0, 0, 0, 0, 0, 45 / 50])
    np.testing.assert_allclose(lru_hit_curve(experts, [3, 5, 100]), [0, 0.9, 0.9])


def test_lru_curve_counts_within_token_reuse_and_is_monotone():
    # two layers, top-2: token 0 uses (0: 0,1) (1: 2,3); token 1 repeats token 0 exactly
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]]])
    d = stack_distances(experts, "global")
    # the second token finds every key 3 deep: the other three keys of token 0 came after it
    assert d.tolist() == [-1, -1, -1, -1, 3, 3, 3, 3]
    assert stack_distances(experts, "per-layer").tolist() == [-1, -1, -1, -1, 1, 1, 1, 1]
    rng = np.random.default_rng(3)
    curve = lru_hit_curve(random_routing(rng, 200, 3, 16, 4))
    assert (np.diff(curve) >= 0).all()
    assert curve[-1] == pytest.approx(1 - 3 * 16 / (200 * 3 * 4), abs=0.01)


def test_stack_distances_reject_bad_input():
    with pytest.raises(TraceError):
        stack_distances(np.zeros((2, 2, 2), dtype=float))
    with pytest.raises(TraceError):
        stack_distances(np.zeros((2, 2), dtype=int), scope="per-request")
    trace = Trace.from_counts(np.ones((2, 3, 4), dtype=int))
    with pytest.raises(TraceError, match="counts"):
        stack_distances(trace)


# ----- load-based statistics ---------------------------------------------------------------------------
def test_imbalance_and_entropy_closed_forms():
    np.testing.assert_allclose(imbalance(np.array([[1, 1, 2], [3, 3, 3]])), [1.5, 1.0])
    h = routing_entropy(np.array([[5, 5, 5, 5], [8, 0, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(h[:3], [2.0, 0.0, 1.5])
    assert np.isnan(h[3]) and np.isnan(imbalance(np.zeros((1, 3)))[0])


def test_pair_pmi_closed_forms():
    """Every token the same pair: 0. Two disjoint pairs, half the tokens each: log 2 (each pair
    chosen by half the tokens, each expert by half). K = 2 of 4 experts drawn uniformly and
    independently (all 6 pairs equally often): log(1/6 / (1/2)^2) = log(2/3)."""
    same = np.tile([[[0, 1]]], (10, 1, 1))
    halves = np.array([[[0, 1]]] * 5 + [[[2, 3]]] * 5)
    every = np.array([[[a, b]] for a in range(4) for b in range(a + 1, 4)] * 3)
    for experts, want in ((same, 0.0), (halves, np.log(2)), (every, np.log(2 / 3))):
        s = compute_stats(Trace.from_arrays(experts, num_experts=4, seq_lens=[len(experts)]),
                          segment_lengths=[], windows=[1])
        np.testing.assert_allclose(pair_pmi(s.coactivation, s.load, 2), [want], atol=1e-12)
        np.testing.assert_allclose(pair_pmi_of(experts, 4), [want], atol=1e-12)
        assert s.summary()["pair_pmi_mean"] == pytest.approx(want, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 40), L=st.integers(1, 4), E=st.integers(2, 10))
def test_load_coactivation_affinity_invariants(seed, T, L, E):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    experts = random_routing(rng, T, L, E, K)
    trace = Trace.from_arrays(experts, num_experts=E, seq_lens=[T])
    s = compute_stats(trace, segment_lengths=[2], cache_sizes=[K], windows=[3])
    assert (s.tokens, s.layers, s.experts, s.top_k) == (T, L, E, K)
    assert (s.load.sum(axis=1) == T * K).all()
    co = s.coactivation
    assert (co == co.transpose(0, 2, 1)).all()
    assert (np.diagonal(co, axis1=1, axis2=2) == s.load).all()
    # each token contributes K*K pairs per layer, K*K transitions per layer boundary
    assert (co.sum(axis=(1, 2)) == T * K * K).all()
    assert s.affinity.shape == (L - 1, E, E)
    if L > 1:
        assert (s.affinity.sum(axis=2) == K * s.load[:-1]).all()
        assert (s.affinity.sum(axis=1) == K * s.load[1:]).all()
    h = s.entropy_bits
    assert (h >= -1e-12).all() and (h <= np.log2(E) + 1e-12).all()
    assert (s.imbalance >= 1 - 1e-12).all() and (s.imbalance <= E + 1e-12).all()


def test_affinity_counts_only_consecutive_layers_of_one_token():
    # token 0: layer0 -> {1}, layer1 -> {2}; token 1: layer 1 absent, so no 0->1 pair
    experts = np.array([[[1], [2]], [[3], [-1]], [[0], [0]]])
    s = compute_stats(Trace.from_arrays(experts, num_experts=4), segment_lengths=[], windows=[1])
    assert s.affinity[0, 1, 2] == 1 and s.affinity[0, 0, 0] == 1 and s.affinity.sum() == 2


def test_reuse_gaps_and_working_sets_by_hand():
    # one layer, top-1, experts: 0 0 1 1 2 2 0 (7 tokens)
    experts = np.array([0, 0, 1, 1, 2, 2, 0]).reshape(-1, 1, 1)
    s = compute_stats(Trace.from_arrays(experts, num_experts=3), segment_lengths=[], windows=[2, 3])
    assert s.reuse_gap_tokens.tolist() == [0, 3, 0, 0, 0, 1]  # three gaps of 1, one of 5 (token 1 -> 6)
    assert s.working_set[2].tolist() == [1, 1, 1]  # the partial last window (token 6) is left out
    assert s.working_set[3].tolist() == [2, 2]


def test_counts_trace_reports_load_statistics_only():
    counts = np.zeros((2, 3, 4), dtype=int)
    counts[:, :, 0] = 6
    counts[:, :, 1] = 2
    s = compute_stats(Trace.from_counts(counts, top_k=2))
    assert s.tokens == 8 and s.coactivation is None and s.notes
    np.testing.assert_allclose(s.imbalance, 3.0)
    assert s.to_dict()["imbalance_mean"] == pytest.approx(3.0)


# ----- SRP and SCH ---------------------------------------------------------------------------------
def test_srp_closed_forms():
    # a constant expert is predicted perfectly; alternating 0/1 with m=2 gives F1 = 2/3
    const = np.zeros((10, 1, 1), dtype=int)
    s = compute_stats(Trace.from_arrays(const, num_experts=2), segment_lengths=[1, 4], cache_sizes=[1])
    assert s.srp[4]["srp"] == pytest.approx(1.0) and s.srp[4]["windows"] == 7
    alt = np.array([0, 1] * 5).reshape(-1, 1, 1)
    s = compute_stats(Trace.from_arrays(alt, num_experts=2), segment_lengths=[2], cache_sizes=[1])
    assert s.srp[2]["srp"] == pytest.approx(2 / 3)
    assert s.srp[2]["threshold"] in (0, 1)


def test_sch_closed_forms():
    # C=2, look-ahead 2: at token 2 expert 1 is evicted (unused next), not the older expert 0
    seq = np.array([0, 1, 2, 0, 0]).reshape(-1, 1, 1)
    s = compute_stats(Trace.from_arrays(seq, num_experts=3), segment_lengths=[2], cache_sizes=[2])
    assert s.sch[2][2]["sch"] == pytest.approx(4 / 5)
    # with C = top_k the cache holds only the last token's experts: hits = overlap with it
    alt = np.array([0, 1] * 4).reshape(-1, 1, 1)
    s = compute_stats(Trace.from_arrays(alt, num_experts=2), segment_lengths=[4], cache_sizes=[1])
    assert s.sch[4][1]["sch"] == pytest.approx(1 / 8)  # only the first (cold, empty cache) use


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_seq=st.integers(1, 3), L=st.integers(1, 3), E=st.integers(2, 7))
def test_srp_and_sch_match_naive_references(seed, n_seq, L, E):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    lens = rng.integers(1, 14, size=n_seq)
    experts = random_routing(rng, int(lens.sum()), L, E, K, absent=0.1)
    if (experts[:, :, 0] < 0).all():
        return
    seqs = np.split(experts, np.cumsum(lens)[:-1])
    trace = Trace.from_arrays(experts, num_experts=E, seq_lens=lens)
    caps = sorted({K, K + 1, 2 * K})
    s = compute_stats(trace, segment_lengths=[1, 3, 8], cache_sizes=caps, batch_rows=int(rng.integers(1, 20)))
    for m in (1, 3, 8):
        expected = naive_srp(seqs, E, m)
        got = s.srp[m]["srp"]
        if got is None:
            assert all(len(q) < m for q in seqs)
        else:
            assert got == pytest.approx(expected)
        for c in caps:
            assert s.sch[m][c]["sch"] == pytest.approx(naive_sch(seqs, m, c))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch_rows=st.integers(1, 30))
def test_every_statistic_is_independent_of_the_batch_size(seed, batch_rows):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 12, size=3)
    experts = random_routing(rng, int(lens.sum()), 3, 6, 2, absent=0.1)
    if (experts[:, :, 0] < 0).all():
        return
    trace = Trace.from_arrays(experts, num_experts=6, seq_lens=lens)
    kw = dict(segment_lengths=[2, 5], cache_sizes=[2, 3], windows=[1, 4])
    a = compute_stats(trace, batch_rows=batch_rows, **kw)
    b = compute_stats(trace, **kw)
    assert json.dumps(a.to_dict(), default=_plain) == json.dumps(b.to_dict(), default=_plain)
    assert (a.coactivation == b.coactivation).all() and (a.affinity == b.affinity).all()


def _plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else int(x)


# ----- command line ----------------------------------------------------------------------------------
def test_cli_stats_json_text_and_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.parquet"
    Trace.from_arrays(random_routing(rng, 30, 2, 8, 2), num_experts=8, seq_lens=[10, 20]).write(path)
    assert main(["trace", "stats", str(path), "--json", "--segment-lengths", "4", "--cache-sizes", "2,4",
                 "--out", str(tmp_path / "s.npz")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["tokens"], payload["layers"], payload["experts"], payload["top_k"]) == (30, 2, 8, 2)
    assert payload["imbalance_mean"] >= 1 and "coactivation" not in payload
    with np.load(tmp_path / "s.npz") as z:
        assert z["coactivation"].shape == (2, 8, 8) and z["load"].sum() == 30 * 2 * 2
    assert main(["trace", "stats", str(path)]) == 0
    text = capsys.readouterr().out
    assert "tokens 30" in text and "SRP" in text and "LRU" in text


def test_cli_stats_bad_options_give_one_line(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    Trace.from_arrays(np.zeros((3, 1, 1), dtype=int), num_experts=2).write(path)
    assert main(["trace", "stats", str(path), "--window", "0"]) == 2
    assert main(["trace", "stats", str(path), "--cache-sizes", "a"]) == 2
    assert main(["trace", "stats", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


# ----- real traces ----------------------------------------------------------------------------------
def _esft_trace(path) -> Trace:
    with np.load(path) as z:
        return Trace.from_arrays(z["experts"], z["weights"], z["seq_lens"], "prefill", num_experts=64,
                                 model="esft-vanilla-lite", weight_norm="raw")


def test_esft_law_stats(esft_npz, tmp_path):
    trace = _esft_trace(esft_npz["law"])
    s = compute_stats(trace, segment_lengths=[4, 16], cache_sizes=[6, 12])
    assert (s.tokens, s.layers, s.experts, s.top_k) == (8327, 26, 64, 6)
    assert (s.load.sum(axis=1) == 8327 * 6).all()
    assert s.reuse["global"]["accesses"] == 8327 * 26 * 6
    # every (layer, expert) is used: exactly 26 * 64 first accesses in either scope
    assert s.reuse["global"]["first_accesses"] == s.reuse["per-layer"]["first_accesses"] == 26 * 64
    # a per-layer LRU of 64 experts holds a whole layer: everything but first uses hits
    assert s.lru_hit_rates("per-layer", [64])[0] == pytest.approx(1 - 1664 / (8327 * 156))
    # locality beats chance: a random top-6 of 64 would reuse the previous token's expert 6/64 of the time
    assert s.srp[4]["srp"] > 0.4 and s.sch[4][12]["sch"] > s.lru_hit_rates("per-layer", [12])[0]
    with np.load(esft_npz["law"]) as z:
        e = z["experts"].astype(np.int64)
    direct = stack_distances(e, "global")
    assert np.array_equal(np.bincount(direct[direct >= 0], minlength=1664), s.reuse["global"]["histogram"])


def test_esft_law_import_then_cli_stats(esft_npz, tmp_path, capsys):
    out = tmp_path / "law.parquet"
    if main(["trace", "import", "--format", "arrays-npz", str(esft_npz["law"]), "--out", str(out)]) != 0:
        pytest.skip("the arrays-npz importer is not available")
    capsys.readouterr()
    assert main(["trace", "stats", str(out), "--json", "--segment-lengths", "4"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["tokens"], payload["layers"], payload["experts"], payload["top_k"]) == (8327, 26, 64, 6)
    assert payload["imbalance_mean"] > 1


def test_phone_trace_stats_and_recorded_lru_hit_rate(phone_trace_dir):
    importers = pytest.importorskip("moesim.traces.importers")
    trace = importers.import_trace(phone_trace_dir / "qwen.route.csv", "route-trace-v1")
    s = compute_stats(trace, segment_lengths=[4], cache_sizes=[6])
    assert (s.layers, s.experts, s.top_k) == (48, 128, 6)
    assert s.tokens == 28 + 128
    # the engine ran one global LRU of 4000 MiB over (layer, expert) keys and recorded 74.9 % hits;
    # a token-accounted LRU with the same number of experts must land close (the engine's
    # prefill looked up each expert once per layer batch, which shifts the figure slightly)
    capacity = 4000 * 2**20 // trace.meta.expert_bytes[0]
    assert lru_hit_curve(trace, [capacity], "global")[0] == pytest.approx(0.749, abs=0.02)
