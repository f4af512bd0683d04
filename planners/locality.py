"""Node-first placement for the cross-node objective: experts on nodes first, balance inside.

1. node partition (``partition.py``): every expert, with all its replicas, goes to one node;
   minimise the tokens' distinct destination nodes (the token hypergraph's connectivity, exact)
   subject to node load <= U and node slot demand <= R/N, from whole expert groups on nodes
   (group-limited routing), from the warm plan's nodes and from seeded random starts;
2. inside each node: replicate its experts into the node's R/N slots by largest load per replica
   (at most one replica per GPU), pack them onto the node's GPUs heaviest first, then the swap
   search (``refine.py``) lowers the hottest GPU.

The node cap U starts at (GPUs per node) x the per-GPU cap. When a node's GPUs cannot be packed
within the layer's balance cap (typically two heavy experts whose replicas cannot share the
node's GPUs), its two heaviest experts are marked as a conflict (they may not share a node) and
the partition is searched again from where it was (lazy constraints); then the cap is tightened. The result is a MIP start for the layer MILP, which then
polishes the balance inside each node with the node assignment fixed.

Nearest replica selection (SGLang "static") with redundant slots: an expert may also be put on
every node (the partition's pseudo-node N, ``partition.Limits``): each node's tokens then reach
it locally, and it leaves the token hypergraph. Slot demands come from ``nearest_demand``; when
a node's GPUs do not pack, later attempts keep back a growing share of each node's redundant
slots from the search so that ``fill_node`` can add replicas for balance. No MILP follows (the
loads are not linear in the replica map under this rule). With expert groups,
``groups_everywhere_layer`` is one more candidate: whole groups on nodes and the hottest
experts on every node (the construction the group-aligned cut bound of
``benchmarks/dsv3_cut_ceiling.py`` is close to).
"""

from __future__ import annotations

import time

import numpy as np

from moesim.planners.eplb import balanced_packing, replicate
from moesim.planners.inputs import PlacementProblem
from moesim.planners.partition import Limits, group_start, partition, slot_demand
from moesim.planners.plan import phy2log_from_counts
from moesim.planners.refine import swap_search

# node-cap margins below (GPUs per node x GPU cap) tried in turn until the packing fits
NODE_CAP_MARGINS = (0.0, 0.004, 0.01, 0.025, 0.05, 0.1)
# partition, pack, learn the heavy pairs that could not be packed together: this many times
MAX_CONFLICT_ROUNDS = 8


def fill_node(load: np.ndarray, experts: np.ndarray, slots: int, gpus: int, slots_per_gpu: int,
              spread: np.ndarray | None = None) -> np.ndarray:
    """Replicas per GPU ``[len(experts), gpus]`` for one node's experts; experts flagged in
    ``spread`` get one replica on every GPU first, the others share the remaining slots by
    largest load per replica."""
    spread = np.zeros(len(experts), bool) if spread is None else np.asarray(spread, bool)
    if spread.any() and spread.sum() * gpus + (~spread).sum() <= slots:
        rest = np.flatnonzero(~spread)
        sub, sub_count = replicate(load[experts][rest], slots - spread.sum() * gpus, max_replicas=gpus)
        count = np.full(len(experts), gpus, dtype=np.int64)
        count[rest] = sub_count
        local = np.r_[np.repeat(np.flatnonzero(spread), gpus), rest[sub]]
    else:
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


def node_of_experts(problem: PlacementProblem, row: np.ndarray, everywhere: bool = False) -> np.ndarray:
    """Node holding most of each expert's replicas in a slot map; with ``everywhere``, the
    pseudo-node N for an expert with a replica on every node."""
    c = problem.cluster
    occupied = row >= 0
    slot_node = c.node_of()[np.arange(len(row)) // problem.slots_per_gpu]
    hits = np.zeros((problem.num_experts, c.num_nodes))
    np.add.at(hits, (row[occupied], slot_node[occupied]), 1)
    out = np.argmax(hits, axis=1)
    if everywhere:
        out[(hits > 0).all(axis=1)] = c.num_nodes
    return out


def nearest_demand(load: np.ndarray, gpu_cap: float, num_nodes: int, gpus_per_node: int,
                   slots: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Slots an expert asks of its node (``demand``) and of every node when it is replicated on
    all of them (``spread``), for nearest replica selection: the fewest replicas that keep each
    under half a GPU's cap (room to pack), at most one per GPU. The slots left over are what
    the search may spend on putting experts on every node; ``fill_node`` later turns any slots
    still free into extra replicas for balance. None if even that does not fit."""
    per = 0.5 * gpu_cap
    demand = np.clip(np.ceil(load / per), 1, gpus_per_node)
    spread = np.clip(np.ceil(load / num_nodes / per), 1, gpus_per_node)
    if demand.sum() > slots:
        return None
    return demand.astype(float), spread.astype(float)


def place_on_nodes(problem: PlacementProblem, layer: int, node: np.ndarray,
                   demand: np.ndarray | None = None, spread_demand: np.ndarray | None = None) -> np.ndarray:
    """Slot map of one layer with every expert's replicas on its node (``fill_node`` per node).
    ``node[e] == N`` (nearest selection): replicas of e on every node, each node's replicas
    carrying that node's tokens, ``load / N``."""
    c = problem.cluster
    P, N, G, S = c.num_gpus, c.num_nodes, c.gpus_per_node, problem.slots_per_gpu
    w = problem.load[layer]
    local = np.where(node == N, w / N, w)  # the load an expert brings to each node it is on
    per_gpu = np.zeros((len(w), P), dtype=np.int64)
    for m in range(N):
        experts = np.flatnonzero((node == m) | (node == N))
        if len(experts):
            spread = None
            if demand is not None:
                asked = demand if spread_demand is None else np.where(node == N, spread_demand, demand)
                spread = asked[experts] >= G
            per_gpu[np.ix_(experts, np.arange(m * G, (m + 1) * G))] = fill_node(
                local, experts, problem.num_replicas // N, G, S, spread)
    share = local / np.maximum(per_gpu.sum(axis=1), 1)
    return phy2log_from_counts(per_gpu, S, np.argsort(-share, kind="stable"))


def node_first_layer(problem: PlacementProblem, layer: int, gpu_cap: float | None, warm_row: np.ndarray,
                     time_limit: float = 5.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """One layer's ``(slot map, node of each expert, info)`` from the node-first decomposition,
    or None if no node partition packs within the GPU cap."""
    c = problem.cluster
    P, N, G, R = c.num_gpus, c.num_nodes, c.gpus_per_node, problem.num_replicas
    st = problem.stats
    if N < 2 or R % N or st is None or st.token_sets is None or R // N > G * problem.slots_per_gpu:
        return None
    w = problem.load[layer]
    if w.sum() <= 0:
        return None
    sets, weight = st.token_sets[layer]
    deadline = time.perf_counter() + time_limit
    target = gpu_cap if gpu_cap is not None else w.sum() / P * 1.01
    spread_demand = None
    near = problem.replica_selection == "nearest" and R > len(w)
    if near:
        near = nearest_demand(w, target, N, G, R // N * N)
    if near:
        demand, spread_demand = near
    else:
        demand = slot_demand(w, R, N, G).astype(float)
    starts = [group_start(w, problem.num_groups, N), node_of_experts(problem, warm_row, everywhere=bool(near))]
    if near:  # the warm plan's nodes with the experts that fit put on every node, hottest first
        starts.append(_everywhere_start(w, starts[1].copy(), demand, spread_demand, N, R // N))
    spare = (R - len(w)) / N  # redundant slots per node
    for i, margin in enumerate(NODE_CAP_MARGINS):
        # nearest: the search would spend every spare slot on experts on every node, leaving none
        # for extra replicas that balance the node's GPUs; when that does not pack, keep some back
        reserve = int(round(spare * min(i, 4) / 4)) if near else 0
        limits = Limits(w, demand, N, G * target * (1 - margin), R // N - reserve, spread_demand)
        conflict = np.zeros((len(w), len(w)), dtype=bool)  # learned afresh under each cap
        for rounds in range(MAX_CONFLICT_ROUNDS):
            limits.conflict = conflict
            share_t = max(deadline - time.perf_counter(), 0.0) * (0.35 if i == rounds == 0 else 0.25)
            node, reached = partition(sets, weight, limits, starts, share_t, seed)
            if node is None:
                break
            row = place_on_nodes(problem, layer, node, demand, spread_demand)
            gpu_load = _gpu_loads(problem, layer, row)
            if gpu_load.max() <= target * (1 + 1e-9):
                return row, node, {"node_cap_margin": margin, "slots_kept_back": reserve, "nodes_per_token": reached,
                                   "conflicts": int(conflict.sum() // 2)}
            starts = [node, *starts[:3]]  # go on from what was found
            # the two heaviest experts of each node whose GPUs overflow may not share a node
            learned = False
            for m in np.unique(c.node_of()[gpu_load > target * (1 + 1e-9)]):
                heavy = np.flatnonzero(node == m)  # experts on every node are never in conflict
                heavy = heavy[np.argsort(-w[heavy], kind="stable")][:2]
                if len(heavy) == 2 and not conflict[heavy[0], heavy[1]]:
                    conflict[heavy[0], heavy[1]] = conflict[heavy[1], heavy[0]] = True
                    learned = True
            if not learned or time.perf_counter() >= deadline:
                break
        if time.perf_counter() >= deadline:
            break
    return None


def groups_everywhere_layer(problem: PlacementProblem, layer: int, gpu_cap: float | None) -> np.ndarray | None:
    """Nearest selection with expert groups: whole groups on nodes (what group-limited routing
    rewards) and the k hottest experts on every node, for the largest k the redundant slots
    allow whose GPUs pack within ``gpu_cap`` (each node's leftover slots replicate its own hot
    experts: fewer experts everywhere, more room to balance). An expert on every node costs
    no node to any token and carries a 1/N share of its load per node. None when it does not
    apply or no k fits."""
    c = problem.cluster
    N, R, E = c.num_nodes, problem.num_replicas, problem.num_experts
    w = problem.load[layer]
    if problem.replica_selection != "nearest" or N < 2 or R % N or w.sum() <= 0:
        return None
    start = group_start(w, problem.num_groups, N)
    if start is None:
        return None
    spare = R // N - int(np.bincount(start, minlength=N).max())  # slots per node beyond its groups
    hottest = np.argsort(-w, kind="stable")
    for k in range(min(spare, E), -1, -1):
        node = start.copy()
        node[hottest[:k]] = N
        row = place_on_nodes(problem, layer, node)
        if gpu_cap is None or _gpu_loads(problem, layer, row).max() <= gpu_cap * (1 + 1e-9):
            return row
    return None


def _gpu_loads(problem: PlacementProblem, layer: int, row: np.ndarray) -> np.ndarray:
    from moesim.planners.objectives import gpu_loads
    from moesim.planners.plan import replicas_per_gpu

    c = problem.cluster
    per_gpu = replicas_per_gpu(row[None], problem.num_experts, c.num_gpus)[0]
    return gpu_loads(per_gpu, problem.load[layer], c.node_of(), c.num_nodes, problem.replica_selection)


def _everywhere_start(load, node, demand, spread, num_nodes, slots) -> np.ndarray:
    """``node`` with the hottest experts moved to every node while each node's slots allow."""
    N = num_nodes
    for e in np.argsort(-load, kind="stable"):
        if node[e] == N:
            continue
        trial = node.copy()
        trial[e] = N
        used = np.array([demand[(trial == m)].sum() for m in range(N)]) + spread[trial == N].sum()
        if (used <= slots).all():
            node = trial
    return node
