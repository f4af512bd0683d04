"""Placement planners on real and DeepSeek-V3-scale routing: balance, traffic, solve time, gap.

    python benchmarks/placement_bench.py [--quick] [--out benchmarks/results/placement_bench.json]

1. ESFT (DeepSeek-V2-Lite architecture, 64 experts x 26 MoE layers, top-6; ../shared/data) planned
   on the 'law' task onto 8 GPUs (2 nodes x 4), 16 GPUs (2 nodes x 8) and 16 GPUs (4 nodes x 4),
   one replica per expert: every baseline, the ILP on the balance objective (it must never lose
   to the best baseline on it), and the ILP on cross-node traffic (token-level objective) with
   every layer's max GPU load capped at 1.01 x the best heuristic's (equal balance); then the
   law plans evaluated on the other three tasks (domain shift). Then the same traffic objective
   with 16 redundant replicas and nearest replica selection (SGLang "static": a token uses a
   replica on its own node when there is one), EPLB and every baseline evaluated under the same
   rule and redundancy.
2. DeepSeek-V3 scale: a synthetic trace from moesim.traces.synth (deepseek-v3 preset: 58 MoE
   layers x 256 experts, top-8, 8 groups with 4 chosen per token; 4096 tokens, seed 0) onto
   64 GPUs in 8 nodes with 32 redundant replicas: a check that every token's experts lie in at
   most 4 groups, the ILP on balance, whole, under a 120 s hard limit (the per-layer gap must be
   <= 1 %), and the ILP on cross-node traffic at equal balance, under uniform selection and
   under nearest selection (same 32 redundant replicas).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "esft-dsv2lite"
BASELINE_NAMES = ("contiguous", "round-robin", "random", "greedy", "eplb", "eplb-global")


def esft_trace(task: str):
    from moesim.traces import Trace

    d = np.load(DATA / f"esft_{task}.npz")
    return Trace.from_arrays(d["experts"], d["weights"], d["seq_lens"], "prefill", num_experts=64)


def row(name, plan, metrics, value=None):
    return {
        "plan": name, "max_mean_load": round(metrics["max_mean_load"], 5),
        "worst_layer": round(metrics["max_mean_load_worst_layer"], 5),
        "balancedness": round(metrics["balancedness"], 5),
        "node_max_mean": round(metrics["node_max_mean_load"], 5),
        "cross_node_tokens": None if metrics["cross_node_tokens"] is None else round(metrics["cross_node_tokens"]),
        "dest_nodes_per_token": None if metrics["dest_nodes_per_token"] is None else round(metrics["dest_nodes_per_token"], 4),
        "dest_gpus_per_token": None if metrics["dest_gpus_per_token"] is None else round(metrics["dest_gpus_per_token"], 4),
        "gpu_hops_per_token": None if metrics["gpu_hops_per_token"] is None else round(metrics["gpu_hops_per_token"], 3),
        "duplicates": metrics["same_gpu_duplicates"], "solve_s": round(plan.solve_s, 2),
        "max_gap": None if metrics["gap"] is None else round(metrics["gap"], 5),
        "objective": None if value is None else round(float(value), 6),
    }


def compare(problem, trace, objective, time_limit, mip_gap, label):
    """Every baseline and the ILP on one objective; returns the rows and the plans."""
    from moesim.planners.evaluate import evaluate
    from moesim.planners.ilp import balance_caps, heuristic_maps
    from moesim.planners.objectives import max_gpu_load, plan_values
    from moesim.planners.solve import make_plan

    caps = balance_caps(problem, objective, heuristic_maps(problem))
    rows, plans = [], {}
    for name in BASELINE_NAMES:
        plan = make_plan(problem, objective, name)
        plans[name] = plan
        r = row(name, plan, evaluate(plan, trace=trace, load=problem.load),
                plan_values(problem, objective, plan.phy2log).sum())
        # feasible for the ILP's own problem: no same-GPU duplicates and under the balance cap
        r["feasible"] = r["duplicates"] == 0 and (caps is None or bool(
            (max_gpu_load(problem, plan.phy2log) <= caps * (1 + 1e-9)).all()))
        rows.append(r)
    plan = make_plan(problem, objective, "ilp", time_limit=time_limit, mip_gap=mip_gap)
    plans["ilp"] = plan
    rows.append(row("ilp", plan, evaluate(plan, trace=trace, load=problem.load), np.sum(plan.objective_value)))
    feasible = [r for r in rows if r["plan"] != "ilp" and r["feasible"]]
    # the cap comes from the heuristics with same-GPU duplicates swapped away; every raw baseline
    # may have duplicates or be over it: then there is no feasible baseline to compare with
    best = min(feasible, key=lambda r: r["objective"]) if feasible else None
    ilp = rows[-1]
    print(f"\n[{label}] objective {objective.to_dict()['weights']}, slack {objective.balance_slack}")
    print(f"{'plan':12s} {'max/mean':>9s} {'worst':>7s} {'node':>7s} {'x-node tok':>11s} {'nodes/tok':>9s} "
          f"{'gpus/tok':>8s} {'hops':>6s} {'dup':>4s} {'objective':>11s} {'solve_s':>8s} {'gap':>8s}")
    for r in rows:
        print(f"{r['plan']:12s} {r['max_mean_load']:9.4f} {r['worst_layer']:7.4f} {r['node_max_mean']:7.4f} "
              f"{r['cross_node_tokens'] or 0:11d} {r['dest_nodes_per_token'] or 0:9.4f} {r['dest_gpus_per_token'] or 0:8.4f} "
              f"{r['gpu_hops_per_token'] or 0:6.2f} {r['duplicates']:4d} {r['objective']:11.5f} {r['solve_s']:8.2f} "
              f"{r['max_gap'] if r['max_gap'] is not None else '-':>8}{'' if r.get('feasible', True) else '  (infeasible: duplicates or over the cap)'}")
    if best is None:
        verdict = {"best_baseline": None, "best_baseline_feasible": False, "ilp_objective": ilp["objective"],
                   "ilp_never_loses": None}
        print("no raw baseline is feasible for the ILP (duplicates or over the cap): no comparison on the objective")
    else:
        verdict = {"best_baseline": best["plan"], "best_baseline_objective": best["objective"],
                   "best_baseline_feasible": True, "ilp_objective": ilp["objective"],
                   "ilp_never_loses": ilp["objective"] <= best["objective"] + 1e-9}
        print(f"ILP {ilp['objective']:.5f} vs best feasible baseline {best['plan']} {best['objective']:.5f}: "
              f"{'never loses' if verdict['ilp_never_loses'] else 'LOSES'}")
    return rows, plans, verdict


def traffic_verdict(rows, reference="eplb", plan=None):
    ref = next(r for r in rows if r["plan"] == reference)
    ilp = next(r for r in rows if r["plan"] == "ilp")
    cut = 1 - ilp["cross_node_tokens"] / ref["cross_node_tokens"]
    worse = ilp["max_mean_load"] / ref["max_mean_load"] - 1
    out = {"reference": reference, "cross_node_cut": round(cut, 4), "balance_vs_reference": round(worse, 4),
           "equal_balance": worse <= 0.01, "cut_at_least_20pct": cut >= 0.20}
    if plan is not None:  # how the ILP got there: warm starts, whole-layer gap, node-fixed gap
        gaps = [g for g in plan.gap if g is not None]
        polish = [g for g in (plan.polish_gap or []) if g is not None]
        out.update({"warm_starts": next((n for n in plan.notes if n.startswith("warm starts")), None),
                    "max_layer_gap": round(max(gaps), 4) if gaps else None,
                    "node_fixed_layers": len(polish),
                    "node_fixed_max_gap": float(f"{max(polish):.3g}") if polish else None})
        print(f"  {out['warm_starts']}; whole-layer gap (trivial bound: balance bound plus one node per token, "
              f"or zero cross-node tokens under nearest selection) up to "
              f"{out['max_layer_gap']}; node-fixed balance MILP on {len(polish)} layers, largest gap "
              f"{out['node_fixed_max_gap']}")
    print(f"cross-node tokens vs {reference}: {-cut:+.1%} at max/mean {worse:+.2%} "
          f"({'equal balance' if out['equal_balance'] else 'NOT equal balance'}; "
          f"{'>= 20 %' if out['cut_at_least_20pct'] else 'below the 20 % target'})")
    return out


def esft_section(gpus, nodes, time_limit, traffic_time_limit):
    from moesim.planners.evaluate import evaluate
    from moesim.planners.inputs import Cluster, problem_from_trace
    from moesim.planners.objectives import Objective

    trace = esft_trace("law")
    problem = problem_from_trace(trace, Cluster(gpus, nodes))
    label = f"ESFT law, {gpus} GPUs in {nodes} nodes"
    bal_rows, _, bal_verdict = compare(problem, trace, Objective(), time_limit, 1e-3, label + ", balance")
    traffic = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    tr_rows, plans, tr_verdict = compare(problem, trace, traffic, traffic_time_limit, 1e-3, label + ", cross-node")
    tr_verdict.update(traffic_verdict(tr_rows, "eplb", plans["ilp"]))
    shift = {}
    for task in ("intent", "summary", "translation"):
        other = esft_trace(task)
        shift[task] = {name: row(name, plans[name], evaluate(plans[name], trace=other))
                       for name in ("eplb", "greedy", "ilp")}
        s = shift[task]
        s["ilp_cross_node_cut_vs_eplb"] = round(1 - s["ilp"]["cross_node_tokens"] / s["eplb"]["cross_node_tokens"], 4)
        print(f"domain shift law -> {task}: max/mean eplb {s['eplb']['max_mean_load']:.4f}, "
              f"ilp(traffic) {s['ilp']['max_mean_load']:.4f}; cross-node eplb {s['eplb']['cross_node_tokens']}, "
              f"ilp {s['ilp']['cross_node_tokens']} ({-s['ilp_cross_node_cut_vs_eplb']:+.1%})")
    near = nearest_section(trace, Cluster(gpus, nodes), 16, {}, traffic_time_limit, label)
    return {"gpus": gpus, "nodes": nodes, "balance": {"rows": bal_rows, **bal_verdict},
            "cross_node": {"rows": tr_rows, **tr_verdict}, "domain_shift": shift,
            "cross_node_nearest": near}


def nearest_section(trace, cluster, redundant, constraints, time_limit, label, shift_tasks=("intent", "summary", "translation")):
    """The traffic objective with redundant replicas under nearest replica selection; EPLB and
    the baselines under the same rule. The EPLB plan under uniform selection is context."""
    from moesim.planners.evaluate import evaluate
    from moesim.planners.inputs import problem_from_trace
    from moesim.planners.objectives import Objective

    problem = problem_from_trace(trace, cluster, num_replicas=trace.meta.num_experts + redundant,
                                 replica_selection="nearest", **constraints)
    traffic = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    rows, plans, verdict = compare(problem, trace, traffic, time_limit, 1e-3,
                                   f"{label}, +{redundant} redundant, nearest selection, cross-node")
    verdict.update(traffic_verdict(rows, "eplb", plans["ilp"]))
    if constraints.get("num_groups", 1) > 1:  # eplb is the hierarchical policy there: also vs global
        verdict["vs_eplb_global"] = traffic_verdict(rows, "eplb-global")
    uni = evaluate(plans["eplb"], trace=trace, load=problem.load, selection="uniform")
    ilp = next(r for r in rows if r["plan"] == "ilp")
    verdict["context_eplb_uniform"] = {
        "max_mean_load": round(uni["max_mean_load"], 5), "cross_node_tokens": round(uni["cross_node_tokens"]),
        "ilp_nearest_cut_vs_it": round(1 - ilp["cross_node_tokens"] / uni["cross_node_tokens"], 4)}
    print(f"context: the same EPLB plan under uniform selection: max/mean {uni['max_mean_load']:.4f}, "
          f"cross-node {round(uni['cross_node_tokens'])}")
    shift = {}
    if trace.meta.num_experts == 64:  # ESFT: the law plans on the other tasks
        for task in shift_tasks:
            other = esft_trace(task)
            e, i = (evaluate(plans[n], trace=other) for n in ("eplb", "ilp"))
            shift[task] = {"eplb_max_mean": round(e["max_mean_load"], 4), "ilp_max_mean": round(i["max_mean_load"], 4),
                           "ilp_cross_node_cut_vs_eplb": round(1 - i["cross_node_tokens"] / e["cross_node_tokens"], 4)}
            print(f"domain shift law -> {task} (nearest): {shift[task]}")
    return {"redundant": redundant, "replica_selection": "nearest", "rows": rows, **verdict, "domain_shift": shift}


def dsv3_section(tokens, time_limit, traffic_time_limit):
    from moesim.model import get_model
    from moesim.planners.inputs import Cluster, problem_from_trace
    from moesim.planners.objectives import Objective
    from moesim.traces.synth import synthesize

    t0 = time.perf_counter()
    trace = synthesize(get_model("deepseek-v3"), tokens, seed=0)
    problem = problem_from_trace(trace, Cluster(64, 8), num_replicas=256 + 32, num_groups=8)
    print(f"\nsynthetic DeepSeek-V3 trace + statistics: {time.perf_counter() - t0:.1f} s")
    groups = group_check(trace, 8)
    label = "DeepSeek-V3 scale: 58 x 256 onto 64 GPUs / 8 nodes, +32 redundant"
    bal_rows, plans, bal_verdict = compare(problem, trace, Objective(), time_limit, 0.01, label + ", balance")
    ilp = plans["ilp"]
    gaps = [g for g in ilp.gap if g is not None]
    bal_verdict.update({
        "wall_s": round(ilp.solve_s, 2), "under_120_s": ilp.solve_s < 120, "status": ilp.status,
        "layers_with_gap": len(gaps), "max_layer_gap": round(max(gaps), 5) if gaps else None,
        "all_layers_gap_le_1pct": len(gaps) == problem.num_layers and max(gaps) <= 0.01,
    })
    print(f"whole plan in {ilp.solve_s:.1f} s (limit 120 s, status {ilp.status}); largest per-layer gap "
          f"{bal_verdict['max_layer_gap']} over {len(gaps)} layers")
    traffic = Objective({"balance": 0.01, "cross_node": 1.0}, balance_slack=0.01)
    tr_rows, tr_plans, tr_verdict = compare(problem, trace, traffic, traffic_time_limit, 1e-3, label + ", cross-node")
    tr_verdict["vs_eplb"] = traffic_verdict(tr_rows, "eplb")
    tr_verdict["vs_eplb_global"] = traffic_verdict(tr_rows, "eplb-global", tr_plans["ilp"])
    near = nearest_section(trace, Cluster(64, 8), 32, {"num_groups": 8}, traffic_time_limit,
                           label.replace(", +32 redundant", ""))
    return {"tokens": tokens, "group_limited": groups, "balance": {"rows": bal_rows, **bal_verdict},
            "cross_node": {"rows": tr_rows, **tr_verdict}, "cross_node_nearest": near}


def group_check(trace, num_groups):
    """Groups each (token, layer) row's experts fall in: group-limited routing keeps it <= 4."""
    experts = trace.to_arrays()["experts"]  # [T, L, K]
    group = experts // (trace.meta.num_experts // num_groups)
    sorted_g = np.sort(group, axis=2)
    distinct = 1 + (np.diff(sorted_g, axis=2) != 0).sum(axis=2)
    hist = np.bincount(distinct.ravel(), minlength=num_groups + 1)
    out = {"max_groups_per_token": int(distinct.max()), "mean_groups_per_token": round(float(distinct.mean()), 4),
           "rows_by_groups": {int(k): int(v) for k, v in enumerate(hist) if v}}
    print(f"group-limited check: at most {out['max_groups_per_token']} of {num_groups} groups per token "
          f"(mean {out['mean_groups_per_token']}; rows by groups {out['rows_by_groups']})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ESFT 8 GPUs only, shorter limits")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "placement_bench.json"))
    args = ap.parse_args(argv)
    result = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "cpus": __import__("os").cpu_count()}}
    t0 = time.perf_counter()
    if DATA.is_dir():
        result["esft"] = [esft_section(8, 2, 30 if args.quick else 40, 30 if args.quick else 60)]
        if not args.quick:
            result["esft"].append(esft_section(16, 2, 40, 60))
            result["esft"].append(esft_section(16, 4, 40, 60))
    else:
        print(f"ESFT traces not found in {DATA}: skipping that part")
    if not args.quick:
        result["dsv3"] = dsv3_section(4096, 120, 90)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    from moesim.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(args.out, result)
    md = Path(args.out).with_suffix(".md")
    write_text_atomic(md, summary_md(result))
    print(f"\nwrote {args.out} and {md} ({result['total_s']} s)")


def summary_md(result) -> str:
    """Cross-node cut at equal balance per setting, uniform (no redundancy) and nearest."""
    lines = ["# Placement: cross-node tokens at equal balance (ILP vs EPLB, same selection rule and redundancy)",
             "", f"`python benchmarks/placement_bench.py`, {result['total_s']} s on {result['machine']['cpus']} CPUs.", "",
             "| setting | selection, redundant | reference | ref max/mean | ILP max/mean | ref cross-node | "
             "ILP cross-node | cut | >= 20 % |", "|---|---|---|---|---|---|---|---|---|"]

    def add(name, sel, rows, ref):
        r = next(x for x in rows if x["plan"] == ref)
        i = next(x for x in rows if x["plan"] == "ilp")
        cut = 1 - i["cross_node_tokens"] / r["cross_node_tokens"]
        eq = i["max_mean_load"] <= r["max_mean_load"] * 1.01
        lines.append(f"| {name} | {sel} | {ref} | {r['max_mean_load']:.4f} | {i['max_mean_load']:.4f}"
                     f"{'' if eq else ' (not equal balance)'} | {r['cross_node_tokens']:,} | "
                     f"{i['cross_node_tokens']:,} | {cut:.1%} | {'yes' if cut >= 0.2 and eq else 'no'} |")

    for sec in result.get("esft", []):
        name = f"ESFT law, {sec['gpus']} GPUs / {sec['nodes']} nodes"
        add(name, "uniform, 0", sec["cross_node"]["rows"], "eplb")
        add(name, f"nearest, {sec['cross_node_nearest']['redundant']}", sec["cross_node_nearest"]["rows"], "eplb")
    if "dsv3" in result:
        d = result["dsv3"]
        for ref in ("eplb", "eplb-global"):
            add("DeepSeek-V3 synthetic, 64 GPUs / 8 nodes", "uniform, 32", d["cross_node"]["rows"], ref)
            add("DeepSeek-V3 synthetic, 64 GPUs / 8 nodes", "nearest, 32", d["cross_node_nearest"]["rows"], ref)
    lines += ["", "eplb at DeepSeek-V3 scale is the hierarchical policy (8 groups on 8 nodes; 86 same-GPU "
              "duplicates, so not a feasible plan for the ILP's problem); eplb-global is the balanced one.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
