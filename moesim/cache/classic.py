"""Classic replacement policies (LRU, FIFO, LIFO, LFU, random), static popularity placement
and Expert Buffering. Each keeps its own order per pool; the base class does the accounting."""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict

import numpy as np

from moesim.cache import CacheError, CachePolicy, pop_unpinned, register


class _OrderedPolicy(CachePolicy):
    """Keys in one OrderedDict per pool; subclasses choose the end to evict from and whether a
    hit refreshes a key."""

    refresh_on_hit = True
    evict_newest = False

    def __init__(self, layout, *, seed=0, **params):
        super().__init__(layout, seed=seed, **params)
        self._order = [OrderedDict() for _ in layout.pool_caps]

    def _on_hit(self, key, now, j, info):
        if self.refresh_on_hit:
            self._order[self._pool[key]].move_to_end(key)

    def _on_insert(self, key, now, j, info):
        self._order[self._pool[key]][key] = None

    def _on_evict(self, key):
        del self._order[self._pool[key]][key]

    def _victim(self, pool, pinned):
        order = self._order[pool]
        for key in (reversed(order) if self.evict_newest else order):
            if key not in pinned:
                return key
        return None


@register
class LRU(_OrderedPolicy):
    """Least recently used. mixtral-offloading (Eliseev & Mazur 2023) uses it per layer, the
    phone engine of edge-qwen3-phone as one global pool. A stack algorithm."""

    name = "lru"
    source = "classic LRU; per-layer as in mixtral-offloading (arXiv 2312.17238)"
    stack = True


@register
class FIFO(_OrderedPolicy):
    """First in, first out: a hit does not refresh the key."""

    name = "fifo"
    source = "classic FIFO (the baseline of Huang et al., arXiv 2303.06182)"
    refresh_on_hit = False


@register
class LIFO(_OrderedPolicy):
    """Last in, first out: evict the most recently *inserted* key not touched by the batch."""

    name = "lifo"
    source = "classic LIFO (Huang et al., arXiv 2303.06182, Sec. expert buffering)"
    refresh_on_hit = False
    evict_newest = True


@register
class LFU(CachePolicy):
    """Least frequently used, counting every lookup since the start (counts survive eviction);
    ties go to the least recently used key. ``in_cache=True`` counts only while resident (the
    LFU-in-cache of MoE-Infinity's released code, arXiv 2401.14361)."""

    name = "lfu"
    source = "classic LFU; in_cache=True follows MoE-Infinity's released dispatcher"

    def __init__(self, layout, *, seed=0, in_cache: bool = False, **params):
        super().__init__(layout, seed=seed, **params)
        self.in_cache = bool(in_cache)
        self._freq = [0] * layout.num_keys
        self._last = [0] * layout.num_keys
        self._heaps = [[] for _ in layout.pool_caps]
        self._tick = 0

    def _touch(self, key, push: bool):
        self._tick += 1
        self._freq[key] += 1
        self._last[key] = self._tick
        if push:
            heapq.heappush(self._heaps[self._pool[key]], (self._freq[key], self._tick, key))

    def _on_hit(self, key, now, j, info):
        self._touch(key, False)  # the heap entry is corrected lazily when it surfaces

    def _on_insert(self, key, now, j, info):
        if self.in_cache:
            self._freq[key] = 0
        self._touch(key, True)

    def _victim(self, pool, pinned):
        return pop_unpinned(self._heaps[pool], pinned, self._current)

    def _current(self, entry):
        # (freq, last use) only grow, so a stale entry surfaces early and is re-pushed corrected
        f, t, key = entry
        if key not in self.resident:
            return None
        cur = (self._freq[key], self._last[key])
        if cur == (f, t):
            return entry
        if (f, t) > cur:
            return None  # entry of an earlier residency with a larger count (in_cache)
        return (*cur, key)


@register
class RandomEviction(CachePolicy):
    """Evict a uniformly random resident key (seeded)."""

    name = "random"
    source = "classic random replacement"

    def __init__(self, layout, *, seed=0, **params):
        super().__init__(layout, seed=seed, **params)
        self._rng = random.Random(seed)
        self._keys = [[] for _ in layout.pool_caps]
        self._index: dict[int, int] = {}

    def _on_insert(self, key, now, j, info):
        lst = self._keys[self._pool[key]]
        self._index[key] = len(lst)
        lst.append(key)

    def _on_evict(self, key):
        lst = self._keys[self._pool[key]]
        i = self._index.pop(key)
        last = lst.pop()
        if last != key:
            lst[i] = last
            self._index[last] = i

    def _victim(self, pool, pinned):
        lst = self._keys[pool]
        if not lst:
            return None
        for _ in range(8):
            key = lst[self._rng.randrange(len(lst))]
            if key not in pinned:
                return key
        free = [k for k in lst if k not in pinned]
        return self._rng.choice(free) if free else None


PLACEMENTS = ("frequency", "uniform", "front", "random")


@register
class StaticPlacement(CachePolicy):
    """A fixed resident set chosen offline; misses are served without caching (computed on the
    CPU or streamed), so the set never changes.

    ``placement='frequency'``: the most popular (layer, expert) keys of a profile (Fiddler,
    arXiv 2402.07033; kTransformers' ``frequency`` strategy); ``uniform``: the same number per
    layer, most popular first; ``front``: the first layers' experts (kTransformers
    ``front-loading``); ``random``: a seeded random set. The profile is the replayed trace's
    load matrix unless ``popularity`` ([L, E]) is given (e.g. measured on another trace, to
    study domain shift)."""

    name = "static"
    source = "Fiddler popularity placement (arXiv 2402.07033); kTransformers placement strategies"
    profiled = True

    def __init__(self, layout, *, seed=0, placement: str = "frequency", popularity=None, **params):
        super().__init__(layout, seed=seed, **params)
        if placement not in PLACEMENTS:
            raise CacheError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
        self.placement = placement
        self.popularity = None if popularity is None else np.asarray(popularity, dtype=float)

    def bind(self, stream):
        super().bind(stream)
        pop = self.popularity if self.popularity is not None else stream.load_matrix()
        self.place(np.asarray(pop, dtype=float).reshape(-1))
        return self

    def place(self, popularity: np.ndarray) -> None:
        lay = self.layout
        L, E = lay.num_layers, lay.num_experts
        rng = np.random.default_rng(self.seed)
        if self.placement == "frequency":
            order = np.argsort(-popularity, kind="stable")
        elif self.placement == "front":
            order = np.arange(L * E)
        elif self.placement == "random":
            order = rng.permutation(L * E)
        else:  # uniform: round-robin over layers, each layer's most popular first
            per_layer = np.argsort(-popularity.reshape(L, E), axis=1, kind="stable")
            order = (per_layer + np.arange(L)[:, None] * E).T.reshape(-1)
        for key in order.tolist():
            p = self._pool[key]
            if self.used[p] + self._cost[key] <= self.caps[p] + 1e-9:
                self.resident[key] = 0
                self.used[p] += self._cost[key]

    def _admit(self, key, now, j, info, pinned):
        return False

    def _victim(self, pool, pinned):
        return None


@register
class ExpertBuffering(_OrderedPolicy):
    """Expert Buffering of "Towards MoE Deployment" (Huang et al., arXiv 2303.06182): when room
    is needed, evict an expert not active in the current batch (the batch's gating result is
    known before loading), else LIFO among the rest. Simplified: one pool per scope, no
    per-GPU expert assignment (that is the placement planner's job)."""

    name = "expert-buffering"
    source = "Huang et al., arXiv 2303.06182 (inactive-in-batch first, then LIFO)"

    refresh_on_hit = False  # insertion order only: the LIFO fallback ignores hits

    def __init__(self, layout, *, seed=0, **params):
        super().__init__(layout, seed=seed, **params)
        self._batch: set[int] = set()

    def _begin(self, keys, now, info):
        self._batch = set(keys)
        return keys

    def _victim(self, pool, pinned):
        order = self._order[pool]
        fallback = None
        for key in reversed(order):
            if key in pinned:
                continue
            if key not in self._batch:
                return key
            if fallback is None:
                fallback = key
        return fallback
