"""Parameter sweeps: grid and random search, joblib and a Dask LocalCluster giving identical
tables, resuming after an interruption, error rows, the Pareto front and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from moesim.cli import main
from moesim.engine import simulate
from moesim.sweep import SweepError, load_sweep, pareto_front, run_sweep, sweep_from_dict

# a tiny scenario (8 requests, uniform routing): about 0.05 s to simulate
TINY = {
    "name": "tiny",
    "model": "mixtral-8x7b",
    "cluster": {"preset": "h100-ib", "num_nodes": 1},
    "parallelism": {"tp": 1, "ep": 8},
    "workload": {"arrival": "poisson", "rate_per_s": 20, "num_requests": 8, "prompt_tokens": 64,
                 "output_tokens": 8, "seed": 0},
    "routing": {"source": "uniform"},
}
GRID = {
    "scenario": TINY,
    "search": "grid",
    "parameters": {
        "workload.rate_per_s": [5, 10, 20, 40, 80],
        "workload.output_tokens": [4, 8, 12, 16, 20],
        "placement": [{"kind": "contiguous"}, {"kind": "balanced", "redundant_experts": 8}],
    },
    "metrics": ["ttft_mean_s", "tpot_mean_s", "throughput_tok_s", "output_tokens"],
}
RESULT_COLUMNS = ["point", "point_id", "replicate", "workload.rate_per_s", "workload.output_tokens",
                  "placement", "ttft_mean_s", "tpot_mean_s", "throughput_tok_s", "output_tokens",
                  "error"]


def write_sweep(folder, data, name="sweep.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    sweep = load_sweep(write_sweep(folder, GRID))
    run = run_sweep(sweep, folder / "local.parquet", backend="local", n_jobs=2)
    assert run.total == run.computed == 50 and run.errors == 0
    return pd.read_parquet(folder / "local.parquet")


def test_grid_has_every_combination_with_the_simulators_figures(local_table):
    t = local_table
    assert len(t) == 50 and t.point.tolist() == list(range(50)) and t.point_id.is_unique
    combos = set(zip(t["workload.rate_per_s"], t["workload.output_tokens"], t["placement"], strict=True))
    assert len(combos) == 50
    # every request generates exactly its output tokens: 8 requests x output_tokens
    assert (t.output_tokens == 8 * t["workload.output_tokens"]).all()
    # spot check two rows against a direct simulation of the same scenario
    sweep = sweep_from_dict(GRID)
    by_id = {p.point_id: p for p in sweep.points()}
    for i in (0, 37):
        row = t.iloc[i]
        point = by_id[row.point_id]
        assert point.params["workload.rate_per_s"] == row["workload.rate_per_s"]
        direct = simulate(sweep.scenario(point.changes)).summary
        for m in GRID["metrics"]:
            assert row[m] == direct[m]


def test_dask_local_cluster_gives_the_identical_table(local_table, tmp_path):
    pytest.importorskip("distributed")
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    run = run_sweep(sweep, tmp_path / "dask.parquet", backend="dask", n_jobs=2)
    assert run.backend == "dask" and run.computed == 50
    on_dask = pd.read_parquet(tmp_path / "dask.parquet")
    pd.testing.assert_frame_equal(on_dask[RESULT_COLUMNS], local_table[RESULT_COLUMNS])


def test_an_interrupted_sweep_resumes_where_it_stopped(local_table, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    out = tmp_path / "resume.parquet"

    def interrupt(done, total, row):
        if done == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, n_jobs=1, chunk=5, on_point=interrupt)
    saved = pd.read_parquet(out)
    assert len(saved) == 17  # every finished point was kept, mid-chunk included
    seen = []
    run = run_sweep(sweep, out, n_jobs=1, on_point=lambda d, total, row: seen.append(row))
    assert (run.skipped, run.computed) == (17, 33)
    assert seen[0] is None and len(seen) == 34  # the resumed start, then 33 new points
    final = pd.read_parquet(out)
    pd.testing.assert_frame_equal(final[RESULT_COLUMNS], local_table[RESULT_COLUMNS])
    # a third run has nothing left to do
    assert run_sweep(sweep, out, n_jobs=1).computed == 0


def test_a_changed_base_scenario_is_recomputed_not_reused(tmp_path):
    small = {**GRID, "parameters": {"workload.rate_per_s": [5, 10]}}
    out = tmp_path / "r.parquet"
    assert run_sweep(sweep_from_dict(small), out, n_jobs=1).computed == 2
    changed = {**small, "set": {"workload.prompt_tokens": 32}}
    run = run_sweep(sweep_from_dict(changed), out, n_jobs=1)
    assert (run.computed, run.skipped) == (2, 0)
    assert len(run.table) == 2  # rows of the old base are not part of this sweep


def test_random_search_is_seeded_and_within_bounds():
    spec = {"scenario": TINY, "search": "random", "samples": 12, "seed": 3, "parameters": {
        "workload.rate_per_s": {"dist": "loguniform", "low": 2, "high": 64},
        "serving.max_running": {"dist": "int", "low": 4, "high": 32},
        "execution.dispatcher": ["flat", "deepep-ll"]}}
    a, b = sweep_from_dict(spec).points(), sweep_from_dict(spec).points()
    assert [p.params for p in a] == [p.params for p in b] and len(a) == 12
    rates = [p.params["workload.rate_per_s"] for p in a]
    assert all(2 <= r <= 64 for r in rates) and len(set(rates)) == 12
    assert all(isinstance(p.params["serving.max_running"], int) for p in a)
    other = sweep_from_dict({**spec, "seed": 4}).points()
    assert [p.params for p in other] != [p.params for p in a]


def test_replicates_vary_the_seeds():
    spec = {**GRID, "parameters": {"workload.rate_per_s": [20]}, "replicates": 3}
    pts = sweep_from_dict(spec).points()
    assert [p.changes["workload.seed"] for p in pts] == [0, 1, 2]
    assert len({p.point_id for p in pts}) == 3


def test_an_invalid_point_is_an_error_row_not_a_crash(tmp_path):
    spec = {**GRID, "parameters": {"parallelism.tp": [1, 3]}}
    run = run_sweep(sweep_from_dict(spec), tmp_path / "e.parquet", n_jobs=1)
    t = run.table
    assert run.errors == 1 and t.error.iloc[0] is None
    assert "tp=3 does not divide the 8 GPUs" in t.error.iloc[1]


@pytest.mark.parametrize("change, message", [
    ({"search": "spiral"}, "search 'spiral'"),
    ({"parameters": {}}, "'parameters' must map"),
    ({"parameters": {"workload.rate_per_s": 5}}, "non-empty list"),
    ({"search": "random"}, "needs 'samples'"),
    ({"scenario": "no-such-scenario"}, "neither a file nor a bundled scenario"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"set": {"workload.rate_per_s": -1}}, "greater than 0"),
])
def test_bad_sweep_files_are_one_line_errors(change, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        sweep_from_dict({**GRID, **change})


def test_pareto_front_closed_form():
    t = pd.DataFrame({"lat": [1.0, 2.0, 3.0, 2.0, 1.0, np.nan],
                      "tput": [1.0, 3.0, 4.0, 2.0, 0.5, 9.0],
                      "error": [None, None, None, None, None, None]})
    # (1,1) (2,3) (3,4) are each best at some trade-off; (2,2) is dominated by (2,3); (1,0.5) by (1,1)
    front = pareto_front(t, {"lat": "min", "tput": "max"})
    assert front.tolist() == [True, True, True, False, False, False]
    t.loc[1, "error"] = "failed"  # (2, 2) is no longer dominated once (2, 3) drops out
    assert pareto_front(t, {"lat": "min", "tput": "max"}).tolist() == [True, False, True, True, False, False]
    with pytest.raises(SweepError):
        pareto_front(t, {"nope": "min"})


def test_cli_runs_resumes_and_reports_errors(tmp_path, capsys):
    spec = write_sweep(tmp_path, {**GRID, "parameters": {"workload.rate_per_s": [5, 10, 20]}})
    out = tmp_path / "cli.parquet"
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["points"] == first["computed"] == 3 and len(pd.read_parquet(out)) == 3
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_done"] == 3
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err
    assert main(["sweep", str(spec), "--backend", "spark"]) == 2
    assert main(["sweep", str(spec), "--scheduler", "tcp://x:1"]) == 2


def test_the_bundled_example_sweep_is_valid():
    from pathlib import Path

    import moesim

    path = Path(moesim.__file__).parent / "data" / "sweeps" / "mixtral-ep8-placement.yaml"
    sweep = load_sweep(path)
    points = sweep.points()
    assert len(points) == 16 and len({p.point_id for p in points}) == 16
