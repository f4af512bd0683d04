"""The per-layer placement MILP as CSR arrays handed straight to highspy (the fast path).

Same model as ``ilp_pyomo`` (the readable reference; a test checks both agree). For layer l with
replica counts c_e fixed by the warm start and per-replica load W_e = load_e / c_e:

    x[e, g]  in {0, 1} (0..c_e if duplicates are allowed)   replicas of e on GPU g
    z >= max(mean GPU load, max_e W_e)   (valid bounds)     max GPU load, <= cap if given
    zn >= mean node load                                     max node load
    s[p, m] in [0, 1]                                        pair p's shared share on node m
  s.t.  sum_g x[e, g] = c_e;  sum_e x[e, g] <= slots;  sum_e W_e x[e, g] <= z;
        sum_{g in m} sum_e W_e x[e, g] <= zn;  s[p, m] <= sum_{g in m} x[e_p, g] / c_{e_p} (both ends)
  min   balance z / mean + node_balance zn / node mean + cross_node sum_p C_p (1 - sum_m s[p, m]) / T
        + cross_gpu (same per GPU) + hops (linear in x given layer l-1) + migration (new copies)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moesim.planners.inputs import PlacementProblem
from moesim.planners.objectives import Objective, shares, traffic_pairs
from moesim.planners.plan import replicas_per_gpu

_threads_in_use: int | None = None


@dataclass
class LayerModel:
    """Column layout and data of one layer's MILP."""

    num_cols: int
    cost: np.ndarray
    offset: float
    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray  # column indices that are integer
    row_lo: np.ndarray
    row_hi: np.ndarray
    starts: np.ndarray
    index: np.ndarray
    value: np.ndarray
    # where things are, to read the solution back and write a warm start
    n_x: int
    col_z: int
    col_zn: int | None
    pairs_node: tuple | None
    pairs_gpu: tuple | None
    col_s_node: int
    col_s_gpu: int


def hop_cost(problem: PlacementProblem, layer: int, prev_row: np.ndarray | None, counts: np.ndarray):
    """Linear cost on x[e, g] of the hops term given layer l-1's map, and its constant part."""
    E, P = problem.num_experts, problem.cluster.num_gpus
    if layer == 0 or prev_row is None:
        return np.zeros((E, P)), 0.0
    c = problem.cluster
    prev_f, _ = shares(replicas_per_gpu(prev_row[None], E, P)[0], c.node_of(), c.num_nodes)
    aff = problem.stats.affinity[layer - 1]
    norm = max(problem.stats.tokens[layer], 1) * problem.stats.top_k ** 2
    # hops = sum_{e', e} aff[e', e] (1 - sum_g prev_f[e', g] x[e, g] / c_e) / norm
    coef = -(aff.T @ prev_f) / counts[:, None] / norm
    return coef, float(aff.sum() / norm)


def build_layer(problem: PlacementProblem, objective: Objective, layer: int, counts: np.ndarray,
                prev_row: np.ndarray | None = None, cap: float | None = None) -> LayerModel:
    c = problem.cluster
    E, P, N, S = problem.num_experts, c.num_gpus, c.num_nodes, problem.slots_per_gpu
    node_of = c.node_of()
    wts = objective.weights
    w = problem.load[layer]
    total = w.sum()
    W = w / counts
    n_x = E * P
    x = np.arange(n_x).reshape(E, P)
    col_z = n_x
    ncol = n_x + 1
    col_zn = None
    if wts.get("node_balance", 0) > 0:
        col_zn, ncol = ncol, ncol + 1
    tokens = max(problem.stats.tokens[layer], 1) if problem.stats is not None else 1
    pairs_node = traffic_pairs(problem, layer, objective.max_pairs) if wts.get("cross_node", 0) > 0 else None
    pairs_gpu = traffic_pairs(problem, layer, objective.max_pairs) if wts.get("cross_gpu", 0) > 0 else None
    col_s_node = ncol
    if pairs_node is not None:
        ncol += len(pairs_node[0]) * N
    col_s_gpu = ncol
    if pairs_gpu is not None:
        ncol += len(pairs_gpu[0]) * P

    cost = np.zeros(ncol)
    offset = 0.0
    lower = np.zeros(ncol)
    upper = np.ones(ncol)
    if problem.allow_duplicates:
        upper[:n_x] = np.minimum(counts, S).repeat(P)
    mean = total / P if total > 0 else 1.0
    lower[col_z] = max(total / P, W.max())
    upper[col_z] = np.inf if cap is None else max(cap, lower[col_z])
    cost[col_z] = wts.get("balance", 0) / mean
    if col_zn is not None:
        lower[col_zn] = total / N
        upper[col_zn] = np.inf
        cost[col_zn] = wts["node_balance"] / (total / N if total > 0 else 1.0)

    rows = []  # (lo, hi, indices, values)
    for e in range(E):
        rows.append((counts[e], counts[e], x[e], np.ones(P)))
    for g in range(P):
        rows.append((-np.inf, S, x[:, g], np.ones(E)))
    for g in range(P):
        rows.append((-np.inf, 0.0, np.r_[x[:, g], col_z], np.r_[W, -1.0]))
    if col_zn is not None:
        for m in range(N):
            gs = np.flatnonzero(node_of == m)
            rows.append((-np.inf, 0.0, np.r_[x[:, gs].ravel(), col_zn], np.r_[np.repeat(W, len(gs)), -1.0]))
    for pairs, col0, groups, term in ((pairs_node, col_s_node, [np.flatnonzero(node_of == m) for m in range(N)], "cross_node"),
                                      (pairs_gpu, col_s_gpu, [np.array([g]) for g in range(P)], "cross_gpu")):
        if pairs is None:
            continue
        pe, pf, co = pairs
        nb = len(groups)
        weight = wts[term] / tokens
        offset += weight * co.sum()
        for p in range(len(pe)):
            for b, gs in enumerate(groups):
                col = col0 + p * nb + b
                cost[col] = -weight * co[p]
                for e in (pe[p], pf[p]):
                    rows.append((-np.inf, 0.0, np.r_[col, x[e, gs]], np.r_[1.0, np.full(len(gs), -1.0 / counts[e])]))
    if wts.get("hops", 0) > 0:
        coef, const = hop_cost(problem, layer, prev_row, counts)
        cost[:n_x] += wts["hops"] * coef.ravel()
        offset += wts["hops"] * const
    if wts.get("migration", 0) > 0:
        fresh = (problem.previous_counts()[layer] == 0).astype(float)
        cost[:n_x] += wts["migration"] * fresh.ravel() / problem.num_replicas

    lens = np.array([len(r[2]) for r in rows])
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    return LayerModel(
        num_cols=ncol, cost=cost, offset=offset, lower=lower, upper=upper,
        integer=np.arange(n_x),
        row_lo=np.array([r[0] for r in rows], float), row_hi=np.array([r[1] for r in rows], float),
        starts=starts.astype(np.int32),
        index=np.concatenate([np.asarray(r[2]) for r in rows]).astype(np.int32),
        value=np.concatenate([np.asarray(r[3], float) for r in rows]),
        n_x=n_x, col_z=col_z, col_zn=col_zn, pairs_node=pairs_node, pairs_gpu=pairs_gpu,
        col_s_node=col_s_node, col_s_gpu=col_s_gpu,
    )


def warm_values(model: LayerModel, problem: PlacementProblem, layer: int, per_gpu: np.ndarray,
                counts: np.ndarray) -> np.ndarray:
    """Column values of a known placement (the warm start)."""
    c = problem.cluster
    node_of = c.node_of()
    vals = np.zeros(model.num_cols)
    vals[: model.n_x] = per_gpu.ravel()
    gpu_load = (problem.load[layer] / counts) @ per_gpu
    vals[model.col_z] = max(gpu_load.max(), model.lower[model.col_z])
    if model.col_zn is not None:
        vals[model.col_zn] = max(np.bincount(node_of, weights=gpu_load, minlength=c.num_nodes).max(),
                                 model.lower[model.col_zn])
    f_gpu, f_node = shares(per_gpu, node_of, c.num_nodes)
    for pairs, col0, f in ((model.pairs_node, model.col_s_node, f_node), (model.pairs_gpu, model.col_s_gpu, f_gpu)):
        if pairs is not None:
            pe, pf, _ = pairs
            vals[col0: col0 + len(pe) * f.shape[1]] = np.minimum(f[pe], f[pf]).ravel()
    return vals


@dataclass
class LayerSolve:
    per_gpu: np.ndarray  # [E, P] replicas per GPU found (the warm start if nothing better)
    objective: float  # incumbent objective reported by HiGHS (with the constant part)
    bound: float  # HiGHS dual bound (with the constant part)
    status: str
    solve_s: float
    build_s: float


def set_threads(h, threads: int) -> None:
    """HiGHS fixes its scheduler's thread count at the first run in a process: a later solve with
    another count silently returns 'Not Set'. Reset the scheduler when the count changes."""
    global _threads_in_use
    import highspy

    if _threads_in_use is not None and _threads_in_use != threads:
        highspy.Highs.resetGlobalScheduler(True)
    _threads_in_use = threads
    h.setOptionValue("threads", int(threads))


def solve_layer(problem: PlacementProblem, objective: Objective, layer: int, warm_per_gpu: np.ndarray,
                prev_row: np.ndarray | None = None, cap: float | None = None, time_limit: float = 10.0,
                mip_gap: float = 1e-3, threads: int = 1, seed: int = 0) -> LayerSolve:
    """Solve one layer's MILP warm-started from ``warm_per_gpu`` ([E, P])."""
    import highspy

    t0 = time.perf_counter()
    counts = warm_per_gpu.sum(axis=1)
    model = build_layer(problem, objective, layer, counts, prev_row, cap)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    set_threads(h, threads)
    h.setOptionValue("time_limit", float(max(time_limit, 0.05)))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    h.setOptionValue("random_seed", int(seed))
    inf = highspy.kHighsInf
    upper = np.where(np.isinf(model.upper), inf, model.upper)
    h.addVars(model.num_cols, model.lower, upper)
    h.changeColsCost(model.num_cols, np.arange(model.num_cols, dtype=np.int32), model.cost)
    h.changeColsIntegrality(len(model.integer), model.integer.astype(np.int32),
                            np.full(len(model.integer), highspy.HighsVarType.kInteger))
    lo = np.where(np.isinf(model.row_lo), -inf, model.row_lo)
    hi = np.where(np.isinf(model.row_hi), inf, model.row_hi)
    h.addRows(len(lo), lo, hi, len(model.index), model.starts, model.index, model.value)
    sol = highspy.HighsSolution()
    sol.col_value = warm_values(model, problem, layer, warm_per_gpu, counts).tolist()
    h.setSolution(sol)
    build_s = time.perf_counter() - t0
    h.run()
    solve_s = time.perf_counter() - t0 - build_s
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    per_gpu = warm_per_gpu
    incumbent = np.nan
    if info.primal_solution_status == 2:  # feasible point available
        cols = np.asarray(h.getSolution().col_value)
        per_gpu = np.rint(cols[: model.n_x]).astype(np.int64).reshape(warm_per_gpu.shape)
        incumbent = info.objective_function_value + model.offset
    bound = info.mip_dual_bound + model.offset if np.isfinite(info.mip_dual_bound) else -np.inf
    return LayerSolve(per_gpu, incumbent, bound, status, solve_s, build_s)
