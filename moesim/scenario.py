"""A simulation scenario: one validated YAML file naming everything a run needs.

Sections: ``model`` (preset + overrides), ``cluster`` (a hardware preset name, a cluster YAML
file, or an inline cluster with ``preset`` and overrides), ``parallelism`` (attention data
parallel x tensor parallel, expert parallel over all GPUs), ``placement`` (contiguous by
default, or a planner, or a plan file), ``execution`` (dispatcher, compute/communication
overlap), ``workload`` (arrivals and lengths), ``serving`` (continuous batching), ``memory``
(weights and KV cache), ``routing`` (trace replay, synthetic, or aggregated counts) and
``simulation`` (stopping rules, recording). Every problem is one ``ScenarioError`` line naming
the field, e.g. ``scenario.yaml: workload.rate_per_s: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moesim.errors import MoesimError


class ScenarioError(MoesimError):
    """A scenario file that cannot be read or does not describe a runnable simulation."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)


class ParallelismSection(_Section):
    tp: int = Field(1, ge=1, description="tensor-parallel GPUs per attention group")
    attention_dp: int | None = Field(None, ge=1, description="attention data-parallel groups")
    ep: int | None = Field(None, ge=1, description="expert-parallel GPUs (all of them)")


class PlacementSection(_Section):
    # contiguous: expert e on GPU e*P/E; round_robin: e mod P; balanced: EPLB on the routing
    # source's load matrix; file: a moesim plan JSON (moesim place ...)
    kind: Literal["contiguous", "round_robin", "balanced", "file"] = "contiguous"
    redundant_experts: int = Field(0, ge=0, description="extra replica slots per layer (balanced)")
    file: str | None = None

    @model_validator(mode="after")
    def _file_given(self):
        if self.kind == "file" and not self.file:
            raise ValueError("kind 'file' needs 'file: PLAN.json'")
        if self.redundant_experts and self.kind != "balanced":
            raise ValueError("redundant_experts needs kind 'balanced' (the planner places replicas)")
        return self


class ExecutionSection(_Section):
    dispatcher: str = "deepep-normal"
    overlap: Literal["off", "two-microbatch"] = "off"
    # fixed per-step cost outside the layers: sampling, scheduling, kernel launches (seconds)
    step_overhead_s: float = Field(0.0, ge=0)
    # measured operation times (CSV: operation, shape, dtype, tokens, seconds; moesim.cost)
    # overriding the roofline where they cover an operation
    cost_table: str | None = None


class LengthSection(_Section):
    """A token-count distribution: fixed, uniform on [min, max], or lognormal (mean, cv)."""

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    mean: float | None = Field(None, gt=0)
    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1)
    cv: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _complete(self):
        if self.dist in ("fixed", "lognormal") and self.mean is None:
            raise ValueError(f"dist '{self.dist}' needs 'mean'")
        if self.dist == "uniform" and self.max is None:
            raise ValueError("dist 'uniform' needs 'max'")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")
        return self


class WorkloadSection(_Section):
    arrival: Literal["poisson", "gamma", "burst", "jsonl"] = "poisson"
    rate_per_s: float | None = Field(None, gt=0)
    cv: float = Field(1.0, gt=0, description="gamma inter-arrival coefficient of variation")
    num_requests: int = Field(100, ge=1)
    prompt_tokens: int | LengthSection = 512
    output_tokens: int | LengthSection = 128
    file: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _complete(self):
        if self.arrival in ("poisson", "gamma") and self.rate_per_s is None:
            raise ValueError(f"arrival '{self.arrival}' needs 'rate_per_s'")
        if self.arrival == "jsonl" and not self.file:
            raise ValueError("arrival 'jsonl' needs 'file: requests.jsonl'")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        return self


class ServingSection(_Section):
    # colocated: prefill and decode on this cluster; decode: a disaggregated decode instance
    # (requests arrive with their prompt's KV cache, only output tokens are computed here)
    role: Literal["colocated", "decode"] = "colocated"
    max_tokens_per_step: int = Field(8192, ge=1, description="token budget per attention group")
    max_running: int = Field(256, ge=1, description="running requests per attention group")
    chunked_prefill: bool = True

    @model_validator(mode="after")
    def _budget(self):
        if self.max_running > self.max_tokens_per_step:
            raise ValueError(
                f"max_running {self.max_running} exceeds max_tokens_per_step "
                f"{self.max_tokens_per_step}: every running request decodes one token per step"
            )
        return self


class MemorySection(_Section):
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    reserve_gb: float = Field(2.0, ge=0, description="activations and workspace per GPU")
    kv_dtype: str = "bf16"
    kv_capacity_tokens: int | None = Field(None, ge=1, description="override per attention group")


class RoutingSection(_Section):
    source: Literal["trace", "synthetic", "counts", "uniform"] = "synthetic"
    trace: str | None = None
    on_short: Literal["wrap", "resample"] = "wrap"
    seed: int = 0
    # synthetic: knobs of moesim.traces.synth (skew, locality, coherence, affinity, domains)
    skew: float = Field(1.0, ge=0)
    locality: float = Field(0.5, ge=0, le=1)
    synth_tokens: int = Field(16384, ge=64, description="tokens of the generated trace")
    synth_requests: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _trace_given(self):
        if self.source == "trace" and not self.trace:
            raise ValueError("source 'trace' needs 'trace: FILE.parquet' (or --trace)")
        return self


class SimulationSection(_Section):
    max_sim_time_s: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    record_gpu: bool = Field(False, description="keep per-step, per-layer, per-GPU loads")
    fast_forward: bool = Field(True, description="run the scheduler ahead and cost windows of "
                               "steps in one vectorised call (same results as step by step)")


class Scenario(_Section):
    name: str = "scenario"
    description: str = ""
    model: ModelSection
    cluster: str | dict[str, Any] = "h800-ib"
    parallelism: ParallelismSection = ParallelismSection()
    placement: PlacementSection = PlacementSection()
    execution: ExecutionSection = ExecutionSection()
    workload: WorkloadSection = WorkloadSection(arrival="burst")
    serving: ServingSection = ServingSection()
    memory: MemorySection = MemorySection()
    routing: RoutingSection = RoutingSection()
    simulation: SimulationSection = SimulationSection()
    # folder that relative paths (trace, workload file, plan file) are resolved against
    base_dir: str = "."

    def path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def with_changes(self, changes: dict[str, Any]) -> Scenario:
        """A copy with dotted-key changes, e.g. ``{"placement.kind": "balanced"}``, revalidated."""
        data = self.model_dump()
        for key, value in changes.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return scenario_from_dict(data, where=self.name)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("int", "LengthSection"))]
    where = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def scenario_from_dict(data: dict, where: str = "scenario", base_dir: str | Path = ".") -> Scenario:
    """Validate a scenario mapping; a model given as a bare string is a preset name."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a mapping at the top level")
    data = copy.deepcopy(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"preset": data["model"]}
    data.setdefault("base_dir", str(base_dir))
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{where}: {_first_error(exc)}") from None
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file (relative paths inside resolve against its folder)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    data = data if data is not None else {}
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return scenario_from_dict(data, where=str(path), base_dir=path.parent)


def bundled_scenarios() -> dict[str, Path]:
    """The scenarios shipped in moesim/data/scenarios, by name."""
    folder = Path(__file__).parent / "data" / "scenarios"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
