"""The Trace API: build, write, read, stream, select, concatenate, validate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.errors import TraceError
from moesim.traces import PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta, TraceWriter, concat


def random_routing(T=50, L=3, E=8, K=2, seed=0):
    rng = np.random.default_rng(seed)
    experts = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)])
    weights = rng.random((T, L, K)).astype(np.float32)
    return experts, weights


def test_round_trip_through_parquet_keeps_every_value(tmp_path):
    experts, weights = random_routing()
    phase = np.array(["prefill"] * 30 + ["decode"] * 20)
    t = Trace.from_arrays(experts, weights, seq_lens=[30, 20], phase=phase, num_experts=8, model="m")
    path = t.write(tmp_path / "t.parquet")
    back = Trace.read(path)
    assert back.meta == t.meta
    a = back.to_arrays()
    np.testing.assert_array_equal(a["experts"], experts)
    np.testing.assert_array_equal(a["weights"], weights)
    np.testing.assert_array_equal(a["seq_lens"], [30, 20])
    assert (a["phase"][:30] == PHASE_PREFILL).all() and (a["phase"][30:] == PHASE_DECODE).all()
    np.testing.assert_array_equal(a["token_pos"], np.r_[np.arange(30), np.arange(20)])


def test_default_steps_one_prefill_pass_then_one_step_per_decode_token():
    experts, weights = random_routing(T=7, L=2)
    phase = ["prefill"] * 3 + ["decode"] * 2 + ["prefill"] * 2
    t = Trace.from_arrays(experts, weights, seq_lens=[5, 2], phase=np.array(phase), num_experts=8)
    steps = t.to_arrays()["step"]
    np.testing.assert_array_equal(steps, [0, 0, 0, 1, 2, 3, 3])


def test_rows_are_token_major_in_layer_order():
    experts, weights = random_routing(T=4, L=3)
    t = Trace.from_arrays(experts, weights, num_experts=8)
    b = next(t.iter_batches())
    np.testing.assert_array_equal(b.layer, np.tile([0, 1, 2], 4))
    np.testing.assert_array_equal(b.token_pos, np.repeat(np.arange(4), 3))


def test_absent_layers_are_skipped_and_come_back_as_minus_one(tmp_path):
    experts, weights = random_routing(T=5, L=3)
    experts[1:4, 2] = -1  # last layer pruned for three tokens
    t = Trace.from_arrays(experts, weights, num_experts=8)
    assert t.num_rows == 5 * 3 - 3
    a = Trace.read(t.write(tmp_path / "x.parquet")).to_arrays()
    np.testing.assert_array_equal(a["experts"], experts)


def test_streaming_in_small_batches_sees_every_row_once(tmp_path):
    experts, weights = random_routing(T=200, L=4)
    path = Trace.from_arrays(experts, weights, num_experts=8).write(tmp_path / "s.parquet", row_group_rows=64)
    t = Trace.read(path)
    assert pq.ParquetFile(path).num_row_groups == 13
    sizes = [len(b) for b in t.iter_batches(batch_rows=50)]
    assert sum(sizes) == 800 and max(sizes) <= 64


def test_load_matrix_counts_every_slot():
    experts, weights = random_routing(T=100, L=3, E=8, K=2)
    load = Trace.from_arrays(experts, weights, num_experts=8).load_matrix()
    assert load.shape == (3, 8)
    np.testing.assert_array_equal(load.sum(axis=1), [200, 200, 200])
    for layer in range(3):
        np.testing.assert_array_equal(load[layer], np.bincount(experts[:, layer].ravel(), minlength=8))


def test_select_layers_renumbers_and_keeps_layer_sizes():
    experts, weights = random_routing(T=10, L=4)
    t = Trace.from_arrays(experts, weights, num_experts=8, expert_bytes=[1, 2, 3, 4])
    s = t.select(layers=[3, 1])
    assert s.meta.num_layers == 2 and s.meta.expert_bytes == [2, 4]
    np.testing.assert_array_equal(s.to_arrays()["experts"], experts[:, [1, 3]])


def test_select_phase_and_requests():
    experts, weights = random_routing(T=10, L=2)
    phase = np.array(["prefill"] * 6 + ["decode"] * 4)
    t = Trace.from_arrays(experts, weights, seq_lens=[6, 4], phase=phase, num_experts=8)
    assert t.select(phase="decode").num_rows == 8
    assert t.select(requests=[0]).num_rows == 12


def test_concat_renumbers_requests_and_steps():
    e1, w1 = random_routing(T=6, seed=1)
    e2, w2 = random_routing(T=4, seed=2)
    a = Trace.from_arrays(e1, w1, seq_lens=[3, 3], num_experts=8)
    b = Trace.from_arrays(e2, w2, seq_lens=[4], num_experts=8)
    c = concat([a, b]).to_arrays()
    np.testing.assert_array_equal(c["seq_lens"], [3, 3, 4])
    np.testing.assert_array_equal(c["experts"], np.concatenate([e1, e2]))
    assert len(set(c["step"][:6])) == 2 and c["step"][6] == 2


def test_concat_refuses_different_shapes():
    e1, w1 = random_routing(E=8)
    e2, w2 = random_routing(E=8, K=1)
    with pytest.raises(TraceError, match="different shapes"):
        concat([Trace.from_arrays(e1, w1, num_experts=8), Trace.from_arrays(e2, w2, num_experts=8)])


def test_counts_trace_load_matrix():
    counts = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    t = Trace.from_counts(counts)
    np.testing.assert_array_equal(t.load_matrix(), counts.sum(axis=0))
    with pytest.raises(TraceError, match="counts trace"):
        next(t.iter_batches())


def test_routing_trace_aggregates_to_counts():
    experts, weights = random_routing(T=20, L=2)
    t = Trace.from_arrays(experts, weights, seq_lens=[12, 8], num_experts=8)
    total = sum(b.counts.sum(axis=0) for b in t.iter_counts())
    np.testing.assert_array_equal(total, t.load_matrix().sum(axis=0))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.__setitem__((0, 0, 0), 9), "outside 0..7"),
        (lambda e: e.__setitem__((3, 1, 1), e[3, 1, 0]), "same expert twice"),
    ],
)
def test_bad_rows_give_one_clear_error(mutate, message):
    experts, weights = random_routing()
    mutate(experts)
    with pytest.raises(TraceError, match=message) as info:
        Trace.from_arrays(experts, weights, num_experts=8)
    assert "\n" not in str(info.value)


def test_wrong_shapes_are_named():
    experts, weights = random_routing()
    with pytest.raises(TraceError, match="weights has shape"):
        Trace.from_arrays(experts, weights[:, :, :1], num_experts=8)
    with pytest.raises(TraceError, match=r"\[tokens, layers, top_k\]"):
        Trace.from_arrays(experts[0], num_experts=8)
    with pytest.raises(TraceError, match="seq_lens"):
        Trace.from_arrays(experts, weights, seq_lens=[3], num_experts=8)


def test_missing_metadata_and_non_parquet_files(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    with pytest.raises(TraceError, match="no moesim metadata"):
        Trace.read(plain)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        Trace.read(junk)
    with pytest.raises(TraceError, match="no such file"):
        Trace.read(tmp_path / "absent.parquet")


def test_out_of_range_rows_in_a_file_are_caught_while_streaming(tmp_path):
    experts, weights = random_routing()
    t = Trace.from_arrays(experts, weights, num_experts=8)
    table = t.to_table().replace_schema_metadata(TraceMeta(num_layers=3, num_experts=4, top_k=2).to_kv())
    path = tmp_path / "lying.parquet"
    pq.write_table(table, path)
    with pytest.raises(TraceError, match="outside 0..3"):
        Trace.read(path).validate()


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"precious")
    meta = TraceMeta(num_layers=2, num_experts=4, top_k=1)
    with pytest.raises(TraceError):
        with TraceWriter(target, meta) as w:
            w.write_rows([0], [0], [0], [0], [0], [[1]], [[1.0]])
            w.write_rows([0], [1], [1], [0], [0], [[7]], [[1.0]])  # expert 7 out of range
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_writer_streams_rows_with_optional_columns(tmp_path):
    meta = TraceMeta(num_layers=2, num_experts=4, top_k=2)
    with TraceWriter(tmp_path / "w.parquet", meta, extra_schema={"t_layer_s": pa.float64()}) as w:
        for step in range(3):
            w.write_rows([0, 0], [step, step], [step, step], [1, 1], [0, 1], [[0, 1], [2, 3]],
                         [[0.5, 0.5], [0.9, 0.1]], t_layer_s=[0.1, 0.2])
    t = Trace.read(tmp_path / "w.parquet")
    assert t.num_rows == 6 and t.extra_columns == ["t_layer_s"]
    a = t.to_arrays(columns=["t_layer_s"])
    np.testing.assert_allclose(a["t_layer_s"], [[0.1, 0.2]] * 3)


def test_recorded_positions_of_interleaved_requests_survive_a_round_trip(tmp_path):
    experts, weights = random_routing(T=6, L=2)
    # two requests decoding in turn: 0, 1, 0, 1, ... at positions 10, 3, 11, 4, 12, 5
    t = Trace.from_arrays(experts, weights, seq_lens=[1] * 6, phase="decode",
                          request_ids=np.array([0, 1, 0, 1, 0, 1]), num_experts=8,
                          token_pos=np.array([10, 3, 11, 4, 12, 5]))
    a = Trace.read(t.write(tmp_path / "p.parquet")).to_arrays()
    np.testing.assert_array_equal(a["token_pos"], [10, 3, 11, 4, 12, 5])
    np.testing.assert_array_equal(a["experts"], experts)
