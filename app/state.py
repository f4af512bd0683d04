"""Session state shared by the dashboard's pages: a private workspace folder, the traces loaded
in this session (name -> Parquet path), the current one, cached readers, error display and a
throttled progress bar.

Caching: results of library calls are cached by ``st.cache_data`` with the trace's
*fingerprint* (path, size, modification time) among the arguments, so a rewritten file is never
answered from a stale cache; ``Trace`` objects are shared read-only through ``st.cache_resource``.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import streamlit as st

from moesim.errors import MoesimError

TRACES = "traces"  # session key: {name: path}
CURRENT = "current_trace"


def workspace() -> Path:
    """A folder private to this browser session for uploads and generated files."""
    if "workspace" not in st.session_state:
        st.session_state["workspace"] = tempfile.mkdtemp(prefix="moesim-app-")
    return Path(st.session_state["workspace"])


def loaded_traces() -> dict[str, str]:
    return st.session_state.setdefault(TRACES, {})


def add_trace(name: str, trace) -> str:
    """Write ``trace`` into the workspace under a unique name; make it the current trace."""
    traces = loaded_traces()
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "trace"
    unique, n = base, 2
    while unique in traces:
        unique, n = f"{base}-{n}", n + 1
    path = workspace() / f"{unique}.parquet"
    trace.write(path)
    traces[unique] = str(path)
    st.session_state[CURRENT] = unique
    return unique


def current_trace() -> tuple[str, str] | None:
    """(name, path) of the current trace, or None."""
    traces = loaded_traces()
    name = st.session_state.get(CURRENT)
    if name in traces:
        return name, traces[name]
    return None


def fingerprint(path: str) -> tuple:
    st_ = Path(path).stat()
    return (str(path), st_.st_size, st_.st_mtime_ns)


@st.cache_resource(max_entries=16, show_spinner=False)
def open_trace(path: str, fp: tuple):
    """A ``Trace`` (shared, read-only); ``fp`` keys the cache to the file's current contents."""
    from moesim.traces import Trace

    return Trace.read(path)


def trace_of(path: str):
    return open_trace(path, fingerprint(path))


def require_trace(what: str):
    """(name, path, trace) of the current trace, or a note pointing to the Traces page and stop."""
    cur = current_trace()
    if cur is None:
        st.info(f"Load or synthesise a trace on the **Traces** page first; {what} uses it.")
        st.page_link("app_pages/traces.py", label="Go to Traces")
        st.stop()
    name, path = cur
    return name, path, trace_of(path)


def show_error(exc: BaseException) -> None:
    """One line for a user error (never a traceback)."""
    st.error(f"error: {exc}")


def guarded(fn, *args, **kwargs):
    """Call ``fn``; a ``MoesimError`` becomes an error line and None."""
    try:
        return fn(*args, **kwargs)
    except MoesimError as exc:
        show_error(exc)
        return None


class Progress:
    """``st.progress`` updated at most every ``every`` seconds (each update is a message to the
    browser); a click on any widget meanwhile stops the script run, and with it the work."""

    def __init__(self, label: str, every: float = 0.25):
        self.bar = st.progress(0.0, text=label)
        self.label = label
        self.every = every
        self.last = 0.0

    def update(self, fraction: float, text: str | None = None, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.bar.progress(min(max(float(fraction), 0.0), 1.0), text=text or self.label)
            self.last = now

    def done(self, text: str) -> None:
        self.bar.progress(1.0, text=text)


def int_list(text: str, what: str) -> list[int]:
    """'1, 2, 4' -> [1, 2, 4] (positive whole numbers)."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise MoesimError(f"{what}: write whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise MoesimError(f"{what}: give at least one positive whole number")
    return values
