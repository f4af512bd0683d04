"""Property tests: corrupted, truncated, ragged and mistyped inputs at every trace reader.

Each reader (``Trace.read`` on Parquet bytes, every importer, the CLI) either accepts the input
or raises a ``MoesimError`` with a one-line message; any other exception fails the test. Through
the CLI the same inputs give exit status 2 and exactly one ``error:`` line on stderr.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moesim.cli import main as cli_main
from moesim.errors import MoesimError
from moesim.traces import Trace, TraceMeta
from moesim.traces.importers import FORMATS, export_arrays_npz, import_trace

# Fixed examples by default (fast, reproducible); MOESIM_FUZZ_EXAMPLES=N explores N random ones.
FUZZ = int(os.environ.get("MOESIM_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=FUZZ or 60, deadline=None, derandomize=not FUZZ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def read_fully(trace: Trace) -> None:
    """Everything a consumer does with a trace: stream and check every row, build arrays."""
    if trace.is_counts:
        trace.validate()
        trace.load_matrix()
        return
    trace.validate()
    trace.to_arrays(columns=trace.extra_columns)
    trace.load_matrix()


def clean_or_moesim_error(action) -> str | None:
    """Run ``action``; a MoesimError must be one non-empty line. Return its message or None."""
    try:
        action()
    except MoesimError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
        return msg
    return None


def import_and_read(path, fmt, model=None):
    return lambda: read_fully(import_trace(path, fmt, model=model))


# ----- byte-level damage --------------------------------------------------------------------------
@st.composite
def damaged(draw, data: bytes) -> bytes:
    """Truncate, flip bytes (anywhere, or near the end where footers live), splice or zero."""
    n = len(data)
    how = draw(st.sampled_from(["truncate", "flip", "flip_tail", "splice", "zero"]))
    if how == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    buf = bytearray(data)
    if how in ("flip", "flip_tail"):
        lo = max(0, n - 64) if how == "flip_tail" else 0
        for pos in draw(st.lists(st.integers(lo, n - 1), min_size=1, max_size=8)):
            buf[pos] ^= draw(st.integers(1, 255))
        return bytes(buf)
    pos = draw(st.integers(0, n - 1))
    if how == "splice":
        return bytes(buf[:pos]) + draw(st.binary(min_size=1, max_size=32)) + bytes(buf[pos:])
    end = min(n, pos + draw(st.integers(1, 64)))
    buf[pos:end] = bytes(end - pos)
    return bytes(buf)


def small_trace(extras=True) -> Trace:
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((12, 3, 8)), axis=2)[:, :, :2]
    ex = {"residency": rng.integers(0, 2, (12, 3, 2)).astype(np.int8)} if extras else None
    return Trace.from_arrays(experts, rng.random((12, 3, 2)), seq_lens=[5, 7],
                             phase=np.array(["prefill"] * 4 + ["decode"] + ["prefill"] * 7),
                             num_experts=8, model="tiny", extras=ex)


@functools.cache
def seed_bytes(kind: str) -> bytes:
    """Valid inputs to damage, one per reader."""
    buf = io.BytesIO()
    if kind == "parquet":
        t = small_trace()
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            path = t.write(Path(d) / "t.parquet", row_group_rows=8)
            return path.read_bytes()
    if kind == "arrays-npz":
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            return export_arrays_npz(small_trace(), Path(d) / "t.npz").read_bytes()
    if kind == "route-trace-v1":
        return ROUTE_TEXT.encode()
    if kind in ("vllm-routed-experts", "moe-infinity"):
        arr = (np.arange(24).reshape(2, 3, 4) % 4) if kind == "moe-infinity" else valid_routed()
        np.save(buf, arr)
        return buf.getvalue()
    if kind == "sglang-routed-experts":
        return json.dumps(sglang_routed_record(valid_routed())).encode()
    if kind == "sglang-per-token":
        torch = pytest.importorskip("torch")
        torch.save(sglang_dump(torch), buf)
        return buf.getvalue()
    raise AssertionError(kind)


def valid_routed(T=4, L=3, K=2) -> np.ndarray:
    """Distinct ids within each (token, layer): consecutive ids from a rotating start."""
    start = (np.arange(T)[:, None, None] + np.arange(L)[None, :, None]) % 5
    return (start + np.arange(K)).astype(np.int32)


def sglang_routed_record(arr: np.ndarray) -> dict:
    return {"meta_info": {"routed_experts": base64.b64encode(arr.astype("<i4").tobytes()).decode(),
                          "num_layers": arr.shape[1], "top_k": arr.shape[2], "prompt_tokens": 2}}


def sglang_dump(torch) -> dict:
    ids = torch.full((2, 3, 8), -1, dtype=torch.int32)
    ids[:, :, :2] = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    rec = dict(forward_pass_id=0, rank=0, gatherer_key="primary", input_ids=[1, 2, 3],
               positions=[0, 1, 2], extend_seq_lens=[3], forward_mode=1, topk_ids_of_layer=ids,
               misc_objects=[])
    return dict(records=[rec], last_physical_to_logical_map=torch.arange(8).repeat(2, 1))


ROUTE_TEXT = (
    "# route_trace v1\n# model=m.gguf arch=qwen3moe n_layer=2 n_expert=4 n_expert_used=2\n"
    "# layer=0 expert_bytes=10 dense_bytes=5\n# layer=1 expert_bytes=20 dense_bytes=6\n"
    "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"
    + "".join(f"0,{int(step > 1)},{step},{layer},{slot},{(step + layer + slot) % 4},0.5,{slot},{10 * (1 - slot)}\n"
              for step in range(4) for layer in range(2) for slot in range(2))
)

SUFFIX = {"parquet": ".parquet", "arrays-npz": ".npz", "route-trace-v1": ".csv",
          "sglang-per-token": ".pt", "sglang-routed-experts": ".jsonl",
          "vllm-routed-experts": ".npy", "moe-infinity": ".npy"}


def test_seed_inputs_are_valid(tmp_path):
    """The undamaged inputs import cleanly, so damage is what the other tests exercise."""
    for kind, suffix in SUFFIX.items():
        if kind == "sglang-per-token":
            pytest.importorskip("torch")
        path = tmp_path / f"seed{suffix}"
        path.write_bytes(seed_bytes(kind))
        if kind == "parquet":
            read_fully(Trace.read(path))
        else:
            read_fully(import_trace(path, kind))


@SETTINGS
@given(data=st.data())
def test_damaged_parquet_bytes(tmp_path, data):
    path = tmp_path / "t.parquet"
    path.write_bytes(data.draw(damaged(seed_bytes("parquet"))))
    clean_or_moesim_error(lambda: read_fully(Trace.read(path)))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@SETTINGS
@given(data=st.data())
def test_damaged_bytes_at_every_importer(tmp_path, fmt, data):
    if fmt == "sglang-per-token":
        pytest.importorskip("torch")
    path = tmp_path / f"in{SUFFIX[fmt]}"
    path.write_bytes(data.draw(damaged(seed_bytes(fmt))))
    clean_or_moesim_error(import_and_read(path, fmt))


# ----- mistyped and ragged Parquet ----------------------------------------------------------------
ODD_TYPES = [pa.int8(), pa.int64(), pa.uint16(), pa.float32(), pa.float64(), pa.string(),
             pa.bool_(), pa.list_(pa.int16()), pa.list_(pa.int16(), 3), pa.list_(pa.float32(), 2)]
ODD_JSON = ["", "{", "null", "-3", "0", "2.5", "true", '"x"', "[1, 2]", '{"a": 1}', "1e400",
            "99999999999999999999", '"8"', "[]"]


@SETTINGS
@given(data=st.data())
def test_mistyped_and_ragged_parquet(tmp_path, data):
    table = small_trace().to_table()
    meta = TraceMeta(num_layers=3, num_experts=8, top_k=2).to_kv()
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["drop", "cast", "ragged", "nulls", "values", "meta",
                                        "meta_drop", "bytes_meta"]))
        name = data.draw(st.sampled_from(table.column_names))
        i = table.column_names.index(name)
        if op == "drop":
            table = table.remove_column(i)
        elif op == "cast":
            typ = data.draw(st.sampled_from(ODD_TYPES))
            py = table.column(i).to_pylist()
            try:
                col = pa.array(py, typ)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                col = pa.array([str(v) for v in py], pa.string())
            table = table.set_column(i, name, col)
        elif op == "ragged":
            lens = data.draw(st.lists(st.integers(0, 4), min_size=table.num_rows,
                                      max_size=table.num_rows))
            col = pa.array([list(range(n)) for n in lens], pa.list_(pa.int16()))
            table = table.set_column(i, name, col)
        elif op == "nulls":
            py = table.column(i).to_pylist()
            mask = data.draw(st.lists(st.booleans(), min_size=len(py), max_size=len(py)))
            col = pa.array([None if m else v for v, m in zip(py, mask, strict=True)],
                           table.schema.field(i).type)
            table = table.set_column(i, name, col)
        elif op == "values":
            typ = table.schema.field(i).type
            width = typ.list_size if pa.types.is_fixed_size_list(typ) else None
            base = typ.value_type if width else typ
            lo, hi = (-(2 ** 15), 2 ** 15 - 1) if pa.types.is_integer(base) else (-1e9, 1e9)
            elems = st.integers(max(lo, -40000), min(hi, 40000)) if pa.types.is_integer(base) \
                else st.floats(allow_nan=True, allow_infinity=True, width=32)
            vals = data.draw(st.lists(elems, min_size=table.num_rows * (width or 1),
                                      max_size=table.num_rows * (width or 1)))
            try:
                flat = pa.array(vals, base)
            except (pa.ArrowException, OverflowError):
                continue
            col = pa.FixedSizeListArray.from_arrays(flat, width) if width else flat
            table = table.set_column(i, name, col)
        elif op == "meta":
            key = data.draw(st.sampled_from(sorted(meta)))
            meta = {**meta, key: data.draw(st.sampled_from(ODD_JSON)).encode()}
        elif op == "meta_drop":
            key = data.draw(st.sampled_from(sorted(meta)))
            meta = {k: v for k, v in meta.items() if k != key}
        else:
            key = data.draw(st.sampled_from(sorted(meta)))
            meta = {**meta, key: data.draw(st.binary(max_size=8))}
    path = tmp_path / "m.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=5)
    clean_or_moesim_error(lambda: read_fully(Trace.read(path)))


# ----- mistyped arrays at the numpy-based importers ------------------------------------------------
DTYPES = st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "float16", "float32",
                          "float64", "bool", "complex64", "U3"])


@st.composite
def odd_arrays(draw, max_dims=4):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        elems = st.integers(max(info.min, -3), min(info.max, 70))
    elif dtype.kind == "f":
        elems = st.floats(-3, 70, width=min(64, dtype.itemsize * 8)) | st.sampled_from(
            [np.nan, np.inf, -np.inf])
    elif dtype.kind == "c":
        elems = st.complex_numbers(max_magnitude=5, allow_nan=False, width=64)
    elif dtype.kind == "b":
        elems = st.booleans()
    else:
        elems = st.text(alphabet="ab01 -", max_size=3)
    return draw(hnp.arrays(dtype, shape, elements=elems))


def valid_npz_arrays():
    with np.load(io.BytesIO(seed_bytes("arrays-npz"))) as npz:
        return {k: npz[k] for k in npz.files}


META_VALUES = st.one_of(st.integers(-2, 70), st.text(max_size=4), st.none(), st.booleans(),
                        st.lists(st.integers(0, 3), max_size=3), st.floats(allow_nan=True))


@SETTINGS
@given(data=st.data())
def test_mistyped_arrays_npz(tmp_path, data):
    arrays = valid_npz_arrays()
    keys = list(arrays) + ["col_x", "seq_lens", "weights"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        op = data.draw(st.sampled_from(["replace", "drop", "meta"]))
        if op == "drop":
            arrays.pop(key, None)
        elif op == "replace" or key != "meta":
            arrays[key] = data.draw(odd_arrays())
        else:
            try:
                meta = json.loads(str(arrays.get("meta", np.array("{}"))))
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                meta = {}
            inner = meta.get("moesim") if isinstance(meta.get("moesim"), dict) else meta
            field = data.draw(st.sampled_from(["num_layers", "num_experts", "top_k", "kind",
                                               "weight_norm", "expert_bytes", "n_routed_experts",
                                               "shared_experts", "phase", "extra"]))
            inner[field] = data.draw(META_VALUES)
            arrays["meta"] = np.array(json.dumps(meta))
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    clean_or_moesim_error(import_and_read(path, "arrays-npz"))


@SETTINGS
@given(arrays=st.lists(odd_arrays(), min_size=1, max_size=3),
       layout=st.sampled_from(["npy", "npz", "folder", "jsonl"]))
def test_mistyped_vllm_arrays(tmp_path, arrays, layout):
    base = tmp_path / layout
    if base.exists():
        import shutil

        shutil.rmtree(base) if base.is_dir() else base.unlink()
    if layout == "npy":
        base = base.with_suffix(".npy")
        np.save(base, arrays[0])
    elif layout == "npz":
        base = base.with_suffix(".npz")
        np.savez(base, *arrays)
    elif layout == "folder":
        base.mkdir()
        for i, arr in enumerate(arrays):
            np.save(base / f"r{i}.npy", arr)
    else:
        base = base.with_suffix(".jsonl")
        lines = []
        for arr in arrays:
            buf = io.BytesIO()
            np.save(buf, arr)
            lines.append(json.dumps({"routed_experts": base64.b64encode(buf.getvalue()).decode()}))
        base.write_text("\n".join(lines))
    clean_or_moesim_error(import_and_read(base, "vllm-routed-experts"))


@SETTINGS
@given(arr=odd_arrays(), model=st.sampled_from([None, "olmoe", "mixtral"]))
def test_mistyped_moe_infinity_counts(tmp_path, arr, model):
    path = tmp_path / "c.npy"
    np.save(path, arr)
    clean_or_moesim_error(import_and_read(path, "moe-infinity", model))


# ----- mistyped text and JSON --------------------------------------------------------------------
ODD_FIELDS = ["", "x", "-1", "1e40", "nan", "3.5", "99999999999", "0", "5", "2", " 1", "inf"]


@SETTINGS
@given(data=st.data())
def test_ragged_and_mistyped_route_trace(tmp_path, data):
    lines = ROUTE_TEXT.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "field", "extra", "drop_field",
                                        "header"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "header":
            key = data.draw(st.sampled_from(["n_layer", "n_expert", "n_expert_used", "expert_bytes"]))
            value = data.draw(st.sampled_from(ODD_FIELDS + ["1000000", "40000"]))
            lines = [re.sub(rf"\b{key}=\S*", f"{key}={value}", ln) if ln.startswith("#") else ln
                     for ln in lines]
        else:
            fields = lines[i].split(",")
            j = data.draw(st.integers(0, len(fields) - 1))
            if op == "field":
                fields[j] = data.draw(st.sampled_from(ODD_FIELDS))
            elif op == "extra":
                fields.append(data.draw(st.sampled_from(ODD_FIELDS)))
            elif len(fields) > 1:
                del fields[j]
            lines[i] = ",".join(fields)
        if not lines:
            lines = [""]
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    clean_or_moesim_error(import_and_read(path, "route-trace-v1"))


def _json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 100) | st.text(max_size=6),
                       _json_containers, max_leaves=6)


@SETTINGS
@given(data=st.data())
def test_mistyped_sglang_routed_records(tmp_path, data):
    rec = sglang_routed_record(valid_routed())
    info = rec["meta_info"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(["routed_experts", "num_layers", "top_k", "prompt_tokens"]))
        kind = data.draw(st.sampled_from(["json", "b64", "drop"]))
        if kind == "drop":
            info.pop(key, None)
        elif kind == "b64":
            info[key] = base64.b64encode(data.draw(st.binary(max_size=40))).decode()
        else:
            info[key] = data.draw(JSONISH)
    model = data.draw(st.sampled_from([None, "mixtral"]))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n" + data.draw(st.sampled_from(["", "{", "[]", "7"])))
    clean_or_moesim_error(import_and_read(path, "sglang-routed-experts", model))


@SETTINGS
@given(data=st.data())
def test_mistyped_sglang_per_token_dumps(tmp_path, data):
    torch = pytest.importorskip("torch")
    dump = sglang_dump(torch)
    rec = dump["records"][0]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(["topk_ids_of_layer", "positions", "extend_seq_lens",
                                         "forward_mode", "forward_pass_id", "records",
                                         "last_physical_to_logical_map"]))
        kind = data.draw(st.sampled_from(["json", "tensor", "drop"]))
        if kind == "tensor":
            arr = data.draw(odd_arrays())
            if arr.dtype.kind in "biufc" and data.draw(st.booleans()):
                value = torch.from_numpy(np.ascontiguousarray(arr))
            else:
                value = torch.full(tuple(data.draw(st.lists(st.integers(0, 9), max_size=3))),
                                   data.draw(st.integers(-2, 9)), dtype=torch.int32)
        else:
            value = data.draw(JSONISH)
        target = dump if key in ("records", "last_physical_to_logical_map") else rec
        if kind == "drop":
            target.pop(key, None)
        else:
            target[key] = value
    path = tmp_path / "d.pt"
    try:
        torch.save(dump, path)
    except (TypeError, RuntimeError):  # some numpy dtypes have no torch equivalent
        return
    clean_or_moesim_error(import_and_read(path, "sglang-per-token"))


# ----- the CLI ------------------------------------------------------------------------------------
def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, out.getvalue(), err.getvalue()


@settings(SETTINGS, max_examples=FUZZ or 40)
@given(data=st.data())
def test_cli_gives_exit_2_and_one_error_line(tmp_path, data):
    kinds = [k for k in SUFFIX if k != "sglang-per-token" or "torch" in sys.modules]
    kind = data.draw(st.sampled_from(kinds))
    src = tmp_path / f"in{SUFFIX[kind]}"
    src.write_bytes(data.draw(damaged(seed_bytes(kind))))
    out = tmp_path / "out.parquet"
    if out.exists():
        out.unlink()
    if kind == "parquet":
        args = ["trace", data.draw(st.sampled_from(["validate", "info", "export"])), str(src)]
        if args[1] == "export":
            args += ["--out", str(tmp_path / "x.npz")]
    else:
        args = ["trace", "import", "--format", kind, str(src), "--out", str(out)]
    code, _, err = run_cli(args)
    assert code in (0, 2), err
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists()  # nothing half-written


# ----- regressions found by the properties above ---------------------------------------------------
def test_expert_ids_beyond_int16_are_rejected_not_wrapped():
    experts = np.array([[[1, 70000]]])  # 70000 would wrap to 4464 as int16
    with pytest.raises(MoesimError, match="outside"):
        Trace.from_arrays(experts, num_experts=8)
    with pytest.raises(MoesimError, match="exceeds the 32768 expert ids"):
        Trace.from_arrays(experts)


def test_a_partly_absent_row_is_an_error_not_silently_dropped():
    experts = np.array([[[-1, 3]], [[0, 1]]])
    with pytest.raises(MoesimError, match="expert id -1"):
        Trace.from_arrays(experts, num_experts=8)


def test_nulls_in_an_integer_column_are_reported(tmp_path):
    table = small_trace(extras=False).to_table()
    layer = pa.array([None] + table["layer"].to_pylist()[1:], pa.int16())
    table = table.set_column(table.column_names.index("layer"), "layer", layer)
    path = tmp_path / "n.parquet"
    pq.write_table(table.replace_schema_metadata(TraceMeta(3, 8, 2).to_kv()), path)
    with pytest.raises(MoesimError, match="column 'layer' holds nulls"):
        Trace.read(path).validate()
