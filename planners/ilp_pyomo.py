"""The per-layer placement MILP written in Pyomo: the readable reference formulation.

It is the same model as ``ilp_highs`` (see that module's docstring for the algebra) and is solved
with HiGHS through Pyomo's APPSI interface, the only Pyomo route to HiGHS that passes a MIP start
(the newer contrib ``highs`` interface rejects warm starts in Pyomo 6.10.1). Building is about
50x slower than the CSR arrays of ``ilp_highs``, so the planner uses this one for small
instances and for checking the fast path.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.planners.ilp_highs import LayerSolve, hop_cost
from moesim.planners.inputs import PlacementProblem
from moesim.planners.objectives import Objective, shares, traffic_pairs


def build_model(problem: PlacementProblem, objective: Objective, layer: int, counts: np.ndarray,
                prev_row: np.ndarray | None = None, cap: float | None = None,
                fixed_node: np.ndarray | None = None):
    import pyomo.environ as pyo

    c = problem.cluster
    E, P, N, S = problem.num_experts, c.num_gpus, c.num_nodes, problem.slots_per_gpu
    node_of = c.node_of()
    wts = objective.weights
    w = problem.load[layer]
    total = float(w.sum())
    W = w / counts
    mean = total / P if total > 0 else 1.0
    tokens = float(max(problem.stats.tokens[layer], 1)) if problem.stats is not None else 1.0

    m = pyo.ConcreteModel(name=f"placement_layer_{layer}")
    m.E = pyo.RangeSet(0, E - 1)
    m.G = pyo.RangeSet(0, P - 1)
    m.M = pyo.RangeSet(0, N - 1)
    x_ub = {e: (min(int(counts[e]), S) if problem.allow_duplicates else 1) for e in range(E)}

    def x_bounds(m, e, g):  # with fixed_node, replicas only on the expert's own node
        return (0, x_ub[e] if fixed_node is None or fixed_node[e] == node_of[g] else 0)

    m.x = pyo.Var(m.E, m.G, domain=pyo.NonNegativeIntegers, bounds=x_bounds)
    # valid lower bounds: mean GPU load and the largest load per replica
    m.z = pyo.Var(bounds=(max(total / P, float(W.max())), cap))
    m.replicas = pyo.Constraint(m.E, rule=lambda m, e: sum(m.x[e, g] for g in m.G) == int(counts[e]))
    m.slots = pyo.Constraint(m.G, rule=lambda m, g: sum(m.x[e, g] for e in m.E) <= S)
    m.gpu_load = pyo.Expression(m.G, rule=lambda m, g: sum(float(W[e]) * m.x[e, g] for e in m.E))
    m.max_load = pyo.Constraint(m.G, rule=lambda m, g: m.gpu_load[g] <= m.z)
    cost = wts.get("balance", 0) / mean * m.z

    if wts.get("node_balance", 0) > 0:
        m.zn = pyo.Var(bounds=(total / N, None))
        m.max_node_load = pyo.Constraint(
            m.M, rule=lambda m, n: sum(m.gpu_load[g] for g in range(P) if node_of[g] == n) <= m.zn)
        cost += wts["node_balance"] / (total / N if total > 0 else 1.0) * m.zn

    def share_on(e, gpus):  # share of e's tokens served by these GPUs
        return sum(m.x[e, g] for g in gpus) / float(counts[e])

    if wts.get("cross_node", 0) > 0 and fixed_node is not None:  # a constant given the nodes
        from moesim.planners.objectives import cross_node_per_token

        cost += wts["cross_node"] * cross_node_per_token(problem, layer, np.eye(N)[np.asarray(fixed_node)])
    elif wts.get("cross_node", 0) > 0:
        # token hypergraph: a[e, n] = e's replicas on node n; y[u, n] = token set u reaches node n
        u_sets, u_weight = problem.stats.token_sets[layer]
        m.U = pyo.RangeSet(0, len(u_sets) - 1)
        m.K = pyo.RangeSet(0, u_sets.shape[1] - 1)
        m.a = pyo.Var(m.E, m.M, domain=pyo.Binary)
        m.y = pyo.Var(m.U, m.M, bounds=(0, 1))
        m.one_node = pyo.Constraint(m.E, rule=lambda m, e: sum(m.a[e, n] for n in m.M) == 1)
        m.on_node = pyo.Constraint(m.E, m.G, rule=lambda m, e, g: m.x[e, g] <= x_ub[e] * m.a[e, int(node_of[g])])
        m.reach = pyo.Constraint(m.U, m.K, m.M, rule=lambda m, u, k, n: m.y[u, n] >= m.a[int(u_sets[u, k]), n])
        scale = wts["cross_node"] * (1 - 1 / N) / float(u_weight.sum())
        cost += scale * sum(float(u_weight[u]) * m.y[u, n] for u in m.U for n in m.M)

    if wts.get("cross_gpu", 0) > 0:
        groups = [[g] for g in range(P)]
        pe, pf, co = traffic_pairs(problem, layer, objective.max_pairs)
        m.cross_gpu_pairs = pyo.RangeSet(0, len(pe) - 1)
        s = m.cross_gpu_shared = pyo.Var(m.cross_gpu_pairs, m.G, bounds=(0, 1))
        m.cross_gpu_first = pyo.Constraint(m.cross_gpu_pairs, m.G,
                                           rule=lambda m, p, b: s[p, b] <= share_on(pe[p], groups[b]))
        m.cross_gpu_second = pyo.Constraint(m.cross_gpu_pairs, m.G,
                                            rule=lambda m, p, b: s[p, b] <= share_on(pf[p], groups[b]))
        cost += wts["cross_gpu"] / tokens * sum(float(co[p]) * (1 - sum(s[p, b] for b in m.G))
                                                for p in m.cross_gpu_pairs)

    if wts.get("hops", 0) > 0:
        coef, const = hop_cost(problem, layer, prev_row, counts)
        cost += wts["hops"] * (const + sum(float(coef[e, g]) * m.x[e, g] for e in m.E for g in m.G if coef[e, g]))
    if wts.get("migration", 0) > 0:
        fresh = problem.previous_counts()[layer] == 0
        cost += wts["migration"] / problem.num_replicas * sum(m.x[e, g] for e in m.E for g in m.G if fresh[e, g])
    m.cost = pyo.Objective(expr=cost, sense=pyo.minimize)
    return m


def solve_layer(problem: PlacementProblem, objective: Objective, layer: int, warm_per_gpu: np.ndarray,
                prev_row: np.ndarray | None = None, cap: float | None = None, time_limit: float = 10.0,
                mip_gap: float = 1e-3, threads: int = 1, seed: int = 0,
                fixed_node: np.ndarray | None = None) -> LayerSolve:
    from pyomo.contrib.appsi.solvers import Highs

    from moesim.planners.ilp_highs import set_threads

    t0 = time.perf_counter()
    counts = warm_per_gpu.sum(axis=1)
    m = build_model(problem, objective, layer, counts, prev_row, cap, fixed_node)
    # MIP start: the warm placement and the auxiliary values it implies
    c = problem.cluster
    for (e, g), v in np.ndenumerate(warm_per_gpu):
        m.x[e, g].value = int(v)
    gpu_load = (problem.load[layer] / counts) @ warm_per_gpu
    m.z.value = max(float(gpu_load.max()), m.z.lb)
    if hasattr(m, "zn"):
        m.zn.value = max(float(np.bincount(c.node_of(), weights=gpu_load, minlength=c.num_nodes).max()), m.zn.lb)
    f_gpu, f_node = shares(warm_per_gpu, c.node_of(), c.num_nodes)
    if hasattr(m, "cross_gpu_shared"):
        pe, pf, _ = traffic_pairs(problem, layer, objective.max_pairs)
        for (p, b) in m.cross_gpu_shared:
            m.cross_gpu_shared[p, b].value = float(min(f_gpu[pe[p], b], f_gpu[pf[p], b]))
    if hasattr(m, "a"):  # a feasible start only if every expert sits on one node
        node = np.argmax(f_node, axis=1)
        u_sets, _ = problem.stats.token_sets[layer]
        for (e, n) in m.a:
            m.a[e, n].value = int(node[e] == n)
        for (u, n) in m.y:
            m.y[u, n].value = float((node[u_sets[u]] == n).any())
    build_s = time.perf_counter() - t0

    solver = Highs()
    solver.config.warmstart = True
    solver.config.time_limit = float(max(time_limit, 0.05))
    solver.config.mip_gap = float(mip_gap)
    solver.config.load_solution = False
    solver.highs_options = {"random_seed": int(seed), "output_flag": False}
    # APPSI has no threads field; keep HiGHS's process-wide thread count consistent
    set_threads(_OptionSink(solver), threads)
    res = solver.solve(m)
    solve_s = time.perf_counter() - t0 - build_s
    per_gpu = warm_per_gpu
    incumbent = np.nan
    if res.best_feasible_objective is not None:
        res.solution_loader.load_vars()
        per_gpu = np.array([[int(round(m.x[e, g].value)) for g in range(c.num_gpus)]
                            for e in range(problem.num_experts)], dtype=np.int64)
        incumbent = float(res.best_feasible_objective)
    bound = res.best_objective_bound
    bound = float(bound) if bound is not None and np.isfinite(bound) else -np.inf
    return LayerSolve(per_gpu, incumbent, bound, str(res.termination_condition), solve_s, build_s)


class _OptionSink:
    """Routes ilp_highs.set_threads' option call into APPSI's highs_options."""

    def __init__(self, solver):
        self.solver = solver

    def setOptionValue(self, name, value):
        self.solver.highs_options = {**self.solver.highs_options, name: value}
