"""The ``Trace`` API: build from arrays, write and read Parquet, stream, select, concatenate.

A trace is either held in memory (a pyarrow Table) or backed by a file that is streamed row
group by row group, so a trace of tens of millions of rows is processed in bounded memory.
Every batch that leaves this module has been validated against the metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import TraceError
from moesim.fileio import atomic_path
from moesim.traces.schema import (
    COUNTS_BASE,
    KIND_COUNTS,
    PHASE_DECODE,
    PHASE_NAMES,
    PHASE_PREFILL,
    ROUTING_BASE,
    TraceMeta,
    counts_schema,
    optional_columns,
    routing_schema,
)

DEFAULT_BATCH_ROWS = 1 << 18
DEFAULT_ROW_GROUP_ROWS = 1 << 18


@dataclass
class RoutingBatch:
    """A validated slice of a routing trace as numpy arrays (one entry per (token, layer) row)."""

    request_id: np.ndarray
    token_pos: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    expert_ids: np.ndarray  # [n, top_k] int16
    gate_weights: np.ndarray  # [n, top_k] float32
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layer)


@dataclass
class CountsBatch:
    """A validated slice of a counts trace: tokens routed to each expert per (request, layer)."""

    request_id: np.ndarray
    layer: np.ndarray
    counts: np.ndarray  # [n, num_experts] int32

    def __len__(self) -> int:
        return len(self.layer)


# ----- numpy <-> arrow helpers -----------------------------------------------------------------
def _fixed_list(values: np.ndarray, typ: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1), type=typ.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, typ.list_size)


def _list_to_numpy(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten()
    if column.null_count or flat.null_count:
        raise TraceError("trace: a list column holds nulls; every row needs all its values")
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def _scalar_to_numpy(column: pa.Array, name: str) -> np.ndarray:
    # nulls would turn an integer column into floats with NaN
    if column.null_count:
        raise TraceError(f"trace: column {name!r} holds nulls; every row needs a value")
    return column.to_numpy(zero_copy_only=False)


def _phase_array(phase, n: int) -> np.ndarray:
    if phase is None:
        return np.zeros(n, dtype=np.int8)
    if isinstance(phase, str):
        if phase not in PHASE_NAMES:
            raise TraceError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        return np.full(n, PHASE_NAMES[phase], dtype=np.int8)
    arr = np.asarray(phase)
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    if arr.dtype.kind in "US":
        bad = set(np.unique(arr)) - set(PHASE_NAMES)
        if bad:
            raise TraceError(f"phase must be 'prefill' or 'decode', got {sorted(bad)[0]!r}")
        arr = np.where(arr == "decode", PHASE_DECODE, PHASE_PREFILL)
    if arr.shape != (n,):
        raise TraceError(f"phase has shape {arr.shape}, expected ({n},) (one per token)")
    return arr.astype(np.int8)


# ----- validation ----------------------------------------------------------------------------------
def validate_routing_rows(meta: TraceMeta, layer, expert_ids, gate_weights, phase, where="trace"):
    """Raise TraceError naming the first problem in these rows; return nothing if they are valid."""
    n = len(layer)
    k = meta.top_k
    if expert_ids.shape != (n, k):
        raise TraceError(f"{where}: expert_ids has shape {expert_ids.shape}, expected ({n}, {k})")
    if gate_weights.shape != (n, k):
        raise TraceError(f"{where}: gate_weights has shape {gate_weights.shape}, expected ({n}, {k})")
    if n == 0:
        return
    lo, hi = int(layer.min()), int(layer.max())
    if lo < 0 or hi >= meta.num_layers:
        raise TraceError(f"{where}: layer {hi if hi >= meta.num_layers else lo} is outside 0..{meta.num_layers - 1}")
    emin, emax = int(expert_ids.min()), int(expert_ids.max())
    if emin < 0 or emax >= meta.num_experts:
        bad = emax if emax >= meta.num_experts else emin
        row = int(np.argwhere((expert_ids == bad).any(axis=1))[0, 0])
        raise TraceError(
            f"{where}: expert id {bad} at row {row} is outside 0..{meta.num_experts - 1} "
            f"(num_experts={meta.num_experts})"
        )
    if k > 1:
        srt = np.sort(expert_ids, axis=1)
        dup_rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if len(dup_rows):
            r = int(dup_rows[0])
            raise TraceError(
                f"{where}: row {r} routes one token to the same expert twice ({expert_ids[r].tolist()})"
            )
    if not np.isfinite(gate_weights).all():
        raise TraceError(f"{where}: gate_weights hold NaN or infinite values")
    if phase is not None and len(phase) and (phase.min() < 0 or phase.max() > 1):
        raise TraceError(f"{where}: phase must be 0 (prefill) or 1 (decode)")


def _check_schema(schema: pa.Schema, meta: TraceMeta, where: str) -> list[str]:
    """Check the file's columns against the metadata; return the optional columns present."""
    if meta.kind == KIND_COUNTS:
        expected = counts_schema(meta.num_experts)
        base = COUNTS_BASE
    else:
        expected = routing_schema(meta.top_k)
        base = ROUTING_BASE
    for name in base:
        if name not in schema.names:
            raise TraceError(f"{where}: column {name!r} is missing")
        want = expected.field(name).type
        got = schema.field(name).type
        if got != want:
            raise TraceError(f"{where}: column {name!r} has type {got}, expected {want}")
    if meta.kind == KIND_COUNTS:
        return []
    known = optional_columns(meta.top_k)
    present = []
    for name in schema.names:
        if name in base:
            continue
        if name in known and schema.field(name).type != known[name]:
            raise TraceError(
                f"{where}: column {name!r} has type {schema.field(name).type}, expected {known[name]}"
            )
        present.append(name)
    return present


# ----- the Trace -----------------------------------------------------------------------------------
class Trace:
    """An expert-routing trace (or an aggregate counts trace) with its metadata."""

    def __init__(self, meta: TraceMeta, table: pa.Table | None = None, path: Path | None = None,
                 schema: pa.Schema | None = None):
        if (table is None) == (path is None):
            raise ValueError("a Trace is backed by exactly one of a table or a path")
        self.meta = meta
        self._table = table
        self.path = Path(path) if path is not None else None
        if schema is None:  # Trace.read passes the schema it already read from the footer
            schema = table.schema if table is not None else pq.read_schema(self.path)
        where = str(self.path) if self.path else "trace"
        self.extra_columns = _check_schema(schema, meta, where)

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
        seq_lens: Sequence[int] | np.ndarray | None = None,
        phase=None,
        meta: TraceMeta | None = None,
        *,
        steps: np.ndarray | None = None,
        request_ids: np.ndarray | None = None,
        token_pos: np.ndarray | None = None,
        extras: dict[str, np.ndarray] | None = None,
        **meta_fields,
    ) -> Trace:
        """Build a routing trace from ``experts[T, L, K]`` (token-major, in execution order).

        ``seq_lens`` splits the T tokens into consecutive requests (default: one request).
        ``phase`` is 'prefill'/'decode', or one value per token. ``steps`` defaults to one
        forward pass per request's prefill and one per decode token. ``token_pos`` gives recorded
        positions (default: 0, 1, ... within each request). A (token, layer) whose
        expert ids are all -1 is absent (e.g. a layer pruned for that token).
        ``extras`` maps optional column names to ``[T, L]`` or ``[T, L, width]`` arrays.
        """
        experts = np.asarray(experts)
        if experts.ndim != 3:
            raise TraceError(f"experts must be a [tokens, layers, top_k] array, got shape {experts.shape}")
        if experts.dtype.kind not in "iu":
            raise TraceError(f"experts must hold integers, got dtype {experts.dtype}")
        T, L, K = experts.shape
        if meta is None:
            meta_fields.setdefault("num_layers", L)
            meta_fields.setdefault("top_k", K)
            if "num_experts" not in meta_fields:
                meta_fields["num_experts"] = int(experts.max()) + 1 if experts.size else 1
            meta = TraceMeta(**meta_fields)
        elif meta_fields:
            meta = replace(meta, **meta_fields)
        if (L, K) != (meta.num_layers, meta.top_k):
            raise TraceError(
                f"experts has {L} layers and top_k {K}, but the metadata says "
                f"{meta.num_layers} layers and top_k {meta.top_k}"
            )
        if weights is None:
            weights = np.full((T, L, K), 1.0 / K, dtype=np.float32)
            meta = replace(meta, weight_norm="none")
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != experts.shape:
            raise TraceError(f"weights has shape {weights.shape}, expected {experts.shape} like experts")
        if seq_lens is None:
            seq_lens = np.array([T])
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        if seq_lens.ndim != 1 or (seq_lens < 0).any() or seq_lens.sum() != T:
            raise TraceError(f"seq_lens must be non-negative and sum to the {T} tokens, got sum {seq_lens.sum()}")
        phase_tok = _phase_array(phase, T)
        req_tok = np.repeat(np.arange(len(seq_lens), dtype=np.int32), seq_lens)
        if request_ids is not None:
            request_ids = np.asarray(request_ids, dtype=np.int32)
            if request_ids.shape != (len(seq_lens),):
                raise TraceError("request_ids needs one id per sequence in seq_lens")
            req_tok = request_ids[req_tok]
        starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
        pos_tok = (np.arange(T) - starts).astype(np.int32)
        if token_pos is not None:
            token_pos = np.asarray(token_pos)
            if token_pos.shape != (T,):
                raise TraceError(f"token_pos has shape {token_pos.shape}, expected ({T},) (one per token)")
            if T and (token_pos.min() < 0 or token_pos.max() > np.iinfo(np.int32).max):
                raise TraceError("token positions must be between 0 and 2^31-1")
            pos_tok = token_pos.astype(np.int32)
        if steps is None:
            steps = _default_steps(req_tok, phase_tok)
        steps = np.asarray(steps, dtype=np.int32)
        if steps.shape != (T,):
            raise TraceError(f"steps has shape {steps.shape}, expected ({T},)")

        present = (experts != -1).any(axis=2)  # [T, L]; a partly -1 row fails validation
        tok_idx, layer_idx = np.nonzero(present)
        exp_rows = experts[tok_idx, layer_idx]
        w_rows = weights[tok_idx, layer_idx]
        validate_routing_rows(meta, layer_idx, exp_rows, w_rows, phase_tok)
        exp_rows = exp_rows.astype(np.int16)  # after the range check, so nothing wraps
        columns = {
            "request_id": pa.array(req_tok[tok_idx], pa.int32()),
            "token_pos": pa.array(pos_tok[tok_idx], pa.int32()),
            "step": pa.array(steps[tok_idx], pa.int32()),
            "phase": pa.array(phase_tok[tok_idx], pa.int8()),
            "layer": pa.array(layer_idx.astype(np.int16), pa.int16()),
            "expert_ids": _fixed_list(exp_rows, pa.list_(pa.int16(), K)),
            "gate_weights": _fixed_list(w_rows, pa.list_(pa.float32(), K)),
        }
        known = optional_columns(K)
        for name, values in (extras or {}).items():
            values = np.asarray(values)
            if values.shape[:2] != (T, L):
                raise TraceError(f"extra column {name!r} has shape {values.shape}, expected ({T}, {L}, ...)")
            rows = values[tok_idx, layer_idx]
            typ = known.get(name)
            if rows.ndim == 2:
                typ = typ or pa.list_(pa.from_numpy_dtype(rows.dtype), rows.shape[1])
                columns[name] = _fixed_list(rows.astype(typ.value_type.to_pandas_dtype()), typ)
            else:
                columns[name] = pa.array(rows, typ) if typ else pa.array(rows)
        table = pa.table(columns)
        return cls(meta, table=table)

    @classmethod
    def from_counts(cls, counts: np.ndarray, meta: TraceMeta | None = None, **meta_fields) -> Trace:
        """Build an aggregate trace from ``counts[sequences, layers, experts]`` (tokens per expert)."""
        counts = np.asarray(counts)
        if counts.ndim != 3:
            raise TraceError(f"counts must be a [sequences, layers, experts] array, got shape {counts.shape}")
        if counts.dtype.kind not in "iuf":
            raise TraceError(f"counts must be numeric, got dtype {counts.dtype}")
        if counts.size and (not np.isfinite(counts).all() or counts.min() < 0):
            raise TraceError("counts must be finite and non-negative")
        if counts.dtype.kind == "f" and counts.size and not np.allclose(counts, np.round(counts)):
            raise TraceError("counts must be whole numbers of tokens")
        S, L, E = counts.shape
        if meta is None:
            meta_fields.setdefault("num_layers", L)
            meta_fields.setdefault("num_experts", E)
            meta_fields.setdefault("top_k", 1)
            meta = TraceMeta(kind=KIND_COUNTS, **meta_fields)
        meta = replace(meta, kind=KIND_COUNTS)
        if (L, E) != (meta.num_layers, meta.num_experts):
            raise TraceError(f"counts has {L} layers and {E} experts, the metadata says {meta.num_layers} and {meta.num_experts}")
        req = np.repeat(np.arange(S, dtype=np.int32), L)
        lay = np.tile(np.arange(L, dtype=np.int16), S)
        table = pa.table(
            {
                "request_id": pa.array(req, pa.int32()),
                "layer": pa.array(lay, pa.int16()),
                "counts": _fixed_list(np.round(counts).astype(np.int32).reshape(S * L, E), pa.list_(pa.int32(), E)),
            }
        )
        return cls(meta, table=table)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Trace:
        """Open a trace file; metadata and columns are checked now, rows as they stream."""
        path = Path(path)
        if not path.exists():
            raise TraceError(f"{path}: no such file")
        if path.is_dir():
            raise TraceError(f"{path}: is a directory, expected a .parquet trace file")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TraceError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
        meta = TraceMeta.from_kv(schema.metadata, where=str(path))
        return cls(meta, path=path, schema=schema)

    # ----- facts ------------------------------------------------------------------------------
    @property
    def is_counts(self) -> bool:
        return self.meta.kind == KIND_COUNTS

    @property
    def num_rows(self) -> int:
        if self._table is not None:
            return self._table.num_rows
        return self._parquet().metadata.num_rows

    def _parquet(self) -> pq.ParquetFile:
        try:
            # pre_buffer=False: with pre-buffering pyarrow keeps every row group it has read cached
            # for the file's lifetime, so streaming memory grew with the file (~30 MiB per 1M rows)
            return pq.ParquetFile(self.path, pre_buffer=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TraceError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})") from None

    # ----- streaming --------------------------------------------------------------------------
    def _record_batches(self, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        if self._table is not None:
            table = self._table.select(columns) if columns else self._table
            yield from table.to_batches(max_chunksize=batch_rows)
            return
        pf = self._parquet()
        try:
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: corrupt or truncated Parquet data ({_first_line(exc)})") from None

    def iter_batches(
        self, batch_rows: int = DEFAULT_BATCH_ROWS, columns: Sequence[str] | None = None
    ) -> Iterator[RoutingBatch]:
        """Stream validated routing rows; ``columns`` may add optional columns to each batch."""
        if self.is_counts:
            raise TraceError("this is an aggregate counts trace: it has no per-token routing; use iter_counts()")
        extra = [c for c in (columns or []) if c not in ROUTING_BASE]
        missing = [c for c in extra if c not in self.extra_columns]
        if missing:
            raise TraceError(f"trace has no column {missing[0]!r} (it has: {', '.join(self.extra_columns) or 'none'})")
        where = str(self.path) if self.path else "trace"
        k = self.meta.top_k
        for rb in self._record_batches(batch_rows, list(ROUTING_BASE) + extra):
            batch = RoutingBatch(
                request_id=_scalar_to_numpy(rb.column(0), "request_id"),
                token_pos=_scalar_to_numpy(rb.column(1), "token_pos"),
                step=_scalar_to_numpy(rb.column(2), "step"),
                phase=_scalar_to_numpy(rb.column(3), "phase"),
                layer=_scalar_to_numpy(rb.column(4), "layer"),
                expert_ids=_list_to_numpy(rb.column(5), k),
                gate_weights=_list_to_numpy(rb.column(6), k),
            )
            for i, name in enumerate(extra):
                col = rb.column(7 + i)
                if pa.types.is_fixed_size_list(col.type):
                    batch.extras[name] = _list_to_numpy(col, col.type.list_size)
                else:
                    batch.extras[name] = col.to_numpy(zero_copy_only=False)
            validate_routing_rows(self.meta, batch.layer, batch.expert_ids, batch.gate_weights, batch.phase, where)
            yield batch

    def iter_counts(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[CountsBatch]:
        """Per-(request, layer) expert counts; a routing trace is aggregated on the fly."""
        E = self.meta.num_experts
        if not self.is_counts:
            for b in self.iter_batches(batch_rows):
                key = b.request_id.astype(np.int64) * self.meta.num_layers + b.layer
                uniq, inv = np.unique(key, return_inverse=True)
                counts = np.zeros((len(uniq), E), dtype=np.int32)
                np.add.at(counts, (np.repeat(inv, self.meta.top_k), b.expert_ids.reshape(-1)), 1)
                yield CountsBatch(
                    (uniq // self.meta.num_layers).astype(np.int32),
                    (uniq % self.meta.num_layers).astype(np.int16),
                    counts,
                )
            return
        for rb in self._record_batches(batch_rows, list(COUNTS_BASE)):
            layer = _scalar_to_numpy(rb.column(1), "layer")
            counts = _list_to_numpy(rb.column(2), E)
            if len(layer) and (layer.min() < 0 or layer.max() >= self.meta.num_layers):
                raise TraceError(f"trace: layer outside 0..{self.meta.num_layers - 1}")
            if counts.size and counts.min() < 0:
                raise TraceError("trace: negative expert counts")
            yield CountsBatch(_scalar_to_numpy(rb.column(0), "request_id"), layer, counts)

    def validate(self) -> int:
        """Stream the whole trace once, checking every row; return the number of rows."""
        it = self.iter_counts() if self.is_counts else self.iter_batches()
        return sum(len(b) for b in it)

    # ----- whole-trace views ------------------------------------------------------------------------
    def load_matrix(self, phase: int | None = None) -> np.ndarray:
        """Tokens routed to each expert, ``[layers, experts]`` (int64), streamed."""
        L, E = self.meta.num_layers, self.meta.num_experts
        load = np.zeros(L * E, dtype=np.int64)
        if self.is_counts:
            if phase is not None:
                raise TraceError("a counts trace has no phases")
            for b in self.iter_counts():
                np.add.at(load.reshape(L, E), b.layer, b.counts)
            return load.reshape(L, E)
        for b in self.iter_batches():
            ids = b.expert_ids.astype(np.int64) + (b.layer.astype(np.int64) * E)[:, None]
            if phase is not None:
                ids = ids[b.phase == phase]
            load += np.bincount(ids.reshape(-1), minlength=L * E)
        return load.reshape(L, E)

    def to_table(self) -> pa.Table:
        if self._table is not None:
            return self._table
        try:
            return pq.read_table(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: corrupt or truncated Parquet data ({_first_line(exc)})") from None

    def to_arrays(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Token-major arrays: ``experts[T, L, K]`` (-1 where a layer is absent), ``weights``,
        and per token ``request_id``, ``token_pos``, ``step``, ``phase``; ``seq_lens`` per request.
        Holds the whole trace in memory."""
        batches = list(self.iter_batches(columns=columns))
        if not batches:
            L, K = self.meta.num_layers, self.meta.top_k
            return {"experts": np.zeros((0, L, K), np.int16), "weights": np.zeros((0, L, K), np.float32),
                    "request_id": np.zeros(0, np.int32), "token_pos": np.zeros(0, np.int32),
                    "step": np.zeros(0, np.int32), "phase": np.zeros(0, np.int8), "seq_lens": np.zeros(0, np.int64)}
        cat = {name: np.concatenate([getattr(b, name) for b in batches])
               for name in ("request_id", "token_pos", "step", "phase", "layer", "expert_ids", "gate_weights")}
        key = cat["request_id"].astype(np.int64) << 32 | cat["token_pos"].astype(np.int64)
        # token index in order of first appearance (execution order)
        uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        tok = rank[inv]
        T, L, K = len(uniq), self.meta.num_layers, self.meta.top_k
        experts = np.full((T, L, K), -1, dtype=np.int16)
        weights = np.full((T, L, K), np.nan, dtype=np.float32)
        experts[tok, cat["layer"]] = cat["expert_ids"]
        weights[tok, cat["layer"]] = cat["gate_weights"]
        first_row = first[order]
        out = {
            "experts": experts,
            "weights": weights,
            "request_id": cat["request_id"][first_row],
            "token_pos": cat["token_pos"][first_row],
            "step": cat["step"][first_row],
            "phase": cat["phase"][first_row],
        }
        _, req_first, req_counts = np.unique(out["request_id"], return_index=True, return_counts=True)
        out["seq_lens"] = req_counts[np.argsort(req_first, kind="stable")].astype(np.int64)
        for name in columns or []:
            vals = np.concatenate([b.extras[name] for b in batches])
            shape = (T, L) + vals.shape[1:]
            fill = np.nan if vals.dtype.kind == "f" else -1
            arr = np.full(shape, fill, dtype=vals.dtype if vals.dtype.kind == "f" else np.int64)
            arr[tok, cat["layer"]] = vals
            out[name] = arr
        return out

    # ----- selections ---------------------------------------------------------------------------------
    def select(self, layers: Sequence[int] | None = None, requests: Sequence[int] | None = None,
               phase: str | int | None = None) -> Trace:
        """A new in-memory trace restricted to some layers (renumbered from 0), requests or a phase."""
        table = self.to_table()
        mask = None

        def _and(m, new):
            return new if m is None else pa.compute.and_(m, new)

        import pyarrow.compute as pc

        meta = self.meta
        if requests is not None:
            mask = _and(mask, pc.is_in(table["request_id"], pa.array(list(requests), pa.int32())))
        if phase is not None:
            if self.is_counts:
                raise TraceError("a counts trace has no phases")
            code = PHASE_NAMES[phase] if isinstance(phase, str) else int(phase)
            mask = _and(mask, pc.equal(table["phase"], code))
        if layers is not None:
            layers = sorted(set(int(x) for x in layers))
            bad = [x for x in layers if not 0 <= x < meta.num_layers]
            if bad:
                raise TraceError(f"layer {bad[0]} is outside 0..{meta.num_layers - 1}")
            mask = _and(mask, pc.is_in(table["layer"], pa.array(layers, pa.int16())))
        if mask is not None:
            table = table.filter(mask)
        if layers is not None:
            remap = np.full(meta.num_layers, -1, dtype=np.int16)
            remap[layers] = np.arange(len(layers), dtype=np.int16)
            new_layer = remap[table["layer"].to_numpy()]
            table = table.set_column(table.schema.get_field_index("layer"), "layer", pa.array(new_layer, pa.int16()))

            def pick(sizes):
                return None if sizes is None else [sizes[i] for i in layers]

            meta = replace(meta, num_layers=len(layers), expert_bytes=pick(meta.expert_bytes),
                           dense_bytes=pick(meta.dense_bytes),
                           extra={**meta.extra, "layers_selected": layers})
        return Trace(meta, table=table)

    # ----- writing -------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> Path:
        """Write atomically (temporary file, then rename); return the path."""
        path = Path(path)
        with TraceWriter(path, self.meta, extra_schema=self._extra_schema(), row_group_rows=row_group_rows) as w:
            if self._table is not None:
                w.write_table(self._table)
            else:
                for rb in self._record_batches(row_group_rows, None):
                    w.write_table(pa.Table.from_batches([rb]))
        return path

    def _extra_schema(self) -> dict[str, pa.DataType]:
        schema = self._table.schema if self._table is not None else pq.read_schema(self.path)
        return {name: schema.field(name).type for name in self.extra_columns}

    def __repr__(self) -> str:
        where = self.path or "memory"
        return (f"Trace({self.meta.kind}, model={self.meta.model}, rows={self.num_rows}, "
                f"layers={self.meta.num_layers}, experts={self.meta.num_experts}, top_k={self.meta.top_k}, {where})")


def _default_steps(req_tok: np.ndarray, phase_tok: np.ndarray) -> np.ndarray:
    """One step for each request's prefill tokens together, one for each decode token."""
    if len(req_tok) == 0:
        return np.zeros(0, dtype=np.int32)
    same_req = np.r_[False, req_tok[1:] == req_tok[:-1]]
    both_prefill = np.r_[False, (phase_tok[1:] == PHASE_PREFILL) & (phase_tok[:-1] == PHASE_PREFILL)]
    new_step = ~(same_req & both_prefill)
    return (np.cumsum(new_step) - 1).astype(np.int32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class TraceWriter:
    """Stream rows into a trace file; the file appears (atomically) only when closed cleanly."""

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, extra_schema: dict[str, pa.DataType] | None = None,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS):
        self.path = Path(path)
        self.meta = meta
        if meta.kind == KIND_COUNTS:
            schema = counts_schema(meta.num_experts)
        else:
            known = optional_columns(meta.top_k)
            extra = {}
            for name, typ in (extra_schema or {}).items():
                # None means "the known type of this optional column"
                typ = typ or known.get(name)
                if typ is None:
                    raise TraceError(f"extra column {name!r} needs a type (it is not a known optional column)")
                extra[name] = typ
            schema = routing_schema(meta.top_k, extra)
        self.schema = schema.with_metadata(meta.to_kv())
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._ctx = None
        self._writer = None

    def __enter__(self) -> TraceWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
        return self

    def write_table(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += table.num_rows

    def write_rows(self, request_id, token_pos, step, phase, layer, expert_ids, gate_weights, **extras) -> None:
        """Append routing rows given as numpy arrays (validated first)."""
        layer = np.asarray(layer)
        expert_ids = np.asarray(expert_ids)
        gate_weights = np.asarray(gate_weights, dtype=np.float32)
        phase = np.asarray(phase, dtype=np.int8)
        validate_routing_rows(self.meta, layer, expert_ids, gate_weights, phase, str(self.path))
        k = self.meta.top_k
        cols = {
            "request_id": pa.array(np.asarray(request_id, np.int32)),
            "token_pos": pa.array(np.asarray(token_pos, np.int32)),
            "step": pa.array(np.asarray(step, np.int32)),
            "phase": pa.array(phase),
            "layer": pa.array(layer.astype(np.int16)),
            "expert_ids": _fixed_list(expert_ids.astype(np.int16), pa.list_(pa.int16(), k)),
            "gate_weights": _fixed_list(gate_weights, pa.list_(pa.float32(), k)),
        }
        for name in self.schema.names[len(ROUTING_BASE):]:
            if name not in extras:
                raise TraceError(f"write_rows: column {name!r} was declared but not given")
            typ = self.schema.field(name).type
            vals = np.asarray(extras[name])
            if pa.types.is_fixed_size_list(typ):
                cols[name] = _fixed_list(vals.astype(typ.value_type.to_pandas_dtype()), typ)
            else:
                cols[name] = pa.array(vals, typ)
        self._writer.write_table(pa.table(cols, schema=self.schema), row_group_size=self.row_group_rows)
        self.rows += len(layer)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        # on an exception atomic_path deletes the temporary file and the exception propagates
        self._ctx.__exit__(exc_type, exc, tb)


def concat(traces: Sequence[Trace]) -> Trace:
    """Concatenate routing traces of one model: request ids and steps are renumbered to stay unique."""
    if not traces:
        raise TraceError("concat needs at least one trace")
    first = traces[0].meta
    for t in traces[1:]:
        m = t.meta
        if (m.kind, m.num_layers, m.num_experts, m.top_k) != (first.kind, first.num_layers, first.num_experts, first.top_k):
            raise TraceError(
                f"cannot concatenate traces of different shapes: {first.num_layers}x{first.num_experts} top-{first.top_k} "
                f"vs {m.num_layers}x{m.num_experts} top-{m.top_k}"
            )
    tables = []
    req_offset = step_offset = 0
    common = set(traces[0].extra_columns)
    for t in traces[1:]:
        common &= set(t.extra_columns)
    for t in traces:
        table = t.to_table()
        drop = [c for c in t.extra_columns if c not in common]
        table = table.drop_columns(drop)
        req = table["request_id"].to_numpy()
        table = table.set_column(0, "request_id", pa.array(req + req_offset, pa.int32()))
        req_offset += int(req.max()) + 1 if len(req) else 0
        if not t.is_counts:
            step = table["step"].to_numpy()
            table = table.set_column(2, "step", pa.array(step + step_offset, pa.int32()))
            step_offset += int(step.max()) + 1 if len(step) else 0
        tables.append(table.replace_schema_metadata(None))
    meta = replace(first, source="concat", extra={**first.extra, "concat_sources": [t.meta.source for t in traces]})
    return Trace(meta, table=pa.concat_tables(tables))
