"""``moesim trace import`` and ``moesim trace export``: convert other tools' routing records."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def _format_help() -> str:
    # names only: the registry module imports numpy and pyarrow, too slow for --help
    return ("Input format: arrays-npz, route-trace-v1, sglang-per-token, sglang-routed-experts, "
            "vllm-routed-experts, moe-infinity (see docs/trace-formats.md).")


def _writable(out: Path, what: str) -> None:
    from moesim.errors import MoesimError

    if out.is_dir():
        raise MoesimError(f"--out {out} is a folder; give the {what} file to write")


def _write(action, out: Path) -> None:
    """Run a write; an OS refusal (permissions, full disk) becomes one error line."""
    from moesim.errors import MoesimError

    try:
        action()
    except OSError as exc:
        raise MoesimError(f"cannot write {out}: {exc.strerror or exc}") from None


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_cmd(
        source: Path = typer.Argument(..., metavar="INPUT", help="File or folder to import."),
        fmt: str = typer.Option(..., "--format", "-f", help=_format_help()),
        out: Path = typer.Option(..., "--out", "-o", help="Trace to write (.parquet)."),
        model: str = typer.Option(None, "--model", "-m",
                                  help="Model preset: fills facts the input lacks (experts, "
                                       "top-k, shared experts) and is checked against it."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Convert a routing record of another tool into a moesim trace."""
        from moesim.traces.importers import import_trace, trace_summary

        _writable(out, ".parquet trace")
        trace = import_trace(source, fmt, model=model)
        _write(lambda: trace.write(out), out)
        emit({"format": fmt, "input": str(source), "out": str(out), **trace_summary(trace)}, as_json)

    @app.command("export")
    def export_cmd(
        trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file (.parquet)."),
        fmt: str = typer.Option("arrays-npz", "--format", "-f", help="Output format: arrays-npz."),
        out: Path = typer.Option(..., "--out", "-o", help="File to write (.npz)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Write a trace in another format (arrays-npz: numpy arrays, re-importable)."""
        from moesim.errors import unknown_name
        from moesim.traces import Trace
        from moesim.traces.importers import EXPORTERS, export_trace, trace_summary

        if fmt not in EXPORTERS:
            raise unknown_name("export format", fmt, EXPORTERS)
        _writable(out, ".npz")
        trace = Trace.read(trace_path)
        _write(lambda: export_trace(trace, fmt, out), out)
        emit({"format": fmt, "input": str(trace_path), "out": str(out), **trace_summary(trace)},
             as_json)
