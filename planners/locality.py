"""Node-first placement for traffic objectives: co-activated experts share a node, balance inside.

The whole-layer MILP's relaxation of "pair p is on one node" is weak (every s[p, m] = 1/2 at the
LP optimum), so HiGHS rarely finds low-traffic placements by itself. This decomposition does:

1. node partition: each expert (with all its replicas) goes to one node; maximise the
   co-activation kept inside nodes subject to node load <= U and at most R/N experts per node.
   This is graph partitioning; its MILP (s[p, m] <= a[e_p, m], s[p, m] <= a[f_p, m]) has the
   same weak relaxation, and HiGHS in 10 s stayed near the starting cut on ESFT layers, so a
   Kernighan-Lin / Fiduccia-Mattheyses style move-and-swap search is used, from the warm
   assignment and seeded random restarts;
2. inside each node: replicate its experts into the node's R/N slots by largest load per replica
   (at most one replica per GPU), pack them onto the node's GPUs heaviest first, then the swap
   search (refine.py) lowers the hottest GPU.

The node cap U is tightened until every GPU respects the layer's balance cap. The result is one
more warm-start candidate for the whole-layer MILP, scored with the same objective.
"""

from __future__ import annotations

import numpy as np

from moesim.planners.eplb import balanced_packing, replicate
from moesim.planners.inputs import PlacementProblem
from moesim.planners.plan import phy2log_from_counts
from moesim.planners.refine import swap_search


def node_partition(load: np.ndarray, coactivation: np.ndarray, num_nodes: int, max_experts: int,
                   node_cap: float, warm: np.ndarray | None, seed: int = 0, restarts: int = 8,
                   max_steps: int = 2000) -> np.ndarray | None:
    """Expert -> node maximising co-activation kept inside nodes under a node-load cap and an
    expert-count cap: best-improvement moves and swaps (Kernighan-Lin / Fiduccia-Mattheyses
    style) from the warm assignment and seeded random restarts. None if no start is feasible."""
    rng = np.random.default_rng(seed)
    N = num_nodes
    C = coactivation.astype(float).copy()
    np.fill_diagonal(C, 0.0)
    starts = [] if warm is None else [np.asarray(warm)]
    for _ in range(restarts):
        start = _random_feasible(load, N, max_experts, node_cap, rng)
        if start is not None:
            starts.append(start)
    best, best_cut = None, np.inf
    for node in starts:
        node = _improve(node.copy(), C, load, N, max_experts, node_cap, max_steps)
        cut = _cut(node, C)
        if cut < best_cut and _feasible(node, load, N, max_experts, node_cap):
            best, best_cut = node, cut
    return best


def _cut(node: np.ndarray, C: np.ndarray) -> float:
    return float(C[node[:, None] != node[None, :]].sum() / 2)


def _feasible(node, load, N, max_experts, node_cap) -> bool:
    return bool((np.bincount(node, weights=load, minlength=N) <= node_cap * (1 + 1e-12)).all()
                and (np.bincount(node, minlength=N) <= max_experts).all())


def _random_feasible(load, N, max_experts, node_cap, rng) -> np.ndarray | None:
    """A random assignment that respects both caps (heaviest first onto a random node with room)."""
    node = np.empty(len(load), dtype=np.int64)
    node_load = np.zeros(N)
    size = np.zeros(N, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        ok = np.flatnonzero((size < max_experts) & (node_load + load[e] <= node_cap))
        if len(ok) == 0:
            return None
        m = int(rng.choice(ok))
        node[e] = m
        node_load[m] += load[e]
        size[m] += 1
    return node


def _improve(node, C, load, N, max_experts, node_cap, max_steps):
    E = len(node)
    for _ in range(max_steps):
        onehot = np.zeros((E, N))
        onehot[np.arange(E), node] = 1.0
        link = C @ onehot  # [E, N]: co-activation of e with the experts on each node
        here = link[np.arange(E), node]
        node_load = onehot.T @ load
        size = onehot.sum(axis=0)
        # move e to node m
        gain_move = link - here[:, None]
        ok = (node_load[None, :] + load[:, None] <= node_cap) & (size[None, :] < max_experts)
        ok[np.arange(E), node] = False
        gain_move = np.where(ok, gain_move, -np.inf)
        # swap e (node a) with f (node b): both move, their own pair stays cut
        gain_swap = (link[:, node] - here[:, None]) + (link[:, node].T - here[None, :]) - 2 * C
        load_a = node_load[node][:, None] - load[:, None] + load[None, :]  # e's node after the swap
        load_b = node_load[node][None, :] - load[None, :] + load[:, None]  # f's node after the swap
        ok = (node[:, None] != node[None, :]) & (load_a <= node_cap) & (load_b <= node_cap)
        gain_swap = np.where(ok, gain_swap, -np.inf)
        i = np.unravel_index(int(np.argmax(gain_move)), gain_move.shape)
        j = np.unravel_index(int(np.argmax(gain_swap)), gain_swap.shape)
        tol = 1e-9 * max(C.sum(), 1.0)
        if max(gain_move[i], gain_swap[j]) <= tol:
            break
        if gain_move[i] >= gain_swap[j]:
            node[i[0]] = i[1]
        else:
            e, f = j
            node[e], node[f] = node[f], node[e]
    return node


def fill_node(load: np.ndarray, experts: np.ndarray, slots: int, gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Replicas per GPU ``[len(experts), gpus]`` for one node's experts."""
    local, count = replicate(load[experts], slots, max_replicas=gpus)
    share = load[experts] / count
    gpu_of, _ = balanced_packing(share[local], gpus, capacity=slots_per_gpu)
    per_gpu = np.zeros((len(experts), gpus), dtype=np.int64)
    np.add.at(per_gpu, (local, gpu_of), 1)
    if (per_gpu > 1).any():  # packing put two replicas of one expert together: let the search fix it
        per_gpu = np.minimum(per_gpu, 1)
        for e in np.flatnonzero(per_gpu.sum(axis=1) < count):
            for g in np.argsort(per_gpu.sum(axis=0), kind="stable"):
                if per_gpu[e, g] == 0 and per_gpu[:, g].sum() < slots_per_gpu and per_gpu[e].sum() < count[e]:
                    per_gpu[e, g] = 1
    return swap_search(per_gpu, share, slots_per_gpu)


def node_first_layer(problem: PlacementProblem, layer: int, gpu_cap: float | None, warm_row: np.ndarray,
                     max_pairs: int, time_limit: float = 5.0, threads: int = 1, seed: int = 0,
                     tries: int = 4) -> np.ndarray | None:
    """One layer's slot map from the node-first decomposition, or None if it found none."""
    c = problem.cluster
    P, N, G, S, R = c.num_gpus, c.num_nodes, c.gpus_per_node, problem.slots_per_gpu, problem.num_replicas
    if N < 2 or R % N or problem.stats is None:
        return None
    w = problem.load[layer]
    E = len(w)
    max_experts = R // N
    node_of_gpu = c.node_of()
    # warm node per expert: where most of its replicas sit in the warm map
    slot_gpu = np.repeat(np.arange(P), S)
    hits = np.zeros((E, N))
    occupied = warm_row >= 0
    np.add.at(hits, (warm_row[occupied], node_of_gpu[slot_gpu[occupied]]), 1)
    warm_node = np.argmax(hits, axis=1)
    target = gpu_cap if gpu_cap is not None else w.sum() / P * 1.01
    best = None
    slack = target * G / (w.sum() / N) - 1  # node-load headroom implied by the GPU cap
    for t in range(tries):
        node_cap = w.sum() / N * (1 + max(slack, 0) / (2 ** t))
        warm = warm_node if (np.bincount(warm_node, weights=w, minlength=N) <= node_cap).all() \
            and (np.bincount(warm_node, minlength=N) <= max_experts).all() else None
        node = node_partition(w, problem.stats.coactivation[layer], N, max_experts, node_cap, warm, seed)
        if node is None:
            continue
        per_gpu = np.zeros((E, P), dtype=np.int64)
        for m in range(N):
            experts = np.flatnonzero(node == m)
            if len(experts) == 0:
                continue
            per_gpu[np.ix_(experts, np.arange(m * G, (m + 1) * G))] = fill_node(w, experts, max_experts, G, S)
        share = w / np.maximum(per_gpu.sum(axis=1), 1)
        row = phy2log_from_counts(per_gpu, S, np.argsort(-share, kind="stable"))
        peak = (share @ per_gpu).max()
        if peak <= target * (1 + 1e-9):
            best = row
            break
    return best
