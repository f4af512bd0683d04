"""Ground truth: a real offloading executor (CPU; CUDA written, see ``cuda``) whose runs
``moesim.validate`` compares with the simulator. ``capture`` is the one call: build the
stack, run it with the chosen cache policy and routing, return the run file's Trace."""

from __future__ import annotations

from pathlib import Path

from moesim.executor.runner import RunRecord, RunSettings, run
from moesim.executor.stack import StackSpec
from moesim.executor.store import ExecutorError, ExpertStore


def store_for(root: str | Path, spec: StackSpec, cold: str = "direct",
              read_gbps: float | None = None) -> ExpertStore:
    """The store folder of a stack's weights (shared by runs of the same shape and seed);
    ``read_gbps`` emulates a storage device of that bandwidth (``store.ReadLimiter``)."""
    folder = Path(root) / (f"{spec.model.name}-{spec.hidden}x{spec.inter}-{spec.dtype}-"
                           f"E{spec.num_experts}-seed{spec.seed}")
    return ExpertStore(folder, spec.num_experts, cold=cold, read_gbps=read_gbps)


def capture(spec: StackSpec, settings: RunSettings, store_root: str | Path, *, trace=None,
            tokens: int | None = None):
    """Run and return the run file's Trace (write it with ``.write(path)``)."""
    from moesim.executor.runfile import to_trace

    store = store_for(store_root, spec, settings.cold, settings.read_gbps)
    rec = run(spec, store, settings, trace=trace, tokens=tokens)
    if trace is not None:
        arr = trace.to_arrays()
        return to_trace(rec, spec, settings, source_trace=trace, seq_lens=arr["seq_lens"],
                        phase=arr["phase"], routing="forced")
    return to_trace(rec, spec, settings, routing="own")


__all__ = ["ExecutorError", "ExpertStore", "RunRecord", "RunSettings", "StackSpec", "capture",
           "run", "store_for"]
