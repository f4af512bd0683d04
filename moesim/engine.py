"""The SimPy wiring: a serving loop that forms a batch, costs one forward step, and advances.

Build -> run -> collect. ``build(scenario)`` resolves the scenario into a ``Simulation``
(model, cluster, placement, routing source, scheduler, costs); ``Simulation.run()`` drives a
SimPy environment with one process, the serving loop, that sleeps until the next arrival when
idle and otherwise yields one timeout per forward step; ``Results`` collects the records.

One event per step, not per token or per layer: a step's batch is fixed when it starts (new
arrivals join the next step), so its layer-by-layer schedule is a deterministic function of
the batch. It is computed with numpy over all layers and GPUs at once:

- every attention group (``tp`` GPUs) runs attention, the router and the shared experts on its
  own tokens (data-parallel attention) — the GPU compute stream;
- the MoE layer dispatches every token's selected experts through the communication model
  (``moesim.comm``: NVLink and NIC terms from the actual count matrices of the batch),
- every GPU runs its local experts on the tokens it received (grouped GEMM, roofline), and
  the slowest GPU gates the layer; then the combine returns the rows.

Dispatch and combine are barriers (all-to-all), so each stage of a layer ends when its slowest
GPU or busiest link finishes. With ``overlap: two-microbatch`` the batch is split in two halves
that alternate between the compute stream and the communication stream (DeepSeek-style): per
layer the slots are max(attention A, combine B of the previous layer), max(dispatch A,
attention B), max(experts A, dispatch B), max(combine A, experts B).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from moesim.errors import MoesimError
from moesim.model import BYTES_PER_PARAM, MoEModel, get_model
from moesim.scenario import Scenario, ScenarioError
from moesim.serving import Batch, Scheduler
from moesim.workload import build_workload

GB = 1e9


# ---------------------------------------------------------------------------------------------
# Resolved configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """GPUs, attention groups and the expert placement (slots GPU-major, as in moesim plans)."""

    num_gpus: int
    gpus_per_node: int
    tp: int
    phy2log: np.ndarray  # [L, R] logical expert of each physical slot (-1 empty)

    @property
    def num_groups(self) -> int:
        return self.num_gpus // self.tp

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.num_gpus

    @property
    def slot_gpu(self) -> np.ndarray:
        return np.arange(self.phy2log.shape[1]) // self.slots_per_gpu

    def replica_counts(self, num_experts: int) -> np.ndarray:
        L = self.phy2log.shape[0]
        out = np.zeros((L, num_experts), dtype=np.int64)
        for layer in range(L):
            ids = self.phy2log[layer]
            out[layer] = np.bincount(ids[ids >= 0], minlength=num_experts)
        return out


def contiguous_slots(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    """Expert e on GPU floor(e * P / E), padded with empty slots when E does not divide."""
    per = math.ceil(num_experts / num_gpus)
    phy = np.full((num_layers, num_gpus * per), -1, dtype=np.int64)
    gpu = np.arange(num_experts) * num_gpus // num_experts
    pos = np.arange(num_experts) - np.searchsorted(gpu, gpu)
    phy[:, gpu * per + pos] = np.arange(num_experts)
    return phy


def round_robin_slots(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    per = math.ceil(num_experts / num_gpus)
    phy = np.full((num_layers, num_gpus * per), -1, dtype=np.int64)
    e = np.arange(num_experts)
    phy[:, (e % num_gpus) * per + e // num_gpus] = e
    return phy


# ---------------------------------------------------------------------------------------------
# Compute costs (roofline per GPU)
# ---------------------------------------------------------------------------------------------
class ComputeCosts:
    """Roofline times of the step's compute on one GPU: max(FLOPs / rate, bytes / bandwidth)
    plus a launch overhead per kernel, with the device's achievable fractions of peak."""

    def __init__(self, model: MoEModel, device, tp: int):
        self.model = model
        self.tp = tp
        eff_c, eff_m = device.compute_efficiency, device.memory_efficiency
        self.flops_dense = device.peak_flops(model.dense_dtype) * eff_c
        self.flops_expert = device.peak_flops(model.expert_dtype) * eff_c
        self.mem_bw = device.memory.read_bw * eff_m
        self.launch = device.kernel_overhead
        self.tile = device.gemm_tile_m
        m = model
        dense_b = BYTES_PER_PARAM[m.dense_dtype]
        self.attn_weight_bytes = m.attention_params() * dense_b / tp
        self.attn_linear_flops = 2.0 * m.attention_params() / tp  # per token
        if m.attention == "mla":  # absorbed MLA: scores and values against the latent
            pair = 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
        else:
            pair = 4 * m.num_heads * m.head_dim
        self.attn_pair_flops = pair / tp  # per (query, key) pair
        kv_heads_split = tp if m.attention != "mla" and m.num_kv_heads >= tp else 1
        self.kv_bytes_per_token_layer = m.kv_bytes_per_token() / m.num_layers / kv_heads_split
        self.dense_ffn_flops = 2.0 * m.dense_ffn_params() / tp
        self.dense_ffn_bytes = m.dense_ffn_params() * dense_b / tp
        self.shared_flops = 2.0 * (m.shared_expert_params() + m.router_params()) / tp
        self.shared_bytes = (m.shared_expert_params() + m.router_params()) * dense_b / tp
        self.expert_flops = float(m.expert_flops_per_token())
        self.expert_bytes = float(m.expert_bytes())
        self.lm_head_flops = 2.0 * m.vocab * m.hidden / tp
        self.lm_head_bytes = m.vocab * m.hidden * dense_b / tp

    def _roof(self, flops, nbytes, rate):
        return np.maximum(flops / rate, nbytes / self.mem_bw)

    def attention(self, tokens, pairs, kv_tokens):
        """Per group: QKV/output projections, attention over the cache, one layer."""
        busy = tokens > 0
        t = self._roof(tokens * self.attn_linear_flops + pairs * self.attn_pair_flops,
                       self.attn_weight_bytes + kv_tokens * self.kv_bytes_per_token_layer,
                       self.flops_dense)
        return np.where(busy, t + 4 * self.launch, 0.0)

    def dense_ffn(self, tokens):
        t = self._roof(tokens * self.dense_ffn_flops, self.dense_ffn_bytes, self.flops_dense)
        return np.where(tokens > 0, t + 3 * self.launch, 0.0)

    def shared_and_router(self, tokens):
        t = self._roof(tokens * self.shared_flops, self.shared_bytes, self.flops_dense)
        return np.where(tokens > 0, t + 4 * self.launch, 0.0)

    def experts(self, slot_load: np.ndarray, slots_per_gpu: int, active=None):
        """Grouped GEMM per GPU: ``slot_load[..., R]`` (token, expert) pairs per physical slot.

        Rows are padded to the GEMM tile per expert; each active expert's weights are read once.
        ``active`` (probability that a slot receives any token) replaces ``slot_load > 0`` for
        expected, fractional loads.
        """
        if active is None:
            active = (slot_load > 0).astype(float)
        padded = np.where(slot_load >= self.tile, np.ceil(slot_load / self.tile) * self.tile,
                          active * self.tile)
        shape = slot_load.shape[:-1] + (-1, slots_per_gpu)
        flops = padded.reshape(shape).sum(-1) * self.expert_flops
        active = active.reshape(shape).sum(-1)
        t = self._roof(flops, active * self.expert_bytes, self.flops_expert)
        return np.where(active > 0, t + 3 * self.launch, 0.0)

    def lm_head(self, tokens):
        t = self._roof(tokens * self.lm_head_flops, self.lm_head_bytes, self.flops_dense)
        return np.where(tokens > 0, t + self.launch, 0.0)


# ---------------------------------------------------------------------------------------------
# Routing -> per-layer counts
# ---------------------------------------------------------------------------------------------
@dataclass
class StepRouting:
    """What the MoE layers of one step move: per layer, slot loads and the comm results."""

    slot_load: np.ndarray  # [L, R] (token, expert) pairs per physical slot
    dispatch_s: np.ndarray  # [L]
    combine_s: np.ndarray  # [L]
    sent_bytes: np.ndarray  # [L] dispatch bytes put on links, all GPUs
    recv_bytes: np.ndarray  # [L]
    gpu_load: np.ndarray  # [L, G] pairs per GPU
    bottleneck: list = field(default_factory=list)
    active: np.ndarray | None = None  # [L, R] P(slot receives a token), for expected loads


class Router:
    """Turns a step's tokens into per-layer loads and dispatch/combine times (moesim.comm).

    Dispatchers that move one row per (token, expert) pair (``flat``, ``deepep-ll``) need only
    per-GPU byte totals split by path (self, same node, other node); those are computed for all
    layers at once with numpy and costed by ``batched_pair_comm``, which follows
    ``moesim.comm``'s FlatAllToAll / DeepEPLowLatency term by term (tests/test_engine.py checks
    it against them). Other dispatchers (per-GPU/per-node dedup, all-gather, hierarchical) get
    the layer's count matrices and run ``moesim.comm`` layer by layer.
    """

    PAIR_DISPATCHERS = ("flat", "deepep-ll")

    def __init__(self, model: MoEModel, layout: Layout, cluster, routing, dispatcher: str,
                 hidden: int):
        from moesim import comm

        self.comm = comm
        self.model = model
        self.layout = layout
        self.cluster = cluster
        self.routing = routing
        self.dispatcher = comm.get_dispatcher(dispatcher)
        dtype = "fp8" if model.expert_dtype == "fp8" else "bf16"
        self.rows = comm.wire_rows(self.dispatcher.name, hidden, dtype, "bf16")
        L, E = model.moe_layers, model.num_experts
        self.L, self.E = L, E
        self.G = layout.num_gpus
        self.R = layout.phy2log.shape[1]
        self.S = layout.slots_per_gpu
        self.gpn = cluster.gpus_per_node
        self.node = np.arange(self.G) // self.gpn
        self.fast = self.dispatcher.name in self.PAIR_DISPATCHERS
        reps = layout.replica_counts(E)
        self.single = bool((reps == 1).all())
        # per-layer placement in moesim.comm's form (replicas split round-robin over tokens)
        self.placements = [
            comm.Placement.from_slots(layout.phy2log[li], self.G, E, selection="round-robin")
            for li in range(L)
        ]
        # slot of (layer, expert, GPU): the first such slot when a GPU holds two replicas
        table = np.full((L, E, self.G), -1, dtype=np.int64)
        lay, slot = np.nonzero(layout.phy2log >= 0)
        table[lay[::-1], layout.phy2log[lay, slot][::-1], slot[::-1] // self.S] = slot[::-1]
        self.slot_table = table
        # replicas of each (layer, expert) in slot order: [L, E, max replicas]
        self.rep_count = reps
        self.rep_slots = np.zeros((L, E, max(int(reps.max()), 1)), dtype=np.int64)
        fill = np.zeros((L, E), dtype=np.int64)
        for lay_i, slot_i in zip(lay, slot, strict=True):
            e_i = layout.phy2log[lay_i, slot_i]
            self.rep_slots[lay_i, e_i, fill[lay_i, e_i]] = slot_i
            fill[lay_i, e_i] += 1
        if self.single:
            first = np.zeros((L, E), dtype=np.int64)
            first[lay, layout.phy2log[lay, slot]] = slot
            # flat slot id (layer * R + slot) of each (layer, expert), indexed by layer * E + e
            self.flat_slot = (np.arange(L)[:, None] * self.R + first).ravel().astype(np.int32)
        if routing.kind == "counts":
            phy = np.maximum(layout.phy2log, 0)
            per_slot = np.where(layout.phy2log >= 0, np.take_along_axis(routing.share, phy, 1), 0.0)
            self.slot_share = per_slot / np.maximum(np.take_along_axis(reps, phy, 1), 1)
            self.gpu_share = self.slot_share.reshape(L, self.G, self.S).sum(-1)
            self.node_share = self.gpu_share.reshape(L, -1, self.gpn).sum(-1)[:, self.node]
        self._cache: dict = {}
        self.cache_hits = 0
        self.cache_misses = 0

    # ----- token-level (trace replay) ---------------------------------------------------------
    def _destinations(self, experts: np.ndarray, src: np.ndarray):
        """Flat slot ids ``layer * R + slot`` of every (token, layer, k); invalid -> L * R."""
        L, R, E = self.L, self.R, self.E
        valid = experts >= 0
        if self.single:
            idx = experts.astype(np.int32)
            idx += (np.arange(L, dtype=np.int32) * E)[None, :, None]
            flat = self.flat_slot[idx]
        else:  # replicas: token i uses replica i mod count (moesim.comm's "round-robin" rule)
            n = len(src)
            e = np.where(valid, experts, 0).astype(np.int64)
            lay = np.arange(L)[None, :, None]
            rep = np.arange(n)[:, None, None] % self.rep_count[lay, e]
            flat = lay * R + self.rep_slots[lay, e, rep]
        if not valid.all():
            flat = np.where(valid, flat, L * R)
        return flat, valid

    def route_tokens(self, experts: np.ndarray, src: np.ndarray, share: float = 1.0) -> StepRouting:
        """``experts[n, L, K]`` (trace rows of the step's tokens), ``src[n]`` source GPU."""
        L, G, R = self.L, self.G, self.R
        flat, valid = self._destinations(experts, src)
        if not self.fast:
            slot_load = np.bincount(flat.ravel(), minlength=L * R + 1)[: L * R].reshape(L, R)
            out = self._empty(slot_load * share)
            tokens = np.bincount(src, minlength=G).astype(float)
            for li in range(L):
                ids = np.where(valid[:, li], experts[:, li], -1)
                counts = self.comm.counts_from_tokens(src, ids, self.placements[li], self.cluster,
                                                      token_index=np.arange(len(src)))
                if share != 1.0:
                    counts = self._scaled(counts, share)
                self._store(out, li, self.dispatcher.run(counts, self.cluster, *self.rows))
            del tokens
            return out
        # path class of each pair: 0 same GPU, 1 same node, 2 other node; histogram the pairs
        # by (destination slot, class) and by (source GPU, class) in two passes
        dst = (flat % R) // self.S
        src_b = src.astype(np.int32)[:, None, None]
        cls = (dst != src_b).astype(np.int32)
        cls += (dst // self.gpn) != (src_b // self.gpn)
        if not valid.all():
            cls[~valid] = 0
        key = flat * 3 + cls
        hist = np.bincount(key.ravel(), minlength=(L * R + 1) * 3)[: L * R * 3].reshape(L, R, 3)
        slot_load = hist.sum(-1)
        in_cls = hist.reshape(L, G, self.S, 3).sum(2).astype(float)  # [L, G, 3]
        skey = (np.arange(L, dtype=np.int32)[None, :, None] * G + src_b) * 3 + cls
        if not valid.all():
            skey[~valid] = L * G * 3
        out_cls = np.bincount(skey.ravel(), minlength=L * G * 3 + 1)[: L * G * 3]
        out_cls = out_cls.reshape(L, G, 3).astype(float)
        out = self._empty(slot_load * share)
        self._pair_comm(out, out_cls * share, in_cls * share)
        return out

    # ----- expected (aggregate counts) ------------------------------------------------------------
    def route_expected(self, tokens_per_gpu: np.ndarray, share: float = 1.0) -> StepRouting:
        """Each token selects K experts with the layer's shares, in expectation."""
        t = tokens_per_gpu.astype(float) * share
        K = self.model.top_k
        out = self._empty(t.sum() * K * self.slot_share)
        # a slot is idle only if none of the step's tokens picks it (independent tokens)
        pick = np.minimum(K * self.slot_share, 1.0)
        out.active = -np.expm1(t.sum() * np.log1p(-np.minimum(pick, 1 - 1e-12)))
        out.active[pick >= 1.0] = 1.0
        key = t.tobytes()
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            out.dispatch_s, out.combine_s, out.sent_bytes, out.recv_bytes, out.bottleneck = cached
            return out
        self.cache_misses += 1
        if self.fast:
            T = t.sum()
            t_node = np.bincount(self.node, weights=t)[self.node]
            own = self.gpu_share * K
            out_cls = np.stack([t * own, t * (self.node_share * K - own),
                                t * K * (1 - self.node_share)], axis=-1)
            in_cls = np.stack([t * own, own * (t_node - t), own * (T - t_node)], axis=-1)
            self._pair_comm(out, out_cls, in_cls)
        else:
            for li in range(self.L):
                counts = self.comm.counts_from_aggregate(
                    np.outer(t, K * self.routing.share[li]), t, self.placements[li], self.cluster)
                self._store(out, li, self.dispatcher.run(counts, self.cluster, *self.rows))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (out.dispatch_s, out.combine_s, out.sent_bytes, out.recv_bytes,
                            out.bottleneck)
        return out

    # ----- helpers ------------------------------------------------------------------------------
    def _pair_comm(self, out: StepRouting, out_cls: np.ndarray, in_cls: np.ndarray) -> None:
        res = batched_pair_comm(self.dispatcher.name, self.cluster, out_cls, in_cls, *self.rows)
        out.dispatch_s, out.combine_s, out.sent_bytes, out.recv_bytes, out.bottleneck = res

    def _empty(self, slot_load: np.ndarray) -> StepRouting:
        L = self.L
        gpu_load = slot_load.reshape(L, self.G, -1).sum(-1)
        return StepRouting(slot_load, np.zeros(L), np.zeros(L), np.zeros(L), np.zeros(L),
                           gpu_load, [""] * L)

    def _scaled(self, counts, share: float):
        return self.comm.CommCounts(counts.Z * share, counts.X * share, counts.Y * share,
                                    counts.tokens * share, counts.gpus_per_node, exact=False)

    @staticmethod
    def _store(out: StepRouting, li: int, res) -> None:
        out.dispatch_s[li] = res.dispatch_s
        out.combine_s[li] = res.combine_s
        out.sent_bytes[li] = float(res.send_bytes.sum())
        out.recv_bytes[li] = float(res.recv_bytes.sum())
        out.bottleneck[li] = res.bottleneck.split(" (")[0]


def batched_pair_comm(name: str, cluster, out_cls: np.ndarray, in_cls: np.ndarray,
                      dispatch_row: int, combine_row: int):
    """Dispatch/combine seconds of ``flat`` or ``deepep-ll`` for all layers at once.

    ``out_cls[L, G, 3]`` / ``in_cls[L, G, 3]``: (token, expert) pairs each GPU sends / receives
    by path (same GPU, same node, other node). Mirrors moesim.comm's FlatAllToAll and
    DeepEPLowLatency: fixed cost + the busiest link term (max bytes / rate). Returns
    (dispatch_s [L], combine_s [L], sent bytes [L], received bytes [L], bottleneck names).
    """
    from moesim import comm

    n, nodes = cluster.num_gpus, cluster.num_nodes
    b = float(dispatch_row)
    scale = combine_row / dispatch_row
    nic = comm._nic_index(cluster)
    n_nics = nodes * max(cluster.nics_per_node, 1)
    if n_nics == n and (nic == np.arange(n)).all():
        def to_nic_sum(x):  # one NIC per GPU: the per-NIC bytes are the per-GPU bytes
            return x
    else:
        to_nic = np.zeros((n, n_nics))
        to_nic[np.arange(n), nic] = 1.0

        def to_nic_sum(x):
            return x @ to_nic
    if name == "deepep-ll":  # pure RDMA: every pair, the GPU's own included, through the NIC
        send = out_cls.sum(-1) * b
        recv = in_cls.sum(-1) * b
        terms = {"nic_out": to_nic_sum(send), "nic_in": to_nic_sum(recv)}
        rate = cluster.comm.ll_rdma_bw or cluster.rdma_bw()
        rates = {"nic_out": rate, "nic_in": rate}
        c = cluster.comm
        alpha = max(c.ll_alpha + c.ll_alpha_log2 * math.log2(max(n, 1)), 0.0)
        if not c.ll_alpha and not c.ll_alpha_log2 and cluster.nic is not None:
            alpha = cluster.nic.latency
    else:  # flat: same node over NVLink, other nodes through the NICs, self is local
        send = (out_cls[..., 1] + out_cls[..., 2]) * b
        recv = (in_cls[..., 1] + in_cls[..., 2]) * b
        terms = {"nvl_out": out_cls[..., 1] * b, "nvl_in": in_cls[..., 1] * b}
        rates = {"nvl_out": cluster.nvl_bw(), "nvl_in": cluster.nvl_bw()}
        if nodes > 1:
            terms["nic_out"] = to_nic_sum(out_cls[..., 2] * b)
            terms["nic_in"] = to_nic_sum(in_cls[..., 2] * b)
            rates.update(nic_out=cluster.rdma_bw(), nic_in=cluster.rdma_bw())
        c = cluster.comm
        lat = c.a2a_latency if c.a2a_latency is not None else (
            cluster.nic.latency if nodes > 1 else cluster.nvlink.latency)
        alpha = lat + c.per_peer * (n - 1)
    names = list(terms)
    secs = np.stack([terms[k].max(axis=-1) / rates[k] for k in names], axis=-1)  # [L, terms]
    t = secs.max(axis=-1)
    which = secs.argmax(axis=-1)
    bottleneck = [names[i] if t_l > 0 else "none" for i, t_l in zip(which, t, strict=True)]
    return alpha + t, alpha + t * scale, send.sum(-1), recv.sum(-1), bottleneck


# ---------------------------------------------------------------------------------------------
# The layer schedule of one step
# ---------------------------------------------------------------------------------------------
def layer_schedule(attn: np.ndarray, dispatch: np.ndarray, experts: np.ndarray,
                   combine: np.ndarray, overlap: bool) -> tuple[np.ndarray, float]:
    """Start offsets of each MoE layer ``[L + 1]`` (last = end) from its stage times.

    Without overlap a layer takes attention + dispatch + experts + combine. With two micro-
    batches (each stage time given per micro-batch) a layer takes four slots (module docstring)
    and the last combine drains after the final layer.
    """
    if not overlap:
        per_layer = attn + dispatch + experts + combine
        return np.r_[0.0, np.cumsum(per_layer)], 0.0
    prev_combine = np.r_[0.0, combine[:-1]]
    per_layer = (np.maximum(attn, prev_combine) + np.maximum(dispatch, attn)
                 + np.maximum(experts, dispatch) + np.maximum(combine, experts))
    return np.r_[0.0, np.cumsum(per_layer)], float(combine[-1]) if len(combine) else 0.0


# ---------------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------------
class Simulation:
    """A built scenario, ready to run once."""

    def __init__(self, scenario: Scenario, model: MoEModel, cluster, layout: Layout, routing,
                 workload, scheduler: Scheduler, costs: ComputeCosts, router: Router,
                 kv_capacity: int, memory: dict):
        self.scenario = scenario
        self.model = model
        self.cluster = cluster
        self.layout = layout
        self.routing = routing
        self.workload = workload
        self.scheduler = scheduler
        self.costs = costs
        self.router = router
        self.kv_capacity = kv_capacity
        self.memory = memory
        self.overlap = scenario.execution.overlap == "two-microbatch"
        self.step_overhead = scenario.execution.step_overhead_s
        G = layout.num_gpus
        self.group_gpus = np.arange(G).reshape(layout.num_groups, layout.tp)
        self.record_gpu = scenario.simulation.record_gpu
        self.steps: list[dict] = []
        self.layers: dict[str, list] = {k: [] for k in (
            "attention_s", "dispatch_s", "experts_max_s", "experts_mean_s", "combine_s",
            "sent_bytes", "recv_bytes", "load_max", "load_mean", "start_s")}
        self.gpu_loads: list[np.ndarray] = []
        self.gpu_expert_s: list[np.ndarray] = []  # [L, G] grouped-GEMM seconds per step
        self.bottlenecks: list[list[str]] = []
        self.gpu_busy = np.zeros(G)
        self.gpu_comm = np.zeros(G)

    # ----- one forward step --------------------------------------------------------------------
    def _tokens(self, batch: Batch):
        """Request, sequence position and attention group of every token in the step."""
        s = self.scheduler
        pre_req = np.repeat(batch.pre_idx, batch.pre_len)
        offs = np.arange(len(pre_req)) - np.repeat(np.cumsum(batch.pre_len) - batch.pre_len,
                                                   batch.pre_len)
        pre_pos = np.repeat(batch.pre_start, batch.pre_len) + offs
        # a decode step feeds the last produced token: position prompt + generated - 1
        dec_pos = s.prompt[batch.dec_idx] + s.generated[batch.dec_idx] - 1
        dec_pos = np.maximum(dec_pos, s.prompt[batch.dec_idx] - 1)
        req = np.concatenate([batch.dec_idx, pre_req])
        pos = np.concatenate([dec_pos, pre_pos])
        return req, pos

    def step_cost(self, batch: Batch) -> tuple[float, dict]:
        s, lay, m, c = self.scheduler, self.layout, self.model, self.costs
        ng, tp = lay.num_groups, lay.tp
        g_dec = s.group[batch.dec_idx]
        g_pre = s.group[batch.pre_idx]
        n_dec = np.bincount(g_dec, minlength=ng)
        n_pre = np.bincount(g_pre, weights=batch.pre_len, minlength=ng)
        tokens = n_dec + n_pre
        # attention work: decode reads its whole context; a prefill chunk attends causally
        ctx_dec = s.prompt[batch.dec_idx] + s.generated[batch.dec_idx]
        kv_read = (np.bincount(g_dec, weights=ctx_dec, minlength=ng)
                   + np.bincount(g_pre, weights=batch.pre_start + batch.pre_len, minlength=ng))
        pairs_pre = batch.pre_len * (batch.pre_start + (batch.pre_len + 1) / 2.0)
        pairs = (np.bincount(g_dec, weights=ctx_dec, minlength=ng)
                 + np.bincount(g_pre, weights=pairs_pre, minlength=ng))
        mb = 2 if self.overlap else 1
        share = 1.0 / mb
        tp_ar = 0.0
        if tp > 1:  # attention output and FFN output are all-reduced inside the TP group
            from moesim.comm import allreduce_time

            tp_ar = allreduce_time(self.cluster, float(tokens.max() * share) * m.hidden * 2, tp)
        attn = c.attention(tokens * share, pairs * share, kv_read * share) + tp_ar
        attn_moe = attn + c.shared_and_router(tokens * share) + tp_ar
        # dense layers (DeepSeek's first_k_dense_replace) run without the micro-batch split
        dense_gpu = (c.attention(tokens, pairs, kv_read) + c.dense_ffn(tokens)
                     + 2 * (tp_ar * mb))
        dense = float(dense_gpu.max()) if m.first_dense_layers else 0.0
        # MoE layers: where each token goes
        req, pos = self._tokens(batch)
        grp = s.group[req]
        src = self.group_gpus[grp, np.arange(len(req)) % tp] if tp > 1 else grp
        if self.routing.kind == "counts":
            routed = self.router.route_expected(np.bincount(src, minlength=lay.num_gpus), share)
        else:
            rows = self.routing.rows(req, pos, s.prompt[req])
            routed = self.router.route_tokens(self.routing.experts[rows], src, share)
        expert_t = c.experts(routed.slot_load, lay.slots_per_gpu, routed.active)  # [L, G] per mb
        L = m.moe_layers
        attn_stage = np.full(L, attn_moe.max())
        starts, drain = layer_schedule(attn_stage, routed.dispatch_s, expert_t.max(axis=1),
                                       routed.combine_s, self.overlap)
        moe_time = starts[-1] + drain
        producers = len(batch.dec_idx) + len(batch.pre_idx)
        head = float(c.lm_head(np.array([producers / max(ng, 1)])).max())
        step = dense * m.first_dense_layers + moe_time + head + self.step_overhead
        # per-GPU busy time on the compute stream (utilisation)
        busy = (np.repeat(attn_moe * mb * L + dense_gpu * m.first_dense_layers, tp)
                + expert_t.sum(axis=0) * mb)
        self.gpu_busy += busy
        self.gpu_comm += (routed.dispatch_s.sum() + routed.combine_s.sum()) * mb
        info = {
            "routed": routed, "expert_t": expert_t, "attn_s": attn_stage * mb,
            "starts": starts + dense * m.first_dense_layers, "tokens_max": float(tokens.max()),
            "tokens_mean": float(tokens.mean()), "dense_s": dense * m.first_dense_layers,
            "moe_s": moe_time, "head_s": head, "mb": mb,
        }
        return step, info

    def _record(self, index: int, t0: float, dt: float, batch: Batch, info: dict) -> None:
        r = info["routed"]
        mb = info["mb"]
        self.steps.append({
            "step": index, "start_s": t0, "duration_s": dt,
            "decode_tokens": batch.num_decode, "prefill_tokens": batch.num_prefill,
            "running": int(len(self.scheduler.running)), "waiting": int(len(self.scheduler.waiting)),
            "tokens_max_group": info["tokens_max"], "tokens_mean_group": info["tokens_mean"],
            "dense_s": info["dense_s"], "moe_s": info["moe_s"], "lm_head_s": info["head_s"],
            "dispatch_s": float(r.dispatch_s.sum()) * mb, "combine_s": float(r.combine_s.sum()) * mb,
            "experts_s": float(info["expert_t"].max(axis=1).sum()) * mb,
            "sent_bytes": float(r.sent_bytes.sum()) * mb, "recv_bytes": float(r.recv_bytes.sum()) * mb,
            "pairs": float(r.slot_load.sum()) * mb,
        })
        lay = self.layers
        lay["attention_s"].append(info["attn_s"])
        lay["dispatch_s"].append(r.dispatch_s * mb)
        lay["combine_s"].append(r.combine_s * mb)
        lay["experts_max_s"].append(info["expert_t"].max(axis=1) * mb)
        lay["experts_mean_s"].append(info["expert_t"].mean(axis=1) * mb)
        lay["sent_bytes"].append(r.sent_bytes * mb)
        lay["recv_bytes"].append(r.recv_bytes * mb)
        lay["load_max"].append(r.gpu_load.max(axis=1) * mb)
        lay["load_mean"].append(r.gpu_load.mean(axis=1) * mb)
        lay["start_s"].append(t0 + info["starts"][:-1])
        self.bottlenecks.append(r.bottleneck)
        if self.record_gpu:
            self.gpu_loads.append((r.gpu_load * mb).astype(np.float32))
            self.gpu_expert_s.append(info["expert_t"] * mb)

    # ----- the SimPy process ---------------------------------------------------------------------
    def _serve(self, env, progress):
        s = self.scheduler
        limit_t = self.scenario.simulation.max_sim_time_s
        limit_n = self.scenario.simulation.max_steps
        index = 0
        while not s.all_done:
            s.arrive_until(env.now)
            batch = s.form_batch(env.now)
            if batch.empty():
                nxt = s.next_arrival_time()
                if nxt is None:
                    raise MoesimError("simulation stalled: requests wait but none can be scheduled")
                yield env.timeout(max(nxt - env.now, 0.0))
                continue
            dt, info = self.step_cost(batch)
            t0 = env.now
            yield env.timeout(dt)
            s.finish_step(batch, env.now)
            self._record(index, t0, dt, batch, info)
            index += 1
            if progress is not None:
                progress(s.num_done, env.now)
            if (limit_n and index >= limit_n) or (limit_t and env.now >= limit_t):
                self.stopped_early = True
                break

    def run(self, progress=None):
        """Run to completion (or the scenario's limits); return ``Results``."""
        import simpy

        from moesim.results import Results

        self.stopped_early = False
        env = simpy.Environment()
        wall0 = time.perf_counter()
        env.process(self._serve(env, progress))
        env.run()
        wall = time.perf_counter() - wall0
        return Results.from_simulation(self, simulated_s=env.now, wall_s=wall)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def resolve_cluster(spec, where: str = "cluster"):
    from moesim import hardware

    try:
        if isinstance(spec, str):
            return hardware.load_cluster(spec)
        return hardware.cluster_from_dict(spec, where=where)
    except MoesimError as exc:
        raise ScenarioError(f"cluster: {exc}") from None


def build_layout(scenario: Scenario, model: MoEModel, cluster, routing) -> Layout:
    par = scenario.parallelism
    G = cluster.num_gpus
    if G % par.tp:
        raise ScenarioError(f"parallelism.tp={par.tp} does not divide the {G} GPUs")
    if par.attention_dp is not None and par.attention_dp * par.tp != G:
        raise ScenarioError(
            f"parallelism: attention_dp x tp = {par.attention_dp} x {par.tp} must equal the {G} GPUs")
    if par.ep is not None and par.ep != G:
        raise ScenarioError(
            f"parallelism.ep={par.ep}: experts are spread over all {G} GPUs (set ep: {G}); "
            "expert-parallel groups smaller than the cluster are not modelled")
    L, E = model.moe_layers, model.num_experts
    pl = scenario.placement
    if pl.kind == "contiguous":
        phy = contiguous_slots(L, E, G)
    elif pl.kind == "round_robin":
        phy = round_robin_slots(L, E, G)
    elif pl.kind == "balanced":
        from moesim.planners.eplb import rebalance_experts

        load = expert_load(routing, model)
        replicas = E + pl.redundant_experts
        slots = math.ceil(replicas / G)
        groups = model.n_group if model.n_group > 1 else 1
        try:
            phy = rebalance_experts(load, replicas, groups, cluster.num_nodes, G,
                                    slots_per_gpu=slots)
        except MoesimError as exc:
            raise ScenarioError(f"placement: {exc}") from None
    else:
        from moesim.planners.plan import Plan

        plan = Plan.load(scenario.path(pl.file))
        if plan.num_gpus != G or plan.phy2log.shape[0] != L or plan.num_experts != E:
            raise ScenarioError(
                f"placement.file: plan is for {plan.num_gpus} GPUs, {plan.phy2log.shape[0]} layers, "
                f"{plan.num_experts} experts; the scenario has {G} GPUs, {L} MoE layers, {E} experts")
        phy = plan.phy2log
    return Layout(G, cluster.gpus_per_node, par.tp, np.asarray(phy, dtype=np.int64))


def expert_load(routing, model: MoEModel) -> np.ndarray:
    """[L, E] selections per expert in the routing source (what a balanced placement balances)."""
    if routing.kind == "counts":
        return routing.share * 1e6
    L, E = model.moe_layers, model.num_experts
    ex = routing.experts.astype(np.int64)
    flat = (np.arange(L)[None, :, None] * E + ex)[ex >= 0]
    return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E).astype(float)


def memory_budget(scenario: Scenario, model: MoEModel, cluster, layout: Layout) -> tuple[int, dict]:
    """KV-cache capacity (tokens) of one attention group after the weights each GPU holds."""
    mem = scenario.memory
    tp = layout.tp
    dense_b = BYTES_PER_PARAM[model.dense_dtype]
    m = model
    replicated = (m.num_layers * m.attention_params() + m.first_dense_layers * m.dense_ffn_params()
                  + m.moe_layers * (m.shared_expert_params() + m.router_params())
                  + 2 * m.vocab * m.hidden) * dense_b / tp
    slots = (layout.phy2log.reshape(layout.phy2log.shape[0], layout.num_gpus, -1) >= 0).sum(-1)
    experts = float(slots.sum(axis=0).max()) * m.expert_bytes()
    capacity = cluster.gpu.memory.capacity * mem.gpu_memory_fraction
    free = capacity - replicated - experts - mem.reserve_gb * GB
    kv_dtype = mem.kv_dtype
    if kv_dtype not in BYTES_PER_PARAM:
        raise ScenarioError(f"memory.kv_dtype {kv_dtype!r} is not one of {sorted(BYTES_PER_PARAM)}")
    kv_split = tp if m.attention != "mla" and m.num_kv_heads >= tp else 1
    kv_per_token = m.kv_bytes_per_token(kv_dtype) / kv_split
    info = {"gpu_capacity_gb": capacity / GB, "weights_gb_per_gpu": (replicated + experts) / GB,
            "kv_free_gb_per_gpu": free / GB, "kv_bytes_per_token_per_gpu": kv_per_token}
    if mem.kv_capacity_tokens is not None:
        return mem.kv_capacity_tokens, info
    if free <= 0:
        raise ScenarioError(
            f"model {m.name} does not fit: weights need {(replicated + experts) / GB:.1f} GB per GPU "
            f"of {capacity / GB:.1f} GB usable ({cluster.gpu.name}); add GPUs or raise tp")
    return int(free // kv_per_token), info


def build(scenario: Scenario, trace: str | None = None) -> Simulation:
    """Resolve a scenario into a runnable ``Simulation``."""
    from moesim.routing import build_routing

    try:
        model = get_model(scenario.model.preset, **scenario.model.overrides)
    except TypeError as exc:
        raise ScenarioError(f"model.overrides: {exc}") from None
    cluster = resolve_cluster(scenario.cluster)
    routing = build_routing(scenario.routing, model, scenario.base_dir, trace)
    layout = build_layout(scenario, model, cluster, routing)
    workload = build_workload(scenario.workload, scenario.base_dir)
    routing.bind(workload.prompt_tokens, workload.output_tokens)
    kv_capacity, memory = memory_budget(scenario, model, cluster, layout)
    sv = scenario.serving
    scheduler = Scheduler(workload, layout.num_groups, sv.max_tokens_per_step, sv.max_running,
                          kv_capacity, sv.chunked_prefill, sv.role)
    costs = ComputeCosts(model, cluster.gpu, layout.tp)
    try:
        router = Router(model, layout, cluster, routing, scenario.execution.dispatcher, model.hidden)
    except MoesimError as exc:
        raise ScenarioError(f"execution: {exc}") from None
    return Simulation(scenario, model, cluster, layout, routing, workload, scheduler, costs,
                      router, kv_capacity, memory)


def simulate(scenario: Scenario, trace: str | None = None, progress=None):
    """Build and run a scenario; return its ``Results``."""
    return build(scenario, trace).run(progress)
