"""Overview: what each page does, the capabilities installed, the current trace."""

from __future__ import annotations

import importlib.util

import streamlit as st

from moesim import __version__
from moesim.app.state import current_trace, loaded_traces

st.title("moesim: Mixture-of-Experts inference, planned and simulated")
st.caption(f"moesim {__version__}. Every figure on these pages comes from the same library "
           "functions as the `moesim` command line.")

CAPABILITIES = [
    ("app_pages/traces.py", "Traces", "moesim.traces.stats",
     "Import or upload a routing trace, or synthesise one; expert load per layer, co-activation, "
     "inter-layer affinity, reuse distance."),
    ("app_pages/cache.py", "Cache & offload", "moesim.replay",
     "Cache policies against capacity with Belady MIN as the ceiling; per-token latency split "
     "into compute, transfer and stall on an offloading device."),
    ("app_pages/placement.py", "Placement", "moesim.planners.solve",
     "Expert placement: the ILP and the baselines, with progress, a time limit, bound and gap; "
     "per-GPU load, traffic between GPUs, export to SGLang and vLLM."),
    ("app_pages/simulation.py", "Cluster simulation", "moesim.engine",
     "Serve a workload on a simulated cluster: TTFT and TPOT distributions, a step's timeline "
     "per GPU and link."),
    ("app_pages/validation.py", "Validation", "moesim.validate",
     "A real offloaded run against its simulation, per token and per layer."),
    ("app_pages/sweeps.py", "Sweeps", "moesim.sweep",
     "Results of parameter sweeps (`moesim sweep`) as a table and Pareto plots."),
]

for path, title, module, text in CAPABILITIES:
    with st.container(border=True):
        left, right = st.columns([3, 1])
        with left:
            st.page_link(path, label=f"**{title}**")
            st.write(text)
        with right:
            ok = importlib.util.find_spec(module) is not None
            st.write("available" if ok else f"not installed ({module} missing)")

cur = current_trace()
st.subheader("Traces in this session")
if cur is None:
    st.write("None yet. Start on the **Traces** page: upload a file, point to one on disk, or "
             "synthesise a trace for a model preset.")
else:
    st.write(f"Current: **{cur[0]}**; loaded: {', '.join(loaded_traces())}.")
