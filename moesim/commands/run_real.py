"""``moesim run-real``: run MoE layers with offloaded experts for real and record a run file;
``moesim calibrate-executor``: add the executor's primitives to a calibrate profile."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def _load_trace(path: Path, fmt: str | None):
    from moesim.traces.importers import import_trace
    from moesim.traces.trace import Trace

    if fmt:
        return import_trace(path, fmt)
    if path.suffix == ".npz":
        return import_trace(path, "arrays-npz")
    return Trace.read(path)


def _params(items: list[str] | None) -> dict:
    import yaml

    from moesim.errors import MoesimError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise MoesimError(f"parameter {item!r}: write NAME=VALUE")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _run_stack(model, settings, store, trace, fmt, layers, tokens, warmup_tokens,
               first_layer, first_token, seed, overrides):
    from moesim.executor import StackSpec, capture
    from moesim.executor.runner import routing_slice
    from moesim.model import get_model

    try:
        preset = get_model(model, **overrides)
    except TypeError as exc:
        from moesim.errors import MoesimError

        raise MoesimError(f"--override: {exc}") from None
    routing = None
    if trace is not None:
        src = _load_trace(trace, fmt)
        routing = routing_slice(src, layers, warmup_tokens + tokens, first_layer,
                                first_token)
        spec = StackSpec.for_model(preset, layers, max(preset.num_experts,
                                                       routing.meta.num_experts),
                                   routing.meta.top_k, seed=seed)
    else:
        spec = StackSpec.for_model(preset, layers, seed=seed)
    return capture(spec, settings, store, trace=routing,
                   tokens=None if routing is not None else warmup_tokens + tokens)

def _run_hf(source, settings, store, trace, fmt, tokens, warmup_tokens, first_layer,
            first_token, overrides):
    from moesim.executor.hf import capture_hf, load_hf
    from moesim.executor.runner import routing_slice

    try:
        model = load_hf(source, settings.seed, overrides)
    except TypeError as exc:
        from moesim.errors import MoesimError

        raise MoesimError(f"--override: {exc}") from None
    routing = None
    if trace is not None:
        routing = routing_slice(_load_trace(trace, fmt), model.spec.layers,
                                warmup_tokens + tokens, first_layer, first_token)
    return capture_hf(model, settings, store, trace=routing,
                      tokens=None if routing is not None else warmup_tokens + tokens)


def register(app: typer.Typer) -> None:
    @app.command("run-real")
    def run_real(
        out: Path = typer.Option(..., "--out", help="Run file to write (Parquet)."),
        model: str = typer.Option("deepseek-v2-lite", "--model", help="Preset whose dimensions "
                                  "the synthetic stack takes."),
        hf: str = typer.Option(None, "--hf", help="Run a Hugging Face model instead of the "
                               "synthetic stack: tiny:ARCH (random weights; --override changes "
                               "its config) or a local model directory. All its MoE layers run "
                               "(--layers is ignored)."),
        layers: int = typer.Option(2, "--layers", help="MoE layers to run."),
        trace: Path = typer.Option(None, "--trace", help="Force the routing from this trace "
                                   "(.parquet, or .npz arrays); omit for the router's own."),
        fmt: str = typer.Option(None, "--format", help="Import format of --trace."),
        tokens: int = typer.Option(32, "--tokens", help="Tokens to run."),
        first_token: int = typer.Option(0, "--first-token"),
        warmup_tokens: int = typer.Option(0, "--warmup-tokens", help="Run this many tokens "
                                          "of the routing first as a warm-up phase, which "
                                          "'moesim validate' calibrates on and excludes from "
                                          "its figures (the run has warm-up + --tokens)."),
        first_layer: int = typer.Option(0, "--first-layer", help="First trace layer used."),
        policy: str = typer.Option("lru", "--policy", help="Cache policy (moesim cache policies)."),
        param: list[str] = typer.Option(None, "--param", help="Policy parameter NAME=VALUE."),
        capacity_experts: float = typer.Option(None, "--capacity-experts"),
        capacity_bytes: float = typer.Option(None, "--capacity-bytes"),
        scope: str = typer.Option("global", "--scope", help="global or per-layer."),
        prefetcher: str = typer.Option("none", "--prefetcher"),
        prefetch_param: list[str] = typer.Option(None, "--prefetch-param"),
        io_threads: int = typer.Option(2, "--io-threads"),
        compute_threads: int = typer.Option(1, "--compute-threads"),
        device: str = typer.Option("cpu", "--device", help="cpu, or cuda (not run in CI)."),
        cold: str = typer.Option("direct", "--cold", help="direct (O_DIRECT), fadvise or none."),
        read_gbps: float = typer.Option(None, "--read-gbps", help="Emulate a storage device of "
                                        "this bandwidth (GB/s) over the real reads: each read "
                                        "takes at least its bytes / bandwidth, one at a time "
                                        "across I/O threads. Calibrate with the same value."),
        store: Path = typer.Option(Path(".moesim-store"), "--store",
                                   help="Folder of the expert files (reused across runs)."),
        seed: int = typer.Option(0, "--seed"),
        override: list[str] = typer.Option(None, "--override", help="Change a preset "
                                           "dimension, NAME=VALUE (e.g. hidden=256 for a smoke "
                                           "test); recorded in the run file."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Run the MoE layers with experts offloaded behind a cache; write the run file."""
        import numpy as np

        from moesim.executor import RunSettings

        settings = RunSettings(policy=policy, policy_params=_params(param),
                               capacity_experts=capacity_experts, capacity_bytes=capacity_bytes,
                               scope=scope, prefetcher=prefetcher,
                               prefetch_params=_params(prefetch_param), io_threads=io_threads,
                               compute_threads=compute_threads, device=device, cold=cold,
                               read_gbps=read_gbps, seed=seed, warmup_tokens=warmup_tokens)
        if hf is not None:
            run = _run_hf(hf, settings, store, trace, fmt, tokens, warmup_tokens, first_layer,
                          first_token, _params(override))
        else:
            run = _run_stack(model, settings, store, trace, fmt, layers, tokens, warmup_tokens,
                             first_layer, first_token, seed, _params(override))
        run.write(out)
        a = run.to_arrays(columns=["t_step_s", "residency"])
        step = a["t_step_s"][warmup_tokens:, 0]
        res = a["residency"][warmup_tokens:]
        emit({"out": str(out), "tokens": int(len(step)), "warmup_tokens": warmup_tokens,
              "layers": run.meta.num_layers,
              "model": run.meta.capture.get("hf_model", {}).get("source", run.meta.model),
              "hit_rate": float(np.mean(res[res >= 0] > 0)),
              "bytes_read": int(sum(run.meta.capture["transfers"]["payload_bytes"])),
              "latency_ms_mean": float(step.mean() * 1e3),
              "latency_ms_p50": float(np.percentile(step, 50) * 1e3),
              "latency_ms_p99": float(np.percentile(step, 99) * 1e3),
              "cold_read": run.meta.capture["cold_read"]}, as_json)

    @app.command("calibrate-executor")
    def calibrate_executor(
        profile: Path = typer.Argument(..., help="Profile from 'moesim calibrate' to extend."),
        model: list[str] = typer.Option(["deepseek-v2-lite"], "--model",
                                        help="Preset(s) whose stack kernels to time."),
        io_threads: int = typer.Option(2, "--io-threads"),
        compute_threads: int = typer.Option(1, "--compute-threads"),
        disk_dir: Path = typer.Option(None, "--disk-dir", help="Folder on the disk the store "
                                      "lives on (default: temp dir)."),
        read_gbps: float = typer.Option(None, "--read-gbps", help="Time reads through the "
                                        "emulated storage device the runs use ('run-real "
                                        "--read-gbps')."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Time the executor's primitives (expert FFN, dense part, cold expert reads) into a
        profile, so 'moesim validate' predicts from them."""
        from moesim.errors import MoesimError
        from moesim.executor.calibrate import extend_profile
        from moesim.executor.stack import StackSpec
        from moesim.model import get_model

        if not profile.exists():
            raise MoesimError(f"{profile}: no such profile; write one with 'moesim calibrate'")
        specs = [StackSpec.for_model(get_model(m), 1) for m in model]
        if read_gbps is not None and not read_gbps > 0:
            raise MoesimError(f"--read-gbps {read_gbps}: must be positive")
        data = extend_profile(profile, specs, io_threads, compute_threads,
                              str(disk_dir) if disk_dir else None, read_gbps=read_gbps)
        link = data["links"]["expert_read"]
        rows = [r for r in data["tables"] if r["operation"] in ("expert_ffn", "moe_dense")]
        emit({"profile": str(profile), "read_bandwidth_mbps": link["bandwidth"] / 1e6,
              "read_latency_ms": link["latency"] * 1e3,
              "kernels_ms": {f"{r['operation']} {r['shape']} {r['dtype']}": r["seconds"] * 1e3
                             for r in rows}}, as_json)
