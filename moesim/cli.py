"""The ``moesim`` command line: one root with a subcommand group per domain.

Each group lives in ``moesim/commands/<name>.py`` and imports heavy libraries only inside its
commands, so ``moesim --help`` stays fast. A ``MoesimError`` becomes one ``error:`` line and
exit status 2; nothing already written is touched (outputs are written atomically).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from moesim.errors import MoesimError

app = typer.Typer(
    name="moesim",
    help="Plan and simulate Mixture-of-Experts inference on GPU clusters and edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# (module in moesim.commands, group name or None to add its commands at the top level)
COMMAND_MODULES = [
    ("trace", "trace"),
    ("comm", "comm"),
    ("calibrate", None),
    ("cache", None),
    ("place", "place"),
    ("simulate", None),
    ("demo", None),
    ("run_real", None),
    ("validate", None),
    ("app", None),
    ("sweep", None),
]


def _register() -> None:
    for module_name, group in COMMAND_MODULES:
        # command modules are added as their capability lands; a missing one is not offered
        if importlib.util.find_spec(f"moesim.commands.{module_name}") is None:
            continue
        module = importlib.import_module(f"moesim.commands.{module_name}")
        if group is None:
            module.register(app)
        else:
            app.add_typer(module.app, name=group)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from moesim import __version__

        typer.echo(__version__)
        raise typer.Exit()


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line on stderr."""
    try:
        app(args=argv, standalone_mode=False)
    except MoesimError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was left half-written", err=True)
        return 130
    except (typer.Abort, typer.Exit) as exc:  # pragma: no cover - click plumbing
        return getattr(exc, "exit_code", 1)
    except Exception as exc:  # click usage errors
        import click

        # typer >= 0.29 vendors click as typer._click: match its usage errors by shape too
        if isinstance(exc, click.exceptions.ClickException) or (
            callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)
        ):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
