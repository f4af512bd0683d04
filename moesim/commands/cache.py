"""``moesim cache TRACE``: replay a trace through an expert-cache policy."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> tuple[float, str]:
    """'4000MiB' -> (bytes, 'bytes'); '416' -> (416, 'experts')."""
    from moesim.cache import CacheError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CacheError(f"cannot read size {text!r}; write a number of experts (416) or bytes with a unit (4000MiB, 2GB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return (value * _UNITS[unit], "bytes") if unit else (value, "experts")


def _param(text: str):
    from moesim.cache import CacheError

    if "=" not in text:
        raise CacheError(f"policy parameter {text!r} must be NAME=VALUE")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def register(app: typer.Typer) -> None:
    @app.command("cache")
    def cache(
        trace: Path = typer.Argument(..., help="Routing trace (.parquet)."),
        policy: str = typer.Option("lru", "--policy", help="Cache policy name (see --list)."),
        capacity_bytes: str = typer.Option(None, "--capacity-bytes", help="Capacity in bytes (units: 4000MiB, 2GB)."),
        capacity_experts: int = typer.Option(None, "--capacity-experts", help="Capacity in experts."),
        scope: str = typer.Option("global", "--scope", help="global | per-layer."),
        accounting: str = typer.Option("token", "--accounting", help="token | batch."),
        sizes: str = typer.Option(None, "--sizes", help="Several capacities: '104,208,416' experts or '2GiB,4GiB'."),
        prefetch: str = typer.Option("none", "--prefetch", help="Prefetcher name."),
        accuracy: float = typer.Option(0.8, "--prefetch-accuracy", help="Accuracy of a next-layer prefetcher."),
        device: str = typer.Option("desktop-4090", "--device", help="Storage preset for stall time."),
        model: str = typer.Option(None, "--model", help="Model preset giving expert bytes when the trace has none."),
        expert_bytes: int = typer.Option(None, "--expert-bytes", help="Bytes of one expert (overrides)."),
        param: list[str] = typer.Option([], "--param", "-p", help="Policy parameter NAME=VALUE (repeatable)."),
        seed: int = typer.Option(0, "--seed"),
        no_gap: bool = typer.Option(False, "--no-gap", help="Skip the LRU and Belady reference runs."),
        list_all: bool = typer.Option(False, "--list", help="List policies and prefetchers and exit."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Hit rate (overall and decode), bytes read, stall time and the share of the LRU->Belady
        gap a policy recovers; stack algorithms get all sizes in one pass."""
        from moesim.cache import CacheError, get_policy, policy_names
        from moesim.prefetch import make_prefetcher, prefetcher_names
        from moesim.replay import AccessStream, belady_curve, lru_curve, run_policy
        from moesim.storage import io_for
        from moesim.traces import Trace

        if list_all:
            emit({"policies": policy_names(), "prefetchers": prefetcher_names()}, as_json)
            return
        get_policy(policy)
        given = [x for x in (capacity_bytes, capacity_experts, sizes) if x is not None]
        if len(given) != 1:
            raise CacheError("give exactly one of --capacity-bytes, --capacity-experts or --sizes")
        if sizes is not None:
            caps = [parse_size(x) for x in sizes.split(",") if x.strip()]
        elif capacity_bytes is not None:
            value, unit = parse_size(capacity_bytes)
            caps = [(value, "bytes" if unit == "experts" else unit)]
        else:
            caps = [(float(capacity_experts), "experts")]
        if len({u for _, u in caps}) != 1:
            raise CacheError("--sizes mixes experts and bytes; use one unit")
        unit = caps[0][1]
        t = Trace.read(trace)
        eb = expert_bytes
        if eb is None and t.meta.expert_bytes is None:
            from moesim.model import PRESETS, get_model

            # --model, else the trace's own model name when it is a known preset
            if model:
                eb = get_model(model).expert_bytes()
            elif t.meta.model in PRESETS:
                eb = PRESETS[t.meta.model].expert_bytes()
        stream = AccessStream.from_trace(t, accounting, expert_bytes=eb)
        bytes_known = bool((stream.expert_bytes > 0).all())
        params = dict(_param(p) for p in param)
        io = io_for(device) if bytes_known else None
        results = []
        for value, _ in caps:
            kw = {"capacity_bytes": value} if unit == "bytes" else {"capacity_experts": int(value)}
            pf = make_prefetcher(prefetch, seed=seed, **({"accuracy": accuracy} if prefetch in ("next-layer", "promoe") else {}))
            r = run_policy(stream, policy, scope=scope, seed=seed, io=io,
                           prefetcher=None if prefetch == "none" else pf, **kw, **params)
            results.append(r.summary())
        gap = [None] * len(caps)
        if not no_gap:
            uniform = unit == "experts" and accounting == "token"
            values = [c for c, _ in caps]
            if uniform:
                lru = lru_curve(stream, values, scope)
                bel = belady_curve(stream, values, scope)
            else:
                def rate(name, v):
                    kw = {"capacity_bytes": v} if unit == "bytes" else {"capacity_experts": int(v)}
                    return run_policy(stream, name, scope=scope, **kw).stats["hit_rate"]

                lru = [rate("lru", v) for v in values]
                bel = [rate("belady", v) for v in values]
            for i, r in enumerate(results):
                span = bel[i] - lru[i]
                r["hit_rate_lru"], r["hit_rate_belady"] = float(lru[i]), float(bel[i])
                gap[i] = (r["hit_rate"] - lru[i]) / span if span > 1e-12 else None
                r["gap_recovered"] = gap[i]
        single = len(results) == 1
        keys = ("hit_rate", "hit_rate_decode", "bytes_read", "misses", "lookups", "stall_s",
                "hit_rate_lru", "hit_rate_belady", "gap_recovered", "bytes_prefetched", "bypassed", "dropped")
        payload = {"trace": str(trace), "policy": policy, "scope": scope, "accounting": accounting,
                   "prefetch": prefetch, "device": device if io is not None else None, "unit": unit,
                   "capacity": caps[0][0] if single else [c for c, _ in caps]}
        def clean(v):
            return None if isinstance(v, float) and v != v else v  # NaN (no decode rows) -> null

        for k in keys:
            vals = [clean(r.get(k)) for r in results]
            payload[k] = vals[0] if single else vals
        if not bytes_known:
            payload["note"] = "expert bytes unknown (not in the trace metadata, its model is no preset, and no --model or --expert-bytes): bytes_read counts 0"

        def render(p):
            typer.echo(f"{p['policy']} ({p['scope']}, {p['accounting']} accounting, prefetch {p['prefetch']}) on {p['trace']}")
            rows = results
            for c, r in zip(caps, rows, strict=False):
                cap = f"{c[0] / 2**20:.0f} MiB" if unit == "bytes" else f"{int(c[0])} experts"
                g = r.get("gap_recovered")
                stall = r.get("stall_s")
                dec = r["hit_rate_decode"]
                dec = f"{dec:.4f}" if dec == dec else "n/a"
                typer.echo(f"  {cap:>12}: hit {r['hit_rate']:.4f}  decode {dec}  "
                           f"read {r['bytes_read'] / 2**30:.2f} GiB"
                           + (f"  stall {stall:.3f} s" if stall is not None else "")
                           + (f"  LRU {r['hit_rate_lru']:.4f} Belady {r['hit_rate_belady']:.4f}" if "hit_rate_lru" in r else "")
                           + (f"  gap recovered {g:.1%}" if g is not None else ""))
            if "note" in p:
                typer.echo(f"  note: {p['note']}")

        emit(payload, as_json, render)
