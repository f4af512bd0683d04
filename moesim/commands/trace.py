"""``moesim trace ...``: import, export, synthesise, fit, inspect and capture routing traces."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit

app = typer.Typer(help="Routing traces: import, export, synth, fit, stats, capture.", no_args_is_help=True)

# Each module adds its commands to this group through register(app).
for _name in ("trace_io", "trace_synth", "trace_stats", "trace_capture"):
    if importlib.util.find_spec(f"moesim.commands.{_name}") is not None:
        importlib.import_module(f"moesim.commands.{_name}").register(app)


@app.command("info")
def info(trace: Path = typer.Argument(..., help="Trace file (.parquet)."), as_json: bool = JSON_OPTION) -> None:
    """Show a trace's metadata and size (reads the footer only)."""
    from moesim.traces import Trace

    t = Trace.read(trace)
    payload = {"path": str(trace), "rows": t.num_rows, "extra_columns": t.extra_columns, **t.meta.to_dict()}
    emit(payload, as_json)


@app.command("validate")
def validate(trace: Path = typer.Argument(..., help="Trace file (.parquet)."), as_json: bool = JSON_OPTION) -> None:
    """Stream the whole trace once and check every row against its metadata."""
    from moesim.traces import Trace

    t = Trace.read(trace)
    rows = t.validate()
    emit({"path": str(trace), "rows": rows, "valid": True}, as_json)
