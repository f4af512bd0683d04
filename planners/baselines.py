"""Heuristic placements, registered by name: each maps a ``PlacementProblem`` to phy2log.

- contiguous / round-robin: the initial maps of Megatron and vLLM (``linear`` / ``round_robin``):
  physical slot j holds expert j mod E (redundant slots repeat the first experts), slots filled
  GPU by GPU (contiguous) or dealt to GPUs in turn (round-robin).
- random: a seeded random choice of redundant experts and a random deal of replicas to GPUs.
- greedy: replicate by largest load per replica, then longest-processing-time first onto the
  least-loaded GPU that has a free slot and does not hold the expert yet.
- eplb, eplb-hierarchical, eplb-global: DeepSeek's EPLB policies (moesim.planners.eplb).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moesim.errors import unknown_name
from moesim.planners.eplb import eplb_plan, replicate
from moesim.planners.inputs import PlacementProblem
from moesim.planners.plan import replicas_per_gpu


def _dealt(problem: PlacementProblem, gpu_of_replica: np.ndarray) -> np.ndarray:
    """phy2log for all layers when replica j (expert j mod E) goes to GPU gpu_of_replica[j]."""
    E, R, S = problem.num_experts, problem.num_replicas, problem.slots_per_gpu
    row = np.full(problem.num_slots, -1, dtype=np.int64)
    fill = np.zeros(problem.cluster.num_gpus, dtype=np.int64)
    for j in range(R):
        g = gpu_of_replica[j]
        row[g * S + fill[g]] = j % E
        fill[g] += 1
    return np.tile(row, (problem.num_layers, 1))


def contiguous(problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    P, R = problem.cluster.num_gpus, problem.num_replicas
    return _dealt(problem, (np.arange(R) * P) // R)


def round_robin(problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    P, R = problem.cluster.num_gpus, problem.num_replicas
    return _dealt(problem, np.arange(R) % P)


def random_placement(problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    E, R = problem.num_experts, problem.num_replicas
    out = np.full((problem.num_layers, problem.num_slots), -1, dtype=np.int64)
    for lay in range(problem.num_layers):
        extra = rng.choice(E, size=R - E, replace=R - E > E)
        slots = rng.permutation(problem.num_slots)[:R]  # any R of the slot positions
        out[lay, slots] = rng.permutation(np.r_[np.arange(E), extra])
    return out


def greedy(problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    E, R, S, P = problem.num_experts, problem.num_replicas, problem.slots_per_gpu, problem.cluster.num_gpus
    cap = None if problem.allow_duplicates else P
    out = np.full((problem.num_layers, problem.num_slots), -1, dtype=np.int64)
    for lay, w in enumerate(problem.load):
        expert_of, count = replicate(w, R, max_replicas=cap)
        share = w[expert_of] / count[expert_of]
        gpu_load = np.zeros(P)
        fill = np.zeros(P, dtype=np.int64)
        holds = np.zeros((E, P), dtype=bool)
        for j in np.argsort(-share, kind="stable"):
            e = expert_of[j]
            ok = fill < S
            if not problem.allow_duplicates:
                ok &= ~holds[e]
            g = int(np.argmin(np.where(ok, gpu_load, np.inf)))
            out[lay, g * S + fill[g]] = e
            fill[g] += 1
            gpu_load[g] += share[j]
            holds[e, g] = True
    return out


def eplb_auto(problem, seed=0):
    return eplb_plan(problem, "auto")


def eplb_hierarchical(problem, seed=0):
    return eplb_plan(problem, "hierarchical")


def eplb_global(problem, seed=0):
    return eplb_plan(problem, "global")


BASELINES: dict[str, Callable[[PlacementProblem, int], np.ndarray]] = {
    "contiguous": contiguous,
    "round-robin": round_robin,
    "random": random_placement,
    "greedy": greedy,
    "eplb": eplb_auto,
    "eplb-hierarchical": eplb_hierarchical,
    "eplb-global": eplb_global,
}


def run_baseline(name: str, problem: PlacementProblem, seed: int = 0) -> np.ndarray:
    if name not in BASELINES:
        raise unknown_name("placement heuristic", name, BASELINES)
    return BASELINES[name](problem, seed)


def applicable(problem: PlacementProblem) -> list[str]:
    """Baselines that accept this problem (hierarchical EPLB needs nodes to divide groups and
    replicas)."""
    c = problem.cluster
    hierarchical_ok = problem.num_groups % c.num_nodes == 0 and problem.num_replicas % c.num_nodes == 0
    names = list(BASELINES)
    if not hierarchical_ok:
        names.remove("eplb-hierarchical")
        if problem.num_groups % c.num_nodes == 0:  # 'auto' would pick the hierarchical policy
            names.remove("eplb")
    return names


def repair_duplicates(problem: PlacementProblem, phy2log: np.ndarray) -> np.ndarray:
    """Swap away every second replica of an expert on one GPU (keeping the slot counts).

    Each duplicate replica is swapped with a replica on another GPU (same node first) of an
    expert that GPU can take, choosing the one whose load per replica is closest, so balance
    moves as little as possible.
    """
    P, S, E = problem.cluster.num_gpus, problem.slots_per_gpu, problem.num_experts
    node = problem.cluster.node_of()
    out = phy2log.copy()
    for lay in range(out.shape[0]):
        row = out[lay]
        cnt = np.bincount(row[row >= 0], minlength=E)
        share = problem.load[lay] / np.maximum(cnt, 1)
        per_gpu = replicas_per_gpu(row[None], E, P)[0]
        while (per_gpu > 1).any():
            e, g = map(int, np.argwhere(per_gpu > 1)[0])
            slot_a = g * S + int(np.flatnonzero(row[g * S:(g + 1) * S] == e)[-1])
            best = None
            for s in range(len(row)):
                f, h = int(row[s]), s // S
                if f < 0 or h == g or per_gpu[e, h] or per_gpu[f, g]:
                    continue
                key = (node[h] != node[g], abs(share[f] - share[e]))
                if best is None or key < best[0]:
                    best = (key, s, f, h)
            if best is None:
                break  # no legal swap: leave it; evaluation reports the duplicate
            _, s, f, h = best
            row[slot_a], row[s] = f, e
            per_gpu[e, g] -= 1
            per_gpu[e, h] += 1
            per_gpu[f, h] -= 1
            per_gpu[f, g] += 1
    return out
