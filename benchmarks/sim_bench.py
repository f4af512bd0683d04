"""Simulator speed: simulated seconds per wall-clock second, and 1,000 decode steps on 1,024 GPUs.

DeepSeek-V3 (61 layers, 58 MoE, 256 routed experts, top-8, 1 shared expert) decode serving on
H800 (8 GPUs per node, EP over all GPUs, attention DP), DeepEP low-latency dispatch,
two-micro-batch overlap, requests arriving with their prompt's KV (disaggregated decode
instance): a burst of 4 x (GPUs x batch) requests, a closed batch of ``batch`` running
requests per GPU, output lengths uniform in [128, 384] (requests finish and are replaced
every step).

Routing:
- ``trace``: a synthetic DeepSeek-V3 trace of 8,192 sequences (moesim.traces.synth, seed 3;
  16,384 tokens, cached in the temp folder) replayed token by token. Every running request
  replays its own sequence, so up to 8,192 running requests no trace row is used twice in a
  step: the per-step work is that of a trace with unique rows.
- ``counts``: the per-layer expert shares of the same trace, tokens routed in expectation.

64 GPUs: batch 1, 8, 32, 128 per GPU, contiguous placement. 1,024 GPUs (128 nodes): batch
32, EPLB-balanced placement of 1,024 slots (each expert 4 times), 1,000 steps each way.

Every row runs with ``simulation.fast_forward`` on (the default: windows of steps costed at
once, same results) and, for 64 GPUs, off (step by step) for comparison. The machine is shared
and noisy: each 64-GPU fast-forward row is the best of ``REPEATS`` runs (each a fresh build);
the load average before and after is recorded.

    python benchmarks/sim_bench.py   # prints a table, writes benchmarks/results/sim_bench.{json,md}
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from moesim.engine import build
from moesim.fileio import write_json_atomic, write_text_atomic
from moesim.scenario import scenario_from_dict

SEQUENCES, TOKENS, SEED = 8192, 16384, 3
REPEATS = 3
TRACE = Path(tempfile.gettempdir()) / f"moesim-sim-bench-dsv3-{SEQUENCES}x{TOKENS}-seed{SEED}.parquet"


def long_trace() -> tuple[Path, float]:
    """The benchmark's trace (generated once, then read from the temp folder)."""
    if TRACE.exists():
        return TRACE, 0.0
    from moesim.model import get_model
    from moesim.traces.synth import synthesize

    t0 = time.perf_counter()
    synthesize(get_model("deepseek-v3"), TOKENS, requests=SEQUENCES, decode_fraction=0.5,
               seed=SEED, skew=1.0, locality=0.5, out=TRACE)
    return TRACE, time.perf_counter() - t0


def scenario(gpus: int, per_gpu: int, source: str, steps: int, placement: dict,
             trace: Path, fast_forward: bool = True) -> dict:
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
        "routing": {"source": source, "trace": str(trace)},
        "simulation": {"max_steps": steps, "fast_forward": fast_forward},
    }


def measure(gpus, per_gpu, source, steps, trace, placement=None, fast_forward=True,
            repeats=1) -> dict:
    """Build and run the scenario ``repeats`` times; the fastest run's figures."""
    placement = placement or {"kind": "contiguous"}
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sim = build(scenario_from_dict(scenario(gpus, per_gpu, source, steps, placement, trace,
                                                fast_forward)))
        build_s = time.perf_counter() - t0
        res = sim.run()
        if best is None or res.summary["wall_s"] < best[0].summary["wall_s"]:
            best = (res, build_s, sim)
    res, build_s, sim = best
    s = res.summary
    return {
        "gpus": gpus, "routing": source, "batch_per_gpu": per_gpu, "placement": placement["kind"],
        "fast_forward": fast_forward, "repeats": repeats, "windows": sim.windows,
        "steps": s["steps"], "tokens_per_step": gpus * per_gpu,
        "step_mean_ms": s["step_mean_s"] * 1e3, "simulated_s": s["simulated_s"],
        "wall_s": s["wall_s"], "build_s": build_s, "sim_s_per_wall_s": s["sim_s_per_wall_s"],
        "wall_ms_per_step": s["wall_s"] / s["steps"] * 1e3,
    }


def main() -> None:
    trace, synth_s = long_trace()
    load0 = os.getloadavg()[0]
    rows = []
    for per_gpu, trace_steps in ((1, 1000), (8, 400), (32, 200), (128, 100)):
        for source, steps in (("trace", trace_steps), ("counts", 1000)):
            rows.append(measure(64, per_gpu, source, steps, trace, repeats=REPEATS))
            rows.append(measure(64, per_gpu, source, steps, trace, fast_forward=False))
    big = {"kind": "balanced", "redundant_experts": 768}  # 4 replicas of each expert
    rows.append(measure(1024, 32, "counts", 1000, trace, big))
    rows.append(measure(1024, 32, "trace", 1000, trace, big))
    head = (f"{'GPUs':>5} {'routing':>7} {'batch/GPU':>9} {'ff':>3} {'steps':>6} {'step ms':>8} "
            f"{'sim s':>7} {'wall s':>7} {'wall ms/step':>12} {'sim/wall':>9}")
    print(head)
    lines = ["| GPUs | routing | batch/GPU | fast-forward | steps | step ms | simulated s | wall s "
             "| wall ms/step | sim s / wall s |", "|" + "---|" * 10]
    for r in rows:
        ff = "on" if r["fast_forward"] else "off"
        print(f"{r['gpus']:>5} {r['routing']:>7} {r['batch_per_gpu']:>9} {ff:>3} {r['steps']:>6} "
              f"{r['step_mean_ms']:>8.2f} {r['simulated_s']:>7.2f} {r['wall_s']:>7.2f} "
              f"{r['wall_ms_per_step']:>12.3f} {r['sim_s_per_wall_s']:>9.1f}")
        lines.append(f"| {r['gpus']} | {r['routing']} | {r['batch_per_gpu']} | {ff} | {r['steps']} "
                     f"| {r['step_mean_ms']:.2f} | {r['simulated_s']:.2f} | {r['wall_s']:.2f} "
                     f"| {r['wall_ms_per_step']:.3f} | {r['sim_s_per_wall_s']:.1f} |")
    load1 = os.getloadavg()[0]
    note = f"load average (1 min) {load0:.1f} before, {load1:.1f} after; {os.cpu_count()} CPUs"
    print(note)
    out = Path(__file__).parent / "results" / "sim_bench.json"
    write_json_atomic(out, {"python": sys.version.split()[0], "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "load_avg_1min": [load0, load1],
                            "repeats_fast_forward_64gpu": REPEATS,
                            "trace": {"sequences": SEQUENCES, "tokens": TOKENS, "seed": SEED,
                                      "generated_s": synth_s},
                            "rows": rows})
    md = Path(__file__).parent / "results" / "sim_bench.md"
    write_text_atomic(md, "# Simulator speed (benchmarks/sim_bench.py)\n\n"
                      "DeepSeek-V3 decode serving on H800 (EP over all GPUs, deepep-ll, two "
                      "micro-batches), one run of `python benchmarks/sim_bench.py`; 64-GPU "
                      f"fast-forward rows are the best of {REPEATS} runs, the others one run. "
                      f"{note}.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
