"""CPU-GPU hybrid execution: per layer, which experts run on the GPU (resident, or loaded over
PCIe first) and which on the CPU.

Costs (seconds): CPU time of an expert with n tokens = ``cpu_a * n + cpu_b``; GPU time =
``gpu_a * n + gpu_b``; moving an expert = ``expert_bytes / link_bw + link_latency``. The GPU
timeline runs transfers then GPU compute serially (a conservative single-stream model); the
CPU runs its experts in parallel with it; the layer takes ``max(CPU time, GPU time)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moesim.errors import MoesimError, unknown_name


class ScheduleError(MoesimError):
    pass


@dataclass(frozen=True)
class HybridCosts:
    cpu_a: float  # seconds per token on the CPU
    cpu_b: float  # seconds per expert on the CPU (weights streamed from DRAM)
    gpu_a: float
    gpu_b: float
    link_bw: float  # bytes/s host -> GPU
    expert_bytes: float
    link_latency: float = 0.0

    def cpu(self, n: int) -> float:
        return self.cpu_a * n + self.cpu_b

    def gpu(self, n: int) -> float:
        return self.gpu_a * n + self.gpu_b

    def transfer(self) -> float:
        return self.link_latency + self.expert_bytes / self.link_bw

    @classmethod
    def from_hardware(cls, model, machine) -> HybridCosts:
        """Roofline costs from moesim.model and moesim.hardware: per token the expert's FLOPs at
        the device's effective rate; per expert its weights read once from device memory."""
        if machine.accelerator is None or machine.host_link is None:
            raise ScheduleError(f"machine {machine.name!r} has no discrete accelerator to schedule onto")
        fl = model.expert_flops_per_token()
        nbytes = model.expert_bytes()
        cpu, gpu = machine.host, machine.accelerator
        dtype = model.expert_dtype
        return cls(
            cpu_a=fl / (cpu.peak_flops(dtype) * cpu.compute_efficiency),
            cpu_b=nbytes / (cpu.memory.read_bw * cpu.memory_efficiency) + cpu.kernel_overhead,
            gpu_a=fl / (gpu.peak_flops(dtype) * gpu.compute_efficiency),
            gpu_b=nbytes / (gpu.memory.read_bw * gpu.memory_efficiency) + gpu.kernel_overhead,
            link_bw=machine.host_link.bandwidth, expert_bytes=nbytes, link_latency=machine.host_link.latency)


@dataclass
class LayerPlan:
    gpu: list[int] = field(default_factory=list)  # resident experts computed on the GPU
    load: list[int] = field(default_factory=list)  # experts moved to the GPU, then computed there
    cpu: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    gpu_s: float = 0.0

    @property
    def time_s(self) -> float:
        return max(self.cpu_s, self.gpu_s)


def _evaluate(plan: LayerPlan, tokens: dict[int, int], c: HybridCosts) -> LayerPlan:
    plan.cpu_s = sum(c.cpu(tokens[e]) for e in plan.cpu)
    plan.gpu_s = len(plan.load) * c.transfer() + sum(c.gpu(tokens[e]) for e in plan.gpu + plan.load)
    return plan


def gpu_only(tokens, resident, c):
    """Load every missing expert over the link (on-demand offloading)."""
    res = [e for e in tokens if e in resident]
    return _evaluate(LayerPlan(gpu=res, load=[e for e in tokens if e not in resident]), tokens, c)


def fiddler(tokens, resident, c):
    """Fiddler (Kamahori et al., arXiv 2402.07033) Algorithm 1: a missing expert runs on the
    CPU when its CPU time is below transfer + GPU time, else it is copied and run on the GPU."""
    plan = LayerPlan(gpu=[e for e in tokens if e in resident])
    for e, n in tokens.items():
        if e in resident:
            continue
        (plan.cpu if c.cpu(n) < c.transfer() + c.gpu(n) else plan.load).append(e)
    return _evaluate(plan, tokens, c)


def ktransformers(tokens, resident, c):
    """kTransformers' static split (SOSP'25): routed experts on the CPU unless placed on the GPU
    (the resident set); attention and shared experts stay on the GPU (not in this layer plan)."""
    return _evaluate(LayerPlan(gpu=[e for e in tokens if e in resident],
                               cpu=[e for e in tokens if e not in resident]), tokens, c)


def hybrimoe(tokens, resident, c):
    """HybriMoE's dynamic split (arXiv 2504.05897): resident experts on the GPU, missing ones on
    the CPU; then move the heaviest CPU expert to the GPU (transfer + compute) while that lowers
    max(CPU time, GPU time)."""
    plan = _evaluate(LayerPlan(gpu=[e for e in tokens if e in resident],
                               cpu=sorted((e for e in tokens if e not in resident), key=lambda e: tokens[e])),
                     tokens, c)
    while plan.cpu:
        heavy = plan.cpu[-1]
        trial = _evaluate(LayerPlan(gpu=list(plan.gpu), load=plan.load + [heavy], cpu=plan.cpu[:-1]), tokens, c)
        if trial.time_s >= plan.time_s:
            break
        plan = trial
    return plan


SCHEDULERS = {"gpu-only": gpu_only, "fiddler": fiddler, "ktransformers": ktransformers, "hybrimoe": hybrimoe}


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS)


def plan_layer(name: str, tokens: dict[int, int], resident, costs: HybridCosts) -> LayerPlan:
    """Decide one layer: ``tokens`` maps expert -> tokens routed, ``resident`` the GPU set."""
    if name not in SCHEDULERS:
        raise unknown_name("hybrid scheduler", name, SCHEDULERS)
    return SCHEDULERS[name](dict(tokens), set(resident), costs)
