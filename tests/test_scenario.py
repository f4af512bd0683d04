"""Scenario files and workloads: validation with one-line errors, arrivals, lengths, JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.scenario import ScenarioError, bundled_scenarios, load_scenario, scenario_from_dict
from moesim.workload import (
    WorkloadError,
    build_workload,
    gamma_arrivals,
    poisson_arrivals,
    read_jsonl,
)


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bundled_scenarios_load_and_resolve(tmp_path):
    from moesim.engine import build

    names = bundled_scenarios()
    assert {"mixtral-8x7b-ep8", "deepseek-v3-ep64"} <= set(names)
    sim = build(load_scenario(names["deepseek-v3-ep64"]))
    assert sim.layout.num_gpus == 64 and sim.model.moe_layers == 58
    assert sim.routing.kind == "trace" and sim.routing.num_sequences == 8


@pytest.mark.parametrize("text, message", [
    ("model: mixtral-8x7b\nworkload: {arrival: poisson}\n", "workload: arrival 'poisson' needs 'rate_per_s'"),
    ("model: mixtral-8x7b\nworkload: {arrival: burst, rate_per_s: -2}\n", "workload.rate_per_s: Input should be greater than 0"),
    ("model: mixtral-8x7b\nserving: {max_tokens: 5}\n", "serving.max_tokens: Extra inputs are not permitted"),
    ("model: mixtral-8x7b\nrouting: {source: trace}\n", "needs 'trace: FILE.parquet'"),
    ("model: mixtral-8x7b\nserving: {max_running: 64, max_tokens_per_step: 8}\n", "max_running 64 exceeds"),
    ("model: [1, 2\n", "not valid YAML"),
    ("workload: {arrival: burst}\n", "model: Field required"),
])
def test_bad_scenarios_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_semantic_errors_name_the_field(tmp_path):
    from moesim.engine import build

    base = {"model": "mixtral-8x7b", "cluster": {"preset": "h100-ib", "num_nodes": 1}}
    with pytest.raises(MoesimError, match="unknown model preset 'mixtral-9x9b'"):
        build(scenario_from_dict({**base, "model": "mixtral-9x9b"}))
    with pytest.raises(ScenarioError, match="parallelism.ep=4.*a cluster of 4 GPUs"):
        build(scenario_from_dict({**base, "parallelism": {"ep": 4}}))
    with pytest.raises(ScenarioError, match="parallelism.ep=16.*only 8 GPUs"):
        build(scenario_from_dict({**base, "parallelism": {"ep": 16}}))
    with pytest.raises(ScenarioError, match=r"cluster: .*unknown cluster preset"):
        build(scenario_from_dict({**base, "cluster": "h999"}))
    with pytest.raises(ScenarioError, match="does not fit"):
        build(scenario_from_dict({**base, "cluster": {"preset": "h100-ib", "num_nodes": 1,
                                                      "gpus_per_node": 1}, "parallelism": {"ep": 1}}))


def test_with_changes_revalidates():
    sc = scenario_from_dict({"model": "mixtral-8x7b"})
    assert sc.with_changes({"placement.kind": "round_robin"}).placement.kind == "round_robin"
    with pytest.raises(ScenarioError, match="placement.kind"):
        sc.with_changes({"placement.kind": "magic"})


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    rng = np.random.default_rng(0)
    gaps = np.diff(np.r_[0, poisson_arrivals(10.0, 200_000, rng)])
    assert gaps.mean() == pytest.approx(0.1, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)
    gaps = np.diff(np.r_[0, gamma_arrivals(10.0, 3.0, 200_000, rng)])
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.05)


def test_workload_is_seeded_and_lengths_respect_bounds():
    sc = scenario_from_dict({"model": "mixtral-8x7b", "workload": {
        "arrival": "gamma", "rate_per_s": 5, "cv": 2, "num_requests": 500, "seed": 3,
        "prompt_tokens": {"dist": "lognormal", "mean": 300, "cv": 1.0, "min": 10, "max": 2000},
        "output_tokens": {"dist": "uniform", "min": 5, "max": 9}}})
    a, b = build_workload(sc.workload), build_workload(sc.workload)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert a.prompt_tokens.min() >= 10 and a.prompt_tokens.max() <= 2000
    assert set(np.unique(a.output_tokens)) <= set(range(5, 10))
    assert 200 < a.prompt_tokens.mean() < 400


def test_jsonl_workload(tmp_path):
    rows = [{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 3},
            {"arrival_s": 0.1, "prompt_tokens": 20, "output_tokens": 1}]
    p = write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n", "w.jsonl")
    w = read_jsonl(p)
    assert w.arrival_s.tolist() == [0.1, 0.5] and w.prompt_tokens.tolist() == [20, 10]
    bad = write(tmp_path, '{"arrival_s": 0.1, "prompt_tokens": 3}\n', "bad.jsonl")
    with pytest.raises(WorkloadError, match=r"bad.jsonl:1: missing key 'output_tokens'"):
        read_jsonl(bad)
    with pytest.raises(WorkloadError, match="at least 1 prompt"):
        read_jsonl(write(tmp_path, '{"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}', "z.jsonl"))
