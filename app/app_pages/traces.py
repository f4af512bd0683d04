"""Traces: load (upload, disk, synthesise, bundled), then statistics and heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from moesim.app import charts
from moesim.app.state import (
    add_trace,
    current_trace,
    fingerprint,
    guarded,
    show_error,
    trace_of,
    workspace,
)
from moesim.errors import MoesimError

MOESIM = "moesim trace (.parquet)"
AUTO = "auto (by file extension)"
BY_SUFFIX = {".parquet": MOESIM, ".npz": "arrays-npz", ".csv": "route-trace-v1"}
BUNDLED = Path(__file__).resolve().parents[2] / "moesim" / "data" / "traces" / "deepseek-v3-synth-seed7.parquet"


def formats() -> list[str]:
    from moesim.traces.importers import format_names

    return [MOESIM, *format_names()]


def presets() -> list[str]:
    from moesim.model import PRESETS

    return list(PRESETS)


def read_any(path: Path, fmt: str, model: str | None, first_requests: int):
    """A Trace from ``path`` in ``fmt`` (moesim Parquet or an importer), optionally cut to the
    first requests; every problem is a MoesimError (one line)."""
    from moesim.traces import Trace
    from moesim.traces.importers import import_trace

    if fmt == AUTO:
        fmt = BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise MoesimError(f"{path.name}: cannot tell the format from the extension; choose one")
    trace = Trace.read(path) if fmt == MOESIM else import_trace(path, fmt, model=model or None)
    if first_requests and not trace.is_counts:
        trace = trace.select(requests=range(first_requests))
    return trace


def loader_options(prefix: str):
    c1, c2, c3 = st.columns(3)
    fmt = c1.selectbox("Format", [AUTO, *formats()], key=f"{prefix}_format")
    model = c2.selectbox("Model preset (facts the file lacks)", ["", *presets()], key=f"{prefix}_model")
    first = c3.number_input("Keep the first N requests (0 = all)", 0, 1_000_000, 0, key=f"{prefix}_first")
    return fmt, model, int(first)


st.title("Traces")
st.write("Routing traces record which experts every token chose at every MoE layer. Load one "
         "(moesim Parquet, or any format `moesim trace import` reads), or synthesise one.")

upload, disk, synth, bundled = st.tabs(["Upload", "File on this machine", "Synthesise", "Bundled example"])

with upload:
    fmt, model, first = loader_options("upload")
    file = st.file_uploader("Trace file", key="trace_upload",
                            help="A moesim .parquet trace, an .npz of arrays (ESFT), a route_trace "
                                 "CSV, or another importer format chosen above.")
    if file is not None:
        signature = (file.name, file.size, fmt, model, first)
        if st.session_state.get("uploaded_signature") != signature:
            target = workspace() / "uploads" / Path(file.name).name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(file.getvalue())
            try:
                trace = read_any(target, fmt, model, first)
                name = add_trace(Path(file.name).stem, trace)
                st.session_state["uploaded_signature"] = signature
                st.session_state["upload_message"] = (f"Loaded {trace.num_rows:,} rows from "
                                                      f"{file.name} as '{name}'.")
            except MoesimError as exc:
                st.session_state["uploaded_signature"] = signature
                st.session_state["upload_message"] = None
                show_error(f"{file.name}: {exc}")
        if st.session_state.get("upload_message"):
            st.success(st.session_state["upload_message"])

with disk:
    path_text = st.text_input("Path", key="disk_path",
                              placeholder="../shared/data/esft-dsv2lite/esft_law.npz")
    fmt_d, model_d, first_d = loader_options("disk")
    if st.button("Load", key="disk_load") and path_text:
        path = Path(path_text).expanduser()
        if not path.exists():
            show_error(f"{path}: no such file or folder")
        else:
            trace = guarded(read_any, path, fmt_d, model_d, first_d)
            if trace is not None:
                name = add_trace(path.stem, trace)
                st.success(f"Loaded {trace.num_rows:,} rows from {path} as '{name}'.")

with synth:
    c1, c2, c3, c4 = st.columns(4)
    s_model = c1.selectbox("Model preset", presets(), index=presets().index("mixtral-8x7b"), key="synth_model")
    s_tokens = c2.number_input("Tokens", 16, 1_000_000, 2048, step=256, key="synth_tokens")
    s_requests = c3.number_input("Requests", 1, 10_000, 16, key="synth_requests")
    s_seed = c4.number_input("Seed", 0, 2**31 - 1, 0, key="synth_seed")
    c5, c6, c7, c8 = st.columns(4)
    s_skew = c5.slider("Skew (Zipf exponent)", 0.0, 2.0, 0.8, key="synth_skew")
    s_locality = c6.slider("Locality (token to token)", 0.0, 1.0, 0.3, key="synth_locality")
    s_affinity = c7.slider("Affinity (layer to layer)", 0.0, 1.0, 0.7, key="synth_affinity")
    s_decode = c8.slider("Decode fraction", 0.0, 1.0, 0.0, key="synth_decode")
    if st.button("Synthesise", key="synth_go"):
        from moesim.model import get_model
        from moesim.traces.synth import synthesize

        with st.spinner("synthesising"):
            trace = guarded(synthesize, get_model(s_model), int(s_tokens), requests=int(s_requests),
                            decode_fraction=s_decode, seed=int(s_seed), skew=s_skew,
                            locality=s_locality, affinity=s_affinity)
        if trace is not None:
            name = add_trace(f"{s_model}-synth-seed{int(s_seed)}", trace)
            st.success(f"Synthesised {trace.num_rows:,} rows as '{name}'.")

with bundled:
    st.write("A synthetic DeepSeek-V3 trace shipped with moesim (1,024 tokens, 58 MoE layers, "
             "256 experts, top-8; seed 7). Not a recording of the real model.")
    if st.button("Load the bundled trace", key="bundled_load"):
        from moesim.traces import Trace

        name = add_trace("deepseek-v3-synth-seed7", Trace.read(BUNDLED))
        st.success(f"Loaded '{name}'.")


# ----- statistics of the current trace ---------------------------------------------------------
@st.cache_resource(max_entries=8, show_spinner=False)
def trace_stats(path: str, fp: tuple, window: int):
    from moesim.traces.stats import compute_stats

    return compute_stats(trace_of(path), segment_lengths=(), windows=(window,))


cur = current_trace()
if cur is None:
    st.info("No trace loaded yet.")
    st.stop()
name, path = cur
trace = trace_of(path)
meta = trace.meta
st.header(f"Statistics of '{name}'")
st.caption(f"model {meta.model or 'unknown'}; {meta.num_layers} MoE layers, {meta.num_experts} "
           f"experts, top-{meta.top_k}; {trace.num_rows:,} rows; source {meta.source or '-'}")
window = st.number_input("Working-set window (tokens)", 1, 4096, 16, key="stats_window")
with st.spinner("computing statistics (one streaming pass)"):
    stats = guarded(trace_stats, path, fingerprint(path), int(window))
if stats is None:
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("tokens", f"{stats.tokens:,}")
m2.metric("load imbalance", f"{stats.imbalance_mean:.2f}" if stats.imbalance_mean is not None else "-",
          help="max/mean expert load of a layer, averaged over layers (1 = perfectly even)")
m3.metric("routing entropy (bits)", f"{stats.entropy_mean:.2f}" if stats.entropy_mean is not None else "-",
          help=f"of {np.log2(stats.experts):.2f} possible")
ws = stats.working_set.get(int(window))
m4.metric("working set", f"{ws.mean() / stats.layers:.1f}" if ws is not None and len(ws) else "-",
          help=f"distinct experts per layer used in windows of {int(window)} tokens (mean)")
for note in stats.notes:
    st.caption(f"note: {note}")

t_load, t_layer, t_co, t_aff, t_reuse = st.tabs(
    ["Expert load", "Imbalance & entropy", "Co-activation", "Inter-layer affinity", "Reuse distance"])
with t_load:
    load = stats.load.astype(float)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    st.plotly_chart(charts.heatmap(share * stats.experts, "Expert load per layer (1 = the mean expert)",
                                   "expert", "MoE layer", "load / mean"), key="load_heatmap")
with t_layer:
    frame = pd.DataFrame({"layer": np.arange(stats.layers), "imbalance (max/mean)": stats.imbalance,
                          "entropy (bits)": stats.entropy_bits})
    long = frame.melt("layer", var_name="figure", value_name="value")
    st.plotly_chart(charts.lines(long, "layer", "value", "figure", "Per-layer load imbalance and routing entropy",
                                 "MoE layer", "value"), key="layer_lines")
if stats.coactivation is None:
    for tab in (t_co, t_aff, t_reuse):
        with tab:
            st.info("This is a counts-only trace: co-activation, affinity and reuse need per-token routing.")
else:
    with t_co:
        layer = st.slider("Layer", 0, stats.layers - 1, 0, key="co_layer")
        co = stats.coactivation[layer].astype(float)
        np.fill_diagonal(co, np.nan)  # the diagonal is the load itself
        st.plotly_chart(charts.heatmap(co, f"Tokens choosing both experts, layer {layer}", "expert",
                                       "expert", "tokens"), key="co_heatmap")
    with t_aff:
        if stats.layers < 2:
            st.info("One MoE layer: no layer-to-layer affinity.")
        else:
            pair = st.slider("From layer", 0, stats.layers - 2, 0, key="aff_layer")
            aff = stats.affinity[pair].astype(float)
            rows = aff.sum(axis=1, keepdims=True)
            st.plotly_chart(charts.heatmap(np.divide(aff, rows, out=np.zeros_like(aff), where=rows > 0),
                                           f"P(expert at layer {pair + 1} | expert at layer {pair})",
                                           f"expert at layer {pair + 1}", f"expert at layer {pair}",
                                           "probability"), key="aff_heatmap")
    with t_reuse:
        from moesim.traces.stats import hit_curve_from_histogram

        scope = st.radio("Cache scope", list(stats.reuse), horizontal=True, key="reuse_scope")
        r = stats.reuse[scope]
        hist = r["histogram"]
        last = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 1
        dist = pd.DataFrame({"distance": np.arange(last), "accesses": hist[:last]})
        c1, c2 = st.columns(2)
        c1.plotly_chart(charts.bars({"accesses": dist.accesses}, f"LRU stack distance ({scope})",
                                    "distinct experts touched since the last use", "accesses",
                                    x=dist.distance), key="reuse_hist")
        caps = np.arange(0, last + 1)
        curve = pd.DataFrame({"capacity": caps, "hit rate": hit_curve_from_histogram(hist, r["accesses"], caps),
                              "cache": "LRU"})
        c2.plotly_chart(charts.lines(curve, "capacity", "hit rate", "cache", "LRU hit rate from the distances",
                                     "capacity (experts" + (" per layer)" if scope == "per-layer" else ")"),
                                     "hit rate"), key="reuse_curve")
        st.caption(f"{r['accesses']:,} accesses, {r['first_accesses']:,} first uses (never hits).")
