"""Inputs the dashboard tests share: a small trace, a real CPU run with its machine profile, and
a small sweep results table."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def small_trace(folder: Path, name: str = "mixtral-small.parquet", tokens: int = 384, requests: int = 8,
                seed: int = 5) -> Path:
    """A Mixtral-shaped synthetic trace: 32 layers x 8 experts, top-2."""
    from moesim.model import get_model
    from moesim.traces.synth import synthesize

    path = folder / name
    synthesize(get_model("mixtral-8x7b"), tokens, requests=requests, seed=seed, skew=1.0, out=path)
    return path


def cpu_run(folder: Path) -> Path:
    """A real offloaded run of a tiny 2-layer stack (12 tokens, LRU of 5 experts) with the
    profile of this machine written beside it as hardware.yaml (needs torch and safetensors)."""
    import yaml

    from moesim.calibrate import measure_machine
    from moesim.executor import RunSettings, StackSpec, capture
    from moesim.executor.calibrate import extend_profile
    from moesim.model import get_model
    from moesim.traces import Trace

    model = get_model("deepseek-v2-lite", hidden=64, moe_intermediate=32, shared_intermediate=16)
    spec = StackSpec(model, 2, 8, 2, "fp32", 0)
    profile = folder / "hardware.yaml"
    profile.write_text(yaml.safe_dump(measure_machine(str(folder), quick=True)))
    extend_profile(profile, [spec], threads=2, disk_dir=str(folder), sizes_mib=(0.25, 0.5, 1))
    rng = np.random.default_rng(3)
    experts = np.stack([[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(12)])
    routing = Trace.from_arrays(experts, rng.random((12, 2, 2)).astype(np.float32), [6, 6], "prefill",
                                num_experts=8, model="deepseek-v2-lite")
    run = capture(spec, RunSettings(policy="lru", capacity_experts=5), folder / "store", trace=routing)
    return run.write(folder / "run.parquet")


def sweep_table(folder: Path) -> Path:
    """Nine tiny Mixtral scenarios (arrival rate x running-request cap, one TP8 attention group,
    so the cap matters) swept into a table."""
    from moesim.sweep import run_sweep, sweep_from_dict

    scenario = {"model": "mixtral-8x7b", "cluster": {"preset": "h100-ib", "num_nodes": 1},
                "parallelism": {"tp": 8, "ep": 8}, "routing": {"source": "uniform"},
                "workload": {"arrival": "poisson", "rate_per_s": 20, "num_requests": 8,
                             "prompt_tokens": 64, "output_tokens": 8}}
    sweep = sweep_from_dict({"scenario": scenario, "parameters": {
        "workload.rate_per_s": [5, 40, 320], "serving.max_running": [1, 2, 8]}})
    out = folder / "results.parquet"
    run_sweep(sweep, out, n_jobs=1)
    return out
