"""Placement: solve with progress and a time limit, compare plans, per-GPU load, traffic between
GPUs, bound and gap, export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from moesim.app import charts
from moesim.app.state import Progress, loaded_traces, require_trace, show_error, trace_of
from moesim.errors import MoesimError
from moesim.fileio import to_json

st.title("Expert placement")
name, path, trace = require_trace("the placement planner")
meta = trace.meta
L, E = meta.num_layers, meta.num_experts

SOLVERS = ["ilp", "ilp-pyomo", "moetuner", "greedy", "eplb", "eplb-hierarchical", "eplb-global",
           "contiguous", "round-robin", "random"]

st.write(f"Plan where every expert replica of '{name}' ({L} layers x {E} experts) sits. The ILP "
         "(HiGHS) starts from the best heuristic and stops at the time limit keeping the best "
         "plan so far; heuristics are instant. Balance is max/mean GPU load per layer (1 is perfect).")
c1, c2, c3, c4 = st.columns(4)
gpus = c1.number_input("GPUs", 1, 4096, 8, key="pl_gpus")
nodes = c2.number_input("Nodes", 1, 512, 1, key="pl_nodes")
redundant = c3.number_input("Redundant replicas per layer", 0, 4096, 0, key="pl_redundant")
groups = c4.number_input("Expert groups (group-limited routing)", 1, 64, 1, key="pl_groups")
c5, c6, c7, c8 = st.columns(4)
solvers = c5.multiselect("Planners", SOLVERS, default=["ilp", "greedy", "eplb", "contiguous"], key="pl_solvers")
objective = c6.text_input("Objective", "balance", key="pl_objective",
                          help="Terms, optionally weighted: balance, node_balance, cross_node, "
                               "cross_gpu, hops, migration (e.g. 'balance=1,cross_node=0.01').")
time_limit = c7.number_input("ILP time limit (s)", 1.0, 3600.0, 20.0, key="pl_time")
mip_gap = c8.number_input("ILP relative gap", 0.0, 0.5, 1e-3, format="%.4f", key="pl_gap")
others = [n for n in loaded_traces() if n != name]
shift = st.multiselect("Also evaluate on (domain shift: plan on this trace, serve another)", others,
                       key="pl_shift")


def plan_one(solver: str, bar: Progress, done: float, share: float):
    from moesim.planners.inputs import Cluster, problem_from_trace
    from moesim.planners.objectives import Objective
    from moesim.planners.solve import make_plan

    obj = Objective.parse(objective)
    needs_stats = obj.needs_stats() or solver == "moetuner"
    problem = problem_from_trace(trace, Cluster(int(gpus), int(nodes)), with_stats=needs_stats,
                                 num_replicas=E + int(redundant), num_groups=int(groups))
    finished = []

    def on_layer(result):  # one MILP layer finished (a click on Stop interrupts here)
        finished.append(result)
        bar.update(done + share * len(finished) / L, f"{solver}: {len(finished)}/{L} layers solved")

    return make_plan(problem, obj, solver, time_limit=float(time_limit), mip_gap=float(mip_gap),
                     on_layer=on_layer)


def figures(plan, tr) -> dict:
    from moesim.planners.evaluate import evaluate

    return evaluate(plan, trace=tr)


if st.button("Solve", key="pl_run", type="primary"):
    if not solvers:
        show_error("choose at least one planner")
        st.stop()
    bar = Progress("planning")
    st.button("Stop", key="pl_stop", help="Stops the solve: the solver process is killed.")
    plans, rows = {}, []
    try:
        for i, solver in enumerate(solvers):
            bar.update(i / len(solvers), f"{solver}: solving", force=True)
            plan = plan_one(solver, bar, i / len(solvers), 1 / len(solvers))
            plans[solver] = plan
            fig = figures(plan, trace)
            row = {"planner": solver, "status": plan.status, "solve_s": plan.solve_s,
                   "max/mean load": fig["max_mean_load"], "worst layer": fig["max_mean_load_worst_layer"],
                   "balancedness": fig["balancedness"], "GPUs per token": fig["dest_gpus_per_token"],
                   "nodes per token": fig["dest_nodes_per_token"],
                   "same-GPU duplicates": fig["same_gpu_duplicates"], "largest gap": fig["gap"]}
            for other in shift:
                row[f"max/mean on {other}"] = figures(plan, trace_of(loaded_traces()[other]))["max_mean_load"]
            rows.append(row)
    except MoesimError as exc:
        show_error(exc)
        st.stop()
    bar.done(f"{len(plans)} plans")
    st.session_state["placement_result"] = (name, plans, pd.DataFrame(rows))

result = st.session_state.get("placement_result")
if result is None or result[0] != name:
    st.stop()
_, plans, table = result
st.subheader("Plans compared")
st.dataframe(table.round(4), hide_index=True, key="pl_table")
if (table["same-GPU duplicates"] > 0).any():
    st.caption("Same-GPU duplicates: several replicas of one expert on one GPU (they split its tokens "
               "unevenly between GPUs). The ILP forbids them (moesim place --allow-duplicates allows "
               "them), so a planner that uses them can reach a lower max/mean load than the ILP.")

best = table.sort_values("max/mean load").planner.iloc[0]
chosen = st.selectbox("Plan to inspect", list(plans), index=list(plans).index(best), key="pl_chosen")
plan = plans[chosen]
for note in plan.notes:
    st.caption(f"{chosen}: {note}")
layer = st.slider("Layer", 0, L - 1, 0, key="pl_layer")
load = trace.load_matrix().astype(float)

left, right = st.columns(2)
gpu_loads = {k: p.gpu_loads(load)[layer] for k, p in plans.items()}
mean = load[layer].sum() / int(gpus)
left.plotly_chart(charts.bars(gpu_loads, f"Per-GPU load, layer {layer} (token-expert pairs)", "GPU",
                              "pairs", reference=mean, reference_name="mean"), key="pl_gpu_bars")


@st.cache_data(max_entries=32, show_spinner=False)
def traffic(phy_row: tuple, gpus: int, nodes: int, layer: int, path: str, fp: tuple) -> np.ndarray:
    """Token copies sent from each GPU to each GPU at one layer: tokens dealt to the GPUs
    round-robin (data-parallel attention), replicas chosen as moesim.comm does."""
    from moesim import comm
    from moesim.hardware import get_cluster

    arrays = trace_of(path).to_arrays()
    ids = arrays["experts"][:, layer].astype(np.int64)
    ids = ids[(ids >= 0).all(axis=1)]
    base = get_cluster("h100-ib")
    cluster = base.model_copy(update={"num_nodes": nodes, "gpus_per_node": gpus // nodes})
    placement = comm.Placement.from_slots(np.asarray(phy_row), gpus, E)
    src = np.arange(len(ids)) % gpus
    return comm.counts_from_tokens(src, ids, placement, cluster).X


from moesim.app.state import fingerprint  # noqa: E402

X = traffic(tuple(int(x) for x in plan.phy2log[layer]), int(gpus), int(nodes), layer, path, fingerprint(path))
off = X.copy()
np.fill_diagonal(off, np.nan)
right.plotly_chart(charts.heatmap(off, f"{chosen}: tokens sent GPU to GPU, layer {layer}",
                                  "destination GPU", "source GPU", "tokens"), key="pl_traffic")

bound_rows = []
for k, p in plans.items():
    if p.objective_value is None:
        continue
    for lay in range(L):
        bound_rows.append({"planner": k, "layer": lay, "figure": f"{k} objective", "value": p.objective_value[lay]})
        if p.bound is not None and p.bound[lay] is not None:
            bound_rows.append({"planner": k, "layer": lay, "figure": f"{k} bound", "value": p.bound[lay]})
if bound_rows:
    bf = pd.DataFrame(bound_rows)
    st.plotly_chart(charts.lines(bf, "layer", "value", "figure", "Objective and lower bound per layer "
                                 "(gap = (objective - bound) / objective)", "MoE layer", "objective",
                                 dashed=tuple(f for f in bf.figure.unique() if f.endswith("bound"))),
                    key="pl_bounds")
gaps = [g for g in (plan.gap or []) if g is not None]
st.caption(f"{chosen}: status {plan.status}, solve {plan.solve_s:.2f} s, largest gap "
           f"{max(gaps):.4%}" if gaps else f"{chosen}: status {plan.status}, solve {plan.solve_s:.2f} s, no bound")

st.subheader("Export")
e1, e2, e3 = st.columns(3)
e1.download_button("Plan (moesim JSON)", to_json(plan.to_dict()),
                   file_name=f"{chosen}-plan.json", mime="application/json", key="pl_dl_plan")
for col, engine, method in ((e2, "SGLang", "to_sglang"), (e3, "vLLM", "to_vllm")):
    try:
        text = to_json(getattr(plan, method)())
        col.download_button(f"{engine} expert map", text, file_name=f"{chosen}.{engine.lower()}.json",
                            mime="application/json", key=f"pl_dl_{engine.lower()}")
    except MoesimError as exc:
        col.caption(f"{engine}: {exc}")
