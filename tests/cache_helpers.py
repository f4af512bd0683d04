"""Small builders shared by the cache tests (no real data here)."""

from __future__ import annotations

import numpy as np

from moesim.replay import AccessStream


def stream_from(experts, accounting="token", expert_bytes=100, weights=None, phase=None, steps=None,
                request=None, num_experts=None):
    """A stream from ``experts[T, L, K]`` (one token per step unless ``steps`` groups them)."""
    ex = np.asarray(experts, dtype=np.int64)
    T, L, K = ex.shape
    E = num_experts or int(ex.max()) + 1
    w = np.ones((T, L, K)) if weights is None else np.asarray(weights, float)
    tok = np.repeat(np.arange(T), L)
    steps = np.arange(T) if steps is None else np.asarray(steps)
    req = np.zeros(T, dtype=np.int64) if request is None else np.asarray(request)
    ph = np.zeros(T, dtype=np.int64) if phase is None else np.asarray(phase)
    return AccessStream.from_rows(L, E, req[tok], tok, steps[tok], ph[tok], np.tile(np.arange(L), T),
                                  ex.reshape(T * L, K), w.reshape(T * L, K), accounting,
                                  np.full(L, expert_bytes, dtype=np.int64))


def random_experts(rng, T, L, E, K):
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
