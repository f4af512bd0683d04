"""How steady is this machine's disk? Cold O_DIRECT read throughput sampled over time.

Writes a scratch file (default 2 GiB) on the disk under test, then every ``--gap`` seconds reads
the next ``--chunk`` MiB of it with O_DIRECT (page cache bypassed; the file's cached pages are
dropped first) and records the throughput. A disk whose speed switches between levels for
seconds to minutes at a time (a cloud VM's shared block device) cannot be predicted by a
profile taken before a run: this is the evidence behind cpu_validation's ``--read-gbps``.

    python benchmarks/disk_regimes.py [--seconds 90] [--dir /tmp] [--out benchmarks/results/disk_regimes.json]
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def scratch_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def sample(path: Path, seconds: float, chunk: int, gap: float) -> list[tuple[float, float]]:
    """(time since start, GB/s) of ``chunk``-byte O_DIRECT reads, one every ``gap`` seconds."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 8 * MIB)
    out, off = [], 0
    t_start = time.perf_counter()
    try:
        while time.perf_counter() - t_start < seconds:
            t0, got = time.perf_counter(), 0
            while got < chunk:
                n = os.preadv(fd, [buf], off)
                off = (off + n) % size
                got += n
            out.append((t0 - t_start, got / (time.perf_counter() - t0) / 1e9))
            time.sleep(gap)
    finally:
        os.close(fd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--chunk-mib", type=int, default=128)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--file-gib", type=float, default=2.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "disk_regimes.json"))
    args = ap.parse_args()
    from moesim.fileio import write_json_atomic

    path = Path(args.dir) / "moesim-disk-regimes.bin"
    scratch_file(path, int(args.file_gib * 2**30) // (16 * MIB) * 16 * MIB)
    time.sleep(2)
    rows = sample(path, args.seconds, args.chunk_mib * MIB, args.gap)
    gbps = np.array([r[1] for r in rows])
    # two levels: split at the midpoint of the extremes' medians (robust to a few outliers)
    lo, hi = np.percentile(gbps, 10), np.percentile(gbps, 90)
    fast = gbps > (lo + hi) / 2
    switches = int(np.count_nonzero(fast[1:] != fast[:-1]))
    summary = {
        "command": f"python benchmarks/disk_regimes.py --seconds {args.seconds} --chunk-mib {args.chunk_mib} --gap {args.gap}",
        "samples": len(rows), "chunk_mib": args.chunk_mib,
        "gbps_min": float(gbps.min()), "gbps_p10": float(lo), "gbps_median": float(np.median(gbps)),
        "gbps_p90": float(hi), "gbps_max": float(gbps.max()),
        "fast_fraction": float(fast.mean()), "switches": switches,
        "fast_level_gbps": float(np.median(gbps[fast])) if fast.any() else None,
        "slow_level_gbps": float(np.median(gbps[~fast])) if (~fast).any() else None,
        "load_avg_1min": os.getloadavg()[0],
        "series": [[round(t, 2), round(g, 3)] for t, g in rows],
    }
    write_json_atomic(Path(args.out), summary)
    print(f"{len(rows)} reads of {args.chunk_mib} MiB over {args.seconds:.0f} s: "
          f"min {gbps.min():.2f}  P10 {lo:.2f}  median {np.median(gbps):.2f}  P90 {hi:.2f}  "
          f"max {gbps.max():.2f} GB/s; fast level {summary['fast_level_gbps'] or 0:.2f}, slow "
          f"{summary['slow_level_gbps'] or 0:.2f} GB/s, {fast.mean():.0%} of samples fast, "
          f"{switches} switches; wrote {args.out}")
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
