"""Swap search on one layer's placement: lower the hottest GPU by moving or swapping replicas.

A min-max MILP has a flat objective (only the hottest GPU counts) and many symmetric optima,
so HiGHS rarely improves a good start by itself within seconds at DeepSeek-V3 scale. This local
search does, in two phases, always keeping slot limits and the no-duplicate rule:
1. spread: apply the move or swap between any two GPUs that most lowers the sum of squared GPU
   loads, until none does (this escapes the plateaus a min-max search gets stuck on);
2. shave: repeatedly take the hottest GPU and apply the single move (to a GPU with a free slot)
   or swap (with a lighter replica elsewhere) that most lowers the larger of the two new loads.
The MILP then certifies the result with its bound.
"""

from __future__ import annotations

import numpy as np


def swap_search(per_gpu: np.ndarray, share: np.ndarray, slots_per_gpu: int, allow_duplicates: bool = False,
                max_steps: int = 5000) -> np.ndarray:
    """Improve ``per_gpu`` ([E, P] replicas per GPU) for per-replica loads ``share`` ([E])."""
    x = spread(per_gpu, share, slots_per_gpu, allow_duplicates, max_steps)
    E, P = x.shape
    gpu_load = share @ x
    fill = x.sum(axis=0)
    for _ in range(max_steps):
        g = int(np.argmax(gpu_load))
        top = gpu_load[g]
        best = (top * (1 - 1e-12), None)
        for e in np.flatnonzero(x[:, g]):
            # move e from g to h
            ok = fill < slots_per_gpu
            if not allow_duplicates:
                ok &= x[e] == 0
            ok[g] = False
            if ok.any():
                new = np.maximum(top - share[e], gpu_load + share[e])
                new[~ok] = np.inf
                h = int(np.argmin(new))
                if new[h] < best[0]:
                    best = (new[h], ("move", e, h))
            # swap e on g with a lighter f on h
            f, h = np.nonzero(x)
            ok = (h != g) & (share[f] < share[e])
            if not allow_duplicates:
                ok &= (x[e, h] == 0) & (x[f, g] == 0)
            if ok.any():
                f, h = f[ok], h[ok]
                delta = share[e] - share[f]
                new = np.maximum(top - delta, gpu_load[h] + delta)
                i = int(np.argmin(new))
                if new[i] < best[0]:
                    best = (new[i], ("swap", e, int(f[i]), int(h[i])))
        step = best[1]
        if step is None:
            break
        if step[0] == "move":
            _, e, h = step
            x[e, g] -= 1
            x[e, h] += 1
            fill[g] -= 1
            fill[h] += 1
            gpu_load[g] -= share[e]
            gpu_load[h] += share[e]
        else:
            _, e, f, h = step
            x[e, g] -= 1
            x[e, h] += 1
            x[f, h] -= 1
            x[f, g] += 1
            delta = share[e] - share[f]
            gpu_load[g] -= delta
            gpu_load[h] += delta
    return x


def spread(per_gpu: np.ndarray, share: np.ndarray, slots_per_gpu: int, allow_duplicates: bool = False,
           max_steps: int = 5000) -> np.ndarray:
    """Best-improvement moves and swaps on the sum of squared GPU loads."""
    x = per_gpu.copy()
    E, P = x.shape
    for _ in range(max_steps):
        gpu_load = share @ x
        fill = x.sum(axis=0)
        e, g = np.nonzero(x)  # one entry per (expert, GPU) holding >= 1 replica
        a = share[e]
        # swap replica i (e_i on g_i) with replica j: i goes to g_j, j to g_i; d = a_i - a_j
        d = a[:, None] - a[None, :]
        gain = 2 * d * (gpu_load[g][:, None] - gpu_load[g][None, :]) - 2 * d * d
        ok = g[:, None] != g[None, :]
        if not allow_duplicates:
            ok &= (x[e[:, None], g[None, :]] == 0) & (x[e[None, :], g[:, None]] == 0)
        gain = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        best_swap = gain[i, j]
        # move replica i to GPU h with a free slot
        mgain = 2 * a[:, None] * (gpu_load[g][:, None] - gpu_load[None, :]) - 2 * a[:, None] ** 2
        mok = (fill[None, :] < slots_per_gpu) & (g[:, None] != np.arange(P)[None, :])
        if not allow_duplicates:
            mok &= x[e] == 0
        mgain = np.where(mok, mgain, -np.inf)
        mi, mh = np.unravel_index(int(np.argmax(mgain)), mgain.shape)
        tol = 1e-12 * max(float((gpu_load ** 2).sum()), 1.0)
        if max(best_swap, mgain[mi, mh]) <= tol:
            break
        if mgain[mi, mh] >= best_swap:
            x[e[mi], g[mi]] -= 1
            x[e[mi], mh] += 1
        else:
            x[e[i], g[i]] -= 1
            x[e[i], g[j]] += 1
            x[e[j], g[j]] -= 1
            x[e[j], g[i]] += 1
    return x
