"""Micro-benchmarks of the executor's own primitives, added to a ``moesim calibrate`` profile.

``moesim calibrate`` times generic operations (square GEMMs, memory copy, a sequential disk
read). The executor's per-token time is made of three primitives whose speed those do not pin
down well on a CPU: one routed expert's SwiGLU for one token, the dense part of a layer (norm,
router, shared experts), and a cold read of one expert file by the I/O threads. This module
times each in isolation -- never the run being validated -- and writes them into the profile:

- ``tables`` rows ``expert_ffn`` (shape ``HxI``) and ``moe_dense`` (shape ``HxExS``) at one
  token, which ``moesim.cost.CostModel`` reads;
- ``links.expert_read``: per-read latency and bandwidth of one I/O thread when ``threads``
  threads read cold files of several sizes concurrently (a least-squares line over sizes).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from moesim.executor.stack import DenseLayer, StackSpec, expert_tensors, swiglu, token_input
from moesim.executor.store import ExpertStore


def _median_time(fn, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def kernel_rows(spec: StackSpec, compute_threads: int = 1, reps: int = 30,
                distinct: int = 8, directory: str | None = None) -> list[dict]:
    """Seconds of one expert FFN and of one dense layer part, one token, as table rows.

    The experts are written to a temporary store and read back the way a run reads them
    (aligned buffers), and timed cycling over ``distinct`` of them, so their weights stream
    from DRAM as in a run (a just-read expert is not in the CPU caches either)."""
    import shutil

    import torch

    torch.set_num_threads(int(compute_threads))
    root = tempfile.mkdtemp(prefix="moesim-kernelcal-", dir=directory)
    try:
        store = ExpertStore(root, spec.num_experts)
        for k in range(distinct):
            store.write(k, expert_tensors(spec, k))
        experts = [store.read(k).tensors for k in range(distinct)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    x = token_input(spec, 0)
    dense = DenseLayer(spec, 0)
    it = iter(range(10**9))

    def one_expert():
        e = experts[next(it) % distinct]
        swiglu(x, e["w_gate"], e["w_up"], e["w_down"])

    with torch.inference_mode():
        t_exp = _median_time(one_expert, reps)
        t_dense = _median_time(lambda: dense.forward(x), reps)
    return [
        {"operation": "expert_ffn", "shape": spec.expert_shape, "dtype": spec.dtype, "tokens": 1,
         "seconds": t_exp},
        {"operation": "moe_dense", "shape": spec.dense_shape, "dtype": spec.dtype, "tokens": 1,
         "seconds": t_dense},
    ]


def measure_store_reads(stores_keys, threads: int = 2) -> list[tuple[int, float]]:
    """(file bytes, seconds) of cold reads of existing expert files, ``threads`` at a time:
    ``stores_keys`` is a list of (ExpertStore, keys)."""
    from moesim.executor.io import IOPool

    rows = []
    for store, keys in stores_keys:
        store.drop_cache(keys)
        pool = IOPool(store.read, threads)
        trs = [pool.submit(k, 0) for k in keys]
        for tr in trs:
            tr.done.wait()
        pool.close()
        for tr in trs:
            if tr.error is not None:
                raise tr.error
            rows.append((tr.file_bytes, tr.duration_s))
            store.release(tr.result)
    return rows


def fit_reads(rows, threads: int, what: str) -> dict:
    """Least-squares ``seconds = latency + bytes / bandwidth`` over (bytes, seconds) reads."""
    b = np.array([r[0] for r in rows], float)
    t = np.array([r[1] for r in rows], float)
    if len(set(b.tolist())) > 1:
        slope, intercept = np.polyfit(b, t, 1)
    else:
        slope, intercept = 0.0, 0.0
    if slope <= 0 or intercept < 0:
        slope, intercept = float(np.sum(t) / np.sum(b)), 0.0
    return {"name": "expert-read-measured", "kind": "storage", "bandwidth": float(1.0 / slope),
            "latency": float(intercept),
            "source": f"moesim.executor.calibrate: {what}, {threads} I/O threads, {len(rows)} reads"}


def measure_expert_reads(directory: str | None = None, threads: int = 2,
                         sizes_mib=(4, 8, 16, 32), files_per_size: int = 6) -> dict:
    """Cold reads of fresh safetensors files of several sizes, ``threads`` at a time (the I/O
    pool of a run), fitted to ``seconds = latency + bytes / bandwidth`` per read."""
    import shutil

    import torch

    root = tempfile.mkdtemp(prefix="moesim-readcal-", dir=directory)
    try:
        groups = []
        key = 0
        for mib in sizes_mib:
            store = ExpertStore(root, num_experts=1000)
            keys = []
            for _ in range(files_per_size):
                store.write(key, {"w": torch.ones(int(mib * 2**20 // 2), dtype=torch.bfloat16)})
                keys.append(key)
                key += 1
            groups.append((store, keys))
        rows = measure_store_reads(groups, threads)
        mode = groups[0][0].mode
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return fit_reads(rows, threads, f"cold {mode} reads of new files of {list(sizes_mib)} MiB")


def extend_profile(path, specs, threads: int = 2, compute_threads: int = 1,
                   disk_dir: str | None = None, sizes_mib=(4, 8, 16, 32),
                   stores_keys=None, kernels: bool = True, reads: bool = True) -> dict:
    """Add executor kernel rows for each stack spec and the expert-read link to a profile.
    ``stores_keys`` ([(ExpertStore, keys)]) times reads of existing expert files instead of
    new files of ``sizes_mib``."""
    import yaml

    from moesim.fileio import write_text_atomic

    data = yaml.safe_load(open(path).read())
    tables = [r for r in data.get("tables") or []
              if r.get("operation") not in ("expert_ffn", "moe_dense")
              or not any(r.get("shape") in (s.expert_shape, s.dense_shape) for s in specs)]
    if kernels:
        for spec in specs:
            tables += kernel_rows(spec, compute_threads, directory=disk_dir)
        data["tables"] = tables
    if not reads:
        pass
    elif stores_keys:
        link = fit_reads(measure_store_reads(stores_keys, threads), threads,
                         f"cold {stores_keys[0][0].mode} reads of expert-store files")
    else:
        link = measure_expert_reads(disk_dir, threads, sizes_mib)
    if reads:
        data.setdefault("links", {})["expert_read"] = link
    data.setdefault("executor", {}).update({"io_threads": threads,
                                            "compute_threads": compute_threads})
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return data
