"""Small helpers shared by the CLI commands: printing figures as text or JSON."""

from __future__ import annotations

import typer

from moesim.fileio import to_json

JSON_OPTION = typer.Option(False, "--json", help="Print the figures as JSON.")


def emit(payload: dict, as_json: bool, render=None) -> None:
    """Print ``payload`` as JSON, or through ``render(payload)`` (default: key: value lines)."""
    if as_json:
        typer.echo(to_json(payload))
        return
    if render is not None:
        render(payload)
        return
    for key, value in payload.items():
        typer.echo(f"{key}: {value}")
