"""The run file: one Parquet file in the trace format, with measured optional columns.

Rows are the executed routing, one per (token, MoE layer) in execution order (each token its
own forward step). Optional columns (documented in docs/validation.md):

- ``residency`` [K] int8: 0 miss, 1 hit, 2 hit on a prefetched key, -1 dropped;
- ``read_bytes`` [K] int64: payload bytes of the slot's demand read (0 on a hit);
- ``read_s`` [K] float64: that read's duration on its I/O thread (NaN on a hit);
- ``t_dense_s``, ``t_expert_s``, ``t_wait_s``, ``t_layer_s`` float64: the batch's dense part,
  expert compute, time blocked on reads, and wall time;
- ``t_step_s`` float64: the token's wall time over all its layers (same on its rows);
- ``prefetch_bytes`` int64: payload bytes of speculative reads the batch issued.

The key-value metadata (``moe.capture``) records the machine, library versions, the stack,
the settings, every transfer (key, priority, bytes, issued/start/end seconds, thread) and the
policy's statistics.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from moesim.executor.runner import RunRecord, RunSettings
from moesim.executor.stack import StackSpec
from moesim.executor.store import ExecutorError

RUN_FORMAT = "moesim-run-v1"
TRANSFER_FIELDS = ("key", "priority", "payload_bytes", "file_bytes", "issued_s", "start_s",
                   "end_s", "thread")


def machine_info() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("moesim", "torch", "numpy", "safetensors", "pyarrow", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def to_trace(rec: RunRecord, spec: StackSpec, settings: RunSettings, *, source_trace=None,
             seq_lens=None, phase=None, request_ids=None, routing: str = "forced",
             expert_bytes: int | None = None, extra_capture: dict | None = None):
    """Build the run's Trace (rows + measured columns + metadata); ``expert_bytes`` overrides
    the stack's expert payload (a Hugging Face model's experts), ``extra_capture`` adds keys."""
    from moesim.traces.trace import Trace

    T = rec.experts.shape[0]
    extras = {
        "residency": rec.residency, "read_bytes": rec.read_bytes, "read_s": rec.read_s,
        "t_dense_s": rec.t_dense_s, "t_expert_s": rec.t_expert_s, "t_wait_s": rec.t_wait_s,
        "t_layer_s": rec.t_layer_s, "prefetch_bytes": rec.prefetch_bytes,
        "t_step_s": np.repeat(rec.t_step_s[:, None], spec.layers, axis=1),
    }
    transfers = {f: [tr[f] for tr in rec.transfers] for f in TRANSFER_FIELDS}
    capture = {
        "format": RUN_FORMAT,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "versions": versions(),
        "stack": spec.to_dict(),
        "settings": settings.to_dict(),
        "routing": routing,
        "routing_source": (source_trace.meta.source if source_trace is not None else "router"),
        "cold_read": rec.cold_mode,
        "file_header_bytes": rec.file_header_bytes,
        "policy_stats": rec.stats,
        "transfers": transfers,
        **(extra_capture or {}),
    }
    return Trace.from_arrays(
        rec.experts, rec.weights, seq_lens if seq_lens is not None else [T], "decode" if phase is None else phase,
        steps=np.arange(T), request_ids=request_ids, extras=extras,
        num_layers=spec.layers, num_experts=spec.num_experts, top_k=spec.top_k,
        model=spec.model.name, weight_norm=(source_trace.meta.weight_norm if source_trace
                                            is not None else "raw"),
        source="moesim run-real", expert_bytes=[expert_bytes or spec.expert_payload_bytes()] * spec.layers,
        shared_experts=spec.model.shared_experts, capture=capture)


def read_run(path: str | os.PathLike):
    """Open a run file; raise ExecutorError if it is a trace without run measurements."""
    from moesim.traces.trace import Trace

    trace = Trace.read(Path(path))
    cap = trace.meta.capture or {}
    if cap.get("format") != RUN_FORMAT:
        raise ExecutorError(f"{path}: not a moesim run file (no moe.capture.format = "
                            f"{RUN_FORMAT}); record one with 'moesim run-real'")
    missing = [c for c in ("residency", "read_bytes", "t_layer_s", "t_step_s")
               if c not in trace.extra_columns]
    if missing:
        raise ExecutorError(f"{path}: run file lacks the column {missing[0]!r}")
    return trace
