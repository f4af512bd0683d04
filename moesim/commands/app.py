"""``moesim app``: start the Streamlit dashboard on the installed app (``moesim/app/main.py``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("app")
    def run_app(
        port: int = typer.Option(8501, "--port", help="Port to serve on."),
        address: str = typer.Option("127.0.0.1", "--address",
                                    help="Address to listen on (0.0.0.0 to serve others)."),
        headless: bool = typer.Option(False, "--headless", help="Do not open a browser."),
    ) -> None:
        """Start the dashboard (Streamlit): traces, cache, placement, simulation, validation, sweeps."""
        import importlib.util
        import subprocess
        import sys
        from pathlib import Path

        from moesim.errors import MoesimError

        if importlib.util.find_spec("streamlit") is None:
            raise MoesimError("the dashboard needs streamlit and plotly: pip install 'moesim[app]'")
        if not 1 <= port <= 65535:
            raise MoesimError(f"--port {port} is not a TCP port (1-65535)")
        import moesim.app

        main = Path(moesim.app.__file__).parent / "main.py"
        cmd = [sys.executable, "-m", "streamlit", "run", str(main), "--server.port", str(port),
               "--server.address", address, "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "minimal",
               "--server.headless", "true" if headless else "false"]
        typer.echo(f"moesim dashboard on http://{address}:{port} (Ctrl-C to stop)")
        raise typer.Exit(subprocess.call(cmd))
