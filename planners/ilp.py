"""The ILP planner: warm start from the best heuristic, solve layer by layer, keep the incumbent.

Steps per layer (in layer order, because the hops term looks at the layer before):
1. every applicable heuristic's map for this layer (same-GPU duplicates swapped away when they
   are not allowed) is scored with the objective; with a cross_node term on several nodes the
   node-first placement (token-level node partition, ``locality.py``) is one more candidate, and
   under nearest selection with groups so is whole groups on nodes + the hottest experts on every
   node (``groups_everywhere_layer``);
   the best one that respects the balance cap is the warm start, and its replica counts are
   the ILP's;
2. the layer's MILP (highspy arrays, or the Pyomo reference) is solved with that start, the valid
   bounds and a time share; with cross_node it is the token-hypergraph model (``ilp_highs``);
3. cross_node only: a second MILP fixes each expert's node as found and rebalances the GPUs
   inside every node (its gap, on that restricted model, is ``polish_gap``);
4. the ILP's map is kept only if it scores no worse than the start with the same function
   (objectives.layer_terms), so the ILP never loses to the best heuristic on its own objective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.planners.baselines import applicable, repair_duplicates, run_baseline
from moesim.planners.inputs import PlacementProblem
from moesim.planners.locality import groups_everywhere_layer, node_first_layer, node_of_experts
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
    # cross_node: the node-fixed balance MILP (bound and gap within the node assignment)
    polish_bound: float | None = None
    polish_gap: float | None = None
    polish_status: str | None = None


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
    """Per-layer cap on max GPU load: (1 + slack) x the best heuristic's (or x the objective's
    ``balance_reference`` when it has one), or None."""
    if objective.balance_slack is None:
        return None
    if objective.balance_reference is not None:
        return np.asarray(objective.balance_reference, float) * (1 + objective.balance_slack)
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

        def score(row, lay=lay, prev_row=prev_row):  # a candidate map's objective on this layer
            return layer_value(layer_terms(problem, objective, lay, row, prev_row), objective)

        scored = []
        for name, phy in maps.items():
            if cap is None or max_gpu_load(problem, phy[lay][None], lay)[0] <= cap * (1 + 1e-12):
                scored.append((score(phy[lay]), name))
        # the best-balanced heuristic, improved by the swap search, is one more candidate
        polished = polish(problem, min(maps.items(), key=lambda kv: max_gpu_load(problem, kv[1][lay][None], lay)[0]), lay)
        rows = {name: phy[lay] for name, phy in maps.items()}
        rows[polished[0]] = polished[1]
        if cap is None or max_gpu_load(problem, polished[1][None], lay)[0] <= cap * (1 + 1e-12) or not scored:
            scored.append((score(polished[1]), polished[0]))
        layer_share = max(0.05, (deadline - time.perf_counter()) / (len(layers) - i))
        hyper = objective.weights.get("cross_node", 0) > 0 and problem.cluster.num_nodes > 1
        if hyper:
            best_name = min(scored)[1]
            local = node_first_layer(problem, lay, cap, rows[best_name], 0.5 * layer_share, seed)
            if local is not None:
                rows["node-first"] = local[0]
                scored.append((score(local[0]), "node-first"))
        if hyper and problem.replica_selection == "nearest" and problem.num_groups > 1:
            spread = groups_everywhere_layer(problem, lay, cap)
            if spread is not None:
                rows["groups+everywhere"] = spread
                scored.append((score(spread), "groups+everywhere"))
        warm_value, warm_from = min(scored)
        warm_row = rows[warm_from]
        warm = replicas_per_gpu(warm_row[None], E, P)[0]
        left = max(0.05, t0 + layer_share - time.perf_counter())
        if problem.replica_selection == "uniform":
            res = solve_layer(problem, objective, lay, warm, prev_row=prev_row, cap=cap,
                              time_limit=0.6 * left if hyper else left, mip_gap=mip_gap, threads=threads, seed=seed)
            row, value = _keep_better(problem, objective, lay, res.per_gpu, warm_row, warm_value, cap, prev_row)
        else:  # the MILPs' loads are linear in x only when every replica carries load / count
            res = _NoMilp(problem.replica_selection)
            row, value = warm_row, warm_value
        fixed = None
        if hyper and problem.replica_selection == "uniform" and _one_node_each(problem, row):
            per_gpu = replicas_per_gpu(row[None], E, P)[0]
            fixed = solve_layer(problem, objective, lay, per_gpu, prev_row=prev_row, cap=cap,
                                 time_limit=max(0.05, t0 + layer_share - time.perf_counter()), mip_gap=mip_gap,
                                 threads=threads, seed=seed, fixed_node=node_of_experts(problem, row))
            row, value = _keep_better(problem, objective, lay, fixed.per_gpu, row, value, cap, prev_row)
        bound = res.bound if np.isfinite(res.bound) else -np.inf
        if hyper:  # every token reaches at least one node; the MILP's LP bound is rarely better
            bound = max(bound, _trivial_bound(problem, objective, lay, bounds[lay]))
        bound = min(bound, value)
        gap = (value - bound) / abs(value) if value and np.isfinite(bound) else (0.0 if value == bound else np.inf)
        load_max = max_gpu_load(problem, row[None], lay)[0]
        result = LayerResult(lay, row, value, warm_value, warm_from, bound, float(gap), float(load_max),
                             float(bounds[lay]), res.status, time.perf_counter() - t0)
        if fixed is not None:
            pb = min(fixed.bound, value) if np.isfinite(fixed.bound) else None
            result.polish_bound = pb
            result.polish_gap = None if pb is None else float((value - pb) / abs(value) if value else 0.0)
            result.polish_status = fixed.status
        results.append(result)
        if on_layer is not None:
            on_layer(result)
        prev_row = row
    return results


def _keep_better(problem, objective, lay, per_gpu, row, value, cap, prev_row):
    """The MILP's map if it scores no worse than ``row`` (and respects the cap), else ``row``."""
    order = np.argsort(-(problem.load[lay] / np.maximum(per_gpu.sum(axis=1), 1)), kind="stable")
    new = phy2log_from_counts(per_gpu, problem.slots_per_gpu, order)
    new_value = layer_value(layer_terms(problem, objective, lay, new, prev_row), objective)
    if new_value <= value + 1e-9 and (cap is None or max_gpu_load(problem, new[None], lay)[0] <= cap * (1 + 1e-9)):
        return new, new_value
    return row, value


def _one_node_each(problem, row) -> bool:
    """Whether every expert's replicas sit on one node."""
    c = problem.cluster
    occupied = row >= 0
    slot_node = c.node_of()[np.arange(len(row)) // problem.slots_per_gpu]
    pairs = np.unique(np.stack([row[occupied], slot_node[occupied]]), axis=1)
    return len(pairs[0]) == len(np.unique(pairs[0]))


def _trivial_bound(problem, objective, lay, load_bound) -> float:
    """A valid lower bound of balance + node_balance + cross_node without solving anything: max
    load >= max(mean, largest load per replica), node max >= node mean, and every token reaches
    at least one node (the cross_node term >= 1 - 1/N). -inf with any other term."""
    wts = objective.weights
    if any(v > 0 for k, v in wts.items() if k not in ("balance", "node_balance", "cross_node")):
        return -np.inf
    total = problem.load[lay].sum()
    mean = total / problem.cluster.num_gpus if total > 0 else 1.0
    # nearest selection: a token whose experts all have a replica on its node stays there
    cross = (1 - 1 / problem.cluster.num_nodes) if problem.replica_selection == "uniform" else 0.0
    return wts.get("balance", 0) * load_bound / mean + wts.get("node_balance", 0) + wts.get("cross_node", 0) * cross


class _NoMilp:
    """What a layer reports when no MILP ran (nearest replica selection: loads depend on which
    nodes hold an expert's replicas, not linear in x): no bound beyond the trivial one."""

    def __init__(self, selection):
        self.bound = -np.inf
        self.status = f"no MILP ({selection} selection)"
