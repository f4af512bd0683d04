"""``moesim simulate SCENARIO.yaml``: run one scenario and print (or write) its results."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit
from moesim.errors import MoesimError


def parse_changes(items: list[str] | None) -> dict:
    """``--set key.path=value`` pairs; values are parsed as YAML (numbers, booleans, lists)."""
    import yaml

    changes = {}
    for item in items or []:
        if "=" not in item:
            raise MoesimError(f"--set needs key=value, got {item!r}")
        key, _, text = item.partition("=")
        try:
            changes[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MoesimError(f"--set {key}: cannot parse value {text!r}") from None
    return changes


def load_named_scenario(spec: str):
    """A scenario file, or the name of a bundled scenario (``moesim demo --list``)."""
    from moesim.scenario import ScenarioError, bundled_scenarios, load_scenario

    path = Path(spec)
    if path.exists() or path.suffix.lower() in (".yaml", ".yml"):
        return load_scenario(path)
    bundled = bundled_scenarios()
    if spec in bundled:
        return load_scenario(bundled[spec])
    raise ScenarioError(
        f"{spec}: no such scenario file or bundled scenario; bundled: {', '.join(sorted(bundled))}")


def progress_reporter(total: int, enabled: bool):
    """A rich progress bar over finished requests, or None when off (not a TTY / --json)."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                   "requests"), TextColumn("t={task.fields[sim]:.2f}s"), TimeElapsedColumn(),
                   transient=True)
    task = bar.add_task("sim", total=total, sim=0.0)

    def update(done: int, now: float) -> None:
        bar.update(task, completed=done, sim=now)

    return bar, update


def run_scenario(scenario, trace=None, show_progress=False):
    from moesim.engine import build

    sim = build(scenario, trace)
    bar, update = progress_reporter(sim.scheduler.n, show_progress)
    if bar is None:
        return sim.run()
    with bar:
        return sim.run(update)


def write_tables(results, folder: Path) -> list[str]:
    """Write the tidy tables as Parquet files (atomically) into ``folder``."""
    from moesim.fileio import atomic_path

    written = []
    tables = {"requests": results.requests, "steps": results.steps, "layers": results.layers}
    if results.gpu_loads is not None:
        tables["gpu_loads"] = results.gpu_loads
    for name, frame in tables.items():
        target = folder / f"{name}.parquet"
        with atomic_path(target) as tmp:
            frame.to_parquet(tmp, index=False)
        written.append(str(target))
    return written


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        scenario: str = typer.Argument(..., help="Scenario YAML file, or a bundled scenario name."),
        trace: Path = typer.Option(None, "--trace", help="Replay this routing trace (.parquet)."),
        timeline: Path = typer.Option(None, "--timeline",
                                      help="Write a Chrome-trace/Perfetto JSON timeline here."),
        tables: Path = typer.Option(None, "--tables",
                                    help="Write requests/steps/layers tables (Parquet) to this folder."),
        changes: list[str] = typer.Option(None, "--set",
                                          help="Override a scenario field: --set workload.rate_per_s=8"),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Simulate MoE inference serving on a cluster: TTFT, TPOT, throughput, per-layer costs."""
        sc = load_named_scenario(scenario)
        if changes:
            sc = sc.with_changes(parse_changes(changes))
        if trace is not None and not trace.exists():
            raise MoesimError(f"{trace}: no such trace file")
        show = not as_json and sys.stdout.isatty()
        results = run_scenario(sc, str(trace) if trace else None, show)
        payload = results.to_dict()
        if timeline is not None:
            payload["timeline"] = str(timeline)
            payload["timeline_events"] = results.write_timeline(timeline)
        if tables is not None:
            payload["tables"] = write_tables(results, tables)

        def render(p: dict) -> None:
            typer.echo(results.summary_text())
            if timeline is not None:
                typer.echo(f"  timeline    {timeline} ({p['timeline_events']:,} events; open in "
                           "ui.perfetto.dev)")
            if tables is not None:
                typer.echo(f"  tables      {', '.join(p['tables'])}")

        emit(payload, as_json, render)
