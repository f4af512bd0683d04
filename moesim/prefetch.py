"""Prefetchers: propose the keys of batch b while batch b-1 computes (one layer ahead).

Interface: ``bind(stream, policy)``, ``predict(b) -> keys``, ``observe(b, keys, hits)``;
registered by name. Predictors whose real versions need hidden states (a next-layer gate,
a learned MLP) are modelled by their *accuracy*: each true expert of the next batch is
predicted with that probability, otherwise a wrong expert of the same layer is (seeded).
``priority`` says how an engine queues the loads: ``"low"`` speculative loads are pre-empted by
demand loads (ProMoE) in the SimPy model of ``moesim.offload``.
"""

from __future__ import annotations

import numpy as np

from moesim.errors import MoesimError, unknown_name


class PrefetchError(MoesimError):
    pass


class Prefetcher:
    name = ""
    source = ""
    priority = "normal"

    def __init__(self, *, seed: int = 0, **params):
        if params:
            raise PrefetchError(f"prefetcher {self.name!r} takes no parameter {sorted(params)[0]!r}")
        self.seed = seed
        self.stream = None
        self.policy = None

    def bind(self, stream, policy=None) -> Prefetcher:
        self.stream, self.policy = stream, policy
        return self

    def true_keys(self, b: int) -> list[int]:
        s = self.stream
        if b >= s.num_batches:
            return []
        return s.keys[s.batch_ptr[b]:s.batch_ptr[b + 1]].tolist()

    def predict(self, b: int) -> list[int]:
        return []

    def observe(self, b: int, keys, hits) -> None:
        pass


PREFETCHERS: dict[str, type[Prefetcher]] = {}


def register(cls):
    PREFETCHERS[cls.name] = cls
    return cls


def prefetcher_names() -> list[str]:
    return sorted(PREFETCHERS)


def make_prefetcher(name: str, *, seed: int = 0, **params) -> Prefetcher:
    if name not in PREFETCHERS:
        raise unknown_name("prefetcher", name, PREFETCHERS)
    return PREFETCHERS[name](seed=seed, **params)


@register
class NoPrefetch(Prefetcher):
    """On-demand loading only (DeepSpeed / MoE-OnDemand baseline)."""

    name = "none"


@register
class NextLayer(Prefetcher):
    """Next-layer prediction with a given accuracy (mixtral-offloading's speculative gate,
    AdapMoE, HOBBIT's stacking gates): each expert of the next batch is predicted with
    probability ``accuracy``, else a uniformly drawn wrong expert of that layer."""

    name = "next-layer"
    source = "mixtral-offloading Sec. 3.2 (arXiv 2312.17238); AdapMoE (arXiv 2408.10284)"

    def __init__(self, *, seed=0, accuracy: float = 0.8, **params):
        super().__init__(seed=seed, **params)
        if not 0 <= float(accuracy) <= 1:
            raise PrefetchError("prefetch accuracy must be in [0, 1]")
        self.accuracy = float(accuracy)
        self._rng = np.random.default_rng(seed)

    def predict(self, b):
        truth = self.true_keys(b)
        if not truth or self.accuracy >= 1:
            return truth
        E = self.stream.num_experts
        base = (truth[0] // E) * E
        out = []
        chosen = set(truth)
        for k in truth:
            if self._rng.random() < self.accuracy:
                out.append(k)
            else:
                wrong = [base + e for e in range(E) if base + e not in chosen]
                if wrong:
                    w = wrong[int(self._rng.integers(len(wrong)))]
                    chosen.add(w)
                    out.append(w)
        return out


@register
class PreGated(NextLayer):
    """Pre-gated MoE (Hwang et al., ISCA'24, arXiv 2308.12066): a trained pre-gate in block N
    selects block N+1's experts, so exactly those are migrated one layer ahead (accuracy 1 by
    construction: the model is trained to route with it)."""

    name = "pre-gated"
    source = "Pre-gated MoE (arXiv 2308.12066)"

    def __init__(self, *, seed=0, **params):
        super().__init__(seed=seed, accuracy=1.0, **params)


@register
class ProMoE(NextLayer):
    """ProMoE (Song et al., arXiv 2410.22134): a learned predictor's speculative loads go to a
    LOW-priority queue that exact (post-gate) loads pre-empt. In the replay it is a next-layer
    predictor of the given accuracy; the two-priority queue acts in ``moesim.offload``."""

    name = "promoe"
    source = "ProMoE (arXiv 2410.22134): two-priority queue, demand pre-empts speculative"
    priority = "low"


@register
class ActivationMatrix(Prefetcher):
    """MoE-Infinity's activation-matrix prefetch (arXiv 2401.14361): the current request's expert
    activation matrix is matched by cosine to past requests' matrices; the next batch's layer
    gets the ``top`` experts of the best match (the request's own matrix before any finished)."""

    name = "activation-matrix"
    source = "MoE-Infinity (arXiv 2401.14361) EAM/EAMC prediction"

    def __init__(self, *, seed=0, top: int | None = None, eamc_size: int = 1000, **params):
        super().__init__(seed=seed, **params)
        self.top, self.eamc_size = top, int(eamc_size)

    def bind(self, stream, policy=None):
        super().bind(stream, policy)
        self._cur = np.zeros(stream.num_layers * stream.num_experts)
        self._eamc: list[np.ndarray] = []
        self._request = None
        self._match = None
        self._clock = None
        return self

    def predict(self, b):
        s = self.stream
        if b >= s.num_batches:
            return []
        req, clock, layer = int(s.batch_request[b]), int(s.batch_clock[b]), int(s.batch_layer[b])
        if req != self._request:
            if self._cur.any():
                if len(self._eamc) >= self.eamc_size:
                    self._eamc.pop(0)
                self._eamc.append(self._cur.copy())
            self._cur[:] = 0
            self._request = req
            self._match = None
        if clock != self._clock or self._match is None:
            self._clock = clock
            if self._eamc and self._cur.any():
                mat = np.asarray(self._eamc)
                sims = mat @ self._cur / (np.linalg.norm(mat, axis=1) * np.linalg.norm(self._cur) + 1e-12)
                self._match = mat[int(np.argmax(sims))]
            else:
                self._match = self._cur.copy()
        E = s.num_experts
        row = self._match[layer * E:(layer + 1) * E]
        n = self.top or int(s.batch_ptr[b + 1] - s.batch_ptr[b])
        if not row.any():
            return []
        best = np.argsort(-row, kind="stable")[:n]
        return [layer * E + int(e) for e in best if row[e] > 0]

    def observe(self, b, keys, hits):
        s = self.stream
        lo, hi = s.batch_ptr[b], s.batch_ptr[b + 1]
        self._cur[keys] += s.count[lo:hi]


@register
class PathPrefetch(Prefetcher):
    """EdgeMoE's preloading (arXiv 2308.14352): an offline dictionary of which experts follow the
    previous layer's experts (profiled co-activation counts of layer l -> l+1 on the bound
    stream); the ``top`` most likely next-layer experts are loaded during the current layer.
    Simplified: conditioned on one previous layer, not two."""

    name = "path"
    source = "EdgeMoE (arXiv 2308.14352) path-dictionary preloading"

    def __init__(self, *, seed=0, top: int | None = None, **params):
        super().__init__(seed=seed, **params)
        self.top = top

    def bind(self, stream, policy=None):
        super().bind(stream, policy)
        L, E = stream.num_layers, stream.num_experts
        self._co = np.zeros((L * E, E))
        nb = stream.num_batches
        lay = stream.batch_layer
        ptr = stream.batch_ptr
        for b in range(nb - 1):
            if lay[b + 1] != (lay[b] + 1) % L:
                continue
            cur = stream.keys[ptr[b]:ptr[b + 1]]
            nxt = stream.keys[ptr[b + 1]:ptr[b + 2]] % E
            self._co[np.ix_(cur, nxt)] += 1
        self._prev: list[int] = []
        return self

    def predict(self, b):
        s = self.stream
        if b >= s.num_batches or not self._prev:
            return []
        layer = int(s.batch_layer[b])
        E = s.num_experts
        score = self._co[self._prev].sum(axis=0)
        n = self.top or int(s.batch_ptr[b + 1] - s.batch_ptr[b])
        best = np.argsort(-score, kind="stable")[:n]
        return [layer * E + int(e) for e in best if score[e] > 0]

    def observe(self, b, keys, hits):
        self._prev = list(keys)
