"""The all-to-all model: count matrices on hand-built routings, closed forms, DeepEP figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim import comm
from moesim.calibrate import deepep_scenarios, load_published, predict_deepep
from moesim.hardware import Cluster, CommParams, HardwareError, get_cluster


def small_cluster(nodes=2, gpn=2, **comm_kw) -> Cluster:
    base = get_cluster("h800-ib")
    return base.model_copy(update={"num_nodes": nodes, "gpus_per_node": gpn,
                                   "nics_per_node": gpn, "comm": CommParams(**comm_kw)})


# ----- X, Y, Z ---------------------------------------------------------------------------
def test_counts_hand_built():
    cl = small_cluster()
    plan = comm.Placement.from_expert_gpu([0, 1, 2, 3], 4)
    src = np.array([0, 0, 3, 1])
    ids = np.array([[0, 1], [2, 3], [3, -1], [2, 3]])
    c = comm.counts_from_tokens(src, ids, plan, cl)
    Z = np.zeros((4, 4))
    Z[0, [0, 1, 2, 3]] = 1
    Z[3, 3] = 1
    Z[1, [2, 3]] = 1
    np.testing.assert_array_equal(c.Z, Z)
    np.testing.assert_array_equal(c.X, Z)  # no two experts of one token share a GPU here
    np.testing.assert_array_equal(c.Y, [[1, 1], [0, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(c.tokens, [2, 1, 0, 1])


def test_counts_dedup_two_experts_on_one_gpu():
    cl = small_cluster()
    plan = comm.Placement.contiguous(8, 4)  # experts 2k, 2k+1 on GPU k
    c = comm.counts_from_tokens(np.array([0]), np.array([[4, 5, 6]]), plan, cl)
    assert c.Z[0, 2] == 2 and c.Z[0, 3] == 1
    assert c.X[0, 2] == 1 and c.X[0, 3] == 1  # per-GPU dedup
    assert c.Y[0, 1] == 1 and c.Y[0, 0] == 0  # both GPUs on node 1: one row per node


def test_nearest_replica_selection():
    cl = small_cluster()
    plan = comm.Placement(np.array([0, 1, 2, 3, 0]), np.array([0, 1, 2, 3, 2]), 4, 4,
                          selection="nearest")
    src = np.array([2, 3, 1, 0])
    c = comm.counts_from_tokens(src, np.zeros((4, 1), int), plan, cl)
    assert c.Z[2, 2] == 1  # same GPU
    assert c.Z[3, 2] == 1  # same node
    assert c.Z[1, 0] == 1 and c.Z[0, 0] == 1  # node 0 holds replica on GPU 0


def test_random_replicas_split_evenly():
    cl = small_cluster()
    plan = comm.Placement(np.array([0, 0]), np.array([1, 3]), 1, 4, selection="random", seed=3)
    c = comm.counts_from_tokens(np.zeros(20000, int), np.zeros((20000, 1), int), plan, cl)
    assert c.Z[0, 1] + c.Z[0, 3] == 20000
    assert abs(c.Z[0, 1] - 10000) < 400  # binomial, 4 sigma


def test_random_choice_among_three_replicas_is_even():
    cl = small_cluster()
    plan = comm.Placement(np.array([0, 0, 0, 1]), np.array([1, 2, 3, 0]), 2, 4, seed=5)
    ids = np.tile([0, 1], (30000, 1))
    c = comm.counts_from_tokens(np.zeros(30000, int), ids, plan, cl)
    assert c.Z[0, 0] == 30000  # the single-replica expert
    np.testing.assert_allclose(c.Z[0, 1:], 10000, atol=4 * 82)  # binomial sd 82, 4 sigma


def _brute_counts(src, ids, slots, rule, g, n):
    """X, Y, Z by walking every token: the definitions, written independently."""
    reps = {}
    for e, gpu in slots:  # replicas of an expert in slot order
        reps.setdefault(e, []).append(gpu)
    Z, X, Y = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n // g))
    for t, (s, row) in enumerate(zip(src, ids, strict=True)):
        gpus = []
        for e in row:
            if e < 0:
                continue
            r = reps[e]
            if rule == "round-robin":
                d = r[t % len(r)]
            else:  # nearest: same GPU, else the first on the same node, else the first
                same_node = [x for x in r if x // g == s // g]
                d = s if s in r else (same_node[0] if same_node else r[0])
            Z[s, d] += 1
            gpus.append(d)
        for d in set(gpus):
            X[s, d] += 1
        for node in {d // g for d in gpus}:
            Y[s, node] += 1
    return Z, X, Y


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.sampled_from(
    ["round-robin", "nearest"]), st.integers(0, 2**31))
def test_counts_match_brute_force_with_replicas_and_drops(nodes, gpn, k, rule, seed):
    rng = np.random.default_rng(seed)
    n, e = nodes * gpn, 6
    cl = small_cluster(nodes, gpn)
    slots = [(x, int(rng.integers(n))) for x in range(e)]
    slots += [(int(rng.integers(e)), int(rng.integers(n))) for _ in range(int(rng.integers(4)))]
    rng.shuffle(slots)
    plan = comm.Placement(np.array([a for a, _ in slots]), np.array([b for _, b in slots]), e,
                          n, selection=rule)
    src = rng.integers(0, n, 40)
    ids = np.array([rng.choice(e, size=min(k, e), replace=False) for _ in range(40)])
    ids[rng.random(ids.shape) < 0.15] = -1  # dropped slots
    c = comm.counts_from_tokens(src, ids, plan, cl)
    Z, X, Y = _brute_counts(src, ids, slots, rule, gpn, n)
    np.testing.assert_array_equal(c.Z, Z)
    np.testing.assert_array_equal(c.X, X)
    np.testing.assert_array_equal(c.Y, Y)


def test_aggregate_counts_match_tokens():
    cl = get_cluster("h800-ib").for_ep(16)
    src, ids = comm.uniform_routing(16, 512, 64, 4, seed=1)
    plan = comm.Placement.contiguous(64, 16)
    exact = comm.counts_from_tokens(src, ids, plan, cl)
    agg = np.zeros((16, 64))
    np.add.at(agg, (np.repeat(src, 4), ids.ravel()), 1)
    approx = comm.counts_from_aggregate(agg, np.full(16, 512), plan, cl)
    np.testing.assert_allclose(approx.Z, exact.Z)
    # uniform k-subsets: P(hit GPU) = 1 - C(60, 4) / C(64, 4) exactly (4 experts per GPU)
    from math import comb

    assert approx.X.mean() == pytest.approx(512 * (1 - comb(60, 4) / comb(64, 4)), rel=0.03)
    assert approx.X.sum() == pytest.approx(exact.X.sum(), rel=0.01)
    assert approx.Y.sum() == pytest.approx(exact.Y.sum(), rel=0.01)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(0, 10**6))
def test_count_invariants(nodes, gpn, k, seed):
    cl = small_cluster(nodes, gpn)
    g = nodes * gpn
    e = g * 2
    k = min(k, e)
    src, ids = comm.uniform_routing(g, 16, e, k, seed)
    c = comm.counts_from_tokens(src, ids, comm.Placement.contiguous(e, g), cl)
    assert c.Z.sum() == g * 16 * k  # no pair lost
    assert np.all(c.X <= c.Z) and np.all(c.X <= c.tokens[:, None])
    assert np.all(c.Y.sum(1) <= c.X.sum(1)) and np.all(c.Y.sum(1) >= np.minimum(1, k) * 16)
    for name in comm.DISPATCHERS:
        r = comm.layer_comm(cl, hidden=256, dispatcher=name, counts=c)
        assert r.combine_s >= 0 and (r.dispatch_s > 0 or g == 1)
        big = comm.layer_comm(cl, hidden=512, dispatcher=name, counts=c)
        assert big.dispatch_s >= r.dispatch_s


# ----- closed forms ----------------------------------------------------------------------------
def test_uniform_alltoall_busbw_equals_link_rate():
    cl = small_cluster(1, 8, a2a_latency=0.0)
    n, size = 8, 8 * 2**20
    t = comm.alltoall_uniform_time(cl, size)
    algbw = size / t
    busbw = algbw * (n - 1) / n
    assert busbw == pytest.approx(cl.nvl_bw(), rel=1e-9)


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_multinode_alltoall_approaches_n_over_n_minus_1_nic(nodes):
    cl = small_cluster(nodes, 8)  # one NIC per GPU, a2a latency = NIC latency
    rate = cl.rdma_bw()
    big = 2**32
    algbw = big / comm.alltoall_uniform_time(cl, big)
    assert algbw == pytest.approx(nodes / (nodes - 1) * rate, rel=1e-3)
    small = 2**16
    assert small / comm.alltoall_uniform_time(cl, small) < 0.9 * nodes / (nodes - 1) * rate


def test_hierarchical_moves_same_cross_node_rows_as_flat():
    cl = get_cluster("h100-ib").for_ep(32)
    src, ids = comm.uniform_routing(32, 256, 128, 8, seed=2)
    c = comm.counts_from_tokens(src, ids, comm.Placement.contiguous(128, 32), cl)
    flat = comm.get_dispatcher("flat").run(c, cl, 100, 100)
    hier = comm.get_dispatcher("hierarchical").run(c, cl, 100, 100)
    assert flat.link_bytes["nic_out"].sum() == pytest.approx(hier.link_bytes["nic_out"].sum())
    # 2DH: every NIC talks only to its rail peers, so NIC bytes per GPU equal flat's total
    assert hier.link_bytes["nvl_out"].sum() > flat.link_bytes["nvl_out"].sum()


def test_allgather_ignores_placement():
    cl = get_cluster("h800-ib").for_ep(8)
    src, ids = comm.uniform_routing(8, 128, 64, 4, seed=0)
    a = comm.layer_comm(cl, hidden=1024, dispatcher="allgather", src_gpu=src, expert_ids=ids,
                        num_experts=64)
    skew = comm.Placement.from_expert_gpu(np.zeros(64, int), 8)
    b = comm.layer_comm(cl, hidden=1024, dispatcher="allgather", src_gpu=src, expert_ids=ids,
                        placement=skew)
    assert a.dispatch_s == b.dispatch_s
    assert a.dispatch_s == pytest.approx(comm.allgather_time(cl, 8 * 128 * 2048, 8))


def test_hot_gpu_sets_the_bottleneck():
    cl = get_cluster("h800-ib").for_ep(8)
    src, ids = comm.uniform_routing(8, 256, 64, 2, seed=0)
    even = comm.layer_comm(cl, hidden=1024, src_gpu=src, expert_ids=ids, num_experts=64)
    hot = np.arange(64) // 8
    hot[:16] = 0  # GPU 0 holds a quarter of the experts
    skew = comm.layer_comm(cl, hidden=1024, src_gpu=src, expert_ids=ids,
                           placement=comm.Placement.from_expert_gpu(hot, 8))
    assert skew.dispatch_s > 1.5 * even.dispatch_s
    assert "GPU/NIC 0" in skew.bottleneck and "in" in skew.bottleneck


def test_collectives_closed_form():
    cl = small_cluster(1, 8)
    s = 1e9
    t = comm.allreduce_time(cl, s, 8)
    assert t == pytest.approx(2 * 7 / 8 * s / cl.nvl_bw() + 14 * cl.nvlink.latency)
    assert comm.allreduce_time(cl, s, 1) == 0.0


def test_row_bytes_match_deepep():
    assert comm.row_bytes(7168, "fp8") == 7392
    assert comm.wire_rows("deepep-ll", 7168, "fp8") == (7408, 14336)


# ----- DeepEP --------------------------------------------------------------------------------
def test_deepep_test_routing_is_node_limited():
    src, ids = comm.deepep_test_routing(64, 256, 256, 8, 8, node_limited=True, seed=0)
    nodes = ids // 32
    distinct = np.array([len(set(r)) for r in nodes])
    assert distinct.max() <= 4 and len(np.unique(ids[0])) == 8
    assert np.all(np.bincount(src) == 256)


@pytest.fixture(scope="module")
def deepep_rows():
    pub = load_published()
    scen = deepep_scenarios()  # the seeds the committed fit averaged
    return predict_deepep(get_cluster("h800-ib").comm, scen, pub)


def test_deepep_calibration_points_reproduced(deepep_rows):
    cal = [r for r in deepep_rows if r["calibration"]]
    assert len(cal) == 4
    for r in cal:  # the preset's constants are the fit to exactly these four numbers
        assert abs(r["error_pct"]) < 0.05, r


def test_deepep_predictions(deepep_rows):
    pred = [r for r in deepep_rows if not r["calibration"]]
    assert len(pred) == 16
    errors = np.array([abs(r["error_pct"]) for r in pred])
    # see docs/hardware-and-comm.md: 15 of 16 within 5 %, normal combine EP16 +5.8 %
    assert errors.max() < 6.0
    assert (errors <= 5.0).sum() >= 15
    ll = [abs(r["error_pct"]) for r in pred if r["kernel"] == "low-latency"]
    assert max(ll) < 5.0


def test_ll_rank_times_hand_built():
    """Per-rank kernel ends: own send, own receive, and the slowest rank sending to it."""
    cl = small_cluster(2, 2, ll_rdma_bw=1.0, rdma_bw=1.0, ll_alpha=2.0)
    Z = np.zeros((4, 4))
    Z[0, 1], Z[0, 2], Z[3, 1] = 3, 1, 1  # send [4, 0, 0, 1], receive [0, 4, 1, 0]
    counts = comm.CommCounts(Z, (Z > 0).astype(float), np.zeros((4, 2)), np.ones(4), 2)
    ll = comm.get_dispatcher("deepep-ll")
    d, c = ll.rank_times(counts, cl, 1, 2)
    # dispatch: rank 2 receives 1 pair but waits for rank 0, which sends 4
    np.testing.assert_allclose(d, 2.0 + np.array([4, 4, 4, 1]))
    # combine (rows of 2 B back from the expert ranks): rank 3 waits for rank 1's 4 pairs
    np.testing.assert_allclose(c, 2.0 + 2 * np.array([4, 4, 1, 4]))
    r = ll.run(counts, cl, 1, 2)  # the slowest rank is the whole-layer time
    assert r.dispatch_s == pytest.approx(d.max()) and r.combine_s == pytest.approx(c.max())


# ----- CLI on a trace ----------------------------------------------------------------------------
def test_cli_alltoall_on_a_trace_counts_by_hand(tmp_path, capsys):
    from moesim.cli import main
    from moesim.traces import Trace

    # 9 tokens, 2 layers, top-2 of 8 experts; EP 4 on 2 nodes x 2 GPUs: expert e on GPU e // 2,
    # GPU g on node g // 2. --tokens-per-gpu 2 keeps the first 8 tokens of --layer 1 in
    # execution order, two per GPU.
    layer1 = np.array([[0, 1], [2, 7], [4, 5], [3, 6], [6, 7], [0, 4], [1, 2], [5, 3], [0, 1]])
    experts = np.stack([np.tile([0, 1], (9, 1)), layer1], axis=1)
    trace = tmp_path / "t.parquet"
    Trace.from_arrays(experts, num_experts=8).write(trace)
    cluster = tmp_path / "c.yaml"
    cluster.write_text("cluster: {preset: h800-ib, num_nodes: 2, gpus_per_node: 2, "
                       "nics_per_node: 2}\n")
    code = main(["comm", "alltoall", "--cluster", str(cluster), "--ep", "4",
                 "--tokens-per-gpu", "2", "--hidden", "128", "--routing", str(trace),
                 "--layer", "1", "--dispatcher", "flat", "--matrices", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    # hand count, token by token (source GPU: destination GPUs of its two experts)
    # GPU 0: t0 -> 0, 0; t1 -> 1, 3.   GPU 1: t2 -> 2, 2; t3 -> 1, 3.
    # GPU 2: t4 -> 3, 3; t5 -> 0, 2.   GPU 3: t6 -> 0, 1; t7 -> 2, 1.
    Z = [[2, 1, 0, 1], [0, 1, 2, 1], [1, 0, 1, 2], [1, 2, 1, 0]]
    X = [[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 2, 1, 0]]
    Y = [[2, 1], [1, 2], [1, 2], [2, 1]]
    assert out["matrices"] == {"X": X, "Y": Y, "Z": Z}
    assert out["tokens_per_gpu"] == 2 and out["experts"] == 8 and out["top_k"] == 2
    c = out["counts"]
    assert c["pairs"] == 16 and c["cross_gpu_tokens"] == 13 - 3
    assert c["cross_node_tokens"] == 1 + 2 + 1 + 2  # Y off the source's own node
    # flat: other-node pairs leave through the NIC, rows of 2 x 128 B; GPUs 1 and 3 send 3
    assert out["link_bytes_max"]["nic_out"] == 3 * 256


# ----- errors ----------------------------------------------------------------------------------
def test_errors_are_one_line():
    cl = get_cluster("h800-ib")
    with pytest.raises(HardwareError, match="not a multiple of gpus_per_node"):
        cl.for_ep(12)
    with pytest.raises(comm.CommError, match="not divisible"):
        comm.Placement.contiguous(100, 8)
    with pytest.raises(Exception, match="unknown dispatcher"):
        comm.get_dispatcher("magic")
    with pytest.raises(comm.CommError, match="has no replica"):
        comm.Placement.from_expert_gpu([0, 1], 2).__class__(np.array([0]), np.array([0]), 2, 2)


def test_placement_json(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 0, 1, 2, 3]]}))
    plan = comm.Placement.from_json(p, 4)
    assert list(plan.replica_counts) == [2, 2, 2, 2]
    assert set(plan.rep_gpu[plan.rep_expert == 0]) == {0, 2}
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(comm.CommError, match="not valid JSON"):
        comm.Placement.from_json(bad, 4)
