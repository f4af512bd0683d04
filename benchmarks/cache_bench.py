"""Replay speed: single-size LRU lookups per second (target >= 5 M/s), the full all-sizes LRU
curve on esft_law.npz (target < 2 s), and the generic policy-object path for comparison.
Run: python benchmarks/cache_bench.py   (writes benchmarks/results/cache_bench.json)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from moesim.fileio import write_json_atomic
from moesim.replay import AccessStream, lru_curve, lru_hits, run_policy
from moesim.traces import Trace

DATA = Path(os.environ.get("MOESIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> int:
    path = DATA / "esft-dsv2lite" / "esft_law.npz"
    if not path.exists():
        print(f"skipped: {path} is absent")
        return 0
    d = np.load(path)
    t0 = time.perf_counter()
    trace = Trace.from_arrays(d["experts"], d["weights"], d["seq_lens"], "prefill", num_experts=64)
    stream = AccessStream.from_trace(trace, "token")
    build = time.perf_counter() - t0
    n = stream.num_lookups
    keys = stream.keys.tolist()
    out = {"trace": "esft_law.npz", "lookups": n, "stream_build_s": build}
    for cap in (156, 416, 832):
        dt, hits = best_of(lambda cap=cap: lru_hits(keys, cap))
        out[f"lru_single_size_{cap}_Mlookups_per_s"] = n / dt / 1e6
        out[f"lru_single_size_{cap}_hit_rate"] = hits / n
    caps = np.arange(0, stream.num_layers * stream.num_experts + 1)
    dt, curve = best_of(lambda: lru_curve(stream, caps))
    out["lru_all_sizes_curve_s"] = dt
    out["lru_all_sizes_points"] = len(caps)
    dt, curve_pl = best_of(lambda: lru_curve(stream, caps, "per-layer"))
    out["lru_all_sizes_curve_per_layer_s"] = dt
    dt, r = best_of(lambda: run_policy(stream, "lru", capacity_experts=416), repeat=1)
    out["policy_object_lru_Mlookups_per_s"] = n / dt / 1e6
    assert abs(r.stats["hit_rate"] - curve[416]) < 1e-12  # all three paths agree
    assert abs(out["lru_single_size_416_hit_rate"] - curve[416]) < 1e-12
    for k, v in out.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    write_json_atomic(Path(__file__).parent / "results" / "cache_bench.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
