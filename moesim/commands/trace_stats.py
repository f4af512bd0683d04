"""``moesim trace stats``: load, imbalance, entropy, co-activation, reuse and locality of a trace."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit
from moesim.errors import MoesimError


def _int_list(text: str, what: str) -> list[int]:
    """Parse '4,16,64' (or 'none' for an empty list) into positive integers."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise MoesimError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise MoesimError(f"{what} must be positive, got {bad[0]}")
    return values


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats(
        trace: Path = typer.Argument(..., help="Trace file (.parquet)."),
        segment_lengths: str = typer.Option(
            "4,16,64,256", "--segment-lengths",
            help="Segment lengths m (tokens) for SRP and SCH, comma-separated; 'none' skips both."),
        cache_sizes: str = typer.Option(
            "", "--cache-sizes",
            help="Cache sizes in experts per layer for SCH and LRU hit rates (default: k,2k,4k)."),
        window: str = typer.Option("16", "--window", help="Working-set window(s) in tokens, comma-separated."),
        out: Path = typer.Option(None, "--out", help="Also write every array (load, co-activation, "
                                 "affinity, histograms, working sets) to this .npz file."),
        full: bool = typer.Option(False, "--full", help="With --json: include the [L,E,E] matrices and "
                                  "full histograms too."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Statistics of a routing trace in one streaming pass.

        Tokens, layers, experts, top-k; load [L,E], imbalance (max/mean) and routing entropy per
        layer; within-layer co-activation and l->l+1 affinity; LRU stack-distance histograms and
        hit rates (global and per-layer caches); token reuse gaps; working set per window; and
        SRP / SCH of "Not All Models Suit Expert Offloading" (Liang et al. 2025).
        """
        import numpy as np

        from moesim.fileio import atomic_path
        from moesim.traces import Trace
        from moesim.traces.stats import compute_stats

        seg = _int_list(segment_lengths, "--segment-lengths")
        caps = _int_list(cache_sizes, "--cache-sizes") or None
        windows = _int_list(window, "--window")
        t = Trace.read(trace)
        result = compute_stats(t, segment_lengths=seg, cache_sizes=caps, windows=windows)
        if out is not None:
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **result.arrays())
        payload = {"path": str(trace), **result.to_dict(full=full)}
        if out is not None:
            payload["arrays_file"] = str(out)
        emit(payload, as_json, render=lambda p: _render(result, p))


def _render(result, payload: dict) -> None:
    import numpy as np

    echo = typer.echo
    echo(f"trace: {payload['path']}  ({result.kind}, model {result.model})")
    echo(f"tokens {result.tokens}  rows {result.rows}  layers {result.layers}  experts {result.experts}  "
         f"top_k {result.top_k}")
    imb = result.imbalance
    echo(f"imbalance (max/mean load): mean {_f(result.imbalance_mean)}  max {_f(np.nanmax(imb) if np.isfinite(imb).any() else None)}"
         f"  (layer {int(np.nanargmax(imb)) if np.isfinite(imb).any() else '-'})")
    echo(f"routing entropy: mean {_f(result.entropy_mean)} bits of {np.log2(result.experts):.2f} possible")
    hot = np.argsort(result.load, axis=1)[:, ::-1][:, :3]
    echo("hottest experts per layer (first 4 layers): "
         + "; ".join(f"L{layer}: {', '.join(map(str, hot[layer]))}" for layer in range(min(4, result.layers))))
    for note in result.notes:
        echo(f"note: {note}")
    if result.coactivation is None:
        return
    co = result.coactivation
    E = result.experts
    iu = np.triu_indices(E, 1)
    pairs = co[:, iu[0], iu[1]]  # [L, E(E-1)/2] tokens choosing both experts
    echo(f"co-activation: {(pairs > 0).mean():.3f} of expert pairs are ever chosen together; "
         "most frequent pair per layer (first 4 layers): "
         + "; ".join(f"L{layer}: {iu[0][j]}+{iu[1][j]} x{pairs[layer, j]}"
                     for layer in range(min(4, result.layers)) for j in [int(np.argmax(pairs[layer]))]))
    if result.layers > 1 and result.affinity.size:
        aff = result.affinity.astype(float)
        # how concentrated l->l+1 transitions are: share of the top successor per expert
        rows = aff.sum(axis=2)
        top = np.divide(aff.max(axis=2), rows, out=np.zeros_like(rows), where=rows > 0)
        echo(f"inter-layer affinity: mean share of an expert's most frequent successor {top[rows > 0].mean():.3f}"
             f" (uniform would be {1 / result.experts:.3f})")
    caps = result.cache_sizes
    for scope in ("per-layer", "global"):
        r = payload.get(f"reuse_{scope.replace('-', '_')}")
        if r is None:
            continue
        size = "experts per layer" if scope == "per-layer" else "experts in total, shown as per-layer x layers"
        rates = "  ".join(f"C={c}: {h:.3f}" for c, h in r["lru_hit_rate"].items())
        echo(f"LRU ({scope} cache, {size}): median stack distance {r['median_distance']}, "
             f"p90 {r['p90_distance']}; hit rate {rates}")
    if payload.get("reuse_gap_1_share") is not None:
        echo(f"reuse by the next token: {payload['reuse_gap_1_share']:.3f} of repeated uses")
    for w, sizes in result.working_set.items():
        if len(sizes):
            echo(f"working set, windows of {w} tokens: mean {sizes.mean():.1f} (layer, expert) keys, "
                 f"max {sizes.max()} ({sizes.mean() / result.layers:.1f} experts per layer)")
    if result.srp:
        echo("SRP (best F1 of one expert group per m-token segment): "
             + "  ".join(f"m={m}: {_f(v['srp'])}" for m, v in result.srp.items()))
    if result.sch:
        echo(f"SCH (look-ahead oracle cache hit rate; cache sizes {caps} experts per layer):")
        for m, row in result.sch.items():
            echo(f"  m={m}: " + "  ".join(f"C={c}: {_f(v['sch'])}" for c, v in row.items()))
    if "arrays_file" in payload:
        echo(f"arrays written to {payload['arrays_file']}")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
