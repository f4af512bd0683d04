"""The fast replay path: a trace becomes a flat stream of cache lookups, replayed through a
policy object; stack algorithms (LRU, Belady) get every cache size from few passes.

*Accounting* decides what one lookup is:

* ``token``: every (token, MoE layer) row is a batch of its k experts, tokens in trace order
  (each token treated as its own forward step, as moe-lrc and mixtral-offloading count);
  eviction per access.
* ``batch``: one lookup per *unique* expert per (step, layer) batch -- a prefill step looks each
  layer's experts up once for all its tokens; eviction after the batch, never evicting what the
  batch touched (how the edge-qwen3-phone engine counted).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from moesim.cache import (
    BatchInfo,
    CacheError,
    CachePolicy,
    make_layout,
    make_policy,
    per_layer_bytes,
)

ACCOUNTINGS = ("token", "batch")


@dataclass
class AccessStream:
    """Lookups in execution order, grouped into batches (``batch_ptr``)."""

    num_layers: int
    num_experts: int
    accounting: str
    keys: np.ndarray  # [n] int64, layer * E + expert
    batch_ptr: np.ndarray  # [nb + 1]
    batch_layer: np.ndarray
    batch_phase: np.ndarray
    batch_request: np.ndarray
    batch_clock: np.ndarray  # token ordinal (token accounting) or step ordinal (batch)
    weight: np.ndarray  # [n] largest normalised gate weight of the key in its batch
    unimportance: np.ndarray  # [n] HOBBIT's cumulative weight of higher-ranked experts (min)
    count: np.ndarray  # [n] tokens routed to the key in its batch
    expert_bytes: np.ndarray  # [L] bytes of one expert per layer (0 if unknown)
    row_lookup: np.ndarray | None = None  # [rows, k] lookup index of each trace slot
    next_use: np.ndarray = field(init=False)
    clock_ptr: np.ndarray = field(init=False)

    def __post_init__(self):
        n = len(self.keys)
        order = np.argsort(self.keys, kind="stable")
        nxt = np.full(n, n, dtype=np.int64)
        same = self.keys[order[1:]] == self.keys[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
        self.next_use = nxt
        self._by_key = order
        self._key_start = np.searchsorted(self.keys[order], np.arange(self.num_layers * self.num_experts + 1))
        lookup_clock = np.repeat(self.batch_clock, np.diff(self.batch_ptr))
        nclock = int(self.batch_clock.max()) + 1 if len(self.batch_clock) else 0
        self.clock_ptr = np.searchsorted(lookup_clock, np.arange(nclock + 1))

    # -- facts -------------------------------------------------------------------------------------
    @property
    def num_lookups(self) -> int:
        return len(self.keys)

    @property
    def num_batches(self) -> int:
        return len(self.batch_ptr) - 1

    @property
    def key_bytes(self) -> np.ndarray:
        return np.repeat(self.expert_bytes, self.num_experts)

    def lookup_phase(self) -> np.ndarray:
        return np.repeat(self.batch_phase, np.diff(self.batch_ptr))

    def lookup_batch(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_batches), np.diff(self.batch_ptr))

    def load_matrix(self) -> np.ndarray:
        """Tokens routed to each (layer, expert) over the stream, ``[L, E]``."""
        K = self.num_layers * self.num_experts
        return np.bincount(self.keys, weights=self.count, minlength=K).reshape(self.num_layers, self.num_experts)

    def next_use_after(self, key: int, pos: int) -> int:
        """Position of the first lookup of ``key`` at or after ``pos`` (n if none)."""
        lo, hi = self._key_start[key], self._key_start[key + 1]
        positions = self._by_key[lo:hi]
        i = np.searchsorted(positions, pos)
        return int(positions[i]) if i < len(positions) else len(self.keys)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_trace(cls, trace, accounting: str = "token", expert_bytes=None) -> AccessStream:
        """Build from a routing ``Trace`` (streamed by row group). ``expert_bytes`` (scalar or per
        layer) overrides the trace metadata's."""
        if accounting not in ACCOUNTINGS:
            raise CacheError(f"unknown accounting {accounting!r}; choose one of: token, batch")
        meta = trace.meta
        cols = {k: [] for k in ("request_id", "token_pos", "step", "phase", "layer", "expert_ids", "gate_weights")}
        for b in trace.iter_batches():
            for k in cols:
                cols[k].append(getattr(b, k))
        cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
        if expert_bytes is None:
            expert_bytes = meta.expert_bytes
        eb = per_layer_bytes(expert_bytes if expert_bytes is not None else 0, meta.num_layers)
        return cls.from_rows(meta.num_layers, meta.num_experts, cat["request_id"], cat["token_pos"],
                             cat["step"], cat["phase"], cat["layer"], cat["expert_ids"].reshape(-1, meta.top_k),
                             cat["gate_weights"].reshape(-1, meta.top_k), accounting, eb)

    @classmethod
    def from_rows(cls, L, E, request, token_pos, step, phase, layer, experts, weights, accounting, expert_bytes):
        experts = np.asarray(experts, dtype=np.int64)
        n_rows, k = experts.shape
        w = np.asarray(weights, dtype=np.float64)
        tot = w.sum(axis=1, keepdims=True)
        wn = np.divide(w, tot, out=np.full_like(w, 1.0 / max(k, 1)), where=tot > 0)
        # HOBBIT unimportance: normalised weight of the experts ranked above this one
        rank = np.argsort(-wn, axis=1, kind="stable")
        srt = np.take_along_axis(wn, rank, axis=1)
        cum_before = np.cumsum(srt, axis=1) - srt
        unimp = np.empty_like(wn)
        np.put_along_axis(unimp, rank, cum_before, axis=1)
        layer = np.asarray(layer, dtype=np.int64)
        keys = layer[:, None] * E + experts
        request = np.asarray(request, dtype=np.int64)
        token_pos = np.asarray(token_pos, dtype=np.int64)
        new_tok = np.ones(n_rows, dtype=bool)
        if n_rows:
            new_tok[1:] = (request[1:] != request[:-1]) | (token_pos[1:] != token_pos[:-1])
        tok_ord = np.cumsum(new_tok) - 1
        phase = np.asarray(phase, dtype=np.int64)
        eb = np.asarray(expert_bytes, dtype=np.int64)
        if accounting == "token":
            ptr = np.arange(0, n_rows * k + 1, k, dtype=np.int64)
            return cls(L, E, "token", keys.reshape(-1), ptr, layer, phase, request, tok_ord,
                       wn.reshape(-1), unimp.reshape(-1), np.ones(n_rows * k, dtype=np.int64), eb,
                       row_lookup=np.arange(n_rows * k).reshape(n_rows, k))
        # batch accounting: group rows by (step, layer) in order of first appearance of the step
        step = np.asarray(step, dtype=np.int64)
        _, first = np.unique(step, return_index=True)
        step_rank = np.empty(len(first), dtype=np.int64)
        step_order = np.argsort(first, kind="stable")
        step_rank[step_order] = np.arange(len(first))
        step_ord = step_rank[np.searchsorted(np.unique(step), step)]
        group = step_ord * L + layer
        order = np.argsort(group, kind="stable")
        g_flat = np.repeat(group[order], k)
        k_flat = keys[order].reshape(-1)
        combo = g_flat * (L * E) + k_flat
        uniq, inv = np.unique(combo, return_inverse=True)
        inv = inv.reshape(-1)
        # recency within a batch follows each key's *last* use in (token, slot) order: the engine
        # touches an expert for every token it serves (this reproduces the phone run's residency)
        last_idx = np.zeros(len(uniq), dtype=np.int64)
        np.maximum.at(last_idx, inv, np.arange(len(inv)))
        keep = np.argsort(last_idx, kind="stable")  # groups are contiguous, so group-major
        pos_of_uniq = np.empty(len(uniq), dtype=np.int64)
        pos_of_uniq[keep] = np.arange(len(uniq))
        lookup_of_flat = pos_of_uniq[inv]
        n = len(uniq)
        count = np.bincount(lookup_of_flat, minlength=n)
        wmax = np.zeros(n)
        np.maximum.at(wmax, lookup_of_flat, wn[order].reshape(-1))
        umin = np.full(n, np.inf)
        np.minimum.at(umin, lookup_of_flat, unimp[order].reshape(-1))
        lk_keys = uniq[keep] % (L * E)
        lk_group = uniq[keep] // (L * E)
        bounds = np.flatnonzero(np.r_[True, lk_group[1:] != lk_group[:-1]])
        ptr = np.r_[bounds, n].astype(np.int64)
        bgroup = lk_group[bounds]
        first_row = np.zeros(L * (int(step_ord.max()) + 1 if n_rows else 1), dtype=np.int64)
        first_row[group[order][::-1]] = order[::-1]  # earliest row of each group
        frow = first_row[bgroup]
        row_lookup = np.empty((n_rows, k), dtype=np.int64)
        row_lookup[order] = lookup_of_flat.reshape(n_rows, k)
        return cls(L, E, "batch", lk_keys, ptr, bgroup % L, phase[frow], request[frow], bgroup // L,
                   wmax, umin, count, eb, row_lookup=row_lookup)


@dataclass
class ReplayResult:
    policy: str
    capacity: float
    unit: str
    scope: str
    accounting: str
    stats: dict
    stall_s: float | None = None
    hits: np.ndarray | None = None  # [n] per lookup (record=True)
    prefetched: np.ndarray | None = None  # [n] hit thanks to a prefetch
    batch_miss_bytes: np.ndarray | None = None  # [nb]
    batch_misses: np.ndarray | None = None  # [nb]

    def residency(self) -> np.ndarray:
        """Per lookup: 0 miss, 1 hit, 2 hit thanks to a prefetch (the route-trace codes)."""
        out = self.hits.astype(np.int8)
        if self.prefetched is not None:
            out[self.prefetched] = 2
        return out

    def per_clock(self, stream: AccessStream) -> tuple[np.ndarray, np.ndarray]:
        """Miss bytes and miss count per clock (token or step), summed over its batches."""
        n = int(stream.batch_clock.max()) + 1 if stream.num_batches else 0
        return (np.bincount(stream.batch_clock, weights=self.batch_miss_bytes, minlength=n),
                np.bincount(stream.batch_clock, weights=self.batch_misses, minlength=n))

    def summary(self) -> dict:
        s = self.stats
        return {"policy": self.policy, "capacity": self.capacity, "unit": self.unit, "scope": self.scope,
                "accounting": self.accounting, "hit_rate": s["hit_rate"], "hit_rate_decode": s["hit_rate_decode"],
                "lookups": s["lookups"], "misses": s["misses"], "bytes_read": s["bytes_read"],
                "bytes_prefetched": s["bytes_prefetched"], "bypassed": s["bypassed"], "dropped": s["dropped"],
                "stall_s": self.stall_s}


def replay(stream: AccessStream, policy: CachePolicy, *, prefetcher=None, io=None, compute_s: float = 0.0,
           record: bool = False) -> ReplayResult:
    """Replay every batch of ``stream`` through ``policy``.

    ``prefetcher`` (moesim.prefetch) proposes keys for batch b while batch b-1 computes.
    ``io`` (moesim.storage.IOModel) turns each batch's demand-miss reads into stall time; prefetch
    reads overlap ``compute_s`` seconds of the previous batch and stall only beyond it.
    """
    if (policy.oracle or policy.profiled) and policy.stream is not stream:
        policy.bind(stream)
    per_access = stream.accounting == "token"
    keys = stream.keys.tolist()
    ptr = stream.batch_ptr.tolist()
    layers, phases = stream.batch_layer.tolist(), stream.batch_phase.tolist()
    reqs, clocks = stream.batch_request.tolist(), stream.batch_clock.tolist()
    needs = getattr(policy, "needs", ())
    w = stream.weight.tolist() if "weight" in needs else None
    u = stream.unimportance.tolist() if "unimportance" in needs else None
    c = stream.count.tolist() if "count" in needs else None
    nb = len(ptr) - 1
    hits_all = np.zeros(len(keys), dtype=bool) if record else None
    pf_all = np.zeros(len(keys), dtype=bool) if record and prefetcher is not None else None
    miss_bytes = np.zeros(nb, dtype=np.int64)
    misses = np.zeros(nb, dtype=np.int64)
    pf_bytes = np.zeros(nb, dtype=np.int64)
    info = BatchInfo()
    prev_keys: list[int] = []
    if prefetcher is not None:
        prefetcher.bind(stream, policy)
    for b in range(nb):
        lo, hi = ptr[b], ptr[b + 1]
        bk = keys[lo:hi]
        info.layer, info.phase, info.request, info.clock, info.first = layers[b], phases[b], reqs[b], clocks[b], lo
        if w is not None:
            info.weight = w[lo:hi]
        if u is not None:
            info.unimportance = u[lo:hi]
        if c is not None:
            info.count = c[lo:hi]
        pre = None
        if prefetcher is not None:
            before = policy.stats.bytes_prefetched
            want = prefetcher.predict(b)
            if want:
                policy.prefetch(want, b, protect=prev_keys)
            pf_bytes[b] = policy.stats.bytes_prefetched - before
            if pf_all is not None:
                pre = [policy.resident.get(k) == 1 for k in bk]
        st = policy.stats
        b0, m0 = st.bytes_read, st.misses
        out = policy.lookup(bk, b, info, per_access=per_access)
        miss_bytes[b] = st.bytes_read - b0
        misses[b] = st.misses - m0
        if record:
            hits_all[lo:hi] = [x is not False for x in out]
            if pre is not None:
                pf_all[lo:hi] = np.asarray(pre) & np.asarray([x is True for x in out])
        if prefetcher is not None:
            prefetcher.observe(b, bk, out)
        prev_keys = bk
    stall = None
    if io is not None:
        stall = float(sum(io.batch_time(stream, b, miss_bytes[b], misses[b]) for b in range(nb)))
        if prefetcher is not None and pf_bytes.any():
            over = np.maximum(0.0, np.array([io.read_time(x) for x in pf_bytes]) - compute_s)
            stall += float(over.sum())
    lay = policy.layout
    return ReplayResult(policy.name, lay.capacity, lay.unit, lay.scope, stream.accounting,
                        policy.stats.to_dict(), stall, hits_all, pf_all, miss_bytes, misses)


def run_policy(stream: AccessStream, name: str, *, capacity_bytes=None, capacity_experts=None,
               scope="global", seed=0, prefetcher=None, io=None, record=False, pool_caps=None,
               **params) -> ReplayResult:
    """Build a layout and a policy by name, then replay."""
    layout = make_layout(stream.num_layers, stream.num_experts, stream.expert_bytes,
                         capacity_bytes=capacity_bytes, capacity_experts=capacity_experts, scope=scope,
                         pool_caps=pool_caps)
    policy = make_policy(name, layout, seed=seed, **params)
    return replay(stream, policy, prefetcher=prefetcher, io=io, record=record)


# ----- the fast paths --------------------------------------------------------------------------------
def lru_hits(keys: list[int], capacity: int) -> int:
    """Hits of one LRU pool of ``capacity`` equal-size entries over a flat key list, evicting per
    access: the tight loop behind the single-size replay benchmark."""
    if capacity <= 0:
        return 0
    od: OrderedDict = OrderedDict()
    touch, pop = od.move_to_end, od.popitem
    hits = 0
    size = 0
    for k in keys:
        if k in od:
            touch(k)
            hits += 1
        else:
            od[k] = None
            size += 1
            if size > capacity:
                pop(False)
                size -= 1
    return hits


def _pools(stream: AccessStream, scope: str) -> list[np.ndarray]:
    if scope == "global":
        return [stream.keys]
    layer = stream.keys // stream.num_experts
    order = np.argsort(layer, kind="stable")
    bounds = np.searchsorted(layer[order], np.arange(stream.num_layers + 1))
    return [stream.keys[order[bounds[i]:bounds[i + 1]]] for i in range(stream.num_layers)]


def _pool_caps(total: int, scope: str, num_layers: int) -> list[int]:
    if scope == "global":
        return [int(total)]
    base, extra = divmod(int(total), num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]


def lru_curve(stream: AccessStream, capacities, scope: str = "global") -> np.ndarray:
    """LRU hit rate at each capacity (in experts, total over pools).

    Token accounting with equal sizes is a stack algorithm: one stack-distance pass (the
    vectorised ``moesim.traces.stats`` implementation when present) gives every size, hit iff
    distance < pool capacity. Otherwise each size is replayed with the tight loop."""
    caps = [int(c) for c in capacities]
    n = max(stream.num_lookups, 1)
    if stream.accounting != "token":
        return np.array([run_policy(stream, "lru", capacity_experts=c, scope=scope).stats["hit_rate"]
                         for c in caps])
    dist = stack_distances(stream, scope)
    if dist is not None:
        if scope == "global":
            finite = np.sort(dist[dist >= 0])
            return np.searchsorted(finite, np.asarray(caps), side="left") / n
        L, E = stream.num_layers, stream.num_experts
        layer = stream.keys // E
        ok = dist >= 0
        hist = np.bincount(layer[ok] * E + dist[ok], minlength=L * E).reshape(L, E)
        cum = np.concatenate([np.zeros((L, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
        rows = np.arange(L)
        return np.asarray([cum[rows, np.minimum(_pool_caps(c, scope, L), E)].sum() / n for c in caps])
    pools = [p.tolist() for p in _pools(stream, scope)]
    return np.asarray([sum(lru_hits(p, cap) for p, cap in zip(pools, _pool_caps(c, scope, stream.num_layers), strict=False)) / n
                       for c in caps])


def stack_distances(stream: AccessStream, scope: str = "global") -> np.ndarray | None:
    """LRU stack distance of every lookup (-1 on first use) within its pool, from the vectorised
    ``moesim.traces.stats.stack_distances``; None where it does not apply (batch accounting, or
    tokens missing layers) so the caller replays each size instead."""
    if stream.accounting != "token" or stream.num_batches == 0:
        return None
    try:
        from moesim.traces.stats import stack_distances as trace_stack_distances
    except ImportError:
        return None
    L, E = stream.num_layers, stream.num_experts
    widths = np.diff(stream.batch_ptr)
    K = int(widths[0])
    T = stream.num_batches // L
    if (widths != K).any() or T * L != stream.num_batches or \
            (stream.batch_layer != np.tile(np.arange(L), T)).any():
        return None
    experts = (stream.keys % E).reshape(T, L, K)
    return np.asarray(trace_stack_distances(experts, scope), dtype=np.int64)


def belady_hits(keys: np.ndarray, next_use: np.ndarray, capacity: int, row: int = 1) -> int:
    """Hits of Belady MIN (forced admission, per access, equal sizes) over a flat key list whose
    consecutive groups of ``row`` keys are one (token, layer) batch: keys already used in the
    current batch are pinned, as in the policy object."""
    import heapq

    if capacity <= 0:
        return 0
    nu = next_use.tolist()
    nxt: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    hits = 0
    row_keys: set[int] = set()
    for i, k in enumerate(keys.tolist()):
        if i % row == 0:
            row_keys = set()
        if k in nxt:
            hits += 1
        elif len(nxt) >= capacity:
            held = []
            while heap:
                neg, v = pop(heap)
                if nxt.get(v) != -neg:
                    continue
                if v in row_keys:
                    held.append((neg, v))
                    continue
                del nxt[v]
                break
            for entry in held:
                push(heap, entry)
        nxt[k] = nu[i]
        push(heap, (-nu[i], k))
        row_keys.add(k)
    return hits


def belady_curve(stream: AccessStream, capacities, scope: str = "global") -> np.ndarray:
    """Belady MIN hit rate at each capacity (experts, total), token accounting, equal sizes."""
    if stream.accounting != "token":
        return np.array([run_policy(stream, "belady", capacity_experts=c, scope=scope).stats["hit_rate"]
                         for c in capacities])
    pools = _pools(stream, scope)
    n = len(stream.keys)
    out = []
    nus = []
    for keys in pools:
        order = np.argsort(keys, kind="stable")
        nu = np.full(len(keys), len(keys), dtype=np.int64)
        same = keys[order[1:]] == keys[order[:-1]]
        nu[order[:-1][same]] = order[1:][same]
        nus.append(nu)
    for c in capacities:
        caps = _pool_caps(c, scope, stream.num_layers)
        row = max(1, int(np.diff(stream.batch_ptr).max())) if stream.num_batches else 1
        out.append(sum(belady_hits(k, nu, cap, row) for k, nu, cap in zip(pools, nus, caps, strict=False)) / n)
    return np.asarray(out)
