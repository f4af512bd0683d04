"""CLI command groups; each module exposes a typer ``app`` (or ``register(app)``)."""
