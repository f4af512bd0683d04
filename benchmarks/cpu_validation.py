"""CPU validation benchmark: real offloaded runs vs the simulator, on this machine.

Two model shapes (DeepSeek-V2-Lite and Qwen3-30B-A3B experts at their real dimensions, bf16,
fewer layers) x three cache sizes x two policies (LRU, LFU), routing forced from the ESFT
traces read at run time from ../shared/data (never copied into the repository). Steps:

1. profile this machine: ``moesim calibrate`` (quick) + the executor's primitives
   (``moesim calibrate-executor``: expert FFN and dense-part kernels, cold expert reads);
2. for each combination: ``moesim run-real`` (experts read cold from disk with O_DIRECT by the
   I/O threads into a RAM cache run by the policy object), then ``moesim validate``.

``--read-gbps G`` reads every expert through an emulated storage device of G GB/s laid over
the real O_DIRECT reads (``moesim.executor.store.ReadLimiter``), calibration included: this VM's
disk switches between about 3.4 and 1.1 GB/s in streaks of seconds to minutes, which no profile
taken before a run can predict (benchmarks/disk_regimes.py measures it). With G below the slow
speed, the device the runs read from holds one bandwidth, and the comparison tests the model
(misses, overlap, compute, overhead) rather than the host's disk weather. ``--read-gbps 0``
reads at the disk's own speed (the committed cpu_validation_raw_disk.* results).

``--hf`` runs a Hugging Face model instead of the synthetic stacks: transformers' Qwen3-MoE
architecture at Qwen3-30B-A3B's dimensions (hidden 2048, expert width 768, 32 heads / 4 KV
heads, bf16; random weights) with the ESFT trace's 64 experts and top-6 over 3 layers, its
attention, router and experts code running whole (``moesim.executor.hf``); results in
cpu_validation_hf.*.

Prints one line per run and writes benchmarks/results/cpu_validation.{json,md}.
Run: python benchmarks/cpu_validation.py [--tokens 48] [--layers 3] [--read-gbps 0.7]
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
# tiny:qwen3_moe's config at Qwen3-30B-A3B's dimensions (config.json of Qwen/Qwen3-30B-A3B),
# with the ESFT routing's expert count and top-k
HF_QWEN3 = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=64,
                num_experts_per_tok=6, norm_topk_prob=True)
POLICIES = ("lru", "lfu")
CACHE_FRACTIONS = (0.125, 0.25, 0.5)  # of the run's L x 64 (layer, expert) keys
HELDOUT = 64  # held-out expert files per shape for the read calibrations
PER_CAL = 8  # of which each calibration reads this many (rotating)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--first-layer", type=int, default=0)
    ap.add_argument("--task", default="law", help="ESFT task file esft_<task>.npz")
    ap.add_argument("--io-threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=16,
                    help="Warm-up tokens before the measured ones (calibrated on, excluded).")
    ap.add_argument("--repeats", type=int, default=1,
                    help="Run every combination this many times (each calibrated anew).")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="Seconds to wait after writing the stores, before measuring.")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "moesim-cpu-validation"),
                    help="Folder on the disk for the expert store and run files.")
    ap.add_argument("--read-gbps", type=float, default=0.7,
                    help="Emulated storage bandwidth in GB/s over the real reads; 0: the disk's own.")
    ap.add_argument("--hf", action="store_true",
                    help="Run transformers' Qwen3-MoE at Qwen3-30B-A3B dimensions instead of "
                         "the synthetic stacks.")
    ap.add_argument("--out", default=None, help="Results path without suffix (default "
                    "benchmarks/results/cpu_validation, or cpu_validation_hf with --hf).")
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
    routing = routing_slice(import_trace(npz, "arrays-npz"), args.layers,
                            args.warmup + args.tokens, args.first_layer)
    E, K = routing.meta.num_experts, routing.meta.top_k
    specs = [StackSpec.for_model(get_model(m), args.layers, max(get_model(m).num_experts, E), K)
             for m in SHAPES]
    hf = None
    if args.hf:
        from moesim.executor.hf import load_hf

        hf = load_hf("tiny:qwen3_moe", overrides=dict(HF_QWEN3, num_hidden_layers=args.layers),
                     dtype="bf16")
        specs = [hf.spec]
    # the base profile (generic operations), then the stores; every run is calibrated right
    # before it, so disk and CPU drift between calibration and run stays seconds, not minutes
    base = work / "hardware.yaml"
    write_text_atomic(base, yaml.safe_dump(measure_machine(str(work), quick=True),
                                           sort_keys=False))
    gbps = args.read_gbps or None
    stores = [store_for(work / "store", spec, read_gbps=gbps) for spec in specs]
    keys = np.unique(forced_stream(routing, specs[0]).keys)
    heldout = np.arange(HELDOUT) + args.layers * E  # files of a layer the runs never read
    for spec, store in zip(specs, stores, strict=True):
        ensure_store(spec, store, keys)
        ensure_store(spec, store, heldout)
    os.sync()
    time.sleep(args.settle)
    rows = []
    load_before = os.getloadavg()
    n = 0
    for _ in range(args.repeats):
        for i, spec in enumerate(specs):
            for frac in CACHE_FRACTIONS:
                cap = int(frac * args.layers * E)
                for policy in POLICIES:
                    name = f"{spec.model.name}-{policy}-{cap}-r{_}"
                    profile = work / "profiles" / f"{name}.yaml"
                    profile.parent.mkdir(exist_ok=True)
                    profile.write_text(base.read_text())
                    pick = [int(k) for k in np.roll(heldout, -n * PER_CAL)[:PER_CAL]]
                    n += 1
                    extend_profile(profile, [spec], threads=args.io_threads,
                                   loop_stores=[stores[i]],
                                   stores_keys=[(store, pick) for store in stores])
                    settings = RunSettings(policy=policy, capacity_experts=cap,
                                           io_threads=args.io_threads,
                                           warmup_tokens=args.warmup, read_gbps=gbps)
                    if hf is not None:
                        from moesim.executor.hf import capture_hf

                        run = capture_hf(hf, settings, work / "store", trace=routing)
                    else:
                        run = capture(spec, settings, work / "store", trace=routing)
                    path = run.write(work / "runs" / f"{name}.parquet")
                    r = validate(path, profile)
                    only = validate(path, profile, warmup_calibration=False)
                    row = {k: r[k] for k in (
                        "model", "policy", "capacity_experts", "tokens", "layers", "hit_rate",
                        "bytes_exact", "hits_exact", "bytes_measured", "latency_mape",
                        "abs_error_p50_pct", "abs_error_p90_pct", "p50_error", "p99_error",
                        "latency_bias_pct", "mean_latency_measured_s", "mean_latency_simulated_s",
                        "dense_error_pct", "expert_error_pct", "read_measured_s",
                        "read_simulated_s", "read_error_pct", "overhead_measured_s",
                        "overhead_predicted_s", "read_mean_measured_s", "reads_slow_pct",
                        "io_replay_mape")}
                    if hf is not None:
                        row["model"] = "HF Qwen3-MoE (Qwen3-30B-A3B dims)"
                    row["repeat"] = _
                    emulated = run.meta.capture["policy_stats"].get("emulated_read")
                    row["reads_slower_than_emulated"] = (
                        None if emulated is None else emulated["reads_slower_than_emulated"])
                    row["profile_only"] = {k: only[k] for k in (
                        "latency_mape", "p50_error", "p99_error", "latency_bias_pct",
                        "read_error_pct", "dense_error_pct", "expert_error_pct")}
                    row["load_avg_1min"] = os.getloadavg()[0]
                    rows.append(row)
                    print(f"{row['model']:18s} {policy:4s} cap {cap:3d}  hit "
                          f"{row['hit_rate']:.3f}  bytes/hits exact {row['bytes_exact']}/"
                          f"{row['hits_exact']}  MAPE {row['latency_mape']:5.2f} %  P50 "
                          f"{row['p50_error']:+6.2f} %  P99 {row['p99_error']:+6.2f} %  mean "
                          f"{row['mean_latency_measured_s'] * 1e3:6.1f} ms meas / "
                          f"{row['mean_latency_simulated_s'] * 1e3:6.1f} ms sim  read "
                          f"{row['read_error_pct'] or 0:+5.1f} %  load "
                          f"{row['load_avg_1min']:.2f}  io-replay MAPE "
                          f"{row['io_replay_mape'] or 0:5.2f} %  slow reads "
                          f"{row['reads_slow_pct'] or 0:4.1f} %  | profile only: MAPE "
                          f"{only['latency_mape']:5.2f} %  read {only['read_error_pct'] or 0:+5.1f}"
                          " %", flush=True)
    prof = yaml.safe_load(profile.read_text())  # the last run's, as an example
    mapes = np.array([r["latency_mape"] for r in rows])
    only = np.array([r["profile_only"]["latency_mape"] for r in rows])
    summary = {
        "command": "python benchmarks/cpu_validation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in
            ("tokens", "warmup", "layers", "io_threads", "task", "repeats", "read_gbps"))
            + (" --hf" if args.hf else ""),
        "read_gbps": gbps,
        "routing": f"ESFT {args.task} (DeepSeek-V2-Lite routing), layers "
                   f"{args.first_layer}..{args.first_layer + args.layers - 1}, first "
                   f"{args.warmup} tokens as warm-up then {args.tokens} measured tokens, read "
                   f"from {npz.name} at run time",
        "machine": run.meta.capture["machine"],
        "versions": run.meta.capture["versions"],
        "cold_read": run.meta.capture["cold_read"],
        "calibration": "per run, right before it: the executor's loop on a held-out routing "
                       f"(kernels, overhead) and cold reads of {PER_CAL} held-out store files "
                       "per shape (never read by the runs)",
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "example_profile": {"links": {k: v for k, v in prof["links"].items()
                                      if k.startswith("expert_read")},
                            "kernels": [r for r in prof["tables"] if r["operation"] in
                                        ("expert_ffn", "moe_dense", "executor_overhead")]},
        "runs": rows,
        "max_latency_mape": float(mapes.max()),
        "median_latency_mape": float(np.median(mapes)),
        "mean_latency_mape": float(mapes.mean()),
        "latency_mape_p10_p90": [float(x) for x in np.percentile(mapes, [10, 90])],
        "profile_only_median_mape": float(np.median(only)),
        "profile_only_max_mape": float(only.max()),
        "all_bytes_exact": all(r["bytes_exact"] for r in rows),
        "all_hits_exact": all(r["hits_exact"] for r in rows),
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" /
               ("cpu_validation_hf" if args.hf else "cpu_validation"))
    write_json_atomic(out.with_suffix(".json"), summary)
    write_text_atomic(out.with_suffix(".md"), _markdown(summary))
    print(f"MAPE median {summary['median_latency_mape']:.2f} %, max "
          f"{summary['max_latency_mape']:.2f} %, mean {summary['mean_latency_mape']:.2f} %"
          f", bytes exact {summary['all_bytes_exact']}, hits exact {summary['all_hits_exact']}, "
          f"{summary['wall_s']:.0f} s")


def _markdown(s: dict) -> str:
    ms = 1e3
    lines = [f"# CPU validation: `{s['command']}`", "",
             f"Machine: {s['machine'].get('cpu_model', s['machine'].get('processor'))}, "
             f"{s['machine']['cpus']} CPUs; torch {s['versions'].get('torch')}; cold reads: "
             f"{s['cold_read']}" + (f" through an emulated {s['read_gbps']} GB/s device "
             "(store.ReadLimiter; reads slower than it, per run: "
             f"{[r['reads_slower_than_emulated'] for r in s['runs']]})" if s.get("read_gbps")
             else " at the disk's own speed") + f". Routing: {s['routing']}. "
             f"Calibration: {s['calibration']}. "
             f"Load average (1, 5, 15 min) before: "
             f"{', '.join(f'{x:.2f}' for x in s['load_avg_before'])}; after: "
             f"{', '.join(f'{x:.2f}' for x in s['load_avg_after'])}.", "",
             "| model shape | policy | cache (experts) | hit rate | bytes exact | hits exact | "
             "latency MAPE | abs err P50 / P90 | P50 err | P99 err | mean measured | "
             "mean simulated | read meas / sim | overhead meas / pred | dense err | "
             "expert err | load | profile-only MAPE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        read = (f"{r['read_measured_s'] * ms:.2f} / {r['read_simulated_s'] * ms:.2f} ms"
                if r["read_measured_s"] is not None else "-")
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['capacity_experts']} | {r['hit_rate']:.3f} | "
            f"{r['bytes_exact']} | {r['hits_exact']} | {r['latency_mape']:.2f} % | "
            f"{r['abs_error_p50_pct']:.1f} / {r['abs_error_p90_pct']:.1f} % | "
            f"{r['p50_error']:+.2f} % | {r['p99_error']:+.2f} % | "
            f"{r['mean_latency_measured_s'] * ms:.1f} ms | "
            f"{r['mean_latency_simulated_s'] * ms:.1f} ms | {read} | "
            f"{r['overhead_measured_s'] * ms:.3f} / {r['overhead_predicted_s'] * ms:.3f} ms | "
            f"{r['dense_error_pct']:+.1f} % | {r['expert_error_pct']:+.1f} % | "
            f"{r['load_avg_1min']:.2f} | {r['profile_only']['latency_mape']:.2f} % |")
    lo, hi = s["latency_mape_p10_p90"]
    lines += ["", f"Latency MAPE over the {len(s['runs'])} runs: median "
              f"{s['median_latency_mape']:.2f} %, mean {s['mean_latency_mape']:.2f} %, P10-P90 "
              f"{lo:.2f}-{hi:.2f} %, max {s['max_latency_mape']:.2f} %; all bytes exact: "
              f"{s['all_bytes_exact']}; all hits exact: {s['all_hits_exact']}; wall "
              f"{s['wall_s']:.0f} s.", "",
              "Profile-only prediction (no warm-up recalibration, the profile measured seconds "
              f"before each run): median MAPE {s['profile_only_median_mape']:.2f} %, max "
              f"{s['profile_only_max_mape']:.2f} %.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
