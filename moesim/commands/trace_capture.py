"""``moesim trace capture``: run prompts through a transformers MoE model, record its routing."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def register(app: typer.Typer) -> None:
    app.command("capture")(capture_command)


def capture_command(
    model: str = typer.Option(..., "--model", help="Local model directory, or tiny:ARCH (random weights, e.g. tiny:mixtral)."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: one per line, or .jsonl with a \"prompt\" per line."),
    max_new_tokens: int = typer.Option(..., "--max-new-tokens", help="Tokens to generate per prompt."),
    out: Path = typer.Option(..., "--out", help="Trace file to write (.parquet)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    batch_size: int = typer.Option(1, "--batch-size", help="Prompts per generate() call (left-padded)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of tiny models' weights and of sampling."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate for every prompt and stream the executed expert routing to a trace file.

    Per (token, MoE layer): the experts the model ran and their gate weights, phase, request, position (left padding dropped) and per-layer timings. Needs the 'capture' extra (torch, transformers).
    """
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        from moesim.errors import MoesimError

        raise MoesimError(
            f"trace capture needs torch and transformers ({exc.name} is missing): "
            "pip install 'moesim[capture]'"
        ) from None
    from moesim.traces.capture import capture, load_model, read_prompts

    texts = read_prompts(prompts)
    loaded = load_model(model, device=device, dtype=dtype, seed=seed)
    summary = capture(loaded, texts, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      seed=seed, do_sample=sample, settings={"dtype": dtype, "model_spec": model})
    emit(summary, as_json)
