"""Nearest replica selection (SGLang "static" dispatch) in the placement load model, the
cross-node metric and the node-first search: closed forms, invariants, no-loss guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.planners.evaluate import evaluate
from moesim.planners.inputs import Cluster, PlacementError, PlacementProblem, problem_from_trace
from moesim.planners.objectives import Objective, layer_terms, plan_values
from moesim.planners.plan import Plan
from moesim.planners.solve import make_plan
from moesim.traces import Trace
from tests.helpers import assert_node_search_deltas_exact


# ----- closed forms -------------------------------------------------------------------------------
def test_nearest_closed_form_traffic_and_loads():
    # 4 GPUs in 2 nodes (GPUs 0,1 | 2,3), one slot each: expert 0 on GPU 0 and GPU 2 (both nodes),
    # expert 1 on GPU 1 (node 0), expert 2 on GPU 3 (node 1).
    plan = Plan(np.array([[0, 1, 0, 2]]), 3, 4, 2, "x")
    # one token each of {0, 1}, {0, 2}, {1, 2} (top-2; {0} alone is a top-1 trace below)
    trace = Trace.from_arrays(np.array([[[0, 1]], [[0, 2]], [[1, 2]]]), num_experts=3)
    uni = evaluate(plan, trace, selection="uniform")
    near = evaluate(plan, trace, selection="nearest")
    # uniform: {0,1} reaches node 0 surely, node 1 with p = 1/2 -> 1.5 nodes, 0.75 leave the source
    # node; {0,2} likewise; {1,2} reaches 2 nodes, 1 leaves
    assert uni["dest_nodes_per_token"] == pytest.approx((1.5 + 1.5 + 2) / 3)
    assert uni["cross_node_tokens"] == pytest.approx(0.75 + 0.75 + 1.0)
    # nearest: expert 0 is always served on the source node. {0,1}: from node 0 nothing leaves,
    # from node 1 one copy goes to node 0 -> 0.5; {0,2} -> 0.5; {1,2} -> 1 either way
    assert near["cross_node_tokens"] == pytest.approx(0.5 + 0.5 + 1.0)
    assert near["dest_nodes_per_token"] == pytest.approx((1.5 + 1.5 + 2) / 3)
    single = Trace.from_arrays(np.array([[[0]], [[0]]]), num_experts=3)
    # a token whose only expert has a replica on both nodes never crosses under nearest
    assert evaluate(plan, single, selection="nearest")["cross_node_tokens"] == 0
    assert evaluate(plan, single, selection="uniform")["cross_node_tokens"] == pytest.approx(2 * 0.5)


def test_nearest_loads_split_by_node():
    # expert 0: two replicas on node 0 (GPUs 0, 1), one on node 1 (GPU 2); expert 1 on GPU 3
    plan = Plan(np.array([[0, 0, 0, 1]]), 2, 4, 2, "x", replica_selection="nearest")
    load = np.array([[12.0, 4.0]])
    # uniform: 12 / 3 per replica
    assert plan.gpu_loads(load, "uniform")[0].tolist() == pytest.approx([4, 4, 4, 4])
    # nearest: each node sends 6; node 0's 6 over its two replicas, node 1's 6 to its one
    assert plan.gpu_loads(load)[0].tolist() == pytest.approx([3, 3, 6, 4])
    # an expert with no replica on a node: that node's share is spread over all its replicas
    plan2 = Plan(np.array([[0, 0, 1, 1]]), 2, 4, 2, "x")  # expert 0 on node 0 (twice), 1 on node 1
    assert plan2.gpu_loads(load, "nearest")[0].tolist() == pytest.approx([6, 6, 2, 2])


def test_unknown_selection_is_one_clear_error():
    with pytest.raises(Exception, match="unknown replica selection 'closest'"):
        PlacementProblem(np.ones((1, 4)), Cluster(4, 2), replica_selection="closest")
    with pytest.raises(PlacementError, match="unknown replica selection"):
        Plan(np.array([[0, 1, 2, 3]]), 4, 4, 2, "x", replica_selection="closest")


# ----- invariants ---------------------------------------------------------------------------------
def _random_case(seed, E=8, P=4, N=2, S=3, T=60, K=2):
    rng = np.random.default_rng(seed)
    # every expert once, then random extra replicas (no two of one expert on one GPU)
    per_gpu = np.zeros((E, P), dtype=int)
    per_gpu[np.arange(E), rng.permutation(np.arange(E) % P)] = 1
    for _ in range(int(rng.integers(0, P * S - E + 1))):
        free = np.flatnonzero(per_gpu.sum(axis=0) < S)
        g = int(rng.choice(free))
        cand = np.flatnonzero(per_gpu[:, g] == 0)
        if len(cand):
            per_gpu[int(rng.choice(cand)), g] = 1
    from moesim.planners.plan import phy2log_from_counts

    phy = phy2log_from_counts(per_gpu, S)
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])[:, None, :]
    return Plan(phy[None], E, P, N, "x"), Trace.from_arrays(experts, num_experts=E)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 100_000))
def test_nearest_never_crosses_more_than_uniform_and_conserves_load(seed):
    plan, trace = _random_case(seed)
    uni = evaluate(plan, trace, selection="uniform")
    near = evaluate(plan, trace, selection="nearest")
    assert near["cross_node_tokens"] <= uni["cross_node_tokens"] + 1e-9
    load = trace.load_matrix().astype(float)
    for sel in ("uniform", "nearest"):
        assert plan.gpu_loads(load, sel).sum() == pytest.approx(load.sum())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 100_000))
def test_objective_cross_node_equals_the_evaluation_under_nearest(seed):
    plan, trace = _random_case(seed)
    problem = problem_from_trace(trace, Cluster(4, 2), num_replicas=int((plan.phy2log[0] >= 0).sum()),
                                 slots_per_gpu=3, replica_selection="nearest")
    terms = layer_terms(problem, Objective({"cross_node": 1.0, "balance": 1.0}), 0, plan.phy2log[0])
    m = evaluate(plan, trace, selection="nearest")
    assert terms["cross_node"] * m["tokens"] == pytest.approx(m["cross_node_tokens"])
    assert terms["balance"] == pytest.approx(m["max_mean_load"])


# ----- the search with experts on every node ------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_everywhere_position_deltas_are_exact(seed):
    assert_node_search_deltas_exact(seed, num_experts=9, everywhere=True)


def test_everywhere_limits_charge_every_node():
    from moesim.planners.partition import Limits

    load = np.array([6.0, 2, 2, 2])
    limits = Limits(load, np.ones(4), 2, cap=7.0, slots=3, spread_demand=np.ones(4))
    node = np.array([2, 0, 0, 1])  # expert 0 on both nodes: 3 + 4 on node 0, 3 + 2 on node 1
    assert limits.usage(node)[0].tolist() == pytest.approx([7, 5])
    assert limits.usage(node)[1].tolist() == pytest.approx([3, 2])
    assert limits.feasible(node)
    ok = limits.move_ok(node)
    assert not ok[3, 0]  # node 0 is full (load 7 and 3 slots)
    assert ok[1, 1]  # 3 + 2 + 2 = 7 on node 1
    assert limits.feasible(np.array([2, 2, 0, 1]))  # 3 + 1 + 2 = 6 and 3 slots on each node
    assert not limits.feasible(np.array([2, 2, 0, 0]))  # node 0: 3 + 1 + 2 + 2 = 8 > 7


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_partition_never_returns_worse_than_a_feasible_start(seed):
    from moesim.planners.partition import Limits, distinct_nodes, partition, token_sets

    rng = np.random.default_rng(seed)
    E, N = 12, 2
    experts = np.stack([rng.choice(E, 3, replace=False) for _ in range(200)])
    sets, weight = token_sets(experts)
    load = np.bincount(experts.ravel(), minlength=E).astype(float)
    spread = np.ones(E) if seed % 2 else None
    limits = Limits(load, np.ones(E), N, load.sum() / N * 1.3, E // N + 2, spread)
    start = np.arange(E) % N
    if not limits.feasible(start):
        return
    node, reached = partition(sets, weight, limits, [start], time_limit=2, seed=seed, random_starts=0)
    assert limits.feasible(node)
    assert reached <= distinct_nodes(start, sets, weight, N) + 1e-12


def _toy_problem(selection, redundant=8, seed=0):
    rng = np.random.default_rng(seed)
    E, T = 32, 1500
    pop = rng.dirichlet(np.ones(E) * 3)
    experts = np.stack([rng.choice(E, 4, replace=False, p=pop) for _ in range(T)])[:, None, :]
    trace = Trace.from_arrays(experts, num_experts=E)
    return trace, problem_from_trace(trace, Cluster(4, 2), num_replicas=E + redundant, replica_selection=selection)


def test_ilp_under_nearest_never_loses_and_cuts_traffic():
    from moesim.planners.ilp import balance_caps, heuristic_maps
    from moesim.planners.objectives import max_gpu_load

    trace, problem = _toy_problem("nearest")
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    ilp = make_plan(problem, obj, "ilp", time_limit=20, subprocess=False)
    assert ilp.replica_selection == "nearest" and any("static" in n for n in ilp.notes)
    assert any("node-first" in n for n in ilp.notes)  # the search produced the plan
    caps = balance_caps(problem, obj, heuristic_maps(problem))
    assert (max_gpu_load(problem, ilp.phy2log) <= caps * (1 + 1e-9)).all()
    for name, phy in heuristic_maps(problem).items():
        if (max_gpu_load(problem, phy) <= caps * (1 + 1e-9)).all():
            # on its own objective the ILP never loses to a heuristic that respects the cap
            assert plan_values(problem, obj, ilp.phy2log).sum() <= plan_values(problem, obj, phy).sum() + 1e-9, name
    eplb = make_plan(problem, obj, "eplb")
    assert eplb.replica_selection == "nearest"
    m_ilp, m_eplb = evaluate(ilp, trace), evaluate(eplb, trace)
    assert m_ilp["cross_node_tokens"] < 0.9 * m_eplb["cross_node_tokens"]


def test_groups_everywhere_halves_the_remote_nodes_of_a_shared_hot_expert():
    """2 nodes of 2 GPUs, 8 experts in 2 groups of 4, 10 slots (one spare per node). Every
    token picks expert 0 (group 0) and one expert of group 1, so with whole groups on nodes it
    always needs both nodes: one remote node per token. Expert 0 on both nodes leaves only group
    1's node: remote for the half of the tokens that start on the other node."""
    from moesim.planners.locality import groups_everywhere_layer

    rng = np.random.default_rng(0)
    experts = np.stack([np.zeros(400, int), rng.integers(4, 8, 400)], axis=1)[:, None, :]
    trace = Trace.from_arrays(experts, num_experts=8)
    problem = problem_from_trace(trace, Cluster(4, 2), num_replicas=10, num_groups=2,
                                 replica_selection="nearest")
    obj = Objective({"cross_node": 1.0})
    row = groups_everywhere_layer(problem, 0, None)
    node_of_slot = np.arange(len(row)) // problem.slots_per_gpu // 2
    assert set(node_of_slot[row == 0]) == {0, 1}  # the hottest expert on every node
    for e in range(1, 8):  # every other expert on its group's node only
        assert len(set(node_of_slot[row == e])) == 1
    assert layer_terms(problem, obj, 0, row)["cross_node"] == pytest.approx(0.5)
    # a cap the spread plan cannot meet: fewer experts everywhere, or None
    tight = groups_everywhere_layer(problem, 0, 1e-9)
    assert tight is None


def test_reference_cap_against_eplb_as_deployed():
    """The ILP planned under nearest selection, every layer capped at 1.01 x EPLB's max GPU load
    under UNIFORM selection (EPLB as deployed): the cap holds layer by layer, so its max/mean is
    within 1 % of EPLB-uniform's (total load is the same under both rules), and it never loses to
    a heuristic that respects that cap on its own objective."""
    from moesim.planners.ilp import balance_caps, heuristic_maps
    from moesim.planners.objectives import max_gpu_load

    trace, near = _toy_problem("nearest")
    _, uni = _toy_problem("uniform")
    eplb = make_plan(uni, Objective(), "eplb")
    ref = max_gpu_load(uni, eplb.phy2log)
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01, balance_reference=tuple(ref))
    assert balance_caps(near, obj, heuristic_maps(near)) == pytest.approx(ref * 1.01)
    ilp = make_plan(near, obj, "ilp", time_limit=20, subprocess=False)
    assert (max_gpu_load(near, ilp.phy2log) <= ref * 1.01 * (1 + 1e-9)).all()
    m_ilp, m_ref = evaluate(ilp, trace), evaluate(eplb, trace, selection="uniform")
    assert m_ilp["max_mean_load"] <= m_ref["max_mean_load"] * 1.01 + 1e-9
    assert m_ilp["cross_node_tokens"] < m_ref["cross_node_tokens"]
    for name, phy in heuristic_maps(near).items():
        if (max_gpu_load(near, phy) <= ref * 1.01 * (1 + 1e-9)).all():
            assert plan_values(near, obj, ilp.phy2log).sum() <= plan_values(near, obj, phy).sum() + 1e-9, name
    assert ilp.objective["balance_reference"] == pytest.approx(list(ref))


def test_reference_cap_under_uniform_never_loses_to_the_reference():
    """Under uniform selection with the greedy plan (no duplicates) as the reference, greedy is a
    feasible warm start: the ILP's every layer stays under 1.01 x greedy's max load and scores no
    worse than greedy on its own objective."""
    from moesim.planners.objectives import max_gpu_load

    trace, uni = _toy_problem("uniform")
    greedy = make_plan(uni, Objective(), "greedy")
    ref = max_gpu_load(uni, greedy.phy2log)
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01, balance_reference=tuple(ref))
    ilp = make_plan(uni, obj, "ilp", time_limit=10, subprocess=False)
    assert (max_gpu_load(uni, ilp.phy2log) <= ref * 1.01 * (1 + 1e-9)).all()
    assert plan_values(uni, obj, ilp.phy2log).sum() <= plan_values(uni, obj, greedy.phy2log).sum() + 1e-9


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"balance_slack": 0.01, "balance_reference": (1.0, -2.0)}, "one positive max GPU load per layer"),
    ({"balance_slack": None, "balance_reference": (1.0,)}, "needs a balance slack"),
])
def test_reference_cap_bad_input_is_one_clear_error(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Objective({"cross_node": 1.0}, **kwargs)


def test_reference_cap_must_have_one_load_per_layer():
    _, uni = _toy_problem("uniform")
    obj = Objective({"cross_node": 1.0}, balance_slack=0.01, balance_reference=(1.0, 2.0))
    with pytest.raises(PlacementError, match="reference has 2 layers, the problem 1"):
        make_plan(uni, obj, "ilp", time_limit=5, subprocess=False)


# ----- CLI ----------------------------------------------------------------------------------------
def test_cli_replica_selection_is_recorded_and_noted(tmp_path, capsys):
    trace, _ = _toy_problem("nearest")
    trace.write(tmp_path / "t.parquet")
    out = tmp_path / "plan.json"
    rc = main(["place", "--trace", str(tmp_path / "t.parquet"), "--gpus", "4", "--nodes", "2", "--redundant", "4",
               "--objective", "balance=0.01,cross_node=1", "--balance-slack", "0.01", "--time-limit", "20",
               "--replica-selection", "nearest", "--out", str(out), "--export", "sglang", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["replica_selection"] == "nearest"
    assert "--ep-dispatch-algorithm static" in payload["export_note"]
    assert json.loads(out.read_text())["replica_selection"] == "nearest"
    rc = main(["place", "evaluate", str(out), "--trace", str(tmp_path / "t.parquet"), "--json",
               "--replica-selection", "uniform"])
    uni = json.loads(capsys.readouterr().out)
    assert rc == 0 and uni["replica_selection"] == "uniform"
    assert uni["cross_node_tokens"] >= payload["cross_node_tokens"] - 1e-9
    rc = main(["place", "--trace", str(tmp_path / "t.parquet"), "--gpus", "4", "--nodes", "2",
               "--replica-selection", "closest", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "replica selection" in err


def test_cli_balance_reference_caps_at_eplb_as_deployed(tmp_path, capsys):
    from moesim.planners.objectives import max_gpu_load

    trace, near = _toy_problem("nearest", redundant=4)
    _, uni = _toy_problem("uniform", redundant=4)
    trace.write(tmp_path / "t.parquet")
    out = tmp_path / "plan.json"
    rc = main(["place", "--trace", str(tmp_path / "t.parquet"), "--gpus", "4", "--nodes", "2", "--redundant", "4",
               "--objective", "balance=0.01,cross_node=1", "--balance-slack", "0.01", "--balance-reference", "eplb",
               "--time-limit", "20", "--replica-selection", "nearest", "--out", str(out), "--json"])
    assert rc == 0
    capsys.readouterr()
    plan = Plan.load(out)
    ref = max_gpu_load(uni, make_plan(uni, Objective(), "eplb").phy2log)
    assert plan.objective["balance_reference"] == pytest.approx(list(ref))
    assert (max_gpu_load(near, plan.phy2log) <= ref * 1.01 * (1 + 1e-9)).all()
    for args in (["--balance-reference", "eplb"], ["--balance-reference", "best", "--balance-slack", "0.01"]):
        rc = main(["place", "--trace", str(tmp_path / "t.parquet"), "--gpus", "4", "--nodes", "2",
                   "--objective", "balance=0.01,cross_node=1", *args, "--out", str(tmp_path / "p.json")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "reference" in err, err
