"""Sweep throughput: the bundled example sweep (16 Mixtral EP8 scenarios) run serially, with
joblib's process pool and on a Dask LocalCluster through joblib's dask backend; the three tables
must be identical (wall-clock columns aside).
Run: python benchmarks/sweep_bench.py   (writes benchmarks/results/sweep_bench.json)
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd

import moesim
from moesim.fileio import write_json_atomic
from moesim.sweep import load_sweep, run_sweep

SWEEP = Path(moesim.__file__).parent / "data" / "sweeps" / "mixtral-ep8-placement.yaml"
RESULTS = Path(__file__).parent / "results" / "sweep_bench.json"


def main() -> int:
    sweep = load_sweep(SWEEP)
    runs, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in (("serial", {"backend": "local", "n_jobs": 1}),
                          ("joblib-2", {"backend": "local", "n_jobs": 2}),
                          ("dask-localcluster-2", {"backend": "dask", "n_jobs": 2})):
            run = run_sweep(sweep, Path(tmp) / f"{label}.parquet", **kw)
            runs[label] = {"points": run.total, "wall_s": round(run.wall_s, 2),
                           "points_per_s": round(run.total / run.wall_s, 2)}
            tables[label] = run.table.drop(columns=["wall_s"])
            print(f"{label:>20}: {run.total} points in {run.wall_s:.1f} s ({run.total / run.wall_s:.2f} points/s)")
    identical = True
    for label, table in tables.items():
        for col in table.columns:
            if not table[col].equals(tables["serial"][col]):
                identical = False
                print(f"{label} differs from serial in {col}: {table[col].tolist()[:4]} vs "
                      f"{tables['serial'][col].tolist()[:4]}")
    print(f"identical tables: {identical}")
    first = tables["serial"]
    best = first.loc[first.throughput_tok_s.idxmax()]
    print(f"highest throughput: {best.throughput_tok_s:,.0f} tok/s at rate {best['workload.rate_per_s']}, "
          f"placement {best.placement}, max_running {best['serving.max_running']}")
    write_json_atomic(RESULTS, {"sweep": str(SWEEP.name), "runs": runs, "identical": identical,
                                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}})
    pd.set_option("display.width", 200)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
