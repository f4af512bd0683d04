"""Calibration: fit the all-to-all constants to published DeepEP numbers, and measure a machine.

Two jobs share this module because both turn measurements into the constants the models use:

- :func:`fit_deepep` fits the four free constants of the DeepEP-style dispatchers to exactly
  the four calibration numbers of DeepEP's README (H800 + CX7), with the NIC rate fixed from
  hardware (48.5 GB/s per CX7, NCCL maintainers / SimAI), and :func:`predict_deepep` predicts
  every other published figure from the same constants.
- :func:`measure_machine` times this machine (CPU GEMM by size, memory copy by size, cold disk
  read; on CUDA host<->device copies pinned and pageable, GEMM and grouped GEMM) and returns a
  profile that :mod:`moesim.cost` and :mod:`moesim.hardware` load (``moesim calibrate``).
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim import comm
from moesim.hardware import GB, Cluster, CommParams, get_cluster

DATA = Path(__file__).parent / "data" / "hardware"
PUBLISHED = DATA / "deepep_published.yaml"
FIT_FILE = DATA / "deepep_h800_fit.yaml"
CX7_RATE = 48.5 * GB  # achievable per-NIC rate, fixed from hardware, not fitted

NORMAL_TOKENS, LL_TOKENS, HIDDEN, TOP_K = 4096, 128, 7168, 8


def load_published(path: Path = PUBLISHED) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# Scenarios: the benchmark routings and their count matrices
# ---------------------------------------------------------------------------------------------
# DeepEP's tests draw one routing per run; the model's maximum-over-ranks terms move by about
# +-1.5 % from one draw to the next, so the fit and the predictions average several draws.
SEEDS = (0, 1, 2, 3, 4)
# Model structures compared by benchmarks/deepep_fit.py; the first of each is moesim's.
NORMAL_STRUCTURES = ("stage+overhead", "stage", "physical")
LL_STRUCTURES = ("per-rank", "slowest-rank")


@dataclass
class Scenario:
    kernel: str  # "normal" | "ll"
    ep: int
    counts: comm.CommCounts
    cluster: Cluster
    seed: int = 0


def deepep_scenarios(normal_eps=(8, 16, 32, 64), ll_eps=(8, 16, 32, 64, 128, 256),
                     seed: int | None = None, seeds=SEEDS) -> list[Scenario]:
    """Routings exactly as DeepEP's tests draw them, on the H800 test bed, contiguous experts;
    one scenario per (kernel, EP, seed). ``seed`` alone draws a single routing per point."""
    if seed is not None:
        seeds = (seed,)
    base = get_cluster("h800-ib")
    out = []
    for kernel, eps, tokens in (("normal", normal_eps, NORMAL_TOKENS), ("ll", ll_eps, LL_TOKENS)):
        for ep in eps:
            cluster = base.for_ep(ep)
            experts = (256 // ep) * ep
            plan = comm.Placement.contiguous(experts, ep)
            for s in seeds:
                src, ids = comm.deepep_test_routing(
                    ep, tokens, experts, TOP_K, base.gpus_per_node,
                    node_limited=(kernel == "normal"), seed=s)
                counts = comm.counts_from_tokens(src, ids, plan, cluster)
                out.append(Scenario(kernel, ep, counts, cluster, s))
    return out


def _normal_dispatcher(structure: str) -> comm.DeepEPNormal:
    if structure not in NORMAL_STRUCTURES:
        raise ValueError(f"unknown normal-kernel structure {structure!r}")
    if structure == "physical":  # RDMA stage = other nodes' rows only (formula 2 literally)
        return type("PhysicalDeepEPNormal", (comm.DeepEPNormal,),
                    {"own_node_in_rdma_stage": False})()
    return comm.DeepEPNormal()


def _modelled(sc: Scenario, params: CommParams, structure: str = "stage+overhead",
              ll_structure: str = "per-rank") -> dict:
    """Kernel seconds as DeepEP's benchmark reports them, and the logical bytes per rank.

    Normal kernels form one chained pipeline (buffers with flow control), so the slowest stage
    anywhere sets every rank's time: the model's maximum. Low-latency kernels have no
    back-pressure, so each rank's kernel time is its own (``DeepEPLowLatency.rank_times``) and
    the benchmark's per-rank figure is their mean (``per-rank``); ``slowest-rank`` takes the
    maximum instead (the model before this comparison).
    """
    cluster = sc.cluster.model_copy(update={"comm": params})
    drow, crow = comm.wire_rows("deepep-normal" if sc.kernel == "normal" else "deepep-ll",
                                HIDDEN, "fp8", "bf16")
    if sc.kernel == "normal":
        r = _normal_dispatcher(structure).run(sc.counts, cluster, drow, crow)
        return {"dispatch_s": r.dispatch_s, "combine_s": r.combine_s,
                "logical": r.logical_bytes, "scale": r.combine_scale, "bottleneck": r.bottleneck,
                "terms": r.terms}
    if ll_structure not in LL_STRUCTURES:
        raise ValueError(f"unknown low-latency structure {ll_structure!r}")
    ll = comm.get_dispatcher("deepep-ll")
    r = ll.run(sc.counts, cluster, drow, crow)
    d, c = r.dispatch_s, r.combine_s
    if ll_structure == "per-rank":
        dr, cr = ll.rank_times(sc.counts, cluster, drow, crow)
        d, c = float(dr.mean()), float(cr.mean())
    return {"dispatch_s": d, "combine_s": c, "logical": r.logical_bytes,
            "scale": r.combine_scale, "bottleneck": r.bottleneck, "terms": r.terms,
            "alpha": comm.pair_fixed_cost("deepep-ll", cluster)}


# unit rates and no fixed costs: modelled seconds = bytes on the binding link
_UNIT = CommParams(nvl_bw=1.0, rdma_bw=1.0, ll_rdma_bw=1.0, normal_overhead=0.0,
                   ll_alpha=0.0, ll_alpha_log2=0.0)


def _find(scenarios, kernel, ep) -> list[Scenario]:
    found = [sc for sc in scenarios if sc.kernel == kernel and sc.ep == ep]
    if not found:
        raise ValueError(f"no {kernel} scenario at EP{ep}")
    return found


def _normal_unit(scs: list[Scenario], structure: str) -> dict[str, np.ndarray]:
    """Per seed: bytes of the busiest NVLink and RDMA-stage terms, logical bytes per rank."""
    out = {"nvl": [], "rdma": [], "logical": []}
    for sc in scs:
        m = _modelled(sc, _UNIT, structure)
        out["nvl"].append(max(v for k, v in m["terms"].items() if k.startswith("nvl")))
        out["rdma"].append(max([v for k, v in m["terms"].items() if k.startswith("rdma")],
                               default=0.0))
        out["logical"].append(m["logical"])
    return {k: np.array(v) for k, v in out.items()}


def _ll_unit(scs: list[Scenario], ll_structure: str) -> float:
    """Seed mean of the reported kernel time at 1 B/s without fixed cost (bytes)."""
    vals = []
    for sc in scs:
        m = _modelled(sc, _UNIT, ll_structure=ll_structure)
        vals.append(m["dispatch_s"] - m["alpha"])
    return float(np.mean(vals))


def _calibration_points(published: dict) -> dict[tuple[str, int], float]:
    pts = {}
    for row in published["normal"]:
        if row.get("calibration"):
            pts[("normal", row["ep"])] = row["gbps"] * GB
    for row in published["low_latency"]:
        if row.get("calibration"):
            pts[("ll", row["ep"])] = row["us"] * 1e-6
    return pts


def _root(f, lo: float, hi: float, what: str) -> float:
    """The largest root of ``f`` on a log grid over [lo, hi] (brentq inside the bracket)."""
    from scipy.optimize import brentq

    grid = np.geomspace(lo, hi, 600)
    vals = np.array([f(x) for x in grid])
    change = np.flatnonzero(np.sign(vals[:-1]) != np.sign(vals[1:]))
    if not len(change):
        raise ValueError(f"the model cannot meet the calibration points ({what})")
    i = int(change[-1])
    return float(brentq(f, grid[i], grid[i + 1], xtol=1e-6 * grid[i]))


# ---------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------
def fit_deepep(scenarios: list[Scenario], published: dict | None = None,
               nic_rate: float = CX7_RATE, structure: str = "stage+overhead",
               ll_structure: str = "per-rank") -> CommParams:
    """Fit the DeepEP constants to the four calibration numbers, averaging the seeds given.

    Normal kernels (``structure``; the default is moesim's model, the others are kept for the
    comparison in benchmarks/deepep_fit.py):

    - ``stage+overhead``: RDMA-stage rows include the own node; NIC rate fixed at
      ``nic_rate``; free: NVLink rate and the normal-kernel fixed cost (EP8 + EP16).
    - ``stage``: as above without a fixed cost; free: NVLink rate (EP8), NIC rate (EP16).
    - ``physical``: RDMA stage counts only other nodes' rows (formula 2 read literally);
      free: NVLink rate (EP8), NIC rate (EP16); no fixed cost.

    Low-latency kernels (``ll_structure``: ``per-rank`` or ``slowest-rank``, see
    :func:`_modelled`): the NIC rate is fixed, the two points fit the fixed cost a + c log2 P.
    """
    published = published or load_published()
    pts = _calibration_points(published)
    (n_lo, n_hi) = sorted(ep for k, ep in pts if k == "normal")
    (l_lo, l_hi) = sorted(ep for k, ep in pts if k == "ll")
    lo = _normal_unit(_find(scenarios, "normal", n_lo), structure)
    hi = _normal_unit(_find(scenarios, "normal", n_hi), structure)
    # the benchmark's figure = logical bytes / time; seeds: mean bytes over mean time
    t_lo = lo["logical"].mean() / pts[("normal", n_lo)]
    t_hi = hi["logical"].mean() / pts[("normal", n_hi)]

    def hi_time(nvl_bw, rdma_bw, overhead):
        return overhead + np.maximum(hi["rdma"] / rdma_bw, hi["nvl"] / nvl_bw).mean()

    if lo["rdma"].any():
        raise ValueError(f"EP{n_lo} must fit inside one node (NVLink only)")
    overhead = 0.0
    if structure == "stage+overhead":
        rdma_bw = nic_rate

        def gap(nvl_bw):  # EP8 fixes the overhead for a given NVLink rate; EP16 must follow
            return hi_time(nvl_bw, rdma_bw, t_lo - lo["nvl"].mean() / nvl_bw) - t_hi

        nvl_bw = _root(gap, 10 * GB, 10_000 * GB, f"normal EP{n_lo} + EP{n_hi}")
        overhead = t_lo - lo["nvl"].mean() / nvl_bw
    else:
        _normal_dispatcher(structure)  # validates the name
        nvl_bw = lo["nvl"].mean() / t_lo
        try:
            rdma_bw = _root(lambda r: hi_time(nvl_bw, r, 0.0) - t_hi, 0.1 * GB, 10_000 * GB,
                            f"normal EP{n_hi}")
        except ValueError:
            rdma_bw = nic_rate  # NVLink alone is slower than published: the fit cannot match
    ll_rate = nic_rate
    u_lo = _ll_unit(_find(scenarios, "ll", l_lo), ll_structure)
    u_hi = _ll_unit(_find(scenarios, "ll", l_hi), ll_structure)
    alpha_lo = pts[("ll", l_lo)] - u_lo / ll_rate
    alpha_hi = pts[("ll", l_hi)] - u_hi / ll_rate
    slope = max((alpha_hi - alpha_lo) / (math.log2(l_hi) - math.log2(l_lo)), 0.0)
    intercept = alpha_lo - slope * math.log2(l_lo)
    return CommParams(
        nvl_bw=nvl_bw, rdma_bw=rdma_bw, ll_rdma_bw=ll_rate, normal_overhead=max(overhead, 0.0),
        ll_alpha=intercept, ll_alpha_log2=slope,
        source=(f"fit_deepep(structure={structure!r}, ll_structure={ll_structure!r}) to DeepEP "
                f"README calibration points {sorted(pts)}, routing seeds "
                f"{sorted({sc.seed for sc in scenarios})}; NIC rate {nic_rate / GB:g} GB/s "
                f"fixed from hardware"),
    )


def predict_deepep(params: CommParams, scenarios: list[Scenario], published: dict | None = None,
                   structure: str = "stage+overhead", ll_structure: str = "per-rank") -> list[dict]:
    """Predicted vs published for every DeepEP figure (rows marked ``calibration``).

    ``predicted`` averages the seeds in ``scenarios`` (mean bytes over mean time for the
    bandwidths, mean time for the latencies); ``error_pct_seeds`` is the range of the error
    over the single seeds.
    """
    published = published or load_published()
    rows = []
    for kernel, key, unit in (("normal", "normal", "GB/s"), ("low-latency", "low_latency", "us")):
        for row in published[key]:
            scs = _find(scenarios, "normal" if kernel == "normal" else "ll", row["ep"])
            ms = [_modelled(sc, params, structure, ll_structure) for sc in scs]
            t = np.array([m[f"{row['direction']}_s"] for m in ms])
            if kernel == "normal":
                scale = ms[0]["scale"] if row["direction"] == "combine" else 1.0
                logical = np.array([m["logical"] for m in ms]) * scale
                pred, per_seed = logical.mean() / t.mean() / GB, logical / t / GB
                value = row["gbps"]
            else:
                pred, per_seed = t.mean() * 1e6, t * 1e6
                value = row["us"]
            out = _row(kernel, row, value, pred, unit, ms[0]["bottleneck"])
            err = 100.0 * (per_seed - value) / value
            out["error_pct_seeds"] = [float(err.min()), float(err.max())]
            rows.append(out)
    return rows


def _row(kernel, row, published, predicted, unit, bottleneck) -> dict:
    return {
        "kernel": kernel, "ep": row["ep"], "direction": row["direction"], "unit": unit,
        "published": float(published), "predicted": float(predicted),
        "error_pct": 100.0 * (predicted - published) / published,
        "calibration": bool(row.get("calibration", False)), "bottleneck": bottleneck,
    }


def params_to_yaml(params: CommParams) -> dict:
    return {"comm": {k: (float(v) if isinstance(v, (int, float)) else v)
                     for k, v in params.model_dump().items() if v is not None}}


# ---------------------------------------------------------------------------------------------
# Measure this machine
# ---------------------------------------------------------------------------------------------
def _best_time(fn, repeats: int = 5, min_time: float = 0.02) -> float:
    """Best-of-``repeats`` seconds of one call; each sample loops until ``min_time`` passes."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        best = min(best, el / n)
    return best


def measure_cpu_gemm(sizes=(64, 128, 256, 512, 1024, 2048), dtype=np.float32) -> list[dict]:
    """FLOP/s of square numpy GEMMs by size (2 n^3 FLOPs each)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        t = _best_time(lambda a=a, b=b: a @ b, repeats=3)
        rows.append({"operation": "gemm", "shape": f"{n}x{n}x{n}", "tokens": n,
                     "dtype": np.dtype(dtype).name, "seconds": t, "flops_per_s": 2 * n**3 / t})
    return rows


def measure_memcpy(sizes=(2**12, 2**16, 2**20, 2**24, 2**26)) -> list[dict]:
    """Copy rate by size (bytes read + written counted once: the size moved)."""
    rows = []
    for n in sizes:
        src = np.ones(n, dtype=np.uint8)
        dst = np.empty_like(src)
        t = _best_time(lambda s=src, d=dst: np.copyto(d, s))
        rows.append({"bytes": n, "seconds": t, "bytes_per_s": n / t})
    return rows


def measure_disk_read(directory: str | None = None, nbytes: int = 256 * 2**20,
                      block: int = 4 * 2**20) -> dict:
    """Sequential read rate of a fresh file after dropping it from the page cache.

    Uses ``posix_fadvise(DONTNEED)`` after an fsync, which empties the cache for that file
    without root; ``cold`` reports whether the call was available.
    """
    directory = directory or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(dir=directory, prefix="moesim-calib-")
    try:
        chunk = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // block):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        cold = hasattr(os, "posix_fadvise")
        with open(path, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            total = 0
            while True:
                data = f.read(block)
                if not data:
                    break
                total += len(data)
            t = time.perf_counter() - t0
        return {"bytes": total, "seconds": t, "bytes_per_s": total / t, "cold": cold,
                "directory": directory}
    finally:
        os.unlink(path)


def measure_cuda(sizes=(2**20, 2**24, 2**28)) -> dict | None:
    """Host<->device copies (pinned, pageable), GEMM and grouped GEMM on the first CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    out: dict = {"name": torch.cuda.get_device_name(0), "copies": [], "gemm": [], "grouped": []}

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    for n in sizes:
        for pinned in (True, False):
            host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            gpu = torch.empty(n, dtype=torch.uint8, device=dev)
            h2d = timed(lambda g=gpu, h=host: g.copy_(h, non_blocking=True))
            d2h = timed(lambda g=gpu, h=host: h.copy_(g, non_blocking=True))
            out["copies"].append({"bytes": n, "pinned": pinned, "h2d_bytes_per_s": n / h2d,
                                  "d2h_bytes_per_s": n / d2h})
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timed(lambda s=src, d=dst: d.copy_(s))
    out["device_copy_bytes_per_s"] = 2 * n / t  # read + write traffic of a device copy
    del src, dst
    hidden, inter = 4096, 2048
    for m in (1, 16, 64, 256, 1024, 4096, 16384):
        a = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
        w = torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16)
        t = timed(lambda a=a, w=w: a @ w)
        out["gemm"].append({"operation": "gemm", "shape": f"{hidden}x{inter}", "tokens": m,
                            "dtype": "bf16", "seconds": t, "flops_per_s": 2 * m * hidden * inter / t})
    experts = 8
    ws = torch.randn(experts, hidden, inter, device=dev, dtype=torch.bfloat16)
    for m in (1, 16, 64, 256, 1024, 4096):
        xs = torch.randn(experts, m, hidden, device=dev, dtype=torch.bfloat16)
        t = timed(lambda xs=xs: torch.bmm(xs, ws))  # equal groups: batched GEMM
        out["grouped"].append({"operation": "grouped_gemm", "shape": f"{experts}x{hidden}x{inter}",
                               "tokens": m, "dtype": "bf16", "seconds": t,
                               "flops_per_s": 2 * experts * m * hidden * inter / t})
    out["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return out


def measure_machine(disk_dir: str | None = None, quick: bool = False) -> dict:
    """Run every measurement and return the profile (a dict ready for YAML)."""
    gemm_sizes = (64, 256, 1024) if quick else (64, 128, 256, 512, 1024, 2048)
    gemm = measure_cpu_gemm(gemm_sizes)
    copy = measure_memcpy((2**12, 2**16, 2**20, 2**24) if quick else
                          (2**12, 2**16, 2**20, 2**24, 2**26))
    disk = measure_disk_read(disk_dir, nbytes=(32 if quick else 256) * 2**20)
    peak_copy = max(r["bytes_per_s"] for r in copy)
    host = platform.node() or "this-machine"
    cpu = {
        "name": f"measured-{host}-cpu", "kind": "cpu",
        "flops": {"fp32": max(r["flops_per_s"] for r in gemm)},
        "memory": {"name": "dram", "kind": "dram", "capacity": float(_total_memory()),
                   "read_bw": peak_copy, "source": "measure_memcpy (largest-rate size)"},
        "compute_efficiency": 1.0, "memory_efficiency": 1.0, "cores": os.cpu_count(),
        "source": f"moesim calibrate on {host} ({platform.processor() or platform.machine()})",
    }
    profile = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": host,
        "device": cpu,
        "links": {"storage": {
            "name": "storage-measured", "kind": "storage", "bandwidth": disk["bytes_per_s"],
            "source": f"cold sequential read in {disk['directory']} (page cache dropped: "
                      f"{disk['cold']})"},
            "memcpy": {
                "name": "memcpy-measured", "kind": "memory", "bandwidth": peak_copy,
                "efficiency": [[r["bytes"], min(1.0, r["bytes_per_s"] / peak_copy)]
                               for r in copy],
                "source": "measure_memcpy by size"}},
        "tables": [{k: r[k] for k in ("operation", "shape", "tokens", "dtype", "seconds")}
                   for r in gemm],
        "raw": {"cpu_gemm": gemm, "memcpy": copy, "disk": disk},
    }
    cuda = measure_cuda()
    if cuda:
        best_gemm = max(r["flops_per_s"] for r in cuda["gemm"])
        pinned = [r for r in cuda["copies"] if r["pinned"]]
        profile["accelerator"] = {
            "name": cuda["name"], "kind": "gpu", "flops": {"bf16": best_gemm},
            "memory": {"name": "hbm", "kind": "hbm", "capacity": float(cuda["memory_bytes"]),
                       "read_bw": cuda["device_copy_bytes_per_s"],
                       "source": "capacity from torch; rate = 1 GiB device copy (read+write)"},
            "compute_efficiency": 1.0, "source": "moesim calibrate: best measured bf16 GEMM"}
        profile["links"]["host_to_device"] = {
            "name": "h2d-measured", "kind": "pcie",
            "bandwidth": max(r["h2d_bytes_per_s"] for r in pinned),
            "source": "torch pinned host->device copy"}
        profile["tables"] += [{k: r[k] for k in ("operation", "shape", "tokens", "dtype",
                                                 "seconds")}
                              for r in cuda["gemm"] + cuda["grouped"]]
        profile["raw"]["cuda"] = cuda
    return profile


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


@dataclass
class Profile:
    """A measured machine as the models use it (see :func:`load_profile`)."""

    device: object  # hardware.Device of the host CPU
    accelerator: object | None  # hardware.Device of the GPU, when CUDA was measured
    links: dict  # name -> hardware.Link (storage, memcpy, host_to_device)
    table: object  # cost.CostTable of the measured operation times


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by ``moesim calibrate``; errors name the bad field."""
    import yaml

    from moesim.cost import CostTable
    from moesim.hardware import Device, HardwareError, Link, _validated

    path = Path(path)
    if not path.exists():
        raise HardwareError(f"{path}: no such profile")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "device" not in data:
        raise HardwareError(f"{path}: not a moesim calibrate profile (no 'device')")
    device = _validated(Device, data["device"], str(path))
    acc = _validated(Device, data["accelerator"], str(path)) if data.get("accelerator") else None
    links = {k: _validated(Link, v, f"{path}: links.{k}")
             for k, v in (data.get("links") or {}).items()}
    return Profile(device, acc, links, CostTable.from_rows(data.get("tables") or []))
