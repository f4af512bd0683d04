"""The simulator: hand-computed golden timings, comm model agreement, invariants, real traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim import comm
from moesim.engine import Router, build, layer_schedule, simulate
from moesim.errors import MoesimError
from moesim.hardware import get_cluster
from moesim.model import BYTES_PER_PARAM, get_model
from moesim.routing import TraceReplay
from moesim.scenario import scenario_from_dict
from moesim.traces import Trace
from tests.helpers import with_changes


def tiny(**changes) -> dict:
    """Mixtral with 2 layers on one node of 2 H100s: quick to simulate."""
    sc = {
        "name": "tiny",
        "model": {"preset": "mixtral-8x7b", "overrides": {"num_layers": 2}},
        "cluster": {"preset": "h100-ib", "num_nodes": 1, "gpus_per_node": 2},
        "execution": {"dispatcher": "flat"},
        "workload": {"arrival": "burst", "num_requests": 4, "prompt_tokens": 8, "output_tokens": 4},
        "serving": {"max_tokens_per_step": 64, "max_running": 8},
        "routing": {"source": "uniform"},
    }
    return with_changes(sc, changes)


# ----- the layer schedule --------------------------------------------------------------------
def test_layer_schedule_without_overlap_adds_the_stages():
    starts, drain = layer_schedule(np.array([1.0, 2.0]), np.array([3.0, 1.0]),
                                   np.array([2.0, 2.0]), np.array([1.0, 4.0]), overlap=False)
    assert starts.tolist() == [0.0, 7.0, 16.0] and drain == 0.0


def test_layer_schedule_with_two_microbatches_by_hand():
    # per micro-batch: attention 1, dispatch 3, experts 2, combine 1 (two layers)
    a, d, e, c = (np.full(2, v) for v in (1.0, 3.0, 2.0, 1.0))
    starts, drain = layer_schedule(a, d, e, c, overlap=True)
    # layer 0: max(1, 0) + max(3, 1) + max(2, 3) + max(1, 2) = 1 + 3 + 3 + 2 = 9
    # layer 1: max(1, 1) + 3 + 3 + 2 = 9; the last combine drains: 1
    assert starts.tolist() == [0.0, 9.0, 18.0] and drain == 1.0
    # never slower than running both micro-batches back to back without overlap
    serial, _ = layer_schedule(2 * a, 2 * d, 2 * e, 2 * c, overlap=False)
    assert starts[-1] + drain <= serial[-1]


# ----- the router agrees with moesim.comm layer by layer ------------------------------------------
def _router(model, cluster, phy2log, experts, dispatcher):
    from moesim.engine import Layout

    layout = Layout(cluster.num_gpus, cluster.gpus_per_node, 1, phy2log)
    n = len(experts)
    replay = TraceReplay(experts.astype(np.int16), np.array([0]), np.array([n]), np.array([0]),
                         np.array([0]))
    return Router(model, layout, cluster, replay, dispatcher, model.hidden)


@pytest.mark.parametrize("name", ["flat", "deepep-ll", "deepep-normal"])
@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("replicas", [False, True])
def test_router_matches_moesim_comm_layer_by_layer(name, nodes, replicas):
    """Trace rows -> slots -> all-layers comm = moesim.comm's dispatcher run on each layer."""
    from moesim.engine import contiguous_slots

    cluster = get_cluster("h800-ib", num_nodes=nodes)
    G, E, K, L, n = cluster.num_gpus, 32, 4, 3, 300
    rng = np.random.default_rng(nodes)
    src = rng.integers(0, G, n)
    experts = np.stack([np.argsort(rng.random((n, E)) ** (1 + i), axis=1)[:, :K]
                        for i in range(L)], axis=1)  # [n, L, K], skewed differently per layer
    experts[5, 1, 2] = -1  # a dropped slot
    model = get_model("mixtral-8x7b", num_layers=L, num_experts=E, top_k=K)
    phy = contiguous_slots(L, E, G)
    if replicas:  # one more slot per GPU: experts 0..G-1 get a second replica (reversed)
        extra = np.tile(np.arange(G)[::-1], (L, 1))
        phy = np.concatenate([phy.reshape(L, G, -1), extra[:, :, None]], axis=2).reshape(L, -1)
    router = _router(model, cluster, phy, experts, name)
    req = rng.integers(0, 40, n)  # requests replaying the rows
    out = router.route_tokens(np.arange(n), src, req=req)
    token_index = np.arange(n) + req % router.V  # the router's replica rule
    for layer in range(L):
        plan = comm.Placement.from_slots(phy[layer], G, E, selection="round-robin")
        counts = comm.counts_from_tokens(src, experts[:, layer], plan, cluster,
                                         token_index=token_index)
        res = comm.layer_comm(cluster, hidden=model.hidden, dispatcher=name, counts=counts)
        assert out.dispatch_s[layer] == pytest.approx(res.dispatch_s, rel=1e-12)
        assert out.combine_s[layer] == pytest.approx(res.combine_s, rel=1e-12)
        assert out.sent_bytes[layer] == pytest.approx(res.send_bytes.sum(), rel=1e-12)
        assert out.recv_bytes[layer] == pytest.approx(res.recv_bytes.sum(), rel=1e-12)
        assert out.gpu_load[layer].tolist() == counts.expert_load().tolist()
    # loads: every valid (token, expert) pair lands on exactly one slot
    assert out.slot_load.sum() == n * L * K - 1


def test_repeated_rows_are_counted_once_with_their_multiplicity():
    """More tokens than trace rows (deepep-ll): the weighted path gives the direct loads."""
    cluster = get_cluster("h800-ib", num_nodes=2)
    from moesim.engine import contiguous_slots

    model = get_model("mixtral-8x7b", num_layers=2, num_experts=32, top_k=4)
    rng = np.random.default_rng(3)
    experts = np.stack([np.argsort(rng.random((20, 32)), axis=1)[:, :4] for _ in range(2)], 1)
    router = _router(model, cluster, contiguous_slots(2, 32, 16), experts, "deepep-ll")
    rows = rng.integers(0, 20, 500)  # 500 tokens replaying 20 rows
    src = rng.integers(0, 16, 500)
    weighted = router.route_tokens(rows, src)
    want = np.zeros((2, 32))
    for layer in range(2):
        np.add.at(want[layer], experts[rows, layer].ravel(), 1)
    assert weighted.slot_load.tolist() == want.tolist()


# ----- the cost model's array forms ---------------------------------------------------------------
def test_engine_costs_are_the_cost_models_scalar_calls():
    """What the engine asks of moesim.cost per group / per GPU equals the scalar calls."""
    from moesim.cost import CostModel

    cm = CostModel(get_cluster("h800-ib").gpu)
    for name in ("deepseek-v3", "mixtral-8x7b"):
        m = get_model(name)
        groups = [([1] * 8, [700] * 8), ([1, 1, 1], [5, 90, 4000]), ([1, 300], [2000, 0])]
        tot = [sum(n) for n, _ in groups]
        pairs = [sum(a * c + a * (a + 1) / 2 for a, c in zip(n, ctx, strict=True))
                 for n, ctx in groups]
        kv = [sum(a + c for a, c in zip(n, ctx, strict=True)) for n, ctx in groups]
        dec = [all(a == 1 for a in n) for n, _ in groups]
        many = cm.attention_times(m, tot, pairs, kv, dec)
        for i, (n, ctx) in enumerate(groups):
            assert many[i] == pytest.approx(cm.attention_time(m, n, ctx), rel=1e-12)
        load = np.array([[[0, 1, 70, 3], [0, 0, 0, 0]], [[4096, 0, 0, 1], [2, 2, 2, 2]]])
        gg = cm.grouped_gemm_times(m, load)
        for idx in np.ndindex(2, 2):
            assert gg[idx] == cm.grouped_gemm_time(m, load[idx])


# ----- golden timings ---------------------------------------------------------------------------
def test_golden_single_token_decode_step_by_hand(tmp_path):
    """One request on one GPU: a decode step's time from the cost model's formulas by hand."""
    experts = np.tile(np.array([[0, 1], [2, 5]]), (8, 1, 1))  # [8 tokens, 2 layers, top-2]
    trace = Trace.from_arrays(experts.astype(np.int16), np.full((8, 2, 2), 0.5, np.float32),
                              seq_lens=[8], phase="prefill", num_experts=8, model="mixtral-8x7b")
    path = trace.write(tmp_path / "t.parquet")
    sc = scenario_from_dict(tiny(**{
        "cluster": {"preset": "h100-ib", "num_nodes": 1, "gpus_per_node": 1},
        "parallelism": {"ep": 1}, "memory": {"kv_capacity_tokens": 4096},
        "workload": {"arrival": "burst", "num_requests": 1, "prompt_tokens": 5, "output_tokens": 2},
        "routing": {"source": "trace", "trace": str(path)},
    }))
    sim = build(sc)
    dev = sim.cluster.gpu
    m = get_model("mixtral-8x7b", num_layers=2)
    H, F, V, E = m.hidden, m.moe_intermediate, m.vocab, m.num_experts
    bw = dev.memory.read_bw * dev.memory_efficiency
    rate = dev.peak_flops("bf16") * dev.compute_efficiency
    eff1 = 1 / dev.gemm_tile_m  # one row of a 64-row GEMM tile does useful work
    launch = dev.kernel_overhead
    s = sim.scheduler
    s.arrive_until(0.0)
    s.finish_step(s.form_batch(0.0), 1.0)  # the prefill (and first token)
    batch = s.form_batch(1.0)
    assert batch.num_decode == 1 and batch.num_prefill == 0
    step, _ = sim.step_cost(batch)
    # attention of one decode token over 6 cached + new tokens (GQA): projections, scores and
    # values over 6 pairs, weights + KV + activations read once
    ctx = 6
    p_attn = m.attention_params()
    t_proj = 2 * p_attn / (rate * eff1)
    t_core = 2 * (2 * m.head_dim) * m.num_heads * ctx / rate
    t_mem = (p_attn * 2 + ctx * m.kv_bytes_per_token() / m.num_layers + 4 * H * 2) / bw
    attn = max(t_proj + t_core, t_mem) + 2 * launch
    # router: [1, H] x [H, 8] GEMM (memory-bound) + top-k over the scores
    router = max(2 * H * E / (rate * eff1), (E * H * 2 + (H + E) * 2) / bw) + launch \
        + E * 4 / bw + launch
    # experts: the token's two experts, one row each, in one grouped GEMM
    one = max(m.expert_flops_per_token() / (rate * eff1),
              (m.expert_bytes() + (2 * H + 3 * F) * 2) / bw)
    experts_t = 2 * one + launch
    a2a = 2 * sim.cluster.nvlink.latency  # flat dispatch + combine: every pair stays local
    head = max(2 * V * H / (rate * eff1), (V * H * 2 + (H + V) * 2) / bw) + launch
    want = m.num_layers * (attn + router + experts_t + a2a) + head
    assert step == pytest.approx(want, rel=1e-9)
    assert BYTES_PER_PARAM[m.expert_dtype] == 2


def test_a_measured_cost_table_overrides_the_expert_roofline(tmp_path):
    """execution.cost_table: a measured expert_ffn curve sets the grouped-GEMM time."""
    m = get_model("mixtral-8x7b")
    table = tmp_path / "costs.csv"
    table.write_text("operation,shape,dtype,tokens,seconds\n"
                     f"expert_ffn,{m.hidden}x{m.moe_intermediate},bf16,1,0.001\n"
                     f"expert_ffn,{m.hidden}x{m.moe_intermediate},bf16,64,0.002\n")
    timed = build(scenario_from_dict(tiny(**{"execution.cost_table": str(table)})))
    plain = build(scenario_from_dict(tiny()))
    load = np.zeros((2, 8))
    load[0, [0, 5]] = [1, 64]  # GPU 0 (slots 0-3): one row; GPU 1 (slots 4-7): 64 rows
    got = timed.costs.experts(load, 2)
    launch = timed.cluster.gpu.kernel_overhead
    assert got[0].tolist() == pytest.approx([0.001 + launch, 0.002 + launch])
    assert got[1].tolist() == [0.0, 0.0]
    assert plain.costs.experts(load, 2)[0, 0] < 0.0005  # the roofline is far below 1 ms
    with pytest.raises(MoesimError, match="cost_table"):
        build(scenario_from_dict(tiny(**{"execution.cost_table": str(tmp_path / "no.csv")})))


@pytest.mark.parametrize("fast_forward", [True, False])
def test_golden_latencies_with_a_fixed_step_time(monkeypatch, fast_forward):
    """TTFT, TPOT and end-to-end latency follow from the step sequence when steps take 10 ms
    (step by step and in fast-forward windows)."""
    sc = scenario_from_dict(tiny(**{
        "workload": {"arrival": "jsonl", "file": "unused"},
    })).with_changes({"workload.arrival": "burst", "workload.num_requests": 2,
                      "workload.prompt_tokens": 8, "workload.output_tokens": 3,
                      "serving.max_tokens_per_step": 8, "serving.max_running": 2,
                      "simulation.fast_forward": fast_forward})
    sim = build(sc)
    real = sim._cost

    def fixed(inp):
        block = real(inp)
        block["dt"] = np.full(inp["n"], 0.010)
        return block

    monkeypatch.setattr(sim, "_cost", fixed)
    res = sim.run()
    r = res.requests
    # two groups (2 GPUs, TP1): each prefills its own 8-token prompt in step 1, then 2 decodes
    assert r.ttft_s.tolist() == pytest.approx([0.010, 0.010])
    assert r.e2e_s.tolist() == pytest.approx([0.030, 0.030])
    assert r.tpot_s.tolist() == pytest.approx([0.010, 0.010])
    assert res.summary["throughput_tok_s"] == pytest.approx(6 / 0.030)
    assert res.summary["simulated_s"] == pytest.approx(0.030)


# ----- invariants under random scenarios ---------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    rate=st.floats(5, 500),
    n=st.integers(1, 24),
    budget=st.sampled_from([16, 64, 256]),
    kv=st.integers(300, 2000),
    overlap=st.booleans(),
    dispatcher=st.sampled_from(["flat", "deepep-ll", "deepep-normal"]),
    source=st.sampled_from(["uniform", "synthetic"]),
    placement=st.sampled_from(["contiguous", "round_robin", "balanced"]),
    seed=st.integers(0, 1000),
)
def test_invariants_hold_on_random_scenarios(rate, n, budget, kv, overlap, dispatcher, source,
                                            placement, seed):
    sc = scenario_from_dict(tiny(**{
        "workload": {"arrival": "poisson", "rate_per_s": rate, "num_requests": n, "seed": seed,
                     "prompt_tokens": {"dist": "uniform", "min": 1, "max": 120},
                     "output_tokens": {"dist": "uniform", "min": 1, "max": 60}},
        "serving": {"max_tokens_per_step": budget, "max_running": min(budget, 8)},
        "memory": {"kv_capacity_tokens": kv},
        "execution": {"dispatcher": dispatcher,
                      "overlap": "two-microbatch" if overlap else "off"},
        "routing": {"source": source, "seed": seed % 3, "synth_tokens": 256, "synth_requests": 4},
        "placement": {"kind": placement, "redundant_experts": 2 if placement == "balanced" else 0},
    }))
    res = simulate(sc)  # Results raise InvariantError if any written invariant fails
    assert all(res.invariants.values()) and len(res.invariants) >= 6
    r = res.requests
    assert (r.e2e_s >= r.ttft_s - 1e-12).all()
    assert res.summary["output_tokens"] == r.output_tokens.sum()
    assert res.steps.pairs.sum() == pytest.approx(
        (res.steps.decode_tokens + res.steps.prefill_tokens).sum() * 2 * 2)  # top-2, 2 layers


# ----- routing sources ------------------------------------------------------------------------------
def _replay(on_short: str) -> TraceReplay:
    model = get_model("mixtral-8x7b", num_layers=1)
    experts = np.arange(10 * 2).reshape(10, 1, 2) % 8
    trace = Trace.from_arrays(experts.astype(np.int16), np.ones((10, 1, 2), np.float32),
                              seq_lens=[6, 4], phase=np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1]),
                              num_experts=8, model="mixtral-8x7b")
    return TraceReplay.from_trace(trace, model, on_short, seed=1)


def test_trace_replay_maps_phases_and_wraps():
    rp = _replay("wrap")
    prompt, output = np.array([3, 5, 2]), np.array([3, 2, 6])
    rp.bind(prompt, output)
    assert rp.seq.tolist() == [0, 1, 0]
    # request 1 uses sequence 1 (rows 6..9: prefill 6,7 then decode 8,9); prompt 5 wraps
    rows = rp.rows(np.full(7, 1), np.arange(7), np.full(7, 5))
    assert rows.tolist() == [6, 7, 6, 7, 6, 8, 9]
    rep = rp.report()
    assert rep["requests_reusing_a_sequence"] == 1
    assert rep["prompt_tokens_beyond_sequence"] == 3  # request 1: 5 - 2
    assert rep["output_tokens_beyond_sequence"] == 3  # request 2: 6 - 3


def test_trace_replay_resample_is_seeded_and_stays_in_real_rows():
    rp = _replay("resample")
    prompt, output = np.full(6, 3), np.full(6, 9)
    rp.bind(prompt, output)
    req = np.repeat(np.arange(6), 12)
    pos = np.tile(np.arange(12), 6)
    a = rp.rows(req, pos, prompt[req])
    b = rp.rows(req, pos, prompt[req])
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 10
    # in-sequence positions replay the assigned sequence itself
    assert a[:6].tolist() == [0, 1, 2, 3, 4, 5]


def test_expected_routing_matches_token_level_totals():
    """Aggregate (counts) routing moves the same number of pairs as the tokens it averages."""
    sc = scenario_from_dict(tiny(**{"routing": {"source": "uniform"},
                                    "cluster": {"preset": "h800-ib", "num_nodes": 2}}))
    sim = build(sc)
    tokens = np.full(16, 32)
    out = sim.router.route_expected(tokens)
    assert out.slot_load.sum() == pytest.approx(16 * 32 * 2 * 2)
    assert out.sent_bytes.tolist() == pytest.approx(out.recv_bytes.tolist())


# ----- outputs ------------------------------------------------------------------------------------
def test_timeline_and_cli_json(tmp_path):
    from moesim.cli import main

    path = tmp_path / "sc.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny()))
    out = tmp_path / "timeline.json"
    res = simulate(scenario_from_dict(tiny()))
    n = res.write_timeline(out)
    events = json.loads(out.read_text())["traceEvents"]
    assert len(events) == n
    spans = [e for e in events if e["ph"] == "X" and e["pid"] == 0 and e["tid"] in (2, 3)]
    assert len(spans) == 4 * len(res.layers)  # attention, dispatch, experts, combine
    assert main(["simulate", str(path), "--json", "--timeline", str(out)]) == 0


def test_cli_reports_bad_scenarios_in_one_line(tmp_path, capsys):
    from moesim.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mixtral-8x7b\nworkload: {arrival: poisson}\n")
    assert main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rate_per_s" in err and "\n" not in err


# ----- real routing ---------------------------------------------------------------------------------
def test_replay_of_real_esft_routing_balanced_beats_contiguous(esft_npz, tmp_path):
    data = np.load(esft_npz["law"])
    experts, weights, seq_lens = data["experts"][:2000], data["weights"][:2000], data["seq_lens"]
    keep = np.cumsum(seq_lens) <= 2000
    n = int(seq_lens[keep].sum())
    trace = Trace.from_arrays(experts[:n].astype(np.int16), weights[:n].astype(np.float32),
                              seq_lens=seq_lens[keep], phase="prefill", num_experts=64,
                              model="deepseek-v2-lite")
    path = trace.write(tmp_path / "law.parquet")
    base = {
        "model": "deepseek-v2-lite",
        "cluster": {"preset": "h100-ib", "num_nodes": 1},
        "execution": {"dispatcher": "flat"},
        "workload": {"arrival": "burst", "num_requests": 16, "prompt_tokens": 256, "output_tokens": 8},
        "routing": {"source": "trace", "trace": str(path)},
        "simulation": {"record_gpu": True},
    }
    contiguous = simulate(scenario_from_dict(base))
    balanced = simulate(scenario_from_dict({**base, "placement": {"kind": "balanced"}}))
    assert contiguous.routing_report["sequences"] == int(keep.sum())

    def imbalance(res):  # per layer, GPU load summed over the run: max / mean
        per = res.gpu_loads.groupby(["layer", "gpu"]).pairs.sum().unstack()
        return float((per.max(axis=1) / per.mean(axis=1)).mean())

    # the real trace is skewed; EPLB on its load matrix evens the GPUs out
    assert imbalance(contiguous) > 1.3
    assert imbalance(balanced) < 0.5 * (1 + imbalance(contiguous))
    assert balanced.steps.experts_s.sum() < contiguous.steps.experts_s.sum()
    assert all(balanced.invariants.values())


@pytest.mark.parametrize("preset,cluster", [("deepseek-v3", "h800-ib"), ("mixtral-8x7b", "h100-ib"),
                                            ("gpt-oss-120b", "a100-ib")])
def test_expected_expert_times_fast_roofline_equals_expert_times(preset, cluster):
    """The few-pass roofline of expected (count-routing) expert times is the cost model's
    expert_times, rounding aside, across compute- and memory-bound loads and idle slots."""
    from moesim.engine import StepCosts

    costs = StepCosts(get_model(preset), get_cluster(cluster).gpu, 1)
    assert costs._roofline_terms is not None
    rng = np.random.default_rng(1)
    load = rng.random((6, 8, 4)) * rng.choice([0.0, 0.3, 5, 300, 5000], (6, 8, 4))
    active = np.where(load > 0, rng.random(load.shape) * 0.99 + 0.01, 0.0)
    fast = costs._expected_experts(load, active)
    costs._roofline_terms = None  # the general path through CostModel.expert_times
    ref = costs._expected_experts(load, active)
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=0)
    assert (ref > 0).all()
