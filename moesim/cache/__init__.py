"""Expert cache policies: one small interface, a registry by name, and the shared mechanism.

A cache holds (layer, expert) *keys* (``key = layer * num_experts + expert``) in one global pool
or one pool per layer. Capacity is counted in bytes or in experts; keys may have different
sizes (per-layer expert bytes, mixed precision). A policy only decides *what to keep*: the base
class does the bookkeeping (residency, pool usage, statistics) so every policy is measured the
same way.

The one call a replay or a simulator makes is ``lookup(keys, now, info)`` with the unique keys
of one batch (one (token, layer) row in token accounting, one (step, layer) batch in batch
accounting). It returns one hit flag per key, admits misses (or bypasses them, if the policy
may), and evicts:

* ``per_access=True`` (token accounting): before each admission, never evicting a key the
  batch already touched -- the classic per-access cache, whose LRU hits are stack distances.
* ``per_access=False`` (batch accounting): after the whole batch, never evicting a key the batch
  touched (how llama.cpp-style engines count; the batch may overflow a tiny cache).

``prefetch(keys, now)`` loads keys speculatively; a later hit on such a key counts as a
prefetch hit (residency code 2).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from moesim.errors import MoesimError, unknown_name

SCOPES = ("global", "per-layer")


class CacheError(MoesimError):
    """A cache configuration a user can fix (capacity, scope, policy parameters)."""


# ----- layout: keys, sizes, pools ---------------------------------------------------------------
@dataclass
class CacheLayout:
    """Sizes and pools of the keys. ``cost`` is what counts against capacity (bytes or 1)."""

    num_layers: int
    num_experts: int
    key_bytes: np.ndarray  # [L*E] int64, bytes one miss reads
    pool_of: list[int]  # key -> pool index
    pool_caps: list[float]  # capacity of each pool, in the unit of ``cost``
    unit: str  # "bytes" | "experts"
    scope: str

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def cost(self) -> list[float]:
        if self.unit == "bytes":
            return self.key_bytes.astype(float).tolist()
        return [1.0] * self.num_keys

    @property
    def capacity(self) -> float:
        return float(sum(self.pool_caps))

    def layer_of(self, key: int) -> int:
        return key // self.num_experts


def per_layer_bytes(expert_bytes, num_layers: int) -> np.ndarray:
    """Bytes of one expert per layer from a scalar or a per-layer list."""
    arr = np.asarray(expert_bytes if expert_bytes is not None else 0, dtype=np.int64)
    if arr.ndim == 0:
        arr = np.full(num_layers, int(arr), dtype=np.int64)
    if arr.shape != (num_layers,):
        raise CacheError(f"expert bytes list {len(arr)} layers, the trace has {num_layers}")
    if (arr < 0).any():
        raise CacheError("expert bytes must not be negative")
    return arr


def make_layout(
    num_layers: int,
    num_experts: int,
    expert_bytes=0,
    *,
    capacity_bytes: float | None = None,
    capacity_experts: float | None = None,
    scope: str = "global",
    pool_caps: list[float] | None = None,
) -> CacheLayout:
    """Build a layout. Capacity is the *total* over all pools; per-layer scope splits it evenly
    (in experts: whole experts, the remainder going to the first layers) unless ``pool_caps``
    gives each layer's share explicitly (e.g. an AdapMoE DP allocation)."""
    if scope not in SCOPES:
        raise unknown_name("cache scope", scope, SCOPES)
    if (capacity_bytes is None) == (capacity_experts is None) and pool_caps is None:
        raise CacheError("give exactly one of a capacity in bytes or a capacity in experts")
    unit = "bytes" if capacity_bytes is not None else "experts"
    total = capacity_bytes if capacity_bytes is not None else capacity_experts
    lb = per_layer_bytes(expert_bytes, num_layers)
    key_bytes = np.repeat(lb, num_experts)
    if unit == "bytes" and not (lb > 0).all():
        raise CacheError("a capacity in bytes needs the bytes of every expert (trace metadata, "
                         "--model or --expert-bytes)")
    if total is not None and total < 0:
        raise CacheError(f"capacity must not be negative, got {total}")
    if scope == "global":
        pools = [0] * (num_layers * num_experts)
        caps = [float(total)] if pool_caps is None else [float(sum(pool_caps))]
    else:
        pools = np.repeat(np.arange(num_layers), num_experts).tolist()
        if pool_caps is not None:
            if len(pool_caps) != num_layers:
                raise CacheError(f"pool_caps lists {len(pool_caps)} layers, expected {num_layers}")
            caps = [float(c) for c in pool_caps]
        elif unit == "experts":
            base, extra = divmod(int(total), num_layers)
            caps = [float(base + (1 if i < extra else 0)) for i in range(num_layers)]
        else:
            caps = [float(total) / num_layers] * num_layers
    return CacheLayout(num_layers, num_experts, key_bytes, pools, caps, unit, scope)


# ----- statistics ----------------------------------------------------------------------------------
@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0  # demand misses (admitted or streamed past the cache)
    lookups_decode: int = 0
    hits_decode: int = 0
    prefetch_hits: int = 0  # hits on keys a prefetcher loaded and nobody had used yet
    prefetched: int = 0
    bytes_prefetched: int = 0
    evictions: int = 0
    bypassed: int = 0  # misses served without caching (CPU compute or a streaming buffer)
    dropped: int = 0  # lookups a lossy policy removed (adaptive gating, skipped experts)

    def count_batch(self, lookups: int, hits: int, phase: int) -> None:
        """Add one batch's lookups and hits (phase 1 = decode also counts toward the decode rate)."""
        self.lookups += lookups
        self.hits += hits
        self.misses += lookups - hits
        if phase == 1:
            self.lookups_decode += lookups
            self.hits_decode += hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")

    @property
    def hit_rate_decode(self) -> float:
        return self.hits_decode / self.lookups_decode if self.lookups_decode else float("nan")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(hit_rate=self.hit_rate, hit_rate_decode=self.hit_rate_decode)
        return d


# ----- the batch a policy sees ---------------------------------------------------------------------
@dataclass
class BatchInfo:
    """What is known about the current batch; policies read only what they need.

    ``weight[j]``: the largest normalised gate weight any token of the batch gave key j;
    ``unimportance[j]``: the smallest cumulative normalised weight of higher-ranked experts
    (HOBBIT); ``count[j]``: tokens routed to key j; ``first``: position of the batch's first
    lookup in the stream (oracles use it to find next uses)."""

    layer: int = 0
    phase: int = 0
    request: int = 0
    clock: int = 0  # token (token accounting) or step (batch accounting) ordinal
    first: int = 0
    weight: list[float] = field(default_factory=list)
    unimportance: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None  # [E] router scores of this layer (top-2k or top-k), if known


# ----- the interface ---------------------------------------------------------------------------------
class CachePolicy:
    """Base class: subclasses override the hooks ``_on_hit``, ``_on_insert``, ``_on_evict``,
    ``_victim`` and optionally ``_admit`` (bypass) and ``_begin`` (per-batch state)."""

    name = ""
    source = ""  # the paper or system the policy follows, and what is simplified
    oracle = False  # needs the future: call ``bind(stream)`` before replaying
    profiled = False  # learns from a profile of the trace (offline popularity etc.): ``bind``
    stack = False  # stack algorithm (inclusion property): all sizes in one pass are valid

    def __init__(self, layout: CacheLayout, *, seed: int = 0, **params):
        if params:
            raise CacheError(f"policy {self.name!r} takes no parameter {sorted(params)[0]!r}")
        self.layout = layout
        self.seed = seed
        self.resident: dict[int, int] = {}  # key -> 0 (demand) / 1 (prefetched, unused yet)
        self.used = [0.0] * len(layout.pool_caps)
        self.caps = list(layout.pool_caps)
        self._cost = layout.cost
        self._pool = layout.pool_of
        self._bytes = layout.key_bytes.tolist()
        self.stats = CacheStats()
        self.stream = None

    # -- setup -------------------------------------------------------------------------------
    def bind(self, stream) -> CachePolicy:
        """Give the policy the access stream it will replay (oracles and profiled policies)."""
        self.stream = stream
        return self

    def _need_stream(self):
        if self.stream is None:
            raise CacheError(f"policy {self.name!r} needs the trace: call bind(stream) first")
        return self.stream

    # -- the calls ---------------------------------------------------------------------------------
    def lookup(self, keys, now: int, info: BatchInfo | None = None, *, per_access: bool = False) -> list:
        """Look up the unique keys of one batch; admit, bypass and evict. Returns one flag per
        key: True hit, False miss, None for a lookup a lossy policy dropped."""
        info = info or BatchInfo()
        look = self._begin(list(keys), now, info)
        res, cost, pool, used = self.resident, self._cost, self._pool, self.used
        out: list = []
        pinned: set[int] = set()
        pools: set[int] = set()
        st = self.stats
        n = h = 0
        for j, key in enumerate(look):
            if key is None:
                out.append(None)
                st.dropped += 1
                continue
            n += 1
            state = res.get(key)
            if state is not None:
                out.append(True)
                h += 1
                if state:
                    res[key] = 0
                    st.prefetch_hits += 1
                self._on_hit(key, now, j, info)
            else:
                out.append(False)
                st.bytes_read += self._bytes[key]
                if self._admit(key, now, j, info, pinned):
                    p = pool[key]
                    if per_access:
                        self._make_room(p, cost[key], pinned)
                    res[key] = 0
                    used[p] += cost[key]
                    self._on_insert(key, now, j, info)
                    pools.add(p)
                else:
                    st.bypassed += 1
            pinned.add(key)
        if not per_access:
            for p in pools:
                self._make_room(p, 0.0, pinned)
        st.count_batch(n, h, info.phase)
        return out

    def prefetch(self, keys, now: int, protect=()) -> list[int]:
        """Load keys that are not resident (speculatively); return those loaded."""
        res, cost, pool = self.resident, self._cost, self._pool
        pinned = set(protect)
        loaded = []
        for key in keys:
            if key in res:
                pinned.add(key)
                continue
            p = pool[key]
            if cost[key] > self.caps[p]:
                continue
            self._make_room(p, cost[key], pinned | {key})
            if self.used[p] + cost[key] > self.caps[p] + 1e-9:
                continue  # nothing evictable: skip the speculative load
            res[key] = 1
            self.used[p] += cost[key]
            self._on_insert(key, now, -1, None)
            pinned.add(key)
            loaded.append(key)
            self.stats.prefetched += 1
            self.stats.bytes_prefetched += self._bytes[key]
        return loaded

    def contains(self, key: int) -> bool:
        return key in self.resident

    def resident_keys(self) -> list[int]:
        return list(self.resident)

    def drop(self, n: int = 1) -> None:
        """Record lookups a lossy policy removed before they reached the cache."""
        self.stats.dropped += n

    # -- mechanism -------------------------------------------------------------------------------
    def _make_room(self, p: int, extra: float, pinned) -> None:
        used, cap = self.used, self.caps[p]
        while used[p] + extra > cap + 1e-9:
            victim = self._victim(p, pinned)
            if victim is None:
                return  # everything left is pinned: the batch overflows the pool
            self._evict(victim)

    def _evict(self, key: int) -> None:
        del self.resident[key]
        self.used[self._pool[key]] -= self._cost[key]
        self.stats.evictions += 1
        self._on_evict(key)

    # -- hooks ---------------------------------------------------------------------------------------
    def _begin(self, keys: list, now, info) -> list:
        """Per-batch state; may translate keys (precision variants) or drop them (None)."""
        return keys

    def _admit(self, key, now, j, info, pinned) -> bool:
        return True

    def _on_hit(self, key, now, j, info) -> None:
        pass

    def _on_insert(self, key, now, j, info) -> None:
        pass

    def _on_evict(self, key) -> None:
        pass

    def _victim(self, pool: int, pinned) -> int | None:
        raise NotImplementedError


# ----- registry ------------------------------------------------------------------------------------
POLICIES: dict[str, type[CachePolicy]] = {}


def pop_unpinned(heap: list, pinned, check) -> int | None:
    """Key of the smallest live, unpinned entry of a lazily updated heap of ``(..., key)``
    tuples, or None. ``check(entry)`` returns the entry when it is live, None when it is stale
    (dropped), or a corrected entry to push back. Live pinned entries stay in the heap, and so
    does the entry found: the policy's eviction removes the key, making it stale."""
    held, found = [], None
    while heap:
        entry = heapq.heappop(heap)
        live = check(entry)
        if live is None:
            continue
        if live is not entry:
            heapq.heappush(heap, live)
            continue
        held.append(entry)
        if entry[-1] not in pinned:
            found = entry[-1]
            break
    for entry in held:
        heapq.heappush(heap, entry)
    return found


def register(cls: type[CachePolicy]) -> type[CachePolicy]:
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_all()
    return sorted(POLICIES)


def get_policy(name: str) -> type[CachePolicy]:
    _load_all()
    if name not in POLICIES:
        raise unknown_name("cache policy", name, POLICIES)
    return POLICIES[name]


def make_policy(name: str, layout: CacheLayout, *, seed: int = 0, **params) -> CachePolicy:
    return get_policy(name)(layout, seed=seed, **params)


def _load_all() -> None:
    from moesim.cache import classic, literature, oracle  # noqa: F401  (registration)


__all__ = [
    "BatchInfo", "CacheError", "CacheLayout", "CachePolicy", "CacheStats", "POLICIES", "SCOPES",
    "get_policy", "make_layout", "make_policy", "per_layer_bytes", "policy_names", "register",
]
