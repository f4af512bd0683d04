"""Cache policies from the MoE-offloading literature, implemented from their published
descriptions (see /docs/offloading.md for what each simplifies).

Policies that score keys keep numpy arrays over all keys and pick the victim with one masked
argmin; that costs O(keys) per eviction, fine for the thousands of keys MoE models have.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from moesim.cache import CacheError, CachePolicy, register
from moesim.cache.classic import LRU


class _ScoredPolicy(CachePolicy):
    """Evict the evictable resident key with the lowest ``keep_score()`` (ties: least recent)."""

    def __init__(self, layout, *, seed=0, **params):
        super().__init__(layout, seed=seed, **params)
        K = layout.num_keys
        self._mask = np.zeros(K, dtype=bool)
        self._last = np.zeros(K)
        self._pool_arr = np.asarray(layout.pool_of)
        self._layer_arr = np.arange(K) // layout.num_experts
        self._tick = 0.0
        self._l_now = 0

    def _begin(self, keys, now, info):
        self._l_now = info.layer
        self._rank = None  # scores are fixed within a batch: computed at its first eviction
        return keys

    def _mark(self, key):
        self._tick += 1.0
        self._last[key] = self._tick

    def _on_hit(self, key, now, j, info):
        self._mark(key)

    def _on_insert(self, key, now, j, info):
        self._mask[key] = True
        self._mark(key)

    def _on_evict(self, key):
        self._mask[key] = False

    def layer_closeness(self) -> np.ndarray:
        """1 for the layer running now, falling linearly with the distance (in execution order,
        wrapping to the next token) to each key's layer."""
        L = self.layout.num_layers
        return 1.0 - ((self._layer_arr - self._l_now) % L) / L

    def keep_score(self) -> np.ndarray:
        raise NotImplementedError

    def _victim(self, pool, pinned):
        if self._rank is None or self._rank_pool != pool:
            cand = self._mask & (self._pool_arr == pool) if len(self.caps) > 1 else self._mask.copy()
            score = self.keep_score()
            # lexicographic (score, recency): recency only breaks ties
            self._rank = np.where(cand, score * 1e9 + self._last / max(self._tick, 1.0), np.inf)
            self._rank_pool = pool
            if pinned:
                self._rank[list(pinned)] = np.inf
        rank = self._rank
        while True:
            v = int(np.argmin(rank))
            if rank[v] == np.inf:
                return None
            rank[v] = np.inf  # evicted (or pinned): never offered twice in this batch
            if v not in pinned and self._mask[v]:
                return v


@register
class MoEInfinity(_ScoredPolicy):
    """MoE-Infinity (Xue et al., arXiv 2401.14361), paper policy: the current request's expert
    activation matrix (EAM, tokens per (layer, expert)) is matched by cosine similarity against a
    collection of past requests' EAMs (EAMC, ``eamc_size`` rows; a new EAM replaces the most
    similar one when full). The best match, row-normalised per layer, predicts each expert's
    activation; eviction removes the lowest ``(prediction + eps) x layer closeness`` (layer decay
    1 - distance/L), ties by in-cache visit count then recency.
    Simplified: the match is refreshed once per token (not per layer); before any request has
    finished the request's own EAM is the prediction."""

    name = "moe-infinity"
    source = "MoE-Infinity paper policy (arXiv 2401.14361): EAM/EAMC prediction + layer decay"
    needs = ("count",)

    def __init__(self, layout, *, seed=0, eamc_size: int = 1000, eps: float = 1e-3, **params):
        super().__init__(layout, seed=seed, **params)
        if int(eamc_size) < 1:
            raise CacheError("moe-infinity eamc_size must be >= 1")
        self.eamc_size, self.eps = int(eamc_size), float(eps)
        K = layout.num_keys
        self._cur = np.zeros(K)
        self._eamc: list[np.ndarray] = []
        self._pred = np.zeros(K)
        self._visits = np.zeros(K)
        self._request = None
        self._clock = None

    def _finish_request(self):
        if not self._cur.any():
            return
        row = self._cur.copy()
        if len(self._eamc) < self.eamc_size:
            self._eamc.append(row)
        else:
            sims = self._similarities(row)
            self._eamc[int(np.argmax(sims))] = row
        self._cur[:] = 0

    def _similarities(self, vec) -> np.ndarray:
        mat = np.asarray(self._eamc)
        norms = np.linalg.norm(mat, axis=1) * (np.linalg.norm(vec) or 1.0)
        return mat @ vec / np.where(norms > 0, norms, 1.0)

    def _predict(self):
        L, E = self.layout.num_layers, self.layout.num_experts
        base = self._eamc[int(np.argmax(self._similarities(self._cur)))] if self._eamc and self._cur.any() else self._cur
        m = base.reshape(L, E)
        tot = m.sum(axis=1, keepdims=True)
        self._pred = np.divide(m, tot, out=np.zeros_like(m), where=tot > 0).reshape(-1)

    def _begin(self, keys, now, info):
        if info.request != self._request:
            self._finish_request()
            self._request = info.request
        if info.clock != self._clock:
            self._clock = info.clock
            self._predict()
        counts = info.count if info.count else [1] * len(keys)
        self._cur[keys] += counts
        return super()._begin(keys, now, info)

    def _on_hit(self, key, now, j, info):
        self._visits[key] += 1
        super()._on_hit(key, now, j, info)

    def _on_insert(self, key, now, j, info):
        self._visits[key] = 1
        super()._on_insert(key, now, j, info)

    def keep_score(self):
        v = self._visits / (self._visits.max() + 1.0)
        return (self._pred + self.eps) * self.layer_closeness() + 1e-6 * v


@register
class HybriMoEMRS(_ScoredPolicy):
    """HybriMoE's Minus Recent Score cache (Zhong et al., DAC'25, arXiv 2504.05897): on every
    visit of layer l, ``S[l] <- alpha * s + (1 - alpha) * S[l]`` where s holds the router scores
    of the top-p experts (p = 2k in the paper); evict the lowest S. Simplified: with only the
    top-k gate weights in a trace, s is the normalised weight of the k selected experts (the
    largest over the batch's tokens). Its dynamic CPU/GPU split is ``moesim.schedule``'s
    ``hybrimoe`` scheduler."""

    name = "hybrimoe"
    source = "HybriMoE MRS cache (arXiv 2504.05897), alpha = 0.5"
    needs = ("weight",)

    def __init__(self, layout, *, seed=0, alpha: float = 0.5, **params):
        super().__init__(layout, seed=seed, **params)
        if not 0 < float(alpha) <= 1:
            raise CacheError("hybrimoe alpha must be in (0, 1]")
        self.alpha = float(alpha)
        self._S = np.zeros(layout.num_keys)

    def _begin(self, keys, now, info):
        E = self.layout.num_experts
        lo = info.layer * E
        self._S[lo:lo + E] *= 1.0 - self.alpha
        if info.weight:
            self._S[keys] += self.alpha * np.asarray(info.weight)
        return super()._begin(keys, now, info)

    def keep_score(self):
        return self._S


def dp_allocation(cost: np.ndarray, total: int, minimum: int = 1) -> list[int]:
    """Slots per layer minimising sum_l cost[l, s_l] subject to sum_l s_l = total, s_l >= minimum
    (AdapMoE's offline knapsack; ``cost[l, s]`` = expected on-demand loads of layer l with s
    cached experts, s = 0..E). Exact dynamic programme, O(L * total * E)."""
    cost = np.asarray(cost, dtype=float)
    L, S1 = cost.shape
    E = S1 - 1
    if total < minimum * L or total > E * L:
        raise CacheError(f"cannot place {total} slots over {L} layers of {E} experts (min {minimum} each)")
    inf = np.inf
    best = np.full(total + 1, inf)
    best[0] = 0.0
    choice = np.zeros((L, total + 1), dtype=np.int64)
    for lay in range(L):
        nxt = np.full(total + 1, inf)
        for s in range(minimum, min(E, total) + 1):
            cand = np.full(total + 1, inf)
            cand[s:] = best[: total + 1 - s] + cost[lay, s]
            better = cand < nxt
            nxt[better] = cand[better]
            choice[lay, better] = s
        best = nxt
    sizes = []
    t = total
    for lay in range(L - 1, -1, -1):
        s = int(choice[lay, t])
        sizes.append(s)
        t -= s
    return sizes[::-1]


def adapmoe_expected_loads(num_experts: int, accuracy: float, top1_ratio: float) -> np.ndarray:
    """AdapMoE's closed-form expected on-demand loads f(s) of a top-2 layer with s of E experts
    cached at random, prefetch accuracy ``accuracy`` and single-expert ratio ``top1_ratio``
    (the paper's formula with 8 and 56 generalised to E and E(E-1))."""
    E = num_experts
    s = np.arange(E + 1, dtype=float)
    acc, r = accuracy, top1_ratio
    pairs = E * (E - 1)
    both = (E - s) * (E - 1 - s) / pairs
    one = (E - s) * s / pairs
    return r * (1 - s / E) * (1 - acc) + (1 - r) * (2 * both * (1 - acc) + both * acc + 2 * one * (1 - acc))


def per_layer_lru_misses(stream, max_slots: int) -> np.ndarray:
    """Misses of a per-layer LRU pool with s = 0..max_slots slots, ``[L, max_slots + 1]``, from
    per-layer stack distances (a list-based stack: a layer has only E keys)."""
    L, E = stream.num_layers, stream.num_experts
    layer = stream.keys // E
    out = np.zeros((L, max_slots + 1))
    for lay in range(L):
        seq = (stream.keys[layer == lay] - lay * E).tolist()
        stack: list[int] = []
        hist = np.zeros(E + 1, dtype=np.int64)
        for k in seq:
            try:
                d = stack.index(k)
                del stack[d]
                hist[d] += 1
            except ValueError:
                hist[E] += 1  # cold miss at every size
            stack.insert(0, k)
        hits_at = np.concatenate([[0], np.cumsum(hist[:E])])[: max_slots + 1]
        out[lay] = len(seq) - hits_at
    return out


@register
class AdapMoE(LRU):
    """AdapMoE (Zhong et al., ICCAD'24, arXiv 2408.10284): adaptive gating drops a lower-ranked
    expert whose renormalised gate weight is below ``threshold`` (the top expert always runs),
    and per-layer LRU caches get sizes from an offline DP minimising expected on-demand loads.
    Simplified: one threshold for all layers (the paper derives T_l = sqrt(0.005 / w_l) from
    Hessian sensitivities we do not have); the DP's per-layer cost is profiled from the bound
    trace's per-layer LRU misses (``allocation='profile'``) or AdapMoE's closed form for top-2
    layers (``allocation='formula'``, needs ``accuracy``). Needs capacity in experts."""

    name = "adapmoe"
    source = "AdapMoE (arXiv 2408.10284): adaptive gating + DP per-layer cache sizes"
    profiled = True
    needs = ("weight",)

    def __init__(self, layout, *, seed=0, threshold: float = 0.1, allocation: str = "profile",
                 accuracy: float = 0.0, **params):
        super().__init__(layout, seed=seed, **params)
        if layout.unit != "experts":
            raise CacheError("adapmoe allocates whole expert slots: give the capacity in experts")
        if allocation not in ("profile", "formula"):
            raise CacheError("adapmoe allocation must be 'profile' or 'formula'")
        self.threshold, self.allocation, self.accuracy = float(threshold), allocation, float(accuracy)
        self.sizes: list[int] | None = None

    def bind(self, stream):
        super().bind(stream)
        L, E = self.layout.num_layers, self.layout.num_experts
        total = int(round(self.layout.capacity))
        if self.allocation == "profile":
            cost = per_layer_lru_misses(stream, E)
        else:
            cost = np.tile(adapmoe_expected_loads(E, self.accuracy, 0.0), (L, 1))
        self.sizes = dp_allocation(cost, max(min(total, L * E), L))
        # re-partition the pools to the DP allocation
        self._pool = [k // E for k in range(L * E)]
        self.caps = [float(s) for s in self.sizes]
        self.used = [0.0] * L
        self._order = [OrderedDict() for _ in range(L)]
        return self

    def _begin(self, keys, now, info):
        if not info.weight:
            return keys
        w = info.weight
        top = max(w)
        return [k if (wj >= self.threshold or wj == top) else None for k, wj in zip(keys, w, strict=False)]


@register
class Hobbit(_ScoredPolicy):
    """HOBBIT (Tang et al., arXiv 2411.01433) mixed-precision offloading: an expert's
    unimportance s = cumulative normalised gate weight of the experts ranked above it. On a miss,
    s <= t1 loads the high-precision copy, s <= t2 a low-precision copy (``low_ratio`` of the
    bytes), else the expert is skipped (lossy). A resident high copy serves a low need. Eviction
    keeps the highest weighted sum of recency, frequency, high-precision use and layer
    closeness (LRU/LFU/LHU/FLD), records reset per request. Simplified: one pool for both
    precisions; equal component weights by default."""

    name = "hobbit"
    source = "HOBBIT (arXiv 2411.01433): T1=0.6, T2=0.9, LRU/LFU/LHU/FLD eviction"
    needs = ("unimportance",)

    def __init__(self, layout, *, seed=0, t1: float = 0.6, t2: float = 0.9, low_ratio: float = 0.25,
                 weights=(0.25, 0.25, 0.25, 0.25), **params):
        base_k = layout.num_keys
        super().__init__(layout, seed=seed, **params)
        if not 0 <= t1 <= t2:
            raise CacheError("hobbit needs 0 <= t1 <= t2")
        if not 0 < low_ratio <= 1:
            raise CacheError("hobbit low_ratio must be in (0, 1]")
        self.t1, self.t2, self.low_ratio = float(t1), float(t2), float(low_ratio)
        self.w = np.asarray(weights, dtype=float)
        # keys >= base_k are the low-precision copies
        self._K = base_k
        self._bytes = self._bytes + [int(round(b * low_ratio)) for b in self._bytes]
        lowcost = [c * low_ratio for c in self._cost] if layout.unit == "bytes" else list(self._cost)
        self._cost = self._cost + lowcost
        self._pool = self._pool + self._pool
        for name in ("_mask", "_last"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(base_k, getattr(self, name).dtype)]))
        self._pool_arr = np.concatenate([self._pool_arr, self._pool_arr])
        self._layer_arr = np.concatenate([self._layer_arr, self._layer_arr])
        self._freq = np.zeros(2 * base_k)
        self._hi_use = np.zeros(2 * base_k)
        self._request = None

    def _begin(self, keys, now, info):
        if info.request != self._request:
            self._request = info.request
            self._freq[:] = 0
            self._hi_use[:] = 0
        out = []
        un = info.unimportance or [0.0] * len(keys)
        for k, s in zip(keys, un, strict=False):
            if s <= self.t1:
                out.append(k)
                self._hi_use[k] += 1
            elif s <= self.t2:
                out.append(k if k in self.resident else k + self._K)
            else:
                out.append(None)
        super()._begin(out, now, info)
        return out

    def _on_hit(self, key, now, j, info):
        self._freq[key] += 1
        super()._on_hit(key, now, j, info)

    def _on_insert(self, key, now, j, info):
        self._freq[key] += 1
        super()._on_insert(key, now, j, info)

    def keep_score(self):
        def norm(x):
            m = x.max()
            return x / m if m > 0 else x

        close = np.tile(self.layer_closeness(), 1) if len(self._layer_arr) == len(self._mask) else None
        return (self.w[0] * norm(self._last) + self.w[1] * norm(self._freq)
                + self.w[2] * norm(self._hi_use) + self.w[3] * close)

    def layer_closeness(self):
        L = self.layout.num_layers
        return 1.0 - ((self._layer_arr - self._l_now) % L) / L


@register
class EdgeMoE(_ScoredPolicy):
    """EdgeMoE (Yi et al., arXiv 2308.14352): experts stored at per-expert bit widths -- the
    least important ``low_fraction`` of each layer at ``low_bits``, the rest at ``base_bits``
    -- so a miss reads that expert's own bytes; eviction keeps the highest activation frequency
    times layer closeness. Simplified: importance is profiled activation frequency (the paper
    ranks experts by measured accuracy loss). Its preloading from the previous layers' experts
    is the ``path`` prefetcher of ``moesim.prefetch``."""

    name = "edgemoe"
    source = "EdgeMoE (arXiv 2308.14352): expert-wise bit widths + frequency x layer-distance eviction"
    profiled = True

    def __init__(self, layout, *, seed=0, low_fraction: float = 0.5, base_bits: int = 8,
                 low_bits: int = 4, **params):
        super().__init__(layout, seed=seed, **params)
        if not 0 <= low_fraction <= 1 or not 0 < low_bits <= base_bits:
            raise CacheError("edgemoe needs 0 <= low_fraction <= 1 and 0 < low_bits <= base_bits")
        self.low_fraction, self.base_bits, self.low_bits = float(low_fraction), int(base_bits), int(low_bits)
        self._freq = np.zeros(layout.num_keys)

    def bind(self, stream):
        super().bind(stream)
        load = stream.load_matrix()
        L, E = load.shape
        n_low = int(round(self.low_fraction * E))
        order = np.argsort(load, axis=1, kind="stable")[:, :n_low]
        scale = np.ones((L, E))
        np.put_along_axis(scale, order, self.low_bits / self.base_bits, axis=1)
        scale = scale.reshape(-1)
        self.bits = (scale * self.base_bits).astype(int)
        self._bytes = [int(round(b * f)) for b, f in zip(self._bytes, scale, strict=False)]
        if self.layout.unit == "bytes":
            self._cost = [c * f for c, f in zip(self._cost, scale, strict=False)]
        return self

    def _begin(self, keys, now, info):
        self._freq[keys] += 1
        return super()._begin(keys, now, info)

    def keep_score(self):
        return self._freq / (self._freq.max() + 1.0) * self.layer_closeness()


@register
class D2MoE(CachePolicy):
    """D2MoE (Wang et al., MobiCom'25, arXiv 2504.15299) nested (Matryoshka) bit widths: an
    expert is cached as bit-slices INT2 < INT3 < INT4 and a token needs the slices up to its
    bit width, so a miss reads only the missing slices. Under the memory budget, the highest
    slices of the least recently used layers are freed first, then lower ones (its budget rule).
    Simplified: the token's bit width comes from its gate weight (>= ``hi`` -> 4 bits,
    >= ``mid`` -> 3, else 2) instead of the trained bit-width router; HEBF load *order* only
    changes timing, which the SimPy model (``moesim.offload``) represents."""

    name = "d2moe"
    source = "D2MoE (arXiv 2504.15299): nested bit widths, slice-level budget eviction"
    needs = ("weight",)
    BITS = (2, 3, 4)

    def __init__(self, layout, *, seed=0, hi: float = 0.3, mid: float = 0.15, full_bits: int = 4, **params):
        super().__init__(layout, seed=seed, **params)
        if layout.unit != "bytes":
            raise CacheError("d2moe caches bit-slices: give the capacity in bytes")
        self.hi, self.mid, self.full_bits = float(hi), float(mid), int(full_bits)
        self.level: dict[int, int] = {}  # key -> resident bits (2, 3 or 4)
        self._layer_tick = np.zeros(layout.num_layers)
        self._tick = 0

    def _slice_bytes(self, key, lo_bits, hi_bits) -> float:
        return self._bytes[key] * (hi_bits - lo_bits) / self.full_bits

    def _need_bits(self, w) -> int:
        return 4 if w >= self.hi else 3 if w >= self.mid else 2

    def lookup(self, keys, now, info=None, *, per_access=False):
        from moesim.cache import BatchInfo

        info = info or BatchInfo()
        st = self.stats
        self._tick += 1
        self._layer_tick[info.layer] = self._tick
        w = info.weight or [1.0] * len(keys)
        out = []
        p = 0
        for key, wj in zip(keys, w, strict=False):
            need = self._need_bits(wj)
            have = self.level.get(key, 0)
            if have >= need:
                out.append(True)
                continue
            out.append(False)
            nbytes = self._slice_bytes(key, have, need)
            st.bytes_read += int(round(nbytes))
            self.used[p] += nbytes
            self.level[key] = need
            self.resident[key] = 0
        if self.used[p] > self.caps[p] + 1e-9:
            self._free(set(keys))
        n, h = len(out), sum(out)
        st.count_batch(n, h, info.phase)
        return out

    def _free(self, touched) -> None:
        """Free slices until the budget holds: the highest bit-slices first, within a bit level
        the least recently used layers first; never a key of the current batch."""
        E = self.layout.num_experts
        cands = sorted((k for k in self.level if k not in touched), key=lambda k: self._layer_tick[k // E])
        for b in (4, 3, 2):
            for key in cands:
                if self.level.get(key) != b:
                    continue
                lower = b - 1 if b > 2 else 0
                self.used[0] -= self._slice_bytes(key, lower, b)
                if lower:
                    self.level[key] = lower
                else:
                    del self.level[key]
                    del self.resident[key]
                    self.stats.evictions += 1
                if self.used[0] <= self.caps[0] + 1e-9:
                    return

    def _victim(self, pool, pinned):
        return None

    def prefetch(self, keys, now, protect=()):
        return []
