"""Trace write and read throughput, and peak resident memory while streaming a large trace.

    python benchmarks/trace_io_bench.py [--rows 10000000] [--out benchmarks/results/trace_io_bench.json]

Synthesises a Qwen3-30B-A3B-shaped routing trace (48 MoE layers, 128 experts, top-8) with numpy
and writes it through ``TraceWriter.write_rows`` (validated, zstd Parquet, atomic), then streams
it back with ``Trace.iter_batches`` (validated) while summing the [L, E] load. Each phase runs in
a fresh Python process so its peak resident set size (ru_maxrss) is its own; the baseline is
the RSS of a process that only imported moesim.traces. Target (issue 2): streaming a
10-million-row trace under 1 GB resident.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, EXPERTS, TOP_K = 48, 128, 8  # Qwen3-30B-A3B (moesim.model preset qwen3-30b-a3b)
TOKENS_PER_REQUEST = 2048
CHUNK_TOKENS = 4096  # tokens per write_rows call: 196,608 rows


def _peak_rss_bytes() -> int:
    import resource

    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _synth_chunk(rng, first_token: int, n_tokens: int):
    """Rows of ``n_tokens`` tokens (token-major, then layer) with skewed, distinct top-8 ids."""
    import numpy as np

    n = n_tokens * LAYERS
    token = first_token + np.repeat(np.arange(n_tokens, dtype=np.int64), LAYERS)
    layer = np.tile(np.arange(LAYERS, dtype=np.int16), n_tokens)
    # a skewed first expert plus an odd stride gives 8 distinct ids per row (odd * j mod 128
    # differs for j < 8), so validation passes without an argsort over 128 experts per row
    base = (rng.zipf(1.3, size=n) + 7 * layer) % EXPERTS
    stride = 2 * rng.integers(0, 8, size=n) + 1
    experts = (base[:, None] + stride[:, None] * np.arange(TOP_K)) % EXPERTS
    logits = rng.standard_normal((n, TOP_K)).astype(np.float32)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    request = (token // TOKENS_PER_REQUEST).astype(np.int32)
    pos = (token % TOKENS_PER_REQUEST).astype(np.int32)
    phase = (pos >= 512).astype(np.int8)  # 512 prompt tokens, then decode
    step = token.astype(np.int32)
    return request, pos, step, phase, layer, experts.astype(np.int16), weights


def phase_write(path: str, rows: int) -> dict:
    import numpy as np

    from moesim.traces import TraceMeta, TraceWriter

    meta = TraceMeta(num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, model="qwen3-30b-a3b",
                     source="benchmarks/trace_io_bench.py (synthetic)")
    rng = np.random.default_rng(0)
    tokens = -(-rows // LAYERS)
    in_writer = 0.0
    t_all = time.perf_counter()
    cpu0 = time.process_time()
    with TraceWriter(path, meta) as w:
        for first in range(0, tokens, CHUNK_TOKENS):
            cols = _synth_chunk(rng, first, min(CHUNK_TOKENS, tokens - first))
            t0 = time.perf_counter()
            w.write_rows(*cols)
            in_writer += time.perf_counter() - t0
        t0 = time.perf_counter()
    in_writer += time.perf_counter() - t0  # closing flushes the last row group and renames
    total = time.perf_counter() - t_all
    return {"rows": w.rows, "seconds_in_writer": in_writer, "seconds_total": total,
            "cpu_seconds_total": time.process_time() - cpu0,
            "file_bytes": os.path.getsize(path), "peak_rss_bytes": _peak_rss_bytes()}


def phase_read(path: str) -> dict:
    import numpy as np

    from moesim.traces import Trace

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    trace = Trace.read(path)
    L, E = trace.meta.num_layers, trace.meta.num_experts
    load = np.zeros(L * E, dtype=np.int64)
    rows = 0
    early_peak = 0
    for i, b in enumerate(trace.iter_batches()):
        rows += len(b)
        if i == 4:  # flat memory: the peak after 5 batches should already be the final peak
            early_peak = _peak_rss_bytes()
        keys = b.expert_ids.astype(np.int64) + (b.layer.astype(np.int64) * E)[:, None]
        load += np.bincount(keys.reshape(-1), minlength=L * E)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "load_total": int(load.sum()), "peak_rss_bytes": _peak_rss_bytes(),
            "peak_rss_after_5_batches_bytes": early_peak}


def phase_baseline() -> dict:
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import moesim.traces  # noqa: F401

    return {"peak_rss_bytes": _peak_rss_bytes()}


def _child(phase: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", phase, *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trace_io_bench.json")
    ap.add_argument("--phase", choices=["write", "read", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "write":
        print(json.dumps(phase_write(args.path, args.rows)))
        return
    if args.phase == "read":
        print(json.dumps(phase_read(args.path)))
        return
    if args.phase == "baseline":
        print(json.dumps(phase_baseline()))
        return

    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="moesim-io-bench-") as tmp:
        path = str(Path(tmp) / "bench.parquet")
        base = _child("baseline")
        w = _child("write", "--path", path, "--rows", str(args.rows))
        r = _child("read", "--path", path)
    assert r["rows"] == w["rows"] and r["load_total"] == w["rows"] * TOP_K
    result = {
        "benchmark": "trace_io_bench",
        "shape": {"layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "rows": w["rows"]},
        "write_rows_per_s": w["rows"] / w["seconds_in_writer"],
        "write_seconds": w["seconds_in_writer"],
        "read_rows_per_s": r["rows"] / r["seconds"],
        "read_seconds": r["seconds"],
        "read_cpu_seconds": r["cpu_seconds"],
        "write_cpu_seconds_including_synthesis": w["cpu_seconds_total"],
        "file_bytes": w["file_bytes"],
        "bytes_per_row": w["file_bytes"] / w["rows"],
        "peak_rss_write_bytes": w["peak_rss_bytes"],
        "peak_rss_read_bytes": r["peak_rss_bytes"],
        "peak_rss_read_after_5_batches_bytes": r["peak_rss_after_5_batches_bytes"],
        "baseline_rss_bytes": base["peak_rss_bytes"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"trace: {w['rows']:,} rows ({LAYERS} layers x {EXPERTS} experts, top-{TOP_K}), "
          f"{w['file_bytes'] / mib:.1f} MiB on disk ({result['bytes_per_row']:.1f} B/row)")
    print(f"write (TraceWriter.write_rows, validated): {result['write_rows_per_s'] / 1e6:.2f} M rows/s "
          f"({w['seconds_in_writer']:.1f} s in the writer; {w['cpu_seconds_total']:.1f} s CPU with synthesis)")
    print(f"read  (Trace.iter_batches, validated, + [L,E] load): {result['read_rows_per_s'] / 1e6:.2f} M rows/s "
          f"({r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU)")
    print(f"peak RSS: read {r['peak_rss_bytes'] / mib:.0f} MiB (after 5 of its batches: "
          f"{r['peak_rss_after_5_batches_bytes'] / mib:.0f} MiB), write {w['peak_rss_bytes'] / mib:.0f} MiB "
          f"(a process that only imports moesim.traces: {base['peak_rss_bytes'] / mib:.0f} MiB); target < 1024 MiB")
    if args.out:
        from moesim.fileio import write_json_atomic

        write_json_atomic(args.out, result)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
