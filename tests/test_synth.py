"""Synthetic traces (moesim.traces.synth) and fitting them to real ones (moesim.traces.fit)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.model import get_model
from moesim.traces import Trace
from moesim.traces import synth as synth_mod
from moesim.traces.fit import TOLERANCES, fit, fit_report
from moesim.traces.synth import SynthParams, params_for_model, synthesize, zipf_shares

MIXTRAL = get_model("mixtral-8x7b")
DSV2 = get_model("deepseek-v2-lite")
DSV3 = get_model("deepseek-v3")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "moesim.cli", *args], capture_output=True, text=True)


def experts_of(trace: Trace) -> np.ndarray:
    return trace.to_arrays()["experts"].astype(np.int64)


# ----- determinism and streaming -----------------------------------------------------------------
def test_same_seed_gives_an_identical_file_and_another_seed_differs(tmp_path):
    kw = dict(requests=3, decode_fraction=0.5, skew=1.0, locality=0.5)
    a = synthesize(MIXTRAL, 600, seed=7, out=tmp_path / "a.parquet", **kw)
    synthesize(MIXTRAL, 600, seed=7, out=tmp_path / "b.parquet", **kw)
    c = synthesize(MIXTRAL, 600, seed=8, out=tmp_path / "c.parquet", **kw)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert not np.array_equal(experts_of(a), experts_of(c))


def test_chunking_never_shows_in_the_output(monkeypatch):
    """The AR state, the request component and request restarts carry across chunks."""
    kw = dict(requests=5, decode_fraction=0.3, skew=0.7, locality=0.8, coherence=0.3, affinity=0.5)
    whole = synthesize(DSV2, 700, seed=3, **kw).to_arrays()
    monkeypatch.setattr(synth_mod, "CHUNK_ELEMENTS", 64 * 97)  # 97-token chunks, not aligned to requests
    parts = synthesize(DSV2, 700, seed=3, **kw).to_arrays()
    assert np.array_equal(whole["experts"], parts["experts"])
    assert np.allclose(whole["weights"], parts["weights"], rtol=1e-5)


def test_in_memory_and_streamed_traces_are_the_same(tmp_path):
    mem = synthesize(MIXTRAL, 300, requests=2, seed=1)
    disk = synthesize(MIXTRAL, 300, requests=2, seed=1, out=tmp_path / "t.parquet")
    assert disk.path is not None and disk.num_rows == mem.num_rows == 300 * 32
    for key in ("experts", "weights", "request_id", "token_pos", "step", "phase"):
        assert np.array_equal(mem.to_arrays()[key], disk.to_arrays()[key])


# ----- closed forms ----------------------------------------------------------------------------------
def test_locality_one_repeats_the_previous_tokens_experts_within_each_request():
    t = synthesize(DSV2, 400, requests=4, seed=2, locality=1.0, coherence=0.0, skew=0.8)
    a = t.to_arrays()
    ex = np.sort(a["experts"], axis=2)
    same_req = a["request_id"][1:] == a["request_id"][:-1]
    assert np.array_equal(ex[1:][same_req], ex[:-1][same_req])
    # new requests draw afresh: some request start differs from the token before it
    assert not np.array_equal(ex[1:][~same_req], ex[:-1][~same_req])


def test_locality_zero_draws_tokens_independently():
    t = synthesize(DSV2, 3000, seed=2, locality=0.0, coherence=0.0, affinity=0.0, skew=0.0)
    ex = experts_of(t)
    shared = (ex[1:, :, :, None] == ex[:-1, :, None, :]).any(-1).sum(-1).mean()
    # two independent uniform 6-of-64 sets share 6*6/64 experts on average
    assert shared == pytest.approx(36 / 64, abs=0.05)


def test_coherence_one_fixes_a_request_and_affinity_one_follows_the_successor_map():
    t = synthesize(MIXTRAL, 200, requests=4, seed=5, locality=0.0, coherence=1.0)
    a = t.to_arrays()
    for r in range(4):
        ex = np.sort(a["experts"][a["request_id"] == r], axis=2)
        assert (ex == ex[0]).all()
    params = params_for_model(DSV2, skew=0.0, locality=0.0, coherence=0.0, affinity=1.0, seed=4)
    ex = experts_of(synthesize(params, 300, seed=4))
    for layer in range(1, params.num_layers):
        followed = np.sort(params.successor[layer][ex[:, layer - 1]], axis=1)
        assert np.array_equal(followed, np.sort(ex[:, layer], axis=1))


def test_skew_zero_gives_uniform_load_within_binomial_tolerance():
    T = 20000
    t = synthesize(DSV2, T, seed=11, skew=0.0, locality=0.0, coherence=0.0, affinity=0.0)
    load = t.load_matrix()
    p = DSV2.top_k / DSV2.num_experts  # each expert is in a token's top-k with probability k/E
    z = (load - T * p) / np.sqrt(T * p * (1 - p))
    assert np.abs(z).max() < 5.0  # 1664 cells: |z| > 5 has probability ~1e-3 in all


def test_zipf_popularity_is_reproduced():
    params = params_for_model(MIXTRAL, skew=1.0, locality=0.0, coherence=0.0, affinity=0.0, seed=2)
    T = 20000
    load = synthesize(params, T, seed=2).load_matrix()
    share = load / load.sum(1, keepdims=True)
    assert np.abs(share - params.popularity[0]).max() < 0.01
    assert np.allclose(np.sort(params.popularity[0], axis=1)[:, ::-1], zipf_shares(8, 1.0))


def test_deepseek_v3_group_limited_routing_and_scaled_sigmoid_weights():
    t = synthesize(DSV3, 300, requests=2, decode_fraction=0.5, seed=1, skew=0.0)  # skip calibration
    assert (t.meta.num_layers, t.meta.num_experts, t.meta.top_k) == (58, 256, 8)
    assert t.meta.shared_experts == 1 and t.meta.weight_norm == "scaled"
    assert t.meta.extra["routing"] == {"router": "sigmoid", "norm_topk_prob": True,
                                       "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4}
    a = t.to_arrays()
    groups = a["experts"] // 32
    used = np.array([[len(np.unique(g)) for g in tok] for tok in groups])
    assert used.max() <= 4
    assert np.allclose(a["weights"].sum(-1), 2.5, atol=1e-4)
    # a plain top-8 of 256 would spread over 5+ groups most of the time
    assert (used == 4).mean() > 0.5


def test_group_limited_calibration_hits_its_popularity():
    small = get_model("deepseek-v3", num_layers=5)  # 2 MoE layers keep the test fast
    params = params_for_model(small, skew=0.8, locality=0.0, coherence=0.0, affinity=0.0, seed=3)
    T = 20000
    load = synthesize(params, T, seed=3).load_matrix()
    share = load / load.sum(1, keepdims=True)
    assert np.abs(share - params.popularity[0]).max() < 0.006


def test_gate_weights_follow_each_router():
    mix = synthesize(MIXTRAL, 200, seed=1).to_arrays()["weights"]
    assert np.allclose(mix.sum(-1), 1.0, atol=1e-5)
    assert (np.diff(mix, axis=-1) <= 1e-7).all()  # slot 0 carries the largest weight
    raw = synthesize(DSV2, 200, seed=1).to_arrays()["weights"]
    assert (raw.sum(-1) < 1).all() and (raw > 0).all()  # softmax over 64, not renormalised
    sharper = synthesize(DSV2, 200, seed=1, weight_scale=3.0).to_arrays()["weights"]
    assert sharper.sum(-1).mean() > raw.sum(-1).mean()


def test_slot_orders():
    params = params_for_model(DSV2, seed=1)
    by_weight = synthesize(params, 100, seed=1).to_arrays()
    params.slot_order = "id"
    ex = synthesize(params, 100, seed=1).to_arrays()["experts"]
    assert (np.diff(ex, axis=-1) > 0).all()
    assert np.array_equal(ex, np.sort(by_weight["experts"], axis=-1))  # same routing, reordered
    params.slot_order = "random"
    shuffled = synthesize(params, 100, seed=1).to_arrays()
    assert (np.diff(shuffled["weights"], axis=-1) <= 0).all(-1).mean() < 0.05
    assert np.array_equal(np.sort(shuffled["experts"], axis=-1), ex)
    assert fit(synthesize(DSV2, 300, seed=1)).slot_order == "weight"


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b",
                                  "olmoe-1b-7b", "gpt-oss-120b"])
def test_presets_keep_their_real_shapes(name):
    model = get_model(name)
    t = synthesize(model, 50, requests=2, seed=0, skew=0.0)
    m = t.meta
    assert (m.num_layers, m.num_experts, m.top_k) == (model.moe_layers, model.num_experts, model.top_k)
    assert m.shared_experts == model.shared_experts and m.model == model.name
    assert m.expert_bytes == [model.expert_bytes()] * model.moe_layers
    assert t.validate() == 50 * model.moe_layers


def test_requests_phases_and_steps():
    a = synthesize(MIXTRAL, 40, requests=4, decode_fraction=0.5, seed=0).to_arrays()
    assert a["seq_lens"].tolist() == [10, 10, 10, 10]
    for r in range(4):
        mine = a["request_id"] == r
        assert a["phase"][mine].tolist() == [0] * 5 + [1] * 5
        assert a["token_pos"][mine].tolist() == list(range(10))
    # each request: one prefill step, then one step per decode token, requests one after another
    assert a["step"][:10].tolist() == [0] * 5 + [1, 2, 3, 4, 5]
    assert a["step"].max() == 4 * 6 - 1


def test_bad_settings_raise_one_line_errors():
    with pytest.raises(MoesimError, match="locality must be in"):
        synthesize(MIXTRAL, 10, locality=1.5)
    with pytest.raises(MoesimError, match="requests must be between"):
        synthesize(MIXTRAL, 10, requests=11)
    with pytest.raises(MoesimError, match="decode fraction"):
        synthesize(MIXTRAL, 10, decode_fraction=1.0)
    with pytest.raises(MoesimError, match="unknown model preset"):
        get_model("mixtral-9x9b")


def test_params_save_and_load_round_trip(tmp_path):
    params = params_for_model(DSV2, skew=0.5, domains=2, seed=1)
    loaded = SynthParams.load(params.save(tmp_path / "p.json"))
    assert np.allclose(loaded.popularity, params.popularity, atol=1e-6)
    assert np.array_equal(loaded.successor, params.successor)
    assert loaded.describe() == params.describe()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoesimError, match="not valid JSON"):
        SynthParams.load(tmp_path / "bad.json")


# ----- fitting -----------------------------------------------------------------------------------------
def test_fit_recovers_the_parameters_of_a_synthetic_trace():
    model = get_model("deepseek-v2-lite", num_layers=7)  # 6 MoE layers
    truth = params_for_model(model, skew=0.8, locality=0.5, coherence=0.15, affinity=0.6, seed=9)
    trace = synthesize(truth, 16000, requests=16, seed=9)
    got = fit(trace, seed=1)
    assert got.skew == pytest.approx(0.8, abs=0.1)
    assert np.abs(got.popularity - truth.popularity).max() < 0.01
    assert got.locality.mean() == pytest.approx(0.5, abs=0.1)
    assert got.coherence.mean() == pytest.approx(0.15, abs=0.08)
    assert got.affinity[1:].mean() == pytest.approx(0.6, abs=0.1)
    # the strongest successor links are found again
    assert (got.successor[1:] == truth.successor[1:]).mean() > 0.8
    assert got.weight_scale == pytest.approx(1.0, rel=0.1)
    assert not got.norm_topk_prob and got.router == "softmax"
    assert got.seq_lens == [1000] * 16


def test_fit_finds_domains():
    model = get_model("mixtral-8x7b", num_layers=4)
    truth = params_for_model(model, skew=1.5, domains=2, locality=0.2, seed=5)
    trace = synthesize(truth, 8000, requests=40, seed=5)
    got = fit(trace, domains=2, seed=0)
    pairs = [np.abs(got.popularity[i] - truth.popularity[j]).max() for i in range(2) for j in range(2)]
    matched, crossed = sorted([pairs[0] + pairs[3], pairs[1] + pairs[2]])
    assert matched < 0.1 and crossed > 3 * matched  # each fitted domain is one of the true ones


def _esft_trace(path):
    from moesim.traces.importers import import_trace

    return import_trace(path, "arrays-npz")


@pytest.mark.parametrize("task", [
    "law", "translation",
    pytest.param("intent", marks=pytest.mark.slow), pytest.param("summary", marks=pytest.mark.slow),
])
def test_fitted_esft_trace_reproduces_skew_reuse_and_lru_curve(esft_npz, task):
    real = _esft_trace(esft_npz[task])
    params, q = fit_report(real, seed=0)
    # the stated tolerances (traces/fit.py TOLERANCES)
    assert q["imbalance_mean_rel_err"] <= TOLERANCES["imbalance_mean_rel_err"]  # 10 %
    assert q["imbalance_layer_max_rel_err"] <= TOLERANCES["imbalance_layer_max_rel_err"]
    assert q["lru_max_abs_err"] <= TOLERANCES["lru_max_abs_err"]  # 0.05 at every grid capacity
    assert q["reuse_distance_ks"] <= TOLERANCES["reuse_distance_ks"]
    assert q["lru_per_layer_max_abs_err"] <= TOLERANCES["lru_per_layer_max_abs_err"]
    assert all(q["within_tolerance"].values())
    assert q["sorted_share_max_abs_err"] < 0.03
    assert q["reuse_lag1"][1] == pytest.approx(q["reuse_lag1"][0], abs=0.04)
    assert len(q["lru_capacities"]) >= 4
    assert params.weight_norm == "raw" and params.shared_experts == 2
    assert params.slot_order == "id"  # ESFT rows are not sorted by weight


# ----- the command line ----------------------------------------------------------------------------------
def test_cli_synth_fit_and_synth_from_params(tmp_path):
    out = tmp_path / "t.parquet"
    r = cli("trace", "synth", "--model", "mixtral-8x7b", "--tokens", "400", "--requests", "4",
            "--skew", "1.0", "--locality", "0.6", "--decode-fraction", "0.5", "--seed", "3",
            "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rows"] == 400 * 32 and info["requests"] == 4 and info["model"] == "mixtral-8x7b"
    fit_json = tmp_path / "fit.json"
    r = cli("trace", "fit", str(out), "--out", str(fit_json), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["params"]["layers"] == 32 and "lru_max_abs_err" in report["quality"]
    assert report["params"]["locality"] == pytest.approx(0.6, abs=0.15)
    r = cli("trace", "synth", "--params", str(fit_json), "--seed", "1", "--out", str(tmp_path / "s.parquet"))
    assert r.returncode == 0, r.stderr
    assert Trace.read(tmp_path / "s.parquet").num_rows == 400 * 32  # the fitted trace's shape


def test_cli_unknown_preset_is_one_error_line(tmp_path):
    r = cli("trace", "synth", "--model", "gpt-5", "--tokens", "10", "--out", str(tmp_path / "x.parquet"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model preset 'gpt-5'" in lines[0] and "deepseek-v3" in lines[0]
    assert not (tmp_path / "x.parquet").exists()


def test_esft_tolerances_reject_a_wrong_fit(esft_npz):
    """The tolerances discriminate: another domain's fit, or a fit without temporal locality,
    misses them."""
    law = _esft_trace(esft_npz["law"])
    params = fit(law, seed=0)
    _, other_domain = fit_report(_esft_trace(esft_npz["translation"]), params=params, seed=0)
    assert other_domain["imbalance_mean_rel_err"] > TOLERANCES["imbalance_mean_rel_err"]
    assert other_domain["lru_max_abs_err"] > TOLERANCES["lru_max_abs_err"]
    params.locality[:] = 0.0
    params.coherence[:] = 0.0
    _, no_locality = fit_report(law, params=params, seed=0)
    assert no_locality["imbalance_mean_rel_err"] <= TOLERANCES["imbalance_mean_rel_err"]
    assert no_locality["lru_max_abs_err"] > 2 * TOLERANCES["lru_max_abs_err"]
    assert no_locality["reuse_lag1"][1] < no_locality["reuse_lag1"][0] - 0.05
