"""Statistics of a routing trace, computed in one streaming pass over ``Trace.iter_batches``.

What is measured (all counts are exact; nothing is sampled):

- load ``[L, E]``: tokens routed to each expert (all top-k slots); imbalance = max/mean load per
  layer; routing entropy = Shannon entropy (bits) of each layer's load distribution.
- co-activation ``[L, E, E]``: tokens that chose experts i and j at the same layer (diagonal =
  load); inter-layer affinity ``[L-1, E, E]``: tokens that chose i at layer l and j at l+1.
- reuse: LRU stack distances over (layer, expert) keys, for one global cache ("global") and for
  one cache per layer ("per-layer"); their histograms give exact LRU hit rates for every
  capacity. Also the reuse gap in tokens between two uses of the same (layer, expert).
- working set: distinct (layer, expert) keys in consecutive windows of W tokens.
- SRP and SCH, the two local-routing-consistency metrics of Liang et al., "Not All Models Suit
  Expert Offloading" (arXiv 2505.16056), per layer and over all layers (see ``SegmentStats``).

Accesses are ordered as the trace stores them: token-major, then layer, then slot. Memory is
bounded by the batch size plus per-request state (see ``SegmentStats``), so a 10-million-row
trace streams in well under 1 GB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from moesim.errors import TraceError
from moesim.traces.trace import DEFAULT_BATCH_ROWS, Trace

SCOPES = ("global", "per-layer")
DEFAULT_SEGMENT_LENGTHS = (4, 16, 64, 256)
DEFAULT_WINDOWS = (16,)
# composite sort keys are group * _GROUP_STRIDE + time; times stay far below 2**40
_GROUP_STRIDE = 1 << 40


# ----- the access stream ---------------------------------------------------------------------------
@dataclass
class _Chunk:
    """Rows of one batch with their global token index (tokens numbered in execution order)."""

    layer: np.ndarray  # [n] int64
    experts: np.ndarray  # [n, K] int64
    request_id: np.ndarray  # [n] int64
    token: np.ndarray  # [n] int64, global token index
    token_start: np.ndarray  # [n] bool, row opens a new token (not a continuation across batches)


@dataclass
class _Source:
    num_layers: int
    num_experts: int
    top_k: int
    chunks: Iterator[_Chunk]


def _source(trace_or_arrays, batch_rows: int = DEFAULT_BATCH_ROWS) -> _Source:
    """A stream of row chunks from a routing Trace or an ``experts[T, L, K]`` / ``[T, K]`` array."""
    if isinstance(trace_or_arrays, Trace):
        trace = trace_or_arrays
        if trace.is_counts:
            raise TraceError(
                "this is an aggregate counts trace: reuse distances and locality need per-token routing"
            )
        m = trace.meta
        return _Source(m.num_layers, m.num_experts, m.top_k, _trace_chunks(trace, batch_rows))
    experts = np.asarray(trace_or_arrays)
    if experts.ndim == 2:
        experts = experts[:, None, :]
    if experts.ndim != 3 or experts.dtype.kind not in "iu":
        raise TraceError(
            f"expected a Trace or an integer experts[tokens, layers, top_k] array, got "
            f"{type(trace_or_arrays).__name__} {getattr(experts, 'shape', '')}"
        )
    T, L, K = experts.shape
    E = int(experts.max()) + 1 if experts.size else 1
    return _Source(L, max(E, 1), K, _array_chunks(experts, batch_rows))


def _trace_chunks(trace: Trace, batch_rows: int) -> Iterator[_Chunk]:
    prev_key = None
    next_token = 0
    for b in trace.iter_batches(batch_rows):
        n = len(b)
        if n == 0:
            continue
        key = b.request_id.astype(np.int64) << 32 | b.token_pos.astype(np.int64)
        layer = b.layer.astype(np.int64)
        new_token = np.empty(n, dtype=bool)
        new_token[1:] = key[1:] != key[:-1]
        new_token[0] = prev_key is None or key[0] != prev_key
        # a layer that does not increase inside one token starts a new block (defensive: keeps
        # every token's keys distinct, which the stack-distance pass relies on)
        token_start = new_token.copy()
        token_start[1:] |= layer[1:] <= layer[:-1]
        token = next_token - 1 + np.cumsum(new_token)
        next_token = int(token[-1]) + 1
        prev_key = int(key[-1])
        yield _Chunk(layer, b.expert_ids.astype(np.int64), b.request_id.astype(np.int64), token, token_start)


def _array_chunks(experts: np.ndarray, batch_rows: int) -> Iterator[_Chunk]:
    T, L, K = experts.shape
    tokens_per_chunk = max(1, batch_rows // max(L, 1))
    for start in range(0, T, tokens_per_chunk):
        block = experts[start:start + tokens_per_chunk]
        present = block[:, :, 0] >= 0
        tok, lay = np.nonzero(present)
        ids = block[tok, lay].astype(np.int64)
        if ids.size and ids.min() < 0:
            raise TraceError("experts: a (token, layer) mixes -1 and real expert ids")
        token_start = np.ones(len(tok), dtype=bool)
        token_start[1:] = tok[1:] != tok[:-1]
        yield _Chunk(lay.astype(np.int64), ids, np.zeros(len(tok), np.int64),
                     (tok + start).astype(np.int64), token_start)


# ----- LRU stack distances ----------------------------------------------------------------------------
class StackDistanceTracker:
    """Streaming LRU stack distances over (layer, expert) keys.

    The distance of an access is the number of distinct other keys (of the same layer, for the
    "per-layer" scope) touched since the previous access of the same key, or -1 for a first
    access; an LRU cache of capacity C hits exactly when 0 <= distance < C.

    The stack is kept as each key's last access time. At the start of a token, a key's depth is
    the number of keys of its group used more recently (one ``searchsorted`` on the sorted
    times); inside the token, accesses earlier in the same token that were older than the key
    add one each (a small pairwise count). Keys of one token are distinct, so this is exact.
    Cost: O(D log D + n^2) per token for D keys and n accesses per token, vectorised.
    """

    def __init__(self, num_layers: int, num_experts: int, scope: str = "global"):
        if scope not in SCOPES:
            raise TraceError(f"unknown stack-distance scope {scope!r}; choose one of: {', '.join(SCOPES)}")
        self.scope = scope
        self.num_experts = num_experts
        D = num_layers * num_experts
        keys = np.arange(D, dtype=np.int64)
        self._group_offset = (keys // num_experts) * _GROUP_STRIDE if scope == "per-layer" else np.zeros(D, np.int64)
        self._group_end = ((keys // num_experts) + 1) * num_experts if scope == "per-layer" else np.full(D, D, np.int64)
        self._last = np.full(D, -1, dtype=np.int64)
        self._sort_key = self._group_offset - 1
        self._sorted = np.sort(self._sort_key)
        self._clock = 0
        self._trils: dict[int, np.ndarray] = {}

    def _tril(self, n: int) -> np.ndarray:
        """Strictly lower-triangular mask: entry (r, r') is True for r' < r."""
        if n not in self._trils:
            self._trils[n] = np.tri(n, n, -1, dtype=bool)
        return self._trils[n]

    def feed(self, layer: np.ndarray, experts: np.ndarray, token_start: np.ndarray) -> np.ndarray:
        """Distances of the rows' accesses (row-major: row, then slot); rows in execution order."""
        n_rows, K = experts.shape
        out = np.empty(n_rows * K, dtype=np.int64)
        if n_rows == 0:
            return out
        keys_all = (layer[:, None] * self.num_experts + experts).reshape(-1)
        starts = np.flatnonzero(token_start)
        if len(starts) == 0 or starts[0] != 0:
            starts = np.r_[0, starts]
        bounds = np.r_[starts, n_rows] * K
        tril = self._tril(K)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            keys = keys_all[a:b]
            prev = self._last[keys]
            depth = self._group_end[keys] - np.searchsorted(self._sorted, self._sort_key[keys], side="right")
            if self.scope == "per-layer":
                p = prev.reshape(-1, K)
                older_before = ((p[:, None, :] < p[:, :, None]) & tril).sum(axis=2).reshape(-1)
            else:
                n = b - a
                older_before = ((prev[None, :] < prev[:, None]) & self._tril(n)).sum(axis=1)
            out[a:b] = np.where(prev >= 0, depth + older_before, -1)
            times = self._clock + np.arange(b - a, dtype=np.int64)
            self._clock += b - a
            self._last[keys] = times
            self._sort_key[keys] = self._group_offset[keys] + times
            self._sorted = np.sort(self._sort_key)
        return out


def stack_distances(trace_or_arrays, scope: str = "global") -> np.ndarray:
    """LRU stack distance of every access in execution order (token, then layer, then slot).

    ``trace_or_arrays`` is a routing ``Trace`` or an ``experts[T, L, K]`` array (-1 where a
    layer is absent). Keys are (layer, expert). ``scope`` "global": one stack over all keys;
    "per-layer": one stack per layer. First accesses are -1. Holds one int64 per access.
    """
    src = _source(trace_or_arrays)
    tracker = StackDistanceTracker(src.num_layers, src.num_experts, scope)
    parts = [tracker.feed(c.layer, c.experts, c.token_start) for c in src.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _distance_histogram(trace_or_arrays, scope: str) -> tuple[np.ndarray, int, int]:
    """(histogram of distances >= 0, first accesses, total accesses), streamed."""
    src = _source(trace_or_arrays)
    tracker = StackDistanceTracker(src.num_layers, src.num_experts, scope)
    size = src.num_experts if scope == "per-layer" else src.num_layers * src.num_experts
    hist = np.zeros(size, dtype=np.int64)
    cold = total = 0
    for c in src.chunks:
        d = tracker.feed(c.layer, c.experts, c.token_start)
        total += len(d)
        cold += int((d < 0).sum())
        hist += np.bincount(d[d >= 0], minlength=size)
    return hist, cold, total


def hit_curve_from_histogram(hist: np.ndarray, total: int, capacities) -> np.ndarray:
    """LRU hit rate for each capacity: share of accesses with 0 <= distance < capacity."""
    caps = np.asarray(capacities, dtype=np.int64)
    if caps.size and caps.min() < 0:
        raise TraceError("cache capacities must be non-negative")
    if total == 0:
        return np.zeros(caps.shape, dtype=np.float64)
    cum = np.r_[0, np.cumsum(hist)]
    return cum[np.minimum(caps, len(hist))] / total


def lru_hit_curve(trace_or_arrays, capacities=None, scope: str = "global") -> np.ndarray:
    """Hit rate of a token-accounted LRU cache of each capacity (experts; per layer for the
    "per-layer" scope) over the whole trace, from one stack-distance pass.

    ``capacities`` defaults to every size 0..D (D = keys in one stack), so the result's index
    is the capacity.
    """
    hist, _, total = _distance_histogram(trace_or_arrays, scope)
    if capacities is None:
        capacities = np.arange(len(hist) + 1)
    return hit_curve_from_histogram(hist, total, capacities)


# ----- per-layer aggregates -------------------------------------------------------------------------
def imbalance(load: np.ndarray) -> np.ndarray:
    """max/mean load of each layer (NaN for a layer with no load)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, load.max(axis=-1) / np.where(mean > 0, mean, 1), np.nan)


def routing_entropy(load: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each layer's expert-load distribution (NaN with no load)."""
    load = np.asarray(load, dtype=np.float64)
    total = load.sum(axis=-1, keepdims=True)
    p = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0)).sum(axis=-1)
    return np.where(total[..., 0] > 0, h, np.nan)


def pair_pmi(coactivation: np.ndarray, load: np.ndarray, top_k: int) -> np.ndarray:
    """Per layer, the mean pointwise mutual information (nats) of the expert pairs tokens choose
    together, weighted by how often they do: sum P(e,f) log(P(e,f) / (P(e) P(f))) / sum P(e,f)
    over e != f, with P per (token, layer) row. 0 when every row picks the same experts;
    below 0 for independent choices (a top-k never repeats an expert); above 0 when experts
    come in groups tokens choose together (NaN with no pairs)."""
    C = np.asarray(coactivation, dtype=np.float64)
    L, E, _ = C.shape
    rows = np.asarray(load, dtype=np.float64).sum(axis=-1) / top_k  # rows with a full top-k
    out = np.full(L, np.nan)
    off = ~np.eye(E, dtype=bool)
    for lay in range(L):
        if rows[lay] <= 0:
            continue
        joint = C[lay][off] / rows[lay]
        single = np.asarray(load[lay], dtype=np.float64) / rows[lay]
        indep = np.outer(single, single)[off]
        seen = joint > 0
        if seen.any():
            out[lay] = float((joint[seen] * np.log(joint[seen] / indep[seen])).sum() / joint[seen].sum())
    return out


def pair_pmi_of(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``pair_pmi`` per layer of token-major routing ``experts[T, L, K]`` (rows with a missing
    expert left out), its co-activation counted as ``compute_stats`` counts it."""
    T, L, K = experts.shape
    x = experts.reshape(T * L, K).astype(np.int64)
    layer = np.tile(np.arange(L), T)
    ok = (x >= 0).all(axis=1)
    pairs = _PairCounter(L, num_experts)
    pairs.add(layer[ok], x[ok], x[ok])
    C = pairs.matrix()
    return pair_pmi(C, np.diagonal(C, axis1=1, axis2=2), K)


class _PairCounter:
    """Counts (layer, i, j) pairs into a flat ``[groups * E * E]`` histogram, in sub-batches."""

    def __init__(self, groups: int, num_experts: int):
        self.E = num_experts
        self.counts = np.zeros(groups * num_experts * num_experts, dtype=np.int64)

    def add(self, group: np.ndarray, left: np.ndarray, right: np.ndarray, step: int = 1 << 15) -> None:
        E = self.E
        for s in range(0, len(group), step):
            g, a, b = group[s:s + step], left[s:s + step], right[s:s + step]
            idx = (g[:, None, None] * E + a[:, :, None]) * E + b[:, None, :]
            self.counts += np.bincount(idx.reshape(-1), minlength=len(self.counts))

    def matrix(self) -> np.ndarray:
        return self.counts.reshape(-1, self.E, self.E)


# ----- SRP and SCH ------------------------------------------------------------------------------------
_BLOCK_TOKENS = 1024  # tokens per vectorised step of the SRP/SCH passes (bounds their memory)


class _Request:
    """Per-request state of the SRP/SCH pass: a buffer of recent tokens and the SCH cache."""

    def __init__(self, L: int, E: int, K: int, n_m: int, n_c: int):
        self.tokens = np.zeros((0, L, K), dtype=np.int16)  # [n, L, K], -1 where a layer is absent
        self.start = 0  # request-local index of tokens[0]
        self.last_token = -1  # global token id of tokens[-1]
        self.srp_done = 0  # tokens whose windows (ending there) are counted
        self.sch_done = 0  # tokens served by the SCH caches
        self.resident = np.zeros((n_m, n_c, L, E), dtype=bool)
        self.last_use = np.full((L, E), -1, dtype=np.int64)
        self.seen = np.zeros((L, E), dtype=bool)
        self.seen_count = np.zeros(L, dtype=np.int64)  # distinct experts used so far, per layer
        self.held = np.zeros((n_m, n_c, L), dtype=np.int64)  # residents per cache
        self.clock = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class SegmentStats:
    """SRP and SCH (Liang et al., arXiv 2505.16056), per layer, over each request's tokens.

    SRP(m) (segment routing best performance): for every window of m consecutive tokens of a
    request, predict the window's routing at a layer by one fixed expert group: the experts
    activated at least t times in the window. Precision and recall of that prediction against
    the window's actual (token, expert) activations, summed over all windows (and layers), give
    an F1 for each threshold t = 0..m; SRP is the best F1 over t (reported with its t).

    SCH(m, C) (segment cache best hit rate): a cache of C experts per layer serves each token's
    k experts (a hit if resident when the token starts); after the token, misses are admitted
    and, if over capacity, the residents not used by this token with the fewest activations in
    the next m tokens are evicted, ties to the least recently used. As in the authors' released
    code, a first use counts as a hit while fewer than C distinct experts have been used (an
    oracle fills empty slots ahead of time). Each request starts with an empty cache.

    Requests are followed as rows stream in, keeping per open request only the last m tokens
    and the cache state; a request is closed once a whole batch passes without it. One that
    reappears later is counted in ``resumed_requests`` and its parts are separate sequences.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 segment_lengths: Sequence[int], cache_sizes: Sequence[int]):
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.seg = sorted({int(m) for m in segment_lengths})
        self.caps = sorted({int(c) for c in cache_sizes})
        if any(m < 1 for m in self.seg):
            raise TraceError(f"segment lengths must be positive, got {self.seg}")
        if any(c < 1 for c in self.caps):
            raise TraceError(f"cache sizes must be positive, got {self.caps}")
        self.m_max = max(self.seg, default=1)
        # SRP: per m, per layer, histogram of (window, expert) activation counts 0..m
        self.srp_hist = [np.zeros((num_layers, m + 1), dtype=np.int64) for m in self.seg]
        # SCH: hits per (m, C, layer) and accesses per layer
        self.sch_hits = np.zeros((len(self.seg), len(self.caps), num_layers), dtype=np.int64)
        self.sch_accesses = np.zeros(num_layers, dtype=np.int64)
        self._open: dict[int, _Request] = {}
        self._closed: set[int] = set()
        self.resumed_requests = 0
        self.requests = 0

    # --- following requests
    def feed(self, chunk: _Chunk) -> None:
        req = chunk.request_id
        order = np.argsort(req, kind="stable")
        uniq, first = np.unique(req[order], return_index=True)
        bounds = np.r_[first, len(order)]
        present = set(uniq.tolist())
        for r, a, b in zip(uniq.tolist(), bounds[:-1], bounds[1:], strict=True):
            rows = order[a:b]
            state = self._open.get(r)
            if state is None:
                if r in self._closed:
                    self.resumed_requests += 1
                state = self._open[r] = _Request(self.L, self.E, self.K, len(self.seg), len(self.caps))
                self.requests += 1
            self._append(state, chunk.token[rows], chunk.layer[rows], chunk.experts[rows])
            self._advance(state, final=False)
        for r in [r for r in self._open if r not in present]:
            self._close(r)

    def finish(self) -> None:
        for r in list(self._open):
            self._close(r)

    def _close(self, request: int) -> None:
        self._advance(self._open.pop(request), final=True)
        self._closed.add(request)

    def _append(self, state: _Request, token: np.ndarray, layer: np.ndarray, experts: np.ndarray) -> None:
        # rows are in execution order, so token ids only grow: number them by change points
        change = np.r_[True, token[1:] != token[:-1]]
        uniq, local = token[change], np.cumsum(change) - 1
        block = np.full((len(uniq), self.L, self.K), -1, dtype=np.int16)
        block[local, layer] = experts
        if uniq[0] == state.last_token:  # a token split across two batches: merge its layers
            got = block[0, :, 0] >= 0
            state.tokens[-1, got] = block[0, got]
            block = block[1:]
        state.tokens = np.concatenate([state.tokens, block])
        state.last_token = int(uniq[-1])

    def _advance(self, state: _Request, final: bool) -> None:
        # the newest token may continue in the next batch: hold it back until the request closes
        ready = state.end if final else state.end - 1
        while state.srp_done < ready:
            stop = min(ready, state.srp_done + _BLOCK_TOKENS)
            self._add_srp(state, state.srp_done, stop)
            state.srp_done = stop
        sch_ready = ready if final else ready - self.m_max
        while state.sch_done < sch_ready:
            stop = min(sch_ready, state.sch_done + _BLOCK_TOKENS)
            self._add_sch(state, state.sch_done, stop, ready)
            state.sch_done = stop
        keep_from = min(state.srp_done - self.m_max + 1, state.sch_done)
        if keep_from > state.start:
            state.tokens = state.tokens[keep_from - state.start:]
            state.start = keep_from

    def _cumulative(self, state: _Request, lo: int, hi: int) -> np.ndarray:
        """Activations per (layer, expert) summed over request tokens [lo, lo + i), i = 0..hi-lo."""
        toks = state.tokens[lo - state.start:hi - state.start]
        onehot = np.zeros((len(toks), self.L, self.E), dtype=np.int32)
        t, lay, s = np.nonzero(toks >= 0)
        onehot[t, lay, toks[t, lay, s]] = 1
        cum = np.zeros((len(toks) + 1, self.L, self.E), dtype=np.int32)
        np.cumsum(onehot, axis=0, out=cum[1:])
        return cum

    # --- SRP: windows ending at tokens [e0, e1)
    def _add_srp(self, state: _Request, e0: int, e1: int) -> None:
        lo = max(0, e0 - self.m_max + 1)
        cum = self._cumulative(state, lo, e1)
        lay = np.arange(self.L)[None, :, None]
        for i, m in enumerate(self.seg):
            first_end = max(e0, m - 1)
            if first_end >= e1:
                continue
            ends = np.arange(first_end, e1) + 1 - lo
            window = cum[ends] - cum[ends - m]  # [windows, L, E] activations per window
            idx = lay * (m + 1) + window
            self.srp_hist[i] += np.bincount(idx.reshape(-1), minlength=self.L * (m + 1)).reshape(self.L, m + 1)

    # --- SCH: serve tokens [t0, t1), looking ahead up to token ``ready``
    def _add_sch(self, state: _Request, t0: int, t1: int, ready: int) -> None:
        L, E, K = self.L, self.E, self.K
        n_m, n_c = len(self.seg), len(self.caps)
        V = n_m * n_c  # one cache per (m, C) variant and layer
        hi = min(ready, t1 + self.m_max)
        cum = self._cumulative(state, t0, hi)
        n_cum = len(cum) - 1
        caps = np.tile(np.array(self.caps, dtype=np.int64), n_m)  # [V]
        seg = np.array(self.seg, dtype=np.int64)
        big = np.int64(1) << 40
        never = np.iinfo(np.int64).max
        resident = state.resident.reshape(V, L * E)  # views: updates land in the state
        held = state.held.reshape(V, L)
        last_use = state.last_use.reshape(L * E)
        seen = state.seen.reshape(L * E)
        hits_out = self.sch_hits.reshape(V, L)
        for t in range(t0, t1):
            toks = state.tokens[t - state.start]  # [L, K]
            lay, slot = np.nonzero(toks >= 0)  # accesses sorted by layer
            if len(lay) == 0:
                continue
            key = lay * E + toks[lay, slot]
            layers, starts, n_acc = np.unique(lay, return_index=True, return_counts=True)
            self.sch_accesses[layers] += n_acc
            was_resident = resident[:, key]  # [V, accesses]
            hits = np.add.reduceat(was_resident, starts, axis=1)  # [V, layers]
            new = np.add.reduceat(~seen[key], starts)  # first uses, per layer
            prior = state.seen_count[layers]  # distinct experts used before this token
            hits_out[:, layers] += hits + np.clip(caps[:, None] - prior, 0, new)
            seen[key] = True
            state.seen_count[layers] += new
            # recency ties: later layers and slots of one token count as more recent
            last_use[key] = state.clock + lay * K + slot
            state.clock += L * K
            held[:, layers] += n_acc - hits
            resident[:, key] = True
            over = held - caps[:, None]  # [V, L]
            v, lr = np.nonzero(over > 0)
            if len(v) == 0:
                continue
            r = t - t0
            future = cum[np.minimum(r + 1 + seg, n_cum)] - cum[r + 1]  # [M, L, E] uses in t+1..t+m
            need = np.zeros((L, E), dtype=bool)
            need.reshape(-1)[key] = True
            rows = resident.reshape(V, L, E)[v, lr]  # [R, E]
            score = np.where(rows & ~need[lr], future[v // n_c, lr] * big + last_use.reshape(L, E)[lr], never)
            n_out = over[v, lr]
            kmax = int(n_out.max())
            # the kmax lowest scores per row, then the first n_out of them in order
            cand = np.argpartition(score, kmax - 1, axis=1)[:, :kmax] if kmax < E else np.argsort(score, axis=1)
            cand_score = np.take_along_axis(score, cand, axis=1)
            order = np.argsort(cand_score, axis=1)
            cand = np.take_along_axis(cand, order, axis=1)
            # a cache smaller than one token's experts keeps them until the next token
            out = (np.arange(cand.shape[1]) < n_out[:, None]) & (np.take_along_axis(cand_score, order, axis=1) < never)
            ri, ci = np.nonzero(out)
            resident[v[ri], lr[ri] * E + cand[ri, ci]] = False
            np.subtract.at(held, (v[ri], lr[ri]), 1)

    # --- results
    def srp(self) -> dict:
        out = {}
        for m, hist in zip(self.seg, self.srp_hist, strict=True):
            c = np.arange(m + 1)
            # suffix sums over thresholds t: matched activations and predicted (token, expert) pairs
            matched = np.cumsum((hist * c)[:, ::-1], axis=1)[:, ::-1]
            predicted = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1] * m
            actual = matched[:, :1]
            f1_layer = _f1(matched, predicted, actual)
            f1_all = _f1(matched.sum(0), predicted.sum(0), actual.sum(0))
            windows = int(hist[0].sum() // self.E)
            best = int(np.argmax(f1_all)) if windows else None
            out[m] = {
                "srp": float(f1_all[best]) if windows else None,
                "threshold": best,
                "windows": windows,
                "per_layer": [float(x) for x in f1_layer.max(axis=1)] if windows else None,
            }
        return out

    def sch(self) -> dict:
        total = int(self.sch_accesses.sum())
        out = {}
        for i, m in enumerate(self.seg):
            row = {}
            for j, c in enumerate(self.caps):
                hits = self.sch_hits[i, j]
                per_layer = [float(h / a) if a else None for h, a in zip(hits, self.sch_accesses, strict=True)]
                row[c] = {"sch": float(hits.sum() / total) if total else None, "per_layer": per_layer}
            out[m] = row
        return out


def _f1(matched, predicted, actual) -> np.ndarray:
    denom = predicted + actual
    return np.divide(2.0 * matched, denom, out=np.zeros(np.shape(matched), dtype=np.float64), where=denom > 0)


# ----- the whole report --------------------------------------------------------------------------
@dataclass
class TraceStats:
    """Everything ``moesim trace stats`` reports; arrays are numpy."""

    kind: str
    model: str
    tokens: int
    rows: int
    layers: int
    experts: int
    top_k: int
    load: np.ndarray  # [L, E]
    imbalance: np.ndarray  # [L]
    entropy_bits: np.ndarray  # [L]
    coactivation: np.ndarray | None = None  # [L, E, E]
    affinity: np.ndarray | None = None  # [L-1, E, E]
    reuse: dict = field(default_factory=dict)  # scope -> {"histogram", "first_accesses", "accesses"}
    reuse_gap_tokens: np.ndarray | None = None  # [max gap + 1] uses of a key by token gap
    working_set: dict = field(default_factory=dict)  # W -> per-window distinct keys
    srp: dict = field(default_factory=dict)
    sch: dict = field(default_factory=dict)
    cache_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def imbalance_mean(self) -> float | None:
        vals = self.imbalance[~np.isnan(self.imbalance)]
        return float(vals.mean()) if len(vals) else None

    @property
    def entropy_mean(self) -> float | None:
        vals = self.entropy_bits[~np.isnan(self.entropy_bits)]
        return float(vals.mean()) if len(vals) else None

    def lru_hit_rates(self, scope: str, capacities) -> np.ndarray | None:
        r = self.reuse.get(scope)
        if r is None:
            return None
        return hit_curve_from_histogram(r["histogram"], r["accesses"], capacities)

    def summary(self) -> dict:
        """Scalars and short lists (what the text output shows)."""
        out = {
            "kind": self.kind, "model": self.model, "tokens": self.tokens, "rows": self.rows,
            "layers": self.layers, "experts": self.experts, "top_k": self.top_k,
            "imbalance_mean": self.imbalance_mean, "imbalance_max": _nanmax(self.imbalance),
            "entropy_mean_bits": self.entropy_mean, "entropy_max_bits": float(np.log2(self.experts)),
        }
        if self.coactivation is not None and self.top_k > 1:
            pmi = pair_pmi(self.coactivation, self.load, self.top_k)
            out["pair_pmi_mean"] = float(np.nanmean(pmi)) if (~np.isnan(pmi)).any() else None
        for scope, r in self.reuse.items():
            name = scope.replace("-", "_")
            d = _hist_quantiles(r["histogram"], (0.5, 0.9))
            out[f"reuse_{name}"] = {
                "accesses": r["accesses"], "first_accesses": r["first_accesses"],
                "median_distance": d[0], "p90_distance": d[1],
                "lru_hit_rate": {c: float(h) for c, h in zip(
                    self.cache_sizes, self.lru_hit_rates(scope, self._capacities(scope)), strict=True)},
            }
        if self.reuse_gap_tokens is not None:
            g = self.reuse_gap_tokens
            out["reuse_gap_1_share"] = float(g[1] / g.sum()) if len(g) > 1 and g.sum() else None
        for w, sizes in self.working_set.items():
            out[f"working_set_w{w}"] = {"windows": len(sizes), "mean": _mean(sizes),
                                         "max": int(sizes.max()) if len(sizes) else None}
        if self.srp:
            out["srp"] = {m: v["srp"] for m, v in self.srp.items()}
        if self.sch:
            out["sch"] = {m: {c: v["sch"] for c, v in row.items()} for m, row in self.sch.items()}
        if self.notes:
            out["notes"] = self.notes
        return out

    def _capacities(self, scope: str) -> list[int]:
        # the global cache holds the same experts per layer as a per-layer cache: C * layers
        return self.cache_sizes if scope == "per-layer" else [c * self.layers for c in self.cache_sizes]

    def to_dict(self, full: bool = True) -> dict:
        """JSON-ready dict: the summary, per-layer arrays, load, histograms, working sets, SRP/SCH
        detail; with ``full`` also the [L, E, E] co-activation and affinity matrices."""
        out = self.summary()
        out["imbalance"] = self.imbalance
        out["entropy_bits"] = self.entropy_bits
        out["load"] = self.load
        out["reuse_histograms"] = {s: {"histogram": r["histogram"], "first_accesses": r["first_accesses"],
                                       "accesses": r["accesses"]} for s, r in self.reuse.items()}
        if self.reuse_gap_tokens is not None:
            out["reuse_gap_tokens"] = self.reuse_gap_tokens
        out["working_set"] = {w: s for w, s in self.working_set.items()}
        out["srp_detail"] = self.srp
        out["sch_detail"] = self.sch
        if full and self.coactivation is not None:
            out["coactivation"] = self.coactivation
            out["affinity"] = self.affinity
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Named arrays for ``np.savez`` (``--out stats.npz``)."""
        out = {"load": self.load, "imbalance": self.imbalance, "entropy_bits": self.entropy_bits}
        if self.coactivation is not None:
            out["coactivation"] = self.coactivation
            out["affinity"] = self.affinity
        for scope, r in self.reuse.items():
            out[f"reuse_hist_{scope.replace('-', '_')}"] = r["histogram"]
        if self.reuse_gap_tokens is not None:
            out["reuse_gap_tokens"] = self.reuse_gap_tokens
        for w, sizes in self.working_set.items():
            out[f"working_set_w{w}"] = sizes
        return out


def _nanmax(a: np.ndarray) -> float | None:
    vals = a[~np.isnan(a)]
    return float(vals.max()) if len(vals) else None


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if len(a) else None


def _hist_quantiles(hist: np.ndarray, qs) -> list[int | None]:
    total = hist.sum()
    if total == 0:
        return [None for _ in qs]
    cum = np.cumsum(hist)
    return [int(np.searchsorted(cum, q * total)) for q in qs]


def compute_stats(
    trace: Trace,
    segment_lengths: Sequence[int] = DEFAULT_SEGMENT_LENGTHS,
    cache_sizes: Sequence[int] | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> TraceStats:
    """All statistics of ``trace`` in one streaming pass (a counts trace gets load-based ones).

    ``cache_sizes`` are experts per layer (default k, 2k, 4k); the global-scope LRU hit rates
    use the same number of experts in total (C x layers).
    """
    meta = trace.meta
    L, E, K = meta.num_layers, meta.num_experts, meta.top_k
    if cache_sizes is None:
        cache_sizes = [K, 2 * K, 4 * K]
    cache_sizes = sorted({int(c) for c in cache_sizes})
    windows = sorted({int(w) for w in windows})
    if any(w < 1 for w in windows):
        raise TraceError("working-set windows must be at least 1 token")
    if trace.is_counts:
        load = trace.load_matrix()
        tokens = int(load.sum(axis=1).max() // K) if load.size else 0
        return TraceStats(
            kind=meta.kind, model=meta.model, tokens=tokens, rows=trace.num_rows, layers=L, experts=E,
            top_k=K, load=load, imbalance=imbalance(load), entropy_bits=routing_entropy(load),
            cache_sizes=cache_sizes,
            notes=["aggregate counts trace: tokens = largest per-layer count / top_k; per-token "
                   "statistics (co-activation, reuse, working set, SRP, SCH) need a routing trace"],
        )

    load = np.zeros(L * E, dtype=np.int64)
    coact = _PairCounter(L, E)
    affinity = _PairCounter(max(L - 1, 1), E)
    trackers = {s: StackDistanceTracker(L, E, s) for s in SCOPES}
    reuse = {s: {"histogram": np.zeros(E if s == "per-layer" else L * E, np.int64),
                 "first_accesses": 0, "accesses": 0} for s in SCOPES}
    last_token = np.full(L * E, -1, dtype=np.int64)
    gaps = np.zeros(1, dtype=np.int64)
    ws = {w: _WorkingSet(w, L * E) for w in windows}
    segments = SegmentStats(L, E, K, segment_lengths, cache_sizes) if len(segment_lengths) else None
    rows = tokens = 0
    carry = None  # last row of the previous chunk, for inter-layer pairs across chunk borders
    for c in _trace_chunks(trace, batch_rows):
        n = len(c.layer)
        rows += n
        tokens = int(c.token[-1]) + 1
        keys = c.layer[:, None] * E + c.experts  # [n, K]
        load += np.bincount(keys.reshape(-1), minlength=L * E)
        coact.add(c.layer, c.experts, c.experts)
        # inter-layer: consecutive rows of one token at layers l and l + 1
        lay, tok, exp = c.layer, c.token, c.experts
        if carry is not None:
            lay, tok, exp = np.r_[carry[0], lay], np.r_[carry[1], tok], np.concatenate([carry[2], exp])
        pair = np.flatnonzero((tok[1:] == tok[:-1]) & (lay[1:] == lay[:-1] + 1))
        affinity.add(lay[pair], exp[pair], exp[pair + 1])
        carry = (c.layer[-1:], c.token[-1:], c.experts[-1:])
        for s, tracker in trackers.items():
            d = tracker.feed(c.layer, c.experts, c.token_start)
            r = reuse[s]
            r["accesses"] += len(d)
            r["first_accesses"] += int((d < 0).sum())
            r["histogram"] += np.bincount(d[d >= 0], minlength=len(r["histogram"]))
        gaps = _add_gaps(gaps, keys, c.token, last_token)
        for w in ws.values():
            w.add(keys, c.token)
        if segments is not None:
            segments.feed(c)
    if segments is not None:
        segments.finish()

    load = load.reshape(L, E)
    notes = []
    if segments is not None and segments.resumed_requests:
        notes.append(f"{segments.resumed_requests} requests were interrupted for a whole batch; "
                     "their parts count as separate sequences in SRP/SCH")
    return TraceStats(
        kind=meta.kind, model=meta.model, tokens=tokens, rows=rows, layers=L, experts=E, top_k=K,
        load=load, imbalance=imbalance(load), entropy_bits=routing_entropy(load),
        coactivation=coact.matrix(), affinity=affinity.matrix()[: L - 1],
        reuse=reuse, reuse_gap_tokens=gaps, working_set={w: s.sizes(tokens) for w, s in ws.items()},
        srp=segments.srp() if segments else {}, sch=segments.sch() if segments else {},
        cache_sizes=cache_sizes, notes=notes,
    )


def _add_gaps(gaps: np.ndarray, keys: np.ndarray, token: np.ndarray, last_token: np.ndarray) -> np.ndarray:
    """Histogram of token gaps between consecutive uses of one (layer, expert) key."""
    flat = keys.reshape(-1)
    tok = np.repeat(token, keys.shape[1])
    # previous use inside this chunk, else the carried last use
    order = np.argsort(flat, kind="stable")
    fk, ft = flat[order], tok[order]
    prev = np.empty_like(ft)
    same = np.r_[False, fk[1:] == fk[:-1]]
    prev[same] = ft[:-1][same[1:]]
    prev[~same] = last_token[fk[~same]]
    gap = ft - prev
    gap = gap[prev >= 0]
    last_token[fk[np.r_[~same[1:], True]]] = ft[np.r_[~same[1:], True]]
    counts = np.bincount(gap) if len(gap) else np.zeros(1, np.int64)
    if len(counts) > len(gaps):
        gaps = np.r_[gaps, np.zeros(len(counts) - len(gaps), np.int64)]
    gaps[: len(counts)] += counts
    return gaps


class _WorkingSet:
    """Distinct (layer, expert) keys in each complete window of ``w`` consecutive tokens."""

    def __init__(self, w: int, num_keys: int):
        self.w = w
        self.D = num_keys
        self._done: list[np.ndarray] = []
        self._open_window = -1
        self._open_seen = np.zeros(num_keys, dtype=bool)

    def add(self, keys: np.ndarray, token: np.ndarray) -> None:
        window = np.repeat(token // self.w, keys.shape[1])
        first, last = int(window[0]), int(window[-1])
        # mark (window, key) in a dense table: cheaper than sorting the chunk's accesses
        marks = np.zeros((last - first + 1, self.D), dtype=bool)
        marks[window - first, keys.reshape(-1)] = True
        win, key = np.nonzero(marks)
        win += first
        if first != self._open_window:
            self._close_open()
            self._open_window = first
        # windows are token ranges and tokens only move forward: all but the last are complete
        self._open_seen[key[win == first]] = True
        if last == first:
            return
        self._close_open()
        counts = np.bincount(win - first)
        self._done.append(counts[1:-1])
        self._open_window = last
        self._open_seen[key[win == last]] = True

    def _close_open(self) -> None:
        if self._open_window >= 0:
            self._done.append(np.array([self._open_seen.sum()], dtype=np.int64))
        self._open_seen = np.zeros(self.D, dtype=bool)
        self._open_window = -1

    def sizes(self, tokens: int) -> np.ndarray:
        """Sizes of the complete windows (a last partial window is left out)."""
        done = list(self._done)
        if self._open_window >= 0 and (self._open_window + 1) * self.w <= tokens:
            done.append(np.array([self._open_seen.sum()], dtype=np.int64))
        return np.concatenate(done).astype(np.int64) if done else np.zeros(0, np.int64)
