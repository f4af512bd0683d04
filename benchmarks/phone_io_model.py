"""Flash I/O model vs the phone run's per-token metrics (edge-qwen3-phone, qwen.metrics).

Replays the trace through the global LRU with batch accounting at 4000 MiB (which reproduces
the recorded residency), sums each decode token's miss bytes and reads, fits moesim.storage's
FlashIO on the odd tokens and predicts the even ones (held out): per-token I/O time (io_ms,
summed over the 4 I/O threads) and wall time (compute + exposed I/O + cache management).
Run: python benchmarks/phone_io_model.py   (writes benchmarks/results/phone_io_model.json)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.fileio import write_json_atomic
from moesim.replay import AccessStream, run_policy
from moesim.storage import calibrate, get_storage, mape
from moesim.traces.importers import import_trace

DATA = Path(os.environ.get("MOESIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def evaluate(folder: Path) -> dict:
    trace = import_trace(folder / "qwen.route.csv", "route-trace-v1")
    stream = AccessStream.from_trace(trace, "batch")
    res = run_policy(stream, "lru", capacity_bytes=4000 * 2**20)
    nbytes, reads = res.per_clock(stream)
    m = pd.read_csv(folder / "qwen.metrics", comment="#")
    nbytes, reads = nbytes[1:1 + len(m)], reads[1:1 + len(m)]  # clock 0 is the prefill step
    ms = 1e-3
    cal = np.arange(len(m)) % 2 == 1
    test = ~cal
    model = calibrate(nbytes[cal], reads[cal], m.io_ms[cal] * ms, m.stall_ms[cal] * ms, m.mgmt_ms[cal] * ms,
                      threads=4, read_latency=get_storage("phone-ufs4").flash.read_latency,
                      source="fitted to qwen.metrics odd decode tokens; UFS 4.0 read latency")
    io_pred = model.thread_time(nbytes, reads) / ms
    wall_rec = model.token_time(m.compute_ms * ms, nbytes, reads) / ms
    compute_const = float(np.median(m.compute_ms[cal])) * ms
    wall_const = model.token_time(np.full(len(m), compute_const), nbytes, reads) / ms
    out = {
        "tokens": int(len(m)), "held_out_tokens": int(test.sum()),
        "replayed_hit_rate": res.stats["hit_rate"],
        "read_bytes_vs_metrics_max_rel_err": float(np.max(np.abs(nbytes - m.read_bytes) / m.read_bytes)),
        "model": model.to_dict(),
        "thread_bw_MBps": model.thread_bw / 1e6,
        "mape_io_ms_held_out": mape(io_pred[test], m.io_ms[test]),
        "mape_wall_ms_held_out_recorded_compute": mape(wall_rec[test], m.wall_ms[test]),
        "mape_wall_ms_held_out_constant_compute": mape(wall_const[test], m.wall_ms[test]),
        "mape_io_ms_all": mape(io_pred, m.io_ms),
        "mape_wall_ms_all_recorded_compute": mape(wall_rec, m.wall_ms),
        "constant_compute_ms": compute_const / ms,
    }
    return out


def main() -> int:
    folder = DATA / "edge-qwen3-phone"
    if not (folder / "qwen.route.csv").exists():
        print(f"skipped: {folder} is absent")
        return 0
    out = evaluate(folder)
    for k, v in out.items():
        if k != "model":
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    write_json_atomic(Path(__file__).parent / "results" / "phone_io_model.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
