"""The real executor: expert store, I/O pool, the run loop against independent references."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moesim.executor import ExecutorError, RunSettings, StackSpec, capture, run, store_for  # noqa: E402
from moesim.executor.io import IOPool  # noqa: E402
from moesim.executor.runner import routing_slice  # noqa: E402
from moesim.executor.stack import DenseLayer, expert_tensors, swiglu, token_input  # noqa: E402
from moesim.executor.store import ExpertStore  # noqa: E402
from moesim.model import get_model  # noqa: E402
from moesim.traces.trace import Trace  # noqa: E402

E, K, L = 8, 2, 2


def tiny_spec(layers=L, seed=0):
    # preset structure (shared experts included) at small dimensions, so the test is fast
    model = get_model("deepseek-v2-lite", hidden=64, moe_intermediate=32, shared_intermediate=16)
    return StackSpec(model, layers, E, K, "fp32", seed)


def random_trace(tokens=12, layers=L, seed=3):
    rng = np.random.default_rng(seed)
    ex = np.stack([[rng.choice(E, K, replace=False) for _ in range(layers)]
                   for _ in range(tokens)])
    w = rng.random((tokens, layers, K)).astype(np.float32)
    return Trace.from_arrays(ex, w, [tokens // 2, tokens - tokens // 2], "prefill",
                             num_experts=E, model="deepseek-v2-lite")


def lru_reference(keys_per_row, capacity):
    """Independent per-access LRU, never evicting a key of the current row."""
    od, out = OrderedDict(), []
    for row in keys_per_row:
        for k in row:
            if k in od:
                od.move_to_end(k)
                out.append(1)
                continue
            out.append(0)
            while len(od) >= capacity:
                victim = next(v for v in od if v not in row)
                del od[victim]
            od[k] = None
    return np.array(out)


def test_store_roundtrip_reads_payload_bytes(tmp_path):
    spec = tiny_spec()
    store = ExpertStore(tmp_path, E)
    tensors = expert_tensors(spec, 5)
    store.write(5, tensors)
    res = store.read(5)
    for name, t in tensors.items():
        assert torch.equal(res.tensors[name], t)
    assert res.payload_bytes == spec.expert_payload_bytes() == 3 * 64 * 32 * 4
    assert res.file_bytes == store.path(5).stat().st_size > res.payload_bytes
    assert store.mode in ("direct", "fadvise")
    assert res.read_bytes == res.file_bytes  # O_DIRECT asks whole blocks, gets the file
    with pytest.raises(ExecutorError, match="missing"):
        store.read(6)


def test_io_pool_serves_demand_before_queued_prefetches():
    gate = threading.Event()
    order = []

    class R:
        payload_bytes = file_bytes = 1

    def read(key):
        order.append(key)
        if key == 0:
            gate.wait(5)
        return R()

    pool = IOPool(read, 1)
    first = pool.submit(0, 1)
    while not order:
        pass
    pool.submit(1, 1)
    pool.submit(2, 1)
    demand = pool.submit(3, 0)
    assert pool.submit(3, 0) is demand  # a read in flight is shared
    gate.set()
    for tr in list(pool.log):
        tr.done.wait(5)
    pool.close()
    assert order == [0, 3, 1, 2]
    assert first.duration_s >= 0 and len(pool.log) == 4


def test_forced_run_matches_lru_reference_and_math(tmp_path):
    spec, tr = tiny_spec(), random_trace()
    settings = RunSettings(policy="lru", capacity_experts=5, io_threads=2)
    rec = run(spec, store_for(tmp_path, spec), settings, trace=tr)
    arr = tr.to_arrays()
    keys = [list(layer * E + arr["experts"][t, layer]) for t in range(12) for layer in range(L)]
    expected = lru_reference(keys, 5)
    got = (rec.residency.reshape(-1) > 0).astype(int)
    np.testing.assert_array_equal(got, expected)
    misses = int((expected == 0).sum())
    assert len(rec.transfers) == misses
    assert rec.read_bytes.sum() == misses * spec.expert_payload_bytes()
    assert np.isfinite(rec.read_s[rec.residency == 0]).all()
    assert np.isnan(rec.read_s[rec.residency == 1]).all()
    assert (rec.t_layer_s >= rec.t_dense_s).all() and (rec.t_step_s > 0).all()
    np.testing.assert_allclose(rec.t_step_s, rec.t_layer_s.sum(axis=1), rtol=0.2)
    # the hidden state equals an independent computation of the same layers
    dense = [DenseLayer(spec, layer) for layer in range(L)]
    for t in range(12):
        x = token_input(spec, t)
        for layer in range(L):
            h, _, _, out = dense[layer].forward(x)
            for slot in range(K):
                e = expert_tensors(spec, layer * E + int(arr["experts"][t, layer, slot]))
                out = out + float(arr["weights"][t, layer, slot]) * swiglu(
                    h, e["w_gate"], e["w_up"], e["w_down"])
            x = out
        np.testing.assert_allclose(rec.outputs[t], x[0].numpy(), rtol=1e-4, atol=1e-5)


def test_own_routing_follows_the_router(tmp_path):
    spec = tiny_spec()
    rec = run(spec, store_for(tmp_path, spec), RunSettings(capacity_experts=4), tokens=5)
    x = token_input(spec, 0)
    _, ids, _, _ = DenseLayer(spec, 0).forward(x)
    assert sorted(rec.experts[0, 0].tolist()) == sorted(ids[0].tolist())
    assert (rec.residency >= 0).all()


def test_prefetch_hits_are_marked(tmp_path):
    spec, tr = tiny_spec(), random_trace()
    settings = RunSettings(capacity_experts=6, prefetcher="pre-gated", io_threads=1)
    rec = run(spec, store_for(tmp_path, spec), settings, trace=tr)
    assert (rec.residency == 2).any()
    assert rec.prefetch_bytes.sum() > 0
    assert {t["priority"] for t in rec.transfers} == {0, 1} or (rec.residency != 0).all()


def test_errors_are_clear(tmp_path):
    spec = tiny_spec()
    with pytest.raises(ExecutorError, match="routing in advance"):
        run(spec, store_for(tmp_path, spec), RunSettings(policy="belady", capacity_experts=4),
            tokens=3)
    with pytest.raises(ExecutorError, match="io-threads"):
        RunSettings(io_threads=0)
    with pytest.raises(ExecutorError, match="cannot take"):
        routing_slice(random_trace(), 5, 3)


def test_capture_records_machine_versions_settings(tmp_path):
    spec, tr = tiny_spec(), random_trace()
    run_trace = capture(spec, RunSettings(capacity_experts=4), tmp_path / "store", trace=tr)
    path = run_trace.write(tmp_path / "run.parquet")
    back = Trace.read(path)
    cap = back.meta.capture
    assert cap["format"] == "moesim-run-v1"
    assert cap["versions"]["torch"] and cap["machine"]["cpus"]
    assert cap["settings"]["capacity_experts"] == 4 and cap["stack"]["hidden"] == 64
    assert back.meta.expert_bytes == [spec.expert_payload_bytes()] * L
    a = back.to_arrays(columns=["residency", "t_step_s"])
    np.testing.assert_array_equal(a["experts"], tr.to_arrays()["experts"])
    assert len(cap["transfers"]["key"]) == int((a["residency"] == 0).sum())


def test_esft_routing_runs(tmp_path, esft_npz):
    from moesim.traces.importers import import_trace

    src = import_trace(esft_npz["law"], "arrays-npz")
    r = routing_slice(src, 2, 6, first_layer=3)
    model = get_model("deepseek-v2-lite", hidden=64, moe_intermediate=32)
    spec = StackSpec(model, 2, 64, 6, "fp32")
    rec = run(spec, store_for(tmp_path, spec), RunSettings(capacity_experts=16), trace=r)
    np.testing.assert_array_equal(rec.experts, r.to_arrays()["experts"])


def test_store_files_are_standard_safetensors_with_aligned_data(tmp_path):
    from safetensors.torch import load_file

    spec = tiny_spec()
    store = ExpertStore(tmp_path, E)
    tensors = expert_tensors(spec, 2)
    store.write(2, tensors)
    loaded = load_file(str(store.path(2)))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    res = store.read(2)
    first = min(t.data_ptr() for t in res.tensors.values())
    assert first % 4096 == 0  # the header is padded: data starts on a page
    assert all(t.data_ptr() % 64 == 0 for t in res.tensors.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the guard of a machine without CUDA")
def test_cuda_mode_is_guarded_without_a_gpu(tmp_path):
    spec = tiny_spec()
    with pytest.raises(ExecutorError, match="no CUDA device"):
        run(spec, store_for(tmp_path, spec), RunSettings(device="cuda", capacity_experts=4),
            trace=random_trace())
