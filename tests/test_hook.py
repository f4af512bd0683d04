"""The tracing hook records the routing a model executes, checked against an independent witness.

The witness (``ExpertSpy``) never looks at routing tensors: a torch function mode sees every
matrix product that touches a routed expert's weight slice, and so learns which hidden-state rows
each expert multiplied (matched back to tokens by value) and what each expert produced. The gate
weight of each (token, expert) is then solved from the experts' combined output by least squares
(Llama4 scales the expert *input*, so there it is the ratio of input rows). Every architecture
runs ``capture()`` on a tiny random model: left-padded batches, prefill and generate() decode steps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch.overrides import TorchFunctionMode  # noqa: E402

from moesim.errors import MoesimError  # noqa: E402
from moesim.traces import Trace  # noqa: E402
from moesim.traces.capture import (  # noqa: E402
    TINY_CONFIGS,
    ByteTokenizer,
    LoadedModel,
    build_tiny_model,
    capture,
    load_model,
    read_prompts,
)
from moesim.traces.hook import HookError, RoutingRecorder, find_moe_layers  # noqa: E402

pytestmark = pytest.mark.capture

PROMPTS = ["Mixture of experts", "hi", "Routing as executed, not as predicted"]
BATCH = 2
NEW_TOKENS = 3

# Where each architecture keeps its routed experts' weights: the input projection, the output
# projection (fullmatch regexes over parameter names; "block" is the MoE block path, "e" the
# expert of a per-expert module) and an output bias added after the product.
_FUSED = (r"(?P<block>.+)\.experts\.gate_up_proj", r"(?P<block>.+)\.experts\.down_proj", None)
EXPERT_WEIGHTS = {
    "mixtral": _FUSED, "qwen2_moe": _FUSED, "qwen3_moe": _FUSED, "olmoe": _FUSED,
    "deepseek_v2": _FUSED, "deepseek_v3": _FUSED, "phimoe": _FUSED, "granitemoe": _FUSED,
    "llama4_text": _FUSED,
    "gpt_oss": (*_FUSED[:2], "down_proj_bias"),
    "dbrx": (r"(?P<block>.+)\.experts\.mlp\.w1", r"(?P<block>.+)\.experts\.mlp\.w2", None),
    "jetmoe": (r"(?P<block>.+\.mlp)\.input_linear\.weight", r"(?P<block>.+\.mlp)\.output_linear\.weight", None),
    "switch_transformers": (r"(?P<block>.+)\.experts\.expert_(?P<e>\d+)\.wi\.weight",
                            r"(?P<block>.+)\.experts\.expert_(?P<e>\d+)\.wo\.weight", None),
}
# small capacity so that Switch drops some tokens (they run no expert and get no row)
OVERRIDES = {"switch_transformers": {"expert_capacity": 3}}


class ExpertSpy(TorchFunctionMode):
    """Sees every matmul that multiplies a routed expert's weights, per MoE block invocation."""

    MATMULS = {"linear", "matmul", "__matmul__", "bmm"}

    def __init__(self, model, arch: str, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        in_rx, out_rx, self.bias_name = EXPERT_WEIGHTS[arch]
        self.weights: dict[int, tuple] = {}
        blocks = set()
        for name, p in model.named_parameters():
            for role, rx in (("in", in_rx), ("out", out_rx)):
                m = re.fullmatch(rx, name)
                if m:
                    fixed = int(m.group("e")) if "e" in m.groupdict() else None
                    self.weights[p.untyped_storage().data_ptr()] = (m.group("block"), role, p, fixed)
                    blocks.add(m.group("block"))
        modules = dict(model.named_modules())
        self.blocks = {b: modules[b] for b in sorted(blocks)}
        self.calls: dict[str, list[dict]] = defaultdict(list)  # block -> invocations in order
        self._open: dict[str, dict] = {}
        self._handles = []
        for path, block in self.blocks.items():
            self._handles.append(block.register_forward_pre_hook(self._enter(path)))
            self._handles.append(block.register_forward_hook(self._leave(path)))
            if hasattr(block, "experts"):
                self._handles.append(block.experts.register_forward_hook(self._experts_out(path)))

    def _enter(self, path):
        def hook(module, args):
            x = args[0].detach()
            self._open[path] = {"X": x.reshape(-1, x.shape[-1]).double().clone(), "in": {}, "out": {}}

        return hook

    def _experts_out(self, path):
        def hook(module, args, output):
            y = output.detach()
            self._open[path]["Y"] = y.reshape(-1, y.shape[-1]).double().clone()

        return hook

    def _leave(self, path):
        def hook(module, args, output):
            inv = self._open.pop(path)
            if "Y" not in inv:  # JetMoE: no experts module; the block adds one bias to the sum
                y = output.detach().reshape(-1, inv["X"].shape[-1]).double()
                inv["Y"] = y - module.bias.detach().double()
            self.calls[path].append(inv)

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self.MATMULS:
            tensors = [a for a in args if torch.is_tensor(a)]
            for i, w in enumerate(tensors[:2]):
                hit = self.weights.get(w.untyped_storage().data_ptr())
                if hit is not None and len(tensors) >= 2:
                    self._record(hit, w, tensors[1 - i], out)
        return out

    def _record(self, hit, w, x, out):
        block, role, p, fixed = hit
        inv = self._open.get(block)
        if inv is None:
            return
        x, out = x.detach().double(), out.detach().double()
        if fixed is not None:
            pieces = [(fixed, x, out)]
        elif w.numel() == p.numel():  # every expert at once (Llama4's bmm): [E, T, H]
            pieces = [(e, x[e], out[e]) for e in range(self.num_experts)]
        else:  # a slice of the fused [E, ...] weight: its offset tells the expert
            per_expert = p.numel() // self.num_experts
            pieces = [((w.storage_offset() - p.storage_offset()) // per_expert, x, out)]
        for e, xe, oe in pieces:
            if role == "out" and self.bias_name:
                oe = oe + getattr(self.blocks[block].experts, self.bias_name)[e].detach().double()
            inv[role][int(e)] = (xe.reshape(-1, xe.shape[-1]), oe.reshape(-1, oe.shape[-1]))

    def close(self):
        for h in self._handles:
            h.remove()


def executed_routing(inv: dict, batched: bool) -> dict[int, dict[int, float]]:
    """token row -> {expert: gate weight} from one block invocation the spy watched."""
    X = inv["X"].numpy()
    routing: dict[int, dict[int, float]] = defaultdict(dict)
    if batched:  # Llama4: expert e multiplied score[t, e] * X[t] for every token t
        for e, (xe, _) in inv["in"].items():
            xe = xe.numpy()
            for t in np.flatnonzero(np.abs(xe).sum(axis=1) > 0):
                routing[t][e] = float(xe[t] @ X[t] / (X[t] @ X[t]))
        return routing
    rows_of = defaultdict(list)
    for t, row in enumerate(X.astype(np.float32)):
        rows_of[row.tobytes()].append(t)
    produced: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    for e, (xe, _) in inv["in"].items():
        _, oe = inv["out"][e]
        for r, row in enumerate(xe.numpy().astype(np.float32)):
            tokens = rows_of.get(row.tobytes())
            assert tokens, f"expert {e} multiplied a row that is no token's hidden state"
            for t in tokens:
                produced[t][e] = oe.numpy()[r]
    Y = inv["Y"].numpy()
    for t, outs in produced.items():
        experts = sorted(outs)
        D = np.stack([outs[e] for e in experts], axis=1)  # [H, n]
        w, *_ = np.linalg.lstsq(D, Y[t], rcond=None)
        assert np.allclose(D @ w, Y[t], atol=1e-5 * (1 + np.abs(Y[t]).max())), "output is not a mix of expert outputs"
        routing[t] = dict(zip(experts, w.tolist(), strict=True))
    return routing


def expected_passes(arch: str, stream_role: str):
    """(request ids, S, phase, positions[B, S], valid[B, S]) of each pass of a stream, in order."""
    tok = ByteTokenizer()
    lengths = [len(tok.encode(p)) for p in PROMPTS]
    for start in range(0, len(PROMPTS), BATCH):
        lens = np.array(lengths[start:start + BATCH])
        width = lens.max()
        reqs = np.arange(start, start + len(lens))
        pad = width - lens
        s = np.arange(width)
        if stream_role in ("decoder-only", "encoder"):
            yield reqs, width, 0, s[None, :] - pad[:, None], s[None, :] >= pad[:, None]
        if stream_role == "decoder-only":
            for j in range(1, NEW_TOKENS):
                yield reqs, 1, 1, (lens + j - 1)[:, None], np.ones((len(lens), 1), bool)
        if stream_role == "decoder":
            for j in range(NEW_TOKENS):
                yield reqs, 1, 1, (lens + j)[:, None], np.ones((len(lens), 1), bool)


def _loaded(arch, **kw):
    model = build_tiny_model(arch, seed=0, experts_implementation="eager", **kw)
    # no end-of-sequence: every request generates NEW_TOKENS tokens, whatever the random model says
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return LoadedModel(model, ByteTokenizer(), f"tiny:{arch}", "tiny")


def _rows(trace: Trace) -> dict[str, np.ndarray]:
    batches = list(trace.iter_batches(columns=["t_layer_s", "t_step_s"]))
    cols = {n: np.concatenate([getattr(b, n) for b in batches])
            for n in ("request_id", "token_pos", "step", "phase", "layer", "expert_ids", "gate_weights")}
    for n in ("t_layer_s", "t_step_s"):
        cols[n] = np.concatenate([b.extras[n] for b in batches])
    return cols


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_recorded_routing_is_what_the_experts_executed(arch, tmp_path):
    loaded = _loaded(arch, **OVERRIDES.get(arch, {}))
    model = loaded.model
    num_experts = find_moe_layers(model)[0].num_experts
    spy = ExpertSpy(model, arch, num_experts)
    out = tmp_path / "t.parquet"
    with spy:
        summary = capture(loaded, PROMPTS, out, max_new_tokens=NEW_TOKENS, batch_size=BATCH)
    spy.close()
    trace = Trace.read(out)
    rows = _rows(trace)
    layers = trace.meta.capture["layers"]
    assert sorted(entry["path"] for entry in layers) == sorted(spy.blocks)
    batched = arch == "llama4_text"
    encdec = model.config.is_encoder_decoder
    checked = 0
    for index, entry in enumerate(layers):
        role = ("encoder" if "encoder" in entry["stream"] else "decoder") if encdec else "decoder-only"
        passes = list(expected_passes(arch, role))
        invocations = spy.calls[entry["path"]]
        assert len(invocations) == len(passes)
        mine = rows["layer"] == index
        steps = np.unique(rows["step"][mine])
        assert len(steps) == len(passes)
        for inv, step, (reqs, S, phase, pos, valid) in zip(invocations, steps, passes, strict=True):
            assert inv["X"].shape[0] == len(reqs) * S
            executed = executed_routing(inv, batched)
            at = mine & (rows["step"] == step)
            got = {(int(r), int(p)): (ids, w) for r, p, ids, w in zip(
                rows["request_id"][at], rows["token_pos"][at], rows["expert_ids"][at],
                rows["gate_weights"][at], strict=True)}
            assert set(rows["phase"][at]) == {phase}
            want = {}
            for t in range(len(reqs) * S):
                b, s = divmod(t, S)
                if valid[b, s] and executed.get(t):
                    want[(int(reqs[b]), int(pos[b, s]))] = executed[t]
            assert set(got) == set(want), "rows for padding, or missing rows"
            for key, experts in want.items():
                ids, w = got[key]
                assert sorted(ids.tolist()) == sorted(experts), f"{arch} {entry['path']} {key}"
                truth = np.array([experts[int(e)] for e in ids])
                np.testing.assert_allclose(w, truth, rtol=2e-3, atol=1e-6)
                checked += 1
    assert checked == len(rows["layer"]) == summary["rows"]
    if arch == "switch_transformers":
        assert summary["dropped_rows"]["capacity"] > 0  # the witness agreed these ran no expert
    assert (rows["t_layer_s"] > 0).all() and (rows["t_layer_s"] <= rows["t_step_s"]).all()


def test_deepseek_v3_records_the_bias_corrected_group_limited_choice(tmp_path):
    """Top-k of the router logits is not what DeepSeek-V3 runs; the trace holds what runs."""
    loaded = _loaded("deepseek_v3")
    logits = []
    gates = [m for n, m in loaded.model.named_modules() if n.endswith("mlp.gate")]
    handles = [g.register_forward_hook(lambda m, a, o: logits.append(o[0].detach())) for g in gates]
    capture(loaded, PROMPTS[:1], tmp_path / "t.parquet", max_new_tokens=1)
    for h in handles:
        h.remove()
    trace = Trace.read(tmp_path / "t.parquet")
    rows = _rows(trace)
    # one prefill pass: logits of layer 0 then layer 1, each [tokens, experts]
    naive = torch.cat([torch.topk(lg.sigmoid(), 2, dim=-1).indices for lg in logits]).numpy()
    recorded = rows["expert_ids"][np.lexsort((rows["token_pos"], rows["layer"]))]
    assert recorded.shape == naive.shape
    same = (np.sort(recorded, axis=1) == np.sort(naive, axis=1)).all(axis=1)
    assert not same.all(), "with a correction bias the executed experts must differ from top-k of the logits"
    np.testing.assert_allclose(rows["gate_weights"].sum(axis=1), 2.5, rtol=1e-5)
    assert trace.meta.weight_norm == "scaled"
    assert trace.meta.extra["routed_scaling_factor"] == 2.5
    assert trace.meta.extra["norm_topk_prob"] is True


def test_default_fused_experts_implementation_is_recorded_too(tmp_path):
    """grouped_mm runs the experts in one fused call; the pre-hook still sees the routing."""
    fused = build_tiny_model("mixtral", seed=0)
    assert fused.config._experts_implementation != "eager"
    eager = _loaded("mixtral").model
    traces = []
    for name, model in (("fused", fused), ("eager", eager)):
        model.generation_config.eos_token_id = None
        loaded = LoadedModel(model, ByteTokenizer(), name, "tiny")
        capture(loaded, PROMPTS, tmp_path / f"{name}.parquet", max_new_tokens=NEW_TOKENS, batch_size=BATCH)
        traces.append(_rows(Trace.read(tmp_path / f"{name}.parquet")))
    a, b = traces
    assert len(a["layer"]) == len(b["layer"]) > 0
    first = a["layer"] == 0  # layer 0 sees identical inputs under both implementations
    np.testing.assert_array_equal(a["expert_ids"][first], b["expert_ids"][first])
    np.testing.assert_allclose(a["gate_weights"][first], b["gate_weights"][first], rtol=1e-6)


def test_finished_requests_stop_recording():
    """After a request emits its end token, generate() keeps feeding it: those rows are dropped."""
    loaded = _loaded("qwen3_moe")
    enc = ByteTokenizer()(PROMPTS[:2])
    width = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = out[:, width:].tolist()
    eos = generated[0][0]  # request 0 "ends" with its first new token
    sink_rows = []
    rec = RoutingRecorder(loaded.model, sink_rows.append, eos_token_ids=[eos])
    with rec, torch.no_grad():
        loaded.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    L = len(rec.layers)
    for req, gen in enumerate(generated):
        # decode pass j feeds generated token j; from the end token on, nothing is recorded
        alive = sum(1 for j in range(1, 4) if eos not in gen[:j])
        got = sum(int(((r.request_id == req) & (r.phase == 1)).sum()) for r in sink_rows)
        assert got == alive * L
    assert sum(int((r.request_id == 0).sum()) for r in sink_rows if r.phase[0] == 1) == 0
    assert rec.dropped["finished"] == sum(3 - sum(1 for j in range(1, 4) if eos not in g[:j])
                                          for g in generated) * L


def test_metadata_carries_model_facts(tmp_path):
    loaded = _loaded("deepseek_v3", first_k_dense_replace=1, num_hidden_layers=3)
    capture(loaded, PROMPTS[:1], tmp_path / "t.parquet", max_new_tokens=2)
    meta = Trace.read(tmp_path / "t.parquet").meta
    assert meta.num_layers == 2  # the first decoder layer is dense
    assert [entry["path"] for entry in meta.capture["layers"]] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert meta.extra["first_k_dense_replace"] == 1
    assert meta.shared_experts == 1 and meta.top_k == 2 and meta.num_experts == 8
    assert meta.source == "hf-hook" and meta.capture["timing"] == "perf-counter"
    experts = loaded.model.model.layers[1].mlp.experts
    one_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4
    assert meta.expert_bytes == [one_expert, one_expert]
    layer = loaded.model.model.layers[1]
    layer_bytes = sum(p.numel() * 4 for p in layer.parameters())
    assert meta.dense_bytes[0] == layer_bytes - 8 * one_expert
    total = sum(p.numel() * 4 for p in loaded.model.parameters())
    assert meta.extra["other_bytes"] + sum(meta.dense_bytes) + 8 * sum(meta.expert_bytes) == total


def test_switch_keeps_encoder_and_decoder_layers_apart(tmp_path):
    loaded = _loaded("switch_transformers")
    capture(loaded, PROMPTS[:1], tmp_path / "t.parquet", max_new_tokens=2)
    trace = Trace.read(tmp_path / "t.parquet")
    paths = [entry["path"] for entry in trace.meta.capture["layers"]]
    assert paths[:2] == ["encoder.block.0.layer.1.mlp", "encoder.block.1.layer.1.mlp"]
    assert all(p.startswith("decoder.") for p in paths[2:])
    rows = _rows(trace)
    enc = rows["layer"] < 2
    assert set(rows["phase"][enc]) == {0} and set(rows["phase"][~enc]) == {1}
    n_prompt = len(ByteTokenizer().encode(PROMPTS[0]))
    # decoder tokens continue the request's timeline after its prompt
    assert rows["token_pos"][enc].max() == n_prompt - 1
    assert sorted(set(rows["token_pos"][~enc])) == [n_prompt, n_prompt + 1]


def test_jetmoe_attention_experts_are_opt_in():
    model = _loaded("jetmoe").model
    assert [layer.path for layer in find_moe_layers(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    sink_rows = []
    rec = RoutingRecorder(model, sink_rows.append, attention_experts=True)
    paths = [layer.path for layer in rec.layers]
    assert paths == ["model.layers.0.mlp", "model.layers.0.self_attention.experts",
                     "model.layers.1.mlp", "model.layers.1.self_attention.experts"]
    enc = ByteTokenizer()(PROMPTS[:2])
    with rec, torch.no_grad():
        model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    real = int(enc["attention_mask"].sum())
    assert sum(len(r) for r in sink_rows) == (real + 2 * 2) * 4


class _LinearGateBlock(torch.nn.Module):
    """A transformers-4.x-style block: nn.Linear gate (bare logits), ModuleList of experts."""

    def __init__(self, hidden=16, experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.topk(torch.softmax(self.gate(flat), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(self.top_k):
                out[t] += w[t, j] * self.experts[int(idx[t, j])](flat[t])
        return out.view_as(x)


class _ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(model_type="toy", num_experts_per_tok=2)
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(_LinearGateBlock() for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return h


def test_a_bare_logits_router_is_recomputed_and_marked_inexact():
    torch.manual_seed(0)
    model = _ToyModel().eval()
    sink_rows = []
    rec = RoutingRecorder(model, sink_rows.append)
    assert [(layer.path, layer.source, layer.exact) for layer in rec.layers] == [("layers.0", "router-output", False), ("layers.1", "router-output", False)]
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    executed = []
    hooks = [blk.gate.register_forward_hook(
        lambda m, a, o: executed.append(torch.topk(torch.softmax(o, -1), 2, -1).indices)) for blk in model.layers]
    with rec, torch.no_grad():
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    for h in hooks:
        h.remove()
    (rows,) = sink_rows
    assert len(rows) == 7 * 2  # one padding token left out
    want = torch.stack(executed, dim=1).reshape(8, 2, 2)[1:].reshape(-1, 2).numpy()
    np.testing.assert_array_equal(rows.expert_ids, want)
    assert [entry["exact"] for entry in rec.meta_fields()["capture"]["layers"]] == [False, False]


def test_a_model_without_experts_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(HookError, match="no MoE block"):
        RoutingRecorder(model, lambda rows: None)


def test_a_failed_capture_leaves_no_file(tmp_path):
    loaded = _loaded("mixtral")
    out = tmp_path / "t.parquet"
    with pytest.raises(MoesimError):
        capture(loaded, PROMPTS, out, max_new_tokens=0)
    calls = {"n": 0}
    original = loaded.model.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    loaded.model.forward = failing
    with pytest.raises(RuntimeError):
        capture(loaded, PROMPTS, out, max_new_tokens=3)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_load_model_errors():
    with pytest.raises(MoesimError, match="no model hub is reachable"):
        load_model("mistralai/Mixtral-8x7B-v0.1")
    with pytest.raises(MoesimError, match="unknown tiny architecture 'nope'"):
        load_model("tiny:nope")


def _byte_level_tokenizer():
    """A fast tokenizer of single bytes (no merges), as a local model directory would ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_capture_from_a_local_model_directory(tmp_path):
    model = build_tiny_model("qwen3_moe", seed=3)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(MoesimError, match="no tokenizer files"):
        load_model(str(tmp_path / "m"))
    tok = _byte_level_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.source == "local" and loaded.name == "m"
    loaded.model.generation_config.eos_token_id = None
    summary = capture(loaded, PROMPTS, tmp_path / "t.parquet", max_new_tokens=2, batch_size=3)
    real_tokens = sum(len(p.encode()) for p in PROMPTS)  # one token per byte, no BOS added
    assert summary["prompt_tokens"] == real_tokens
    assert summary["rows"] == (real_tokens + len(PROMPTS)) * 2
    with pytest.raises(MoesimError, match="no such model directory"):
        load_model(str(tmp_path / "missing"))


def test_read_prompts(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("one\n\n two words \n")
    assert read_prompts(plain) == ["one", " two words "]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n"b"\n{"text": "c"}\n')
    assert read_prompts(jl) == ["a", "b", "c"]
    jl.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(MoesimError, match=r"p\.jsonl:2: not valid JSON"):
        read_prompts(jl)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MoesimError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_capture_command(tmp_path, capsys):
    from moesim.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "t.parquet"
    code = main(["trace", "capture", "--model", "tiny:olmoe", "--prompts", str(prompts),
                 "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    tok = ByteTokenizer()
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    assert summary["prompt_tokens"] == prompt_tokens
    # prefill rows for every real prompt token, then (new tokens - 1) decode tokens per request
    expected_rows = (prompt_tokens + len(PROMPTS) * (3 - 1)) * 2
    assert summary["rows"] == expected_rows == Trace.read(out).validate()
    # 6 forward passes, gathered into one row group rather than one per pass
    assert summary["forward_passes"] == 6 and pq.ParquetFile(out).num_row_groups == 1
    code = main(["trace", "capture", "--model", "Qwen/Qwen3-30B-A3B", "--prompts", str(prompts),
                 "--max-new-tokens", "3", "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: model 'Qwen/Qwen3-30B-A3B' is not a local directory")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.parquet").exists()


def test_importing_traces_does_not_import_torch():
    code = "import sys, moesim.traces, moesim.traces.schema; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "False"
