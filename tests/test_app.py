"""The dashboard under Streamlit's AppTest: every page renders, reads its inputs, calls the
library and shows what the library computed; bad input is an error line, never a traceback."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

st = pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest  # noqa: E402

from moesim.model import get_model  # noqa: E402
from moesim.traces import Trace  # noqa: E402
from moesim.traces.synth import synthesize  # noqa: E402
from tests.app_helpers import cpu_run, small_trace, sweep_table  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
TIMEOUT = 120


@pytest.fixture(autouse=True)
def clear_caches():
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    """A small Mixtral-shaped trace: 384 tokens, 8 requests, 32 layers x 8 experts, top-2."""
    return small_trace(tmp_path_factory.mktemp("app"))


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    return at


def with_trace(trace_file: Path) -> AppTest:
    at = new_app()
    at.switch_page("app_pages/traces.py").run()
    at.file_uploader(key="trace_upload").set_value(
        (trace_file.name, trace_file.read_bytes(), "application/octet-stream")).run()
    assert not at.exception, at.exception
    assert [s.value for s in at.success] == ["Loaded 12,288 rows from mixtral-small.parquet as 'mixtral-small'."]
    return at


def figures(at: AppTest) -> list[dict]:
    return [json.loads(node.proto.spec) for node in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A Plotly figure array: a list, or Plotly >= 6's base64 typed array."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):  # "32, 8"
            shape = [int(x) for x in shape.split(",")]
        return flat.reshape(shape) if shape else flat
    return np.asarray(value, dtype=float)


def metric(at: AppTest, label_start: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label_start))


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


# ----- Overview and pages without a trace -------------------------------------------------------------
def test_overview_lists_every_page():
    at = new_app()
    assert at.title[0].value.startswith("moesim")
    text = " ".join(m.value for m in at.markdown)
    for page in ("Traces", "Cache & offload", "Placement", "Cluster simulation", "Validation", "Sweeps"):
        assert page in " ".join(str(p.proto) for p in at.get("page_link")) or page in text
    assert "not installed" not in text


@pytest.mark.parametrize("page", ["app_pages/cache.py", "app_pages/placement.py"])
def test_trace_pages_point_to_the_traces_page_when_none_is_loaded(page):
    at = new_app()
    at.switch_page(page).run()
    assert not at.exception
    assert "Load or synthesise a trace" in at.info[0].value


# ----- Traces -----------------------------------------------------------------------------------------
def test_upload_shows_statistics_from_the_library(trace_file):
    from moesim.traces.stats import compute_stats

    at = with_trace(trace_file)
    ref = compute_stats(Trace.read(trace_file), segment_lengths=(), windows=(16,))
    assert metric(at, "tokens") == "384"
    assert metric(at, "load imbalance") == f"{ref.imbalance_mean:.2f}"
    figs = figures(at)
    heat = next(f for f in figs if f["layout"]["title"]["text"].startswith("Expert load"))
    z = array(heat["data"][0]["z"])
    assert z.shape == (32, 8)
    # each layer's load relative to its mean expert: rows average to exactly 1
    assert np.allclose(z.mean(axis=1), 1.0)
    assert np.allclose(z, ref.load / ref.load.mean(axis=1, keepdims=True))
    kinds = {f["data"][0]["type"] for f in figs}
    assert {"heatmap", "scatter", "bar"} <= kinds  # load/co-activation, per-layer lines, reuse
    assert at.sidebar.selectbox[0].value == "mixtral-small"


def test_a_bad_upload_is_one_error_line(trace_file):
    at = new_app()
    at.switch_page("app_pages/traces.py").run()
    at.file_uploader(key="trace_upload").set_value(("broken.parquet", b"not parquet", "application/octet-stream")).run()
    assert not at.exception
    assert len(errors(at)) == 1 and errors(at)[0].startswith("error: broken.parquet:")
    at.file_uploader(key="trace_upload").set_value(("routes.bin", b"\x00\x01", "application/octet-stream")).run()
    assert "cannot tell the format" in errors(at)[0]


def test_disk_load_synthesis_and_the_current_trace(trace_file, tmp_path):
    at = new_app()
    at.switch_page("app_pages/traces.py").run()
    at.text_input(key="disk_path").input(str(tmp_path / "missing.parquet"))
    at.button(key="disk_load").click().run()
    assert "no such file" in errors(at)[0]
    at.text_input(key="disk_path").input(str(trace_file))
    at.number_input(key="disk_first").set_value(2)
    at.button(key="disk_load").click().run()
    assert not at.exception
    assert at.success[0].value.startswith("Loaded 3,072 rows")  # 2 of 8 requests of 48 tokens x 32 layers
    at.selectbox(key="synth_model").set_value("olmoe-1b-7b")
    at.number_input(key="synth_tokens").set_value(64)
    at.button(key="synth_go").click().run()
    assert at.success[0].value == "Synthesised 1,024 rows as 'olmoe-1b-7b-synth-seed0'."
    assert at.sidebar.selectbox[0].options == ["mixtral-small", "olmoe-1b-7b-synth-seed0"]
    assert metric(at, "tokens") == "64"


# ----- Cache & offload --------------------------------------------------------------------------------
def test_cache_comparison_has_belady_as_the_ceiling(trace_file):
    at = with_trace(trace_file)
    at.switch_page("app_pages/cache.py").run()
    at.multiselect(key="cache_policies").set_value(["lru", "fifo", "lfu"])
    at.text_input(key="cache_caps").input("1, 2, 4")
    at.button(key="cache_run").click().run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert len(table) == 9 and set(table.policy) == {"lru", "fifo", "lfu"}
    lru = table[table.policy == "lru"]
    # the LRU policy replayed one size at a time equals the one-pass LRU reference curve
    assert np.allclose(lru.hit_rate, lru.hit_rate_lru, atol=1e-4)
    assert np.allclose(lru.gap_recovered, 0.0, atol=1e-3)
    assert (table.hit_rate <= table.hit_rate_belady + 1e-9).all()
    assert (np.diff(lru.hit_rate.to_numpy()) >= 0).all()  # LRU is a stack algorithm
    curves = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Hit rate"))
    names = [d["name"] for d in curves["data"]]
    assert names[:3] == ["lru", "fifo", "lfu"] and "Belady MIN (ceiling)" in names


def test_offload_latency_breakdown(trace_file):
    at = with_trace(trace_file)
    at.switch_page("app_pages/cache.py").run()
    assert at.selectbox(key="lat_model").value == "mixtral-8x7b"  # the trace's model, preselected
    at.selectbox(key="lat_model").set_value("")
    at.button(key="lat_run").click().run()
    assert "choose a model preset" in errors(at)[0]
    at.selectbox(key="lat_model").set_value("mixtral-8x7b")
    at.selectbox(key="lat_device").set_value("desktop-4090")
    at.number_input(key="lat_tokens").set_value(24)
    at.button(key="lat_run").click().run()
    assert not at.exception and not errors(at)
    fig = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Per-token latency"))
    compute, stall, transfer = (array(d["y"]) for d in fig["data"])
    assert len(compute) == 24 and (compute > 0).all() and (stall >= 0).all()
    # a token that loads no expert waits for none: zero transfer means zero stall
    assert (stall[transfer == 0] == 0).all() and (transfer > 0).any()
    assert float(metric(at, "mean latency").split()[0]) == pytest.approx((compute + stall).mean(), rel=1e-2)


# ----- Placement -----------------------------------------------------------------------------------------
def test_placement_compares_plans_and_exports(trace_file):
    at = with_trace(trace_file)
    at.switch_page("app_pages/placement.py").run()
    at.number_input(key="pl_redundant").set_value(8)
    at.multiselect(key="pl_solvers").set_value(["ilp", "greedy", "contiguous"])
    at.number_input(key="pl_time").set_value(30.0)
    at.button(key="pl_run").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[0].value.set_index("planner")
    assert list(table.index) == ["ilp", "greedy", "contiguous"]
    assert table.loc["ilp", "max/mean load"] <= table.loc["greedy", "max/mean load"] + 1e-9
    assert table.loc["greedy", "max/mean load"] <= table.loc["contiguous", "max/mean load"] + 1e-9
    assert (table["max/mean load"] >= 1 - 1e-9).all()
    figs = {f["layout"]["title"]["text"].split(",")[0]: f for f in figures(at)}
    bars = figs["Per-GPU load"]
    load = Trace.read(trace_file).load_matrix()[0]
    for trace in bars["data"]:  # every plan places all of layer 0's load on the 8 GPUs
        assert array(trace["y"]).sum() == pytest.approx(load.sum())
    heat = next(f for k, f in figs.items() if "tokens sent GPU to GPU" in k)
    assert array(heat["data"][0]["z"]).shape == (8, 8)
    assert any(k.startswith("Objective and lower bound") for k in figs)
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Plan (moesim JSON)", "SGLang expert map", "vLLM expert map"]


def test_placement_domain_shift_column(trace_file, tmp_path):
    other = tmp_path / "other-domain.parquet"
    synthesize(get_model("mixtral-8x7b"), 192, requests=4, seed=9, skew=1.0, out=other)
    at = with_trace(trace_file)
    at.text_input(key="disk_path").input(str(other))
    at.button(key="disk_load").click().run()
    at.sidebar.selectbox[0].set_value("mixtral-small").run()
    at.switch_page("app_pages/placement.py").run()
    at.multiselect(key="pl_solvers").set_value(["greedy"])
    at.multiselect(key="pl_shift").set_value(["other-domain"])
    at.button(key="pl_run").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert "max/mean on other-domain" in table.columns
    assert table["max/mean on other-domain"].iloc[0] >= 1.0


def test_placement_bad_input_is_an_error_line(trace_file):
    at = with_trace(trace_file)
    at.switch_page("app_pages/placement.py").run()
    at.number_input(key="pl_nodes").set_value(3)  # 3 nodes cannot split 8 GPUs
    at.button(key="pl_run").click().run()
    assert not at.exception
    assert "nodes must divide GPUs" in errors(at)[0]


# ----- Cluster simulation -------------------------------------------------------------------------------
def test_simulation_runs_the_bundled_scenario(trace_file):
    at = new_app()
    at.switch_page("app_pages/simulation.py").run()
    assert not at.exception
    at.number_input(key="sim_requests").set_value(24)
    at.button(key="sim_run").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert metric(at, "TTFT mean").endswith("ms") and metric(at, "steps")
    figs = figures(at)
    types = [f["data"][0]["type"] for f in figs]
    assert types[:2] == ["histogram", "histogram"]
    gantt = figs[2]
    rows = {y for d in gantt["data"] for y in d["y"]}
    assert {"compute (all GPUs)", "all-to-all (links)"} <= rows
    assert {f"GPU {g}" for g in range(8)} <= rows
    kinds = {d["name"] for d in gantt["data"]}
    assert {"attention", "dispatch", "experts", "combine"} <= kinds


def test_simulation_can_replay_the_current_trace(trace_file):
    at = with_trace(trace_file)
    at.switch_page("app_pages/simulation.py").run()
    at.number_input(key="sim_requests").set_value(8)
    at.selectbox(key="sim_routing").set_value("current trace (mixtral-small)")
    at.button(key="sim_run").click().run()
    assert not at.exception and not errors(at)
    assert "mixtral-small.parquet;" in at.caption[0].value  # not the scenario's synthetic routing
    assert at.caption[-1].value == "8 of 8 requests finished."


def test_simulation_rejects_a_bad_scenario_file():
    at = new_app()
    at.switch_page("app_pages/simulation.py").run()
    at.radio(key="sim_source").set_value("upload a YAML file").run()
    at.file_uploader(key="sim_upload").set_value(("s.yaml", b"model: [unclosed\n", "text/yaml")).run()
    assert not at.exception
    assert errors(at)[0].startswith("error: s: not valid YAML")
    at.file_uploader(key="sim_upload").set_value(("s.yaml", b"model: no-such-model\n", "text/yaml")).run()
    assert not errors(at)  # the file is a valid scenario; the preset is resolved when it runs
    at.button(key="sim_run").click().run()
    assert not at.exception
    assert "no-such-model" in errors(at)[0]


def test_per_gpu_expert_times_agree_with_the_layer_table():
    from moesim.engine import simulate
    from moesim.scenario import bundled_scenarios, load_scenario

    sc = load_scenario(bundled_scenarios()["mixtral-8x7b-ep8"]).with_changes(
        {"workload.num_requests": 8, "simulation.record_gpu": True})
    res = simulate(sc)
    per_gpu = res.gpu_loads.groupby(["step", "layer"]).experts_s
    merged = res.layers.set_index(["step", "layer"])
    assert np.allclose(per_gpu.max().to_numpy(), merged.experts_max_s.to_numpy())
    assert np.allclose(per_gpu.mean().to_numpy(), merged.experts_mean_s.to_numpy())


# ----- Validation -----------------------------------------------------------------------------------------
def test_validation_page_without_inputs_and_with_missing_files(tmp_path):
    at = new_app()
    at.switch_page("app_pages/validation.py").run()
    assert not at.exception and "Give a run file" in at.info[0].value
    at.text_input(key="val_run").input(str(tmp_path / "run.parquet")).run()
    at.button(key="val_go").click().run()
    assert not at.exception
    assert "no such run file" in errors(at)[0]


def test_validation_page_compares_a_real_cpu_run(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    run_path = cpu_run(tmp_path)

    at = new_app()
    at.switch_page("app_pages/validation.py").run()
    at.text_input(key="val_run").input(str(run_path)).run()  # the profile is beside the run
    at.button(key="val_go").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert metric(at, "hit/miss sequence") == "exact" and metric(at, "bytes moved") == "exact"
    fig = figures(at)[0]
    assert [d["name"] for d in fig["data"]] == ["measured", "simulated"]
    assert len(array(fig["data"][0]["y"])) == 12
    assert len(at.dataframe[0].value) == 2  # one row per layer


# ----- Sweeps -----------------------------------------------------------------------------------------------
def test_sweeps_page_shows_the_table_and_the_pareto_front(tmp_path):
    out = sweep_table(tmp_path)
    at = new_app()
    at.switch_page("app_pages/sweeps.py").run()
    at.text_input(key="sw_path").input(str(out)).run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert len(table) == 9
    at.selectbox(key="sw_x").set_value("ttft_mean_s").run()
    at.selectbox(key="sw_y").set_value("throughput_tok_s").run()
    front = at.dataframe[1].value
    # brute force: a front point is not dominated (lower TTFT and higher throughput) by any point
    for _, p in front.iterrows():
        dominated = ((table.ttft_mean_s <= p.ttft_mean_s) & (table.throughput_tok_s >= p.throughput_tok_s)
                     & ((table.ttft_mean_s < p.ttft_mean_s) | (table.throughput_tok_s > p.throughput_tok_s)))
        assert not dominated.any()
    rest = table[~table.point.isin(front.point)]
    for _, q in rest.iterrows():
        assert ((table.ttft_mean_s <= q.ttft_mean_s) & (table.throughput_tok_s >= q.throughput_tok_s)
                & ((table.ttft_mean_s < q.ttft_mean_s) | (table.throughput_tok_s > q.throughput_tok_s))).any()
    fig = figures(at)[0]
    assert fig["data"][-1]["name"] == "Pareto front"


def test_sweeps_page_rejects_a_file_that_is_not_a_table(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("nope")
    at = new_app()
    at.switch_page("app_pages/sweeps.py").run()
    at.text_input(key="sw_path").input(str(bad)).run()
    assert not at.exception
    assert "not a readable sweep results table" in errors(at)[0]
