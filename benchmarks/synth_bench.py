"""Synthetic-trace generation throughput: (token, layer) rows per second, streamed to Parquet.

    python benchmarks/synth_bench.py [--rows 1000000] [--models mixtral-8x7b,deepseek-v2-lite,...]

For each preset (default knobs): the router-bias calibration time (paid once per parameter
set, timed alone), the generation time of ``--rows`` rows streamed through TraceWriter to a
temporary file (end-to-end time minus calibration), rows/s, and the process's peak resident
memory so far. Writes benchmarks/results/synth_bench.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from moesim.fileio import write_json_atomic
from moesim.model import get_model
from moesim.traces import synth
from moesim.traces.synth import params_for_model, synthesize

DEFAULT_MODELS = "mixtral-8x7b,deepseek-v2-lite,olmoe-1b-7b,qwen3-30b-a3b,gpt-oss-120b,deepseek-v3"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, rows: int, seed: int) -> dict:
    model = get_model(name)
    params = params_for_model(model, seed=seed)  # default knobs (close to the ESFT fits)
    tokens = max(1, rows // model.moe_layers)
    start = time.perf_counter()
    synth.calibrate_bias(params, seed=seed)
    calib_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth.parquet"
        start = time.perf_counter()
        trace = synthesize(params, tokens, requests=max(1, tokens // 512), decode_fraction=0.5,
                           seed=seed, out=out)
        total_s = time.perf_counter() - start
        size = os.path.getsize(out)
        rows = trace.num_rows
    gen_s = max(total_s - calib_s, 1e-9)  # synthesize calibrates once itself, then generates
    return {
        "model": name, "layers": model.moe_layers, "experts": model.num_experts, "top_k": model.top_k,
        "tokens": tokens, "rows": rows, "calibration_s": round(calib_s, 2),
        "total_s": round(total_s, 2), "generate_s": round(gen_s, 2), "rows_per_s": round(rows / gen_s),
        "file_mib": round(size / 2**20, 1), "peak_rss_mib": round(peak_rss_mib()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synth_bench.json"))
    args = ap.parse_args(argv)
    results = []
    print(f"{'model':18} {'L':>3} {'E':>4} {'k':>2} {'rows':>9} {'calib s':>8} {'gen s':>7} "
          f"{'rows/s':>10} {'MiB':>6} {'peak RSS MiB':>12}")
    for name in args.models.split(","):
        r = bench(name.strip(), args.rows, args.seed)
        results.append(r)
        print(f"{r['model']:18} {r['layers']:>3} {r['experts']:>4} {r['top_k']:>2} {r['rows']:>9} "
              f"{r['calibration_s']:>8} {r['generate_s']:>7} {r['rows_per_s']:>10} {r['file_mib']:>6} "
              f"{r['peak_rss_mib']:>12}", flush=True)
    payload = {"cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
               "python": sys.version.split()[0], "rows_requested": args.rows, "results": results}
    write_json_atomic(args.out, payload)
    print(f"load average during the run: {payload['load_avg_1min']} on {payload['cpu_count']} cores")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
