"""The executor on Hugging Face models: experts offloaded to the store and run through the
model's own experts code must give the in-memory model's logits; forced routing, cache
accounting and validation hold as for the synthetic stack."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moesim.cli import main  # noqa: E402
from moesim.executor import ExecutorError, RunSettings  # noqa: E402
from moesim.executor.hf import (  # noqa: E402
    capture_hf,
    forward_tokens,
    load_hf,
    run_hf,
    store_for_hf,
    token_ids,
)
from moesim.traces.trace import Trace  # noqa: E402


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_offloaded_model_computes_what_the_model_computes(tmp_path, arch):
    reference = load_hf(f"tiny:{arch}", seed=1)
    ids = token_ids(reference, 10, 0)
    want = forward_tokens(reference, ids)
    hf = load_hf(f"tiny:{arch}", seed=1)
    rec = run_hf(hf, store_for_hf(tmp_path, hf), RunSettings(capacity_experts=5, io_threads=1),
                 tokens=10)
    w = rec.outputs.shape[1]
    np.testing.assert_allclose(rec.outputs, want[:, :w].numpy(), atol=1e-5)
    # the experts really ran from the store: nothing stacked is left in the model
    assert all(getattr(lay.block.experts, n).numel() == 0 for lay in hf.layers for n in lay.names)
    res = rec.residency
    stats = rec.stats
    assert stats["hits"] + stats["misses"] == stats["lookups"] == res.size
    assert (res == 0).sum() == stats["misses"] == len(rec.transfers)
    assert rec.read_bytes.sum() == stats["misses"] * hf.payload_bytes
    # dense = layer time besides routed experts and read waits
    assert np.all(rec.t_layer_s >= rec.t_dense_s) and np.all(rec.t_dense_s > 0)


def test_a_wrong_expert_changes_the_output(tmp_path):
    hf = load_hf("tiny:mixtral", seed=2)
    ids = token_ids(hf, 6, 0)
    want = forward_tokens(hf, ids)
    store = store_for_hf(tmp_path, hf)
    hf.layers[0].block.experts.down_proj.data[3] *= 2  # the store gets the altered expert 3
    rec = run_hf(hf, store, RunSettings(capacity_experts=16, io_threads=1), tokens=6)
    used = (rec.experts[:, 0] == 3).any(axis=1)
    assert used.any()
    w = rec.outputs.shape[1]
    first = int(np.argmax(used))
    assert np.abs(rec.outputs[first] - want[first, :w].numpy()).max() > 1e-4


def _forced(tokens=14, E=8, K=2, L=2, seed=5):
    rng = np.random.default_rng(seed)
    ex = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(tokens)])
    w = rng.random((tokens, L, K)).astype(np.float32)
    return Trace.from_arrays(ex, w, [tokens], "decode", num_experts=E)


def test_forced_routing_runs_and_validates_exactly(tmp_path):
    import yaml

    from moesim.calibrate import measure_machine
    from moesim.executor.calibrate import extend_profile
    from moesim.validate import validate

    trace = _forced()
    settings = RunSettings(policy="lfu", capacity_experts=6, io_threads=1, warmup_tokens=4)
    run = capture_hf("tiny:olmoe", settings, tmp_path / "store", trace=trace)
    arr, src = run.to_arrays(), trace.to_arrays()
    assert np.array_equal(arr["experts"], src["experts"])
    assert run.meta.capture["hf_model"]["arch"] == "olmoe"
    path = run.write(tmp_path / "run.parquet")
    prof = tmp_path / "hw.yaml"
    prof.write_text(yaml.safe_dump(measure_machine(str(tmp_path), quick=True)))
    hf = load_hf("tiny:olmoe")
    extend_profile(prof, [hf.spec], threads=1, disk_dir=str(tmp_path), sizes_mib=(0.25,))
    r = validate(path, prof)
    assert r["bytes_exact"] and r["hits_exact"] and r["tokens"] == 10


def test_unsupported_architectures_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(ExecutorError, match="stacked by expert"):
        load_hf("tiny:dbrx")
    with pytest.raises(ExecutorError, match="routing as arguments"):
        load_hf("tiny:llama4")
    code = main(["run-real", "--hf", "tiny:jetmoe", "--out", str(tmp_path / "r.parquet"),
                 "--store", str(tmp_path / "s"), "--tokens", "2", "--capacity-experts", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "jetmoe" in err[0]


def test_cli_runs_a_tiny_model(tmp_path, capsys):
    import json

    code = main(["run-real", "--hf", "tiny:qwen3_moe", "--out", str(tmp_path / "r.parquet"),
                 "--store", str(tmp_path / "s"), "--tokens", "6", "--capacity-experts", "4",
                 "--io-threads", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, None) and out["model"] == "tiny:qwen3_moe" and out["tokens"] == 6
    assert 0 <= out["hit_rate"] < 1 and out["bytes_read"] > 0
