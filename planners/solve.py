"""One entry point for every planner, with a hard wall-clock limit for the MILP solvers.

HiGHS can overrun its own ``time_limit`` (in presolve especially), so MILP plans are computed in
a child Python process (a fresh HiGHS scheduler, so the thread count is fixed per solve) that
writes each finished layer to its stdout as a pickled frame. At the deadline the child is killed; layers it did not
finish keep the best heuristic's map (the incumbent) and the plan says so in ``status`` and
``notes``.
"""

from __future__ import annotations

import queue
import time

import numpy as np

from moesim.errors import unknown_name
from moesim.planners.baselines import BASELINES, applicable, run_baseline
from moesim.planners.inputs import PlacementError, PlacementProblem
from moesim.planners.objectives import Objective, balance_bound, max_gpu_load, plan_values
from moesim.planners.plan import Plan

ILP_SOLVERS = ("ilp", "ilp-pyomo")
SOLVERS = (*ILP_SOLVERS, "moetuner", *BASELINES)
# a spawned child needs about this long to import numpy/highspy before it can start solving
CHILD_START_S = 3.0


def make_plan(problem: PlacementProblem, objective: Objective | None = None, solver: str = "ilp",
              time_limit: float = 60.0, mip_gap: float = 1e-3, seed: int = 0, threads: int = 1,
              subprocess: bool = True, on_layer=None) -> Plan:
    """Plan with ``solver``; MILP solvers respect ``time_limit`` (seconds, wall clock)."""
    objective = objective or Objective()
    if solver not in SOLVERS:
        raise unknown_name("placement solver", solver, SOLVERS)
    t0 = time.perf_counter()
    inputs = problem_summary(problem)
    if solver in ILP_SOLVERS:
        objective.check(problem)
        backend = "pyomo" if solver == "ilp-pyomo" else "highs"
        args = (problem, objective, time_limit, mip_gap, backend, threads, seed)
        results, finished = (_solve_in_child(args, time_limit, on_layer) if subprocess
                             else (_solve_here(args, on_layer), True))
        return _ilp_plan(problem, objective, solver, results, finished, time.perf_counter() - t0, inputs, seed)
    if solver == "moetuner":
        from moesim.planners.moetuner import moetuner_plan

        phy, info = moetuner_plan(problem, time_limit=time_limit, threads=threads, seed=seed)
        plan = _heuristic_plan(problem, objective, solver, phy, time.perf_counter() - t0, inputs)
        plan.notes.extend(info)
        return plan
    if solver not in applicable(problem):
        c = problem.cluster
        raise PlacementError(
            f"{solver} needs nodes to divide groups and replicas: {problem.num_groups} groups, "
            f"{problem.num_replicas} replicas, {c.num_nodes} nodes"
        )
    phy = run_baseline(solver, problem, seed)
    return _heuristic_plan(problem, objective, solver, phy, time.perf_counter() - t0, inputs)


def problem_summary(problem: PlacementProblem) -> dict:
    c = problem.cluster
    return {
        "layers": problem.num_layers, "experts": problem.num_experts, "gpus": c.num_gpus,
        "nodes": c.num_nodes, "replicas": problem.num_replicas, "slots_per_gpu": problem.slots_per_gpu,
        "groups": problem.num_groups, "allow_duplicates": problem.allow_duplicates,
        "previous": problem.previous is not None, "routing_stats": problem.stats is not None,
        "nvlink_Bps": c.nvlink_Bps, "network_Bps": c.network_Bps,
        "replica_selection": problem.replica_selection, **problem.source,
    }


def _selection_notes(problem) -> list:
    if problem.replica_selection != "nearest":
        return []
    return ["replica selection nearest: loads and cross-node tokens assume each token uses a replica on "
            "its own node when there is one (deploy with SGLang --ep-dispatch-algorithm static)"]


def _heuristic_plan(problem, objective, solver, phy, solve_s, inputs) -> Plan:
    values = plan_values(problem, objective, phy) if _can_score(problem, objective) else None
    bound = gap = None
    if values is not None and set(k for k, v in objective.weights.items() if v > 0) == {"balance"}:
        # a valid bound for the pure balance objective, for any placement with these replicas
        total = problem.load.sum(axis=1)
        mean = np.where(total > 0, total / problem.cluster.num_gpus, 1.0)
        bound = objective.weights["balance"] * balance_bound(problem) / mean
        gap = (values - bound) / values
    return Plan(phy, problem.num_experts, problem.cluster.num_gpus, problem.cluster.num_nodes, solver,
                objective=objective.to_dict(), inputs=inputs,
                objective_value=None if values is None else values.tolist(),
                bound=None if bound is None else bound.tolist(), gap=None if gap is None else gap.tolist(),
                status="heuristic", solve_s=solve_s, replica_selection=problem.replica_selection,
                notes=_selection_notes(problem))


def _can_score(problem, objective) -> bool:
    try:
        objective.check(problem)
    except PlacementError:
        return False
    return True


def _solve_here(args, on_layer):
    from moesim.planners.ilp import plan_layers

    problem, objective, time_limit, mip_gap, backend, threads, seed = args
    return plan_layers(problem, objective, time_limit, mip_gap, backend, threads, seed, on_layer=on_layer)


def _child_main() -> None:
    """Child process: read pickled arguments on stdin, write one pickled frame per layer."""
    import pickle
    import sys

    from moesim.planners.ilp import plan_layers

    problem, objective, time_limit, mip_gap, backend, threads, seed = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer

    def send(item):
        data = pickle.dumps(item)
        out.write(len(data).to_bytes(8, "little") + data)
        out.flush()

    try:
        plan_layers(problem, objective, max(time_limit - CHILD_START_S, 0.5), mip_gap, backend, threads, seed,
                    on_layer=send)
        send("done")
    except Exception as exc:  # reported to the parent, which raises it as one line
        send(("error", f"{type(exc).__name__}: {exc}"))


def _read_frames(stream, sink: queue.Queue) -> None:
    import pickle

    while True:
        head = stream.read(8)
        if len(head) < 8:
            sink.put(None)
            return
        sink.put(pickle.loads(stream.read(int.from_bytes(head, "little"))))


def _solve_in_child(args, time_limit, on_layer):
    """Run plan_layers in a fresh Python process; kill it at the deadline."""
    import pickle
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-c", "from moesim.planners.solve import _child_main; _child_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    frames: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_frames, args=(proc.stdout, frames), daemon=True)
    reader.start()
    deadline = time.perf_counter() + time_limit
    results, finished = [], False
    try:
        proc.stdin.write(pickle.dumps(args))
        proc.stdin.close()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                item = frames.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if item is None:
                raise PlacementError(f"the solver process ended without a result (exit status {proc.wait()})")
            if item == "done":
                finished = True
                break
            if isinstance(item, tuple) and item[0] == "error":
                raise PlacementError(f"solver failed: {item[1]}")
            results.append(item)
            if on_layer is not None:
                on_layer(item)
    finally:
        if proc.poll() is None:
            proc.kill()  # the hard limit: HiGHS may not stop on its own
        proc.wait()
    return results, finished


def _ilp_plan(problem, objective, solver, results, finished, solve_s, inputs, seed) -> Plan:
    L = problem.num_layers
    done = {r.layer: r for r in results}
    notes = _selection_notes(problem)
    if problem.replica_selection != "uniform":
        notes.append("no MILP ran: with nearest selection a replica's load depends on which nodes hold the "
                     "expert; the plan is the best of the heuristics, the swap search and the node-first "
                     "search, and the bound is the trivial one")
    if len(done) < L:
        missing = [lay for lay in range(L) if lay not in done]
        if not missing:
            raise PlacementError("no plan")
        # keep the incumbent: the best heuristic, scored layer by layer as the ILP would
        from moesim.planners.ilp import heuristic_maps

        maps = heuristic_maps(problem, seed)
        if not maps:
            raise PlacementError(f"time limit reached after {len(done)} of {L} layers and no heuristic incumbent")
        for lay in missing:
            best = min(maps, key=lambda name: max_gpu_load(problem, maps[name][lay][None], lay)[0])
            row = maps[best][lay]
            done[lay] = _Kept(lay, row, best)
        notes.append(f"time limit reached: the MILP finished {len(results)} of {L} layers; the other "
                     f"{len(missing)} keep the best-balanced heuristic's map (no bound)")
    phy = np.stack([done[lay].row for lay in range(L)])
    values = plan_values(problem, objective, phy)
    bound = np.array([getattr(done[lay], "bound", -np.inf) for lay in range(L)], float)
    gap = np.where(np.isfinite(bound), (values - bound) / np.where(values != 0, np.abs(values), 1), np.inf)
    starts = sorted({r.warm_from for r in results})
    notes.append("warm starts: " + ", ".join(starts) if starts else "no layer reached the MILP")
    polish_gap = [getattr(done[lay], "polish_gap", None) for lay in range(L)]
    polished = [g for g in polish_gap if g is not None]
    if polished:
        notes.append(f"cross_node: {len(polished)} layers rebalanced inside nodes with the node assignment "
                     f"fixed, largest gap of that MILP {max(polished):.2e}; the whole-layer gap uses a "
                     f"bound of one node per token (the hypergraph MILP's LP bound is no better)")
    status = "optimal-within-gap" if finished and all(r.status == "Optimal" for r in results) else (
        "solved" if finished else "time-limit")
    return Plan(phy, problem.num_experts, problem.cluster.num_gpus, problem.cluster.num_nodes, solver,
                objective=objective.to_dict(), inputs=inputs, objective_value=values.tolist(),
                bound=[None if not np.isfinite(b) else float(b) for b in bound],
                gap=[None if not np.isfinite(g) else float(g) for g in gap], status=status,
                solve_s=solve_s, notes=notes, polish_gap=polish_gap if polished else None,
                replica_selection=problem.replica_selection)


class _Kept:
    def __init__(self, layer, row, name):
        self.layer, self.row, self.warm_from = layer, row, name
