"""``moesim validate RUN``: simulate a real run on its machine's profile and compare."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate(
        run: Path = typer.Argument(..., help="Run file from 'moesim run-real'."),
        hardware: Path = typer.Option(None, "--hardware", help="Profile of the run's machine "
                                      "(default: hardware.yaml beside the run file)."),
        report: Path = typer.Option(None, "--report", help="Write REPORT.md and REPORT.html."),
        warmup_calibration: bool = typer.Option(
            True, "--warmup-calibration/--profile-only", help="For a run with warm-up tokens: "
            "recalibrate compute and read speed on them (default), or predict from the "
            "profile alone. Either way the warm-up tokens are excluded from the figures."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Bytes and hit/miss sequence (exact), per-token latency MAPE, P50/P99 and per-layer
        compute and read-time errors of the simulator against a real run."""
        from moesim.errors import MoesimError
        from moesim.validate import validate as run_validation

        profile = hardware or run.parent / "hardware.yaml"
        if not profile.exists():
            raise MoesimError(f"{profile}: no hardware profile; give --hardware (from 'moesim "
                              "calibrate' on the machine of the run)")
        result = run_validation(run, profile, report, warmup_calibration)

        def render(r):
            typer.echo(f"{r['run']}: {r['tokens']} tokens, policy {r['policy']}, "
                       f"hit rate {r['hit_rate']:.3f}")
            typer.echo(f"  hits exact: {r['hits_exact']}  bytes exact: {r['bytes_exact']} "
                       f"({r['bytes_measured']:,} B)")
            typer.echo(f"  latency MAPE {r['latency_mape']:.2f} %  P50 {r['p50_error']:+.2f} %  "
                       f"P99 {r['p99_error']:+.2f} %  mean {r['latency_bias_pct']:+.2f} %")
            typer.echo(f"  dense {r['dense_error_pct']:+.1f} %  expert "
                       f"{r['expert_error_pct']:+.1f} %  read "
                       f"{r['read_error_pct'] if r['read_error_pct'] is None else round(r['read_error_pct'], 1)} %")
            if r.get("report_md"):
                typer.echo(f"  report: {r['report_md']}, {r['report_html']}")

        emit(result, as_json, render)
