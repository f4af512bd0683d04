"""Token-level node partition: put experts on nodes so that tokens reach as few nodes as possible.

Each token of a layer is a hyperedge over the experts it chose; with every replica of an expert on
one node, the token is sent to ``sum_m [n(t, m) > 0]`` nodes, where ``n(t, m)`` counts its experts
on node m. This module minimises that count summed over tokens (the connectivity metric of
hypergraph partitioning, which is what the evaluation's cross-node tokens measure), not a
pairwise co-activation proxy of it.

The search keeps ``n`` for every distinct expert set and computes the exact change of the
objective for every move (expert e to node m) and every swap (e <-> f) at once:

    move(e, m)  = sum_{t in e} w_t ([n(t, m) = 0] - [n(t, node(e)) = 1])
    swap(e, f)  = move(e, node(f)) + move(f, node(e))
                  + sum_{t in e and f} w_t ([n(t, node(e)) = 1] + [n(t, node(f)) = 1])

(the last sum undoes what the two moves count twice on tokens holding both experts; their
counts on both nodes do not change). Both are sparse-times-dense products. Passes of
Kernighan-Lin / Fiduccia-Mattheyses style (best move or swap among unlocked experts, even when
it makes things worse, then roll back to the best prefix) escape the plateaus that plain descent
stops on. Constraints: node load <= cap and node slot demand <= slots per node.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.planners.eplb import balanced_packing

SLOT_WEIGHT = 0.01
SPARE_SLOTS_PER_NODE = 2


def token_sets(experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct expert sets ``[U, K]`` of a layer's tokens ``[T, K]`` and how many tokens chose each."""
    rows = np.sort(np.asarray(experts, dtype=np.int64), axis=1)
    sets, count = np.unique(rows, axis=0, return_counts=True)
    return sets, count.astype(float)


def distinct_nodes(node: np.ndarray, sets: np.ndarray, weight: np.ndarray, num_nodes: int) -> float:
    """Mean number of nodes a token's experts sit on (``node[e]``: each expert on one node;
    ``node[e] == num_nodes`` marks an expert replicated on every node, which a token reaches on
    its own node under nearest replica selection, so it adds no node)."""
    hit = np.zeros((len(sets), num_nodes + 1), dtype=bool)
    hit[np.repeat(np.arange(len(sets)), sets.shape[1]), node[sets].ravel()] = True
    return float((weight * hit[:, :num_nodes].sum(axis=1)).sum() / max(weight.sum(), 1e-300))


class NodeSearch:
    """Per-token node counts of one layer and the exact deltas of moves and swaps.

    Positions are the nodes 0..N-1 and, when ``positions == N + 1``, the pseudo-node N,
    "replicated on every node": with nearest replica selection a token reaches such an expert on
    its own node, so it is left out of the count (its column of ``count`` is never counted,
    and the move/swap formulas hold with its ``empty`` and ``single`` columns set to zero)."""

    def __init__(self, sets: np.ndarray, weight: np.ndarray, num_experts: int, num_nodes: int,
                 node: np.ndarray, positions: int | None = None):
        import scipy.sparse as sp

        U, K = sets.shape
        self.E, self.N = num_experts, num_nodes
        self.positions = num_nodes if positions is None else positions
        self.weight = weight
        row = np.repeat(np.arange(U), K)
        self.incidence = sp.csr_matrix((np.ones(U * K), (row, sets.ravel())), shape=(U, num_experts))
        self.weighted_t = sp.csr_matrix((np.repeat(weight, K), (sets.ravel(), row)), shape=(num_experts, U))
        by_expert = self.incidence.tocsc()
        self.tokens_of = [by_expert.indices[by_expert.indptr[e]:by_expert.indptr[e + 1]] for e in range(num_experts)]
        self.node = np.asarray(node, dtype=np.int64).copy()
        self.count = np.zeros((U, self.positions))
        np.add.at(self.count, (row, self.node[sets].ravel()), 1)

    def value(self) -> float:
        """Weighted sum over token sets of the nodes each reaches."""
        return float((self.weight * (self.count[:, :self.N] > 0).sum(axis=1)).sum())

    def deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """``move[e, m]`` and ``swap[e, f]``: change of ``value()`` (negative = better)."""
        E = self.E
        empty = (self.count == 0).astype(float)
        single = (self.count == 1).astype(float)
        empty[:, self.N:] = 0  # the every-node pseudo-node never adds a node
        single[:, self.N:] = 0
        move = self.weighted_t @ empty
        move -= (self.weighted_t @ single)[np.arange(E), self.node][:, None]
        both = (self.weighted_t @ self.incidence.multiply(single[:, self.node]).tocsr()).toarray()
        to_other = move[:, self.node]  # [e, f]: e moves to f's node
        swap = to_other + to_other.T + both + both.T
        return move, swap

    def apply(self, e: int, m: int) -> None:
        t = self.tokens_of[e]
        self.count[t, self.node[e]] -= 1
        self.count[t, m] += 1
        self.node[e] = m


class Limits:
    """Node capacity: load <= ``cap`` and slot demand <= ``slots`` on every node, and no two
    experts marked in ``conflict`` on one node (pairs of heavy experts whose replicas could not
    be packed together onto the node's GPUs; the caller learns them, see ``locality.py``).

    With ``spread_demand`` (nearest replica selection and spare slots) an expert may also take
    the pseudo-node N, "a replica set on every node": it then adds ``load / N`` and
    ``spread_demand`` slots to every node (each node's tokens stay on the node). Moves and
    swaps are checked through ``contrib[e, position, node]``, what expert e at a position adds
    to each node."""

    def __init__(self, load: np.ndarray, demand: np.ndarray, num_nodes: int, cap: float, slots: int,
                 spread_demand: np.ndarray | None = None):
        self.load, self.demand, self.N, self.cap, self.slots = load, demand, num_nodes, cap, slots
        self.tol = cap * 1e-12
        E, N = len(load), num_nodes
        self.conflict = np.zeros((E, E), dtype=bool)
        self.positions = N + 1 if spread_demand is not None else N
        self.c_load = np.zeros((E, self.positions, N))
        self.c_demand = np.zeros((E, self.positions, N))
        self.c_load[:, np.arange(N), np.arange(N)] = load[:, None]
        self.c_demand[:, np.arange(N), np.arange(N)] = demand[:, None]
        if spread_demand is not None:
            self.c_load[:, N, :] = load[:, None] / N
            self.c_demand[:, N, :] = np.asarray(spread_demand, float)[:, None]

    def clashes(self, node) -> np.ndarray:
        """``[E, positions]``: experts at position m that conflict with e (none at the every-node
        pseudo-node)."""
        onehot = np.zeros((len(node), self.positions))
        onehot[np.arange(len(node)), node] = 1.0
        onehot[:, self.N:] = 0
        return self.conflict.astype(float) @ onehot

    def usage(self, node):
        idx = np.arange(len(node))
        return self.c_load[idx, node].sum(axis=0), self.c_demand[idx, node].sum(axis=0)

    def _within(self, load, demand):
        return ((load <= self.cap + self.tol) & (demand <= self.slots)).all(axis=-1)

    def feasible(self, node) -> bool:
        load, demand = self.usage(node)
        return bool(self._within(load, demand) and not self.clashes(node)[np.arange(len(node)), node].any())

    def excess(self, load, demand):
        """How far nodes are over their limits (0 when within), summed over the last axis: load in
        units of the cap, slots at a small weight so that repair may overfill a node's slots for
        a while to take a heavy expert, then move light experts on to nodes with free slots."""
        return (np.maximum(load - self.cap, 0) / self.cap
                + SLOT_WEIGHT * np.maximum(demand - self.slots, 0)).sum(axis=-1)

    def after_move(self, node):
        """``[E, positions, N]`` node loads and slot demands after moving e to each position."""
        idx = np.arange(len(node))
        load, demand = self.usage(node)
        return (load - self.c_load[idx, node][:, None, :] + self.c_load,
                demand - self.c_demand[idx, node][:, None, :] + self.c_demand)

    def after_swap(self, node):
        """``[E, E, N]`` node loads and slot demands after swapping e and f."""
        idx = np.arange(len(node))
        load, demand = self.usage(node)
        here_l, here_d = self.c_load[idx, node], self.c_demand[idx, node]  # [E, N]
        there_l, there_d = self.c_load[:, node], self.c_demand[:, node]  # [e, f, N]: e at f's position
        dl = there_l - here_l[:, None, :]
        dd = there_d - here_d[:, None, :]
        return (load + dl + dl.transpose(1, 0, 2), demand + dd + dd.transpose(1, 0, 2))

    def move_ok(self, node) -> np.ndarray:
        """``[E, positions]``: moving e to m keeps every node within both limits."""
        ok = self._within(*self.after_move(node)) & (self.clashes(node) == 0)
        ok[np.arange(len(node)), node] = False
        return ok

    def swap_ok(self, node) -> np.ndarray:
        """``[E, E]``: swapping e and f keeps every node within both limits."""
        clash = self.clashes(node)
        to_there = clash[:, node] - self.conflict * (node[None, :] < self.N)  # e joins f's node, f leaves it
        return ((node[:, None] != node[None, :]) & self._within(*self.after_swap(node))
                & (to_there == 0) & (to_there.T == 0))


def apply_cheapest(search: NodeSearch, move: np.ndarray, swap: np.ndarray):
    """Apply the cheaper of the cheapest move ``move[e, m]`` and the cheapest swap
    ``swap[e, f]`` (``inf``: not allowed). Returns ``(cost, undo)``, undo being the
    (expert, previous position) pairs that restore the assignment, or None if nothing is
    allowed."""
    node = search.node
    i = np.unravel_index(int(np.argmin(move)), move.shape)
    j = np.unravel_index(int(np.argmin(swap)), swap.shape)
    if not (np.isfinite(move[i]) or np.isfinite(swap[j])):
        return None
    if move[i] <= swap[j]:
        e, m = map(int, i)
        undo = ((e, int(node[e])),)
        search.apply(e, m)
        return move[i], undo
    e, f = map(int, j)
    undo = ((e, int(node[e])), (f, int(node[f])))
    search.apply(e, undo[1][1])
    search.apply(f, undo[0][1])
    return swap[j], undo


def repair(search: NodeSearch, limits: Limits, max_steps: int = 2000) -> bool:
    """Move or swap experts off over-full nodes, cheapest traffic increase per unit of relief
    first, until every node is within its limits. False if it gets stuck."""
    node = search.node
    E = len(node)
    for _ in range(max_steps):
        if limits.feasible(node):
            return True
        now = limits.excess(*limits.usage(node))
        move, swap = search.deltas()
        relief = now - limits.excess(*limits.after_move(node))
        relief[np.arange(E), node] = 0
        score = np.where(relief > 1e-12, move / np.maximum(relief, 1e-12), np.inf)
        srelief = now - limits.excess(*limits.after_swap(node))
        srelief[node[:, None] == node[None, :]] = 0
        sscore = np.where(srelief > 1e-12, swap / np.maximum(srelief, 1e-12), np.inf)
        if apply_cheapest(search, score, sscore) is None:
            return False
    return limits.feasible(node)


def separate(search: NodeSearch, limits: Limits, max_steps: int = 200) -> bool:
    """Move or swap conflicting experts apart (the cheapest change that keeps every limit)."""
    node = search.node
    E = len(node)
    for _ in range(max_steps):
        clash = limits.clashes(node)[np.arange(E), node] > 0
        if not clash.any():
            return True
        move, swap = search.deltas()
        move = np.where(limits.move_ok(node) & clash[:, None], move, np.inf)
        swap = np.where(limits.swap_ok(node) & (clash[:, None] | clash[None, :]), swap, np.inf)
        if apply_cheapest(search, move, swap) is None:
            return False
    return False


def improve(search: NodeSearch, limits: Limits, deadline: float, max_passes: int = 30,
            patience: int = 24) -> None:
    """Kernighan-Lin / Fiduccia-Mattheyses passes on a feasible assignment (kept feasible)."""
    E = search.E
    for _ in range(max_passes):
        locked = np.zeros(E, dtype=bool)
        total, best_total, best_len, history = 0.0, -1e-9, 0, []
        while time.perf_counter() < deadline and len(history) - best_len < patience:
            move, swap = search.deltas()
            node = search.node
            move = np.where(limits.move_ok(node) & ~locked[:, None], move, np.inf)
            swap = np.where(limits.swap_ok(node) & ~locked[:, None] & ~locked[None, :], swap, np.inf)
            done = apply_cheapest(search, move, swap)
            if done is None:
                break
            cost, undo = done
            history.append(undo)
            total += cost
            locked[[e for e, _ in undo]] = True
            if total < best_total:
                best_total, best_len = total, len(history)
        for step in reversed(history[best_len:]):  # roll back past the best prefix
            for e, m in step:
                search.apply(e, m)
        if best_len == 0 or time.perf_counter() >= deadline:
            return


def slot_demand(load: np.ndarray, num_slots: int, num_nodes: int, max_replicas: int) -> np.ndarray:
    """Replicas each expert asks of its node: the fewest that bring every replica under a common
    load q, with q the smallest that leaves up to two free slots per node for the search to move
    experts around (all ones without redundant slots). An expert that needs three or more gets
    one replica on every GPU of its node (``max_replicas``) where the slots allow: spread evenly,
    two heavy experts on one node still pack (each GPU carries the same share of both)."""
    E = len(load)
    spare = min(SPARE_SLOTS_PER_NODE * num_nodes, num_slots - E)
    if num_slots <= E:
        return np.ones(E, dtype=np.int64)
    need, q = _common_replicas(load, num_slots - spare, max_replicas)
    spread = np.zeros(E, dtype=bool)
    for e in np.argsort(-load, kind="stable"):
        if need[e] < 3 or need[e] >= max_replicas:
            continue
        trial = spread.copy()
        trial[e] = True
        left = num_slots - spare - trial.sum() * max_replicas
        if left < (~trial).sum():
            break
        rest, q_rest = _common_replicas(load[~trial], left, max_replicas)
        if q_rest > 1.25 * q:  # the others would get too few replicas: stop spreading
            break
        spread = trial
        need = np.full(E, max_replicas, dtype=np.int64)
        need[~spread] = rest
    return need


def _common_replicas(load, slots, max_replicas):
    """Fewest replicas putting every replica under a common load q within ``slots``; and q."""
    lo, hi = 0.0, float(load.max()) or 1.0
    for _ in range(60):
        q = (lo + hi) / 2
        if np.clip(np.ceil(load / max(q, 1e-300)), 1, max_replicas).sum() <= slots:
            hi = q
        else:
            lo = q
    return np.clip(np.ceil(load / hi), 1, max_replicas).astype(np.int64), hi


def group_start(load: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray | None:
    """Whole expert groups on nodes, heaviest group first onto the lightest node with room
    (EPLB's first step): the assignment group-limited routing rewards. None if the groups do
    not split evenly over the nodes."""
    E = len(load)
    if num_groups < num_nodes or num_groups % num_nodes:
        return None
    size = E // num_groups
    node_of_group, _ = balanced_packing(load.reshape(num_groups, size).sum(axis=1), num_nodes)
    return np.repeat(node_of_group, size)


def random_start(limits: Limits, rng: np.random.Generator) -> np.ndarray | None:
    """Experts in random order, each onto a random node with room."""
    E, N = len(limits.load), limits.N
    node = np.empty(E, dtype=np.int64)
    load, demand = np.zeros(N), np.zeros(N)
    for e in rng.permutation(E):
        ok = np.flatnonzero((load + limits.load[e] <= limits.cap) & (demand + limits.demand[e] <= limits.slots))
        if len(ok) == 0:
            return None
        m = int(rng.choice(ok))
        node[e] = m
        load[m] += limits.load[e]
        demand[m] += limits.demand[e]
    return node


def partition(sets: np.ndarray, weight: np.ndarray, limits: Limits, starts: list[np.ndarray],
              time_limit: float, seed: int = 0, random_starts: int = 2) -> tuple[np.ndarray | None, float]:
    """Best node assignment found from the given starts (repaired to the limits when needed)
    and seeded random ones within ``time_limit`` seconds. Returns ``(node, mean nodes per
    token)``, or ``(None, inf)`` if no start could be made feasible."""
    rng = np.random.default_rng(seed)
    t_end = time.perf_counter() + time_limit
    E, N = len(limits.load), limits.N
    candidates = [s for s in starts if s is not None]
    candidates += [s for s in (random_start(limits, rng) for _ in range(random_starts)) if s is not None]
    best, best_value = None, np.inf
    for i, start in enumerate(candidates):
        now = time.perf_counter()
        if now >= t_end and best is not None:
            break
        search = NodeSearch(sets, weight, E, N, start, limits.positions)
        if not repair(search, limits) or not separate(search, limits) or not limits.feasible(search.node):
            continue
        improve(search, limits, now + max(t_end - now, 0.0) / (len(candidates) - i))
        value = search.value()
        if value < best_value - 1e-9 and limits.feasible(search.node):
            best, best_value = search.node.copy(), value
    return best, best_value / max(weight.sum(), 1e-300)
