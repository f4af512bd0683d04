"""MoETuner's two ILP stages (Go & Mahajan, arXiv 2502.06643), from the published description.

Stage 1, balanced clustering, per layer: split the E experts into P clusters of E/P experts
(the equal-size variant, so every GPU holds the same number of experts over all layers) that
minimise the sum of absolute deviations of cluster load from the mean:
    x[e, c] binary, sum_c x = 1, sum_e x = E/P, d[c] >= +-(sum_e n_e x[e, c] - mean), min sum_c d[c].
Stage 2, cluster -> GPU, using inter-layer affinity A^l[e, f] (tokens at e in layer l and f in
l+1) and the GPU-pair bandwidth: minimise per layer the largest pair traffic over bandwidth,
m_l >= V^l[g, h] / BW[g, h] for g != h. The paper solves all layers jointly (a quadratic
assignment, linearised); here layer 0 keeps cluster c on GPU c and each later layer is solved
exactly given the layer before (a linear assignment MILP), a sequential decomposition.
MoETuner places one replica per expert, so it needs no redundant slots and E divisible by P.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.planners.eplb import balanced_packing
from moesim.planners.ilp_highs import set_threads
from moesim.planners.inputs import PlacementError, PlacementProblem


def _highs(time_limit: float, threads: int, seed: int):
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    set_threads(h, threads)
    h.setOptionValue("time_limit", float(max(time_limit, 0.05)))
    h.setOptionValue("mip_rel_gap", 1e-4)
    h.setOptionValue("random_seed", int(seed))
    return h


def _solve(h, ncol, lower, upper, cost, integer, rows, warm):
    import highspy

    inf = highspy.kHighsInf
    h.addVars(ncol, lower, np.where(np.isinf(upper), inf, upper))
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
    h.changeColsIntegrality(len(integer), integer.astype(np.int32), np.full(len(integer), highspy.HighsVarType.kInteger))
    lo = np.array([r[0] for r in rows], float)
    hi = np.array([r[1] for r in rows], float)
    lens = [len(r[2]) for r in rows]
    starts = np.r_[0, np.cumsum(lens)[:-1]].astype(np.int32)
    h.addRows(len(rows), np.where(np.isinf(lo), -inf, lo), np.where(np.isinf(hi), inf, hi), int(sum(lens)), starts,
              np.concatenate([r[2] for r in rows]).astype(np.int32), np.concatenate([r[3] for r in rows]).astype(float))
    sol = highspy.HighsSolution()
    sol.col_value = list(map(float, warm))
    h.setSolution(sol)
    h.run()
    return np.asarray(h.getSolution().col_value), h.getInfo()


def balanced_clusters(load: np.ndarray, num_clusters: int, time_limit: float, threads: int = 1, seed: int = 0):
    """Stage 1 for one layer: cluster of each expert (warm start: LPT with equal counts)."""
    E, P = len(load), num_clusters
    size = E // P
    mean = load.sum() / P
    warm_c, _ = balanced_packing(load, P, capacity=size)
    n_x = E * P
    x = np.arange(n_x).reshape(E, P)
    d = n_x + np.arange(P)
    rows = [(1.0, 1.0, x[e], np.ones(P)) for e in range(E)]
    rows += [(size, size, x[:, c], np.ones(E)) for c in range(P)]
    rows += [(-np.inf, mean, np.r_[x[:, c], d[c]], np.r_[load, -1.0]) for c in range(P)]
    rows += [(mean, np.inf, np.r_[x[:, c], d[c]], np.r_[load, 1.0]) for c in range(P)]
    warm = np.zeros(n_x + P)
    warm[x[np.arange(E), warm_c]] = 1.0
    warm[d] = np.abs(np.bincount(warm_c, weights=load, minlength=P) - mean)
    cost = np.r_[np.zeros(n_x), np.ones(P)]
    cols, info = _solve(_highs(time_limit, threads, seed), n_x + P, np.zeros(n_x + P),
                        np.r_[np.ones(n_x), np.full(P, np.inf)], cost, np.arange(n_x), rows, warm)
    if info.primal_solution_status != 2:
        return warm_c, float(warm[d].sum()), -np.inf
    return np.argmax(cols[:n_x].reshape(E, P), axis=1), float(info.objective_function_value), float(info.mip_dual_bound)


def map_clusters(traffic: np.ndarray, prev_gpu: np.ndarray, bandwidth: np.ndarray, time_limit: float,
                 threads: int = 1, seed: int = 0) -> np.ndarray:
    """Stage 2 for one layer given the layer before: GPU of each cluster.

    ``traffic[c', c]``: tokens from cluster c' (layer l-1, on GPU prev_gpu[c']) to cluster c.
    V[g, h] = sum_c traffic[c'_on_g, c] y[c, h]; minimise m >= V[g, h] / BW[g, h] (g != h).
    """
    P = len(prev_gpu)
    on_gpu = np.empty(P, dtype=np.int64)
    on_gpu[prev_gpu] = np.arange(P)  # cluster of layer l-1 on each GPU
    n_y = P * P
    y = np.arange(n_y).reshape(P, P)  # y[c, h]
    col_m = n_y
    rows = [(1.0, 1.0, y[c], np.ones(P)) for c in range(P)]
    rows += [(1.0, 1.0, y[:, h], np.ones(P)) for h in range(P)]
    for g in range(P):
        for h in range(P):
            if g != h:
                rows.append((-np.inf, 0.0, np.r_[y[:, h], col_m], np.r_[traffic[on_gpu[g]] / bandwidth[g, h], -1.0]))
    warm = np.zeros(n_y + 1)
    warm[y[np.arange(P), np.arange(P)]] = 1.0
    V = traffic[on_gpu]  # identity start: cluster c on GPU c
    off = ~np.eye(P, dtype=bool)
    warm[col_m] = (V / bandwidth)[off].max() if P > 1 else 0.0
    cost = np.r_[np.zeros(n_y), 1.0]
    cols, info = _solve(_highs(time_limit, threads, seed), n_y + 1, np.zeros(n_y + 1), np.r_[np.ones(n_y), np.inf],
                        cost, np.arange(n_y), rows, warm)
    if info.primal_solution_status != 2:
        return np.arange(P)
    return np.argmax(cols[:n_y].reshape(P, P), axis=1)


def moetuner_plan(problem: PlacementProblem, time_limit: float = 60.0, threads: int = 1, seed: int = 0):
    """phy2log and notes for MoETuner's placement (both stages; stage 2 needs routing stats)."""
    E, P, L = problem.num_experts, problem.cluster.num_gpus, problem.num_layers
    if problem.num_replicas != E:
        raise PlacementError(f"MoETuner places one replica per expert: use 0 redundant slots (got {problem.num_replicas - E})")
    if E % P:
        raise PlacementError(f"MoETuner needs equal experts per GPU: {P} GPUs must divide {E} experts")
    deadline = time.perf_counter() + time_limit
    notes = []
    clusters, gaps = [], []
    for lay in range(L):
        share = max((deadline - time.perf_counter()) / (2 * (L - lay)), 0.05)
        cl, value, bound = balanced_clusters(problem.load[lay], P, share, threads, seed)
        clusters.append(cl)
        gaps.append((value - bound) / value if value > 0 and np.isfinite(bound) else 0.0)
    notes.append(f"stage 1 (balanced clustering): largest gap {max(gaps):.4f}")
    gpu_of_cluster = [np.arange(P)]
    if problem.stats is None:
        notes.append("stage 2 skipped: it needs inter-layer affinity from a routing trace")
        gpu_of_cluster = [np.arange(P)] * L
    else:
        bw = problem.cluster.bandwidth()
        for lay in range(1, L):
            A = problem.stats.affinity[lay - 1]
            onehot_prev = np.eye(P)[clusters[lay - 1]]  # [E, P]
            onehot = np.eye(P)[clusters[lay]]
            traffic = onehot_prev.T @ A @ onehot  # [c', c]
            share = max((deadline - time.perf_counter()) / (L - lay), 0.05)
            gpu_of_cluster.append(map_clusters(traffic, gpu_of_cluster[-1], bw, share, threads, seed))
        notes.append("stage 2 (cluster -> GPU): sequential per layer, layer 0 fixed")
    S = problem.slots_per_gpu
    phy = np.full((L, problem.num_slots), -1, dtype=np.int64)
    for lay in range(L):
        gpu = gpu_of_cluster[lay][clusters[lay]]
        for g in range(P):
            experts = np.flatnonzero(gpu == g)
            phy[lay, g * S: g * S + len(experts)] = experts
    return phy, notes
