"""Placement objectives: named terms, weighted, evaluated per layer on any plan.

Every term is dimensionless and computed here for any phy2log, with exactly the expression the
ILP minimises, so "the ILP never loses to a heuristic on its own objective" is checked with the
same function that picks the warm start.

Terms (per layer l; f[e, g] = replicas of e on GPU g / replicas of e = share of e's tokens that
GPU g serves under uniform replica choice; likewise per node):

- ``balance``: max GPU load / mean GPU load.
- ``node_balance``: max node load / mean node load.
- ``cross_node``: token copies that leave their source node, per token, computed token by token
  from the layer's expert sets: sum over tokens of sum_m (1 - prod_{e in token} (1 - f[e, m]))
  (expected distinct destination nodes under uniform replica choice) x (1 - 1/nodes) / tokens,
  the source spread evenly over the nodes. This is exactly the evaluation's
  ``cross_node_tokens`` per token (on the sampled tokens when a layer has more than
  ``inputs.MAX_TOKENS_PER_LAYER``).
- ``cross_gpu``: co-activated expert pairs whose tokens land on different GPUs, per token:
  sum over pairs of C[e, f] (1 - sum_g min(f[e, g], f[f, g])) / tokens (the pairwise,
  Occult-style proxy of distinct destination GPUs; only the ``max_pairs`` heaviest pairs).
- ``hops``: inter-layer affinity kept off-GPU (ExFlow / MoETuner): sum over (e at l-1, f at l)
  of A[e, f] (1 - sum_g f_{l-1}[e, g] f_l[f, g]) / (tokens k^2), the share of consecutive-layer
  expert pairs whose GPUs differ.
- ``migration``: replicas placed on a GPU that did not hold that expert in the previous plan,
  per slot (times expert bytes = bytes migrated).

``problem.replica_selection == "nearest"`` (SGLang "static" dispatch: a replica on the token's
own node when there is one) changes two things: GPU loads (``replica_loads``: each node's share
of an expert goes to its replicas on that node) and ``cross_node`` (``source_node_shares``: a
token from node s sends nothing off-node for an expert that has a replica on s), averaged over
the source node exactly. ``cross_gpu`` and ``hops`` stay the uniform-choice proxies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.planners.inputs import PlacementError, PlacementProblem
from moesim.planners.plan import replica_counts, replicas_per_gpu

TERMS = ("balance", "node_balance", "cross_node", "cross_gpu", "hops", "migration")
TRAFFIC_TERMS = ("cross_node", "cross_gpu", "hops")
DEFAULT_MAX_PAIRS = 4096


@dataclass
class Objective:
    weights: dict[str, float] = field(default_factory=lambda: {"balance": 1.0})
    # cap every layer's max GPU load at (1 + slack) x the best heuristic's (None: no cap)
    balance_slack: float | None = None
    max_pairs: int = DEFAULT_MAX_PAIRS
    # per-layer max GPU loads (tokens) of a reference plan, e.g. EPLB as deployed (uniform replica
    # choice) or hierarchical EPLB: with it the cap is (1 + slack) x these instead of the best
    # heuristic's under the problem's own rule ("equal balance to that plan")
    balance_reference: tuple[float, ...] | None = None

    def __post_init__(self):
        for name, w in self.weights.items():
            if name not in TERMS:
                from moesim.errors import unknown_name

                raise unknown_name("objective term", name, TERMS)
            if not np.isfinite(w) or w < 0:
                raise PlacementError(f"objective weight of {name} must be a non-negative number, got {w}")
        if not any(self.weights.values()):
            raise PlacementError("the objective needs at least one term with a positive weight")
        if self.balance_slack is not None and self.balance_slack < 0:
            raise PlacementError(f"balance slack must be >= 0, got {self.balance_slack}")
        if self.balance_reference is not None:
            ref = np.asarray(self.balance_reference, float)
            if ref.ndim != 1 or not np.isfinite(ref).all() or (ref <= 0).any():
                raise PlacementError("the balance reference must be one positive max GPU load per layer")
            if self.balance_slack is None:
                raise PlacementError("a balance reference needs a balance slack (the cap is (1 + slack) x it)")
            self.balance_reference = tuple(float(x) for x in ref)

    @classmethod
    def parse(cls, text: str, balance_slack: float | None = None, max_pairs: int = DEFAULT_MAX_PAIRS) -> Objective:
        """``"balance"``, ``"balance+cross_node"`` or ``"balance=1,cross_node=0.5"``."""
        weights = {}
        for part in text.replace("+", ",").split(","):
            part = part.strip().replace("-", "_")
            if not part:
                continue
            name, _, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if value else 1.0
            except ValueError:
                raise PlacementError(f"objective weight {value!r} of {name} is not a number") from None
        return cls(weights, balance_slack, max_pairs)

    def to_dict(self) -> dict:
        out = {"weights": dict(self.weights), "balance_slack": self.balance_slack, "max_pairs": self.max_pairs}
        if self.balance_reference is not None:
            out["balance_reference"] = list(self.balance_reference)
        return out

    def needs_stats(self) -> bool:
        return any(self.weights.get(t, 0) > 0 for t in TRAFFIC_TERMS)

    def check(self, problem: PlacementProblem) -> None:
        if self.balance_reference is not None and len(self.balance_reference) != problem.num_layers:
            raise PlacementError(f"the balance reference has {len(self.balance_reference)} layers, "
                                 f"the problem {problem.num_layers}")
        if self.needs_stats() and problem.stats is None:
            raise PlacementError(
                "traffic objectives (cross_node, cross_gpu, hops) need token-level routing: plan from a routing trace"
            )
        if self.weights.get("cross_node", 0) > 0 and problem.stats.token_sets is None:
            raise PlacementError("the cross_node objective needs each layer's token expert sets "
                                 "(inputs.routing_stats collects them from a routing trace)")
        if self.weights.get("migration", 0) > 0 and problem.previous is None:
            raise PlacementError("the migration objective needs the previous placement (--previous PLAN.json)")


def traffic_pairs(problem: PlacementProblem, layer: int, max_pairs: int):
    """The heaviest co-activated pairs (e < f) of a layer: ``(e, f, tokens)`` arrays."""
    co = problem.stats.coactivation[layer]
    e, f = np.triu_indices(co.shape[0], k=1)
    c = co[e, f]
    keep = np.flatnonzero(c > 0)
    if len(keep) > max_pairs:
        keep = keep[np.argsort(-c[keep], kind="stable")[:max_pairs]]
        keep.sort()
    return e[keep], f[keep], c[keep]


def shares(per_gpu: np.ndarray, node_of: np.ndarray, num_nodes: int):
    """``f[e, g]`` and ``f[e, m]``: share of each expert's tokens per GPU and per node."""
    cnt = np.maximum(per_gpu.sum(axis=1, keepdims=True), 1)
    f_gpu = per_gpu / cnt
    f_node = np.zeros((per_gpu.shape[0], num_nodes))
    for m in range(num_nodes):
        f_node[:, m] = f_gpu[:, node_of == m].sum(axis=1)
    return f_gpu, f_node


def node_counts(per_gpu: np.ndarray, node_of: np.ndarray, num_nodes: int) -> np.ndarray:
    """``c[e, m]``: replicas of each expert on each node."""
    out = np.zeros((per_gpu.shape[0], num_nodes))
    for m in range(num_nodes):
        out[:, m] = per_gpu[:, node_of == m].sum(axis=1)
    return out


def replica_loads(per_gpu: np.ndarray, w: np.ndarray, node_of: np.ndarray, num_nodes: int,
                  selection: str = "uniform") -> np.ndarray:
    """``[E, P]``: load one replica of expert e carries on GPU g (meaningful where e has one).

    Tokens' sources are spread evenly over the GPUs, so every node sends ``w_e / N`` of expert
    e's tokens. ``uniform``: every replica gets ``w_e / c_e``. ``nearest`` (SGLang "static"
    dispatch): node s's share goes to e's replicas on s, split evenly (a source GPU holding a
    replica keeps its own tokens, the node's other GPUs spread theirs over the node's replicas:
    with the sources even, each replica on s still carries ``w_e / (N c_es)``); a node without a
    replica spreads its share evenly over all ``c_e`` replicas. A replica on node m thus carries
    ``w_e / N x (1 / c_em + n0_e / c_e)``, ``n0_e`` = nodes without a replica of e; summed over
    the replicas this is ``w_e`` (loads are conserved)."""
    cnt = np.maximum(per_gpu.sum(axis=1), 1).astype(float)
    if selection == "uniform":
        return np.broadcast_to((w / cnt)[:, None], per_gpu.shape)
    if selection != "nearest":
        raise ValueError(f"unknown replica selection {selection!r}")
    c = node_counts(per_gpu, node_of, num_nodes)
    n0 = (c == 0).sum(axis=1)
    per_node = np.where(c > 0, (w / num_nodes)[:, None] * (1 / np.maximum(c, 1) + (n0 / cnt)[:, None]), 0.0)
    return per_node[:, node_of]


def gpu_loads(per_gpu: np.ndarray, w: np.ndarray, node_of: np.ndarray, num_nodes: int,
              selection: str = "uniform") -> np.ndarray:
    """``[P]`` GPU loads of one layer's ``per_gpu`` ([E, P] replicas) under the selection rule."""
    return (per_gpu * replica_loads(per_gpu, w, node_of, num_nodes, selection)).sum(axis=0)


def source_node_shares(per_gpu: np.ndarray, node_of: np.ndarray, num_nodes: int,
                       selection: str = "uniform") -> np.ndarray:
    """``q[s, e, m]``: probability that a token from node s sends its copy for expert e to node m.
    Uniform: ``f[e, m]`` whatever s. Nearest: node s itself when e has a replica there, else
    ``f[e, m]``."""
    _, f_node = shares(per_gpu, node_of, num_nodes)
    q = np.broadcast_to(f_node, (num_nodes, *f_node.shape)).copy()
    if selection == "nearest":
        local = node_counts(per_gpu, node_of, num_nodes) > 0  # [E, N]
        for s in range(num_nodes):
            q[s][local[:, s]] = np.eye(num_nodes)[s]
    return q


def token_nodes(sets: np.ndarray, weight: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """Per token (weighted mean over expert sets), with the source node uniform: expected
    distinct destination nodes and expected copies that leave the source node."""
    N = q.shape[0]
    if len(sets) == 0:
        return 0.0, 0.0
    nodes = cross = 0.0
    for s in range(N):
        reached = 1 - np.prod(1 - q[s][sets], axis=1)  # [U, N]
        per_set = reached.sum(axis=1)
        nodes += float((weight * per_set).sum())
        cross += float((weight * (per_set - reached[:, s])).sum())
    total = weight.sum() * N
    return nodes / total, cross / total


def layer_terms(problem: PlacementProblem, objective: Objective, layer: int, row: np.ndarray,
                prev_row: np.ndarray | None = None) -> dict[str, float]:
    """Every weighted term of the objective for one layer's slot map ``row``."""
    c = problem.cluster
    P, N, E = c.num_gpus, c.num_nodes, problem.num_experts
    node_of = c.node_of()
    w = problem.load[layer]
    per_gpu = replicas_per_gpu(row[None], E, P)[0]
    gpu_load = gpu_loads(per_gpu, w, node_of, N, problem.replica_selection)
    total = w.sum()
    out = {}
    weights = objective.weights
    if weights.get("balance", 0) > 0:
        out["balance"] = gpu_load.max() / (total / P) if total > 0 else 1.0
    if weights.get("node_balance", 0) > 0:
        node_load = np.bincount(node_of, weights=gpu_load, minlength=N)
        out["node_balance"] = node_load.max() / (total / N) if total > 0 else 1.0
    f_gpu, f_node = shares(per_gpu, node_of, N)
    tokens = max(problem.stats.tokens[layer], 1) if problem.stats is not None else 1
    if weights.get("cross_node", 0) > 0:
        if problem.replica_selection == "uniform":
            out["cross_node"] = cross_node_per_token(problem, layer, f_node)
        else:
            sets, weight = problem.stats.token_sets[layer]
            q = source_node_shares(per_gpu, node_of, N, problem.replica_selection)
            out["cross_node"] = token_nodes(sets, weight, q)[1]
    if weights.get("cross_gpu", 0) > 0:
        e, g, co = traffic_pairs(problem, layer, objective.max_pairs)
        together = np.minimum(f_gpu[e], f_gpu[g]).sum(axis=1)
        out["cross_gpu"] = float((co * (1 - together)).sum() / tokens)
    if weights.get("hops", 0) > 0:
        out["hops"] = 0.0
        if layer > 0 and prev_row is not None:
            prev_f, _ = shares(replicas_per_gpu(prev_row[None], E, P)[0], node_of, N)
            aff = problem.stats.affinity[layer - 1]
            k2 = problem.stats.top_k ** 2
            out["hops"] = float((aff * (1 - prev_f @ f_gpu.T)).sum() / (tokens * k2))
    if weights.get("migration", 0) > 0:
        prev = problem.previous_counts()[layer]
        moved = (per_gpu > 0) & (prev == 0)
        out["migration"] = float(per_gpu[moved].sum() / problem.num_replicas)
    return out


def cross_node_per_token(problem: PlacementProblem, layer: int, f_node: np.ndarray) -> float:
    """Expected token copies leaving their source node, per token of the layer (see ``cross_node``)."""
    sets, weight = problem.stats.token_sets[layer]
    if len(sets) == 0:
        return 0.0
    reached = (1 - np.prod(1 - f_node[sets], axis=1)).sum(axis=1)  # expected distinct nodes
    N = f_node.shape[1]
    return float((weight * reached).sum() / weight.sum() * (1 - 1 / N))


def layer_value(terms: dict[str, float], objective: Objective) -> float:
    return float(sum(objective.weights.get(t, 0) * v for t, v in terms.items()))


def plan_values(problem: PlacementProblem, objective: Objective, phy2log: np.ndarray) -> np.ndarray:
    """Objective value of each layer of a plan."""
    return np.array([
        layer_value(layer_terms(problem, objective, lay, phy2log[lay], phy2log[lay - 1] if lay else None), objective)
        for lay in range(problem.num_layers)
    ])


def max_gpu_load(problem: PlacementProblem, phy2log: np.ndarray, layers=None) -> np.ndarray:
    """Max GPU load of each layer of a plan (or of the given ``layers``, one map row each)
    under the problem's load model (``replica_loads``: even split, or nearest selection)."""
    load = problem.load if layers is None else problem.load[np.atleast_1d(layers)]
    if load.shape[0] != phy2log.shape[0]:
        raise ValueError("one map row per layer is needed")
    c = problem.cluster
    per_gpu = replicas_per_gpu(phy2log, problem.num_experts, c.num_gpus)
    if problem.replica_selection == "uniform":
        share = load / np.maximum(replica_counts(phy2log, problem.num_experts), 1)
        return np.einsum("le,leg->lg", share, per_gpu).max(axis=1)
    return np.array([gpu_loads(x, w, c.node_of(), c.num_nodes, problem.replica_selection).max()
                     for x, w in zip(per_gpu, load, strict=True)])


def balance_bound(problem: PlacementProblem) -> np.ndarray:
    """``[L]`` lower bound on the max GPU load of ANY placement with these replicas and slots:
    max(mean GPU load, the smallest achievable max load per replica). The latter is what
    largest-load-per-replica replication reaches (it is optimal for that quantity)."""
    from moesim.planners.eplb import replicate

    cap = None if problem.allow_duplicates else problem.cluster.num_gpus
    out = np.empty(problem.num_layers)
    for lay, w in enumerate(problem.load):
        _, count = replicate(w, problem.num_replicas, max_replicas=cap)
        out[lay] = max(w.sum() / problem.cluster.num_gpus, (w / count).max())
    return out
