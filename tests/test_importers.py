"""Importers and exporters: every format against hand-built fixtures in its documented shape,
the real ESFT and phone recordings (through the shared-data fixtures), and round trips."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from moesim.cli import main as cli_main
from moesim.errors import MoesimError, PresetError, TraceError
from moesim.traces import PHASE_DECODE, PHASE_PREFILL, Trace
from moesim.traces.importers import (
    FORMATS,
    export_arrays_npz,
    format_names,
    import_trace,
    trace_summary,
)


def distinct_routing(T, L, E, K, seed=0):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int32)


def tokens_of(trace: Trace) -> int:
    return trace_summary(trace)["tokens"]


# ----- arrays-npz --------------------------------------------------------------------------------
def test_arrays_npz_keeps_arrays_and_reads_the_meta_json(tmp_path):
    experts = distinct_routing(10, 3, 16, 4)
    weights = np.random.default_rng(1).random((10, 3, 4)).astype(np.float16)
    meta = {"model": "some Mixtral finetune", "n_routed_experts": 16, "top_k": 4,
            "shared_experts": 1, "task": "law", "phase": "decode"}
    path = tmp_path / "a.npz"
    np.savez(path, experts=experts.astype(np.int8), weights=weights,
             seq_lens=np.array([4, 6], np.int32), meta=np.array(json.dumps(meta)))
    t = import_trace(path, "arrays-npz")
    m = t.meta
    assert (m.num_layers, m.num_experts, m.top_k, m.shared_experts) == (3, 16, 4, 1)
    assert m.weight_norm == "raw"  # sums of 4 uniform draws are not 1
    assert m.extra["npz_meta"]["task"] == "law"
    a = t.to_arrays()
    np.testing.assert_array_equal(a["experts"], experts)
    np.testing.assert_array_equal(a["weights"], weights.astype(np.float32))
    np.testing.assert_array_equal(a["seq_lens"], [4, 6])
    assert (a["phase"] == PHASE_DECODE).all()


def test_arrays_npz_recognises_renormalised_weights_and_missing_meta(tmp_path):
    experts = distinct_routing(5, 2, 8, 2)
    w = np.random.default_rng(2).random((5, 2, 2))
    np.savez(tmp_path / "n.npz", experts=experts, weights=(w / w.sum(-1, keepdims=True)))
    t = import_trace(tmp_path / "n.npz", "arrays-npz")
    assert t.meta.weight_norm == "normalised"
    assert t.meta.num_experts == int(experts.max()) + 1 and t.meta.extra["num_experts_inferred"]
    assert (t.to_arrays()["phase"] == PHASE_PREFILL).all()


def test_arrays_npz_meta_that_contradicts_the_arrays_is_an_error(tmp_path):
    experts = distinct_routing(5, 2, 8, 2)
    np.savez(tmp_path / "x.npz", experts=experts, meta=np.array(json.dumps({"top_k": 3})))
    with pytest.raises(TraceError, match="top_k 3"):
        import_trace(tmp_path / "x.npz", "arrays-npz")
    np.savez(tmp_path / "y.npz", experts=experts, meta=np.array(json.dumps({"num_experts": 4})))
    with pytest.raises(TraceError, match="outside 0..3"):
        import_trace(tmp_path / "y.npz", "arrays-npz")


def test_esft_law_has_the_documented_size_and_model_facts(esft_npz):
    raw = np.load(esft_npz["law"])
    t = import_trace(esft_npz["law"], "arrays-npz")
    s = trace_summary(t)
    assert (s["tokens"], s["layers"], s["experts"], s["top_k"]) == (8327, 26, 64, 6)
    m = t.meta
    assert (m.model, m.shared_experts, m.weight_norm) == ("deepseek-v2-lite", 2, "raw")
    a = t.to_arrays()
    np.testing.assert_array_equal(a["experts"], raw["experts"])
    np.testing.assert_array_equal(a["weights"], raw["weights"].astype(np.float32))
    np.testing.assert_array_equal(a["seq_lens"], raw["seq_lens"])
    assert (a["phase"] == PHASE_PREFILL).all()
    # teacher-forced prefill: one forward pass per sequence
    assert len(np.unique(a["step"])) == len(raw["seq_lens"])


@pytest.mark.parametrize("task,tokens", [("intent", 8222), ("summary", 8479), ("translation", 8251)])
def test_every_esft_task_imports_with_its_token_count(esft_npz, task, tokens):
    assert tokens_of(import_trace(esft_npz[task], "arrays-npz")) == tokens


def test_esft_round_trip_import_export_import_is_identical(esft_npz, tmp_path):
    first = import_trace(esft_npz["law"], "arrays-npz")
    path = first.write(tmp_path / "law.parquet")
    export_arrays_npz(Trace.read(path), tmp_path / "law.npz")
    again = import_trace(tmp_path / "law.npz", "arrays-npz")
    assert again.meta == first.meta
    assert again.to_table().equals(first.to_table())


def test_round_trip_keeps_interleaved_requests_positions_and_columns(tmp_path):
    # two requests decoding in turn: their tokens interleave, positions are absolute
    experts = distinct_routing(6, 2, 8, 2)
    req = np.array([0, 1, 0, 1, 0, 1])
    t = Trace.from_arrays(experts, seq_lens=[1] * 6, phase="decode", request_ids=req,
                          steps=np.array([0, 0, 1, 1, 2, 2]), num_experts=8,
                          token_pos=np.array([5, 0, 6, 1, 7, 2]),
                          extras={"residency": np.ones((6, 2, 2), np.int8)})
    export_arrays_npz(t, tmp_path / "i.npz")
    back = import_trace(tmp_path / "i.npz", "arrays-npz")
    assert back.meta == t.meta
    assert back.to_table().equals(t.to_table())


def test_export_of_a_counts_trace_is_refused(tmp_path):
    t = Trace.from_counts(np.ones((2, 3, 4), np.int64))
    with pytest.raises(TraceError, match="counts trace"):
        export_arrays_npz(t, tmp_path / "c.npz")


# ----- route-trace-v1 (the phone recording) -------------------------------------------------------
def read_route_csv(path):
    """An independent reading of the route_trace v1 file: header facts and the rows."""
    header, sizes = {}, {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            pairs = dict(re.findall(r"(\w+)=(\S+)", line))
            if "layer" in pairs:
                sizes[int(pairs["layer"])] = (int(pairs["expert_bytes"]), int(pairs["dense_bytes"]))
            else:
                header.update(pairs)
    return header, sizes, pd.read_csv(path, comment="#")


@pytest.fixture(scope="module")
def phone(phone_trace_dir):
    path = phone_trace_dir / "qwen.route.csv"
    return path, import_trace(path, "route-trace-v1"), read_route_csv(path)


def test_phone_trace_model_facts_and_layer_sizes(phone):
    _, t, (header, sizes, _) = phone
    s = trace_summary(t)
    assert (s["layers"], s["experts"], s["top_k"]) == (48, 128, 6)
    assert (int(header["n_layer"]), int(header["n_expert"]), int(header["n_expert_used"])) == (48, 128, 6)
    assert t.meta.model == "qwen3-30b-a3b" and t.meta.extra["top_k_of_model"] == 8
    assert t.meta.expert_bytes == [sizes[i][0] for i in range(48)]
    assert t.meta.dense_bytes == [sizes[i][1] for i in range(48)]
    assert t.meta.weight_norm == "normalised"


def test_phone_trace_keeps_every_row_with_its_residency_and_bytes(phone):
    _, t, (_, _, df) = phone
    a = t.to_arrays(columns=["residency", "read_bytes"])
    assert len(df) == t.num_rows * t.meta.top_k
    # one turn: the token index is its absolute position (the CSV's step)
    tok = np.searchsorted(a["token_pos"], df.step.to_numpy())
    np.testing.assert_array_equal(a["token_pos"][tok], df.step)
    idx = (tok, df.layer.to_numpy(), df.slot.to_numpy())
    np.testing.assert_array_equal(a["experts"][idx], df.expert)
    np.testing.assert_allclose(a["weights"][idx], df.weight, rtol=1e-6)
    np.testing.assert_array_equal(a["residency"][idx], df.residency)
    np.testing.assert_array_equal(a["read_bytes"][idx], df.expert_bytes)
    np.testing.assert_array_equal(t.load_matrix(),
                                  pd.crosstab(df.layer, df.expert).reindex(columns=range(128), fill_value=0))


def test_phone_trace_phases_steps_and_pruned_last_layer(phone):
    _, t, (_, _, df) = phone
    a = t.to_arrays()
    prompt = df[df.phase == 0].step.nunique()
    assert prompt == 28
    assert (a["phase"][:prompt] == PHASE_PREFILL).all() and (a["phase"][prompt:] == PHASE_DECODE).all()
    # the prompt is one forward pass, each decode token its own
    assert (a["step"][:prompt] == 0).all()
    np.testing.assert_array_equal(a["step"][prompt:], np.arange(1, len(a["step"]) - prompt + 1))
    # the engine pruned the last layer to the last prompt token
    present_last = a["experts"][:prompt, 47, 0] >= 0
    np.testing.assert_array_equal(np.flatnonzero(present_last), [prompt - 1])


def test_phone_read_bytes_match_the_engine_metrics_per_decode_token(phone, phone_trace_dir):
    _, t, _ = phone
    a = t.to_arrays(columns=["read_bytes"])
    per_token = a["read_bytes"].clip(0).sum(axis=(1, 2))[a["phase"] == PHASE_DECODE]
    metrics = pd.read_csv(phone_trace_dir / "qwen.metrics", comment="#")
    assert len(metrics) == len(per_token) == 128
    # the engine's read_bytes add a small header overhead to the experts' bytes
    gap = metrics.read_bytes.to_numpy() - per_token
    assert (gap >= 0).all() and (gap <= 0.01 * metrics.read_bytes.to_numpy()).all()


def test_phone_round_trip_keeps_residency_and_bytes(phone, tmp_path):
    _, t, _ = phone
    export_arrays_npz(t, tmp_path / "p.npz")
    back = import_trace(tmp_path / "p.npz", "arrays-npz")
    assert back.meta == t.meta and back.to_table().equals(t.to_table())


ROUTE_HEADER = ("# route_trace v1\n# model=x.gguf arch=qwen3moe n_layer=2 n_expert=4 n_expert_used=2\n"
                "# layer=0 expert_bytes=10 dense_bytes=5\n# layer=1 expert_bytes=20 dense_bytes=6\n"
                "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n")


def test_route_trace_turns_become_requests_with_absolute_positions(tmp_path):
    rows = []
    for turn, phase, step in [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 0, 3), (1, 1, 4)]:
        for layer in range(2):
            for slot, expert in enumerate(((step + layer) % 4, (step + layer + 1) % 4)):
                rows.append(f"{turn},{phase},{step},{layer},{slot},{expert},0.5,{slot % 2},{10 * (1 - slot % 2)}")
    path = tmp_path / "r.csv"
    path.write_text(ROUTE_HEADER + "\n".join(rows) + "\n")
    t = import_trace(path, "route-trace-v1")
    a = t.to_arrays()
    np.testing.assert_array_equal(a["request_id"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(a["token_pos"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(a["step"], [0, 1, 2, 2, 3])
    # no preset is named in "x.gguf qwen3moe": the header's words are kept as the model
    assert t.meta.model == "x.gguf qwen3moe"
    assert (t.meta.expert_bytes, t.meta.dense_bytes) == ([10, 20], [5, 6])
    r = t.to_arrays(columns=["residency", "read_bytes"])
    assert (r["residency"][:, :, 1] == 1).all() and (r["read_bytes"][:, :, 0] == 10).all()


def test_route_trace_missing_slot_is_an_error(tmp_path):
    rows = ["0,0,0,0,0,1,0.5,0,10", "0,0,0,0,1,2,0.5,0,10", "0,0,0,1,0,1,0.5,0,10"]
    path = tmp_path / "r.csv"
    path.write_text(ROUTE_HEADER + "\n".join(rows) + "\n")
    with pytest.raises(TraceError, match="layer 1 has 1 slots, expected 2"):
        import_trace(path, "route-trace-v1")


# ----- SGLang per_token dumps --------------------------------------------------------------------
def sglang_dump(torch):
    """A per_token dump in SGLang's documented shape: 3 model layers (layer 0 dense, so -1),
    top-2 padded to 8 slots, 8 physical experts mapping to 6 logical ones."""
    L, W = 3, 8

    def ids(rows):  # rows: per token, per MoE layer (1 and 2), two physical ids
        out = torch.full((L, len(rows), W), -1, dtype=torch.int32)
        for t, (l1, l2) in enumerate(rows):
            out[1, t, :2] = torch.tensor(l1)
            out[2, t, :2] = torch.tensor(l2)
        return out

    records = [
        # pass 0: prefill of request A (3 tokens) and B (2 tokens)
        dict(forward_pass_id=0, rank=0, gatherer_key="primary", input_ids=[1, 2, 3, 4, 5],
             positions=[0, 1, 2, 0, 1], extend_seq_lens=[3, 2], forward_mode=1,
             topk_ids_of_layer=ids([([0, 1], [2, 3]), ([1, 2], [3, 4]), ([2, 3], [4, 5]),
                                    ([6, 7], [0, 1]), ([7, 0], [1, 2])]),
             misc_objects=[]),
        # pass 1: decode, B listed before A
        dict(forward_pass_id=1, rank=0, gatherer_key="primary", input_ids=[6, 7],
             positions=[2, 3], extend_seq_lens=None, forward_mode=2,
             topk_ids_of_layer=ids([([3, 4], [5, 6]), ([4, 5], [6, 7])]), misc_objects=[]),
        # pass 2: idle
        dict(forward_pass_id=2, rank=0, gatherer_key="primary", input_ids=[], positions=[],
             extend_seq_lens=None, forward_mode=4, topk_ids_of_layer=ids([]), misc_objects=[]),
        # pass 3: mixed: A decodes its token at position 4, new request C prefills 2 tokens
        dict(forward_pass_id=3, rank=0, gatherer_key="primary", input_ids=[8, 9, 10],
             positions=[4, 0, 1], extend_seq_lens=[1, 2], forward_mode=3,
             topk_ids_of_layer=ids([([5, 6], [7, 0]), ([0, 2], [1, 3]), ([2, 4], [3, 5])]),
             misc_objects=[]),
    ]
    # physical 6 and 7 are replicas of logical 0 and 1
    p2l = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]] * L, dtype=torch.int32)
    return dict(records=records, last_physical_to_logical_map=p2l)


def test_sglang_per_token_rebuilds_requests_phases_and_logical_ids(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save(sglang_dump(torch), path)
    t = import_trace(path, "sglang-per-token")
    m = t.meta
    assert (m.num_layers, m.num_experts, m.top_k, m.weight_norm) == (2, 6, 2, "none")
    assert m.expert_id_space == "logical" and m.extra["model_layers"] == [1, 2]
    a = t.to_arrays()
    # rows ordered by step, then request (A=0, B=1, C=2), then position
    np.testing.assert_array_equal(a["request_id"], [0, 0, 0, 1, 1, 0, 1, 0, 2, 2])
    np.testing.assert_array_equal(a["token_pos"], [0, 1, 2, 0, 1, 3, 2, 4, 0, 1])
    np.testing.assert_array_equal(a["step"], [0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(a["phase"], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    # B's prefill token 0 had physical [6, 7] at layer 1 -> logical [0, 1]
    np.testing.assert_array_equal(a["experts"][3, 0], [0, 1])
    # A's decode token at position 3 had physical [4, 5], [6, 7] -> [4, 5], [0, 1]
    np.testing.assert_array_equal(a["experts"][5], [[4, 5], [0, 1]])


def test_sglang_with_model_preset_checks_the_expert_count(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "d.pt"
    torch.save(sglang_dump(torch), path)
    with pytest.raises(TraceError, match="2 MoE layers.*mixtral-8x7b has 32"):
        import_trace(path, "sglang-per-token", model="mixtral-8x7b")


def test_sglang_without_torch_gives_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "d.pt"
    path.write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TraceError, match="needs torch"):
        import_trace(path, "sglang-per-token")


def test_sglang_routed_experts_base64_records(tmp_path):
    L, K = 3, 2  # layer 0 dense: -1 placeholders
    arr_a = np.full((4, L, K), -1, np.int32)
    arr_a[:, 1:] = distinct_routing(4, 2, 6, K, seed=3)
    arr_b = np.full((2, L, K), -1, np.int32)
    arr_b[:, 1:] = distinct_routing(2, 2, 6, K, seed=4)

    def rec(arr, prompt):
        b64 = base64.b64encode(arr.astype("<i4").tobytes()).decode()
        return {"text": "...", "meta_info": {"id": f"r{prompt}", "prompt_tokens": prompt,
                                             "routed_experts": b64, "num_layers": L, "top_k": K}}

    path = tmp_path / "resp.jsonl"
    path.write_text(json.dumps(rec(arr_a, 3)) + "\n" + json.dumps(rec(arr_b, 1)) + "\n")
    t = import_trace(path, "sglang-routed-experts", model=None)
    a = t.to_arrays()
    np.testing.assert_array_equal(a["experts"], np.concatenate([arr_a, arr_b])[:, 1:])
    np.testing.assert_array_equal(a["phase"], [0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(a["seq_lens"], [4, 2])
    assert t.meta.extra["request_names"] == ["r3", "r1"]


def test_sglang_routed_experts_start_len_offsets_positions_and_phase(tmp_path):
    # prompt of 5 tokens, routing returned from absolute position 3: rows for positions 3..7
    arr = distinct_routing(5, 2, 8, 2, seed=9)
    rec = {"meta_info": {"prompt_tokens": 5, "routed_experts_start_len": 3, "num_layers": 2,
                         "top_k": 2, "routed_experts": base64.b64encode(arr.astype("<i4").tobytes()).decode()}}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    a = import_trace(tmp_path / "r.json", "sglang-routed-experts").to_arrays()
    np.testing.assert_array_equal(a["token_pos"], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(a["phase"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(a["experts"], arr)


def test_sglang_routed_experts_need_a_shape(tmp_path):
    flat = base64.b64encode(np.zeros(12, "<i4").tobytes()).decode()
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta_info": {"routed_experts": flat}}))
    with pytest.raises(TraceError, match="--model"):
        import_trace(path, "sglang-routed-experts")
    # with a preset: mixtral has 32 layers x top-2 = 64 ids per token, 12 is not whole tokens
    with pytest.raises(TraceError, match="not whole tokens"):
        import_trace(path, "sglang-routed-experts", model="mixtral")


# ----- vLLM routed_experts ------------------------------------------------------------------------
@pytest.fixture
def vllm_requests():
    return {"req_1": distinct_routing(5, 4, 8, 2, seed=5), "req_2": distinct_routing(3, 4, 8, 2, seed=6),
            "req_10": distinct_routing(4, 4, 8, 2, seed=7)}


def npy_b64(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def test_vllm_folder_npz_and_jsonl_give_the_same_trace(tmp_path, vllm_requests):
    order = ["req_1", "req_2", "req_10"]
    prompt = {"req_1": 2, "req_2": 3, "req_10": 1}
    folder = tmp_path / "dir"
    folder.mkdir()
    for name, arr in vllm_requests.items():
        np.save(folder / f"{name}.npy", arr)
    (folder / "prompt_lens.json").write_text(json.dumps(prompt))
    np.savez(tmp_path / "r.npz", **{n: vllm_requests[n] for n in order},
             prompt_lens=np.array([prompt[n] for n in order]))
    (tmp_path / "r.jsonl").write_text("".join(
        json.dumps({"request_id": n, "routed_experts": npy_b64(vllm_requests[n]),
                    "num_prompt_tokens": prompt[n]}) + "\n" for n in order))
    traces = [import_trace(p, "vllm-routed-experts", model=None)
              for p in (folder, tmp_path / "r.npz", tmp_path / "r.jsonl")]
    expected = np.concatenate([vllm_requests[n] for n in order])
    for t in traces:
        a = t.to_arrays()
        np.testing.assert_array_equal(a["experts"], expected)
        np.testing.assert_array_equal(a["seq_lens"], [5, 3, 4])
        np.testing.assert_array_equal(a["phase"], [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1])
        assert t.meta.weight_norm == "none" and t.meta.extra["request_names"] == order
        assert t.to_table().equals(traces[0].to_table())


def test_vllm_single_npy_and_the_all_zero_flashinfer_case(tmp_path):
    arr = distinct_routing(6, 2, 8, 2)
    np.save(tmp_path / "one.npy", arr)
    t = import_trace(tmp_path / "one.npy", "vllm-routed-experts", model=None)
    assert t.meta.extra["phase"].startswith("prompt length unknown")
    np.save(tmp_path / "zeros.npy", np.zeros((6, 2, 2), np.int32))
    with pytest.raises(TraceError, match="moe-backend triton"):
        import_trace(tmp_path / "zeros.npy", "vllm-routed-experts")


def test_vllm_requests_with_different_layer_counts_are_an_error(tmp_path):
    np.savez(tmp_path / "r.npz", a=distinct_routing(2, 3, 8, 2), b=distinct_routing(2, 4, 8, 2))
    with pytest.raises(TraceError, match="request b: 4 layers"):
        import_trace(tmp_path / "r.npz", "vllm-routed-experts")


# ----- MoE-Infinity counts ------------------------------------------------------------------------
def test_moe_infinity_counts_become_an_aggregate_trace(tmp_path):
    counts = np.random.default_rng(8).integers(0, 50, size=(5, 16, 64)).astype(np.float32)
    np.save(tmp_path / "eam.npy", counts)
    t = import_trace(tmp_path / "eam.npy", "moe-infinity", model="olmoe-1b-7b")
    assert t.is_counts and (t.meta.model, t.meta.top_k) == ("olmoe-1b-7b", 8)
    np.testing.assert_array_equal(t.load_matrix(), counts.sum(axis=0))
    plain = import_trace(tmp_path / "eam.npy", "moe-infinity")
    assert plain.meta.top_k == 1 and "top_k_unknown" in plain.meta.extra


def test_moe_infinity_rejects_fractional_counts(tmp_path):
    np.save(tmp_path / "f.npy", np.full((1, 2, 4), 0.5))
    with pytest.raises(TraceError, match="whole numbers"):
        import_trace(tmp_path / "f.npy", "moe-infinity")


# ----- registry and CLI ---------------------------------------------------------------------------
def test_unknown_format_and_model_name_the_valid_ones(tmp_path):
    with pytest.raises(PresetError, match="choose one of: " + ", ".join(format_names())):
        import_trace(tmp_path, "parquet-ish")
    np.save(tmp_path / "c.npy", np.ones((1, 2, 4)))
    with pytest.raises(MoesimError, match="unknown model preset"):
        import_trace(tmp_path / "c.npy", "moe-infinity", model="gpt-5")


def test_import_help_names_every_registered_format():
    from moesim.commands.trace_io import _format_help

    for name in FORMATS:
        assert name in _format_help()


def run_cli(capsys, *args):
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_import_then_info_and_export(tmp_path, capsys):
    experts = distinct_routing(7, 2, 8, 2)
    np.savez(tmp_path / "a.npz", experts=experts, seq_lens=np.array([7]))
    code, out, err = run_cli(capsys, "trace", "import", "--format", "arrays-npz", str(tmp_path / "a.npz"),
                             "--out", str(tmp_path / "a.parquet"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["tokens"], summary["layers"], summary["top_k"]) == (7, 2, 2)
    code, out, err = run_cli(capsys, "trace", "export", str(tmp_path / "a.parquet"), "--out",
                             str(tmp_path / "b.npz"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["experts"], experts)


def test_cli_unknown_format_is_one_error_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "trace", "import", "--format", "csv", str(tmp_path), "--out",
                             str(tmp_path / "x.parquet"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: unknown trace format")
    assert "route-trace-v1" in err and not (tmp_path / "x.parquet").exists()


def test_the_documented_esft_command_works(esft_npz, tmp_path):
    out = tmp_path / "law.parquet"
    proc = subprocess.run([sys.executable, "-m", "moesim.cli", "trace", "import", "--format",
                           "arrays-npz", str(esft_npz["law"]), "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["tokens"], s["layers"], s["experts"], s["top_k"]) == (8327, 26, 64, 6)
    assert Trace.read(out).num_rows == 8327 * 26


# ----- what 'moesim trace stats' reports on the imported real traces ------------------------------
def stats_json(capsys, path):
    code, out, err = run_cli(capsys, "trace", "stats", str(path), "--json", "--segment-lengths", "none")
    assert code == 0, err
    return json.loads(out)


def test_stats_of_the_imported_phone_trace_match_its_csv(phone, tmp_path, capsys):
    _, t, (header, _, df) = phone
    s = stats_json(capsys, t.write(tmp_path / "phone.parquet"))
    assert (s["layers"], s["experts"], s["top_k"]) == (48, 128, 6)
    assert (s["layers"], s["experts"], s["top_k"]) == tuple(
        int(header[k]) for k in ("n_layer", "n_expert", "n_expert_used"))
    assert s["tokens"] == df.step.nunique() == 156


def test_stats_of_the_imported_esft_law_trace(esft_npz, tmp_path, capsys):
    out = tmp_path / "law.parquet"
    code, _, err = run_cli(capsys, "trace", "import", "--format", "arrays-npz", str(esft_npz["law"]),
                           "--out", str(out))
    assert code == 0, err
    s = stats_json(capsys, out)
    assert (s["tokens"], s["layers"], s["experts"], s["top_k"]) == (8327, 26, 64, 6)


@pytest.mark.parametrize("out", ["folder", "file/x.parquet"])
def test_cli_output_that_cannot_be_written_is_one_error_line(tmp_path, capsys, out):
    np.savez(tmp_path / "a.npz", experts=distinct_routing(3, 2, 8, 2))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli(capsys, "trace", "import", "-f", "arrays-npz", str(tmp_path / "a.npz"),
                           "--out", str(tmp_path / out))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
