"""``moesim place``: plan expert placement (ILP or heuristics), evaluate plans, export them.

    moesim place --trace T.parquet --gpus 16 --nodes 2 --redundant 16 --out plan.json
    moesim place --loads L.npy --gpus 64 --nodes 8 --redundant 32 --groups 8 --solver eplb --out p.json
    moesim place evaluate plan.json --trace other.parquet
"""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit

app = typer.Typer(
    help="Expert placement: plan with an ILP or heuristics, evaluate, export to SGLang/vLLM.",
    invoke_without_command=True,
)

SUMMARY_KEYS = ("solver", "status", "replica_selection", "max_mean_load", "max_mean_load_worst_layer", "balancedness",
                "node_max_mean_load", "cross_node_tokens", "dest_nodes_per_token", "dest_gpus_per_token",
                "gpu_hops_per_token", "same_gpu_duplicates", "replicas_migrated", "solve_s", "gap")


def _render(payload: dict) -> None:
    for key in SUMMARY_KEYS:
        if key in payload and payload[key] is not None:
            value = payload[key]
            typer.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    for key in ("plan", "export", "export_note", "notes"):
        if payload.get(key):
            typer.echo(f"{key}: {payload[key]}")


def _trace_and_load(trace_path: Path | None, loads_path: Path | None):
    from moesim.planners.inputs import PlacementError, load_matrix_file

    if (trace_path is None) == (loads_path is None):
        raise PlacementError("give exactly one of --trace T.parquet or --loads L.npy")
    if trace_path is not None:
        from moesim.traces import Trace

        trace = Trace.read(trace_path)
        return trace, trace.load_matrix().astype(float)
    return None, load_matrix_file(loads_path)


@app.callback()
def place(
    ctx: typer.Context,
    trace: Path = typer.Option(None, "--trace", help="Routing or counts trace (.parquet)."),
    loads: Path = typer.Option(None, "--loads", help="Load matrix [layers, experts] (.npy, .csv, .json)."),
    gpus: int = typer.Option(None, "--gpus", help="GPUs (expert-parallel ranks)."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes; must divide --gpus."),
    redundant: int = typer.Option(0, "--redundant", help="Redundant replicas per layer (beyond one per expert)."),
    slots_per_gpu: int = typer.Option(None, "--slots-per-gpu", help="Expert slots per GPU (default: ceil(replicas/GPUs))."),
    groups: int = typer.Option(1, "--groups", help="Expert groups (DeepSeek group-limited routing)."),
    objective: str = typer.Option("balance", "--objective",
                                  help="Terms, optionally weighted: balance, node_balance, cross_node, "
                                       "cross_gpu, hops, migration (e.g. 'balance=0.01,cross_node=1')."),
    balance_slack: float = typer.Option(None, "--balance-slack",
                                        help="Cap each layer's max GPU load at (1+slack) x the best heuristic's."),
    balance_reference: str = typer.Option(
        None, "--balance-reference",
        help="With --balance-slack: cap at (1+slack) x this heuristic's per-layer max GPU load under UNIFORM "
             "replica choice (e.g. eplb: EPLB as deployed) instead of the best heuristic's under the plan's rule."),
    solver: str = typer.Option("ilp", "--solver",
                               help="ilp, ilp-pyomo, moetuner, greedy, eplb, eplb-hierarchical, eplb-global, "
                                    "contiguous, round-robin, random."),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Hard wall-clock limit of the MILP (s)."),
    mip_gap: float = typer.Option(1e-3, "--mip-gap", help="Relative gap at which a layer's MILP stops."),
    max_pairs: int = typer.Option(4096, "--max-pairs", help="Co-activated pairs per layer in the cross_gpu term."),
    previous: Path = typer.Option(None, "--previous", help="Current plan (JSON) for the migration term."),
    model: str = typer.Option(None, "--model", help="Model preset: expert bytes (migration) and hidden size (comm)."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Allow two replicas of one expert on a GPU."),
    seed: int = typer.Option(0, "--seed", help="Seed of randomised baselines and HiGHS."),
    replica_selection: str = typer.Option(
        "uniform", "--replica-selection",
        help="How tokens pick among an expert's replicas: uniform (SGLang dynamic, vLLM) or nearest "
             "(SGLang static dispatch: a replica on the token's own node when there is one)."),
    out: Path = typer.Option(None, "--out", help="Plan file to write (JSON)."),
    export: str = typer.Option(None, "--export", help="Also write an engine map: sglang or vllm."),
    export_out: Path = typer.Option(None, "--export-out", help="Where the export goes (default: beside --out)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Plan where every expert replica sits; print balance, traffic, solve time and gap."""
    if ctx.invoked_subcommand is not None:
        return
    from moesim.planners.inputs import Cluster, PlacementError, PlacementProblem, routing_stats
    from moesim.planners.objectives import Objective
    from moesim.planners.plan import Plan
    from moesim.planners.solve import make_plan

    if gpus is None or out is None:
        raise PlacementError("planning needs --gpus G and --out PLAN.json (or use 'moesim place evaluate')")
    if time_limit <= 0:
        raise PlacementError(f"--time-limit must be positive, got {time_limit}")
    t, load = _trace_and_load(trace, loads)
    obj = Objective.parse(objective, balance_slack, max_pairs)
    expert_bytes, hidden = _model_facts(model)
    prev = Plan.load(previous).phy2log if previous is not None else None
    stats = routing_stats(t) if t is not None and not t.is_counts and (obj.needs_stats() or solver == "moetuner") else None
    problem = PlacementProblem(
        load, Cluster(gpus, nodes), num_replicas=load.shape[1] + redundant, slots_per_gpu=slots_per_gpu,
        num_groups=groups, allow_duplicates=allow_duplicates, previous=prev, expert_bytes=expert_bytes,
        stats=stats, source={"trace": str(trace)} if trace else {"loads": str(loads)},
        replica_selection=replica_selection,
    )
    if balance_reference is not None:
        obj = _with_reference(problem, obj, balance_reference, seed)
    plan = make_plan(problem, obj, solver, time_limit=time_limit, mip_gap=mip_gap, seed=seed)
    plan.save(out)
    payload = _figures(plan, t, load, prev, expert_bytes, hidden)
    payload["plan"] = str(out)
    if export:
        target = export_out or out.with_name(f"{out.stem}.{export}.json")
        plan.export(export, target)
        payload["export"] = str(target)
        if plan.replica_selection == "nearest":
            payload["export_note"] = ("planned for nearest replica selection: launch SGLang with "
                                      "--ep-dispatch-algorithm static" if export == "sglang" else
                                      "planned for nearest replica selection, which vLLM does not do (it "
                                      "picks replicas uniformly): loads and traffic will differ")
    payload["notes"] = plan.notes
    if plan.status == "time-limit":
        typer.echo("warning: time limit reached; the plan keeps the incumbent for unfinished layers", err=True)
    emit(payload, as_json, _render)


@app.command("evaluate")
def evaluate_cmd(
    plan_path: Path = typer.Argument(..., help="Plan file (JSON) written by 'moesim place'."),
    trace: Path = typer.Option(None, "--trace", help="Trace to evaluate on (.parquet)."),
    loads: Path = typer.Option(None, "--loads", help="Or a load matrix (.npy, .csv, .json)."),
    previous: Path = typer.Option(None, "--previous", help="Plan to count migrations from."),
    model: str = typer.Option(None, "--model", help="Model preset: migration bytes and modelled comm times."),
    replica_selection: str = typer.Option(None, "--replica-selection",
                                          help="uniform or nearest (default: the one the plan was made for)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Balance, traffic and operational figures of a plan on a trace (possibly another one)."""
    from moesim.planners.inputs import REPLICA_SELECTIONS
    from moesim.planners.plan import Plan

    if replica_selection is not None and replica_selection not in REPLICA_SELECTIONS:
        from moesim.errors import unknown_name

        raise unknown_name("replica selection", replica_selection, REPLICA_SELECTIONS)
    plan = Plan.load(plan_path)
    t, load = _trace_and_load(trace, loads)
    prev = Plan.load(previous).phy2log if previous is not None else None
    expert_bytes, hidden = _model_facts(model)
    payload = _figures(plan, t, load, prev, expert_bytes, hidden, replica_selection)
    payload["plan"] = str(plan_path)
    emit(payload, as_json, _render)


def _with_reference(problem, obj, name: str, seed: int):
    """``obj`` with the per-layer max GPU loads of heuristic ``name``'s plan under uniform choice."""
    import dataclasses

    from moesim.planners.baselines import BASELINES
    from moesim.planners.inputs import PlacementError
    from moesim.planners.objectives import Objective, max_gpu_load
    from moesim.planners.solve import make_plan

    if obj.balance_slack is None:
        raise PlacementError("--balance-reference needs --balance-slack (the cap is (1 + slack) x the reference's)")
    if name not in BASELINES:
        from moesim.errors import unknown_name

        raise unknown_name("balance reference", name, BASELINES)
    uniform = dataclasses.replace(problem, replica_selection="uniform")
    ref = make_plan(uniform, Objective(), name, seed=seed)
    return dataclasses.replace(obj, balance_reference=tuple(max_gpu_load(uniform, ref.phy2log)))


def _model_facts(model: str | None) -> tuple[int, int | None]:
    if model is None:
        return 0, None
    from moesim.model import get_model

    m = get_model(model)
    return m.expert_bytes(), m.hidden


def _figures(plan, trace, load, previous, expert_bytes, hidden, selection=None) -> dict:
    from moesim.planners.evaluate import evaluate

    payload = evaluate(plan, trace=trace, load=load, previous=previous, expert_bytes=expert_bytes, hidden=hidden,
                       selection=selection)
    payload["objective"] = plan.objective
    payload["per_layer_gap"] = plan.gap
    payload["per_layer_bound"] = plan.bound
    return payload
