"""What a placement planner is given: loads, routing statistics, the cluster and the constraints.

A ``PlacementProblem`` is checked once when it is built: every constraint that cannot be met
raises a ``PlacementError`` naming it, so solvers and baselines never see an impossible input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

# Published effective rates used when the caller names none (placement-and-comm.md B.4):
# H100 NVLink4 ~370 GB/s for NCCL P2P, ConnectX-7 400 Gb/s ~48 GB/s per NIC.
DEFAULT_NVLINK_BPS = 370e9
DEFAULT_NETWORK_BPS = 48e9
# replica selection rules the load model and the traffic terms know (objectives.replica_loads)
REPLICA_SELECTIONS = ("uniform", "nearest")


class PlacementError(MoesimError):
    """A placement input that violates a constraint, or a solve that produced no plan."""


@dataclass(frozen=True)
class Cluster:
    """GPUs split evenly over nodes; NVLink inside a node, one NIC per GPU across nodes."""

    num_gpus: int
    num_nodes: int = 1
    nvlink_Bps: float = DEFAULT_NVLINK_BPS
    network_Bps: float = DEFAULT_NETWORK_BPS

    def __post_init__(self):
        if self.num_gpus < 1 or self.num_nodes < 1:
            raise PlacementError(f"need at least one GPU and one node, got {self.num_gpus} GPUs, {self.num_nodes} nodes")
        if self.num_gpus % self.num_nodes:
            raise PlacementError(
                f"nodes must divide GPUs: {self.num_gpus} GPUs cannot be split evenly over {self.num_nodes} nodes"
            )
        if self.nvlink_Bps <= 0 or self.network_Bps <= 0:
            raise PlacementError("link bandwidths must be positive")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def node_of(self) -> np.ndarray:
        """Node index of each GPU (GPUs are numbered node-major)."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    def bandwidth(self) -> np.ndarray:
        """GPU-pair bandwidth [P, P] in bytes/s (diagonal: NVLink, never used for traffic)."""
        node = self.node_of()
        same = node[:, None] == node[None, :]
        return np.where(same, self.nvlink_Bps, self.network_Bps).astype(float)


@dataclass
class RoutingStats:
    """Token-level facts a traffic objective needs, per MoE layer.

    ``coactivation[l, e, f]``: tokens that chose both e and f in layer l (diagonal = load).
    ``affinity[l, e, f]``: tokens that chose e in layer l and f in layer l+1 (``[L-1, E, E]``).
    ``tokens[l]``: tokens routed in layer l.
    ``token_sets[l]``: ``(sets [U, K], weight [U])``, the distinct expert sets the layer's tokens
    chose and how many tokens chose each (the hyperedges of the token-level cross-node term);
    None when not collected.
    """

    coactivation: np.ndarray
    affinity: np.ndarray
    tokens: np.ndarray
    top_k: int
    token_sets: list | None = None


@dataclass
class PlacementProblem:
    """One placement instance: where to put ``num_replicas`` expert replicas per layer.

    ``load[l, e]`` is the work of expert e in layer l (tokens routed); a replicated expert's
    tokens are split evenly over its replicas (the load model EPLB, SGLang and vLLM assume).
    Slots are GPU-major: GPU g owns slots ``g*slots_per_gpu ... (g+1)*slots_per_gpu - 1``.
    """

    load: np.ndarray
    cluster: Cluster
    num_replicas: int | None = None
    slots_per_gpu: int | None = None
    num_groups: int = 1
    allow_duplicates: bool = False
    previous: np.ndarray | None = None  # phy2log [L, P*S'] of the current plan (migration)
    expert_bytes: int = 0
    stats: RoutingStats | None = None
    source: dict = field(default_factory=dict)
    # how a token picks among an expert's replicas: "uniform" (SGLang dynamic, vLLM) or
    # "nearest" (SGLang static: a replica on the token's node if there is one); see objectives.py
    replica_selection: str = "uniform"

    def __post_init__(self):
        if self.replica_selection not in REPLICA_SELECTIONS:
            from moesim.errors import unknown_name

            raise unknown_name("replica selection", self.replica_selection, REPLICA_SELECTIONS)
        load = np.asarray(self.load, dtype=float)
        if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
            raise PlacementError(f"loads must be a [layers, experts] matrix, got shape {load.shape}")
        if not np.isfinite(load).all() or (load < 0).any():
            raise PlacementError("loads must be finite and non-negative")
        self.load = load
        L, E = load.shape
        P = self.cluster.num_gpus
        if self.num_replicas is None:
            self.num_replicas = E
        R = int(self.num_replicas)
        self.num_replicas = R
        if R < E:
            raise PlacementError(
                f"more experts than slots: {E} experts need at least {E} replicas per layer, got {R}"
            )
        if self.slots_per_gpu is None:
            self.slots_per_gpu = math.ceil(R / P)
        S = int(self.slots_per_gpu)
        self.slots_per_gpu = S
        if P * S < R:
            raise PlacementError(
                f"more replicas than slots: {R} replicas per layer do not fit in {P} GPUs x {S} slots = {P * S}"
            )
        if not self.allow_duplicates and R > E * P:
            raise PlacementError(
                f"no two replicas of one expert on one GPU: {R} replicas of {E} experts need more than {P} GPUs"
            )
        if self.num_groups < 1 or E % self.num_groups:
            raise PlacementError(f"groups must divide experts: {E} experts cannot form {self.num_groups} equal groups")
        if self.previous is not None:
            prev = np.asarray(self.previous)
            if prev.ndim != 2 or prev.shape[0] != L or prev.shape[1] % P:
                raise PlacementError(
                    f"previous placement must be [layers={L}, slots] with slots a multiple of {P} GPUs, got {prev.shape}"
                )
            if prev.size and (prev.max() >= E or prev.min() < -1):
                raise PlacementError(f"previous placement names an expert outside 0..{E - 1}")
            self.previous = prev.astype(np.int64)
        if self.stats is not None:
            st = self.stats
            if st.coactivation.shape != (L, E, E) or st.affinity.shape != (max(L - 1, 0), E, E):
                raise PlacementError("routing statistics do not match the loads' layers and experts")
            if st.token_sets is not None and len(st.token_sets) != L:
                raise PlacementError("token expert sets do not match the loads' layers")

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @property
    def num_slots(self) -> int:
        """Physical slot positions per layer (P x slots per GPU; some may stay empty)."""
        return self.cluster.num_gpus * self.slots_per_gpu

    def previous_counts(self) -> np.ndarray | None:
        """Replicas of each expert on each GPU in the previous plan, ``[L, E, P]``."""
        if self.previous is None:
            return None
        from moesim.planners.plan import replicas_per_gpu

        return replicas_per_gpu(self.previous, self.num_experts, self.cluster.num_gpus)


# ----- building problems from files ------------------------------------------------------------
# token-level statistics keep at most this many tokens per layer (a seeded sample beyond it)
MAX_TOKENS_PER_LAYER = 1 << 16


def routing_stats(trace, max_tokens: int = MAX_TOKENS_PER_LAYER, seed: int = 0) -> RoutingStats:
    """Within-layer co-activation and l -> l+1 affinity of a routing trace, from the project's
    one streaming pass (``moesim.traces.stats.compute_stats``), and each layer's token expert
    sets (``layer_token_sets``)."""
    from moesim.traces.stats import compute_stats

    st = compute_stats(trace, segment_lengths=(), windows=())
    K = trace.meta.top_k
    tokens = st.load.sum(axis=1) / K  # every row routes a token to K distinct experts
    return RoutingStats(st.coactivation.astype(float), st.affinity.astype(float), tokens, K,
                        layer_token_sets(trace, max_tokens, seed))


def layer_token_sets(trace, max_tokens: int = MAX_TOKENS_PER_LAYER, seed: int = 0) -> list:
    """Per layer, the distinct expert sets of its tokens with their token counts. A layer with
    more than ``max_tokens`` tokens keeps a seeded uniform sample of them (weights then count
    sampled tokens; every figure built on them is a per-token mean, so the scale cancels)."""
    from moesim.planners.partition import token_sets

    L = trace.meta.num_layers
    rows: list[list[np.ndarray]] = [[] for _ in range(L)]
    for b in trace.iter_batches():
        layer = b.layer.astype(np.int64)
        ids = b.expert_ids.astype(np.int64)
        for lay in np.unique(layer):
            rows[lay].append(ids[layer == lay])
    rng = np.random.default_rng(seed)
    out = []
    for lay in range(L):
        ids = np.concatenate(rows[lay]) if rows[lay] else np.zeros((0, trace.meta.top_k), np.int64)
        if len(ids) > max_tokens:
            ids = ids[np.sort(rng.choice(len(ids), max_tokens, replace=False))]
        out.append(token_sets(ids))
    return out


def load_matrix_file(path: str | Path) -> np.ndarray:
    """Read a ``[layers, experts]`` load matrix from .npy, .csv or .json."""
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"{path}: no such load file")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            import json

            arr = np.asarray(json.loads(path.read_text()), dtype=float)
        else:
            arr = np.loadtxt(path, delimiter=",", ndmin=2)
    except (ValueError, OSError) as exc:
        raise PlacementError(f"{path}: cannot read a load matrix ({str(exc).splitlines()[0]})") from None
    arr = np.asarray(arr, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise PlacementError(f"{path}: expected a [layers, experts] matrix, got shape {arr.shape}")
    return arr


def problem_from_trace(trace, cluster: Cluster, with_stats: bool = True, **constraints) -> PlacementProblem:
    """Loads (and, for a routing trace, co-activation and affinity) from a ``Trace``."""
    load = trace.load_matrix().astype(float)
    stats = routing_stats(trace) if with_stats and not trace.is_counts else None
    source = {"trace": str(trace.path) if trace.path else "memory", "model": trace.meta.model}
    return PlacementProblem(load, cluster, stats=stats, source=source, **constraints)
