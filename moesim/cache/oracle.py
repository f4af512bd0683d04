"""Offline optima: Belady MIN (must admit every miss), Belady with bypass, and the
look-ahead-limited oracle SCH(m) of moe-lrc. They read the future from the bound stream."""

from __future__ import annotations

import heapq

import numpy as np

from moesim.cache import CacheError, CachePolicy, pop_unpinned, register


class _FarthestFirst(CachePolicy):
    """Evict the evictable resident key whose next use is farthest away (lazy max-heap)."""

    oracle = True

    def __init__(self, layout, *, seed=0, **params):
        super().__init__(layout, seed=seed, **params)
        self._next = [0] * layout.num_keys
        self._heaps = [[] for _ in layout.pool_caps]

    def bind(self, stream):
        super().bind(stream)
        self._nu = stream.next_use.tolist()
        return self

    def _set_next(self, key, pos):
        nxt = self._nu[pos] if pos >= 0 else self.stream.next_use_after(key, self._pos)
        self._next[key] = nxt
        heapq.heappush(self._heaps[self._pool[key]], (-nxt, key))

    def _begin(self, keys, now, info):
        if self.stream is None:
            self._need_stream()
        self._pos = info.first
        return keys

    def _on_hit(self, key, now, j, info):
        self._set_next(key, info.first + j)

    def _on_insert(self, key, now, j, info):
        self._set_next(key, info.first + j if j >= 0 else -1)

    def _farthest(self, pool, pinned):
        return pop_unpinned(self._heaps[pool], pinned, self._current)

    def _current(self, entry):
        neg, key = entry
        return entry if key in self.resident and self._next[key] == -neg else None

    def _victim(self, pool, pinned):
        return self._farthest(pool, pinned)


@register
class BeladyMIN(_FarthestFirst):
    """Belady's MIN with forced admission: every miss is cached, the victim is the resident key
    used farthest in the future. Optimal for uniform sizes; a stack algorithm. Keys of the
    current (token, layer) batch are pinned, as an engine needs all k resident at once."""

    name = "belady"
    source = "Belady 1966; Mattson et al. 1970 (stack property)"
    stack = True


@register
class BeladyBypass(_FarthestFirst):
    """Belady with bypass: a miss whose next use is no nearer than every evictable resident's is
    served without caching (computed on the CPU, or streamed through a buffer)."""

    name = "belady-bypass"
    source = "Belady MIN with optional admission (offload-policies reference B4)"

    def _admit(self, key, now, j, info, pinned):
        p = self._pool[key]
        if self.used[p] + self._cost[key] <= self.caps[p] + 1e-9:
            return True
        victim = self._farthest(p, pinned)
        if victim is None:
            return True
        return self._nu[info.first + j] < self._next[victim]


@register
class SCH(CachePolicy):
    """moe-lrc's segment-cache oracle SCH(m) (Liang et al., arXiv 2505.16056): it sees only the
    next ``m`` tokens and evicts the resident key with the fewest uses among them (the rest of
    the current token included), ties to the least recently used: the bound on any predictor of
    horizon m."""

    name = "sch"
    source = "moe-lrc SCH (arXiv 2505.16056), look-ahead-limited oracle"
    oracle = True

    def __init__(self, layout, *, seed=0, m: int = 16, **params):
        super().__init__(layout, seed=seed, **params)
        if int(m) < 0:
            raise CacheError(f"sch look-ahead m must be >= 0, got {m}")
        self.m = int(m)
        K = layout.num_keys
        self._wc = np.zeros(K, dtype=np.int64)
        self._last = np.zeros(K, dtype=np.float64)
        self._mask = np.zeros(K, dtype=bool)
        self._pool_arr = np.asarray(layout.pool_of)
        self._clock = -1
        self._tick = 0.0

    def bind(self, stream):
        super().bind(stream)
        self._clock = -1
        self._wc[:] = 0
        return self

    def _add_clock(self, c):
        s = self.stream
        if c < len(s.clock_ptr) - 1:
            lo, hi = s.clock_ptr[c], s.clock_ptr[c + 1]
            np.add.at(self._wc, s.keys[lo:hi], 1)

    def _begin(self, keys, now, info):
        if self.stream is None:
            self._need_stream()
        c = info.clock
        if self._clock < 0:
            for cc in range(0, self.m + 1):
                self._add_clock(c + cc)
            self._clock = c
        while self._clock < c:
            self._clock += 1
            self._add_clock(self._clock + self.m)
        self._wc[keys] -= 1  # consumed now: no longer in the future window
        return keys

    def _touch(self, key):
        self._tick += 1.0
        self._last[key] = self._tick

    def _on_hit(self, key, now, j, info):
        self._touch(key)

    def _on_insert(self, key, now, j, info):
        self._mask[key] = True
        self._touch(key)

    def _on_evict(self, key):
        self._mask[key] = False

    def _victim(self, pool, pinned):
        cand = self._mask & (self._pool_arr == pool)
        if pinned:
            cand[list(pinned)] = False
        if not cand.any():
            return None
        score = np.where(cand, self._wc * 1e12 + self._last, np.inf)
        return int(np.argmin(score))
