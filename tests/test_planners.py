"""Placement planners: EPLB golden case, baselines, objectives, the MILP paths, plans, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.planners.baselines import BASELINES, applicable, repair_duplicates, run_baseline
from moesim.planners.eplb import balanced_packing, rebalance_experts, replicate
from moesim.planners.evaluate import balance_metrics, evaluate
from moesim.planners.inputs import Cluster, PlacementError, PlacementProblem, problem_from_trace
from moesim.planners.objectives import Objective, balance_bound, max_gpu_load, plan_values
from moesim.planners.plan import Plan, replica_counts
from moesim.planners.refine import swap_search
from moesim.planners.solve import make_plan
from moesim.traces import Trace
from tests.helpers import assert_node_search_deltas_exact

README_W = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                     [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], float)
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


# ----- EPLB -------------------------------------------------------------------------------------
def test_eplb_reproduces_the_published_reference_case_exactly():
    assert rebalance_experts(README_W, 16, 4, 2, 8).tolist() == README_PHY2LOG


def test_eplb_reference_case_balance_and_counts():
    plan = Plan(rebalance_experts(README_W, 16, 4, 2, 8), 12, 8, 2, "eplb")
    assert plan.replica_counts().tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                               [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    ratio = balance_metrics(plan, README_W)["per_layer_max_mean"]
    assert ratio == pytest.approx([156 / 129.125, 179.5 / 144.5], abs=1e-6)  # 1.208, 1.242


def test_eplb_global_policy_on_the_reference_case():
    # 3 groups over 2 nodes selects the global policy; published max/mean 1.073 and 1.190
    plan = Plan(rebalance_experts(README_W, 16, 3, 2, 8), 12, 8, 2, "eplb-global")
    assert balance_metrics(plan, README_W)["per_layer_max_mean"] == pytest.approx([1.073, 1.190], abs=1e-3)
    assert plan.per_gpu()[0, 1, 7] == 2  # both replicas of expert 1 on GPU 7 (a known EPLB trait)


def test_balanced_packing_is_lpt_with_equal_counts():
    pack, pos = balanced_packing(np.array([5.0, 4, 3, 3, 2, 1]), 2)
    assert sorted(np.bincount(pack).tolist()) == [3, 3]
    # 5->A, 4->B, 3->B (4<5), 3->A (5<7), 2->B (7<8), 1->A (8<9)
    assert pack.tolist() == [0, 1, 1, 0, 1, 0] and pos.tolist() == [0, 0, 1, 1, 2, 2]


def test_replicate_minimises_the_largest_load_per_replica():
    w = np.array([10.0, 6, 3])
    _, count = replicate(w, 6)
    assert count.tolist() == [3, 2, 1]  # 10/3, 6/2, 3 -> max 3.33; no split of 6 slots does better
    best = min(max(w / np.array(c)) for c in [(a, b, 6 - a - b) for a in range(1, 5) for b in range(1, 5) if 6 - a - b >= 1])
    assert max(w / count) == pytest.approx(best)


# ----- inputs and infeasibility -------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_replicas": 8}, "more experts than slots"),
    ({"num_groups": 5}, "groups must divide experts"),
    ({"slots_per_gpu": 1}, "more replicas than slots"),
    ({"num_replicas": 12 * 9}, "no two replicas of one expert on one GPU"),
])
def test_infeasible_inputs_name_the_violated_constraint(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        PlacementProblem(np.ones((1, 12)), Cluster(8, 2), **kwargs)


def test_nodes_must_divide_gpus():
    with pytest.raises(PlacementError, match="nodes must divide GPUs"):
        Cluster(8, 3)


def test_hierarchical_eplb_needs_nodes_to_divide_groups():
    problem = PlacementProblem(np.ones((1, 12)), Cluster(8, 2), num_replicas=16, num_groups=3)
    with pytest.raises(PlacementError, match="nodes to divide groups"):
        make_plan(problem, solver="eplb-hierarchical")


# ----- baselines -------------------------------------------------------------------------------
def _problem(seed=0, L=2, E=16, P=4, N=2, R=20, **kw):
    rng = np.random.default_rng(seed)
    return PlacementProblem(rng.lognormal(0, 1, (L, E)) * 100, Cluster(P, N), num_replicas=R, **kw)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_places_every_expert_within_the_slots(name):
    problem = _problem(num_groups=4)
    phy = run_baseline(name, problem, seed=3)
    counts = replica_counts(phy, problem.num_experts)
    assert (counts >= 1).all() and (counts.sum(axis=1) == problem.num_replicas).all()
    assert phy.shape == (problem.num_layers, problem.num_slots)


def test_contiguous_and_round_robin_maps():
    problem = PlacementProblem(np.ones((1, 8)), Cluster(4, 1))
    assert run_baseline("contiguous", problem)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert run_baseline("round-robin", problem)[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_random_baseline_is_seeded():
    problem = _problem()
    assert (run_baseline("random", problem, 1) == run_baseline("random", problem, 1)).all()
    assert (run_baseline("random", problem, 1) != run_baseline("random", problem, 2)).any()


def test_repair_removes_same_gpu_duplicates():
    problem = PlacementProblem(README_W, Cluster(8, 2), num_replicas=16)
    phy = rebalance_experts(README_W, 16, 3, 2, 8)  # global policy: a duplicate in layer 0
    fixed = repair_duplicates(problem, phy)
    assert Plan(fixed, 12, 8, 2, "x").per_gpu().max() == 1
    assert (replica_counts(fixed, 12) == replica_counts(phy, 12)).all()


# ----- objectives, bounds, swap search ---------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_swap_search_never_raises_the_max_and_keeps_the_rules(seed):
    rng = np.random.default_rng(seed)
    E, P, S = 12, 4, 4
    share = rng.lognormal(0, 1, E)
    per_gpu = np.zeros((E, P), dtype=np.int64)
    slots = rng.permutation(P * S)[: E + 2]
    for i, s in enumerate(slots):
        e = i % E
        g = s // S
        if per_gpu[e, g] == 0:
            per_gpu[e, g] = 1
        else:
            per_gpu[e, (g + 1) % P] = 1
    if (per_gpu.sum(axis=0) > S).any():
        return
    better = swap_search(per_gpu, share, S)
    assert (share @ better).max() <= (share @ per_gpu).max() + 1e-9
    assert (better.sum(axis=1) == per_gpu.sum(axis=1)).all()  # replica counts kept
    assert better.max() <= 1 and (better.sum(axis=0) <= S).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_balance_bound_is_below_every_heuristic(seed):
    problem = _problem(seed)
    bound = balance_bound(problem)
    for name in ("greedy", "eplb", "contiguous", "random"):
        assert (max_gpu_load(problem, run_baseline(name, problem, seed)) >= bound - 1e-9).all()


def test_balance_objective_value_is_max_over_mean():
    problem = PlacementProblem(README_W, Cluster(8, 2), num_replicas=16, num_groups=4)
    phy = rebalance_experts(README_W, 16, 4, 2, 8)
    assert plan_values(problem, Objective(), phy) == pytest.approx([156 / 129.125, 179.5 / 144.5])


def test_objective_parsing_and_errors():
    obj = Objective.parse("balance=0.5+cross-node", balance_slack=0.01)
    assert obj.weights == {"balance": 0.5, "cross_node": 1.0} and obj.balance_slack == 0.01
    with pytest.raises(MoesimError, match="unknown objective term"):
        Objective.parse("speed")
    with pytest.raises(PlacementError, match="need token-level routing"):
        obj.check(_problem())


# ----- MILP ------------------------------------------------------------------------------------
def _routing_problem(seed=1, T=1500, L=3, E=16, K=4, P=4, N=2, R=16):
    rng = np.random.default_rng(seed)
    # two co-activated halves of the experts so that locality has something to find
    half = rng.integers(0, 2, size=(T, L))
    experts = np.stack([[rng.choice(np.arange(E // 2) + (E // 2) * half[t, lay], K, replace=False)
                         for lay in range(L)] for t in range(T)])
    perm = rng.permutation(E)  # hide the structure from contiguous layouts
    trace = Trace.from_arrays(perm[experts], num_experts=E)
    return trace, problem_from_trace(trace, Cluster(P, N), num_replicas=R)


def test_ilp_never_loses_to_the_best_baseline_on_balance():
    problem = _problem(seed=4, L=3, E=24, P=8, N=2, R=32)
    plan = make_plan(problem, Objective(), "ilp", time_limit=6, mip_gap=0.01, subprocess=False)
    ilp = np.sum(plan.objective_value)
    for name in applicable(problem):
        phy = run_baseline(name, problem)
        if Plan(phy, 24, 8, 2, name).per_gpu().max() > 1:
            phy = repair_duplicates(problem, phy)
        assert ilp <= plan_values(problem, Objective(), phy).sum() + 1e-9
    assert plan.per_gpu().max() == 1  # no same-GPU duplicates
    assert all(g is not None and 0 <= g <= 1 for g in plan.gap)


def test_ilp_cuts_cross_node_traffic_at_equal_balance():
    trace, problem = _routing_problem()
    eplb = make_plan(problem, Objective(), "eplb")
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    plan = make_plan(problem, obj, "ilp", time_limit=6, subprocess=False)
    m_e, m_i = evaluate(eplb, trace), evaluate(plan, trace)
    assert m_i["max_mean_load"] <= m_e["max_mean_load"] * 1.01 + 1e-9
    assert m_i["cross_node_tokens"] < 0.8 * m_e["cross_node_tokens"]


def test_pyomo_reference_and_highspy_arrays_agree():
    trace, problem = _routing_problem(T=600, L=1, E=8, K=2, R=10)
    from moesim.planners.ilp import heuristic_maps
    from moesim.planners.ilp_highs import solve_layer as solve_highs
    from moesim.planners.ilp_pyomo import solve_layer as solve_pyomo
    from moesim.planners.plan import replicas_per_gpu

    warm = replicas_per_gpu(heuristic_maps(problem)["greedy"][:1], 8, 4)[0]
    obj = Objective({"balance": 1.0, "cross_node": 0.5, "node_balance": 0.2})
    a = solve_highs(problem, obj, 0, warm, time_limit=30, mip_gap=1e-6)
    b = solve_pyomo(problem, obj, 0, warm, time_limit=30, mip_gap=1e-6)
    assert a.status == "Optimal"
    assert a.objective == pytest.approx(b.objective, rel=1e-6)


def test_hard_time_limit_keeps_the_incumbent():
    problem = _problem(seed=2, L=40, E=64, P=16, N=2, R=80)
    plan = make_plan(problem, Objective(), "ilp", time_limit=1.0)
    assert plan.status == "time-limit" and plan.solve_s < 8
    assert any("time limit reached" in n for n in plan.notes)
    assert (replica_counts(plan.phy2log, 64) >= 1).all()


def test_moetuner_equal_experts_per_gpu_and_one_replica():
    trace, problem = _routing_problem(R=16)
    plan = make_plan(problem, Objective(), "moetuner", time_limit=10)
    assert (plan.per_gpu().sum(axis=1) == 4).all()  # 16 experts / 4 GPUs in every layer
    assert (plan.replica_counts() == 1).all()
    with pytest.raises(PlacementError, match="one replica per expert"):
        make_plan(_problem(), Objective(), "moetuner")


# ----- plan files and exports -------------------------------------------------------------------
def test_plan_roundtrip_and_engine_exports(tmp_path):
    plan = Plan(rebalance_experts(README_W, 16, 4, 2, 8), 12, 8, 2, "eplb", gap=[0.1, 0.2])
    path = plan.save(tmp_path / "p.json")
    again = Plan.load(path)
    assert (again.phy2log == plan.phy2log).all() and again.gap == [0.1, 0.2]
    assert plan.to_sglang() == {"physical_to_logical_map": README_PHY2LOG}
    v = plan.to_vllm()
    assert v["logical_replica_count"][0] == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]
    for lay in range(2):  # logical -> physical inverts physical -> logical
        for e, slots in enumerate(v["logical_to_physical_map"][lay]):
            assert all(README_PHY2LOG[lay][s] == e for s in slots if s >= 0)


def test_export_refuses_uneven_slots():
    problem = PlacementProblem(np.ones((1, 10)), Cluster(4, 1))
    plan = make_plan(problem, Objective(), "greedy")
    with pytest.raises(PlacementError, match="same number of experts on every GPU"):
        plan.to_sglang()


# ----- evaluation -------------------------------------------------------------------------------
def test_traffic_metrics_closed_form():
    # 2 experts per token, 4 experts, 2 GPUs in 2 nodes; experts {0,1} on GPU 0, {2,3} on GPU 1
    experts = np.array([[[0, 1]], [[0, 2]], [[2, 3]], [[1, 3]]])
    trace = Trace.from_arrays(experts, num_experts=4)
    plan = Plan(np.array([[0, 1, 2, 3]]), 4, 2, 2, "x")
    m = evaluate(plan, trace)
    assert m["dest_nodes_per_token"] == pytest.approx(1.5)  # 1, 2, 1, 2 nodes
    assert m["cross_node_tokens"] == pytest.approx(6 * 0.5)
    assert m["gpu_hops_per_token"] == 0  # a single layer has no transitions


# ----- CLI --------------------------------------------------------------------------------------
def test_cli_plans_exports_and_evaluates(tmp_path, capsys):
    np.save(tmp_path / "loads.npy", README_W)
    out = tmp_path / "plan.json"
    rc = main(["place", "--loads", str(tmp_path / "loads.npy"), "--gpus", "8", "--nodes", "2", "--redundant", "4",
               "--groups", "4", "--solver", "eplb", "--out", str(out), "--export", "sglang", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    for key in ("max_mean_load", "balancedness", "cross_node_tokens", "solve_s", "gap"):
        assert key in payload
    assert payload["max_mean_load"] == pytest.approx((156 / 129.125 + 179.5 / 144.5) / 2)
    assert json.loads((tmp_path / "plan.sglang.json").read_text()) == {"physical_to_logical_map": README_PHY2LOG}
    rc = main(["place", "evaluate", str(out), "--loads", str(tmp_path / "loads.npy"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["balancedness"] == pytest.approx(payload["balancedness"])


def test_cli_infeasible_input_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "loads.npy", README_W)
    rc = main(["place", "--loads", str(tmp_path / "loads.npy"), "--gpus", "8", "--groups", "5",
               "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "groups must divide experts" in err
    assert not (tmp_path / "p.json").exists()


# ----- real data --------------------------------------------------------------------------------
def test_esft_domain_shift_and_ilp_balance(esft_npz):
    def trace(task, n=2000):
        d = np.load(esft_npz[task])
        return Trace.from_arrays(d["experts"][:n, :4], d["weights"][:n, :4], None, "prefill", num_experts=64)

    law = trace("law")
    problem = problem_from_trace(law, Cluster(8, 2), with_stats=False)
    ilp = make_plan(problem, Objective(), "ilp", time_limit=20, mip_gap=0.01)
    eplb = make_plan(problem, Objective(), "eplb")
    assert evaluate(ilp, law)["max_mean_load"] <= evaluate(eplb, law)["max_mean_load"] + 1e-9
    # the plan is tuned to law; on another task its balance is worse (domain shift)
    assert evaluate(ilp, trace("translation"))["max_mean_load"] > evaluate(ilp, law)["max_mean_load"]


# ----- token-level node partition ---------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_partition_move_and_swap_deltas_are_exact(seed):
    assert_node_search_deltas_exact(seed, num_experts=10, everywhere=False)


def test_partition_finds_a_planted_split_within_the_limits():
    from moesim.planners.partition import Limits, distinct_nodes, partition, token_sets

    rng = np.random.default_rng(3)
    E, N = 16, 2
    hidden = rng.permutation(E)  # tokens use experts of one hidden half only
    halves = hidden.reshape(N, E // N)
    experts = np.stack([rng.choice(halves[rng.integers(N)], 3, replace=False) for _ in range(400)])
    sets, weight = token_sets(experts)
    load = np.bincount(experts.ravel(), minlength=E).astype(float)
    limits = Limits(load, np.ones(E), N, load.sum() / N * 1.2, E // N)
    node, reached = partition(sets, weight, limits, [np.arange(E) % N], time_limit=5, seed=0)
    assert reached == pytest.approx(1.0)  # every token on one node
    assert reached == pytest.approx(distinct_nodes(node, sets, weight, N))
    assert limits.feasible(node)


def test_slot_demand_fits_the_slots_and_spreads_the_heaviest():
    from moesim.planners.partition import slot_demand

    load = np.r_[50.0, 12.0, np.ones(30)]
    need = slot_demand(load, num_slots=48, num_nodes=4, max_replicas=4)
    assert need.sum() <= 48 - 8 and need.min() == 1
    assert need[0] == 4  # one replica on every GPU of its node
    assert (slot_demand(np.ones(8), 8, 2, 4) == 1).all()  # no redundant slots: one each


def test_cross_node_term_is_the_evaluated_cross_node_tokens_per_token():
    trace, problem = _routing_problem(T=400)
    obj = Objective({"cross_node": 1.0})
    phy = run_baseline("greedy", problem)
    plan = Plan(phy, problem.num_experts, 4, 2, "greedy")
    per_token = evaluate(plan, trace)["cross_node_tokens"] / 400
    assert plan_values(problem, obj, phy).sum() == pytest.approx(per_token, rel=1e-9)


def test_cross_node_plan_reports_the_node_fixed_balance_gap():
    trace, problem = _routing_problem(T=600, L=2)
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    from moesim.planners.ilp import plan_layers

    results = plan_layers(problem, obj, time_limit=6)
    for r in results:
        assert r.warm_from == "node-first"
        assert r.polish_gap is not None and 0 <= r.polish_gap <= 1e-3 + 1e-9
        # trivial bound: balance >= its bound, each token reaches >= 1 node
        assert r.bound >= 0.01 * 1.0 + 0.5 - 1e-9 and r.bound <= r.value + 1e-12


def test_esft_cross_node_cut_on_four_nodes(esft_npz):
    d = np.load(esft_npz["law"])
    trace = Trace.from_arrays(d["experts"][:, :2], d["weights"][:, :2], None, "prefill", num_experts=64)
    problem = problem_from_trace(trace, Cluster(16, 4))
    obj = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    eplb = evaluate(make_plan(problem, obj, "eplb"), trace)
    ilp = evaluate(make_plan(problem, obj, "ilp", time_limit=16), trace)
    assert ilp["max_mean_load"] <= eplb["max_mean_load"] * 1.01 + 1e-9
    assert ilp["cross_node_tokens"] < 0.8 * eplb["cross_node_tokens"]
