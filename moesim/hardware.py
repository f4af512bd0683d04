"""Hardware: devices, memory tiers, links, machines and clusters, with presets and their sources.

Units inside: bytes, bytes/s (per direction), FLOP/s, seconds. Spec-sheet figures are peak rates;
``Link.bandwidth`` is the rate a transfer achieves (measured or published as achievable), and
``Link.peak`` the line rate. Every preset names its source. Clusters, machines and devices load
from YAML (a preset name, or a file that names presets and overrides fields) and are validated
with pydantic; a bad file gives one ``HardwareError`` line naming the field.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moesim.errors import MoesimError, unknown_name

GB = 1e9
GiB = 2**30
TFLOPS = 1e12


class HardwareError(MoesimError):
    """An unknown hardware preset or an inconsistent device/cluster description."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class MemoryTier(_Spec):
    """One level of the memory hierarchy a model's weights can live in."""

    name: str
    kind: Literal["hbm", "gddr", "dram", "lpddr", "nvme", "ufs", "sram"]
    capacity: float = Field(gt=0, description="bytes")
    read_bw: float = Field(gt=0, description="sequential read, bytes/s")
    write_bw: float | None = Field(default=None, gt=0, description="bytes/s (default: read_bw)")
    latency: float = Field(default=0.0, ge=0, description="seconds per access")
    source: str = ""

    def read_time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.read_bw if nbytes > 0 else 0.0


class Link(_Spec):
    """A data path with a per-direction rate, a latency and a message-size efficiency curve.

    ``efficiency`` is a table of (message bytes, fraction of ``bandwidth`` reached), interpolated
    log-linearly in size and clamped at both ends; empty means 1.0 at every size (the latency
    term alone then models small messages).
    """

    name: str
    kind: Literal["nvlink", "pcie", "ib", "roce", "ethernet", "storage", "c2c", "memory"]
    bandwidth: float = Field(gt=0, description="achievable bytes/s per direction")
    peak: float | None = Field(default=None, gt=0, description="line rate bytes/s per direction")
    latency: float = Field(default=0.0, ge=0, description="seconds")
    efficiency: tuple[tuple[float, float], ...] = ()
    source: str = ""

    @model_validator(mode="after")
    def _check_curve(self):
        sizes = [s for s, _ in self.efficiency]
        if sizes != sorted(sizes) or any(s <= 0 for s in sizes):
            raise ValueError("efficiency sizes must be positive and increasing")
        if any(not 0 < e <= 1.0 for _, e in self.efficiency):
            raise ValueError("efficiency values must be in (0, 1]")
        return self

    def efficiency_at(self, nbytes: float) -> float:
        if not self.efficiency:
            return 1.0
        sizes = [s for s, _ in self.efficiency]
        effs = [e for _, e in self.efficiency]
        if nbytes <= sizes[0]:
            return effs[0]
        if nbytes >= sizes[-1]:
            return effs[-1]
        i = bisect.bisect_right(sizes, nbytes)
        x0, x1 = math.log(sizes[i - 1]), math.log(sizes[i])
        w = (math.log(nbytes) - x0) / (x1 - x0)
        return effs[i - 1] + w * (effs[i] - effs[i - 1])

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` as one message: latency + bytes / (rate x efficiency)."""
        if nbytes <= 0:
            return 0.0
        return self.latency + nbytes / (self.bandwidth * self.efficiency_at(nbytes))


class Device(_Spec):
    """A compute device: GPU, CPU socket, SoC or NPU, with its main memory."""

    name: str
    kind: Literal["gpu", "cpu", "soc"]
    flops: dict[str, float] = Field(description="dense peak FLOP/s by dtype")
    memory: MemoryTier
    compute_efficiency: float = Field(
        default=0.7, gt=0, le=1, description="fraction of peak a large GEMM reaches"
    )
    memory_efficiency: float = Field(
        default=0.85, gt=0, le=1, description="fraction of memory bandwidth a stream reaches"
    )
    gemm_tile_m: int = Field(default=64, ge=1, description="GEMM row tile (tokens)")
    kernel_overhead: float = Field(default=5e-6, ge=0, description="seconds per kernel launch")
    num_sms: int | None = None
    cores: int | None = None
    source: str = ""

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; fp8/int8 fall back to bf16 where the device lacks them."""
        for key in (dtype, {"fp8": "bf16", "int8": "bf16", "fp16": "bf16", "int4": "bf16",
                            "mxfp4": "bf16", "q4_k_m": "bf16"}.get(dtype, "bf16"), "fp32"):
            if key in self.flops:
                return self.flops[key]
        raise HardwareError(f"device {self.name!r} lists no FLOP rate for {dtype!r} or bf16")


# ---------------------------------------------------------------------------------------------
# Machines (one box: GPUs + host + storage) and clusters
# ---------------------------------------------------------------------------------------------
class Machine(_Spec):
    """One computer as the offloading engine sees it: accelerator, host CPU, tiers and links."""

    name: str
    accelerator: Device | None = None  # None: CPU-only / SoC-only machine
    host: Device
    tiers: tuple[MemoryTier, ...]
    host_link: Link | None = None  # host DRAM <-> accelerator memory (PCIe); None if unified
    storage_link: Link
    source: str = ""

    def tier(self, kind: str) -> MemoryTier:
        for t in self.tiers:
            if t.kind == kind or t.name == kind:
                return t
        raise HardwareError(f"machine {self.name!r} has no memory tier {kind!r}")


class CommParams(_Spec):
    """Constants of the all-to-all model; defaults follow the links, fits override them.

    ``nvl_bw`` / ``rdma_bw``: rates a dispatch kernel achieves on NVLink and on one NIC.
    ``normal_overhead``: fixed cost of one hierarchical (DeepEP-normal-style) kernel call.
    ``ll_alpha`` + ``ll_alpha_log2`` * log2(P): fixed cost of one low-latency kernel at P ranks.
    ``a2a_latency``: per-call latency of a flat all-to-all (NCCL); ``per_peer``: per peer.
    """

    nvl_bw: float | None = Field(default=None, gt=0)
    rdma_bw: float | None = Field(default=None, gt=0)
    ll_rdma_bw: float | None = Field(default=None, gt=0)
    normal_overhead: float = Field(default=0.0, ge=0)
    ll_alpha: float = 0.0
    ll_alpha_log2: float = Field(default=0.0, ge=0)
    a2a_latency: float | None = Field(default=None, ge=0)
    per_peer: float = Field(default=0.0, ge=0)
    source: str = ""


class Cluster(_Spec):
    """``num_nodes`` x ``gpus_per_node`` GPUs; NVLink inside a node, NICs across nodes.

    Ranks are node-major: rank r sits on node r // gpus_per_node at local index
    r % gpus_per_node. With a rail-optimised fabric, local index l of every node shares leaf
    switch (rail) l, so same-rail traffic crosses one switch.
    """

    name: str
    gpu: Device
    num_nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    nvlink: Link  # per GPU, per direction, through the node's NVSwitch
    nic: Link | None = None  # one NIC; None for a single node without scale-out
    nics_per_node: int = Field(default=0, ge=0)
    rail_optimized: bool = True
    pcie: Link | None = None
    host: Device | None = None
    comm: CommParams = CommParams()
    source: str = ""

    @model_validator(mode="after")
    def _check(self):
        if self.num_nodes > 1 and (self.nic is None or self.nics_per_node == 0):
            raise ValueError(f"{self.num_nodes} nodes need a 'nic' and 'nics_per_node' >= 1")
        if self.nics_per_node and (
            self.gpus_per_node % self.nics_per_node and self.nics_per_node % self.gpus_per_node
        ):
            raise ValueError(
                f"nics_per_node={self.nics_per_node} must divide or be a multiple of "
                f"gpus_per_node={self.gpus_per_node}"
            )
        return self

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def nics_per_gpu(self) -> float:
        return self.nics_per_node / self.gpus_per_node

    def node_of(self, rank):
        return rank // self.gpus_per_node

    def local_of(self, rank):
        return rank % self.gpus_per_node

    def nvl_bw(self) -> float:
        return self.comm.nvl_bw or self.nvlink.bandwidth

    def rdma_bw(self) -> float:
        """Rate of one NIC (a flat all-to-all cannot aggregate several NICs per GPU)."""
        if self.comm.rdma_bw:
            return self.comm.rdma_bw
        return self.nic.bandwidth if self.nic is not None else self.nvl_bw()

    def for_ep(self, ep: int) -> Cluster:
        """The sub-cluster of ``ep`` ranks an EP group occupies (whole nodes, or part of one)."""
        g = self.gpus_per_node
        if ep < 1:
            raise HardwareError(f"EP size must be >= 1, got {ep}")
        if ep <= g:
            if g % ep:
                raise HardwareError(
                    f"EP {ep} inside one node must divide gpus_per_node={g} of {self.name!r}"
                )
            nics = self.nics_per_node * ep // g if self.nics_per_node else 0
            return self.model_copy(update={"num_nodes": 1, "gpus_per_node": ep,
                                           "nics_per_node": nics})
        if ep % g:
            raise HardwareError(
                f"EP {ep} is not a multiple of gpus_per_node={g} of cluster {self.name!r}; "
                f"use a multiple of {g}"
            )
        return self.model_copy(update={"num_nodes": ep // g})


# ---------------------------------------------------------------------------------------------
# Presets. Rates are per direction. "spec" = vendor data sheet; "measured" = published run.
# ---------------------------------------------------------------------------------------------
def _hbm(name, cap_gb, bw_tbs, src):
    return MemoryTier(name=name, kind="hbm", capacity=cap_gb * GB, read_bw=bw_tbs * 1e12,
                      source=src)


_H100_SRC = "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS BF16 / 1979 FP8 dense, 80 GB HBM3 3.35 TB/s"
_H200_SRC = "NVIDIA H200 datasheet (SXM): H100 compute, 141 GB HBM3e at 4.8 TB/s"
_H800_SRC = "NVIDIA H800 SXM5 (H100 compute, 80 GB HBM3 3.35 TB/s, NVLink 400 GB/s bidirectional); DeepEP README"
_A100_SRC = "NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS BF16 dense, HBM2e 2.039 TB/s"
_L40S_SRC = "NVIDIA L40S datasheet: 362 TFLOPS BF16 / 733 FP8 dense, 48 GB GDDR6 864 GB/s, PCIe Gen4 x16"
_4090_SRC = ("NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 165.2 TFLOPS BF16 with FP32 "
             "accumulate, 330.3 FP8 dense; 24 GB GDDR6X 1008 GB/s")
_PRO6000_SRC = ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition datasheet: 96 GB GDDR7 1792 GB/s, "
                "4000 FP4 AI TOPS (sparse); dense BF16/FP8 derived as 4000/2/4 and 4000/2/2")
_ORIN_SRC = ("NVIDIA Jetson AGX Orin 64GB data sheet: 204.8 GB/s LPDDR5, GPU 170 sparse INT8 TOPS "
             "(85 dense; FP16 derived as half of dense INT8), 12 Arm Cortex-A78AE cores")

GPUS: dict[str, Device] = {
    "h100-sxm": Device(
        name="h100-sxm", kind="gpu", flops={"bf16": 989.4 * TFLOPS, "fp8": 1978.9 * TFLOPS,
                                            "fp32": 67 * TFLOPS},
        memory=_hbm("hbm3", 80, 3.35, _H100_SRC), num_sms=132, source=_H100_SRC),
    "h200": Device(
        name="h200", kind="gpu", flops={"bf16": 989.4 * TFLOPS, "fp8": 1978.9 * TFLOPS,
                                        "fp32": 67 * TFLOPS},
        memory=_hbm("hbm3e", 141, 4.8, _H200_SRC), num_sms=132, source=_H200_SRC),
    "h800": Device(
        name="h800", kind="gpu", flops={"bf16": 989.4 * TFLOPS, "fp8": 1978.9 * TFLOPS,
                                        "fp32": 67 * TFLOPS},
        memory=_hbm("hbm3", 80, 3.35, _H800_SRC), num_sms=132, source=_H800_SRC),
    "a100-sxm": Device(
        name="a100-sxm", kind="gpu", flops={"bf16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS},
        memory=_hbm("hbm2e", 80, 2.039, _A100_SRC), num_sms=108, source=_A100_SRC),
    "l40s": Device(
        name="l40s", kind="gpu", flops={"bf16": 362.05 * TFLOPS, "fp8": 733 * TFLOPS,
                                        "fp32": 91.6 * TFLOPS},
        memory=MemoryTier(name="gddr6", kind="gddr", capacity=48 * GB, read_bw=864 * GB,
                          source=_L40S_SRC),
        num_sms=142, source=_L40S_SRC),
    "rtx-4090": Device(
        name="rtx-4090", kind="gpu", flops={"bf16": 165.2 * TFLOPS, "fp8": 330.3 * TFLOPS,
                                            "fp32": 82.6 * TFLOPS},
        memory=MemoryTier(name="gddr6x", kind="gddr", capacity=24 * GB, read_bw=1008 * GB,
                          source=_4090_SRC),
        num_sms=128, source=_4090_SRC),
    "rtx-pro-6000": Device(
        name="rtx-pro-6000", kind="gpu", flops={"bf16": 500 * TFLOPS, "fp8": 1000 * TFLOPS,
                                                "fp32": 125 * TFLOPS},
        memory=MemoryTier(name="gddr7", kind="gddr", capacity=96 * GB, read_bw=1792 * GB,
                          source=_PRO6000_SRC),
        num_sms=188, source=_PRO6000_SRC),
    "jetson-agx-orin": Device(
        name="jetson-agx-orin", kind="soc", flops={"bf16": 42.5 * TFLOPS, "fp32": 5.3 * TFLOPS},
        memory=MemoryTier(name="lpddr5", kind="lpddr", capacity=64 * GB, read_bw=204.8 * GB,
                          source=_ORIN_SRC),
        memory_efficiency=0.7, source=_ORIN_SRC),
}

_XEON_SRC = ("Intel Xeon Platinum 8480+ (56 cores, AMX): 8 ch DDR5-4800 = 307 GB/s per socket; "
             "AMX BF16 peak derived as 56 cores x 2.0 GHz x 1024 BF16 FLOP/cycle")
_EPYC_SRC = ("AMD EPYC 9654 (96 Zen 4 cores, AVX-512 BF16): 12 ch DDR5-4800 = 460.8 GB/s per "
             "socket; BF16 peak derived as 96 x 2.4 GHz x 64 FLOP/cycle")
_I9_SRC = ("Intel Core i9-14900K: 2 ch DDR5-5600 = 89.6 GB/s; FP32 AVX2 peak derived as "
           "8 P-cores x 5.7 GHz x 32 + 16 E-cores x 4.4 GHz x 16 FLOP/cycle")
_SD8G3_SRC = ("Qualcomm Snapdragon 8 Gen 3: LPDDR5X-4800 (9.6 GT/s, 64-bit) = 76.8 GB/s; 1+5+2 "
              "Cortex-X4/A720/A520 cores; CPU FP32 NEON peak derived as ~0.25 TFLOPS")

CPUS: dict[str, Device] = {
    "xeon-8480": Device(
        name="xeon-8480", kind="cpu", flops={"bf16": 114.7 * TFLOPS, "fp32": 7.2 * TFLOPS},
        memory=MemoryTier(name="ddr5", kind="dram", capacity=1024 * GB, read_bw=307.2 * GB,
                          source=_XEON_SRC),
        compute_efficiency=0.5, memory_efficiency=0.75, cores=56, kernel_overhead=2e-6,
        source=_XEON_SRC),
    "epyc-9654": Device(
        name="epyc-9654", kind="cpu", flops={"bf16": 14.7 * TFLOPS, "fp32": 7.4 * TFLOPS},
        memory=MemoryTier(name="ddr5", kind="dram", capacity=1536 * GB, read_bw=460.8 * GB,
                          source=_EPYC_SRC),
        compute_efficiency=0.5, memory_efficiency=0.75, cores=96, kernel_overhead=2e-6,
        source=_EPYC_SRC),
    "i9-14900k": Device(
        name="i9-14900k", kind="cpu", flops={"fp32": 2.59 * TFLOPS},
        memory=MemoryTier(name="ddr5", kind="dram", capacity=128 * GB, read_bw=89.6 * GB,
                          source=_I9_SRC),
        compute_efficiency=0.5, memory_efficiency=0.75, cores=24, kernel_overhead=2e-6,
        source=_I9_SRC),
    "snapdragon-8-gen3": Device(
        name="snapdragon-8-gen3", kind="soc", flops={"fp32": 0.25 * TFLOPS},
        memory=MemoryTier(name="lpddr5x", kind="lpddr", capacity=12 * GB, read_bw=76.8 * GB,
                          source=_SD8G3_SRC),
        compute_efficiency=0.5, memory_efficiency=0.6, cores=8, kernel_overhead=5e-6,
        source=_SD8G3_SRC),
}

LINKS: dict[str, Link] = {
    "nvlink4-h100": Link(
        name="nvlink4-h100", kind="nvlink", bandwidth=370 * GB, peak=450 * GB, latency=1e-6,
        source="NVLink4 900 GB/s bidirectional line rate; ~370 GB/s effective for NCCL P2P "
               "(nccl-tests #212; SimAI 18 x 20.6 GB/s)"),
    "nvlink4-h800": Link(
        name="nvlink4-h800", kind="nvlink", bandwidth=160 * GB, peak=200 * GB, latency=1e-6,
        source="H800 NVLink 400 GB/s bidirectional (8 links); ~160 GB/s achievable (DeepEP "
               "README, DeepSeek-V3 report)"),
    "nvlink3-a100": Link(
        name="nvlink3-a100", kind="nvlink", bandwidth=230 * GB, peak=300 * GB, latency=1e-6,
        source="NVLink3 600 GB/s bidirectional; ~230 GB/s effective (NCCL maintainers)"),
    "pcie3-x16": Link(
        name="pcie3-x16", kind="pcie", bandwidth=12 * GB, peak=15.75 * GB, latency=5e-6,
        source="PCIe 3.0 x16 15.75 GB/s per direction; ~12 GB/s observed H2D (Expert Buffering)"),
    "pcie4-x16": Link(
        name="pcie4-x16", kind="pcie", bandwidth=23.9 * GB, peak=31.5 * GB, latency=5e-6,
        source="PCIe 4.0 x16 31.5 GB/s per direction; 23.9 GB/s measured pinned H2D on RTX 4090 "
               "+ i9-14900K (ProMoE)"),
    "pcie5-x16": Link(
        name="pcie5-x16", kind="pcie", bandwidth=53 * GB, peak=63 * GB, latency=5e-6,
        source="PCIe 5.0 x16 63 GB/s per direction; ~53 GB/s pinned H2D typical of H100 hosts "
               "(nvbandwidth)"),
    "cx7-ib-400g": Link(
        name="cx7-ib-400g", kind="ib", bandwidth=48.5 * GB, peak=50 * GB, latency=3e-6,
        source="ConnectX-7 NDR 400 Gb/s: 46-49 GB/s achievable (NCCL maintainers, nccl-tests "
               "#130/#267), 48.5 GB/s in SimAI"),
    "cx6-ib-200g": Link(
        name="cx6-ib-200g", kind="ib", bandwidth=23.5 * GB, peak=25 * GB, latency=3e-6,
        source="ConnectX-6 HDR 200 Gb/s: ~24 GB/s achievable (NCCL maintainers; SimAI 23.5)"),
    "roce-400g": Link(
        name="roce-400g", kind="roce", bandwidth=46 * GB, peak=50 * GB, latency=5e-6,
        source="400 GbE RoCEv2 NIC; achievable rate taken at the low end of the CX7 range"),
    "nvme-gen4-x4": Link(
        name="nvme-gen4-x4", kind="storage", bandwidth=7.0 * GB, peak=7.88 * GB, latency=80e-6,
        source="Samsung 980 PRO spec: 7.0 GB/s sequential read (PCIe 4.0 x4)"),
    "ufs-4.0": Link(
        name="ufs-4.0", kind="storage", bandwidth=4.2 * GB, peak=5.8 * GB, latency=100e-6,
        source="Samsung UFS 4.0 spec: 4200 MB/s sequential read (2 lanes HS-G5, 23.2 Gb/s each)"),
}

_NVME = MemoryTier(name="nvme", kind="nvme", capacity=2000 * GB, read_bw=7.0 * GB,
                   write_bw=5.0 * GB, latency=80e-6, source=LINKS["nvme-gen4-x4"].source)

MACHINES: dict[str, Machine] = {
    "desktop-4090": Machine(
        name="desktop-4090", accelerator=GPUS["rtx-4090"], host=CPUS["i9-14900k"],
        tiers=(GPUS["rtx-4090"].memory, CPUS["i9-14900k"].memory, _NVME),
        host_link=LINKS["pcie4-x16"], storage_link=LINKS["nvme-gen4-x4"],
        source="RTX 4090 + i9-14900K + 128 GB DDR5 + PCIe 4.0 NVMe (ProMoE's test box)"),
    "jetson-agx-orin": Machine(
        name="jetson-agx-orin", accelerator=GPUS["jetson-agx-orin"],
        host=Device(name="orin-cpu", kind="cpu", flops={"fp32": 0.6 * TFLOPS},
                    memory=GPUS["jetson-agx-orin"].memory, compute_efficiency=0.5, cores=12,
                    source=_ORIN_SRC + "; CPU FP32 derived as 12 x 2.2 GHz x 16 x ~1.4"),
        tiers=(GPUS["jetson-agx-orin"].memory,
               _NVME.model_copy(update={"capacity": 1000 * GB})),
        host_link=None, storage_link=LINKS["nvme-gen4-x4"],
        source=_ORIN_SRC + "; M.2 PCIe Gen4 x4 NVMe slot"),
    "phone-sd8g3": Machine(
        name="phone-sd8g3", accelerator=None, host=CPUS["snapdragon-8-gen3"],
        tiers=(CPUS["snapdragon-8-gen3"].memory,
               MemoryTier(name="ufs", kind="ufs", capacity=512 * GB, read_bw=4.2 * GB,
                          write_bw=2.8 * GB, latency=100e-6, source=LINKS["ufs-4.0"].source)),
        host_link=None, storage_link=LINKS["ufs-4.0"],
        source=_SD8G3_SRC + "; UFS 4.0 flash"),
}


def _dgx(name, gpu, nvlink, nic, nodes, src, comm=CommParams()):
    return Cluster(name=name, gpu=GPUS[gpu], num_nodes=nodes, gpus_per_node=8,
                   nvlink=LINKS[nvlink], nic=LINKS[nic] if nic else None,
                   nics_per_node=8 if nic else 0, pcie=LINKS["pcie5-x16"] if gpu != "a100-sxm"
                   else LINKS["pcie4-x16"], host=CPUS["xeon-8480"], comm=comm, source=src)


def _deepep_fit() -> CommParams:
    """Constants fitted by benchmarks/deepep_fit.py to DeepEP's four calibration numbers."""
    path = Path(__file__).parent / "data" / "hardware" / "deepep_h800_fit.yaml"
    if not path.exists():
        return CommParams()
    import yaml

    return CommParams(**yaml.safe_load(path.read_text())["comm"])


CLUSTER_BUILDERS = {
    "h800-ib": lambda: _dgx(
        "h800-ib", "h800", "nvlink4-h800", "cx7-ib-400g", 32,
        "H800 nodes of 8 GPUs, one CX7 400 Gb/s NIC per GPU, rail-optimised (DeepEP test bed); "
        "comm constants fitted to DeepEP's published numbers", comm=_deepep_fit()),
    "h100-ib": lambda: _dgx("h100-ib", "h100-sxm", "nvlink4-h100", "cx7-ib-400g", 32,
                            "DGX H100-style: 8 GPUs, NVSwitch, 8 x CX7 400 Gb/s per node"),
    "h200-ib": lambda: _dgx("h200-ib", "h200", "nvlink4-h100", "cx7-ib-400g", 32,
                            "HGX H200: 8 GPUs, NVSwitch, 8 x CX7 400 Gb/s per node"),
    "a100-ib": lambda: _dgx("a100-ib", "a100-sxm", "nvlink3-a100", "cx6-ib-200g", 32,
                            "DGX A100: 8 GPUs, NVSwitch, 8 x CX6 200 Gb/s per node"),
    "h100-roce": lambda: _dgx("h100-roce", "h100-sxm", "nvlink4-h100", "roce-400g", 32,
                              "HGX H100 with 8 x 400 GbE RoCEv2 NICs per node"),
    "l40s-pcie": lambda: Cluster(
        name="l40s-pcie", gpu=GPUS["l40s"], num_nodes=4, gpus_per_node=8,
        nvlink=LINKS["pcie4-x16"].model_copy(update={"name": "pcie4-p2p", "kind": "pcie"}),
        nic=LINKS["roce-400g"], nics_per_node=4, pcie=LINKS["pcie4-x16"], host=CPUS["epyc-9654"],
        source="8 x L40S per node over PCIe Gen4 (no NVLink), 4 x 400 GbE per node"),
}


def device_names() -> list[str]:
    return sorted([*GPUS, *CPUS])


def cluster_names() -> list[str]:
    return sorted(CLUSTER_BUILDERS)


def machine_names() -> list[str]:
    return sorted(MACHINES)


def get_device(name: str) -> Device:
    key = name.lower()
    if key in GPUS:
        return GPUS[key]
    if key in CPUS:
        return CPUS[key]
    raise unknown_name("device preset", name, [*GPUS, *CPUS])


def get_link(name: str) -> Link:
    if name.lower() not in LINKS:
        raise unknown_name("link preset", name, LINKS)
    return LINKS[name.lower()]


def get_machine(name: str) -> Machine:
    if name.lower() not in MACHINES:
        raise unknown_name("machine preset", name, MACHINES)
    return MACHINES[name.lower()]


def get_cluster(name: str, **overrides) -> Cluster:
    key = name.lower()
    if key not in CLUSTER_BUILDERS:
        raise unknown_name("cluster preset", name, CLUSTER_BUILDERS)
    cluster = CLUSTER_BUILDERS[key]()
    return _validated(Cluster, {**cluster.model_dump(), **overrides}, name) if overrides \
        else cluster


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------
def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def _validated(cls, data: dict, where: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise HardwareError(f"{where}: invalid {cls.__name__.lower()}: {_first_error(exc)}") \
            from None


def _resolve(data: dict, field: str, table: dict, kind: str) -> None:
    """Let a YAML field name a preset (string) or patch one (dict with 'preset')."""
    value = data.get(field)
    if isinstance(value, str):
        if value.lower() not in table:
            raise unknown_name(kind, value, table)
        data[field] = table[value.lower()].model_dump()
    elif isinstance(value, dict) and "preset" in value:
        base = value.pop("preset")
        if str(base).lower() not in table:
            raise unknown_name(kind, base, table)
        data[field] = {**table[str(base).lower()].model_dump(), **value}


def _load_yaml(path: Path) -> dict:
    import yaml

    if not path.exists():
        raise HardwareError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise HardwareError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HardwareError(f"{path}: expected a mapping at the top level")
    return data


def cluster_from_dict(data: dict, where: str = "cluster") -> Cluster:
    data = dict(data)
    if "preset" in data:
        base = get_cluster(str(data.pop("preset"))).model_dump()
        data = {**base, **data}
    _resolve(data, "gpu", {**GPUS, **CPUS}, "device preset")
    _resolve(data, "host", {**GPUS, **CPUS}, "device preset")
    for field in ("nvlink", "nic", "pcie"):
        _resolve(data, field, LINKS, "link preset")
    return _validated(Cluster, data, where)


def load_cluster(spec: str | Path) -> Cluster:
    """A cluster preset name, or a YAML file (fields may name presets: ``gpu: h800``)."""
    text = str(spec)
    if text.lower() in CLUSTER_BUILDERS:
        return get_cluster(text)
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
        raise unknown_name("cluster preset", text, CLUSTER_BUILDERS)
    data = _load_yaml(path)
    return cluster_from_dict(data.get("cluster", data), where=str(path))


def load_device(spec: str | Path) -> Device:
    text = str(spec)
    if text.lower() in GPUS or text.lower() in CPUS:
        return get_device(text)
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
        raise unknown_name("device preset", text, [*GPUS, *CPUS])
    data = _load_yaml(path)
    data = dict(data.get("device", data))
    if "preset" in data:
        data = {**get_device(str(data.pop("preset"))).model_dump(), **data}
    return _validated(Device, data, str(path))
