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
    q = {f"gbps_p{p}": float(np.percentile(gbps, p)) for p in (0, 10, 50, 90, 100)}
    edges = np.arange(0.0, np.ceil(gbps.max() * 4) / 4 + 0.25, 0.25)
    hist, _ = np.histogram(gbps, edges)
    summary = {
        "command": f"python benchmarks/disk_regimes.py --seconds {args.seconds} "
                   f"--chunk-mib {args.chunk_mib} --gap {args.gap}",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "samples": len(rows), "chunk_mib": args.chunk_mib, **q,
        "cv": float(gbps.std() / gbps.mean()),
        "histogram_gbps": {f"{lo:.2f}-{lo + 0.25:.2f}": int(n) for lo, n in zip(edges[:-1], hist, strict=True) if n},
        "load_avg_1min": os.getloadavg()[0],
        "series": [[round(t, 2), round(g, 3)] for t, g in rows],
    }
    write_json_atomic(Path(args.out), summary)
    print(f"{len(rows)} reads of {args.chunk_mib} MiB over {args.seconds:.0f} s: GB/s min "
          f"{q['gbps_p0']:.2f}  P10 {q['gbps_p10']:.2f}  median {q['gbps_p50']:.2f}  P90 "
          f"{q['gbps_p90']:.2f}  max {q['gbps_p100']:.2f}  (CV {summary['cv']:.2f}); histogram "
          f"{summary['histogram_gbps']}; wrote {args.out}")
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
