"""The ILP planner: warm start from the best heuristic, solve layer by layer, keep the incumbent.

Steps per layer (in layer order, because the hops term looks at the layer before):
1. every applicable heuristic's map for this layer (same-GPU duplicates swapped away when they
   are not allowed) is scored with the objective; the best one that respects the balance cap is
   the warm start, and its replica counts are the ILP's;
2. the layer's MILP (highspy arrays, or the Pyomo reference) is solved with that start, the valid
   bounds and a time share;
3. the ILP's map is kept only if it scores no worse than the start with the same function
   (objectives.layer_terms), so the ILP never loses to the best heuristic on its own objective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.planners.baselines import applicable, repair_duplicates, run_baseline
from moesim.planners.inputs import PlacementProblem
from moesim.planners.locality import node_first_layer
from moesim.planners.objectives import (
    Objective,
    balance_bound,
    layer_terms,
    layer_value,
    max_gpu_load,
)
from moesim.planners.plan import phy2log_from_counts, replicas_per_gpu
from moesim.planners.refine import swap_search

# heuristics that warm-start the ILP (random is a sanity baseline, never a good start)
WARM_START_HEURISTICS = ("eplb", "eplb-hierarchical", "eplb-global", "greedy", "contiguous", "round-robin")


@dataclass
class LayerResult:
    layer: int
    row: np.ndarray
    value: float
    warm_value: float
    warm_from: str
    bound: float
    gap: float
    balance_max: float
    balance_bound: float
    status: str
    solve_s: float


def heuristic_maps(problem: PlacementProblem, seed: int = 0) -> dict[str, np.ndarray]:
    """Whole-plan maps of the warm-start heuristics that accept this problem."""
    maps = {}
    for name in WARM_START_HEURISTICS:
        if name not in applicable(problem):
            continue
        phy = run_baseline(name, problem, seed)
        if not problem.allow_duplicates:
            phy = repair_duplicates(problem, phy)
        maps[name] = phy
    return maps


def polish(problem: PlacementProblem, named_map: tuple[str, np.ndarray], layer: int) -> tuple[str, np.ndarray]:
    """A heuristic's layer map improved by the swap search (refine.swap_search)."""
    name, phy = named_map
    E, P = problem.num_experts, problem.cluster.num_gpus
    per_gpu = replicas_per_gpu(phy[layer][None], E, P)[0]
    share = problem.load[layer] / np.maximum(per_gpu.sum(axis=1), 1)
    better = swap_search(per_gpu, share, problem.slots_per_gpu, problem.allow_duplicates)
    return f"{name}+swap", phy2log_from_counts(better, problem.slots_per_gpu, np.argsort(-share, kind="stable"))


def balance_caps(problem: PlacementProblem, objective: Objective, maps: dict[str, np.ndarray]):
    """Per-layer cap on max GPU load: (1 + slack) x the best heuristic's, or None."""
    if objective.balance_slack is None:
        return None
    best = np.min([max_gpu_load(problem, phy) for phy in maps.values()], axis=0)
    return best * (1 + objective.balance_slack)


def plan_layers(problem: PlacementProblem, objective: Objective, time_limit: float = 60.0,
                mip_gap: float = 1e-3, backend: str = "highs", threads: int = 1, seed: int = 0,
                on_layer: Callable[[LayerResult], None] | None = None,
                layers: list[int] | None = None, prev_row: np.ndarray | None = None) -> list[LayerResult]:
    """Solve the given layers (default: all) in order, calling ``on_layer`` after each."""
    objective.check(problem)
    if backend == "highs":
        from moesim.planners.ilp_highs import solve_layer
    elif backend == "pyomo":
        from moesim.planners.ilp_pyomo import solve_layer
    else:
        raise ValueError(f"unknown ILP backend {backend!r}")
    deadline = time.perf_counter() + time_limit
    maps = heuristic_maps(problem, seed)
    caps = balance_caps(problem, objective, maps)
    bounds = balance_bound(problem)
    E, P = problem.num_experts, problem.cluster.num_gpus
    layers = list(range(problem.num_layers)) if layers is None else list(layers)
    results = []
    for i, lay in enumerate(layers):
        t0 = time.perf_counter()
        cap = None if caps is None else caps[lay]
        scored = []
        for name, phy in maps.items():
            terms = layer_terms(problem, objective, lay, phy[lay], prev_row)
            load_max = max_gpu_load(problem, phy[lay][None], lay)[0]
            if cap is None or load_max <= cap * (1 + 1e-12):
                scored.append((layer_value(terms, objective), name))
        # the best-balanced heuristic, improved by the swap search, is one more candidate
        polished = polish(problem, min(maps.items(), key=lambda kv: max_gpu_load(problem, kv[1][lay][None], lay)[0]), lay)
        rows = {name: phy[lay] for name, phy in maps.items()}
        rows[polished[0]] = polished[1]
        scored.append((layer_value(layer_terms(problem, objective, lay, polished[1], prev_row), objective),
                       polished[0]))
        if objective.weights.get("cross_node", 0) > 0:
            share_t = max(0.05, (deadline - time.perf_counter()) / (len(layers) - i)) / 2
            local = node_first_layer(problem, lay, cap, maps[min(scored)[1]][lay] if min(scored)[1] in maps
                                     else polished[1], objective.max_pairs, share_t, threads, seed)
            if local is not None:
                rows["node-first"] = local
                scored.append((layer_value(layer_terms(problem, objective, lay, local, prev_row), objective),
                               "node-first"))
        warm_value, warm_from = min(scored)
        warm_row = rows[warm_from]
        warm = replicas_per_gpu(warm_row[None], E, P)[0]
        share = max(0.05, (deadline - time.perf_counter()) / (len(layers) - i))
        res = solve_layer(problem, objective, lay, warm, prev_row=prev_row, cap=cap, time_limit=share,
                          mip_gap=mip_gap, threads=threads, seed=seed)
        order = np.argsort(-(problem.load[lay] / np.maximum(res.per_gpu.sum(axis=1), 1)), kind="stable")
        row = phy2log_from_counts(res.per_gpu, problem.slots_per_gpu, order)
        value = layer_value(layer_terms(problem, objective, lay, row, prev_row), objective)
        if not value <= warm_value + 1e-9 or (cap is not None and max_gpu_load(problem, row[None], lay)[0] > cap * (1 + 1e-9)):
            row, value = warm_row, warm_value
        bound = res.bound if np.isfinite(res.bound) else -np.inf
        bound = min(bound, value)
        gap = (value - bound) / abs(value) if value and np.isfinite(bound) else (0.0 if value == bound else np.inf)
        load_max = max_gpu_load(problem, row[None], lay)[0]
        result = LayerResult(lay, row, value, warm_value, warm_from, bound, float(gap), float(load_max),
                             float(bounds[lay]), res.status, time.perf_counter() - t0)
        results.append(result)
        if on_layer is not None:
            on_layer(result)
        prev_row = row
    return results
