"""Validation: a real offloaded run (``moesim run-real``) against its simulation on the profile
of the same machine (``moesim calibrate``), per token and per layer (``moesim validate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from moesim.app import charts
from moesim.app.state import guarded, show_error, workspace

st.title("Validation: simulated against measured")
st.write("`moesim run-real` runs MoE layers with experts offloaded behind a cache and records "
         "every token's timings; `moesim calibrate` (+ `calibrate-executor`) profiles the machine. "
         "Here the simulator replays the run from the profile alone and is compared with what "
         "was measured: bytes and the hit/miss sequence must match exactly, latency is reported "
         "as errors. See docs/validation.md for recording a run.")

how = st.radio("Inputs", ["files on this machine", "upload"], horizontal=True, key="val_how")
run_path = profile_path = None
if how == "files on this machine":
    c1, c2 = st.columns(2)
    run_text = c1.text_input("Run file (Parquet from moesim run-real)", key="val_run")
    prof_text = c2.text_input("Hardware profile (YAML; default: hardware.yaml beside the run)",
                              key="val_profile")
    if run_text:
        run_path = Path(run_text).expanduser()
        profile_path = Path(prof_text).expanduser() if prof_text else run_path.parent / "hardware.yaml"
else:
    c1, c2 = st.columns(2)
    run_file = c1.file_uploader("Run file (.parquet)", key="val_run_upload")
    prof_file = c2.file_uploader("Hardware profile (.yaml)", key="val_profile_upload")
    if run_file is not None and prof_file is not None:
        folder = workspace() / "validation"
        folder.mkdir(exist_ok=True)
        run_path, profile_path = folder / "run.parquet", folder / "hardware.yaml"
        run_path.write_bytes(run_file.getvalue())
        profile_path.write_bytes(prof_file.getvalue())


def validate(run_path: Path, profile_path: Path):
    from moesim.calibrate import load_profile
    from moesim.errors import MoesimError
    from moesim.executor.runfile import read_run
    from moesim.validate import compare

    for p, what in ((run_path, "run file"), (profile_path, "hardware profile")):
        if not p.is_file():
            raise MoesimError(f"{p}: no such {what}")
    return compare(read_run(run_path), load_profile(profile_path))


if run_path is None:
    st.info("Give a run file and the profile of the machine it ran on.")
    st.stop()
if st.button("Validate", key="val_go", type="primary"):
    with st.spinner("simulating the run"):
        out = guarded(validate, run_path, profile_path)
    if out is not None:
        st.session_state["validation_result"] = (str(run_path), *out)

res = st.session_state.get("validation_result")
if res is None:
    st.stop()
_, r, series = res
st.subheader(f"{r['run']}")
st.caption(f"model shape {r['model']}, {r['layers']} MoE layers, {r['tokens']} tokens, device "
           f"{r['device']}; policy {r['policy']} (prefetch {r['prefetcher']}), capacity "
           f"{r['capacity_experts'] or r['capacity_bytes']}")
k1, k2, k3, k4, k5 = st.columns(5)
k1.metric("hit/miss sequence", "exact" if r["hits_exact"] else f"{r['hit_mismatches']} mismatches")
k2.metric("bytes moved", "exact" if r["bytes_exact"] else "differ",
          help=f"measured {r['bytes_measured']:,} B, simulated {r['bytes_simulated']:,} B")
k3.metric("latency MAPE", f"{r['latency_mape']:.1f} %")
k4.metric("P50 error", f"{r['p50_error']:+.1f} %")
k5.metric("P99 error", f"{r['p99_error']:+.1f} %")
if not (r["hits_exact"] and r["bytes_exact"]):
    show_error("the simulated cache does not reproduce the run's hits or bytes: the run and the "
               "simulator disagree on the policy's behaviour")

meas, sim = np.asarray(series["measured"]) * 1e3, np.asarray(series["simulated"]) * 1e3
tok = pd.DataFrame({"token": np.arange(len(meas)), "measured": meas, "simulated": sim}).melt(
    "token", var_name="series", value_name="ms")
st.plotly_chart(charts.lines(tok, "token", "ms", "series", "Per-token latency", "token", "ms"),
                key="val_tokens")
per_layer = pd.DataFrame(r["per_layer"])
layers = {f"{what} {kind}": per_layer[f"{what}_{kind}_s"] * 1e3
          for what in ("dense", "expert") for kind in ("measured", "predicted")}
st.plotly_chart(charts.bars(layers, "Per layer: medians over tokens (dense part; one expert for one token)",
                            "layer", "ms", x=per_layer.layer), key="val_layers")
table = per_layer.copy()
for col in [c for c in table.columns if c.endswith("_s")]:
    table[col] = table[col] * 1e3
st.dataframe(table.rename(columns=lambda c: c.replace("_s", " (ms)").replace("_pct", " (%)")).round(4),
             hide_index=True, key="val_layer_table")
with st.expander("Simulator inputs built from the profile"):
    st.json(r["scenario"])
