"""The committed reference runs (traces/runs/, captured on this project's machine by
benchmarks/reference_runs.py) validate offline: bytes and the hit/miss sequence exact, and the
latency figures recorded beside each run reproduced from the run file and its profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from moesim.validate import validate  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "traces" / "runs"
NAMES = sorted(p.name.removesuffix(".validation.json") for p in RUNS.glob("*.validation.json"))


def test_reference_runs_are_committed():
    assert {"stack-dsv2lite-lru", "hf-qwen3moe-lfu"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_run_validates_offline(tmp_path, name):
    recorded = json.loads((RUNS / f"{name}.validation.json").read_text())
    r = validate(RUNS / f"{name}.parquet", RUNS / f"{name}.profile.yaml", tmp_path / "report")
    assert r["bytes_exact"] and r["hits_exact"]
    assert r["bytes_measured"] == recorded["bytes_measured"] > 0
    assert r["tokens"] == recorded["tokens"]
    # the simulation is deterministic: the same run and profile give the recorded figures
    for key in ("latency_mape", "p50_error", "p99_error", "mean_latency_simulated_s",
                "io_replay_mape"):
        assert r[key] == pytest.approx(recorded[key], rel=1e-9, abs=1e-12), key
    cap_ = json.loads(json.dumps(r["scenario"]["sources"]))
    assert "warm-up" in cap_["dense_s"]  # calibrated on the run's own warm-up tokens
