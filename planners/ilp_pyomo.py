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
                prev_row: np.ndarray | None = None, cap: float | None = None):
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
    m.x = pyo.Var(m.E, m.G, domain=pyo.NonNegativeIntegers, bounds=lambda m, e, g: (0, x_ub[e]))
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

    for term, groups in (("cross_node", [np.flatnonzero(node_of == n) for n in range(N)]),
                         ("cross_gpu", [[g] for g in range(P)])):
        if wts.get(term, 0) <= 0:
            continue
        pe, pf, co = traffic_pairs(problem, layer, objective.max_pairs)
        pairs = pyo.RangeSet(0, len(pe) - 1)
        blocks = pyo.RangeSet(0, len(groups) - 1)
        s = pyo.Var(pairs, blocks, bounds=(0, 1))
        first = pyo.Constraint(pairs, blocks, rule=lambda m, p, b, s=s, pe=pe, gs=groups: s[p, b] <= share_on(pe[p], gs[b]))
        second = pyo.Constraint(pairs, blocks, rule=lambda m, p, b, s=s, pf=pf, gs=groups: s[p, b] <= share_on(pf[p], gs[b]))
        for name, comp in ((f"{term}_pairs", pairs), (f"{term}_blocks", blocks), (f"{term}_shared", s),
                           (f"{term}_first", first), (f"{term}_second", second)):
            m.add_component(name, comp)
        cost += wts[term] / tokens * sum(float(co[p]) * (1 - sum(s[p, b] for b in blocks)) for p in pairs)

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
                mip_gap: float = 1e-3, threads: int = 1, seed: int = 0) -> LayerSolve:
    from pyomo.contrib.appsi.solvers import Highs

    from moesim.planners.ilp_highs import set_threads

    t0 = time.perf_counter()
    counts = warm_per_gpu.sum(axis=1)
    m = build_model(problem, objective, layer, counts, prev_row, cap)
    # MIP start: the warm placement and the auxiliary values it implies
    c = problem.cluster
    for (e, g), v in np.ndenumerate(warm_per_gpu):
        m.x[e, g].value = int(v)
    gpu_load = (problem.load[layer] / counts) @ warm_per_gpu
    m.z.value = max(float(gpu_load.max()), m.z.lb)
    if hasattr(m, "zn"):
        m.zn.value = max(float(np.bincount(c.node_of(), weights=gpu_load, minlength=c.num_nodes).max()), m.zn.lb)
    f_gpu, f_node = shares(warm_per_gpu, c.node_of(), c.num_nodes)
    for term, f in (("cross_node", f_node), ("cross_gpu", f_gpu)):
        if hasattr(m, f"{term}_shared"):
            pe, pf, _ = traffic_pairs(problem, layer, objective.max_pairs)
            s = getattr(m, f"{term}_shared")
            for (p, b) in s:
                s[p, b].value = float(min(f[pe[p], b], f[pf[p], b]))
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
