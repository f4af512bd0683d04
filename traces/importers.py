"""Importers and exporters: other tools' routing records <-> moesim traces.

One reader per format, registered by name in ``FORMATS``; each turns one input (a file or a
folder) into a ``moesim.traces.Trace`` and raises ``TraceError`` with one line naming the first
problem when the input does not follow its format. ``EXPORTERS`` writes traces back out.

Formats (see docs/trace-formats.md for the exact shapes):

- ``arrays-npz``: numpy ``experts[T, L, K]``, ``weights``, ``seq_lens``, ``meta`` (JSON), as
  in the ESFT DeepSeek-V2-Lite recordings; also what ``export`` writes.
- ``route-trace-v1``: the CSV of an expert-streaming llama.cpp engine, with residency and bytes.
- ``sglang-per-token``: SGLang's expert-distribution recorder ``per_token`` dump (``.pt``).
- ``sglang-routed-experts``: SGLang's per-request ``routed_experts`` (base64 int32, JSON lines).
- ``vllm-routed-experts``: vLLM's per-request ``routed_experts`` arrays ``[seq_len, L, K]``.
- ``moe-infinity``: MoE-Infinity-style activation counts ``[sequences, layers, experts]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import TraceError, unknown_name
from moesim.fileio import atomic_path
from moesim.model import ALIASES, PRESETS, MoEModel, get_model
from moesim.traces.schema import (
    KIND_COUNTS,
    PHASE_DECODE,
    PHASE_PREFILL,
    TraceMeta,
)
from moesim.traces.trace import Trace

# Expert ids are int16 in the trace schema.
MAX_EXPERTS = 1 << 15
# Prefix of optional trace columns inside an arrays-npz archive (col_residency, ...).
NPZ_COLUMN_PREFIX = "col_"
# Per-token weight sums within this of 1 mean the weights were renormalised over the top-k.
_NORMALISED_TOL = 1e-2


Reader = Callable[[Path, "MoEModel | None"], Trace]


@dataclass(frozen=True)
class Format:
    """An import format: its name, what INPUT is, and the reader."""

    name: str
    summary: str
    read: Reader


FORMATS: dict[str, Format] = {}


def register_format(name: str, summary: str) -> Callable[[Reader], Reader]:
    def wrap(read: Reader) -> Reader:
        FORMATS[name] = Format(name, summary, read)
        return read

    return wrap


def format_names() -> list[str]:
    return sorted(FORMATS)


def import_trace(path, fmt: str, model: str | None = None) -> Trace:
    """Read ``path`` in format ``fmt``; ``model`` (a preset name) supplies facts the file lacks
    (expert count, top-k, shared experts) and is checked against what the file holds."""
    if fmt not in FORMATS:
        raise unknown_name("trace format", fmt, FORMATS)
    preset = get_model(model) if model else None
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file or folder")
    return FORMATS[fmt].read(path, preset)


# ----- shared helpers ----------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _need_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, expected {what}")


def _as_int(value, what: str, where: str, minimum: int = 0) -> int:
    """A JSON/header value that must be an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        else:
            raise TraceError(f"{where}: {what} must be an integer, got {value!r}"[:300])
    if int(value) < minimum:
        raise TraceError(f"{where}: {what} must be >= {minimum}, got {value}")
    return int(value)


def _int_array(arr, what: str, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size == 0 and arr.dtype.kind in "biuf":  # an empty list reads as float64
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{where}: {what} must hold integers, got dtype {arr.dtype}")
    return arr


def _int32_range(arr: np.ndarray, what: str, where: str) -> np.ndarray:
    """Ids, steps and positions are int32 in the schema and never negative."""
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise TraceError(f"{where}: {what} must be between 0 and 2^31-1")
    return arr


def _preset_named_in(text: str, num_layers: int, num_experts: int) -> MoEModel | None:
    """The preset whose name appears in ``text`` and whose MoE layers and experts match."""
    norm = re.sub(r"[\s_]+", "-", text.lower())
    names = sorted(list(PRESETS) + list(ALIASES), key=len, reverse=True)
    for name in names:
        if name in norm:
            model = get_model(name)
            if (model.moe_layers, model.num_experts) == (num_layers, num_experts):
                return model
    return None


def _check_preset(preset: MoEModel, num_layers: int | None, num_experts: int | None,
                  where: str) -> None:
    if num_experts is not None and num_experts != preset.num_experts:
        raise TraceError(f"{where}: holds {num_experts} experts per layer, but model preset "
                         f"{preset.name} has {preset.num_experts}; pick the matching --model")
    if num_layers is not None and num_layers != preset.moe_layers:
        raise TraceError(f"{where}: holds {num_layers} MoE layers, but model preset "
                         f"{preset.name} has {preset.moe_layers}; pick the matching --model")


def _model_fields(preset: MoEModel | None, hint: str, num_layers: int, num_experts: int,
                  top_k: int, where: str) -> dict:
    """TraceMeta fields naming the model: from --model, else a preset named in ``hint`` with
    matching dimensions, else the hint itself. Notes the model's own top-k where the run
    overrode it (the phone run used top-6 on an 8-expert model)."""
    if preset is not None:
        _check_preset(preset, num_layers, num_experts, where)
        found = preset
    else:
        found = _preset_named_in(hint, num_layers, num_experts) if hint else None
    if found is None:
        return {"model": hint or "unknown", "extra": {}}
    extra = {"top_k_of_model": found.top_k} if found.top_k != top_k else {}
    return {"model": found.name, "shared_experts": found.shared_experts, "extra": extra}


def _phase_from_prompt_len(n: int, prompt_len: int | None) -> np.ndarray:
    """Tokens before ``prompt_len`` are prefill, the rest decode (all prefill if unknown)."""
    phase = np.full(n, PHASE_PREFILL, dtype=np.int8)
    if prompt_len is not None:
        phase[min(prompt_len, n):] = PHASE_DECODE
    return phase


def _drop_unrouted_layers(experts: np.ndarray, where: str) -> tuple[np.ndarray, list[int]]:
    """Drop layers whose ids are -1 for every token (dense layers in a per-model-layer array)."""
    used = (experts >= 0).any(axis=(0, 2))
    if not used.any():
        raise TraceError(f"{where}: no routed expert ids at all (every id is -1)")
    kept = np.flatnonzero(used).tolist()
    return experts[:, used], kept


def _trim_padded_slots(experts: np.ndarray, where: str) -> np.ndarray:
    """Cut -1 padding slots (SGLang pads top-k to 8); a routed row must fill its first k slots."""
    valid = experts >= 0
    k = int(valid.sum(axis=2).max()) if experts.size else 0
    if k == 0:
        raise TraceError(f"{where}: no routed expert ids at all (every id is -1)")
    if valid[..., k:].any():
        t, layer = np.argwhere(valid[..., k:].any(axis=2))[0]
        raise TraceError(f"{where}: token {t} layer {layer} has an expert id after a -1 slot")
    trimmed = experts[..., :k]
    counts = valid[..., :k].sum(axis=2)
    ragged = (counts > 0) & (counts < k)
    if ragged.any():
        t, layer = np.argwhere(ragged)[0]
        raise TraceError(f"{where}: token {t} layer {layer} has {counts[t, layer]} expert ids, "
                         f"others have {k} (ragged top-k)")
    return trimmed


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and values of runs of equal consecutive values."""
    if len(values) == 0:
        return np.zeros(0, np.int64), values[:0]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    return lengths, values[starts]


def _load_npy(source, where: str) -> np.ndarray:
    try:
        arr = np.load(source, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises anything ast/tokenize can
        raise TraceError(f"{where}: not a readable .npy array ({_first_line(exc)})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise TraceError(f"{where}: is an .npz archive, expected one .npy array")
    return arr


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, loaded now so damage surfaces here as a TraceError."""
    _need_file(path, "an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise TraceError(f"{path}: is a single .npy array, expected an .npz archive")
            return {name: npz[name] for name in npz.files}
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, zlib and .npy header damage raise many types
        raise TraceError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None


def _read_text(path: Path) -> str:
    _need_file(path, "a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({_first_line(exc)})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({_first_line(exc)})") from None


def _json_records(path: Path) -> list:
    """A JSON document (an object or a list of objects) or JSON lines, as a list of records."""
    text = _read_text(path).strip()
    if not text:
        raise TraceError(f"{path}: is empty")
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        pass
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: line {lineno} is not JSON ({_first_line(exc)})") from None
    return records


def _b64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise TraceError(f"{where}: routed_experts must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TraceError(f"{where}: routed_experts is not valid base64 ({_first_line(exc)})") from None


def _find_key(obj, key: str, depth: int = 3):
    """The value of ``key`` in a JSON object or the objects nested in it (breadth first)."""
    level = [obj]
    for _ in range(depth + 1):
        nxt = []
        for item in level:
            if isinstance(item, dict):
                if key in item:
                    return item[key]
                nxt.extend(v for v in item.values() if isinstance(v, (dict, list)))
            elif isinstance(item, list):
                nxt.extend(v for v in item if isinstance(v, (dict, list)))
        level = nxt
    return None


_PROMPT_LEN_KEYS = ("prompt_len", "num_prompt_tokens", "prompt_tokens")


def _prompt_len_of(record, where: str) -> int | None:
    for key in _PROMPT_LEN_KEYS:
        value = _find_key(record, key)
        if value is not None:
            return _as_int(value, key, where)
    return None


def _routing_meta(experts: np.ndarray, preset: MoEModel | None, hint: str, where: str,
                  num_experts: int | None = None, **fields) -> TraceMeta:
    """Metadata of a routing trace built from ``experts[T, L, K]`` whose expert count may be
    unknown (then: the preset's, else the largest id + 1, marked as inferred)."""
    _, L, K = experts.shape
    extra = fields.pop("extra", {})
    if num_experts is None:
        if preset is not None:
            num_experts = preset.num_experts
        else:
            num_experts = int(experts.max()) + 1
            extra["num_experts_inferred"] = True
    model = _model_fields(preset, hint, L, num_experts, K, where)
    extra.update(model.pop("extra"))
    try:
        return TraceMeta(num_layers=L, num_experts=num_experts, top_k=K, extra=extra,
                         **model, **fields)
    except TypeError as exc:  # pragma: no cover - programming error in a reader
        raise TraceError(f"{where}: bad metadata ({exc})") from None


# ----- arrays-npz --------------------------------------------------------------------------------
def _npz_meta(arrays: dict[str, np.ndarray], path: Path) -> dict:
    if "meta" not in arrays:
        return {}
    raw = arrays["meta"]
    if raw.ndim != 0 or raw.dtype.kind not in "US":
        raise TraceError(f"{path}: key 'meta' must be one JSON string, got {raw.dtype} {raw.shape}")
    value = raw.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        meta = json.loads(value)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: key 'meta' is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{path}: key 'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


def _first_int(meta: dict, keys: tuple[str, ...], where: str) -> int | None:
    for key in keys:
        if key in meta and not isinstance(meta[key], str):
            return _as_int(meta[key], f"meta {key}", where, minimum=1)
    return None


def _infer_weight_norm(experts: np.ndarray, weights: np.ndarray) -> str:
    present = experts[:, :, 0] >= 0
    sums = weights[present].astype(np.float64).sum(axis=-1)
    if sums.size and np.all(np.abs(sums - 1.0) <= _NORMALISED_TOL):
        return "normalised"
    return "raw"


def _npz_extras(arrays: dict[str, np.ndarray], T: int, L: int, path: Path) -> dict:
    extras = {}
    for key, arr in arrays.items():
        if not key.startswith(NPZ_COLUMN_PREFIX):
            continue
        name = key[len(NPZ_COLUMN_PREFIX):]
        if arr.dtype.kind not in "iuf" or arr.ndim not in (2, 3) or arr.shape[:2] != (T, L):
            raise TraceError(f"{path}: column array {key!r} has {arr.dtype} shape {arr.shape}, "
                             f"expected numbers of shape ({T}, {L}[, width])")
        extras[name] = arr
    return extras


@register_format("arrays-npz", "numpy .npz: experts[T,L,K], weights, seq_lens, meta JSON (ESFT)")
def read_arrays_npz(path: Path, preset: MoEModel | None) -> Trace:
    arrays = _load_npz(path)
    where = str(path)
    if "experts" not in arrays:
        raise TraceError(f"{path}: no 'experts' array (keys: {', '.join(arrays) or 'none'})")
    experts = _int_array(arrays["experts"], "experts", where)
    if experts.ndim != 3 or 0 in experts.shape[1:]:
        raise TraceError(f"{path}: experts must be [tokens, layers, top_k], got shape {experts.shape}")
    T, L, K = experts.shape
    weights = arrays.get("weights")
    if weights is not None:
        if weights.dtype.kind != "f":
            raise TraceError(f"{path}: weights must hold floats, got dtype {weights.dtype}")
        if weights.shape != experts.shape:
            raise TraceError(f"{path}: weights has shape {weights.shape}, experts {experts.shape}")
        weights = np.where(experts >= 0, weights, 0).astype(np.float32)
    seq_lens = arrays.get("seq_lens")
    if seq_lens is not None:
        seq_lens = _int_array(seq_lens, "seq_lens", where)
        if seq_lens.ndim != 1:
            raise TraceError(f"{path}: seq_lens must be one length per sequence, got shape {seq_lens.shape}")
    per_token = {}
    for key in ("phase", "step", "token_pos"):
        if key in arrays:
            arr = _int_array(arrays[key], key, where)
            if arr.shape != (T,):
                raise TraceError(f"{path}: {key} has shape {arr.shape}, expected ({T},)")
            per_token[key] = _int32_range(arr, key, where)
    request_ids = arrays.get("request_ids")
    if request_ids is not None:
        request_ids = _int32_range(_int_array(request_ids, "request_ids", where), "request_ids", where)
    extras = _npz_extras(arrays, T, L, path)
    meta_json = _npz_meta(arrays, path)

    if isinstance(meta_json.get("moesim"), dict):  # written by moesim: restore it exactly
        try:
            meta = TraceMeta(**meta_json["moesim"])
        except TypeError as exc:
            raise TraceError(f"{path}: bad moesim metadata ({_first_line(exc)})") from None
        if preset is not None:
            _check_preset(preset, meta.num_layers, meta.num_experts, where)
    else:
        meta = _npz_foreign_meta(meta_json, experts, weights, preset, path)
    phase = per_token.get("phase")
    if phase is None:
        phase_text = str(meta_json.get("phase", "")).lower()
        decode_only = "decode" in phase_text and "prefill" not in phase_text
        phase = "decode" if decode_only else "prefill"
    elif phase.size and (phase.min() < 0 or phase.max() > 1):
        raise TraceError(f"{path}: phase must be 0 (prefill) or 1 (decode)")
    return Trace.from_arrays(experts, weights, seq_lens, phase, meta, steps=per_token.get("step"),
                             request_ids=request_ids, token_pos=per_token.get("token_pos"),
                             extras=extras)


def _npz_foreign_meta(meta_json: dict, experts: np.ndarray, weights, preset, path: Path) -> TraceMeta:
    where = str(path)
    _, L, K = experts.shape
    layers = _first_int(meta_json, ("num_layers", "layers", "moe_layers"), where)
    if layers is not None and layers != L:
        raise TraceError(f"{path}: meta says {layers} layers, experts has {L}")
    top_k = _first_int(meta_json, ("top_k", "num_experts_per_tok"), where)
    if top_k is not None and top_k != K:
        raise TraceError(f"{path}: meta says top_k {top_k}, experts has {K} slots")
    num_experts = _first_int(meta_json, ("num_experts", "n_routed_experts", "experts"), where)
    fields = {"source": "arrays-npz", "extra": {"npz_meta": meta_json}}
    if weights is None:
        fields["weight_norm"] = "none"
    elif isinstance(meta_json.get("weight_norm"), str):
        fields["weight_norm"] = meta_json["weight_norm"]
    else:
        fields["weight_norm"] = _infer_weight_norm(experts, weights)
        fields["extra"]["weight_norm_inferred"] = True
    meta = _routing_meta(experts, preset, str(meta_json.get("model", "")), where,
                         num_experts=num_experts, **fields)
    shared = _first_int(meta_json, ("shared_experts", "n_shared_experts"), where)
    if shared is not None:
        meta.shared_experts = shared
    return meta


# ----- route-trace-v1 ----------------------------------------------------------------------------
_ROUTE_REQUIRED = ("phase", "step", "layer", "slot", "expert", "weight")
_ROUTE_INT_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "residency",
                      "expert_bytes")


def _header_pairs(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.lstrip("#").split() if "=" in tok)


@register_format("route-trace-v1", "CSV 'route_trace v1' of an expert-streaming engine "
                 "(phase, residency, bytes read)")
def read_route_trace(path: Path, preset: MoEModel | None) -> Trace:
    import pandas as pd

    where = str(path)
    lines = _read_text(path).splitlines()
    if not lines or lines[0].strip() != "# route_trace v1":
        raise TraceError(f"{path}: not a route_trace v1 file (the first line must be '# route_trace v1')")
    header: dict[str, str] = {}
    layer_sizes: dict[int, tuple[int, int]] = {}
    body_start = len(lines)
    for i, line in enumerate(lines[1:], 1):
        if not line.startswith("#"):
            body_start = i
            break
        pairs = _header_pairs(line)
        if "layer" in pairs:
            layer = _as_int(pairs["layer"], "layer", f"{where}: header line {i + 1}")
            layer_sizes[layer] = tuple(
                _as_int(pairs.get(key), key, f"{where}: header line {i + 1}")
                for key in ("expert_bytes", "dense_bytes"))
        else:
            header.update(pairs)
    for key in ("n_layer", "n_expert", "n_expert_used"):
        if key not in header:
            raise TraceError(f"{path}: header line '# ... {key}=N' is missing")
    L = _as_int(header["n_layer"], "n_layer", where, minimum=1)
    E = _as_int(header["n_expert"], "n_expert", where, minimum=1)
    K = _as_int(header["n_expert_used"], "n_expert_used", where, minimum=1)
    if K > E:
        raise TraceError(f"{path}: n_expert_used={K} exceeds n_expert={E}")
    if E > MAX_EXPERTS:
        raise TraceError(f"{path}: n_expert={E} exceeds the {MAX_EXPERTS} expert ids a trace holds")
    if body_start >= len(lines):
        raise TraceError(f"{path}: no CSV header and rows after the comment lines")
    try:
        df = pd.read_csv(io.StringIO("\n".join(lines[body_start:])), keep_default_na=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TraceError(f"{path}: malformed CSV ({_first_line(exc)})") from None
    missing = [c for c in _ROUTE_REQUIRED if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: CSV column {missing[0]!r} is missing (header: {','.join(df.columns)})"[:300])
    if len(df) == 0:
        raise TraceError(f"{path}: holds no routing rows")
    cols = {}
    for name in (*_ROUTE_INT_COLUMNS, "weight"):
        if name not in df.columns:
            continue
        column = df[name]
        if column.dtype.kind not in "iuf":  # a stray text cell: parse what is numeric, flag the rest
            column = pd.to_numeric(column.astype(str).str.strip(), errors="coerce")
        values = column.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if name != "weight":
            bad |= values != np.round(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TraceError(f"{path}: data row {row + 1}: column {name!r} holds "
                             f"{df[name].iloc[row]!r}, expected a {'number' if name == 'weight' else 'whole number'}"[:300])
        if name != "weight" and np.abs(values).max() >= 2**53:
            raise TraceError(f"{path}: column {name!r} holds a value too large to be a count or id")
        cols[name] = values if name == "weight" else values.astype(np.int64)
    _check_route_ranges(cols, L, E, K, path)
    turn = cols.get("turn", np.zeros(len(df), dtype=np.int64))
    step = cols["step"]
    # tokens are (turn, absolute position); execution order is turn, then position
    span = int(step.max()) + 1  # one int64 key per token: turn-major, then position
    keys, tok = np.unique(turn * span + step, return_inverse=True)
    tok = tok.reshape(-1)
    tok_keys = np.stack([keys // span, keys % span], axis=1)
    T = len(tok_keys)
    if T * L * K > 64 * len(df) + (1 << 20):
        raise TraceError(f"{path}: the header's n_layer={L} x n_expert_used={K} is far larger "
                         f"than its {len(df)} rows fill; check the header")
    cell = (tok * L + cols["layer"]) * K + cols["slot"]
    order = np.argsort(cell, kind="stable")
    uniq = cell[order]
    repeats = order[1:][uniq[1:] == uniq[:-1]]
    if len(repeats):
        row = int(repeats.min())
        raise TraceError(f"{path}: data row {row + 1} repeats a (turn, step, layer, slot)")
    slots_per_cell = np.bincount(uniq // K, minlength=T * L)
    partial = np.flatnonzero((slots_per_cell > 0) & (slots_per_cell < K))
    if len(partial):
        t, layer = divmod(int(partial[0]), L)
        raise TraceError(f"{path}: token at step {tok_keys[t][1]} layer {layer} has "
                         f"{slots_per_cell[partial[0]]} slots, expected {K}")
    phase_tok = np.zeros(T, dtype=np.int8)
    phase_tok[tok] = cols["phase"]
    if (phase_tok[tok] != cols["phase"]).any():
        row = int(np.flatnonzero(phase_tok[tok] != cols["phase"])[0])
        raise TraceError(f"{path}: data row {row + 1}: one token's rows disagree on phase")

    experts = np.full((T, L, K), -1, dtype=np.int16)
    weights = np.zeros((T, L, K), dtype=np.float32)
    idx = (tok, cols["layer"], cols["slot"])
    experts[idx] = cols["expert"]
    weights[idx] = cols["weight"]
    extras = {}
    if "residency" in cols:
        extras["residency"] = np.zeros((T, L, K), dtype=np.int8)
        extras["residency"][idx] = cols["residency"]
    if "expert_bytes" in cols:
        extras["read_bytes"] = np.zeros((T, L, K), dtype=np.int64)
        extras["read_bytes"][idx] = cols["expert_bytes"]

    expert_bytes = dense_bytes = None
    if layer_sizes:
        if sorted(layer_sizes) != list(range(L)):
            raise TraceError(f"{path}: header gives byte sizes for {len(layer_sizes)} layers "
                             f"(ids {min(layer_sizes)}..{max(layer_sizes)}), expected all {L}")
        expert_bytes = [layer_sizes[i][0] for i in range(L)]
        dense_bytes = [layer_sizes[i][1] for i in range(L)]
    hint = " ".join(header.get(k, "") for k in ("model", "arch"))
    capture = {"format": "route_trace v1", **{k: v for k, v in header.items()
                                               if k not in ("n_layer", "n_expert", "n_expert_used")}}
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=K, weight_norm="normalised",
                     source="route-trace-v1", expert_bytes=expert_bytes, dense_bytes=dense_bytes,
                     capture=capture, **_model_fields(preset, hint, L, E, K, where))
    req_tok = tok_keys[:, 0]
    seq_lens, request_ids = _runs(req_tok)
    if request_ids.size and (request_ids.min() < 0 or request_ids.max() > np.iinfo(np.int32).max):
        raise TraceError(f"{path}: turn numbers must be between 0 and 2^31-1")
    return Trace.from_arrays(experts, weights, seq_lens, phase_tok, meta, request_ids=request_ids,
                             token_pos=tok_keys[:, 1], extras=extras)


def _check_route_ranges(cols: dict, L: int, E: int, K: int, path: Path) -> None:
    limits = {"turn": (0, 2**31 - 1), "phase": (0, 1), "step": (0, 2**31 - 1),
              "layer": (0, L - 1), "slot": (0, K - 1), "expert": (0, E - 1),
              "residency": (0, 2), "expert_bytes": (0, 2**62)}
    for name, (lo, hi) in limits.items():
        if name not in cols:
            continue
        bad = (cols[name] < lo) | (cols[name] > hi)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TraceError(f"{path}: data row {row + 1}: {name} {cols[name][row]} is "
                             f"outside {lo}..{hi}")


# ----- SGLang per_token dumps --------------------------------------------------------------------
# ForwardMode values of SGLang's forward_batch_info (EXTEND=1, DECODE=2, MIXED=3, IDLE=4);
# later values are speculative-decoding passes, which this importer does not model.
SGLANG_EXTEND, SGLANG_DECODE, SGLANG_MIXED, SGLANG_IDLE = 1, 2, 3, 4


def _torch_load(path: Path):
    try:
        import torch
    except ImportError:
        raise TraceError("reading SGLang .pt dumps needs torch: pip install 'moesim[capture]' "
                         "(or torch alone)") from None
    _need_file(path, "a torch.save .pt file")
    try:
        # weights_only: a dump holds tensors, lists and numbers; never run pickled code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many unrelated types on bad bytes
        raise TraceError(f"{path}: not a readable torch .pt file ({_first_line(exc)})") from None


def _opt_int(value, what: str, where: str) -> int | None:
    """An optional integer field that may arrive as a Python int, numpy or 0-d tensor."""
    if value is None:
        return None
    arr = _to_numpy(value, what, where)
    if arr.ndim != 0 or arr.dtype.kind not in "iu":
        raise TraceError(f"{where}: {what} must be one integer, got {str(value)[:40]!r}")
    return int(arr)


def _to_numpy(value, what: str, where: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise TraceError(f"{where}: {what} is not an array ({_first_line(exc)})") from None


class _RequestLinker:
    """Rebuilds request identity, which SGLang's per_token records do not hold.

    A token segment starting at position 0 opens a new request; one starting at p > 0 continues
    the earliest-opened request whose last token was at p - 1 and that has not yet run in this
    pass, else opens a new request (a prefix-cache hit or a request begun before recording)."""

    def __init__(self) -> None:
        self.next_id = 0
        self.waiting: dict[int, deque[int]] = defaultdict(deque)  # last position -> requests
        self._pending: list[tuple[int, int]] = []  # (last position, request) of this pass

    def assign(self, first_pos: int, last_pos: int) -> tuple[int, bool]:
        queue = self.waiting.get(first_pos - 1) if first_pos > 0 else None
        if queue:
            req, continued = queue.popleft(), True
        else:
            req, continued = self.next_id, False
            self.next_id += 1
        self._pending.append((last_pos, req))
        return req, continued

    def begin_pass(self) -> None:
        self._pending = []

    def end_pass(self) -> None:
        for last_pos, req in self._pending:
            self.waiting[last_pos].append(req)


@register_format("sglang-per-token", "SGLang expert-distribution recorder per_token dump (.pt)")
def read_sglang_per_token(path: Path, preset: MoEModel | None) -> Trace:
    where = str(path)
    dump = _torch_load(path)
    if not isinstance(dump, dict) or not isinstance(dump.get("records"), list):
        raise TraceError(f"{path}: not an SGLang per_token dump (expected a dict with a 'records' list)")
    for i, rec in enumerate(dump["records"]):
        if not isinstance(rec, dict):
            raise TraceError(f"{path}: record {i} is a {type(rec).__name__}, expected a dict")
    # only the primary gatherer records whole passes (others are two-batch-overlap halves)
    records = [r for r in dump["records"] if r.get("gatherer_key", "primary") == "primary"]
    if not records:
        raise TraceError(f"{path}: the dump holds no records of the primary gatherer")
    pass_ids = [_opt_int(r.get("forward_pass_id"), "forward_pass_id", f"{where}: record {i}")
                for i, r in enumerate(records)]
    order = sorted(range(len(records)), key=lambda i: pass_ids[i] or 0)  # stable
    records = [records[i] for i in order]

    linker = _RequestLinker()
    blocks, steps, positions, phases, reqs = [], [], [], [], []
    width = num_layers = None
    step = 0
    for i, rec in enumerate(records):
        rwhere = f"{where}: record {i}"
        if "topk_ids_of_layer" not in rec or "positions" not in rec:
            raise TraceError(f"{rwhere} has no topk_ids_of_layer/positions: record the dump with "
                             "--expert-distribution-recorder-mode per_token")
        ids = _int_array(_to_numpy(rec["topk_ids_of_layer"], "topk_ids_of_layer", rwhere),
                         "topk_ids_of_layer", rwhere)
        pos = _int_array(_to_numpy(rec["positions"], "positions", rwhere), "positions", rwhere)
        if ids.ndim != 3 or pos.ndim != 1 or ids.shape[1] != len(pos):
            raise TraceError(f"{rwhere}: topk_ids_of_layer {ids.shape} does not match "
                             f"{pos.shape} positions ([layers, tokens, slots] expected)")
        if num_layers is None:
            num_layers, width = ids.shape[0], ids.shape[2]
        elif (ids.shape[0], ids.shape[2]) != (num_layers, width):
            raise TraceError(f"{rwhere}: topk_ids_of_layer has {ids.shape[0]} layers x "
                             f"{ids.shape[2]} slots, earlier records {num_layers} x {width}")
        n = len(pos)
        mode = _opt_int(rec.get("forward_mode"), "forward_mode", rwhere)
        if n == 0 or mode == SGLANG_IDLE:
            continue
        if isinstance(mode, int) and mode > SGLANG_IDLE:
            raise TraceError(f"{rwhere}: forward_mode {mode} (speculative decoding) is not supported")
        if pos.min() < 0:
            raise TraceError(f"{rwhere}: negative token position")
        segments, seg_phase = _sglang_segments(rec.get("extend_seq_lens"), n, mode, rwhere)
        linker.begin_pass()
        req_tok = np.empty(n, dtype=np.int64)
        phase_tok = np.empty(n, dtype=np.int8)
        for (start, length), phase in zip(segments, seg_phase, strict=True):
            req, continued = linker.assign(int(pos[start]), int(pos[start + length - 1]))
            req_tok[start:start + length] = req
            # in a mixed pass a one-token segment that continues a request is a decode token
            is_decode = phase == PHASE_DECODE or (mode == SGLANG_MIXED and length == 1 and continued)
            phase_tok[start:start + length] = PHASE_DECODE if is_decode else PHASE_PREFILL
        linker.end_pass()
        blocks.append(np.transpose(ids, (1, 0, 2)))
        steps.append(np.full(n, step, dtype=np.int64))
        positions.append(pos.astype(np.int64))
        phases.append(phase_tok)
        reqs.append(req_tok)
        step += 1
    if not blocks:
        raise TraceError(f"{path}: the dump holds no tokens (only idle passes)")
    experts = np.concatenate(blocks)
    steps, positions, phases, reqs = (np.concatenate(x) for x in (steps, positions, phases, reqs))
    # schema order: by step, then request, then position
    order = np.lexsort((positions, reqs, steps))
    experts, steps, positions, phases, reqs = (x[order] for x in (experts, steps, positions, phases, reqs))

    experts = _map_physical_to_logical(experts, dump.get("last_physical_to_logical_map"), where)
    id_space = "logical" if dump.get("last_physical_to_logical_map") is not None else "physical"
    experts, kept_layers = _drop_unrouted_layers(experts, where)
    experts = _trim_padded_slots(experts, where)
    extra = {"model_layers": kept_layers, "request_ids": "reconstructed from positions",
             "slot_order": "as recorded by SGLang (top-k order)"}
    meta = _routing_meta(experts, preset, "", where, source="sglang-per-token",
                         weight_norm="none", expert_id_space=id_space, extra=extra)
    seq_lens, request_ids = _runs(reqs)
    return Trace.from_arrays(experts, None, seq_lens, phases, meta, steps=steps,
                             request_ids=request_ids, token_pos=positions)


def _sglang_segments(extend_seq_lens, n: int, mode, where: str):
    """(start, length) of each request's tokens in one pass, and their nominal phase."""
    if extend_seq_lens is None or mode == SGLANG_DECODE:
        return [(i, 1) for i in range(n)], [PHASE_DECODE] * n
    lens = _int_array(_to_numpy(extend_seq_lens, "extend_seq_lens", where), "extend_seq_lens", where)
    if lens.ndim != 1 or (lens <= 0).any() or int(lens.sum()) != n:
        raise TraceError(f"{where}: extend_seq_lens {np.ravel(lens).tolist()[:8]} do not split "
                         f"its {n} tokens")
    starts = np.cumsum(lens) - lens
    return list(zip(starts.tolist(), lens.tolist(), strict=True)), [PHASE_PREFILL] * len(lens)


def _map_physical_to_logical(experts: np.ndarray, p2l, where: str) -> np.ndarray:
    """SGLang records physical expert ids; its dump carries the physical -> logical map [L, P]."""
    if p2l is None:
        return experts
    p2l = _int_array(_to_numpy(p2l, "last_physical_to_logical_map", where),
                     "last_physical_to_logical_map", where)
    L = experts.shape[1]
    if p2l.ndim != 2 or p2l.shape[0] != L:
        raise TraceError(f"{where}: last_physical_to_logical_map has shape {p2l.shape}, "
                         f"expected ({L}, physical experts)")
    if experts.size and experts.max() >= p2l.shape[1]:
        raise TraceError(f"{where}: physical expert id {int(experts.max())} is outside the "
                         f"map's 0..{p2l.shape[1] - 1}")
    layer = np.broadcast_to(np.arange(L)[None, :, None], experts.shape)
    mapped = p2l[layer, np.maximum(experts, 0)]
    return np.where(experts >= 0, mapped, -1)


# ----- SGLang / vLLM per-request routed_experts --------------------------------------------------
@register_format("sglang-routed-experts", "SGLang per-request routed_experts: JSON (lines) with "
                 "base64 int32 [tokens, layers, top_k]")
def read_sglang_routed(path: Path, preset: MoEModel | None) -> Trace:
    where = str(path)
    records = _json_records(path)
    arrays, prompt_lens, names, starts = [], [], [], []
    for i, rec in enumerate(records):
        rwhere = f"{where}: record {i}"
        payload = rec if isinstance(rec, str) else _find_key(rec, "routed_experts")
        if payload is None:
            raise TraceError(f"{rwhere} has no 'routed_experts' (request it with return_routed_experts)")
        raw = _b64(payload, rwhere)
        if len(raw) % 4:
            raise TraceError(f"{rwhere}: routed_experts holds {len(raw)} bytes, not whole int32 values")
        flat = np.frombuffer(raw, dtype="<i4")
        if flat.size == 0:
            raise TraceError(f"{rwhere}: routed_experts is empty")
        L = _find_key(rec, "num_layers") if isinstance(rec, dict) else None
        K = _find_key(rec, "top_k") if isinstance(rec, dict) else None
        if L is None or K is None:
            if preset is None:
                raise TraceError(f"{rwhere}: routed_experts is flat; pass --model PRESET (or give "
                                 "num_layers and top_k in the record) to know its shape")
            L, K = preset.num_layers, preset.top_k
        L, K = _as_int(L, "num_layers", rwhere, 1), _as_int(K, "top_k", rwhere, 1)
        if flat.size % (L * K):
            raise TraceError(f"{rwhere}: {flat.size} ids are not whole tokens of {L} layers x top-{K}")
        arrays.append(flat.reshape(-1, L, K))
        prompt_lens.append(_prompt_len_of(rec, rwhere) if isinstance(rec, dict) else None)
        # the response covers positions [routed_experts_start_len, seq_len - 1)
        start = _find_key(rec, "routed_experts_start_len") if isinstance(rec, dict) else None
        starts.append(0 if start is None else _as_int(start, "routed_experts_start_len", rwhere))
        rid = _find_key(rec, "id") if isinstance(rec, dict) else None
        names.append(str(rid) if rid is not None else str(i))
    return _per_request_trace(arrays, prompt_lens, names, preset, where, "sglang-routed-experts",
                              starts)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@register_format("vllm-routed-experts", "vLLM per-request routed_experts [seq_len, layers, top_k]: "
                 ".npy, a folder of .npy, an .npz, or JSON lines of base64 .npy")
def read_vllm_routed(path: Path, preset: MoEModel | None) -> Trace:
    where = str(path)
    prompt_map: dict[str, int] = {}
    if path.is_dir():
        files = sorted(path.glob("*.npy"), key=lambda p: _natural_key(p.name))
        if not files:
            raise TraceError(f"{path}: folder holds no .npy files")
        names = [p.stem for p in files]
        arrays = [_load_npy(p, str(p)) for p in files]
        side = path / "prompt_lens.json"
        if side.exists():
            doc = _json_records(side)
            if len(doc) != 1 or not isinstance(doc[0], dict):
                raise TraceError(f"{side}: must be one JSON object mapping file stem -> prompt length")
            prompt_map = {str(k): _as_int(v, f"prompt length of {k}", str(side)) for k, v in doc[0].items()}
        prompt_lens = [prompt_map.get(n) for n in names]
    elif path.suffix == ".npz":
        loaded = _load_npz(path)
        lens = loaded.pop("prompt_lens", None)
        names = list(loaded)
        arrays = list(loaded.values())
        if not arrays:
            raise TraceError(f"{path}: archive holds no arrays")
        if lens is not None:
            lens = _int_array(lens, "prompt_lens", where)
            if lens.shape != (len(arrays),) or (lens < 0).any():
                raise TraceError(f"{path}: prompt_lens needs one length >= 0 per array ({len(arrays)})")
        prompt_lens = [int(x) for x in lens] if lens is not None else [None] * len(arrays)
    elif path.suffix in (".jsonl", ".json"):
        arrays, prompt_lens, names = [], [], []
        for i, rec in enumerate(_json_records(path)):
            rwhere = f"{where}: record {i}"
            payload = rec if isinstance(rec, str) else _find_key(rec, "routed_experts")
            if payload is None:
                raise TraceError(f"{rwhere} has no 'routed_experts'")
            if isinstance(payload, list):
                try:
                    arrays.append(np.asarray(payload))
                except ValueError:
                    raise TraceError(f"{rwhere}: routed_experts is a ragged nested list") from None
            else:
                arrays.append(_load_npy(io.BytesIO(_b64(payload, rwhere)), rwhere))
            prompt_lens.append(_prompt_len_of(rec, rwhere) if isinstance(rec, dict) else None)
            rid = _find_key(rec, "request_id") if isinstance(rec, dict) else None
            names.append(str(rid) if rid is not None else str(i))
    else:
        names, arrays, prompt_lens = [path.stem], [_load_npy(path, where)], [None]
    return _per_request_trace(arrays, prompt_lens, names, preset, where, "vllm-routed-experts")


def _per_request_trace(arrays, prompt_lens, names, preset, where: str, source: str,
                       starts=None) -> Trace:
    """One request per ``[tokens, layers, top_k]`` array, in order; no gate weights.
    ``starts`` gives each array's first absolute position (default 0)."""
    if not arrays:
        raise TraceError(f"{where}: holds no requests")
    shape = None
    for name, arr in zip(names, arrays, strict=True):
        arr_where = f"{where}: request {name}"
        _int_array(arr, "routed_experts", arr_where)
        if arr.ndim != 3 or 0 in arr.shape[1:]:
            raise TraceError(f"{arr_where}: routed_experts has shape {arr.shape}, expected "
                             "[tokens, layers, top_k]")
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise TraceError(f"{arr_where}: {arr.shape[1]} layers x top-{arr.shape[2]}, "
                             f"earlier requests {shape[0]} x top-{shape[1]}")
    experts = np.concatenate([a.astype(np.int64) for a in arrays])
    if experts.size and experts.min() < -1:
        raise TraceError(f"{where}: expert id {int(experts.min())} is negative (only -1 pads)")
    if experts.shape[2] > 1 and experts.size and not experts.any():
        raise TraceError(f"{where}: every expert id is 0; vLLM's FlashInfer fused-routing kernels "
                         "record zeros (vllm#44116): capture with --moe-backend triton")
    experts, kept_layers = _drop_unrouted_layers(experts, where)
    experts = _trim_padded_slots(experts, where)
    starts = starts or [0] * len(arrays)
    seq_lens = np.array([len(a) for a in arrays], dtype=np.int64)
    phase = np.concatenate([_phase_from_prompt_len(len(a), None if p is None else max(0, p - s0))
                            for a, p, s0 in zip(arrays, prompt_lens, starts, strict=True)])
    extra = {"request_names": list(names), "model_layers": kept_layers,
             "steps": "one pass per request's prompt, then one per token; requests in file order"}
    if any(p is None for p in prompt_lens):
        extra["phase"] = "prompt length unknown for some requests: their tokens are marked prefill"
    meta = _routing_meta(experts, preset, "", where, source=source, weight_norm="none", extra=extra)
    positions = None
    if any(starts):
        positions = np.concatenate([s0 + np.arange(len(a)) for a, s0 in zip(arrays, starts, strict=True)])
    return Trace.from_arrays(experts, None, seq_lens, phase, meta, token_pos=positions)


# ----- MoE-Infinity activation counts ------------------------------------------------------------
@register_format("moe-infinity", "MoE-Infinity-style activation counts .npy "
                 "[sequences, layers, experts] (aggregate only)")
def read_moe_infinity(path: Path, preset: MoEModel | None) -> Trace:
    where = str(path)
    _need_file(path, "a .npy array")
    counts = _load_npy(path, where)
    if counts.ndim == 2:  # one sequence's matrix
        counts = counts[None]
    if counts.ndim != 3 or 0 in counts.shape[1:]:
        raise TraceError(f"{path}: counts must be [sequences, layers, experts], got shape {counts.shape}")
    if counts.dtype.kind not in "iuf":
        raise TraceError(f"{path}: counts must be numbers, got dtype {counts.dtype}")
    if counts.size and np.abs(counts.astype(np.float64)).max() > np.iinfo(np.int32).max:
        raise TraceError(f"{path}: a count exceeds 2^31-1 tokens")
    _, L, E = counts.shape
    extra = {}
    top_k = 1
    if preset is not None:
        top_k = preset.top_k
    else:
        extra["top_k_unknown"] = "pass --model PRESET to record the model's top-k"
    model = _model_fields(preset, "", L, E, top_k, where)
    extra.update(model.pop("extra"))
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=min(top_k, E), kind=KIND_COUNTS,
                     weight_norm="none", source="moe-infinity", extra=extra, **model)
    return Trace.from_counts(counts, meta)


# ----- export ------------------------------------------------------------------------------------
def export_arrays_npz(trace: Trace, out) -> Path:
    """Write a routing trace as arrays-npz (atomically); importing it gives the same trace.

    Keys: ``experts`` int16 [T, L, K] (-1 where a layer is absent), ``weights`` float32,
    ``seq_lens`` (runs of consecutive tokens of one request) with ``request_ids`` (one per run),
    per token ``phase``, ``step``, ``token_pos``, optional columns as ``col_<name>`` [T, L, ...],
    and ``meta``: a JSON string with the full metadata under ``moesim``."""
    if trace.is_counts:
        raise TraceError("a counts trace has no per-token routing; arrays-npz holds per-token routing")
    arrays = trace.to_arrays(columns=trace.extra_columns)
    seq_lens, request_ids = _runs(arrays["request_id"])
    meta = trace.meta.to_dict()
    friendly = {k: meta[k] for k in ("model", "num_layers", "num_experts", "top_k",
                                     "shared_experts", "weight_norm")}
    payload = {
        "experts": arrays["experts"].astype(np.int16),
        "weights": np.nan_to_num(arrays["weights"], nan=0.0).astype(np.float32),
        "seq_lens": seq_lens.astype(np.int64),
        "request_ids": request_ids.astype(np.int32),
        "phase": arrays["phase"].astype(np.int8),
        "step": arrays["step"].astype(np.int32),
        "token_pos": arrays["token_pos"].astype(np.int32),
        "meta": np.array(json.dumps({**friendly, "moesim": meta})),
    }
    for name in trace.extra_columns:
        payload[NPZ_COLUMN_PREFIX + name] = arrays[name]
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **payload)
    return out


EXPORTERS: dict[str, Callable[[Trace, Path], Path]] = {"arrays-npz": export_arrays_npz}


def export_trace(trace: Trace, fmt: str, out) -> Path:
    if fmt not in EXPORTERS:
        raise unknown_name("export format", fmt, EXPORTERS)
    return EXPORTERS[fmt](trace, Path(out))


def trace_summary(trace: Trace) -> dict:
    """Size and model facts of an imported trace, for the CLI."""
    table = trace.to_table()
    m = trace.meta
    out = {"kind": m.kind, "model": m.model, "rows": table.num_rows, "layers": m.num_layers,
           "experts": m.num_experts, "top_k": m.top_k, "weight_norm": m.weight_norm,
           "extra_columns": trace.extra_columns}
    if trace.is_counts:
        out["sequences"] = len(np.unique(table["request_id"].to_numpy()))
    else:
        key = (table["request_id"].to_numpy().astype(np.int64) << 32) | table["token_pos"].to_numpy()
        out["tokens"] = len(np.unique(key))
        out["requests"] = len(np.unique(table["request_id"].to_numpy()))
    return out


__all__ = ["EXPORTERS", "FORMATS", "export_arrays_npz", "export_trace", "format_names",
           "import_trace", "trace_summary"]
