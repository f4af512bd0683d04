"""The executor's own primitives, measured under a run's conditions, added to a profile.

``moesim calibrate`` times generic operations (square GEMMs, memory copy, a sequential disk
read). The executor's per-token time is made of primitives those do not pin down on a CPU,
so this module measures each where a run spends it -- never on the run being validated:

- **compute, in the executor's loop**: the executor itself runs a held-out routing (seeded
  random, ``2 k`` experts per layer, a cache that holds them all) with the run's thread
  settings; on the tokens where every expert is resident it reads the median dense part
  (``moe_dense``, shape ``HxExS``), the median routed expert (``expert_ffn``, shape ``HxI``) and
  the per-layer fixed cost left over -- lookup, queueing, Python bookkeeping
  (``executor_overhead``, shape ``HxExSkK``), which ``moesim.offload`` adds to every batch;
- **reads, on files of the store**: cold reads of held-out files (not read by the run) of
  one or more sizes by one thread, fitted to ``seconds = latency + bytes / bandwidth``
  (``links.expert_read``), then the same files read by ``threads`` threads at once, whose
  per-read times give the bandwidth the disk shares among them (``links.expert_read_shared``).
"""

from __future__ import annotations

import tempfile

import numpy as np

from moesim.executor.stack import StackSpec
from moesim.executor.store import ExpertStore


def overhead_shape(spec: StackSpec) -> str:
    return f"{spec.dense_shape}k{spec.top_k}"


def heldout_routing(spec: StackSpec, tokens: int, seed: int = 12345):
    """Seeded random routing over the first ``2 k`` experts of each layer (a trace)."""
    from moesim.traces.trace import Trace

    rng = np.random.default_rng(seed)
    pool = min(2 * spec.top_k, spec.num_experts)
    ex = np.stack([[rng.choice(pool, spec.top_k, replace=False) for _ in range(spec.layers)]
                   for _ in range(tokens)]).astype(np.int16)
    w = rng.dirichlet(np.ones(spec.top_k), (tokens, spec.layers)).astype(np.float32)
    return Trace.from_arrays(ex, w, [tokens], "decode", num_experts=spec.num_experts,
                             model=spec.model.name)


def loop_rows(spec: StackSpec, store: ExpertStore, compute_threads: int = 1,
              tokens: int = 40) -> list[dict]:
    """Dense part, routed expert and per-layer overhead, one token each, as table rows,
    timed by the executor's own loop on all-resident tokens of a held-out routing."""
    from moesim.executor.runner import RunSettings, run

    pool = min(2 * spec.top_k, spec.num_experts)
    settings = RunSettings(policy="lru", capacity_experts=spec.layers * pool, io_threads=1,
                           compute_threads=compute_threads)
    rec = run(spec, store, settings, trace=heldout_routing(spec, tokens))
    resident = (rec.residency > 0).all(axis=(1, 2))
    if resident.sum() < 5:
        raise RuntimeError("the calibration run had fewer than 5 all-resident tokens")
    n_exp = (rec.residency >= 0).sum(axis=2)
    dense = np.median(rec.t_dense_s[resident])
    expert = np.median((rec.t_expert_s / np.maximum(n_exp, 1))[resident])
    rest = (rec.t_step_s - rec.t_dense_s.sum(axis=1) - rec.t_expert_s.sum(axis=1)) / spec.layers
    overhead = max(float(np.median(rest[resident])), 0.0)
    row = {"dtype": spec.dtype, "tokens": 1}
    return [{"operation": "expert_ffn", "shape": spec.expert_shape, **row, "seconds": float(expert)},
            {"operation": "moe_dense", "shape": spec.dense_shape, **row, "seconds": float(dense)},
            {"operation": "executor_overhead", "shape": overhead_shape(spec), **row,
             "seconds": overhead}]


def measure_store_reads(stores_keys, threads: int = 1) -> list[tuple[int, float]]:
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


def fit_reads(rows, what: str) -> dict:
    """Least-squares ``seconds = latency + bytes / bandwidth`` over one thread's reads."""
    b = np.array([r[0] for r in rows], float)
    t = np.array([r[1] for r in rows], float)
    slope, intercept = 0.0, 0.0
    if len(set(b.tolist())) > 1:
        # medians per size resist the odd slow read better than a fit through every point
        sizes = np.unique(b)
        med = np.array([np.median(t[b == s]) for s in sizes])
        slope, intercept = np.polyfit(sizes, med, 1)
    if slope <= 0 or intercept < 0:
        slope, intercept = float(np.median(t / b)), 0.0
    spread = np.percentile(t / np.maximum(b, 1), [10, 90]) * 2**20 * 1e3
    return {"name": "expert-read-measured", "kind": "storage", "bandwidth": float(1.0 / slope),
            "latency": float(intercept),
            "source": f"moesim.executor.calibrate: {what}, 1 I/O thread, {len(rows)} reads "
                      f"(p10-p90 {spread[0]:.2f}-{spread[1]:.2f} ms/MiB)"}


def fit_shared(rows, single: dict, threads: int, what: str) -> dict:
    """Bandwidth all ``threads`` threads reach together: each concurrent read moves its bytes
    at ``total / threads`` after the single-thread latency (median over reads)."""
    b = np.array([r[0] for r in rows], float)
    t = np.array([r[1] for r in rows], float)
    moving = np.maximum(t - single["latency"], 1e-9)
    total = float(threads * np.median(b / moving))
    total = min(max(total, single["bandwidth"]), threads * single["bandwidth"])
    return {"name": "expert-read-shared", "kind": "storage", "bandwidth": total,
            "latency": single["latency"],
            "source": f"moesim.executor.calibrate: {what}, {threads} I/O threads at once, "
                      f"{len(rows)} reads"}


def read_links(stores_keys, threads: int, what: str) -> dict:
    """``expert_read`` (one thread) and, for ``threads`` > 1, ``expert_read_shared``."""
    single = fit_reads(measure_store_reads(stores_keys, 1), what)
    links = {"expert_read": single}
    if threads > 1:
        links["expert_read_shared"] = fit_shared(measure_store_reads(stores_keys, threads),
                                                 single, threads, what)
    return links


def new_read_files(root: str, sizes_mib=(4, 8, 16, 32), files_per_size: int = 6,
                   read_gbps: float | None = None):
    """Write ``files_per_size`` fresh files of each size under ``root``: [(ExpertStore, keys)]
    (``read_gbps``: read them through an emulated device of that bandwidth)."""
    import torch

    groups, key = [], 0
    for mib in sizes_mib:
        store = ExpertStore(root, num_experts=1000, read_gbps=read_gbps)
        keys = []
        for _ in range(files_per_size):
            store.write(key, {"w": torch.ones(int(mib * 2**20 // 2), dtype=torch.bfloat16)})
            keys.append(key)
            key += 1
        groups.append((store, keys))
    return groups


def extend_profile(path, specs, threads: int = 2, compute_threads: int = 1,
                   disk_dir: str | None = None, sizes_mib=(4, 8, 16, 32), stores_keys=None,
                   loop_stores=None, kernels: bool = True, reads: bool = True,
                   read_gbps: float | None = None) -> dict:
    """Add the executor's compute rows for each stack spec and the expert-read links to a
    profile. ``loop_stores`` (one ExpertStore per spec) hold the experts the loop calibration
    runs on (default: a temporary store on ``disk_dir``); ``stores_keys`` ([(ExpertStore,
    keys)]) are held-out store files to time reads on (default: new files of ``sizes_mib``). ``read_gbps``: loop stores and new
    files are read through an emulated device of that bandwidth, as the runs will read."""
    import os
    import shutil

    import yaml

    from moesim.fileio import write_text_atomic

    data = yaml.safe_load(open(path).read())
    tmp = []
    try:
        if kernels:
            shapes = {s.expert_shape for s in specs} | {s.dense_shape for s in specs} | {
                overhead_shape(s) for s in specs}
            rows = [r for r in data.get("tables") or [] if r.get("shape") not in shapes or
                    r.get("operation") not in ("expert_ffn", "moe_dense", "executor_overhead")]
            for i, spec in enumerate(specs):
                store = loop_stores[i] if loop_stores else None
                if store is None:
                    tmp.append(tempfile.mkdtemp(prefix="moesim-loopcal-", dir=disk_dir))
                    store = ExpertStore(tmp[-1], spec.num_experts, read_gbps=read_gbps)
                rows += loop_rows(spec, store, compute_threads)
            data["tables"] = rows
        if reads:
            if stores_keys:
                what = f"cold {stores_keys[0][0].mode} reads of held-out expert-store files"
            else:
                tmp.append(tempfile.mkdtemp(prefix="moesim-readcal-", dir=disk_dir))
                stores_keys = new_read_files(tmp[-1], sizes_mib, read_gbps=read_gbps)
                os.sync()
                what = (f"cold {stores_keys[0][0].mode} reads of new files of "
                        f"{list(sizes_mib)} MiB")
            links = data.setdefault("links", {})
            links.pop("expert_read_shared", None)
            links.update(read_links(stores_keys, threads, what))
    finally:
        for d in tmp:
            shutil.rmtree(d, ignore_errors=True)
    data.setdefault("executor", {}).update({"io_threads": threads,
                                            "compute_threads": compute_threads})
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return data
