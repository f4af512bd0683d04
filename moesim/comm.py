"""All-to-all communication of an MoE layer under a real (skewed) routing, and TP collectives.

Flow: routing (token-level ``src_gpu [N]`` + ``expert_ids [N, K]``, or aggregated
``counts [G_src, E]``) + a :class:`Placement` (expert -> GPU replicas and a replica-selection
rule) -> :class:`CommCounts` (the matrices X, Y, Z) -> a dispatcher model (registered by name)
-> :class:`CommResult` (dispatch/combine seconds, bytes per GPU and per link, bottleneck).

Count matrices (one MoE layer, one micro-batch), G GPUs, M nodes:

- ``Z[s, d]``: (token, selected expert) pairs from GPU s landing on GPU d (no dedup).
- ``X[s, d]``: tokens on s with >= 1 selected replica on d (per-GPU dedup).
- ``Y[s, m]``: tokens on s with >= 1 selected replica on node m (per-node dedup).

Every dispatcher's time is ``fixed cost + max over GPUs and links of bytes / rate``: dispatch
and combine are barriers, so the slowest rank's busiest link sets completion. Combine moves
the same rows back (the transpose), at the combine row size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError, unknown_name
from moesim.hardware import Cluster


class CommError(MoesimError):
    """Inconsistent routing, placement or cluster for a communication model."""


# ---------------------------------------------------------------------------------------------
# Row sizes on the wire
# ---------------------------------------------------------------------------------------------
def row_bytes(hidden: int, dtype: str, per_pair_header: int = 0) -> int:
    """Bytes of one token row: BF16 2H; FP8 H + one 4-byte scale per 128 values (DeepEP)."""
    if dtype in ("bf16", "fp16"):
        size = 2 * hidden
    elif dtype == "fp8":
        size = hidden + math.ceil(hidden / 128) * 4
    elif dtype == "fp32":
        size = 4 * hidden
    else:
        raise unknown_name("wire dtype", dtype, ["bf16", "fp16", "fp8", "fp32"])
    return size + per_pair_header


# DeepEP's low-latency kernels add 16 bytes of metadata to each FP8 (token, expert) message.
LL_FP8_HEADER = 16


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------
SELECTION_RULES = ("random", "nearest", "round-robin")


@dataclass(frozen=True)
class Placement:
    """Replicas of each logical expert on GPUs, and the rule that picks one per (token, expert).

    ``rep_expert[r]`` / ``rep_gpu[r]``: logical expert and GPU of replica r. Rules:
    ``random`` (uniform, seeded: SGLang "dynamic", vLLM), ``nearest`` (same GPU, else same
    node, else the first replica in slot order: SGLang "static"-like), ``round-robin`` (replica
    = token index mod replica count, an even deterministic split).
    """

    rep_expert: np.ndarray
    rep_gpu: np.ndarray
    num_experts: int
    num_gpus: int
    selection: str = "random"
    seed: int = 0

    def __post_init__(self):
        if self.selection not in SELECTION_RULES:
            raise unknown_name("replica-selection rule", self.selection, SELECTION_RULES)
        if len(self.rep_expert) != len(self.rep_gpu):
            raise CommError("placement: rep_expert and rep_gpu differ in length")
        if len(self.rep_gpu) and (self.rep_gpu.min() < 0 or self.rep_gpu.max() >= self.num_gpus):
            raise CommError(f"placement: a replica sits on a GPU outside 0..{self.num_gpus - 1}")
        present = np.bincount(self.rep_expert, minlength=self.num_experts)
        missing = np.flatnonzero(present[: self.num_experts] == 0)
        if len(missing):
            raise CommError(f"placement: expert {int(missing[0])} has no replica on any GPU")
        order = np.argsort(self.rep_expert, kind="stable")
        start = np.concatenate([[0], np.cumsum(present)])
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_start", start)
        # first replica's GPU per expert: the whole answer for single-replica experts
        object.__setattr__(self, "_primary", self.rep_gpu[order[start[:-1]]].astype(np.int32))
        object.__setattr__(self, "_multi", present[: self.num_experts] > 1)
        # replica table [E, W] (row e: GPUs of e's replicas in slot order, padded with the
        # first) so that choosing a replica is one gather per (token, expert) pair
        count = present[: self.num_experts].astype(np.int64)
        width = int(count.max(initial=1))
        j = np.minimum(np.arange(width)[None, :], count[:, None] - 1)
        table = self.rep_gpu[order[start[: self.num_experts, None] + j]].astype(np.int32)
        object.__setattr__(self, "_table", table.ravel())
        object.__setattr__(self, "_width", width)
        object.__setattr__(self, "_count", count)
        object.__setattr__(self, "_nearest", {})  # gpus_per_node -> [G, E] chosen GPU

    # ----- constructors --------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, num_gpus: int, **kw) -> Placement:
        """Megatron/DeepEP layout: expert e on GPU e // (E / G); E must divide evenly."""
        if num_gpus < 1 or num_experts % num_gpus:
            raise CommError(
                f"{num_experts} experts are not divisible by EP {num_gpus}; "
                f"use a multiple of {num_gpus} experts or pass a placement"
            )
        e = np.arange(num_experts)
        return cls(e, e // (num_experts // num_gpus), num_experts, num_gpus, **kw)

    @classmethod
    def from_expert_gpu(cls, expert_gpu, num_gpus: int | None = None, **kw) -> Placement:
        """One replica per expert: ``expert_gpu[e]`` = GPU of expert e."""
        g = np.asarray(expert_gpu, dtype=np.int64)
        n = int(num_gpus if num_gpus is not None else g.max() + 1)
        return cls(np.arange(len(g)), g, len(g), n, **kw)

    @classmethod
    def from_slots(cls, phy2log, num_gpus: int, num_experts: int | None = None, **kw):
        """EPLB/SGLang ``physical_to_logical_map`` of one layer: slots GPU-major, equal per GPU."""
        p = np.asarray(phy2log, dtype=np.int64)
        if num_gpus < 1 or len(p) % num_gpus:
            raise CommError(f"{len(p)} physical slots do not split evenly over {num_gpus} GPUs")
        gpu = np.arange(len(p)) // (len(p) // num_gpus)
        keep = p >= 0
        e = int(num_experts if num_experts is not None else p.max() + 1)
        return cls(p[keep], gpu[keep], e, num_gpus, **kw)

    @classmethod
    def from_json(cls, path, num_gpus: int, layer: int = 0, **kw) -> Placement:
        """Read a plan: ``physical_to_logical_map`` ([L][R] or [R]) or ``expert_gpu`` ([E])."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CommError(f"{path}: no such placement file") from None
        except json.JSONDecodeError as exc:
            raise CommError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        for key in ("physical_to_logical_map", "phy2log"):
            if key in data:
                rows = data[key]
                row = rows[layer] if rows and isinstance(rows[0], list) else rows
                return cls.from_slots(row, num_gpus, data.get("num_experts"), **kw)
        for key in ("expert_gpu", "expert_to_gpu"):
            if key in data:
                rows = data[key]
                row = rows[layer] if rows and isinstance(rows[0], list) else rows
                return cls.from_expert_gpu(row, num_gpus, **kw)
        raise CommError(f"{path}: expected 'physical_to_logical_map' or 'expert_gpu'")

    # ----- queries --------------------------------------------------------------------------
    @property
    def replica_counts(self) -> np.ndarray:
        return np.diff(self._start)

    def gpu_share(self) -> np.ndarray:
        """[E, G] fraction of an expert's traffic each GPU receives under uniform replica choice."""
        w = np.zeros((self.num_experts, self.num_gpus))
        np.add.at(w, (self.rep_expert, self.rep_gpu), 1.0)
        return w / w.sum(axis=1, keepdims=True)

    def choose(self, src_gpu: np.ndarray, experts: np.ndarray, gpus_per_node: int,
               token_index: np.ndarray | None = None) -> np.ndarray:
        """GPU (int32) serving each (token, expert) pair; arrays of equal shape, experts >= 0."""
        if not self._multi.any():
            return self._primary[experts]  # one replica per expert: a gather
        if self.selection == "nearest":  # depends on (source GPU, expert) only: a table
            near = self._nearest.get(gpus_per_node)
            if near is None:
                near = self._nearest_table(gpus_per_node)
                self._nearest[gpus_per_node] = near
            return near.ravel()[np.asarray(src_gpu, dtype=np.intp) * self.num_experts
                                + experts]
        if self.selection == "random":
            # one 32-bit draw r per pair; replica floor(r x count / 2^32) (multiply-shift,
            # bias below count / 2^32)
            rng = np.random.default_rng(self.seed)
            r = rng.integers(0, 2**32, size=np.shape(experts), dtype=np.uint32)
            pick = (r.astype(np.int64) * self._count[experts]) >> 32
        else:  # round-robin: replica = token index mod replica count
            idx = (np.broadcast_to(token_index, np.shape(experts)) if token_index is not None
                   else np.arange(np.size(experts)).reshape(np.shape(experts)))
            pick = idx % self._count[experts]
        return self._table[experts * self._width + pick]

    def _nearest_table(self, gpus_per_node: int) -> np.ndarray:
        """[G, E]: the replica each source GPU uses: same GPU, else same node, else the first
        replica in slot order (ties: first in slot order)."""
        g = np.arange(self.num_gpus)[:, None, None]
        cand = self._table.reshape(self.num_experts, self._width)[None, :, :]  # [1, E, W]
        dist = np.where(cand == g, 0, np.where(cand // gpus_per_node == g // gpus_per_node,
                                                1, 2))
        dist = np.where(np.arange(self._width) < self._count[:, None], dist, 3)
        pick = dist.argmin(axis=2)  # [G, E]
        return np.take_along_axis(np.broadcast_to(cand, dist.shape), pick[..., None],
                                  axis=2)[..., 0].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Count matrices
# ---------------------------------------------------------------------------------------------
@dataclass
class CommCounts:
    """X, Y, Z of one layer (float arrays: exact integers from tokens, expectations from counts)."""

    Z: np.ndarray  # [G, G]
    X: np.ndarray  # [G, G]
    Y: np.ndarray  # [G, M]
    tokens: np.ndarray  # [G] tokens per source GPU
    gpus_per_node: int
    exact: bool = True

    @property
    def num_gpus(self) -> int:
        return self.Z.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.Y.shape[1]

    def expert_load(self) -> np.ndarray:
        """(token, expert) pairs each GPU's experts receive: the grouped-GEMM input sizes."""
        return self.Z.sum(axis=0)

    def summary(self) -> dict:
        g, n = self.gpus_per_node, self.num_gpus
        node = np.arange(n) // g
        cross_node = sum(self.Y[s, m] for s in range(n) for m in range(self.num_nodes)
                         if m != node[s])
        tok = max(self.tokens.sum(), 1)
        return {
            "pairs": float(self.Z.sum()),
            "cross_gpu_tokens": float(self.X.sum() - np.trace(self.X)),
            "cross_node_tokens": float(cross_node),
            "gpus_per_token": float(self.X.sum() / tok),
            "nodes_per_token": float(self.Y.sum() / tok),
            "max_over_mean_gpu_load": float(self.expert_load().max()
                                            / max(self.expert_load().mean(), 1e-12)),
        }


def _check_cluster(cluster: Cluster, placement: Placement) -> None:
    if placement.num_gpus != cluster.num_gpus:
        raise CommError(
            f"placement spans {placement.num_gpus} GPUs but the cluster has {cluster.num_gpus}"
        )


def counts_from_tokens(src_gpu, expert_ids, placement: Placement, cluster: Cluster,
                       token_index=None) -> CommCounts:
    """Exact X, Y, Z from token-level routing. ``expert_ids`` < 0 mark dropped slots."""
    _check_cluster(cluster, placement)
    src = np.asarray(src_gpu, dtype=np.int64)
    ids = np.asarray(expert_ids)
    if ids.ndim != 2 or len(ids) != len(src):
        raise CommError(f"expert_ids must be [N, K] with N = len(src_gpu) = {len(src)}")
    g, n = cluster.gpus_per_node, cluster.num_gpus
    if len(src) and (src.min() < 0 or src.max() >= n):
        raise CommError(f"a token's source GPU is outside 0..{n - 1}")
    if ids.size and ids.max() >= placement.num_experts:
        raise CommError(
            f"expert id {int(ids.max())} >= {placement.num_experts} experts in the placement"
        )
    src32 = src.astype(np.int32)
    ids = ids.astype(np.intp, copy=False)
    src2 = np.broadcast_to(src32[:, None], ids.shape)
    if token_index is None:
        token_index = np.arange(len(src), dtype=np.int64)
    tok2 = np.broadcast_to(np.asarray(token_index)[:, None], ids.shape)
    if ids.size and ids.min() < 0:  # dropped slots go to a virtual GPU n
        valid = ids >= 0
        dst = np.where(valid, placement.choose(src2, np.where(valid, ids, 0), g, tok2),
                       np.int32(n))
    else:
        dst = placement.choose(src2, ids, g, tok2)

    # one bincount over (src, dst, first-on-this-GPU, first-on-this-node): Z sums all four
    # flag states, X keeps GPU-firsts, Y keeps node-firsts summed over the node's GPUs.
    # Dropped slots sit on the virtual GPU n (node m = n / g) and are cut off. The work runs
    # on a small-integer [K, N] transpose, where each slot's column is contiguous.
    m = cluster.num_nodes
    small = np.int8 if n < 127 else np.int16 if n < 32767 else np.int32
    dT = np.ascontiguousarray(dst.T, dtype=small)
    new_gpu = _first_in_column(dT)
    new_node = _first_in_column(dT // small(g))
    key = dT.astype(np.int32)
    key *= np.int32(4)
    key += src32 * np.int32(4 * (n + 1))
    key += new_gpu.view(np.int8) * np.int8(2)
    key += new_node.view(np.int8)
    full = np.bincount(key.ravel(), minlength=n * (n + 1) * 4).reshape(n, n + 1, 2, 2)[:, :n]
    Z = full.sum(axis=(2, 3))
    X = full[:, :, 1, :].sum(axis=2)
    Y = full[:, :, :, 1].sum(axis=2).reshape(n, m, g).sum(axis=2)
    Z, X, Y = Z.astype(float), X.astype(float), Y.astype(float)
    tokens = np.bincount(src, minlength=n).astype(float)
    return CommCounts(Z, X, Y, tokens, g, exact=True)


def _first_in_column(values: np.ndarray) -> np.ndarray:
    """bool [K, N]: True where no earlier entry of the column (same token) has the value."""
    k = values.shape[0]
    if k > 16:  # sorting wins over K^2 comparisons
        order = np.argsort(values, axis=0, kind="stable")
        sv = np.take_along_axis(values, order, axis=0)
        first = np.ones(sv.shape, dtype=bool)
        first[1:] = sv[1:] != sv[:-1]
        out = np.empty_like(first)
        np.put_along_axis(out, order, first, axis=0)
        return out
    v = np.ascontiguousarray(values)
    out = np.ones(v.shape, dtype=bool)
    differs = np.empty(v.shape[1:], dtype=bool)
    for j in range(1, k):
        np.not_equal(v[j], v[0], out=out[j])
        for i in range(1, j):
            np.not_equal(v[j], v[i], out=differs)
            out[j] &= differs
    return out


def counts_from_aggregate(expert_counts, tokens_per_gpu, placement: Placement,
                          cluster: Cluster, X=None, Y=None) -> CommCounts:
    """X, Y, Z from ``expert_counts[s, e]`` (tokens of GPU s choosing expert e).

    Z is exact in expectation. X and Y, which need per-token data, are estimated by treating
    each token's k distinct experts as k draws without replacement: with q = the share of s's
    (token, expert) pairs served by d and E' the experts s uses,
    P(token misses d) = prod_{j<k} (1 - q / (1 - j / E')). This is exact for uniformly random
    k-subsets (1 - C(E - E_d, k) / C(E, k), reference note B.1) and an approximation under
    skew or correlated choices. Pass measured X / Y (distinct-destination counts) to override.
    """
    _check_cluster(cluster, placement)
    c = np.asarray(expert_counts, dtype=float)
    t = np.asarray(tokens_per_gpu, dtype=float)
    n, g, m = cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes
    if c.shape != (n, placement.num_experts):
        raise CommError(f"expert_counts must be [{n}, {placement.num_experts}], got {c.shape}")
    if t.shape != (n,):
        raise CommError(f"tokens_per_gpu must have {n} entries")
    w = _share_by_source(placement, g)  # [G_src, E, G]
    Z = np.einsum("se,sed->sd", c, w)
    pairs = c.sum(axis=1)
    k = np.rint(np.divide(pairs, t, out=np.zeros_like(t), where=t > 0)).astype(int)
    used = np.maximum((c > 0).sum(axis=1), 1).astype(float)
    share = np.divide(Z, pairs[:, None], out=np.zeros_like(Z), where=pairs[:, None] > 0)
    if X is None:
        X = t[:, None] * _hit_probability(share, k, used)
    if Y is None:
        Y = t[:, None] * _hit_probability(share.reshape(n, m, g).sum(axis=2), k, used)
    return CommCounts(Z, np.asarray(X, float), np.asarray(Y, float), t, g, exact=False)


def _hit_probability(share: np.ndarray, k: np.ndarray, used: np.ndarray) -> np.ndarray:
    """P(a token hits a destination) from its share of the pairs, k draws without replacement."""
    miss = np.ones_like(share)
    for j in range(int(k.max(initial=0))):
        active = (j < k)[:, None]
        step = np.clip(1.0 - share / np.maximum(1.0 - j / used, 1e-12)[:, None], 0.0, 1.0)
        miss = np.where(active, miss * step, miss)
    return 1.0 - miss


def _share_by_source(placement: Placement, gpus_per_node: int) -> np.ndarray:
    """[G_src, E, G_dst] fraction of source s's traffic for expert e that GPU d serves."""
    n, e = placement.num_gpus, placement.num_experts
    base = placement.gpu_share()
    w = np.broadcast_to(base, (n, e, n)).copy()
    if placement.selection != "nearest":
        return w
    for s in range(n):  # one replica per (s, e): same GPU, else same node, else first
        choice = placement.choose(np.full(e, s), np.arange(e), gpus_per_node)
        w[s] = 0.0
        w[s, np.arange(e), choice] = 1.0
    return w


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class CommResult:
    """One layer's dispatch + combine under one dispatcher. Bytes are physical unless noted."""

    dispatcher: str
    dispatch_s: float
    combine_s: float
    send_bytes: np.ndarray  # [G] dispatch bytes each GPU puts on a link (NVLink + NIC)
    recv_bytes: np.ndarray  # [G]
    link_bytes: dict[str, np.ndarray]  # dispatch bytes per link: "nvl_out"/"nvl_in" [G], "nic_*"
    bottleneck: str  # the link term that set the dispatch time
    logical_bytes: float  # benchmark-style bytes per rank (mean), see docs
    combine_scale: float  # combine row bytes / dispatch row bytes
    terms: dict[str, float] = field(default_factory=dict)  # seconds of each link term

    @property
    def dispatch_logical_gbps(self) -> float:
        return self.logical_bytes / self.dispatch_s / 1e9 if self.dispatch_s > 0 else 0.0

    @property
    def combine_logical_gbps(self) -> float:
        b = self.logical_bytes * self.combine_scale
        return b / self.combine_s / 1e9 if self.combine_s > 0 else 0.0

    def combine_link_bytes(self) -> dict[str, np.ndarray]:
        """Combine reverses every path: out <-> in, rows at the combine size."""
        swap = {"out": "in", "in": "out"}
        res = {}
        for key, v in self.link_bytes.items():
            stem, _, d = key.rpartition("_")
            res[f"{stem}_{swap.get(d, d)}"] = v * self.combine_scale
        return res

    def to_dict(self) -> dict:
        return {
            "dispatcher": self.dispatcher,
            "dispatch_s": self.dispatch_s,
            "combine_s": self.combine_s,
            "dispatch_logical_gbps": self.dispatch_logical_gbps,
            "combine_logical_gbps": self.combine_logical_gbps,
            "bottleneck": self.bottleneck,
            "max_send_bytes": float(self.send_bytes.max()),
            "max_recv_bytes": float(self.recv_bytes.max()),
            "link_bytes_max": {k: float(v.max()) for k, v in self.link_bytes.items()},
            "terms_s": self.terms,
        }


def _nic_index(cluster: Cluster) -> np.ndarray:
    """NIC (global index) each GPU uses: GPUs of a node share its NICs evenly, by local index."""
    g, k = cluster.gpus_per_node, max(cluster.nics_per_node, 1)
    ranks = np.arange(cluster.num_gpus)
    local = ranks % g
    per_gpu = max(k // g, 1)
    nic_local = local * per_gpu if k >= g else local * k // g
    return (ranks // g) * k + nic_local


def _per_nic(cluster: Cluster, per_gpu_bytes: np.ndarray) -> np.ndarray:
    idx = _nic_index(cluster)
    return np.bincount(idx, weights=per_gpu_bytes,
                       minlength=cluster.num_nodes * max(cluster.nics_per_node, 1))


def _slowest(terms: dict[str, tuple[np.ndarray, float]]) -> tuple[float, str, dict]:
    """max over terms of max(bytes)/rate; the winning term names the bottleneck."""
    best, name, secs = 0.0, "none", {}
    for key, (byts, rate) in terms.items():
        if byts.size == 0:
            continue
        i = int(byts.argmax())
        t = float(byts[i]) / rate
        secs[key] = t
        if t > best:
            best, name = t, f"{key} (GPU/NIC {i})"
    return best, name, secs


# ---------------------------------------------------------------------------------------------
# Dispatchers
# ---------------------------------------------------------------------------------------------
class Dispatcher:
    """A dispatch/combine mechanism: which count it moves, over which links, at what cost."""

    name = ""
    help = ""

    def run(self, counts: CommCounts, cluster: Cluster, dispatch_row: int,
            combine_row: int) -> CommResult:
        raise NotImplementedError


class FlatAllToAll(Dispatcher):
    """NCCL all-to-all / Megatron ``alltoall``: one row per (token, expert) pair (Z).

    Intra-node peers over NVLink, others through the sender's and receiver's NICs (one NIC's
    rate: NCCL cannot aggregate NICs for all-to-all). Fixed cost: latency + per-peer term.
    """

    name = "flat"
    help = "NCCL/Megatron all-to-all of (token, expert) rows"

    def _alpha(self, cluster: Cluster) -> float:
        return pair_fixed_cost(self.name, cluster)

    def run(self, counts, cluster, dispatch_row, combine_row):
        # one formula with the all-layers form: pair_layer_result / pair_comm_layers
        return pair_layer_result(self.name, counts, cluster, dispatch_row, combine_row)


class DeepEPLowLatency(FlatAllToAll):
    """DeepEP low-latency kernels, pure RDMA: every (token, expert) message through the NIC.

    Intra-node peers and the rank itself included (the published "pure RDMA" setting). Fixed
    cost ll_alpha + ll_alpha_log2 * log2(P), rate ``ll_rdma_bw`` (default: ``rdma_bw``).
    """

    name = "deepep-ll"
    help = "DeepEP low-latency: per (token, expert) RDMA messages"

    # run: FlatAllToAll.run, which costs the pairs through pair_link_bytes("deepep-ll", ...)

    def rank_times(self, counts: CommCounts, cluster: Cluster, dispatch_row: int,
                   combine_row: int) -> tuple[np.ndarray, np.ndarray]:
        """([G] dispatch, [G] combine) seconds of each rank's own kernel.

        The messages are written into pre-allocated receive slots with no back-pressure, so a
        rank's kernel ends when its NIC has sent its messages, its NIC has received the
        messages for it, and every rank that sends to it has finished sending (a sender spreads
        its messages over its whole send phase). In dispatch the senders are the token owners
        (equal volumes) and only hot receivers run long; in combine the senders are the expert
        ranks, so every rank waits for the most loaded one. The maximum over ranks equals
        ``run``'s ``dispatch_s`` / ``combine_s``; DeepEP's benchmark prints these per-rank
        kernel times.
        """
        rate = cluster.comm.ll_rdma_bw or cluster.rdma_bw()
        nic = _nic_index(cluster)
        alpha = pair_fixed_cost(self.name, cluster)
        pairs = counts.Z

        def per_rank(Z: np.ndarray, row: int) -> np.ndarray:
            send = per_nic(cluster, Z.sum(1) * row)[nic] / rate
            recv = per_nic(cluster, Z.sum(0) * row)[nic] / rate
            wait = np.where(Z > 0, send[:, None], 0.0).max(axis=0)  # slowest sender to me
            return alpha + np.maximum(np.maximum(send, recv), wait)

        return per_rank(pairs, dispatch_row), per_rank(pairs.T, combine_row)


class DeepEPNormal(Dispatcher):
    """DeepEP normal kernels: node-deduplicated RDMA + NVLink forwarding (X, Y).

    One node: each token crosses NVLink once per destination GPU (X). Several nodes: a token
    is sent once per destination node to the GPU with the sender's local index there (the
    same rail), which forwards it over NVLink once per destination GPU in its node; the
    token's own node is reached the same way through the sender's own RDMA buffer, so the
    RDMA stage handles one row per (token, destination node) pair, own node included — the
    accounting DeepEP reports as "RDMA bandwidth". NIC bytes count only other nodes.
    Time = normal_overhead + max(RDMA-stage rows / rdma_bw, NVLink bytes / nvl_bw).
    """

    name = "deepep-normal"
    help = "DeepEP normal: per-node dedup over RDMA, NVLink forwarding"
    # False: the RDMA stage handles only rows for other nodes (physical NIC bytes, the plain
    # reading of formula 2 in the reference notes); kept to compare in the calibration.
    own_node_in_rdma_stage = True

    def run(self, counts, cluster, dispatch_row, combine_row):
        n, g, m = cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes
        b = dispatch_row
        scale = combine_row / dispatch_row
        alpha = cluster.comm.normal_overhead
        X, Y = counts.X, counts.Y
        node = np.arange(n) // g
        local = np.arange(n) % g
        if m == 1:
            off = X * b * (1 - np.eye(n))
            links = {"nvl_out": off.sum(1), "nvl_in": off.sum(0)}
            t, name, secs = _slowest({k: (v, cluster.nvl_bw()) for k, v in links.items()})
            logical = float((X.sum(0) * b).mean())  # tokens received incl. own, per rank
            return CommResult(self.name, alpha + t, alpha + t * scale, off.sum(1), off.sum(0),
                              links, name, logical, scale, secs)
        # RDMA stage: rows per (token, node); the receiving forwarder is (m, local(s))
        remote = node[:, None] != np.arange(m)[None, :]
        fwd = np.arange(m)[None, :] * g + local[:, None]  # [G, M] forwarder GPU
        nic_out = (Y * remote).sum(1) * b
        nic_in = np.bincount(fwd.ravel(), weights=(Y * remote * b).ravel(), minlength=n)
        if self.own_node_in_rdma_stage:
            stage_out = Y.sum(1) * b
            stage_in = np.bincount(fwd.ravel(), weights=(Y * b).ravel(), minlength=n)
        else:
            stage_out, stage_in = nic_out, nic_in
        # NVLink stage: (token, GPU d) pairs travel forwarder f = (node(d), local(s)) -> d
        f = node[None, :] * g + local[:, None]  # [G_src, G_dst]
        hop = f != np.arange(n)[None, :]
        xb = X * b * hop
        nvl_out = np.bincount(f.ravel(), weights=xb.ravel(), minlength=n)
        nvl_in = xb.sum(0)
        links = {"rdma_stage_out": stage_out, "rdma_stage_in": stage_in,
                 "nic_out": _per_nic(cluster, nic_out), "nic_in": _per_nic(cluster, nic_in),
                 "nvl_out": nvl_out, "nvl_in": nvl_in}
        rdma, nvl = cluster.rdma_bw(), cluster.nvl_bw()
        terms = {"rdma_stage_out": (stage_out, rdma), "rdma_stage_in": (stage_in, rdma),
                 "nvl_out": (nvl_out, nvl), "nvl_in": (nvl_in, nvl)}
        t, name, secs = _slowest(terms)
        logical = float((Y.sum(1) * b).mean())  # (token, node) rows incl. own node, per rank
        return CommResult(self.name, alpha + t, alpha + t * scale, nic_out + nvl_out,
                          nic_in + nvl_in, links, name, logical, scale, secs)


class AllGatherDispatch(Dispatcher):
    """Megatron ``allgather``: every rank gathers all tokens, combine = reduce-scatter.

    Placement-independent; a ring moves (P - 1) x T x b bytes per rank (T = largest batch).
    """

    name = "allgather"
    help = "all-gather tokens to every rank; combine by reduce-scatter"

    def run(self, counts, cluster, dispatch_row, combine_row):
        n = cluster.num_gpus
        t_rank = float(counts.tokens.max())
        total = t_rank * n
        d = allgather_time(cluster, total * dispatch_row, n)
        c = reduce_scatter_time(cluster, total * combine_row, n)
        per = np.full(n, (n - 1) * t_rank * dispatch_row)
        links = {"ring_out": per, "ring_in": per}
        link = "nvlink" if cluster.num_nodes == 1 else "nic"
        return CommResult(self.name, d, c, per, per, links, f"ring over {link}",
                          total * dispatch_row, combine_row / dispatch_row,
                          {"ring": d})


class HierarchicalAllToAll(Dispatcher):
    """Tutel-style two-phase (2DH) all-to-all on (token, expert) rows (Z).

    Phase 1 (NVLink): each GPU regroups its rows by destination local index j and sends them
    to local GPU j. Phase 2 (NIC): GPU (n, j) sends to (m, j) everything its node has for
    (m, j). Peers drop from P - 1 to (G - 1) + (N - 1); phases run one after the other.
    """

    name = "hierarchical"
    help = "Tutel 2DH: intra-node regroup, then inter-node among same-index GPUs"

    def run(self, counts, cluster, dispatch_row, combine_row):
        n, g, m = cluster.num_gpus, cluster.gpus_per_node, cluster.num_nodes
        C = counts.Z * dispatch_row
        node, local = np.arange(n) // g, np.arange(n) % g
        # phase 1: s -> (node(s), local(d)) carries C[s, d] for every d
        hop1 = np.zeros((n, n))
        mid = node[:, None] * g + local[None, :]
        np.add.at(hop1, (np.repeat(np.arange(n), n), mid.ravel()), C.ravel())
        np.fill_diagonal(hop1, 0.0)
        # phase 2: (node(s), local(d)) -> d across nodes
        hop2 = np.zeros((n, n))
        np.add.at(hop2, (mid.ravel(), np.tile(np.arange(n), n)), C.ravel())
        hop2 = np.where(node[:, None] != node[None, :], hop2, 0.0)
        nvl = cluster.nvl_bw()
        t1, n1, s1 = _slowest({"p1_nvl_out": (hop1.sum(1), nvl), "p1_nvl_in": (hop1.sum(0), nvl)})
        lat_nvl = cluster.nvlink.latency + cluster.comm.per_peer * (g - 1)
        links = {"nvl_out": hop1.sum(1), "nvl_in": hop1.sum(0)}
        t2, n2, s2 = 0.0, "", {}
        lat_nic = 0.0
        if m > 1:
            rdma = cluster.rdma_bw()
            links["nic_out"] = _per_nic(cluster, hop2.sum(1))
            links["nic_in"] = _per_nic(cluster, hop2.sum(0))
            t2, n2, s2 = _slowest({"p2_nic_out": (links["nic_out"], rdma),
                                   "p2_nic_in": (links["nic_in"], rdma)})
            lat_nic = cluster.nic.latency + cluster.comm.per_peer * (m - 1)
        scale = combine_row / dispatch_row
        fixed = lat_nvl + lat_nic
        name = n1 if t1 >= t2 else n2
        return CommResult(self.name, fixed + t1 + t2, fixed + (t1 + t2) * scale,
                          hop1.sum(1) + hop2.sum(1), hop1.sum(0) + hop2.sum(0), links, name,
                          float(C.sum(1).mean()), scale, {**s1, **s2})


DISPATCHERS: dict[str, Dispatcher] = {
    d.name: d for d in (FlatAllToAll(), DeepEPNormal(), DeepEPLowLatency(), AllGatherDispatch(),
                        HierarchicalAllToAll())
}


def get_dispatcher(name: str) -> Dispatcher:
    if name not in DISPATCHERS:
        raise unknown_name("dispatcher", name, DISPATCHERS)
    return DISPATCHERS[name]


def register_dispatcher(dispatcher: Dispatcher) -> None:
    """Plug in another mechanism under its ``name``."""
    DISPATCHERS[dispatcher.name] = dispatcher


# ---------------------------------------------------------------------------------------------
# Benchmark routings
# ---------------------------------------------------------------------------------------------
def deepep_test_routing(num_ranks: int, tokens_per_rank: int, num_experts: int, top_k: int = 8,
                        gpus_per_node: int = 8, node_limited: bool = True, max_nodes: int = 4,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The routing of DeepEP's tests: scores |N(0,1)| + 1 per (token, expert), i.i.d.

    ``node_limited`` (internode normal kernels): expert groups = nodes, a node's score is the
    max over its experts, keep the top min(nodes, ``max_nodes``) nodes, then top-k experts
    among them. Otherwise plain top-k (intranode and low-latency tests). Each rank draws from
    its own stream (seed, rank). Returns (src_gpu [N], expert_ids [N, K]).
    """
    if num_experts % num_ranks:
        raise CommError(f"{num_experts} experts are not divisible by EP {num_ranks}")
    nodes = max(num_ranks // gpus_per_node, 1)
    ids = np.empty((num_ranks * tokens_per_rank, top_k), dtype=np.int64)
    for rank in range(num_ranks):
        rng = np.random.default_rng([seed, rank])
        scores = np.abs(rng.standard_normal((tokens_per_rank, num_experts), dtype=np.float32)) + 1
        if node_limited and nodes > 1:
            keep = min(nodes, max_nodes)
            per_node = scores.reshape(tokens_per_rank, nodes, -1)
            node_score = per_node.max(axis=2)
            drop = np.argpartition(-node_score, keep - 1, axis=1)[:, keep:]
            np.put_along_axis(per_node, drop[:, :, None], 0.0, axis=1)
            scores = per_node.reshape(tokens_per_rank, num_experts)
        top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
        ids[rank * tokens_per_rank:(rank + 1) * tokens_per_rank] = top
    src = np.repeat(np.arange(num_ranks), tokens_per_rank)
    return src, ids


def uniform_routing(num_ranks: int, tokens_per_rank: int, num_experts: int, top_k: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each token picks ``top_k`` distinct experts uniformly at random (seeded)."""
    if top_k > num_experts:
        raise CommError(f"top-k {top_k} exceeds {num_experts} experts")
    rng = np.random.default_rng(seed)
    n = num_ranks * tokens_per_rank
    ids = np.empty((n, top_k), dtype=np.int64)
    step = max(1, 2**24 // num_experts)
    for lo in range(0, n, step):  # bounded memory: a chunk of random keys at a time
        keys = rng.random((min(step, n - lo), num_experts), dtype=np.float32)
        ids[lo:lo + len(keys)] = np.argpartition(keys, top_k - 1, axis=1)[:, :top_k]
    return np.repeat(np.arange(num_ranks), tokens_per_rank), ids


# ---------------------------------------------------------------------------------------------
# One call for the simulator and the planners
# ---------------------------------------------------------------------------------------------
def wire_rows(dispatcher: str, hidden: int, dispatch_dtype: str = "bf16",
              combine_dtype: str = "bf16") -> tuple[int, int]:
    """(dispatch, combine) row bytes; low-latency FP8 rows carry DeepEP's 16-byte header."""
    header = LL_FP8_HEADER if dispatcher == "deepep-ll" and dispatch_dtype == "fp8" else 0
    return row_bytes(hidden, dispatch_dtype, header), row_bytes(hidden, combine_dtype)


def layer_comm(cluster: Cluster, *, hidden: int, dispatcher: str = "flat",
               placement: Placement | None = None, src_gpu=None, expert_ids=None,
               expert_counts=None, tokens_per_gpu=None, num_experts: int | None = None,
               dispatch_dtype: str = "bf16", combine_dtype: str = "bf16",
               counts: CommCounts | None = None) -> CommResult:
    """Dispatch + combine of one MoE layer step.

    Give token-level routing (``src_gpu`` [N], ``expert_ids`` [N, K]) or aggregated
    ``expert_counts`` [G, E] with ``tokens_per_gpu`` [G], or precomputed ``counts``. Without a
    placement, experts are laid out contiguously (``num_experts`` must divide by the GPUs).
    """
    model = get_dispatcher(dispatcher)
    if counts is None:
        if placement is None:
            if num_experts is None:
                if expert_counts is not None:
                    num_experts = np.asarray(expert_counts).shape[1]
                elif expert_ids is not None:
                    num_experts = int(np.asarray(expert_ids).max()) + 1
            placement = Placement.contiguous(int(num_experts), cluster.num_gpus)
        if expert_ids is not None:
            counts = counts_from_tokens(src_gpu, expert_ids, placement, cluster)
        elif expert_counts is not None:
            if tokens_per_gpu is None:
                raise CommError("aggregated expert_counts need tokens_per_gpu")
            counts = counts_from_aggregate(expert_counts, tokens_per_gpu, placement, cluster)
        else:
            raise CommError("give token-level routing, aggregated expert counts, or counts")
    drow, crow = wire_rows(dispatcher, hidden, dispatch_dtype, combine_dtype)
    return model.run(counts, cluster, drow, crow)


# ---------------------------------------------------------------------------------------------
# Collectives for tensor parallelism (ring algorithms, nccl-tests conventions)
# ---------------------------------------------------------------------------------------------
def _ring(cluster: Cluster, group: int) -> tuple[float, float]:
    """(bus bandwidth, per-step latency) of a ring over ``group`` consecutive ranks."""
    if group <= cluster.gpus_per_node:
        return cluster.nvl_bw(), cluster.nvlink.latency
    nic = cluster.rdma_bw() * max(cluster.nics_per_gpu, 1e-9)
    return min(cluster.nvl_bw(), nic), cluster.nic.latency


def allreduce_time(cluster: Cluster, nbytes: float, group: int) -> float:
    """Ring all-reduce of ``nbytes`` per rank: 2(n-1)/n x S / busbw + 2(n-1) latencies."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _ring(cluster, group)
    return 2 * (group - 1) / group * nbytes / bw + 2 * (group - 1) * lat


def allgather_time(cluster: Cluster, total_bytes: float, group: int) -> float:
    """Ring all-gather producing ``total_bytes`` on every rank: (n-1)/n x S / busbw."""
    if group <= 1 or total_bytes <= 0:
        return 0.0
    bw, lat = _ring(cluster, group)
    return (group - 1) / group * total_bytes / bw + (group - 1) * lat


def reduce_scatter_time(cluster: Cluster, total_bytes: float, group: int) -> float:
    """Ring reduce-scatter of a ``total_bytes`` input per rank (same cost as all-gather)."""
    return allgather_time(cluster, total_bytes, group)


def alltoall_uniform_time(cluster: Cluster, nbytes_per_rank: float) -> float:
    """Flat all-to-all where each rank sends S/P to every rank (itself included): nccl-tests."""
    n = cluster.num_gpus
    per_pair = nbytes_per_rank / n
    Z = np.full((n, n), per_pair)
    counts = CommCounts(Z, Z.copy(), np.zeros((n, cluster.num_nodes)), np.ones(n),
                        cluster.gpus_per_node)
    return FlatAllToAll().run(counts, cluster, 1, 1).dispatch_s


# ---------------------------------------------------------------------------------------------
# Pair dispatchers (flat, deepep-ll): one formula for one layer and for many layers at once
# ---------------------------------------------------------------------------------------------
PAIR_DISPATCHERS = ("flat", "deepep-ll")
# path of a (token, expert) pair, the last axis of the path arrays below
SAME_GPU, SAME_NODE, OTHER_NODE = 0, 1, 2


def pair_paths(Z: np.ndarray, gpus_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) ``[G, 3]``: pairs each GPU sends and receives, by path (same GPU, same node,
    other node), from one layer's ``Z``. What the pair dispatchers need of Z."""
    n = Z.shape[0]
    node = np.arange(n) // gpus_per_node
    same = node[:, None] == node[None, :]
    diag = np.diag(Z)
    node_out = np.where(same, Z, 0.0).sum(1)
    node_in = np.where(same, Z, 0.0).sum(0)
    out = np.stack([diag, node_out - diag, Z.sum(1) - node_out], axis=-1)
    into = np.stack([diag, node_in - diag, Z.sum(0) - node_in], axis=-1)
    return out, into


def per_nic(cluster: Cluster, per_gpu: np.ndarray) -> np.ndarray:
    """Sum ``per_gpu[..., G]`` onto the NICs the GPUs use (``[..., NICs]``)."""
    idx = _nic_index(cluster)
    n_nics = cluster.num_nodes * max(cluster.nics_per_node, 1)
    if n_nics == cluster.num_gpus and (idx == np.arange(n_nics)).all():
        return per_gpu  # one NIC per GPU, in GPU order
    onehot = np.zeros((cluster.num_gpus, n_nics))
    onehot[np.arange(cluster.num_gpus), idx] = 1.0
    return per_gpu @ onehot


def pair_fixed_cost(dispatcher: str, cluster: Cluster) -> float:
    """Fixed seconds of one dispatch (or combine) of a pair dispatcher."""
    c = cluster.comm
    if dispatcher == "deepep-ll":  # fitted a + c log2 P; the NIC latency when not calibrated
        if not c.ll_alpha and not c.ll_alpha_log2 and cluster.nic is not None:
            return cluster.nic.latency
        return max(c.ll_alpha + c.ll_alpha_log2 * math.log2(max(cluster.num_gpus, 1)), 0.0)
    lat = c.a2a_latency if c.a2a_latency is not None else (
        cluster.nic.latency if cluster.num_nodes > 1 else cluster.nvlink.latency)
    return lat + c.per_peer * (cluster.num_gpus - 1)


def pair_link_bytes(dispatcher: str, cluster: Cluster, out_paths: np.ndarray,
                    in_paths: np.ndarray, dispatch_row: float):
    """Dispatch bytes on every link of a pair dispatcher, and the link rates.

    ``out_paths`` / ``in_paths`` ``[..., G, 3]``: pairs sent / received by path (``pair_paths``;
    any leading axes, e.g. layers). ``flat``: same-node pairs over NVLink, other-node pairs
    through the sender's and the receiver's NIC, a GPU's own pairs stay local.
    ``deepep-ll`` (pure RDMA): every pair, a GPU's own included, through its NIC. Returns
    (links {name: bytes [..., G or NICs]}, rates {name: bytes/s}, sent [..., G], received
    [..., G]).
    """
    b = float(dispatch_row)
    if dispatcher == "deepep-ll":
        send = out_paths.sum(-1) * b
        recv = in_paths.sum(-1) * b
        rate = cluster.comm.ll_rdma_bw or cluster.rdma_bw()
        links = {"nic_out": per_nic(cluster, send), "nic_in": per_nic(cluster, recv)}
        return links, {"nic_out": rate, "nic_in": rate}, send, recv
    if dispatcher != "flat":
        raise unknown_name("pair dispatcher", dispatcher, PAIR_DISPATCHERS)
    links = {"nvl_out": out_paths[..., SAME_NODE] * b, "nvl_in": in_paths[..., SAME_NODE] * b}
    rates = {"nvl_out": cluster.nvl_bw(), "nvl_in": cluster.nvl_bw()}
    if cluster.num_nodes > 1:
        links["nic_out"] = per_nic(cluster, out_paths[..., OTHER_NODE] * b)
        links["nic_in"] = per_nic(cluster, in_paths[..., OTHER_NODE] * b)
        rates.update(nic_out=cluster.rdma_bw(), nic_in=cluster.rdma_bw())
    send = (out_paths[..., SAME_NODE] + out_paths[..., OTHER_NODE]) * b
    recv = (in_paths[..., SAME_NODE] + in_paths[..., OTHER_NODE]) * b
    return links, rates, send, recv


def pair_layer_result(dispatcher: str, counts: CommCounts, cluster: Cluster,
                      dispatch_row: int, combine_row: int) -> CommResult:
    """One layer of a pair dispatcher (what FlatAllToAll / DeepEPLowLatency.run return)."""
    out, into = pair_paths(counts.Z, cluster.gpus_per_node)
    links, rates, send, recv = pair_link_bytes(dispatcher, cluster, out, into, dispatch_row)
    t, name, secs = _slowest({k: (v, rates[k]) for k, v in links.items()})
    alpha = pair_fixed_cost(dispatcher, cluster)
    scale = combine_row / dispatch_row
    logical = float(counts.Z.sum(1).mean()) * dispatch_row  # (token, expert) rows sent per rank
    return CommResult(dispatcher, alpha + t, alpha + t * scale, send, recv, links, name, logical,
                      scale, secs)


@dataclass
class LayersComm:
    """Dispatch and combine of many layers (one entry per layer)."""

    dispatch_s: np.ndarray
    combine_s: np.ndarray
    sent_bytes: np.ndarray  # dispatch bytes put on links, all GPUs
    recv_bytes: np.ndarray
    bottleneck: list[str]  # the link term that set each layer's dispatch time


LL_TERMS = ("nic_out", "nic_in", "none")  # ll_comm_layers' bottleneck codes 0, 1, -1


def ll_comm_layers(cluster: Cluster, send_pairs: np.ndarray, recv_pairs: np.ndarray,
                   dispatch_row: int, combine_row: int):
    """``pair_comm_layers("deepep-ll", ...)`` from what its time depends on: the pairs each GPU
    sends and receives ``[..., G]`` (every pair goes through the NIC, so the path split does
    not matter). Same arithmetic, without building ``[..., G, 3]`` path arrays or the list of
    names: returns (dispatch_s, combine_s, sent_bytes, recv_bytes, bottleneck code into
    ``LL_TERMS``, -1 for none). The leading shapes of the two inputs need only broadcast
    (rows the same for every layer are passed once, with a length-1 axis)."""
    b = float(dispatch_row)
    send = send_pairs * b
    recv = recv_pairs * b
    rate = cluster.comm.ll_rdma_bw or cluster.rdma_bw()
    secs = np.stack(np.broadcast_arrays(per_nic(cluster, send).max(axis=-1) / rate,
                                        per_nic(cluster, recv).max(axis=-1) / rate), axis=-1)
    t = secs.max(axis=-1)
    which = np.where(t > 0, secs.argmax(axis=-1), -1)
    alpha = pair_fixed_cost("deepep-ll", cluster)
    scale = combine_row / dispatch_row
    sent, received = np.broadcast_arrays(send.sum(-1), recv.sum(-1))
    return alpha + t, alpha + t * scale, sent, received, which


def pair_comm_layers(dispatcher: str, cluster: Cluster, out_paths: np.ndarray,
                     in_paths: np.ndarray, dispatch_row: int, combine_row: int) -> LayersComm:
    """``flat`` / ``deepep-ll`` for all layers at once from ``[L, G, 3]`` path counts.

    The same link bytes, rates and fixed cost as the per-layer dispatchers
    (``pair_link_bytes``, ``pair_fixed_cost``); the time is fixed cost + the busiest link.
    """
    links, rates, send, recv = pair_link_bytes(dispatcher, cluster, out_paths, in_paths,
                                               dispatch_row)
    names = list(links)
    secs = np.stack([links[k].max(axis=-1) / rates[k] for k in names], axis=-1)  # [L, terms]
    t = secs.max(axis=-1)
    which = secs.argmax(axis=-1)
    bottleneck = [names[i] if t_l > 0 else "none" for i, t_l in zip(which.tolist(), t.tolist(),
                                                                  strict=True)]
    alpha = pair_fixed_cost(dispatcher, cluster)
    scale = combine_row / dispatch_row
    return LayersComm(alpha + t, alpha + t * scale, send.sum(-1), recv.sum(-1), bottleneck)
