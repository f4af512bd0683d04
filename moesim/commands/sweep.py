"""``moesim sweep SWEEP.yaml``: grid or random search over scenario parameters, locally with
joblib or on a Dask cluster, into one resumable Parquet table."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def _progress(enabled: bool):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                   TimeElapsedColumn(), transient=True)
    task = bar.add_task("sweep", total=None, note="")

    def update(done: int, total: int, row) -> None:
        note = "" if row is None or row.get("error") is None else "last point: error"
        bar.update(task, completed=done, total=total, note=note)

    return bar, update


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep(
        spec: Path = typer.Argument(..., metavar="SWEEP.yaml", help="Sweep file (see docs/app.md)."),
        backend: str = typer.Option("local", "--backend", help="local (joblib processes) or dask."),
        scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address "
                                      "(tcp://host:8786); default with --backend dask: a "
                                      "LocalCluster on this machine."),
        out: Path = typer.Option(None, "--out", help="Results table (.parquet); points already in "
                                 "it are skipped (default: SWEEP.parquet beside the sweep file)."),
        jobs: int = typer.Option(-1, "--jobs", help="Worker processes (-1: all cores; local "
                                 "backend and LocalCluster)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the points and exit."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Simulate every point of a parameter sweep; one row per point in a Parquet table."""
        from moesim.sweep import load_sweep, run_sweep

        sw = load_sweep(spec)
        target = out or spec.with_suffix(".parquet")
        if dry_run:
            pts = sw.points()
            emit({"sweep": sw.name, "points": len(pts), "parameters": list(sw.parameters),
                  "first": [p.changes for p in pts[:5]]}, as_json)
            return
        bar, update = _progress(not as_json and sys.stderr.isatty())
        if bar is None:
            result = run_sweep(sw, target, backend=backend, scheduler=scheduler, n_jobs=jobs)
        else:
            with bar:
                result = run_sweep(sw, target, backend=backend, scheduler=scheduler, n_jobs=jobs,
                                   on_point=update)
        payload = {"sweep": sw.name, "out": str(target), **result.to_dict()}

        def render(p: dict) -> None:
            typer.echo(f"sweep {p['sweep']}: {p['points']} points, {p['computed']} computed, "
                       f"{p['skipped_done']} already done, {p['errors']} with errors "
                       f"({p['backend']}, {p['wall_s']:.1f} s)")
            typer.echo(f"results: {p['out']}")

        emit(payload, as_json, render)
