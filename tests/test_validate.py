"""moesim validate: a captured CPU run, simulated from a profile of this machine, must match
in bytes and in the hit/miss sequence exactly; latency figures are computed and reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moesim.cli import main  # noqa: E402
from moesim.executor import RunSettings, capture  # noqa: E402
from moesim.executor.calibrate import extend_profile  # noqa: E402
from moesim.validate import validate  # noqa: E402
from tests.test_executor import random_trace, tiny_spec  # noqa: E402


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from moesim.calibrate import measure_machine

    path = tmp_path_factory.mktemp("hw") / "hardware.yaml"
    path.write_text(yaml.safe_dump(measure_machine(str(path.parent), quick=True)))
    extend_profile(path, [tiny_spec()], threads=2, disk_dir=str(path.parent),
                   sizes_mib=(0.25, 0.5, 1))
    return path


def record(tmp_path, name="run", tokens=16, **settings):
    spec, tr = tiny_spec(), random_trace(tokens)
    run = capture(spec, RunSettings(**settings), tmp_path / "store", trace=tr)
    return run.write(tmp_path / f"{name}.parquet")


@pytest.mark.parametrize("settings", [
    {"policy": "lru", "capacity_experts": 5},
    {"policy": "lfu", "capacity_experts": 6, "scope": "per-layer"},
    {"policy": "fifo", "capacity_bytes": 4 * 3 * 64 * 32 * 4, "io_threads": 1},
    {"policy": "lru", "capacity_experts": 6, "prefetcher": "next-layer",
     "prefetch_params": {"accuracy": 0.5}},
])
def test_cpu_run_validates_exactly(tmp_path, profile, settings):
    path = record(tmp_path, **settings)
    r = validate(path, profile, tmp_path / "report")
    assert r["hits_exact"] and r["hit_mismatches"] == 0
    assert r["bytes_exact"] and r["bytes_measured"] == r["bytes_simulated"] > 0
    assert 0 < r["hit_rate"] < 1
    assert np.isfinite(r["latency_mape"]) and r["latency_mape"] >= 0
    assert r["tokens"] == 16 and len(r["per_layer"]) == 2
    assert r["scenario"]["sources"]["expert_s"] == "profile table expert_ffn"
    md = (tmp_path / "report.md").read_text()
    assert "MAPE" in md and "exact: True" in md
    assert "plotly" in (tmp_path / "report.html").read_text()


def test_a_tampered_run_is_caught(tmp_path, profile):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = record(tmp_path, policy="lru", capacity_experts=5)
    table = pq.read_table(path)
    res = table["residency"].to_pylist()
    res[3] = [1 - v if v in (0, 1) else v for v in res[3]]  # flip row 3's hits and misses
    table = table.set_column(table.schema.get_field_index("residency"), "residency",
                             pa.array(res, table.schema.field("residency").type))
    pq.write_table(table, path)
    r = validate(path, profile)
    assert not r["hits_exact"] and r["hit_mismatches"] > 0


def test_latency_prediction_uses_the_profile(tmp_path, profile):
    path = record(tmp_path, policy="lru", capacity_experts=5)
    slow = tmp_path / "slow.yaml"
    data = yaml.safe_load(profile.read_text())
    data["links"]["expert_read"]["bandwidth"] /= 100
    slow.write_text(yaml.safe_dump(data))
    fast, slowed = validate(path, profile), validate(path, slow)
    assert slowed["mean_latency_simulated_s"] > fast["mean_latency_simulated_s"]
    lat = fast["scenario"]["read_latency_s"]
    assert slowed["read_predicted_s"] - lat == pytest.approx(100 * (fast["read_predicted_s"] - lat))


def test_cli_validate_json_and_errors(tmp_path, profile, capsys):
    path = record(tmp_path, policy="lru", capacity_experts=5)
    assert main(["validate", str(path), "--hardware", str(profile), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"latency_mape", "bytes_exact", "hits_exact", "p50_error", "p99_error"} <= set(out)
    assert out["bytes_exact"] is True and out["hits_exact"] is True
    assert main(["validate", str(path)]) == 2  # no hardware.yaml beside the run
    assert "hardware" in capsys.readouterr().err
    bad = tmp_path / "plain.parquet"
    random_trace().write(bad)
    assert main(["validate", str(bad), "--hardware", str(profile)]) == 2
    assert "not a moesim run file" in capsys.readouterr().err


def test_cli_run_real_writes_a_run(tmp_path, capsys):
    trace = tmp_path / "routing.parquet"
    random_trace(8).write(trace)
    out = tmp_path / "run.parquet"
    assert main([
        "run-real", "--out", str(out), "--trace", str(trace), "--layers", "2", "--tokens", "6",
        "--override", "hidden=64", "--override", "moe_intermediate=32",
        "--override", "shared_intermediate=16", "--capacity-experts", "4",
        "--store", str(tmp_path / "store"), "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)
    assert fig["tokens"] == 6 and 0 <= fig["hit_rate"] <= 1 and out.exists()
    assert main(["run-real", "--out", str(out), "--override", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_profile_has_loop_rows_and_shared_disk(tmp_path, profile):
    data = yaml.safe_load(profile.read_text())
    ops = {r["operation"] for r in data["tables"]}
    assert {"expert_ffn", "moe_dense", "executor_overhead"} <= ops
    links = data["links"]
    # two threads at once never beat two independent threads nor fall below one thread
    assert links["expert_read"]["bandwidth"] <= links["expert_read_shared"]["bandwidth"] \
        <= 2 * links["expert_read"]["bandwidth"] * (1 + 1e-9)
    r = validate(record(tmp_path, policy="lru", capacity_experts=5, io_threads=2), profile)
    assert r["scenario"]["sources"]["layer_overhead_s"] == "profile table executor_overhead"
    assert "expert-read-shared" in r["scenario"]["sources"]["shared_bandwidth"]
    assert r["scenario"]["shared_bandwidth"] == pytest.approx(
        links["expert_read_shared"]["bandwidth"])


def test_warmup_tokens_are_calibrated_on_and_excluded(tmp_path, profile):
    path = record(tmp_path, tokens=16, policy="lru", capacity_experts=5, warmup_tokens=6)
    r = validate(path, profile)
    assert r["tokens"] == 10 and r["warmup_tokens"] == 6 and r["warmup_calibration"]
    assert r["hits_exact"] and r["bytes_exact"]  # the whole run is replayed and checked
    assert "warm-up tokens 0..5" in r["scenario"]["sources"]["dense_s"]
    only = validate(path, profile, warmup_calibration=False)
    assert only["tokens"] == 10 and not only["warmup_calibration"]
    assert only["scenario"]["sources"]["dense_s"] == "profile table moe_dense"
    from moesim.executor.runfile import read_run

    a = read_run(path).to_arrays(columns=["t_dense_s"])
    assert r["scenario"]["dense_s"] == pytest.approx(float(np.median(a["t_dense_s"][:6])))


def test_read_replay_pairs_each_load_with_its_measured_read(tmp_path, profile):
    from moesim.calibrate import load_profile
    from moesim.executor.runfile import read_run
    from moesim.validate import build_scenario, simulate_run

    path = record(tmp_path, tokens=16, policy="lru", capacity_experts=5, io_threads=1)
    run = read_run(path)
    scen = build_scenario(run, load_profile(profile))
    tr = run.meta.capture["transfers"]
    measured = np.asarray(tr["end_s"]) - np.asarray(tr["start_s"])
    df = simulate_run(run, scen, read_durations=measured.tolist())[0]
    loads = df.attrs["loads"]
    order = np.argsort(loads["issued_s"], kind="stable")
    np.testing.assert_allclose((loads["end_s"] - loads["start_s"])[order], measured, atol=1e-12)
    # replaying the disk model's own durations reproduces the disk model's latencies
    model = [scen.load_s(b) for b in loads["bytes"][order]]
    same = simulate_run(run, scen, read_durations=model)[0]
    np.testing.assert_allclose(same.sort_values("token")["latency_s"],
                               simulate_run(run, scen)[0]
                               .sort_values("token")["latency_s"], rtol=1e-9)
    r = validate(path, profile)
    assert r["io_replay_mape"] is not None and r["io_replay_mape"] >= 0
    assert 0 <= r["reads_slow_pct"] <= 100
