"""Cluster simulation: configure a scenario, run it with progress, TTFT/TPOT distributions and
a step's timeline per GPU and link."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
import yaml

from moesim.app import charts
from moesim.app.state import Progress, current_trace, guarded, show_error, workspace
from moesim.errors import MoesimError

st.title("Cluster simulation")
st.write("Serve a workload on a simulated cluster (`moesim simulate`): continuous batching, "
         "expert-parallel MoE layers with the all-to-all model of `moesim.comm`, routing "
         "replayed from a trace or drawn synthetically.")


def bundled() -> dict:
    from moesim.scenario import bundled_scenarios

    return bundled_scenarios()


source = st.radio("Scenario", ["bundled", "upload a YAML file"], horizontal=True, key="sim_source")
base_text = None
if source == "bundled":
    names = list(bundled())
    chosen = st.selectbox("Bundled scenario", names, index=names.index("mixtral-8x7b-ep8")
                          if "mixtral-8x7b-ep8" in names else 0, key="sim_bundled")
    base_text = bundled()[chosen].read_text()
    base_name, base_dir = chosen, str(bundled()[chosen].parent)
else:
    file = st.file_uploader("Scenario YAML", type=["yaml", "yml"], key="sim_upload")
    if file is None:
        st.stop()
    base_text = file.getvalue().decode("utf-8", errors="replace")
    base_name, base_dir = file.name.rsplit(".", 1)[0], str(workspace())


def base_scenario():
    from moesim.scenario import ScenarioError, scenario_from_dict

    try:
        data = yaml.safe_load(base_text) or {}
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{base_name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict):
        data.setdefault("name", base_name)
    return scenario_from_dict(data, where=base_name, base_dir=base_dir)


base = guarded(base_scenario)
if base is None:
    st.stop()
with st.expander("Scenario file", expanded=False):
    st.code(base_text, language="yaml")

st.subheader("Change")
c1, c2, c3, c4 = st.columns(4)
rate = c1.number_input("Arrival rate (requests/s)", 0.1, 1e6, float(base.workload.rate_per_s or 10.0),
                       key="sim_rate")
requests = c2.number_input("Requests", 1, 1_000_000, int(base.workload.num_requests), key="sim_requests")
kinds = ["contiguous", "round_robin", "balanced"]
kind = c3.selectbox("Placement", kinds, index=kinds.index(base.placement.kind)
                    if base.placement.kind in kinds else 0, key="sim_placement")
redundant = c4.number_input("Redundant replicas (balanced)", 0, 4096, int(base.placement.redundant_experts),
                            key="sim_redundant")
c5, c6, c7, c8 = st.columns(4)
dispatchers = ["flat", "deepep-normal", "deepep-ll", "allgather", "hierarchical"]
dispatcher = c5.selectbox("Dispatcher", dispatchers, index=dispatchers.index(base.execution.dispatcher)
                          if base.execution.dispatcher in dispatchers else 0, key="sim_dispatcher")
overlap = c6.selectbox("Overlap", ["off", "two-microbatch"],
                       index=["off", "two-microbatch"].index(base.execution.overlap), key="sim_overlap")
cur = current_trace()
routing = c7.selectbox("Routing", ["the scenario's", *([f"current trace ({cur[0]})"] if cur else [])],
                       key="sim_routing")
record = c8.checkbox("Record per-GPU loads (timeline per GPU)", value=True, key="sim_record",
                     help="Keeps a row per step, layer and GPU: memory grows with steps x layers x GPUs.")


def run(progress_bar: Progress):
    from moesim.engine import build

    changes = {"workload.num_requests": int(requests), "placement.kind": kind,
               "placement.redundant_experts": int(redundant) if kind == "balanced" else 0,
               "execution.dispatcher": dispatcher, "execution.overlap": overlap,
               "simulation.record_gpu": bool(record)}
    if base.workload.arrival in ("poisson", "gamma"):
        changes["workload.rate_per_s"] = float(rate)
    sc = base.with_changes(changes)
    trace = cur[1] if cur and routing.startswith("current trace") else None
    sim = build(sc, trace)
    total = sim.scheduler.n

    def update(done: int, now: float) -> None:
        progress_bar.update(done / total, f"{done}/{total} requests finished, simulated t = {now:.2f} s")

    return sim.run(update)


if st.button("Simulate", key="sim_run", type="primary"):
    bar = Progress("building the scenario")
    st.button("Stop", key="sim_stop", help="Stops the simulation.")
    try:
        res = run(bar)
    except MoesimError as exc:
        show_error(exc)
        st.stop()
    bar.done(f"simulated {res.summary['simulated_s']:.2f} s in {res.summary['wall_s']:.2f} s")
    st.session_state["sim_result"] = res

res = st.session_state.get("sim_result")
if res is None:
    st.stop()
s = res.summary
st.subheader(f"Results: {s['scenario']}")
st.caption(f"{s['model']} on {s['cluster']} ({s['gpus']} GPUs), placement {s['placement']}, "
           f"dispatcher {s['dispatcher']}, overlap {s['overlap']}, routing {s['routing']} from "
           f"{res.routing_report.get('source', '-')}; "
           f"invariants checked: {', '.join(k for k, v in res.invariants.items() if v)}")
k1, k2, k3, k4, k5 = st.columns(5)
k1.metric("TTFT mean", f"{s['ttft_mean_s'] * 1e3:.1f} ms", help=f"p99 {s['ttft_p99_s'] * 1e3:.1f} ms")
k2.metric("TPOT mean", f"{s['tpot_mean_s'] * 1e3:.2f} ms", help=f"p99 {s['tpot_p99_s'] * 1e3:.2f} ms")
k3.metric("throughput", f"{s['throughput_tok_s']:,.0f} tok/s")
k4.metric("GPU load max/mean", f"{s.get('gpu_load_max_over_mean', 1.0):.2f}")
k5.metric("steps", f"{s['steps']:,}")

r = res.requests
left, right = st.columns(2)
left.plotly_chart(charts.histograms({"TTFT": r.ttft_s.dropna() * 1e3}, "Time to first token", "ms"),
                  key="sim_ttft")
right.plotly_chart(charts.histograms({"TPOT": r.tpot_s.dropna() * 1e3}, "Time per output token", "ms"),
                   key="sim_tpot")

st.subheader("A step's timeline")
steps = res.steps
if not len(steps):
    st.info("No steps were simulated.")
    st.stop()
longest = int(steps.duration_s.idxmax())
step = st.number_input(f"Step (0-{len(steps) - 1}; the longest is {longest})", 0, len(steps) - 1, longest,
                       key="sim_step")


def step_spans(res, step: int) -> pd.DataFrame:
    """Spans of one step for the Gantt chart: the library's Chrome-trace events of the step
    (compute and all-to-all tracks), plus each GPU's grouped GEMM from the per-GPU table."""
    from moesim.results import timeline_events

    row = res.steps.iloc[step]
    t0, t1 = row.start_s * 1e6, (row.start_s + row.duration_s) * 1e6
    tracks = {2: "compute (all GPUs)", 3: "all-to-all (links)"}
    spans = []
    for ev in timeline_events(res):
        if ev.get("ph") != "X" or ev.get("pid") != 0 or ev.get("tid") not in tracks:
            continue
        if ev["ts"] < t0 - 1e-6 or ev["ts"] >= t1:
            continue
        label = ev["name"]
        kind = next((k for k in ("attention", "dispatch", "experts", "combine") if k in label), "other")
        spans.append({"row": tracks[ev["tid"]], "kind": kind, "start_ms": (ev["ts"] - t0) / 1e3,
                      "dur_ms": ev["dur"] / 1e3, "label": label})
    gl = res.gpu_loads
    lay = res.layers[res.layers.step == step]
    if gl is not None and "experts_s" in gl and not res.overlap and len(lay):
        per = gl[gl.step == step]
        start = dict(zip(lay.layer, lay.start_s + lay.attention_s + lay.dispatch_s, strict=True))
        for g in per.itertuples(index=False):
            if g.experts_s > 0:
                spans.append({"row": f"GPU {g.gpu}", "kind": "experts",
                              "start_ms": (start[g.layer] * 1e6 - t0) / 1e3, "dur_ms": g.experts_s * 1e3,
                              "label": f"L{g.layer} experts on GPU {g.gpu}: {g.pairs:.0f} pairs"})
    return pd.DataFrame(spans, columns=["row", "kind", "start_ms", "dur_ms", "label"])


spans = step_spans(res, int(step))
row = steps.iloc[int(step)]
st.caption(f"step {int(step)}: {row.duration_s * 1e3:.2f} ms, {int(row.decode_tokens)} decode and "
           f"{int(row.prefill_tokens)} prefill tokens; dispatch {row.dispatch_s * 1e3:.2f} ms, experts "
           f"{row.experts_s * 1e3:.2f} ms, combine {row.combine_s * 1e3:.2f} ms")
if res.gpu_loads is None:
    st.caption("Per-GPU rows need 'Record per-GPU loads'.")
elif res.overlap:
    st.caption("With two micro-batches the stages of the two halves interleave: the chart shows "
               "the library's four-slot schedule per layer, without per-GPU rows.")
st.plotly_chart(charts.gantt(spans, f"Step {int(step)}: compute per GPU, all-to-all on the links"),
                key="sim_gantt")
lay = res.layers[res.layers.step == int(step)]
if len(lay):
    bottlenecks = lay.bottleneck.value_counts()
    st.caption("all-to-all bottleneck (the link term that set each layer's dispatch time): "
               + ", ".join(f"{k} in {v} layers" for k, v in bottlenecks.items()))
    frame = lay[["layer", "attention_s", "dispatch_s", "experts_max_s", "experts_mean_s", "combine_s"]].copy()
    frame.iloc[:, 1:] = frame.iloc[:, 1:] * 1e3
    st.dataframe(frame.rename(columns=lambda c: c.replace("_s", " (ms)")).round(4), hide_index=True,
                 key="sim_layers")
st.caption(f"{np.isfinite(r.finish_s).sum()} of {len(r)} requests finished.")
