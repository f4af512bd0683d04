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
@dataclass
class Scenario:
    kernel: str  # "normal" | "ll"
    ep: int
    counts: comm.CommCounts
    cluster: Cluster


def deepep_scenarios(normal_eps=(8, 16, 32, 64), ll_eps=(8, 16, 32, 64, 128, 256),
                     seed: int = 0) -> list[Scenario]:
    """Routings exactly as DeepEP's tests draw them, on the H800 test bed, contiguous experts."""
    base = get_cluster("h800-ib")
    out = []
    for kernel, eps, tokens in (("normal", normal_eps, NORMAL_TOKENS), ("ll", ll_eps, LL_TOKENS)):
        for ep in eps:
            cluster = base.for_ep(ep)
            experts = (256 // ep) * ep
            src, ids = comm.deepep_test_routing(
                ep, tokens, experts, TOP_K, base.gpus_per_node,
                node_limited=(kernel == "normal"), seed=seed)
            counts = comm.counts_from_tokens(src, ids, comm.Placement.contiguous(experts, ep),
                                             cluster)
            out.append(Scenario(kernel, ep, counts, cluster))
    return out


def _run(sc: Scenario, params: CommParams, dispatcher: comm.Dispatcher | None = None):
    cluster = sc.cluster.model_copy(update={"comm": params})
    name = "deepep-normal" if sc.kernel == "normal" else "deepep-ll"
    d = dispatcher or comm.get_dispatcher(name)
    drow, crow = comm.wire_rows(name, HIDDEN, "fp8", "bf16")
    return d.run(sc.counts, cluster, drow, crow)


def _unit_terms(sc: Scenario, dispatcher=None) -> dict[str, float]:
    """Bytes of each link term (run at 1 B/s and no fixed cost, so seconds = bytes)."""
    unit = CommParams(nvl_bw=1.0, rdma_bw=1.0, ll_rdma_bw=1.0, normal_overhead=0.0,
                      ll_alpha=0.0, ll_alpha_log2=0.0)
    r = _run(sc, unit, dispatcher)
    return r.terms, r.logical_bytes


def _find(scenarios, kernel, ep) -> Scenario:
    for sc in scenarios:
        if sc.kernel == kernel and sc.ep == ep:
            return sc
    raise ValueError(f"no {kernel} scenario at EP{ep}")


def _calibration_points(published: dict) -> dict[tuple[str, int], float]:
    pts = {}
    for row in published["normal"]:
        if row.get("calibration"):
            pts[("normal", row["ep"])] = row["gbps"] * GB
    for row in published["low_latency"]:
        if row.get("calibration"):
            pts[("ll", row["ep"])] = row["us"] * 1e-6
    return pts


# ---------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------
def fit_deepep(scenarios: list[Scenario], published: dict | None = None,
               nic_rate: float = CX7_RATE, structure: str = "stage+overhead") -> CommParams:
    """Fit the DeepEP constants to the four calibration numbers.

    ``structure`` (the default is the model moesim uses; the others are kept for comparison):

    - ``stage+overhead``: RDMA stage rows include the own node; NIC rate fixed at ``nic_rate``;
      free: NVLink rate, normal-kernel fixed cost (EP8 + EP16), LL fixed cost a + c log2 P
      (EP8 + EP256).
    - ``stage``: as above without a fixed cost; free: NVLink rate (EP8), NIC rate (EP16).
    - ``physical``: RDMA stage counts only other nodes' rows (formula 2 read literally);
      free: NVLink rate (EP8), NIC rate (EP16); no fixed cost.
    The two low-latency points always fit a + c log2 P on top of the NIC rate.
    """
    published = published or load_published()
    pts = _calibration_points(published)
    (n_lo, n_hi) = sorted(ep for k, ep in pts if k == "normal")
    (l_lo, l_hi) = sorted(ep for k, ep in pts if k == "ll")
    normal = comm.DeepEPNormal()
    if structure == "physical":
        normal = type("PhysicalDeepEPNormal", (comm.DeepEPNormal,),
                      {"own_node_in_rdma_stage": False})()
    lo_terms, lo_logical = _unit_terms(_find(scenarios, "normal", n_lo), normal)
    hi_terms, hi_logical = _unit_terms(_find(scenarios, "normal", n_hi), normal)
    t_lo = lo_logical / pts[("normal", n_lo)]
    t_hi = hi_logical / pts[("normal", n_hi)]
    nvl_lo = max(v for k, v in lo_terms.items() if k.startswith("nvl"))
    nvl_hi = max(v for k, v in hi_terms.items() if k.startswith("nvl"))
    rdma_hi = max(v for k, v in hi_terms.items() if k.startswith("rdma"))
    overhead = 0.0
    if structure == "stage+overhead":
        # RDMA binds at EP16 (checked below): overhead = t16 - rdma/B_IB, B_NVL from EP8
        overhead = t_hi - rdma_hi / nic_rate
        nvl_bw = nvl_lo / (t_lo - overhead)
        if nvl_hi / nvl_bw > rdma_hi / nic_rate:  # NVLink binds at both sizes instead
            nvl_bw = (nvl_hi - nvl_lo) / (t_hi - t_lo)
            overhead = t_lo - nvl_lo / nvl_bw
        rdma_bw = nic_rate
    else:
        nvl_bw = nvl_lo / t_lo
        # the NIC rate that makes EP16 take t_hi, if RDMA can bind there at all
        rdma_bw = rdma_hi / t_hi if nvl_hi / nvl_bw < t_hi else float("inf")
        if not math.isfinite(rdma_bw):
            rdma_bw = nic_rate  # NVLink alone is slower than published: the fit cannot match
    ll_rate = rdma_bw if structure == "stage+overhead" else nic_rate
    bytes_lo = max(_unit_terms(_find(scenarios, "ll", l_lo))[0].values())
    bytes_hi = max(_unit_terms(_find(scenarios, "ll", l_hi))[0].values())
    alpha_lo = pts[("ll", l_lo)] - bytes_lo / ll_rate
    alpha_hi = pts[("ll", l_hi)] - bytes_hi / ll_rate
    slope = max((alpha_hi - alpha_lo) / (math.log2(l_hi) - math.log2(l_lo)), 0.0)
    intercept = alpha_lo - slope * math.log2(l_lo)
    return CommParams(
        nvl_bw=nvl_bw, rdma_bw=rdma_bw, ll_rdma_bw=ll_rate, normal_overhead=max(overhead, 0.0),
        ll_alpha=intercept, ll_alpha_log2=slope,
        source=(f"fit_deepep(structure={structure!r}) to DeepEP README calibration points "
                f"{sorted(pts)}; NIC rate {nic_rate / GB:g} GB/s fixed from hardware"),
    )


def predict_deepep(params: CommParams, scenarios: list[Scenario], published: dict | None = None,
                   structure: str = "stage+overhead") -> list[dict]:
    """Predicted vs published for every DeepEP figure (rows marked ``calibration``)."""
    published = published or load_published()
    normal = None
    if structure == "physical":
        normal = type("PhysicalDeepEPNormal", (comm.DeepEPNormal,),
                      {"own_node_in_rdma_stage": False})()
    rows = []
    for row in published["normal"]:
        r = _run(_find(scenarios, "normal", row["ep"]), params, normal)
        pred = r.dispatch_logical_gbps if row["direction"] == "dispatch" else r.combine_logical_gbps
        rows.append(_row("normal", row, row["gbps"], pred, "GB/s", r.bottleneck))
    for row in published["low_latency"]:
        r = _run(_find(scenarios, "ll", row["ep"]), params)
        pred = (r.dispatch_s if row["direction"] == "dispatch" else r.combine_s) * 1e6
        rows.append(_row("low-latency", row, row["us"], pred, "us", r.bottleneck))
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
