"""Entry script of the dashboard: ``moesim app`` runs ``streamlit run`` on this file."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="moesim", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Overview", url_path="overview", default=True),
    st.Page("app_pages/traces.py", title="Traces", url_path="traces"),
    st.Page("app_pages/cache.py", title="Cache & offload", url_path="cache"),
    st.Page("app_pages/placement.py", title="Placement", url_path="placement"),
    st.Page("app_pages/simulation.py", title="Cluster simulation", url_path="simulation"),
    st.Page("app_pages/validation.py", title="Validation", url_path="validation"),
    st.Page("app_pages/sweeps.py", title="Sweeps", url_path="sweeps"),
]

page = st.navigation(PAGES)


def trace_picker() -> None:
    """The sidebar's choice of the current trace (drawn after the page, which may add one)."""
    from moesim.app.state import CURRENT, loaded_traces

    with st.sidebar:
        traces = loaded_traces()
        if not traces:
            st.caption("No trace loaded yet: load or synthesise one on the Traces page.")
            return
        names = list(traces)
        current = st.session_state.get(CURRENT)
        current = current if current in names else names[-1]
        choice = st.selectbox("Current trace", names, index=names.index(current),
                              help="The trace the Cache, Placement and Simulation pages use.")
        st.session_state[CURRENT] = choice
        if choice != current:
            st.rerun()  # the page drew with the previous trace


try:
    page.run()
finally:
    trace_picker()
