"""Expert-routing traces: one Parquet schema for every source (moesim.traces).

Installed as ``moesim.traces`` (the folder is ``traces/`` in the repository); importing it
never needs torch. The tracing hook for Hugging Face models lives in ``moesim.traces.hook``.
"""

from moesim.traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMeta
from moesim.traces.trace import RoutingBatch, Trace, TraceWriter, concat

__all__ = [
    "PHASE_DECODE",
    "PHASE_PREFILL",
    "RoutingBatch",
    "Trace",
    "TraceMeta",
    "TraceWriter",
    "concat",
]
