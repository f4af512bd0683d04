"""Simulator speed: simulated seconds per wall-clock second, and 1,000 decode steps on 1,024 GPUs.

DeepSeek-V3 (61 layers, 58 MoE, 256 routed experts, top-8, 1 shared expert) decode serving on
64 H800 (8 nodes, EP64, attention DP64), DeepEP low-latency dispatch, two-micro-batch overlap,
requests arriving with their prompt's KV (disaggregated decode instance), a closed batch of
``running`` requests per GPU. Routing: trace-driven (the bundled synthetic DeepSeek-V3 trace,
token by token) or aggregated (per-layer expert shares of the same trace, in expectation).

    python benchmarks/sim_bench.py            # prints a table, writes benchmarks/results/sim_bench.json
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from moesim.engine import build
from moesim.fileio import write_json_atomic
from moesim.scenario import scenario_from_dict

TRACE = Path(__file__).resolve().parents[1] / "moesim" / "data" / "traces" / "deepseek-v3-synth-seed7.parquet"


def scenario(gpus: int, per_gpu: int, source: str, steps: int, placement: dict) -> dict:
    return {
        "name": f"dsv3-decode-{gpus}gpu-{source}-b{per_gpu}",
        "model": "deepseek-v3",
        "cluster": {"preset": "h800-ib", "num_nodes": gpus // 8},
        "parallelism": {"ep": gpus},
        "placement": placement,
        "execution": {"dispatcher": "deepep-ll", "overlap": "two-microbatch"},
        "workload": {"arrival": "burst", "num_requests": gpus * per_gpu * 4, "prompt_tokens": 1024,
                     "output_tokens": {"dist": "uniform", "min": 128, "max": 384}, "seed": 0},
        "serving": {"role": "decode", "max_tokens_per_step": per_gpu, "max_running": per_gpu},
        "routing": {"source": source, "trace": str(TRACE)},
        "simulation": {"max_steps": steps},
    }


def measure(gpus, per_gpu, source, steps, placement=None) -> dict:
    placement = placement or {"kind": "contiguous"}
    t0 = time.perf_counter()
    sim = build(scenario_from_dict(scenario(gpus, per_gpu, source, steps, placement)))
    build_s = time.perf_counter() - t0
    res = sim.run()
    s = res.summary
    return {
        "gpus": gpus, "routing": source, "running_per_gpu": per_gpu, "placement": placement["kind"],
        "steps": s["steps"], "tokens_per_step": gpus * per_gpu, "step_mean_ms": s["step_mean_s"] * 1e3,
        "simulated_s": s["simulated_s"], "wall_s": s["wall_s"], "build_s": build_s,
        "sim_s_per_wall_s": s["sim_s_per_wall_s"], "wall_ms_per_step": s["wall_s"] / s["steps"] * 1e3,
    }


def main() -> None:
    rows = []
    for per_gpu, trace_steps in ((8, 300), (32, 150), (128, 50)):
        rows.append(measure(64, per_gpu, "trace", trace_steps))
        rows.append(measure(64, per_gpu, "counts", 1000))
    big = {"kind": "balanced", "redundant_experts": 768}  # 4 replicas of each expert
    rows.append(measure(1024, 32, "counts", 1000, big))
    rows.append(measure(1024, 32, "trace", 20, big))
    head = (f"{'GPUs':>5} {'routing':>7} {'run/GPU':>7} {'steps':>6} {'step ms':>8} {'sim s':>7} "
            f"{'wall s':>7} {'wall ms/step':>12} {'sim/wall':>9}")
    print(head)
    for r in rows:
        print(f"{r['gpus']:>5} {r['routing']:>7} {r['running_per_gpu']:>7} {r['steps']:>6} "
              f"{r['step_mean_ms']:>8.2f} {r['simulated_s']:>7.2f} {r['wall_s']:>7.2f} "
              f"{r['wall_ms_per_step']:>12.2f} {r['sim_s_per_wall_s']:>9.1f}")
    out = Path(__file__).parent / "results" / "sim_bench.json"
    write_json_atomic(out, {"python": sys.version.split()[0], "machine": platform.machine(),
                            "processor": platform.processor(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
