"""The per-layer placement MILP as CSR arrays handed straight to highspy (the fast path).

Same model as ``ilp_pyomo`` (the readable reference; a test checks both agree). For layer l with
replica counts c_e fixed by the warm start and per-replica load W_e = load_e / c_e:

    x[e, g]  in {0, 1} (0..c_e if duplicates are allowed)   replicas of e on GPU g
    z >= max(mean GPU load, max_e W_e)   (valid bounds)     max GPU load, <= cap if given
    zn >= mean node load                                     max node load
    a[e, m]  in {0, 1}                                       e's replicas all on node m (cross_node)
    y[u, m]  in [0, 1]                                       token set u reaches node m (cross_node)
    s[p, g] in [0, 1]                                        pair p's shared share on GPU g (cross_gpu)
  s.t.  sum_g x[e, g] = c_e;  sum_e x[e, g] <= slots;  sum_e W_e x[e, g] <= z;
        sum_{g in m} sum_e W_e x[e, g] <= zn;
        sum_m a[e, m] = 1;  x[e, g] <= ub_x a[e, node(g)];  y[u, m] >= a[e, m] for e in u;
        s[p, g] <= x[e_p, g] / c_{e_p} (both ends)
  min   balance z / mean + node_balance zn / node mean
        + cross_node (1 - 1/N) sum_u w_u sum_m y[u, m] / sum_u w_u
        + cross_gpu sum_p C_p (1 - sum_g s[p, g]) / T + hops (linear in x given layer l-1)
        + migration (new copies)

The cross_node rows are the token hypergraph: each distinct expert set u (w_u tokens) is a
hyperedge, and with every expert's replicas on one node sum_m y[u, m] is exactly the number of
nodes the token reaches, so the MILP minimises the evaluation's cross-node tokens themselves.
Keeping an expert's replicas on one node is part of this model (as hierarchical EPLB does): its
bound is a bound over such plans. Its LP relaxation is weak (a = 1/N, y = 1/N gives one node
per token), so the bound is far below the incumbent; the incumbent comes from the token-level
partition search (``partition.py``) given as the MIP start. With ``fixed_node`` (each expert's
node fixed) the cross_node term is a constant and the model balances GPUs inside each node.
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
    pairs_gpu: tuple | None
    col_s_gpu: int
    col_a: int | None  # E x N node-choice columns (cross_node), then U x N token-set columns
    col_y: int | None
    sets: tuple | None


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
                prev_row: np.ndarray | None = None, cap: float | None = None,
                fixed_node: np.ndarray | None = None) -> LayerModel:
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
    hyper = wts.get("cross_node", 0) > 0 and fixed_node is None
    col_a = col_y = sets = None
    if hyper:
        sets = problem.stats.token_sets[layer]
        col_a = ncol
        col_y = col_a + E * N
        ncol = col_y + len(sets[0]) * N
    pairs_gpu = traffic_pairs(problem, layer, objective.max_pairs) if wts.get("cross_gpu", 0) > 0 else None
    col_s_gpu = ncol
    if pairs_gpu is not None:
        ncol += len(pairs_gpu[0]) * P

    cost = np.zeros(ncol)
    offset = 0.0
    lower = np.zeros(ncol)
    upper = np.ones(ncol)
    x_ub = np.minimum(counts, S).repeat(P) if problem.allow_duplicates else np.ones(n_x)
    upper[:n_x] = x_ub
    if fixed_node is not None:  # replicas only on the expert's own node
        upper[:n_x] = np.where((node_of[None, :] == np.asarray(fixed_node)[:, None]).ravel(), x_ub, 0)
        if wts.get("cross_node", 0) > 0:
            from moesim.planners.objectives import cross_node_per_token

            f_node = np.zeros((E, N))
            f_node[np.arange(E), fixed_node] = 1.0
            offset += wts["cross_node"] * cross_node_per_token(problem, layer, f_node)
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
    if pairs_gpu is not None:
        pe, pf, co = pairs_gpu
        weight = wts["cross_gpu"] / tokens
        offset += weight * co.sum()
        for p in range(len(pe)):
            for g in range(P):
                col = col_s_gpu + p * P + g
                cost[col] = -weight * co[p]
                for e in (pe[p], pf[p]):
                    rows.append((-np.inf, 0.0, np.r_[col, x[e, g]], np.r_[1.0, -1.0 / counts[e]]))
    blocks = [_rows_block(rows)]
    if hyper:
        blocks.append(_hyper_block(sets, E, N, node_of, x, x_ub.reshape(E, P), col_a, col_y))
        u_sets, u_weight = sets
        cost[col_y:col_y + len(u_sets) * N] = (wts["cross_node"] * (1 - 1 / N) / u_weight.sum()
                                                * np.repeat(u_weight, N))
    if wts.get("hops", 0) > 0:
        coef, const = hop_cost(problem, layer, prev_row, counts)
        cost[:n_x] += wts["hops"] * coef.ravel()
        offset += wts["hops"] * const
    if wts.get("migration", 0) > 0:
        fresh = (problem.previous_counts()[layer] == 0).astype(float)
        cost[:n_x] += wts["migration"] * fresh.ravel() / problem.num_replicas

    integer = np.arange(n_x) if col_a is None else np.r_[np.arange(n_x), col_a + np.arange(E * N)]
    row_lo, row_hi, starts, index, value = _concat_blocks(blocks)
    return LayerModel(
        num_cols=ncol, cost=cost, offset=offset, lower=lower, upper=upper, integer=integer,
        row_lo=row_lo, row_hi=row_hi, starts=starts, index=index, value=value,
        n_x=n_x, col_z=col_z, col_zn=col_zn, pairs_gpu=pairs_gpu, col_s_gpu=col_s_gpu,
        col_a=col_a, col_y=col_y, sets=sets,
    )


def _rows_block(rows):
    """CSR arrays of a list of (lo, hi, indices, values) rows."""
    lens = np.array([len(r[2]) for r in rows])
    return (np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float), lens,
            np.concatenate([np.asarray(r[2]) for r in rows]), np.concatenate([np.asarray(r[3], float) for r in rows]))


def _hyper_block(sets, E, N, node_of, x, x_ub, col_a, col_y):
    """Rows of the token hypergraph, built as arrays (hundreds of thousands at DeepSeek-V3 scale):
    sum_m a[e, m] = 1; x[e, g] - ub a[e, node(g)] <= 0; a[e, m] - y[u, m] <= 0 for e in u."""
    P = len(node_of)
    a = col_a + np.arange(E * N).reshape(E, N)
    one_lo = np.ones(E)
    one_idx = a.ravel()
    # x[e, g] <= ub a[e, node(g)]
    ee, gg = np.meshgrid(np.arange(E), np.arange(P), indexing="ij")
    link_idx = np.stack([x[ee, gg], a[ee, node_of[gg]]], axis=-1).reshape(-1, 2)
    link_val = np.stack([np.ones((E, P)), -x_ub], axis=-1).reshape(-1, 2)
    u_sets, _ = sets
    U, K = u_sets.shape
    uu, kk, mm = np.meshgrid(np.arange(U), np.arange(K), np.arange(N), indexing="ij")
    cover_idx = np.stack([a[u_sets[uu, kk], mm], col_y + uu * N + mm], axis=-1).reshape(-1, 2)
    n_link, n_cover = E * P, U * K * N
    lo = np.r_[one_lo, np.full(n_link + n_cover, -np.inf)]
    hi = np.r_[one_lo, np.zeros(n_link + n_cover)]
    lens = np.r_[np.full(E, N), np.full(n_link + n_cover, 2)]
    index = np.r_[one_idx, link_idx.ravel(), cover_idx.ravel()]
    value = np.r_[np.ones(E * N), link_val.ravel(), np.tile([1.0, -1.0], n_cover)]
    return lo, hi, lens, index, value


def _concat_blocks(blocks):
    lo = np.concatenate([b[0] for b in blocks])
    hi = np.concatenate([b[1] for b in blocks])
    lens = np.concatenate([b[2] for b in blocks])
    starts = np.r_[0, np.cumsum(lens)[:-1]].astype(np.int32)
    index = np.concatenate([b[3] for b in blocks]).astype(np.int32)
    value = np.concatenate([b[4] for b in blocks]).astype(float)
    return lo, hi, starts, index, value


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
    if model.pairs_gpu is not None:
        pe, pf, _ = model.pairs_gpu
        vals[model.col_s_gpu: model.col_s_gpu + len(pe) * f_gpu.shape[1]] = np.minimum(f_gpu[pe], f_gpu[pf]).ravel()
    if model.col_a is not None:  # a feasible start only if every expert sits on one node
        E, N = f_node.shape
        node = np.argmax(f_node, axis=1)
        vals[model.col_a: model.col_a + E * N] = np.eye(N)[node].ravel()
        u_sets, _ = model.sets
        reach = np.zeros((len(u_sets), N))
        reach[np.repeat(np.arange(len(u_sets)), u_sets.shape[1]), node[u_sets].ravel()] = 1.0
        vals[model.col_y: model.col_y + reach.size] = reach.ravel()
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
                mip_gap: float = 1e-3, threads: int = 1, seed: int = 0,
                fixed_node: np.ndarray | None = None) -> LayerSolve:
    """Solve one layer's MILP warm-started from ``warm_per_gpu`` ([E, P]); with ``fixed_node``
    every expert's replicas stay on its given node."""
    import highspy

    t0 = time.perf_counter()
    counts = warm_per_gpu.sum(axis=1)
    model = build_layer(problem, objective, layer, counts, prev_row, cap, fixed_node)
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
