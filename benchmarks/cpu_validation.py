"""CPU validation benchmark: real offloaded runs vs the simulator, on this machine.

Two model shapes (DeepSeek-V2-Lite and Qwen3-30B-A3B experts at their real dimensions, bf16,
fewer layers) x three cache sizes x two policies (LRU, LFU), routing forced from the ESFT
traces read at run time from ../shared/data (never copied into the repository). Steps:

1. profile this machine: ``moesim calibrate`` (quick) + the executor's primitives
   (``moesim calibrate-executor``: expert FFN and dense-part kernels, cold expert reads);
2. for each combination: ``moesim run-real`` (experts read cold from disk with O_DIRECT by the
   I/O threads into a RAM cache run by the policy object), then ``moesim validate``.

Prints one line per run and writes benchmarks/results/cpu_validation.{json,md}.
Run: python benchmarks/cpu_validation.py [--tokens 48] [--layers 3] [--io-threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOESIM_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAPES = ("deepseek-v2-lite", "qwen3-30b-a3b")
POLICIES = ("lru", "lfu")
CACHE_FRACTIONS = (0.125, 0.25, 0.5)  # of the run's L x 64 (layer, expert) keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--first-layer", type=int, default=0)
    ap.add_argument("--task", default="law", help="ESFT task file esft_<task>.npz")
    ap.add_argument("--io-threads", type=int, default=1)
    ap.add_argument("--settle", type=float, default=10.0,
                    help="Seconds to wait after writing the stores, before measuring.")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "moesim-cpu-validation"),
                    help="Folder on the disk for the expert store and run files.")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_validation"))
    args = ap.parse_args()

    from moesim.calibrate import measure_machine
    from moesim.executor import RunSettings, StackSpec, capture, store_for
    from moesim.executor.calibrate import extend_profile
    from moesim.executor.runner import ensure_store, forced_stream, routing_slice
    from moesim.fileio import write_json_atomic, write_text_atomic
    from moesim.model import get_model
    from moesim.traces.importers import import_trace
    from moesim.validate import validate

    npz = SHARED / "esft-dsv2lite" / f"esft_{args.task}.npz"
    if not npz.exists():
        raise SystemExit(f"ESFT trace not found at {npz}; set MOESIM_SHARED_DATA")
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    routing = routing_slice(import_trace(npz, "arrays-npz"), args.layers, args.tokens,
                            args.first_layer)
    E, K = routing.meta.num_experts, routing.meta.top_k
    specs = [StackSpec.for_model(get_model(m), args.layers, max(get_model(m).num_experts, E), K)
             for m in SHAPES]
    # kernels first (they write a few temporary files), then the stores, then -- once the
    # disk has settled after gigabytes of writes -- the cold reads, right before the runs
    profile = work / "hardware.yaml"
    write_text_atomic(profile, yaml.safe_dump(measure_machine(str(work), quick=True),
                                              sort_keys=False))
    extend_profile(profile, specs, disk_dir=str(work), reads=False)
    stores = [store_for(work / "store", spec) for spec in specs]
    keys = np.unique(forced_stream(routing, specs[0]).keys)
    for spec, store in zip(specs, stores, strict=True):
        ensure_store(spec, store, keys)
    os.sync()
    time.sleep(args.settle)
    rng = np.random.default_rng(0)
    sample = [(store, rng.choice(keys, 16, replace=False).tolist()) for store in stores]
    extend_profile(profile, specs, threads=args.io_threads, stores_keys=sample, kernels=False)
    rows = []
    for spec in specs:
        for frac in CACHE_FRACTIONS:
            cap = int(frac * args.layers * E)
            for policy in POLICIES:
                settings = RunSettings(policy=policy, capacity_experts=cap,
                                       io_threads=args.io_threads)
                run = capture(spec, settings, work / "store", trace=routing)
                path = run.write(work / "runs" / f"{spec.model.name}-{policy}-{cap}.parquet")
                r = validate(path, profile)
                row = {k: r[k] for k in (
                    "model", "policy", "capacity_experts", "tokens", "layers", "hit_rate",
                    "bytes_exact", "hits_exact", "bytes_measured", "latency_mape", "p50_error",
                    "p99_error", "latency_bias_pct", "mean_latency_measured_s",
                    "mean_latency_simulated_s", "dense_error_pct", "expert_error_pct",
                    "read_error_pct")}
                rows.append(row)
                print(f"{row['model']:18s} {policy:4s} cap {cap:3d}  hit {row['hit_rate']:.3f}  "
                      f"bytes exact {row['bytes_exact']}  hits exact {row['hits_exact']}  "
                      f"MAPE {row['latency_mape']:5.2f} %  P50 {row['p50_error']:+6.2f} %  "
                      f"P99 {row['p99_error']:+6.2f} %  mean {row['mean_latency_measured_s']*1e3:7.1f}"
                      f" ms meas / {row['mean_latency_simulated_s']*1e3:7.1f} ms sim", flush=True)
    prof = yaml.safe_load(profile.read_text())
    summary = {
        "command": "python benchmarks/cpu_validation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in
            ("tokens", "layers", "io_threads", "task")),
        "routing": f"ESFT {args.task} (DeepSeek-V2-Lite routing), layers "
                   f"{args.first_layer}..{args.first_layer + args.layers - 1}, first "
                   f"{args.tokens} tokens, read from {npz.name} at run time",
        "machine": run.meta.capture["machine"],
        "versions": run.meta.capture["versions"],
        "cold_read": run.meta.capture["cold_read"],
        "profile": {"expert_read": prof["links"]["expert_read"],
                    "kernels": [r for r in prof["tables"]
                                if r["operation"] in ("expert_ffn", "moe_dense")]},
        "runs": rows,
        "max_latency_mape": max(r["latency_mape"] for r in rows),
        "mean_latency_mape": float(np.mean([r["latency_mape"] for r in rows])),
        "all_bytes_exact": all(r["bytes_exact"] for r in rows),
        "all_hits_exact": all(r["hits_exact"] for r in rows),
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), summary)
    write_text_atomic(out.with_suffix(".md"), _markdown(summary))
    print(f"max MAPE {summary['max_latency_mape']:.2f} %, mean {summary['mean_latency_mape']:.2f} %"
          f", bytes exact {summary['all_bytes_exact']}, hits exact {summary['all_hits_exact']}, "
          f"{summary['wall_s']:.0f} s")


def _markdown(s: dict) -> str:
    lines = [f"# CPU validation: `{s['command']}`", "",
             f"Machine: {s['machine'].get('cpu_model', s['machine'].get('processor'))}, "
             f"{s['machine']['cpus']} CPUs; torch {s['versions'].get('torch')}; cold reads: "
             f"{s['cold_read']}. Routing: {s['routing']}.", "",
             "| model shape | policy | cache (experts) | hit rate | bytes exact | hits exact | "
             "latency MAPE | P50 err | P99 err | mean measured | mean simulated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        lines.append(f"| {r['model']} | {r['policy']} | {r['capacity_experts']} | "
                     f"{r['hit_rate']:.3f} | {r['bytes_exact']} | {r['hits_exact']} | "
                     f"{r['latency_mape']:.2f} % | {r['p50_error']:+.2f} % | "
                     f"{r['p99_error']:+.2f} % | {r['mean_latency_measured_s'] * 1e3:.1f} ms | "
                     f"{r['mean_latency_simulated_s'] * 1e3:.1f} ms |")
    lines += ["", f"Max MAPE {s['max_latency_mape']:.2f} %, mean {s['mean_latency_mape']:.2f} %; "
              f"all bytes exact: {s['all_bytes_exact']}; all hits exact: {s['all_hits_exact']}; "
              f"wall {s['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
