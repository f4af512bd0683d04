"""Sweeps: a results table of ``moesim sweep`` and Pareto plots; the bundled example sweep can
be run from here (locally, with progress)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from moesim.app import charts
from moesim.app.state import Progress, guarded, show_error, workspace
from moesim.errors import MoesimError

EXAMPLE = Path(__file__).resolve().parents[2] / "moesim" / "data" / "sweeps" / "mixtral-ep8-placement.yaml"

st.title("Sweeps")
st.write("`moesim sweep SWEEP.yaml` simulates every point of a grid or random search (joblib "
         "locally, or a Dask cluster with `--backend dask`) into one Parquet table. Load a table "
         "here, or run the bundled example.")

how = st.radio("Results", ["file on this machine", "upload", "run the example sweep"], horizontal=True,
               key="sw_how")
table = None
if how == "file on this machine":
    text = st.text_input("Results table (.parquet)", key="sw_path")
    if text:
        from moesim.sweep import read_results

        path = Path(text).expanduser()
        table = guarded(read_results, path) if path.exists() else None
        if not path.exists():
            show_error(f"{path}: no such file")
elif how == "upload":
    file = st.file_uploader("Results table (.parquet)", key="sw_upload")
    if file is not None:
        from moesim.sweep import read_results

        target = workspace() / "sweep-upload.parquet"
        target.write_bytes(file.getvalue())
        table = guarded(read_results, target)
else:
    st.code(EXAMPLE.read_text(), language="yaml")
    jobs = st.number_input("Worker processes", 1, 64, 1, key="sw_jobs")
    if st.button("Run the example sweep", key="sw_run", type="primary"):
        from moesim.sweep import load_sweep, run_sweep

        bar = Progress("sweeping")
        st.button("Stop", key="sw_stop", help="Stops the sweep; finished points stay in the table "
                                              "and a rerun resumes.")

        def on_point(done, total, row):
            bar.update(done / total, f"{done}/{total} points", force=True)

        try:
            result = run_sweep(load_sweep(EXAMPLE), workspace() / "example-sweep.parquet",
                               n_jobs=int(jobs), on_point=on_point)
            bar.done(f"{result.total} points ({result.computed} computed, {result.skipped} resumed) in "
                     f"{result.wall_s:.1f} s")
        except MoesimError as exc:
            show_error(exc)
            st.stop()
    done = workspace() / "example-sweep.parquet"
    if done.exists():
        from moesim.sweep import read_results

        table = read_results(done)

if table is None or not len(table):
    st.stop()
st.session_state["sweep_table"] = table
st.subheader(f"{len(table)} points")
st.dataframe(table, hide_index=True, key="sw_table")
errors = table["error"].notna().sum() if "error" in table else 0
if errors:
    st.warning(f"{errors} points failed; their error is in the 'error' column.")

skip = {"point", "point_id", "replicate", "error", "wall_s"}
numeric = [c for c in table.columns if c not in skip and np.issubdtype(table[c].dtype, np.number)]
params = [c for c in table.columns if c not in skip and c not in numeric or "." in c]
metrics = [c for c in numeric if "." not in c]
if len(metrics) < 2:
    st.info("A Pareto plot needs at least two numeric figures in the table.")
    st.stop()
st.subheader("Pareto front")
c1, c2, c3, c4, c5 = st.columns(5)
x = c1.selectbox("x", metrics, index=metrics.index("tpot_mean_s") if "tpot_mean_s" in metrics else 0, key="sw_x")
x_sense = c2.selectbox("x is better", ["min", "max"], key="sw_x_sense")
y_default = metrics.index("throughput_tok_s") if "throughput_tok_s" in metrics else 1
y = c3.selectbox("y", metrics, index=y_default, key="sw_y")
y_sense = c4.selectbox("y is better", ["max", "min"], key="sw_y_sense")
colour = c5.selectbox("colour by", ["", *params], index=1 if params else 0, key="sw_colour")
if x == y:
    show_error("choose two different figures")
    st.stop()
from moesim.sweep import pareto_front  # noqa: E402

front = guarded(pareto_front, table, {x: x_sense, y: y_sense})
if front is None:
    st.stop()
st.plotly_chart(charts.scatter_front(table, x, y, front, colour or None,
                                     f"{int(front.sum())} of {len(table)} points on the front"),
                key="sw_pareto")
st.dataframe(table[front].sort_values(x), hide_index=True, key="sw_front")
