"""The SimPy wiring: a serving loop that forms a batch, costs one forward step, and advances.

Build -> run -> collect. ``build(scenario)`` resolves the scenario into a ``Simulation``
(model, cluster, placement, routing source, scheduler, costs); ``Simulation.run()`` drives a
SimPy environment with one process, the serving loop, that sleeps until the next arrival when
idle and otherwise yields one timeout per forward step (``simulation.fast_forward: false``)
or per window of steps (the default); ``Results`` collects the records.

At most one event per step, not per token or per layer: a step's batch is fixed when it
starts (new arrivals join the next step), so its layer-by-layer schedule is a deterministic
function of the batch. It is computed with numpy over all layers and GPUs at once, and over
all steps of a window at once when fast-forwarding: the scheduler runs ahead for the window
with placeholder times, the window is costed in one call, then the times are filled in; a
window that an arrival (or the time limit) cuts is rolled back to a snapshot and rerun to the
cut (docs/simulator.md, "Speed"). Per step:

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
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from moesim.errors import MoesimError
from moesim.model import BYTES_PER_PARAM, MoEModel, get_model
from moesim.scenario import Scenario, ScenarioError
from moesim.serving import Batch, Scheduler
from moesim.workload import build_workload

GB = 1e9
IDLE_FLOOR = float(np.log1p(-(1.0 - 1e-15)))  # log P(idle) of a slot every step uses


# ---------------------------------------------------------------------------------------------
# Optional compiled kernel (numba): one pass over the tokens' precomputed slot ids
# ---------------------------------------------------------------------------------------------
def _slot_counter():
    """``count(row_slot[V*T, L*K], key[n], step[n], nb, out[W*nb])``: out[step*nb + slot] += 1
    for every slot id of every token (what gather + bincount give, without the [n, L, K] copy
    and bincount's extra passes), or None without numba (numpy then does it)."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=True, nogil=True)
    def count(row_slot, key, step, nb, out):  # pragma: no cover - compiled
        for t in range(key.shape[0]):
            base = step[t] * nb
            ids = row_slot[key[t]]
            for j in range(ids.shape[0]):
                out[base + ids[j]] += 1

    return count


SLOT_COUNTER = _slot_counter()
PARALLEL_MIN_TOKENS = 4096  # below this, one thread (thread hand-off costs more than it saves)
_POOL = None


def count_slots(row_slot, key, step, nb, out) -> None:
    """``SLOT_COUNTER`` over ``key``, split across the machine's cores: the compiled kernel
    releases the GIL, so each thread counts a slice of the tokens into its own array and the
    arrays are summed (exact: integer counts, any token order)."""
    global _POOL
    parts = min(os.cpu_count() or 1, 4)
    if parts < 2 or len(key) < PARALLEL_MIN_TOKENS:
        SLOT_COUNTER(row_slot, key, step, nb, out)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="moesim-count")
    cut = np.linspace(0, len(key), parts + 1).astype(np.intp)
    extra = [np.zeros_like(out) for _ in range(parts - 1)]
    jobs = [_POOL.submit(SLOT_COUNTER, row_slot, key[cut[i + 1]:cut[i + 2]],
                         step[cut[i + 1]:cut[i + 2]], nb, extra[i]) for i in range(parts - 1)]
    SLOT_COUNTER(row_slot, key[:cut[1]], step[:cut[1]], nb, out)
    for job, part in zip(jobs, extra, strict=True):
        job.result()
        out += part


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
# Compute costs (moesim.cost)
# ---------------------------------------------------------------------------------------------
def tp_slice(model: MoEModel, tp: int) -> MoEModel:
    """The part of each layer one GPU of a ``tp``-wide attention group computes: heads, KV heads
    (GQA), shared/dense FFN widths and the vocabulary split ``tp`` ways. MLA's latent KV cache
    and its down-projections stay whole on every rank; routed experts are not TP-split (EP)."""
    if tp == 1:
        return model
    return replace(
        model, num_heads=max(model.num_heads // tp, 1),
        num_kv_heads=max(model.num_kv_heads // tp, 1),
        shared_intermediate=(model.shared_intermediate or model.moe_intermediate) // tp,
        dense_intermediate=model.dense_intermediate // tp, vocab=model.vocab // tp)


@dataclass(frozen=True)
class ExpectedSlots:
    """A placement's slots under count routing (tokens routed in expectation), per token:
    ``kshare[L, R]`` rows a slot receives, ``log_idle[L, R]`` log P(a token picks it not),
    ``always[L, R]`` slots every token picks; and, per GPU (``S`` slots each, ``[L * G]``),
    the sums ``StepCosts.experts_expected`` needs: log P(no slot of the GPU picked) per token
    over its other slots, the never-idle slots' constant, and its rows per token."""

    kshare: np.ndarray
    log_idle: np.ndarray
    always: np.ndarray
    slots_per_gpu: int
    idle_per_token: np.ndarray
    idle_floor: np.ndarray
    rows_per_token: np.ndarray

    @classmethod
    def of(cls, kshare: np.ndarray, log_idle: np.ndarray, always: np.ndarray,
           slots_per_gpu: int) -> ExpectedSlots:
        S = slots_per_gpu
        ones = np.ones(S)
        return cls(kshare, log_idle, always, S,
                   np.where(always, 0.0, log_idle).reshape(-1, S) @ ones,
                   always.reshape(-1, S).sum(-1) * IDLE_FLOOR, kshare.reshape(-1, S) @ ones)

    def log_idle_at(self, totals: np.ndarray) -> np.ndarray:
        """``[n, L, R]`` log P(slot idle) in steps of ``totals`` tokens."""
        lg = np.asarray(totals, dtype=float)[:, None, None] * self.log_idle
        lg[:, self.always] = IDLE_FLOOR
        return lg

    def p_active(self, totals: np.ndarray) -> np.ndarray:
        """``[n, L, R]`` P(slot receives a row) in steps of ``totals`` tokens."""
        active = -np.expm1(np.asarray(totals, dtype=float)[:, None, None] * self.log_idle)
        active[:, self.always] = 1.0
        return active


class StepCosts:
    """A step's compute on each GPU, every operation through ``moesim.cost.CostModel``.

    Attention, router, shared experts, dense FFNs and the LM head are costed on the GPU's TP
    slice of the model (``tp_slice``); routed experts as one grouped GEMM per GPU over the
    (token, expert) rows of its slots. A measured table given to the cost model overrides the
    roofline wherever it covers an operation. Per-token-count results are memoised: a decode
    step's groups mostly share a few token counts.
    """

    def __init__(self, model: MoEModel, device, tp: int, table=None):
        from moesim.cost import CostModel

        self.model = model
        self.rank = tp_slice(model, tp)
        self.cm = CostModel(device, table)
        self._memo: dict[tuple[str, float], float] = {}
        self._roofline_terms = self.cm.expert_roofline_terms(model)
        self._expert_table: dict[int, np.ndarray] = {}

    def _per_count(self, what: str, fn, tokens: np.ndarray) -> np.ndarray:
        lo, hi = tokens.min(), tokens.max()
        if lo == hi:  # every group runs the same number of tokens (steady decode)
            return np.full(len(tokens), self._per_count(what, fn, tokens[:1])[0]) \
                if len(tokens) > 1 else self._one(what, fn, float(lo))
        uniq, inverse = np.unique(tokens, return_inverse=True)
        vals = np.empty(len(uniq))
        for i, t in enumerate(uniq.tolist()):
            vals[i] = self._one(what, fn, t)[0]
        return vals[inverse]

    def _one(self, what: str, fn, t: float) -> np.ndarray:
        key = (what, t)
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = fn(t) if t > 0 else 0.0
        return np.array([v])

    def attention(self, tokens, pairs, kv_tokens, decode) -> np.ndarray:
        """One layer's attention per group from the group's totals (see CostModel)."""
        return self.cm.attention_times(self.rank, tokens, pairs, kv_tokens, decode)

    def router_and_shared(self, tokens: np.ndarray) -> np.ndarray:
        m, cm = self.rank, self.cm
        return self._per_count("router+shared", lambda t: cm.router_time(m, t)
                               + cm.shared_expert_time(m, t), tokens)

    def dense_ffn(self, tokens: np.ndarray) -> np.ndarray:
        return self._per_count("dense", lambda t: self.cm.dense_ffn_time(self.rank, t), tokens)

    def lm_head(self, tokens: np.ndarray) -> np.ndarray:
        m = self.rank
        return self._per_count("lm_head", lambda t: self.cm.gemm_time(
            t, m.vocab, m.hidden, m.dense_dtype, "lm_head"), tokens)

    def experts(self, slot_load: np.ndarray, num_gpus: int, active=None,
                log_idle=None) -> np.ndarray:
        """``[L, G]`` grouped-GEMM seconds from ``slot_load[L, R]`` (rows per physical slot).

        ``active`` (expected loads): the probability that a slot receives any row; a slot then
        costs P(active) x time(load / P(active)), and the launch P(any slot of the GPU active).
        ``log_idle`` (optional, same shape): log(1 - active) when the caller has it, which
        spares a log per slot.
        """
        L = slot_load.shape[0]
        load = slot_load.reshape(L, num_gpus, -1)
        if active is None:
            return self.cm.grouped_gemm_times(self.model, load)
        return self._expected_experts(load, active, log_idle)

    def experts_expected(self, totals: np.ndarray, slots: ExpectedSlots, num_gpus: int) -> np.ndarray:
        """``[n, L, G]`` expert seconds of steps of ``totals[n]`` tokens routed in expectation
        over ``slots`` — ``experts`` with ``active``.

        A slot on the memory-bound side of the roofline costs
        P(active) x (b + c x rows / P(active)) = b P(active) + c x rows, so a GPU's such slots
        cost b x (sum of P(active)) + c x (their rows): no per-slot division, ceiling or
        maximum. The few slots that may be compute-bound (decode: the hottest experts) are
        costed on the whole roofline and replace their memory-bound term."""
        n, (L, R) = len(totals), slots.kshare.shape
        T = np.asarray(totals, dtype=float)
        lg = slots.log_idle_at(T)
        terms = self._roofline_terms
        if terms is not None:
            a, b, c, tile = terms
            # rows of an active slot: T k / (1 - (1 - k)^T) <= 1 + T k (x / (1 - e^-x) <= 1 + x),
            # so a slot is memory-bound whenever a x ceil((1 + T k) / tile) <= b
            hot = np.flatnonzero(a * np.ceil((1.0 + float(T.max()) * slots.kshare.ravel()) / tile) > b)
            if len(hot) <= slots.kshare.size // 8:  # else the slot-by-slot roofline costs less
                return self._expected_memory_bound(T[:, None], slots, lg, hot, num_gpus)
        active = -np.expm1(lg)
        active[:, slots.always] = 1.0
        return self.experts((T[:, None, None] * slots.kshare).reshape(n * L, R), num_gpus,
                            active.reshape(n * L, R), lg.reshape(n * L, R)).reshape(n, L, num_gpus)

    def _expected_memory_bound(self, T, slots: ExpectedSlots, lg, hot, num_gpus) -> np.ndarray:
        """``experts_expected`` summed per GPU as b P(active) + c rows, slots ``hot`` (flat
        ``layer x R + slot``) corrected to the whole roofline. ``T[n, 1]``, ``lg[n, L, R]``."""
        a, b, c, tile = self._roofline_terms
        n, (L, R) = len(T), slots.kshare.shape
        S = slots.slots_per_gpu
        idle = np.expm1(lg)  # -P(active)
        p_sum = (idle.reshape(-1, S) @ np.ones(S)).reshape(n, L * num_gpus)
        per = (T * c) * slots.rows_per_token - b * p_sum
        if len(hot):
            p = -idle.reshape(n, L * R)[:, hot]
            load = T * slots.kshare.ravel()[hot]
            cond = np.divide(load, p, out=np.zeros_like(load), where=p > 0)
            whole = np.maximum(np.ceil(cond / tile) * a, cond * c + b) * p
            gpu = (hot // R) * num_gpus + (hot % R) // S
            np.add.at(per, (slice(None), gpu), whole - (b * p + c * load))
        # log P(no slot of the GPU active) is linear in T: summed once per placement
        launch = -np.expm1(T * slots.idle_per_token + slots.idle_floor)
        return (per + launch * self.cm.device.kernel_overhead).reshape(n, L, num_gpus)

    def experts_counted(self, slot_rows: np.ndarray, num_gpus: int, parts: int = 1,
                        gpu_rows: np.ndarray | None = None) -> np.ndarray:
        """``experts`` for integer rows per slot, each GPU's rows split into ``parts`` equal
        micro-batches: the cost model's per-expert times are looked up in a table indexed by
        rows (filled through ``CostModel.expert_times`` as larger counts appear)."""
        table = self._expert_table.get(parts)
        top = int(slot_rows.max(initial=0))
        if table is None or top >= len(table):
            size = max(2 * top + 1, 256)
            table = self.cm.expert_times(self.model, np.arange(size) / parts)
            self._expert_table[parts] = table
        L = slot_rows.shape[0]
        per = table[slot_rows]
        per_gpu = per if per.shape[1] == num_gpus else (
            per.reshape(-1, per.shape[1] // num_gpus) @ np.ones(per.shape[1] // num_gpus))
        if gpu_rows is None:
            gpu_rows = slot_rows.reshape(L, num_gpus, -1).sum(-1)
        return per_gpu.reshape(L, num_gpus) + (gpu_rows > 0) * self.cm.device.kernel_overhead

    def _expected_experts(self, load: np.ndarray, active: np.ndarray,
                          log_idle=None) -> np.ndarray:
        p = active.reshape(load.shape)
        cond = np.divide(load, p, out=np.zeros_like(load), where=p > 0)
        terms = self._roofline_terms
        if terms is None:
            per = self.cm.expert_times(self.model, cond) * p
        else:  # the same roofline in a few passes (count-routing memo misses are hot)
            a, b, c, tile = terms
            compute = np.ceil(cond / tile)
            compute *= a
            memory = cond * c
            memory += b
            per = np.maximum(compute, memory, out=compute)
            per *= p  # p = 0 exactly where cond = 0: idle slots cost nothing

        # sums over a GPU's few slots: a matrix product is faster than a reduction
        ones = np.ones(load.shape[-1])
        if log_idle is None:
            log_idle = np.log1p(-np.minimum(p, 1.0 - 1e-15))
        launch = -np.expm1(log_idle.reshape(load.shape) @ ones)
        return per @ ones + launch * self.cm.device.kernel_overhead


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
    expert_t: np.ndarray | None = None  # [L, G] grouped-GEMM seconds (expected loads)
    slot_rows: np.ndarray | None = None  # [L, R] whole step's rows per slot (token routing)
    expert_stats: tuple | None = None  # expert times: (max, mean) over GPUs, sum over layers
    load_stats: tuple | None = None  # gpu_load max and mean over GPUs, per layer


class Router:
    """Turns a step's tokens into per-layer loads and dispatch/combine times (moesim.comm).

    Trace rows are mapped once, when the router is built, to the flat slot id
    ``layer * R + slot`` of each (row, layer, k), so a step gathers its tokens' rows and runs
    one bincount over all layers. Replicated experts split tokens round-robin: request q
    replaying trace row i uses replica (i + q mod V) mod (replica count), V = min(largest
    replica count, 4) — moesim.comm's ``round-robin`` rule with i + q mod V as the token index,
    so requests replaying the same row spread over replicas. The V offsets are mapped in
    advance too (V x the trace's size; past 2**26 slot ids, per step).

    Pair dispatchers (``flat``, ``deepep-ll``) need only the pairs each GPU sends and receives
    by path (same GPU, same node, other node), costed for all layers at once by
    ``moesim.comm.pair_comm_layers``; ``deepep-ll`` sends every pair through the NIC, so it
    needs only the per-GPU totals. Other dispatchers (per-GPU/per-node dedup, all-gather,
    hierarchical) get each layer's count matrices and run ``moesim.comm`` layer by layer.
    """

    OFFSETS = 4  # replica offsets mapped per trace row (V)

    def __init__(self, model: MoEModel, layout: Layout, cluster, routing, dispatcher: str,
                 hidden: int):
        from moesim import comm

        self.comm = comm
        self.model = model
        self.layout = layout
        self.cluster = cluster
        self.routing = routing
        self.dispatcher = comm.get_dispatcher(dispatcher)
        name = self.dispatcher.name
        dtype = "fp8" if model.expert_dtype == "fp8" else "bf16"
        self.rows = comm.wire_rows(name, hidden, dtype, "bf16")
        L, E, K = model.moe_layers, model.num_experts, model.top_k
        self.L, self.E, self.K = L, E, K
        self.G = layout.num_gpus
        self.R = layout.phy2log.shape[1]
        self.S = layout.slots_per_gpu
        self.gpn = cluster.gpus_per_node
        self.node = np.arange(self.G) // self.gpn
        self.pair = name in comm.PAIR_DISPATCHERS
        self.nic_only = name == "deepep-ll"  # pure RDMA: only per-GPU totals matter
        reps = layout.replica_counts(E)
        self._placements = None
        # deepep-ll with more tokens in a step than trace rows: histogram each row once,
        # weighted by how many tokens replay it (same loads, less work)
        self.aggregate_rows = True
        # replicas of each (layer, expert) in slot order, as flat slot ids; row L*E: invalid
        C = max(int(reps.max()), 1)
        lay, slot = np.nonzero(layout.phy2log >= 0)
        expert = layout.phy2log[lay, slot]
        order = np.lexsort((slot, expert, lay))
        lay, slot, expert = lay[order], slot[order], expert[order]
        le = lay * E + expert
        first = np.searchsorted(le, le)  # first entry of each (layer, expert)
        rep_slot = np.full((L * E + 1, C), L * self.R, dtype=np.int64)
        rep_slot[le, np.arange(len(le)) - first] = lay * self.R + slot
        self.C = C
        self.V = min(C, self.OFFSETS)
        self.rep_slot_flat = rep_slot.ravel().astype(np.int32)
        self.rep_count_flat = np.r_[reps.ravel(), 1].astype(np.int32)
        # GPU of each flat slot id; the invalid id maps to a virtual GPU G
        self.slot_gpu = np.r_[np.tile(np.arange(self.R) // self.S, L), self.G].astype(np.int32)
        if routing.kind == "trace":
            ex = routing.experts
            self.T = len(ex)
            self.valid_all = bool((ex >= 0).all())
            if not self.valid_all:
                self.row_valid = (ex >= 0).sum(-1).astype(np.int32)  # [T, L]
            # slots of every (offset, row, layer, k), once, when they fit in memory
            self.row_slot = None
            if self.V * ex.size <= 2**26:
                every = np.arange(self.V * self.T)
                self.row_slot = self._row_slots(every // self.T, every % self.T)
                # over 256 MB, or read by the compiled kernel: fewer bytes (numpy then casts
                # per step); the kernel's reads of this table are most of a trace step's time
                # at large batches, so uint16 ids where every id fits
                compiled = self.nic_only and SLOT_COUNTER is not None
                if compiled and L * self.R < np.iinfo(np.uint16).max:
                    self.row_slot = self.row_slot.astype(np.uint16)
                elif self.row_slot.size > 2**25 or compiled:
                    self.row_slot = self.row_slot.astype(np.int32)
            if self.nic_only and self.row_slot is not None and SLOT_COUNTER is not None:
                # load (or compile) the kernel now, with the real types: build time, not run time
                nb = L * self.R + 1
                SLOT_COUNTER(self.row_slot[:1].reshape(1, -1), np.zeros(1, np.intp),
                             np.zeros(1, np.intp), nb, np.zeros(nb, np.int32))
        if routing.kind == "counts":
            phy = np.maximum(layout.phy2log, 0)
            per_slot = np.where(layout.phy2log >= 0, np.take_along_axis(routing.share, phy, 1), 0.0)
            self.slot_share = per_slot / np.maximum(np.take_along_axis(reps, phy, 1), 1)
            self.gpu_share = self.slot_share.reshape(L, self.G, self.S).sum(-1)
            self.node_share = self.gpu_share.reshape(L, -1, self.gpn).sum(-1)[:, self.node]
            pick = np.minimum(K * self.slot_share, 1.0)
            self.expected = ExpectedSlots.of(K * self.slot_share,
                                             np.log1p(-np.minimum(pick, 1 - 1e-12)),
                                             pick >= 1.0, self.S)
            self._gpu_share_max = self.gpu_share.max(axis=1)
            self._gpu_share_mean = self.gpu_share.mean(axis=1)
        self._cache: dict = {}
        self._expert_memo: dict = {}  # total tokens of an expected step -> [L, G] expert times
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def placements(self) -> list:
        """Per-layer ``moesim.comm.Placement`` (replicas round-robin), for the other dispatchers."""
        if self._placements is None:
            self._placements = [
                self.comm.Placement.from_slots(self.layout.phy2log[li], self.G, self.E,
                                               selection="round-robin")
                for li in range(self.L)]
        return self._placements

    # ----- token-level (trace replay) ---------------------------------------------------------
    def _row_slots(self, offset: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Flat slot ids ``[n, L, K]`` of trace ``rows`` replayed with replica ``offset``:
        row i uses replica (i + offset) mod count of each expert; invalid -> L * R."""
        ex = self.routing.experts[rows]
        logical = ex.astype(np.int32)
        logical += (np.arange(self.L, dtype=np.int32) * self.E)[None, :, None]
        if not self.valid_all:
            logical[ex < 0] = self.L * self.E
        turn = (rows + offset).astype(np.int32)[:, None, None]
        rep = turn % self.rep_count_flat[logical]
        logical *= self.C
        logical += rep
        # bincount takes intp without a conversion pass
        return self.rep_slot_flat[logical].astype(np.intp)

    def route_tokens(self, rows: np.ndarray, src: np.ndarray, share: float = 1.0,
                     req: np.ndarray | None = None) -> StepRouting:
        """The step's tokens: trace ``rows[n]`` routing them, ``src[n]`` their source GPU,
        ``req[n]`` their requests (replicated experts: request q replaying row i uses replica
        (i + q mod V) mod count, so requests replaying the same row spread over replicas)."""
        L, G, R, K = self.L, self.G, self.R, self.K
        n_bins = L * R + 1
        T, V = self.T, self.V
        key = rows if req is None or V == 1 else (req % V) * T + rows  # (offset, row)
        if self.nic_only and self.aggregate_rows and V * T < len(rows):
            # more tokens than (offset, row) keys: count each key once, weighted by its repeats
            mult = np.bincount(key, minlength=V * T)
            used = np.flatnonzero(mult)
            flat = self._slots_of(used)
            w = np.repeat(mult[used].astype(float), L * K)
            slot_rows = np.bincount(flat.ravel(), weights=w, minlength=n_bins).astype(np.int64)
        else:
            flat = self._slots_of(key)
            slot_rows = np.bincount(flat.ravel(), minlength=n_bins)
        slot_rows = slot_rows[: L * R].reshape(L, R)
        out = self._empty(slot_rows * share)
        out.slot_rows = slot_rows
        if self.nic_only:
            out_paths = np.zeros((L, G, 3))
            in_paths = np.zeros((L, G, 3))
            if self.valid_all:
                out_paths[..., 0] = K * np.bincount(src, minlength=G) * share
            else:
                key = np.arange(L)[None, :] * G + src[:, None]
                out_paths[..., 0] = np.bincount(key.ravel(), weights=self.row_valid[rows].ravel(),
                                                minlength=L * G).reshape(L, G) * share
            in_paths[..., 0] = out.gpu_load  # the LL kernel moves every pair, own GPU included
            self._pair_comm(out, out_paths, in_paths)
        elif self.pair:
            self._flat_paths(out, flat, src, share)
        else:
            self._per_layer_comm(out, rows, src, share, key // T + rows)
        return out

    def route_window(self, rows: np.ndarray, src: np.ndarray, req: np.ndarray, step: np.ndarray,
                     W: int, share: float = 1.0) -> dict:
        """``route_tokens`` for ``W`` steps at once (pair dispatchers): the tokens of all steps,
        ``step[n]`` the step of each. One gather and one bincount with the step in the key;
        the pair comm of all ``W x L`` layers in one call. Returns ``[W * L, ...]`` arrays
        (step-major) of what ``route_tokens`` gives per step, bit for bit: integer counts,
        the same elementwise operations."""
        L, G, R, K = self.L, self.G, self.R, self.K
        nb = L * R + 1
        T, V = self.T, self.V
        key = rows if V == 1 else (req % V) * T + rows
        step = step.astype(np.intp)
        if self.nic_only and self.aggregate_rows and W * V * T < len(rows):
            wkey = step * (V * T) + key
            mult = np.bincount(wkey, minlength=W * V * T)
            used = np.flatnonzero(mult)
            flat = self._slots_of(used % (V * T))
            flat += (used // (V * T) * nb)[:, None, None]
            w = np.repeat(mult[used].astype(float), L * K)
            slot_rows = np.bincount(flat.ravel(), weights=w, minlength=W * nb).astype(np.int64)
            flat = None
        elif self.nic_only and self.row_slot is not None and SLOT_COUNTER is not None:
            counts = np.zeros(W * nb, dtype=np.int32)  # < 2**31: tokens x K per step
            count_slots(self.row_slot.reshape(len(self.row_slot), -1), key.astype(np.intp),
                        step, nb, counts)
            slot_rows = counts.astype(np.int64)
            flat = None
        else:
            flat = self._slots_of(key)
            offset = (step * nb)[:, None, None]
            slot_rows = np.bincount((flat + offset).ravel(), minlength=W * nb)
        slot_rows = slot_rows.reshape(W, nb)[:, : L * R].reshape(W * L, R)
        slot_load = slot_rows * share
        if self.S == 1:
            gpu_load = slot_load.astype(float)
        else:
            gpu_load = (slot_load.reshape(W * L * G, self.S).astype(float)
                        @ np.ones(self.S)).reshape(W * L, G)
        if self.nic_only:  # every pair through the NIC: per-GPU totals are all that matter
            if self.valid_all:
                # the same for every layer: one row per step, broadcast by ll_comm_layers
                send = K * np.bincount(step * G + src, minlength=W * G).reshape(W, 1, G) * share
            else:
                k2 = (step[:, None] * L + np.arange(L)[None, :]) * G + src[:, None]
                send = np.bincount(k2.ravel(), weights=self.row_valid[rows].ravel(),
                                   minlength=W * L * G).reshape(W, L, G) * share
            # the LL kernel moves every pair, own GPU included
            d, c, sb, rb, which = self.comm.ll_comm_layers(self.cluster, send,
                                                           gpu_load.reshape(W, L, G), *self.rows)
            return {"slot_rows": slot_rows, "gpu_load": gpu_load, "dispatch_s": d.ravel(),
                    "combine_s": c.ravel(), "sent_bytes": sb.ravel(), "recv_bytes": rb.ravel(),
                    "bottleneck": which.ravel()}
        # flat: pairs by path (same GPU, same node, other node)
        if flat is None:
            flat = self._slots_of(key)
        dst = self.slot_gpu[flat]
        src_b = src.astype(np.int32)[:, None, None]
        path = (dst != src_b).astype(np.int32)
        path += (dst // self.gpn) != (src_b // self.gpn)
        in_key = (flat + (step * nb)[:, None, None]) * 3 + path
        hist = np.bincount(in_key.ravel(), minlength=W * nb * 3).reshape(W, nb * 3)
        in_paths = hist[:, : L * R * 3].reshape(W * L, G, self.S, 3).sum(2).astype(float)
        out_key = ((step[:, None, None] * L + np.arange(L)[None, :, None]) * G + src_b) * 3 \
            + path
        if not self.valid_all:
            out_key[dst == G] = W * L * G * 3
        out_paths = np.bincount(out_key.ravel(), minlength=W * L * G * 3 + 1)[: W * L * G * 3]
        out_paths = out_paths.reshape(W * L, G, 3).astype(float)
        out_paths, in_paths = out_paths * share, in_paths * share
        res = self.comm.pair_comm_layers(self.dispatcher.name, self.cluster, out_paths, in_paths,
                                         *self.rows)
        return {"slot_rows": slot_rows, "gpu_load": gpu_load, "dispatch_s": res.dispatch_s,
                "combine_s": res.combine_s, "sent_bytes": res.sent_bytes,
                "recv_bytes": res.recv_bytes, "bottleneck": res.bottleneck}

    def _slots_of(self, key: np.ndarray) -> np.ndarray:
        if self.row_slot is not None:
            ids = self.row_slot[key]
            # (callers add offsets in place: unsigned ids would not take them)
            return ids.astype(np.intp) if ids.dtype == np.uint16 else ids
        return self._row_slots(key // self.T, key % self.T)

    def _flat_paths(self, out: StepRouting, flat: np.ndarray, src: np.ndarray, share: float):
        """Pairs sent and received per GPU by path, from the pairs' slots: histograms of
        (destination slot, path) and (layer, source GPU, path)."""
        L, G, R = self.L, self.G, self.R
        dst = self.slot_gpu[flat]
        src_b = src.astype(np.int32)[:, None, None]
        path = (dst != src_b).astype(np.int32)
        path += (dst // self.gpn) != (src_b // self.gpn)
        in_key = flat * 3 + path  # invalid slots land in the dropped last bins
        hist = np.bincount(in_key.ravel(), minlength=(L * R + 1) * 3)[: L * R * 3]
        in_paths = hist.reshape(L, G, self.S, 3).sum(2).astype(float)
        out_key = (np.arange(L, dtype=np.int32)[None, :, None] * G + src_b) * 3 + path
        if not self.valid_all:
            out_key[dst == G] = L * G * 3
        out_paths = np.bincount(out_key.ravel(), minlength=L * G * 3 + 1)[: L * G * 3]
        out_paths = out_paths.reshape(L, G, 3).astype(float)
        self._pair_comm(out, out_paths * share, in_paths * share)

    def _per_layer_comm(self, out: StepRouting, rows: np.ndarray, src: np.ndarray, share: float,
                        token_index: np.ndarray):
        experts = self.routing.experts[rows]
        for li in range(self.L):
            counts = self.comm.counts_from_tokens(src, experts[:, li], self.placements[li],
                                                  self.cluster, token_index=token_index)
            if share != 1.0:
                counts = self._scaled(counts, share)
            self._store(out, li, self.dispatcher.run(counts, self.cluster, *self.rows))

    # ----- expected (aggregate counts) ------------------------------------------------------------
    def route_expected(self, tokens_per_gpu: np.ndarray, share: float = 1.0) -> StepRouting:
        """Each token selects K experts with the layer's shares, in expectation. Memoised on
        the tokens per GPU: a steady decode batch costs one dictionary lookup."""
        t = tokens_per_gpu.astype(float) * share
        key = t.tobytes()
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        if self.pair:  # a memo miss of route_expected_many's, alone
            out = [None]
            self._expected_chunk([(0, t)], None, out)
            return out[0]
        self.cache_misses += 1
        K = self.K
        out = self._empty(t.sum() * K * self.slot_share)
        # a slot is idle only if none of the step's tokens picks it (independent tokens)
        out.active = self.expected.p_active(np.array([t.sum()]))[0]
        for li in range(self.L):
            counts = self.comm.counts_from_aggregate(
                np.outer(t, K * self.routing.share[li]), t, self.placements[li], self.cluster)
            self._store(out, li, self.dispatcher.run(counts, self.cluster, *self.rows))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = out
        return out

    def route_expected_many(self, tokens_per_gpu: np.ndarray, share: float = 1.0,
                            costs: StepCosts | None = None) -> list[StepRouting]:
        """``route_expected`` of each row of ``tokens_per_gpu[U, G]``: memo hits looked up, the
        misses of pair dispatchers computed together (the same elementwise operations over
        a leading axis; one comm call for all of them), with their expected expert times
        when ``costs`` is given."""
        out: list = [None] * len(tokens_per_gpu)
        miss, pending, repeats = [], {}, []
        for u, row in enumerate(tokens_per_gpu):
            t = row.astype(float) * share
            key = t.tobytes()
            cached = self._cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                out[u] = cached
            elif not self.pair:
                out[u] = self.route_expected(row, share)
            elif key in pending:  # a key this call computes anyway
                self.cache_hits += 1
                repeats.append((u, pending[key]))
            else:
                pending[key] = u
                miss.append((u, t))
        for i in range(0, len(miss), self.MISS_CHUNK):  # small chunks stay in cache
            self._expected_chunk(miss[i: i + self.MISS_CHUNK], costs, out)
        for u, first in repeats:
            out[u] = out[first]
        return out

    MISS_CHUNK = 8

    def _expected_chunk(self, miss: list, costs, out: list) -> None:
        """Memo misses ``miss`` [(index into ``out``, tokens per GPU already scaled)] of pair
        dispatchers, computed together; their expected expert times too when ``costs`` is given."""
        self.cache_misses += len(miss)
        L, G, K = self.L, self.G, self.K
        M = len(miss)
        t = np.stack([m[1] for m in miss])  # [M, G]
        total = t.sum(axis=1)
        slot_load = total[:, None, None] * K * self.slot_share  # [M, L, R]
        active = None
        if costs is None:  # expert times come later, from P(active)
            active = self.expected.p_active(total)
        # a GPU's load is its slots' shares times the step's pairs (a [M*L*G, S] @ [S] product
        # with S of 2-8 ran at 0.8 ms per chunk, more than the rest of the miss); its max and
        # mean over GPUs scale with the pairs too
        TK = total * K
        gpu_load = TK[:, None, None] * self.gpu_share
        load_stats = TK[:, None] * self._gpu_share_max, TK[:, None] * self._gpu_share_mean
        own = self.gpu_share * K
        if self.nic_only:  # every pair through the NIC: a GPU sends K t, receives its share of all
            d, c, sb, rb, which = self.comm.ll_comm_layers(
                self.cluster, (t * K)[:, None, :], own[None] * total[:, None, None], *self.rows)
            names = np.array(self.comm.LL_TERMS)[which.ravel()].tolist()
            res = self.comm.LayersComm(d.ravel(), c.ravel(), sb.ravel(), rb.ravel(), names)
        else:
            t_node = np.stack([np.bincount(self.node, weights=row)[self.node] for row in t])
            tb, tn, T = t[:, None, :], t_node[:, None, :], total[:, None, None]
            out_paths = np.stack([tb * own, tb * (self.node_share * K - own),
                                  tb * K * (1 - self.node_share)], axis=-1)
            in_paths = np.stack([tb * own, own * (tn - tb), own * (T - tn)], axis=-1)
            res = self.comm.pair_comm_layers(self.dispatcher.name, self.cluster,
                                             out_paths.reshape(M * L, G, 3),
                                             in_paths.reshape(M * L, G, 3), *self.rows)
        experts = [None] * M
        if costs is not None:  # a function of the step's total tokens only: memoised on it
            memo = self._expert_memo
            new = sorted({x for x in total.tolist() if x not in memo})
            if new:
                times = costs.experts_expected(np.array(new), self.expected, G)
                stats = times.max(axis=2), times.mean(axis=2), times.sum(axis=1)
                if len(memo) > 4096:
                    memo.clear()
                for j, x in enumerate(new):
                    memo[x] = (times[j], (stats[0][j], stats[1][j], stats[2][j]))
            experts = [memo[x] for x in total.tolist()]
        for i, (u, ti) in enumerate(miss):
            part = slice(i * L, (i + 1) * L)
            r = StepRouting(slot_load[i], res.dispatch_s[part], res.combine_s[part],
                            res.sent_bytes[part], res.recv_bytes[part], gpu_load[i],
                            res.bottleneck[part], active=None if active is None else active[i],
                            load_stats=(load_stats[0][i], load_stats[1][i]))
            if experts[i] is not None:
                r.expert_t, r.expert_stats = experts[i]
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[ti.tobytes()] = r
            out[u] = r

    # ----- helpers ------------------------------------------------------------------------------
    def _pair_comm(self, out: StepRouting, out_paths: np.ndarray, in_paths: np.ndarray) -> None:
        res = self.comm.pair_comm_layers(self.dispatcher.name, self.cluster, out_paths, in_paths,
                                         *self.rows)
        out.dispatch_s, out.combine_s = res.dispatch_s, res.combine_s
        out.sent_bytes, out.recv_bytes, out.bottleneck = res.sent_bytes, res.recv_bytes, \
            res.bottleneck

    def _empty(self, slot_load: np.ndarray) -> StepRouting:
        L = self.L
        if self.S == 1:
            gpu_load = slot_load.astype(float)
        else:  # a matrix product sums the few slots of a GPU faster than a reduction
            gpu_load = slot_load.reshape(L * self.G, self.S).astype(float) @ np.ones(self.S)
            gpu_load = gpu_load.reshape(L, self.G)
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


# ---------------------------------------------------------------------------------------------
# The layer schedule of one step
# ---------------------------------------------------------------------------------------------
def layer_schedule(attn: np.ndarray, dispatch: np.ndarray, experts: np.ndarray,
                   combine: np.ndarray, overlap: bool):
    """Start offsets of each MoE layer ``[L + 1]`` (last = end) from its stage times.

    Without overlap a layer takes attention + dispatch + experts + combine. With two micro-
    batches (each stage time given per micro-batch) a layer takes four slots (module docstring)
    and the last combine drains after the final layer. Any leading axes (steps): ``[..., L]``
    stages give ``[..., L + 1]`` starts and ``[...]`` drains (a float for one step).
    """
    zero = np.zeros(np.shape(attn)[:-1] + (1,))
    one = np.ndim(attn) == 1
    if not overlap:
        per_layer = attn + dispatch + experts + combine
        return np.concatenate([zero, np.cumsum(per_layer, axis=-1)], axis=-1), \
            (0.0 if one else np.zeros(zero.shape[:-1]))
    prev_combine = np.concatenate([zero, combine[..., :-1]], axis=-1)
    per_layer = (np.maximum(attn, prev_combine) + np.maximum(dispatch, attn)
                 + np.maximum(experts, dispatch) + np.maximum(combine, experts))
    if combine.shape[-1] == 0:
        drain = 0.0 if one else np.zeros(zero.shape[:-1])
    else:
        drain = float(combine[-1]) if one else combine[..., -1]
    return np.concatenate([zero, np.cumsum(per_layer, axis=-1)], axis=-1), drain


# ---------------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------------
class Simulation:
    """A built scenario, ready to run once."""

    # fast-forward windows: at most this many steps run ahead and costed in one vectorised
    # call, and a cap on the elements a window's trace routing materialises (numpy: the
    # gathered slot ids, W x tokens x L x K; compiled counter: slot counts and token arrays).
    # Larger windows amortise more Python but fall out of cache: measured on the 2-core dev
    # machine (sim_bench, 64 GPUs), 2**19 was best at batch 1 and 8, 2**21 13 % faster at 32-128
    WINDOW_STEPS = 256
    WINDOW_ELEMENTS = 1 << 19

    def __init__(self, scenario: Scenario, model: MoEModel, cluster, layout: Layout, routing,
                 workload, scheduler: Scheduler, costs: StepCosts, router: Router,
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
        self.fast_forward = scenario.simulation.fast_forward
        # closed decode instance: whole windows from the scheduler's slot queues (tp 1, where
        # the token order within a step changes no cost; trace routing with pair dispatchers)
        self._closed_decode = self.fast_forward and scheduler.closed_decode and layout.tp == 1 \
            and (routing.kind == "counts" or router.pair)
        G = layout.num_gpus
        self.group_gpus = np.arange(G).reshape(layout.num_groups, layout.tp)
        self.record_gpu = scenario.simulation.record_gpu
        self._blocks: list[dict] = []  # recorded steps, a block of consecutive steps each
        self.gpu_busy = np.zeros(G)
        self.windows = 0  # fast-forward windows costed (a cut window counts once)
        self.windows_cut = 0  # windows cut short by an arrival or the time limit

    # ----- the inputs of a step ------------------------------------------------------------------
    def _token_sources(self, batch: Batch, g_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Request and source GPU of every token of the step: decodes first, then the prefill
        chunks token by token (a TP group's tokens are dealt over its GPUs)."""
        s = self.scheduler
        if len(batch.pre_idx):
            req = np.concatenate([batch.dec_idx, np.repeat(batch.pre_idx, batch.pre_len)])
            grp = s.group[req]
        else:
            req, grp = batch.dec_idx, g_dec
        if self.layout.tp == 1:
            return req, grp
        return req, self.group_gpus[grp, np.arange(len(req)) % self.layout.tp]

    def _token_positions(self, batch: Batch) -> np.ndarray:
        """Sequence position of every token, in ``_token_sources`` order."""
        s = self.scheduler
        # a decode step feeds the last produced token: position prompt + generated - 1
        dec_pos = s.prompt[batch.dec_idx] + s.generated[batch.dec_idx] - 1
        if not len(batch.pre_idx):
            return dec_pos
        n_pre = int(batch.pre_len.sum())
        offs = np.arange(n_pre) - np.repeat(np.cumsum(batch.pre_len) - batch.pre_len,
                                            batch.pre_len)
        pre_pos = np.repeat(batch.pre_start, batch.pre_len) + offs
        return np.concatenate([dec_pos, pre_pos])

    def _step_inputs(self, batch: Batch) -> dict:
        """What the cost of ``batch`` depends on (scheduler state before ``finish_step``), as
        one-step arrays: per group tokens, KV read, (query, key) pairs, decode-only flag; the
        largest LM-head group; token-level requests, positions and source GPUs (trace routing)
        or tokens per source GPU (counts)."""
        s, lay = self.scheduler, self.layout
        ng = lay.num_groups
        g_dec = s.group[batch.dec_idx]
        ctx_dec = s.prompt[batch.dec_idx] + s.generated[batch.dec_idx]  # cached tokens + 1
        n_dec = np.bincount(g_dec, minlength=ng)
        if len(batch.pre_idx):
            g_pre = s.group[batch.pre_idx]
            n_pre = np.bincount(g_pre, weights=batch.pre_len, minlength=ng)
            tokens = n_dec + n_pre
            # a decode reads its whole context; a prefill chunk attends causally to its prefix
            ends = batch.pre_start + batch.pre_len
            pairs_pre = batch.pre_len * (batch.pre_start + (batch.pre_len + 1) / 2.0)
            kv_dec = np.bincount(g_dec, weights=ctx_dec, minlength=ng)
            kv_read = kv_dec + np.bincount(g_pre, weights=ends, minlength=ng)
            pairs = kv_dec + np.bincount(g_pre, weights=pairs_pre, minlength=ng)
            decode = n_pre == 0
            producers = n_dec + np.bincount(g_pre, minlength=ng)
        else:
            tokens = n_dec.astype(float)
            kv_read = pairs = np.bincount(g_dec, weights=ctx_dec, minlength=ng)
            decode = np.ones(ng, dtype=bool)
            producers = n_dec
        inp = {"n": 1, "tokens": tokens[None], "kv_read": kv_read[None], "pairs": pairs[None],
               "decode": decode[None], "n_dec": n_dec,
               "producers": np.array([producers.max(initial=0)]),
               "num_decode": np.array([batch.num_decode]),
               "num_prefill": np.array([batch.num_prefill])}
        if self.routing.kind == "trace":
            req, src = self._token_sources(batch, g_dec)
            inp.update(req=req, src=src, pos=self._token_positions(batch),
                       step=np.zeros(len(req), dtype=np.int64))
        elif lay.tp > 1:
            _, src = self._token_sources(batch, g_dec)
            inp["src_tokens"] = np.bincount(src, minlength=lay.num_gpus)[None]
        else:
            inp["src_tokens"] = inp["tokens"]
        return inp

    @staticmethod
    def _repeat_steady(inp: dict, r: int) -> dict:
        """The inputs of ``r`` repeats of the pure-decode step ``inp``: every decode's context
        (and position) one token longer per step, everything else the same."""
        j = np.arange(r)
        kv = inp["kv_read"] + j[:, None] * inp["n_dec"][None, :]  # exact: integer-valued
        out = {"n": r, "kv_read": kv, "pairs": kv, "n_dec": inp["n_dec"]}
        for k in ("tokens", "decode", "src_tokens"):
            if k in inp:
                out[k] = np.repeat(inp[k], r, axis=0)
        for k in ("producers", "num_decode", "num_prefill"):
            out[k] = np.repeat(inp[k], r)
        if "req" in inp:
            n = len(inp["req"])
            out["req"] = np.tile(inp["req"], r)
            out["src"] = np.tile(inp["src"], r)
            out["pos"] = np.tile(inp["pos"], r) + np.repeat(j, n)
            out["step"] = np.repeat(j, n)
        return out

    @staticmethod
    def _concat(chunks: list[dict]) -> dict:
        if len(chunks) == 1:
            return chunks[0]
        out = {"n": sum(c["n"] for c in chunks)}
        for k in chunks[0]:
            if k in ("n", "n_dec"):
                continue
            if k == "step":
                offs = np.cumsum([0] + [c["n"] for c in chunks[:-1]])
                out[k] = np.concatenate([c[k] + o for c, o in zip(chunks, offs, strict=True)])
            else:
                out[k] = np.concatenate([c[k] for c in chunks])
        return out

    # ----- the cost of steps ----------------------------------------------------------------------
    def step_cost(self, batch: Batch) -> tuple[float, dict]:
        """Seconds of one forward step of ``batch`` (scheduler state before finish_step) and its
        record block (``_cost`` of one step)."""
        block = self._cost(self._step_inputs(batch))
        return float(block["dt"][0]), block

    def _cost(self, inp: dict) -> dict:
        """The layer-by-layer schedule of ``inp['n']`` steps at once: ``[W]`` step seconds and
        the ``[W, ...]`` records. Every operation is elementwise over the steps (or a
        reduction along groups / GPUs / layers within a step), so a step costs the same alone
        or in a window."""
        s, lay, m, c = self.scheduler, self.layout, self.model, self.costs
        W, ng, tp, G, L = inp["n"], lay.num_groups, lay.tp, lay.num_gpus, m.moe_layers
        fdl = m.first_dense_layers
        tokens = inp["tokens"]
        mb = 2 if self.overlap else 1
        share = 1.0 / mb
        tp_ar = 0.0
        if tp > 1:  # attention output and FFN output are all-reduced inside the TP group
            from moesim.comm import allreduce_time

            tp_ar = np.array([allreduce_time(self.cluster, float(t * share) * m.hidden * 2, tp)
                              for t in tokens.max(axis=1)])[:, None]
        # dense layers (DeepSeek's first_k_dense_replace) run without the micro-batch split:
        # their attention is costed in the same call as the MoE layers' (one micro-batch)
        parts = (share, 1.0) if fdl else (share,)
        both = c.attention(np.concatenate([tokens * f for f in parts], axis=1).ravel(),
                           np.concatenate([inp["pairs"] * f for f in parts], axis=1).ravel(),
                           np.concatenate([inp["kv_read"] * f for f in parts], axis=1).ravel(),
                           np.tile(inp["decode"], (1, len(parts))).ravel()).reshape(W, -1)
        attn_moe = both[:, :ng] + c.router_and_shared((tokens * share).ravel()).reshape(W, ng) \
            + 2 * tp_ar
        dense = 0.0
        dense_gpu = 0.0
        if fdl:
            dense_gpu = both[:, ng:] + c.dense_ffn(tokens.ravel()).reshape(W, ng) \
                + 2 * (tp_ar * mb)
            dense = dense_gpu.max(axis=1)
        # MoE layers: where each token goes
        block: dict = {}
        if self.routing.kind == "trace" and self.router.pair:
            req = inp["req"]
            rows = self.routing.rows(req, inp["pos"], s.prompt[req])
            rw = self.router.route_window(rows, inp["src"], req, inp["step"], W, share)
            expert_t = c.experts_counted(rw["slot_rows"], G, mb, rw["gpu_load"]).reshape(W, L, G)
            e_max, e_mean, e_sum = expert_t.max(axis=2), expert_t.mean(axis=2), expert_t.sum(1)
            load = rw["gpu_load"].reshape(W, L, G)
            per_layer = {k: rw[k].reshape(W, L) for k in
                         ("dispatch_s", "combine_s", "sent_bytes", "recv_bytes")}
            per_layer["load_max"], per_layer["load_mean"] = load.max(axis=2), load.mean(axis=2)
            block["bottleneck"] = ("flat", rw["bottleneck"])
            if self.record_gpu:
                block["gpu_loads"] = (load * mb).astype(np.float32)
                block["gpu_expert_s"] = expert_t * mb
        else:
            e_max, e_mean, e_sum, per_layer = self._routed_steps(inp, W, share, mb, block)
        attn_max = attn_moe.max(axis=1)
        attn_stage = np.broadcast_to(attn_max[:, None], (W, L))
        starts, drain = layer_schedule(attn_stage, per_layer["dispatch_s"], e_max,
                                       per_layer["combine_s"], self.overlap)
        moe_time = starts[:, -1] + drain
        # the LM head runs on each group's producing sequences; the fullest group gates it
        head = c.lm_head(inp["producers"])
        dense_s = dense * fdl
        block["dt"] = dense_s + moe_time + head + self.step_overhead
        # per-GPU busy time on the compute stream (utilisation)
        block["busy"] = np.repeat(attn_moe * mb * L + dense_gpu * fdl, tp, axis=1) + e_sum * mb
        block["attention_s"] = attn_max * mb
        for k, v in per_layer.items():
            block[k] = v * mb
        block["experts_max_s"], block["experts_mean_s"] = e_max * mb, e_mean * mb
        block["starts"] = (starts + (dense_s[:, None] if fdl else dense_s))[:, :-1]
        block["tokens_max_group"] = tokens.max(axis=1)
        block["tokens_mean_group"] = tokens.mean(axis=1)
        block["dense_s"] = np.broadcast_to(dense_s, (W,))
        block["moe_s"], block["lm_head_s"] = moe_time, head
        block["decode_tokens"], block["prefill_tokens"] = inp["num_decode"], inp["num_prefill"]
        return block

    def _routed_steps(self, inp: dict, W: int, share: float, mb: int, block: dict):
        """Routing step by step (counts routing, memoised per tokens-per-GPU; trace routing with
        a per-layer dispatcher), stacked to ``[W, L]``."""
        s, c, G = self.scheduler, self.costs, self.layout.num_gpus
        if self.routing.kind == "counts":
            src = inp["src_tokens"]
            new = np.r_[True, (src[1:] != src[:-1]).any(axis=1)] if W > 1 else np.ones(1, bool)
            firsts = np.flatnonzero(new)
            uniq = self.router.route_expected_many(src[firsts], share, self.costs)
            idx = np.cumsum(new) - 1
            for r in uniq:
                expert_t = self._expected_experts(r)
                if r.expert_stats is None:
                    r.expert_stats = (expert_t.max(axis=1), expert_t.mean(axis=1),
                                      expert_t.sum(axis=0))
        else:
            req, step = inp["req"], inp["step"]
            rows = self.routing.rows(req, inp["pos"], s.prompt[req])
            cuts = np.searchsorted(step, np.arange(W + 1))
            uniq = []
            for k in range(W):
                sl = slice(cuts[k], cuts[k + 1])
                r = self.router.route_tokens(rows[sl], inp["src"][sl], share, req[sl])
                r.expert_t = c.experts_counted(r.slot_rows, G, mb, r.gpu_load)
                r.expert_stats = (r.expert_t.max(axis=1), r.expert_t.mean(axis=1),
                                  r.expert_t.sum(axis=0))
                uniq.append(r)
            idx = np.arange(W)
        for r in uniq:
            if r.load_stats is None:
                r.load_stats = (r.gpu_load.max(axis=1), r.gpu_load.mean(axis=1))

        def stack(get):
            return np.stack([get(r) for r in uniq])[idx]

        per_layer = {k: stack(lambda r, k=k: getattr(r, k)) for k in
                     ("dispatch_s", "combine_s", "sent_bytes", "recv_bytes")}
        per_layer["load_max"] = stack(lambda r: r.load_stats[0])
        per_layer["load_mean"] = stack(lambda r: r.load_stats[1])
        block["bottleneck"] = ("steps", [uniq[k].bottleneck for k in idx.tolist()])
        if self.record_gpu:
            block["gpu_loads"] = stack(lambda r: (r.gpu_load * mb).astype(np.float32))
            block["gpu_expert_s"] = stack(lambda r: r.expert_t * mb)
        return (stack(lambda r: r.expert_stats[0]), stack(lambda r: r.expert_stats[1]),
                stack(lambda r: r.expert_stats[2]), per_layer)

    def _expected_experts(self, routed: StepRouting) -> np.ndarray:
        """Expert times of an expected (counts) step, kept with its (memoised) routing."""
        if routed.expert_t is None:
            routed.expert_t = self.costs.experts(routed.slot_load, self.layout.num_gpus,
                                                 routed.active)
        return routed.expert_t

    # ----- records --------------------------------------------------------------------------------
    STEP_COLUMNS = ("step", "start_s", "duration_s", "decode_tokens", "prefill_tokens",
                    "running", "waiting", "tokens_max_group", "tokens_mean_group", "dense_s",
                    "moe_s", "lm_head_s")
    _LAYER_KEYS = ("dispatch_s", "experts_max_s", "experts_mean_s", "combine_s", "sent_bytes",
                   "recv_bytes", "load_max", "load_mean")

    def _record(self, block: dict, k: int, start: np.ndarray, dt: np.ndarray,
                running: np.ndarray, waiting: np.ndarray) -> None:
        """Keep the first ``k`` steps of a costed block, started at ``start[k]``."""
        L = self.model.moe_layers
        kept = {key: block[key][:k] for key in (*self._LAYER_KEYS, "attention_s",
                                                 "tokens_max_group", "tokens_mean_group",
                                                 "dense_s", "moe_s", "lm_head_s",
                                                 "decode_tokens", "prefill_tokens")}
        kept["start_s"], kept["duration_s"] = start[:k], dt[:k]
        kept["running"], kept["waiting"] = running[:k], waiting[:k]
        kept["layer_start_s"] = start[:k, None] + block["starts"][:k]
        kind, names = block["bottleneck"]
        kept["bottleneck"] = names[: k * L] if kind == "flat" else \
            [b for per_step in names[:k] for b in per_step]  # flat: a list or LL_TERMS codes
        if self.record_gpu:
            kept["gpu_loads"] = block["gpu_loads"][:k]
            kept["gpu_expert_s"] = block["gpu_expert_s"][:k]
        self.gpu_busy = np.concatenate([self.gpu_busy[None], block["busy"][:k]]).sum(axis=0)
        self._blocks.append(kept)

    def _gather(self, key: str) -> np.ndarray:
        return np.concatenate([b[key] for b in self._blocks])

    @property
    def num_steps(self) -> int:
        return sum(len(b["duration_s"]) for b in self._blocks)

    @property
    def gpu_loads(self) -> list[np.ndarray]:
        """Per recorded block ``[steps, L, G]`` pairs received per GPU (``record_gpu``)."""
        return [b["gpu_loads"] for b in self._blocks if "gpu_loads" in b]

    @property
    def gpu_expert_s(self) -> list[np.ndarray]:
        return [b["gpu_expert_s"] for b in self._blocks if "gpu_expert_s" in b]

    def layer_columns(self) -> dict[str, np.ndarray | list]:
        """Per step and MoE layer ``[steps, L]`` arrays (times and loads for the whole step,
        both micro-batches), and the bottleneck names (flat list, step-major)."""
        L = self.model.moe_layers
        if not self._blocks:
            return {}
        cols = {"attention_s": np.repeat(self._gather("attention_s")[:, None], L, axis=1)}
        for key in self._LAYER_KEYS:
            cols[key] = self._gather(key)
        cols["start_s"] = self._gather("layer_start_s")
        terms = np.array(self.router.comm.LL_TERMS)
        cols["bottleneck"] = [b for blk in self._blocks for b in (
            terms[blk["bottleneck"]].tolist() if isinstance(blk["bottleneck"], np.ndarray)
            else blk["bottleneck"])]
        return cols

    def step_table(self, layers: dict):
        """The ``steps`` DataFrame: the step records plus per-step sums of the layer columns."""
        import pandas as pd

        if not self._blocks:
            return pd.DataFrame(columns=list(self.STEP_COLUMNS))
        data = {key: self._gather(key) for key in self.STEP_COLUMNS[1:]}
        steps = pd.DataFrame({"step": np.arange(len(data["start_s"])), **data})
        if layers:
            for key in ("dispatch_s", "combine_s", "sent_bytes", "recv_bytes"):
                steps[key] = layers[key].sum(axis=1)
            steps["experts_s"] = layers["experts_max_s"].sum(axis=1)
            steps["pairs"] = layers["load_mean"].sum(axis=1) * self.layout.num_gpus
        return steps

    # ----- the SimPy process: one step at a time -----------------------------------------------
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
            dt, block = self.step_cost(batch)
            t0 = env.now
            yield env.timeout(dt)
            s.finish_step(batch, env.now)
            self._record(block, 1, np.array([t0]), np.array([dt]), np.array([len(s.running)]),
                         np.array([len(s.waiting)]))
            index += 1
            if progress is not None:
                progress(s.num_done, env.now)
            if (limit_n and index >= limit_n) or (limit_t and env.now >= limit_t):
                self.stopped_early = True
                break
        self.clock = env.now

    # ----- the SimPy process: windows of steps (fast-forward) -----------------------------------
    def _run_ahead(self, W: int):
        """Form and finish up to ``W`` steps without their times: step j stamps admissions with
        -(j + 1) (its start) and first tokens and finishes with -(j + 1) (its end); the times
        are filled in once the window is costed. Steady pure-decode stretches are applied in
        one go (``Scheduler.steady_steps``). Returns (inputs, running, waiting, steps, empty):
        ``empty`` when the window ended at a step with nothing to run."""
        s = self.scheduler
        if self._closed_decode:
            return self._decode_window(W)
        chunks, running, waiting = [], [], []
        j = 0
        while j < W and not s.all_done:
            batch = s.form_batch(-(j + 1.0))
            if batch.empty():
                return chunks, running, waiting, j, True
            inp = self._step_inputs(batch)
            done = s.finish_step(batch, -(j + 1.0))
            chunks.append(inp)
            running.append(np.array([len(s.running)]))
            waiting.append(np.array([len(s.waiting)]))
            j += 1
            if len(done) == 0 and j < W:
                r = min(s.steady_steps(batch), W - j)
                if r > 0:
                    before = len(s.running)
                    # the first repeat's inputs at the current state, then one token more per step
                    chunks.append(self._repeat_steady(self._step_inputs(batch), r))
                    s.advance_steady(batch, r, -(j + r + 0.0))
                    run = np.full(r, before)
                    run[-1] = len(s.running)
                    running.append(run)
                    waiting.append(np.full(r, len(s.waiting)))
                    j += r
        return chunks, running, waiting, j, False

    def _decode_window(self, W: int):
        """``_run_ahead`` of a closed decode instance (``Scheduler.decode_window``): the steps'
        inputs from the requests' intervals of steps, with difference arrays over steps."""
        s = self.scheduler
        win = s.decode_window(W) if not s.all_done else None
        if win is None:
            return [], [], [], 0, True
        n, ids, first, last = win["n"], win["ids"], win["first"], win["last"]
        ng = self.layout.num_groups
        g = s.group[ids]
        base = s.prompt[ids] + win["gen0"] - first  # context at step j: base + j
        size = (n + 1) * ng
        enter, leave = first * ng + g, (last + 1) * ng + g
        cover = np.bincount(enter, minlength=size) - np.bincount(leave, minlength=size)
        # weighted bincounts sum integers below 2**53 in floats: exact
        ctx = (np.bincount(enter, weights=base, minlength=size)
               - np.bincount(leave, weights=base, minlength=size)).astype(np.int64)
        n_dec = np.cumsum(cover.reshape(n + 1, ng)[:n], axis=0)
        kv = (np.cumsum(ctx.reshape(n + 1, ng)[:n], axis=0)
              + np.arange(n)[:, None] * n_dec).astype(float)  # integer sums: exact
        tokens = n_dec.astype(float)
        inp = {"n": n, "tokens": tokens, "kv_read": kv, "pairs": kv,
               "decode": np.ones((n, ng), dtype=bool), "n_dec": None,
               "producers": n_dec.max(axis=1), "num_decode": n_dec.sum(axis=1),
               "num_prefill": np.zeros(n, dtype=np.int64)}
        if self.routing.kind == "trace":
            length = last - first + 1
            req = np.repeat(ids, length)
            step = np.repeat(first - np.cumsum(length) + length, length) + np.arange(len(req))
            pos = np.repeat(base - 1, length) + step
            # step-major, so the counts stay in cache (steps < 2**15: a radix sort)
            order = np.argsort(step.astype(np.int16), kind="stable")
            req, step, pos = req[order], step[order], pos[order]
            inp.update(req=req, src=s.group[req], step=step, pos=pos)
        else:
            inp["src_tokens"] = tokens
        return [inp], [win["running"]], [win["waiting"]], n, False

    def _window_len(self, index: int) -> int:
        s, m = self.scheduler, self.model
        W = self.WINDOW_STEPS
        limit_n = self.scenario.simulation.max_steps
        if limit_n:
            W = min(W, limit_n - index)
        if self.routing.kind == "trace":  # tokens per step: a bound unless pure decode
            run = s.running
            tokens = len(run)
            if len(s.waiting) or (s.target[run] > s.prefilled[run]).any():
                tokens = s.num_groups * max(s.max_tokens, s.max_running)
            r = self.router
            if r.nic_only and r.row_slot is not None and SLOT_COUNTER is not None:
                # slot counts and token arrays; at least 8 steps, to amortise the per-window
                # work (the scheduler's window grows with the requests: ~10 ms at 32,768)
                per_step = 2 * r.L * r.R + 4 * tokens
                W = min(W, max(8, self.WINDOW_ELEMENTS // per_step))
            else:
                per_step = max(tokens, 1) * m.moe_layers * m.top_k  # the gathered slot ids
                W = min(W, max(1, self.WINDOW_ELEMENTS // per_step))
        return W

    def _serve_windows(self, env, progress):
        s = self.scheduler
        limit_t = self.scenario.simulation.max_sim_time_s
        limit_n = self.scenario.simulation.max_steps
        now = 0.0  # the clock, advanced with the same float additions as SimPy's
        index = 0
        last_dt = None
        while not s.all_done:
            s.arrive_until(now)
            nxt = s.next_arrival_time()
            W = self._window_len(index)
            if nxt is not None and last_dt:  # plan to stop near the next arrival
                W = min(W, max(1, int((nxt - now) / last_dt) + 1))
            snap = s.snapshot() if (nxt is not None or limit_t) else None
            lo = int(min(s.running.min(initial=s.n), s.waiting.min(initial=s.n)))
            # (a window ending at an empty step: the next window forms that step again, with
            # the arrivals of its start, and waits when it is still empty; forming an empty
            # step changes nothing but a preemption, which does not depend on arrivals)
            chunks, running, waiting, n, _ = self._run_ahead(W)
            if n == 0:
                if nxt is None:
                    raise MoesimError("simulation stalled: requests wait but none can be scheduled")
                delay = max(nxt - now, 0.0)
                now = now + delay
                yield env.timeout(delay)
                continue
            block = self._cost(self._concat(chunks))
            self.windows += 1
            dt = block["dt"]
            ends = np.cumsum(np.r_[now, dt])  # sequential additions, as step by step
            start = ends[:-1]
            k = n
            if nxt is not None:  # an arrival joins the first step starting at or after it
                k = min(k, int(np.searchsorted(start[1:], nxt, side="left")) + 1)
            if limit_t:
                k = min(k, int(np.searchsorted(ends[1:], limit_t, side="left")) + 1)
            if k < n:  # undo the window and run its valid steps again (same batches)
                self.windows_cut += 1
                s.restore(snap)
                chunks, running, waiting, n2, _ = self._run_ahead(k)
                assert n2 == k
            self._stamp(lo, start, ends[1:], k)
            self._record(block, k, start, dt, np.concatenate(running), np.concatenate(waiting))
            index += k
            last_dt = float(dt[:k].mean())
            delay = float(ends[k]) - now
            now = float(ends[k])
            yield env.timeout(delay)
            if progress is not None:
                progress(s.num_done, now)
            if (limit_n and index >= limit_n) or (limit_t and now >= limit_t):
                self.stopped_early = True
                break
        self.clock = now

    def _stamp(self, lo: int, start: np.ndarray, end: np.ndarray, k: int) -> None:
        """Replace the window's step stamps -(j + 1) by the steps' start / end times."""
        s = self.scheduler
        hi = s.next_arrival
        for arr, times in ((s.admitted_s, start), (s.first_token_s, end), (s.finish_s, end)):
            part = arr[lo:hi]
            hit = np.flatnonzero(part < 0)
            if len(hit):
                j = (-part[hit]).astype(np.int64) - 1
                assert j.max() < k
                part[hit] = times[j]

    def run(self, progress=None):
        """Run to completion (or the scenario's limits); return ``Results``."""
        import simpy

        from moesim.results import Results

        self.stopped_early = False
        env = simpy.Environment()
        wall0 = time.perf_counter()
        serve = self._serve_windows if self.fast_forward else self._serve
        env.process(serve(env, progress))
        env.run()
        wall = time.perf_counter() - wall0
        return Results.from_simulation(self, simulated_s=self.clock, wall_s=wall)


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
            + ("expert-parallel groups smaller than the cluster are not modelled: simulate one "
               f"group as a cluster of {par.ep} GPUs with its share of the requests"
               if par.ep < G else f"the cluster has only {G} GPUs"))
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
    table = None
    if scenario.execution.cost_table:
        from moesim.cost import CostTable

        try:
            table = CostTable.from_csv(scenario.path(scenario.execution.cost_table))
        except MoesimError as exc:
            raise ScenarioError(f"execution.cost_table: {exc}") from None
    costs = StepCosts(model, cluster.gpu, layout.tp, table)
    try:
        router = Router(model, layout, cluster, routing, scenario.execution.dispatcher, model.hidden)
    except MoesimError as exc:
        raise ScenarioError(f"execution: {exc}") from None
    return Simulation(scenario, model, cluster, layout, routing, workload, scheduler, costs,
                      router, kv_capacity, memory)


def simulate(scenario: Scenario, trace: str | None = None, progress=None):
    """Build and run a scenario; return its ``Results``."""
    return build(scenario, trace).run(progress)
