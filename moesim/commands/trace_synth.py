"""``moesim trace synth`` and ``moesim trace fit``: synthetic traces and fitting them to real ones."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit
from moesim.errors import MoesimError


def _render_fit(payload: dict) -> None:
    for key, value in payload["params"].items():
        typer.echo(f"{key}: {value}")
    if payload.get("out"):
        typer.echo(f"written: {payload['out']}")
    quality = payload.get("quality")
    if not quality:
        return
    typer.echo("fit quality (fitted synthetic trace vs the real one):")
    typer.echo(f"  imbalance mean real/synth: {quality['imbalance_mean'][0]:.3f} / "
               f"{quality['imbalance_mean'][1]:.3f} (rel err {quality['imbalance_mean_rel_err']:.3f})")
    typer.echo(f"  reuse of previous token's experts real/synth: {quality['reuse_lag1'][0]:.3f} / "
               f"{quality['reuse_lag1'][1]:.3f}")
    typer.echo(f"  pair PMI real/synth: {quality['pair_pmi'][0]:+.3f} / {quality['pair_pmi'][1]:+.3f} "
               "(not fitted: experts tokens choose together are not modelled)")
    typer.echo(f"  LRU capacities: {quality['lru_capacities']}")
    typer.echo(f"  LRU hit real:   {quality['lru_real']}")
    typer.echo(f"  LRU hit synth:  {quality['lru_synth']}  (max abs err {quality['lru_max_abs_err']:.3f})")
    typer.echo(f"  reuse-distance KS: {quality['reuse_distance_ks']:.3f}")
    typer.echo(f"  within tolerance: {quality['within_tolerance']}")


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", help="Output trace (.parquet), written atomically."),
        model: str = typer.Option(None, "--model", help="Model preset (see 'moesim' presets), e.g. deepseek-v3."),
        params: Path = typer.Option(None, "--params", help="Fitted parameters (JSON from 'moesim trace fit') "
                                    "instead of --model and the knobs."),
        tokens: int = typer.Option(None, "--tokens", help="Tokens to generate (rows = tokens x MoE layers); "
                                   "default with --params: the fitted trace's."),
        requests: int = typer.Option(None, "--requests", help="Requests (equal lengths); default 1, or the "
                                     "fitted trace's request lengths."),
        skew: float = typer.Option(None, "--skew", help="Zipf exponent of each layer's expert popularity "
                                   "(0 = uniform) (default 0.8)."),
        locality: float = typer.Option(None, "--locality", help="Router-score correlation of consecutive "
                                       "tokens, 0..1 (1 = repeat the previous token's experts) (default 0.3)."),
        coherence: float = typer.Option(None, "--coherence", help="Share of router-score variance fixed for a "
                                        "whole request, 0..1 (default 0.1)."),
        affinity: float = typer.Option(None, "--affinity", help="Router-score correlation with the previous "
                                       "layer through a successor map, 0..1 (default 0.7)."),
        domains: int = typer.Option(None, "--domains", help="Domains, each with its own popularity; requests "
                                    "are spread over them (default 1)."),
        weight_scale: float = typer.Option(None, "--weight-scale", help="Router logit scale (peakedness of "
                                           "gate weights) (default 1.0)."),
        decode_fraction: float = typer.Option(None, "--decode-fraction", help="Share of each request's tokens "
                                              "generated in decode steps, 0..1 (default 0)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: same inputs and seed, identical file."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Generate a synthetic routing trace for a model preset or from fitted parameters."""
        import time

        from moesim.model import get_model
        from moesim.traces.synth import SynthParams, synthesize

        knobs = {name: value for name, value in (
            ("skew", skew), ("locality", locality), ("coherence", coherence), ("affinity", affinity),
            ("domains", domains), ("weight_scale", weight_scale)) if value is not None}
        if (model is None) == (params is None):
            raise MoesimError("give exactly one of --model PRESET or --params FIT.json")
        if params is not None:
            if knobs:
                raise MoesimError(f"--{sorted(knobs)[0].replace('_', '-')} applies to --model presets; "
                                  "with --params the fitted values are used")
            source = SynthParams.load(params)
        else:
            source = get_model(model)
            if tokens is None:
                raise MoesimError("--tokens is required with --model")
        start = time.perf_counter()
        trace = synthesize(source, tokens, requests=requests, decode_fraction=decode_fraction,
                           seed=seed, out=out, **knobs)
        seconds = time.perf_counter() - start
        info = trace.meta.extra["synth"]
        payload = {"out": str(out), "rows": trace.num_rows, **info, "seconds": round(seconds, 3),
                   "rows_per_s": round(trace.num_rows / max(seconds, 1e-9))}
        emit(payload, as_json)

    @app.command("fit")
    def fit_cmd(
        trace: Path = typer.Argument(..., help="Real routing trace (.parquet)."),
        out: Path = typer.Option(None, "--out", help="Write the fitted parameters (JSON) here, for "
                                 "'moesim trace synth --params'."),
        domains: int = typer.Option(1, "--domains", help="Domains to fit (k-means over requests' loads)."),
        max_tokens: int = typer.Option(50_000, "--max-tokens", help="Tokens read for the temporal and "
                                       "inter-layer statistics and the quality check."),
        check: bool = typer.Option(True, "--check/--no-check", help="Synthesise from the fit and compare "
                                   "load skew, reuse and LRU hit rates with the real trace."),
        seed: int = typer.Option(0, "--seed", help="Random seed of the fit's simulations."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Fit the synthetic generator's parameters to a real trace and report the fit quality."""
        from moesim.traces import Trace
        from moesim.traces.fit import fit, fit_report

        real = Trace.read(trace)
        params = fit(real, domains=domains, max_tokens=max_tokens, seed=seed)
        if out is not None:
            params.save(out)
        payload = {"params": params.describe(), "out": str(out) if out else None}
        payload["params"].update(
            locality_per_layer=params.locality.round(3).tolist(),
            coherence_per_layer=params.coherence.round(3).tolist(),
            affinity_per_layer=params.affinity.round(3).tolist(),
        )
        if check:
            _, payload["quality"] = fit_report(real, params=params, seed=seed, max_tokens=max_tokens)
        emit(payload, as_json, render=_render_fit)
