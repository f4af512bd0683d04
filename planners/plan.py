"""The plan format: which logical expert sits in each physical slot, plus how it was found.

``phy2log[l, s]`` names the logical expert in slot s of layer l (-1: slot left empty). Slots are
GPU-major, ``slots_per_gpu`` per GPU, the layout EPLB, SGLang and vLLM use. A plan file (JSON)
records the map with its inputs, objective, solver, bound and gap, and exports to SGLang's
``--init-expert-location`` file and to vLLM's physical/logical maps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moesim.fileio import write_json_atomic
from moesim.planners.inputs import PlacementError

PLAN_FORMAT = "moesim.plan/1"


@dataclass
class Plan:
    phy2log: np.ndarray  # [L, P * slots_per_gpu] int64, -1 = empty slot
    num_experts: int
    num_gpus: int
    num_nodes: int
    solver: str
    objective: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    # per layer: the objective value reached, the proven lower bound, relative gap; whole plan
    objective_value: list | None = None
    bound: list | None = None
    gap: list | None = None
    status: str = "heuristic"
    solve_s: float = 0.0
    notes: list = field(default_factory=list)
    # cross_node plans: per layer gap of the node-fixed balance MILP (None where not run)
    polish_gap: list | None = None
    # replica choice the plan was made for: "uniform" (SGLang dynamic, vLLM) or "nearest"
    # (SGLang static dispatch); evaluation uses it unless told otherwise
    replica_selection: str = "uniform"

    def __post_init__(self):
        from moesim.planners.inputs import REPLICA_SELECTIONS

        if self.replica_selection not in REPLICA_SELECTIONS:
            raise PlacementError(f"unknown replica selection {self.replica_selection!r}; choose one of: "
                                 + ", ".join(REPLICA_SELECTIONS))
        self.phy2log = np.asarray(self.phy2log, dtype=np.int64)
        if self.phy2log.ndim != 2 or self.phy2log.shape[1] % self.num_gpus:
            raise PlacementError(
                f"plan map must be [layers, slots] with slots a multiple of {self.num_gpus} GPUs, "
                f"got {self.phy2log.shape}"
            )
        if self.phy2log.size and (self.phy2log.max() >= self.num_experts or self.phy2log.min() < -1):
            raise PlacementError(f"plan names an expert outside 0..{self.num_experts - 1}")
        missing = [
            (lay, e)
            for lay in range(self.num_layers)
            for e in np.setdiff1d(np.arange(self.num_experts), self.phy2log[lay])
        ]
        if missing:
            lay, e = missing[0]
            raise PlacementError(f"every expert needs a replica: expert {e} of layer {lay} has none")

    # ----- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.num_gpus

    @property
    def num_replicas(self) -> int:
        """Occupied slots per layer (the same in every layer for engine exports)."""
        return int((self.phy2log[0] >= 0).sum())

    # ----- derived maps ------------------------------------------------------------------------
    def replica_counts(self) -> np.ndarray:
        """``logcnt[l, e]``: replicas of each expert."""
        return replica_counts(self.phy2log, self.num_experts)

    def per_gpu(self) -> np.ndarray:
        """``[L, E, P]``: replicas of expert e on GPU g."""
        return replicas_per_gpu(self.phy2log, self.num_experts, self.num_gpus)

    def gpu_loads(self, load: np.ndarray, selection: str | None = None) -> np.ndarray:
        """``[L, P]`` GPU load under the replica selection rule (default: the plan's): uniform
        splits each expert's load evenly over its replicas; nearest as in
        ``objectives.replica_loads``."""
        selection = selection or self.replica_selection
        load = np.asarray(load, float)
        if selection == "uniform":
            share = load / np.maximum(self.replica_counts(), 1)
            return np.einsum("le,leg->lg", share, self.per_gpu())
        from moesim.planners.objectives import gpu_loads

        node_of = np.arange(self.num_gpus) // (self.num_gpus // self.num_nodes)
        return np.stack([gpu_loads(x, w, node_of, self.num_nodes, selection)
                         for x, w in zip(self.per_gpu(), load, strict=True)])

    def log2phy(self) -> np.ndarray:
        """``[L, E, X]`` slots of each expert in slot order, padded with -1."""
        cnt = self.replica_counts()
        width = max(int(cnt.max()), 1)
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        for lay in range(self.num_layers):
            fill = np.zeros(self.num_experts, dtype=np.int64)
            for slot, e in enumerate(self.phy2log[lay]):
                if e >= 0:
                    out[lay, e, fill[e]] = slot
                    fill[e] += 1
        return out

    # ----- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["phy2log"] = self.phy2log.tolist()
        return {"format": PLAN_FORMAT, "slots_per_gpu": self.slots_per_gpu, **d}

    def save(self, path: str | Path) -> Path:
        write_json_atomic(path, self.to_dict(), indent=1)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlacementError(f"{path}: no such plan file")
        try:
            d = json.loads(path.read_text())
        except ValueError as exc:
            raise PlacementError(f"{path}: not a JSON plan ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlacementError(f"{path}: not a moesim plan (expected format {PLAN_FORMAT!r})")
        d.pop("format")
        d.pop("slots_per_gpu", None)
        try:
            return cls(**d)
        except TypeError as exc:
            raise PlacementError(f"{path}: malformed plan ({exc})") from None

    # ----- engine exports -----------------------------------------------------------------------
    def _equal_slots(self, engine: str) -> None:
        full = (self.phy2log >= 0).all()
        if not full:
            raise PlacementError(
                f"{engine} needs the same number of experts on every GPU: this plan leaves slots empty; "
                f"choose --redundant so that experts + redundant is a multiple of {self.num_gpus} GPUs"
            )

    def to_sglang(self) -> dict:
        """SGLang ``--init-expert-location`` file: one row of logical ids per layer."""
        self._equal_slots("SGLang")
        return {"physical_to_logical_map": self.phy2log.tolist()}

    def to_vllm(self) -> dict:
        """vLLM EPLB maps: physical_to_logical [L, R], logical_to_physical [L, E, X], counts [L, E]."""
        self._equal_slots("vLLM")
        return {
            "physical_to_logical_map": self.phy2log.tolist(),
            "logical_to_physical_map": self.log2phy().tolist(),
            "logical_replica_count": self.replica_counts().tolist(),
            "num_redundant_experts": self.num_replicas - self.num_experts,
        }

    def export(self, engine: str, path: str | Path) -> Path:
        exporters = {"sglang": self.to_sglang, "vllm": self.to_vllm}
        if engine not in exporters:
            from moesim.errors import unknown_name

            raise unknown_name("export format", engine, exporters)
        write_json_atomic(path, exporters[engine](), indent=None)
        return Path(path)


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    L = phy2log.shape[0]
    out = np.zeros((L, num_experts), dtype=np.int64)
    for lay in range(L):
        ids = phy2log[lay]
        out[lay] = np.bincount(ids[ids >= 0], minlength=num_experts)
    return out


def replicas_per_gpu(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    L, R = phy2log.shape
    gpu = np.repeat(np.arange(num_gpus), R // num_gpus)
    out = np.zeros((L, num_experts, num_gpus), dtype=np.int64)
    lay, slot = np.nonzero(phy2log >= 0)
    np.add.at(out, (lay, phy2log[lay, slot], gpu[slot]), 1)
    return out


def phy2log_from_counts(per_gpu: np.ndarray, slots_per_gpu: int, order: np.ndarray | None = None) -> np.ndarray:
    """Slot map from replicas per GPU ``[E, P]`` for one layer; within a GPU, slots follow
    ``order`` (expert ids, e.g. heaviest first) or ascending expert id."""
    E, P = per_gpu.shape
    out = np.full(P * slots_per_gpu, -1, dtype=np.int64)
    rank = np.arange(E) if order is None else np.argsort(order, kind="stable")
    for g in range(P):
        experts = np.repeat(np.arange(E), per_gpu[:, g])
        experts = experts[np.argsort(rank[experts], kind="stable")]
        if len(experts) > slots_per_gpu:
            raise PlacementError(f"GPU {g} holds {len(experts)} replicas but has {slots_per_gpu} slots")
        out[g * slots_per_gpu : g * slots_per_gpu + len(experts)] = experts
    return out
