"""The trace schema: Parquet columns, key-value metadata, and their validation.

A *routing* trace has one row per (token, MoE layer) in execution order: rows of one token are
contiguous and ordered by layer; tokens are ordered by step, then request, then position.
A *counts* trace (aggregate only, e.g. MoE-Infinity activation matrices) has one row per
(request, layer) with the number of tokens routed to each expert.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

from moesim.errors import TraceError

SCHEMA_VERSION = "1"
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}

# expert_ids are int16
MAX_EXPERTS = 1 << 15

KIND_ROUTING = "routing"
KIND_COUNTS = "counts"

# Columns every routing trace has, in file order.
ROUTING_BASE = ("request_id", "token_pos", "step", "phase", "layer", "expert_ids", "gate_weights")
COUNTS_BASE = ("request_id", "layer", "counts")


def routing_schema(top_k: int, optional: dict[str, pa.DataType] | None = None) -> pa.Schema:
    cols = [
        pa.field("request_id", pa.int32(), nullable=False),
        pa.field("token_pos", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("phase", pa.int8(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert_ids", pa.list_(pa.int16(), top_k), nullable=False),
        pa.field("gate_weights", pa.list_(pa.float32(), top_k), nullable=False),
    ]
    for name, typ in (optional or {}).items():
        cols.append(pa.field(name, typ))
    return pa.schema(cols)


def optional_columns(top_k: int) -> dict[str, pa.DataType]:
    """Known optional routing columns and their types."""
    return {
        # wall time of this (token, layer)'s MoE block, seconds; rows of one batch share it
        "t_layer_s": pa.float64(),
        # wall time of the whole forward step that produced this token, seconds
        "t_step_s": pa.float64(),
        # the router's 2k best candidates (ids, probabilities), for score-based cache policies
        "router_topk_ids": pa.list_(pa.int16(), 2 * top_k),
        "router_topk_probs": pa.list_(pa.float32(), 2 * top_k),
        # what a recorded cache did: 0 miss, 1 hit, 2 hit thanks to a prefetch
        "residency": pa.list_(pa.int8(), top_k),
        # bytes a recorded cache read for each slot (0 on a hit)
        "read_bytes": pa.list_(pa.int64(), top_k),
    }


def counts_schema(num_experts: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("request_id", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("counts", pa.list_(pa.int32(), num_experts), nullable=False),
        ]
    )


@dataclass
class TraceMeta:
    """Model facts and provenance stored in the Parquet key-value metadata (keys ``moe.*``)."""

    num_layers: int
    num_experts: int
    top_k: int
    model: str = "unknown"
    kind: str = KIND_ROUTING
    shared_experts: int = 0
    # how gate_weights were recorded (weight normalisation): "normalised" (sum to 1 over top-k), "raw" (router
    # probabilities before renormalisation), "scaled" (after routed_scaling_factor), "none"
    weight_norm: str = "normalised"
    expert_id_space: str = "logical"
    source: str = "unknown"
    # bytes of one expert per MoE layer (what a cache miss reads) and resident dense bytes
    expert_bytes: list[int] | None = None
    dense_bytes: list[int] | None = None
    capture: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TraceError(f"trace metadata: {name} must be a positive integer, got {value!r}")
        if self.num_experts > MAX_EXPERTS:
            raise TraceError(f"trace metadata: num_experts={self.num_experts} exceeds the "
                             f"{MAX_EXPERTS} expert ids a trace holds (int16)")
        if self.kind not in (KIND_ROUTING, KIND_COUNTS):
            raise TraceError(f"trace metadata: kind must be 'routing' or 'counts', got {self.kind!r}")
        if self.top_k > self.num_experts:
            raise TraceError(
                f"trace metadata: top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        for name in ("expert_bytes", "dense_bytes"):
            sizes = getattr(self, name)
            if sizes is not None and len(sizes) != self.num_layers:
                raise TraceError(
                    f"trace metadata: {name} lists {len(sizes)} layers, expected {self.num_layers}"
                )

    def to_kv(self) -> dict[bytes, bytes]:
        out = {b"moesim.schema_version": SCHEMA_VERSION.encode()}
        for key, value in asdict(self).items():
            out[f"moe.{key}".encode()] = json.dumps(value).encode()
        return out

    @classmethod
    def from_kv(cls, kv: dict[bytes, bytes] | None, where: str = "trace") -> TraceMeta:
        if not kv or b"moe.num_layers" not in kv:
            raise TraceError(
                f"{where}: no moesim metadata (moe.num_layers ...); is this a moesim trace? "
                "Convert other formats with 'moesim trace import'"
            )
        known = {f.name for f in fields(cls)}
        values = {}
        for raw_key, raw_value in kv.items():
            key = raw_key.decode(errors="replace")
            if not key.startswith("moe."):
                continue
            name = key[4:]
            if name not in known:
                continue
            try:
                values[name] = json.loads(raw_value)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TraceError(f"{where}: metadata key {key} is not valid JSON ({exc})") from None
        for required in ("num_layers", "num_experts", "top_k"):
            if required not in values:
                raise TraceError(f"{where}: metadata key moe.{required} is missing")
        try:
            return cls(**values)
        except TypeError as exc:
            raise TraceError(f"{where}: bad metadata ({exc})") from None

    def to_dict(self) -> dict:
        return asdict(self)
