"""Run a Hugging Face transformers MoE model with its routed experts offloaded behind the cache.

The model runs whole (embeddings, attention with its KV cache, norms, routers, shared experts,
LM head), one token per forward pass. Each MoE block's ``experts`` module (transformers 5.x:
``forward(hidden_states, top_k_index, top_k_weights)`` over parameters stacked by expert) is
replaced by ``offloaded_experts``:

- every parameter whose first dimension is the expert count is cut into one safetensors file
  per (layer, expert) in the expert store, then dropped from the model;
- a *shell* keeps the module's code with one expert's worth of parameters; a loaded expert runs
  through it (its tensors swapped in as views of the read buffer), so each architecture's own
  kernel runs (fused gate/up, biases, clamped SwiGLU of gpt-oss, ...);
- the routing is the model's own, or forced from a trace (the trace's experts and weights
  replace the router's), and goes through the same policy, prefetcher, I/O pool and record as
  the synthetic stack (``moesim.executor.runner``).

Per (token, layer) ``t_dense_s`` is the decoder layer's time besides routed-expert compute and
read waits (attention, norms, router, shared experts), so ``moesim validate`` treats it like the
stack's dense part; the rest of a forward pass (embeddings, dense layers, LM head) is the
per-token overhead the warm-up tokens calibrate.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.executor.store import ExecutorError, ExpertStore
from moesim.model import get_model

# the moesim preset whose structure an architecture shares (dimensions come from the config)
ARCH_PRESETS = {"mixtral": "mixtral-8x7b", "qwen2_moe": "qwen1.5-moe-a2.7b",
                "qwen3_moe": "qwen3-30b-a3b", "olmoe": "olmoe-1b-7b",
                "deepseek_v2": "deepseek-v2-lite", "deepseek_v3": "deepseek-v3",
                "gpt_oss": "gpt-oss-20b", "phimoe": "mixtral-8x7b", "granitemoe": "mixtral-8x7b"}
DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


@dataclass
class HFLayer:
    index: int
    block: object  # the MoE block (its ``experts`` child is replaced)
    decoder: object  # the decoder layer holding it (timed)
    names: list  # expert-stacked parameter names of the experts module
    shell: object  # the experts module with one expert's parameters
    num_experts: int


@dataclass
class HFModel:
    """A loaded model prepared for offloading: its MoE layers and the StackSpec it records."""

    model: object
    name: str
    arch: str
    layers: list
    spec: object  # StackSpec: preset structure at the config's dimensions
    payload_bytes: int  # bytes of one routed expert's parameters
    fingerprint: str  # identifies the weights (store folder name)
    offloaded: bool = False
    info: dict = field(default_factory=dict)


def _config_value(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def load_hf(source: str, seed: int = 0, overrides: dict | None = None,
            dtype: str | None = None) -> HFModel:
    """``tiny:ARCH`` (random weights, seeded; ``overrides`` change its config) or a local model
    directory; ``dtype`` (fp32, bf16, fp16) casts the model; raises ExecutorError for an
    architecture whose experts cannot be offloaded."""
    import torch

    from moesim.executor.stack import COMPUTE_DTYPES, StackSpec, torch_dtype
    from moesim.traces.capture import build_tiny_model, load_model, tiny_arch
    from moesim.traces.hook import find_moe_layers, text_config

    if source.startswith("tiny:"):
        arch = tiny_arch(source.removeprefix("tiny:"))
        model, name = build_tiny_model(arch, seed=seed, **(overrides or {})), f"tiny:{arch}"
    else:
        if overrides:
            raise ExecutorError("--override changes a tiny:ARCH config or a preset; edit a local "
                                "model's config.json instead")
        loaded = load_model(source, seed=seed)
        model, name = loaded.model, loaded.name
        arch = model.config.model_type
    if dtype is not None:
        if dtype not in COMPUTE_DTYPES:
            raise ExecutorError(f"dtype {dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
        model = model.to(torch_dtype(dtype))
    cfg = text_config(model)
    found = find_moe_layers(model)
    modules = dict(model.named_modules())
    layers = []
    for lay in found:
        experts = getattr(lay.block, "experts", None)
        if lay.source != "experts-args" or experts is None:
            raise ExecutorError(f"{name}: the experts of {lay.path} do not take the routing as "
                                "arguments (transformers 5.x experts module); the executor "
                                "offloads mixtral, qwen2/3-moe, olmoe, deepseek-v2/v3, gpt-oss, "
                                "phimoe and granitemoe style blocks")
        E = lay.num_experts
        names = [n for n, p in experts.named_parameters(recurse=False)
                 if p.dim() >= 1 and p.shape[0] == E]
        if not names:
            raise ExecutorError(f"{name}: {lay.path}.experts holds no parameters stacked by "
                                "expert; it cannot be offloaded expert by expert")
        decoder = modules[lay.path.rsplit(".", 1)[0]]
        layers.append(HFLayer(lay.index, lay.block, decoder, names, _shell(experts, names), E))
    first = layers[0].block.experts
    dtype = DTYPES.get(str(getattr(first, layers[0].names[0]).dtype))
    if dtype is None:
        raise ExecutorError(f"{name}: experts in {getattr(first, layers[0].names[0]).dtype}; the "
                            "store holds fp32, bf16 or fp16")
    payload = sum(getattr(first, n)[0].numel() * getattr(first, n).element_size()
                  for n in layers[0].names)
    hidden = int(_config_value(cfg, "hidden_size", "d_model"))
    inter = int(_config_value(cfg, "moe_intermediate_size", "intermediate_size"))
    preset = ARCH_PRESETS.get(arch, "mixtral-8x7b")
    shared_n = int(_config_value(cfg, "n_shared_experts", default=0) or 0)
    shared_w = int(_config_value(cfg, "shared_expert_intermediate_size", default=0) or 0)
    base = get_model(preset)
    model_dims = {"hidden": hidden, "moe_intermediate": inter}
    if shared_w:
        model_dims.update(shared_experts=1, shared_intermediate=shared_w)
    elif shared_n:
        model_dims.update(shared_experts=shared_n, shared_intermediate=inter)
    elif base.shared_experts:
        model_dims.update(shared_experts=0)
    spec = StackSpec(get_model(preset, **model_dims), len(layers), layers[0].num_experts,
                     found[0].top_k, dtype, seed)
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True,
                                       default=str).encode())
    digest.update(f"{name}|{seed}".encode())
    with torch.no_grad():  # the weights themselves, in case a local model was retrained
        digest.update(getattr(first, layers[0].names[0])[0].float().flatten()[:64].numpy().tobytes())
    info = {"source": name, "arch": arch, "preset_structure": preset,
            "expert_parameters": layers[0].names, "moe_layers": len(layers),
            "num_experts": layers[0].num_experts, "top_k": found[0].top_k,
            "expert_payload_bytes": int(payload), "dtype": dtype}
    return HFModel(model, name, arch, layers, spec, int(payload), digest.hexdigest()[:12],
                   info=info)


def _shell(experts, names):
    """A copy of the experts module whose stacked parameters hold one expert."""
    import torch

    saved = {n: getattr(experts, n) for n in names}
    try:
        for n in names:
            setattr(experts, n, torch.nn.Parameter(saved[n][:1].detach().clone(),
                                                   requires_grad=False))
        shell = copy.deepcopy(experts)
    finally:
        for n in names:
            setattr(experts, n, saved[n])
    if hasattr(shell, "num_experts"):
        shell.num_experts = 1
    return shell.eval()


def run_expert(layer: HFLayer, tensors: dict, h):
    """Expert output on ``h`` [tokens, hidden] (unweighted) through the layer's shell."""
    import torch

    for n in layer.names:
        getattr(layer.shell, n).data = tensors[n].unsqueeze(0)
    idx = torch.zeros((h.shape[0], 1), dtype=torch.long)
    ones = torch.ones((h.shape[0], 1), dtype=h.dtype)
    return layer.shell(h, idx, ones)


def store_for_hf(root, hf: HFModel, cold: str = "direct", read_gbps=None) -> ExpertStore:
    folder = Path(root) / f"hf-{hf.arch}-{hf.fingerprint}"
    return ExpertStore(folder, hf.spec.num_experts, cold=cold, read_gbps=read_gbps)


def offload(hf: HFModel, store: ExpertStore) -> None:
    """Write every routed expert to the store (files it lacks) and drop them from the model."""
    import torch

    if hf.offloaded:
        return
    for layer in hf.layers:
        experts = layer.block.experts
        E = layer.num_experts
        for e in range(E):
            key = layer.index * E + e
            if not store.has(key):
                store.write(key, {n: getattr(experts, n)[e].detach().contiguous()
                                  for n in layer.names})
        for n in layer.names:  # free the stacked weights: only the store holds them now
            setattr(experts, n, torch.nn.Parameter(torch.empty(0), requires_grad=False))
    hf.offloaded = True


def offloaded_experts(driver, layer: HFLayer):
    """A module standing in for a block's ``experts``: it calls back into the run loop."""
    import torch

    class OffloadedExperts(torch.nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return driver.experts(layer, hidden_states, top_k_index, top_k_weights)

    return OffloadedExperts()


def token_ids(hf: HFModel, tokens: int, seed: int):
    """Seeded token ids for a run whose routing is forced (their content does not matter) or
    the router's own (random text of the vocabulary)."""
    import torch

    from moesim.traces.hook import text_config

    vocab = int(_config_value(text_config(hf.model), "vocab_size"))
    g = torch.Generator().manual_seed(int(seed) + 4242)
    return torch.randint(3, vocab, (1, tokens), generator=g)


def forward_tokens(hf: HFModel, ids, on_token=None):
    """Run ``ids`` [1, T] one token per forward pass with the KV cache; return the logits [T, V]."""
    import torch

    out, past = [], None
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            if on_token is not None:
                on_token(t, "start")
            res = hf.model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = res.past_key_values
            if on_token is not None:
                on_token(t, "end")
            out.append(res.logits[0, -1].float())
    return torch.stack(out)


class Driver:
    """The run loop's state across the model's forward passes (see ``run_hf``)."""

    def __init__(self, hf, store, stream, arrays, rec, policy, prefetcher, pool):
        from moesim.cache import BatchInfo

        self.hf, self.store = hf, store
        self.stream, self.arrays, self.rec = stream, arrays, rec
        self.policy, self.prefetcher, self.pool = policy, prefetcher, pool
        self.ram: dict = {}
        self.loading: dict = {}
        self.info = BatchInfo()
        self.t = 0
        self.b = 0
        self.clock = time.perf_counter
        self._layer_t0 = 0.0
        self._exp = (0.0, 0.0)
        self._keys = None

    # decoder-layer hooks: layer start (prefetch as the stack does) and end (timings)
    def layer_start(self, layer: HFLayer):
        self._layer_t0 = self.clock()
        self._keys = None
        if self.stream is not None and self.prefetcher is not None:
            b, st = self.b, self.stream
            keys = st.keys[int(st.batch_ptr[b]):int(st.batch_ptr[b + 1])].tolist()
            want = self.prefetcher.predict(b + 1) if b + 1 < st.num_batches else []
            for k in self.policy.prefetch(want, b, protect=keys):
                from moesim.executor.runner import _issue

                _issue(self.pool, self.loading, k, 1)
                self.rec.prefetch_bytes[self.t, layer.index] += self.hf.payload_bytes

    def layer_end(self, layer: HFLayer):
        t, li, rec = self.t, layer.index, self.rec
        total = self.clock() - self._layer_t0
        t_exp, t_wait = self._exp
        rec.t_layer_s[t, li] = total
        rec.t_expert_s[t, li] = t_exp
        rec.t_wait_s[t, li] = t_wait
        rec.t_dense_s[t, li] = max(total - t_exp - t_wait, 0.0)

    def experts(self, layer: HFLayer, h, top_k_index, top_k_weights):
        import torch

        from moesim.executor.runner import _experts, _sync, batch_lookup

        if h.shape[0] != 1:
            raise ExecutorError("the executor runs one token per forward pass")
        t, li, b, info = self.t, layer.index, self.b, self.info
        keys, ids_row, w_row = batch_lookup(self.hf.spec, self.stream, self.arrays, info, b, t,
                                            li, top_k_index[0].numpy(),
                                            top_k_weights[0].float().numpy())
        pre = [self.policy.resident.get(k) == 1 for k in keys]
        hits = self.policy.lookup(keys, b, info, per_access=True)
        _sync(self.policy, self.ram, self.loading, self.store)
        out = torch.zeros_like(h)
        self._exp = _experts(self.pool, self.ram, self.loading, keys, hits, pre, h, w_row, out,
                             self.rec, t, li, self.clock, self.store,
                             kernel=lambda tensors, x: run_expert(layer, tensors, x))
        if self.prefetcher is not None:
            self.prefetcher.observe(b, keys, hits)
        self.rec.experts[t, li] = ids_row
        self.rec.weights[t, li] = w_row
        self.b += 1
        return out


def run_hf(hf: HFModel, store: ExpertStore, settings, *, trace=None, tokens: int | None = None):
    """Run the model token by token with its experts offloaded; return a RunRecord."""
    import torch

    from moesim.executor.io import IOPool
    from moesim.executor.runner import (
        _empty_record,
        _policy,
        finish_record,
        forced_stream,
        preallocate_buffers,
    )
    from moesim.traces.hook import text_config

    if settings.device != "cpu":
        raise ExecutorError("Hugging Face models run on the CPU executor (--device cpu)")
    torch.set_num_threads(int(settings.compute_threads))
    spec = hf.spec
    stream = forced_stream(trace, spec) if trace is not None else None
    if stream is not None:
        arrays = trace.to_arrays()
        T = int(stream.batch_clock.max()) + 1 if stream.num_batches else 0
    else:
        if not tokens or tokens < 1:
            raise ExecutorError("give the number of tokens to run with the router's own routing")
        arrays, T = None, int(tokens)
    limit = int(_config_value(text_config(hf.model), "max_position_embeddings", default=T))
    if T > limit:
        raise ExecutorError(f"{T} tokens exceed the model's {limit} positions; run fewer (--tokens)")
    ids = token_ids(hf, T, settings.seed)
    if not hf.offloaded:  # warm the kernels up while the experts are still in memory
        forward_tokens(hf, ids[:, :2])
    offload(hf, store)
    policy, prefetcher = _policy(spec, settings, stream)
    all_keys = np.arange(spec.layers * spec.num_experts)
    store.drop_cache(all_keys.tolist())
    preallocate_buffers(spec, store, policy, settings, hf.payload_bytes, 0)
    rec = _empty_record(T, spec.layers, spec.top_k, spec.hidden)
    t_origin = time.perf_counter()
    pool = IOPool(store.read, settings.io_threads, clock=lambda: time.perf_counter() - t_origin)
    drv = Driver(hf, store, stream, arrays, rec, policy, prefetcher, pool)
    handles, originals = [], []
    for layer in hf.layers:
        originals.append(layer.block.experts)
        layer.block.experts = offloaded_experts(drv, layer)
        handles.append(layer.decoder.register_forward_pre_hook(
            lambda _m, _a, lay=layer: drv.layer_start(lay)))
        handles.append(layer.decoder.register_forward_hook(
            lambda _m, _a, _o, lay=layer: drv.layer_end(lay)))
    starts = np.zeros(T)

    def on_token(t, what):
        if what == "start":
            drv.t = t
            starts[t] = time.perf_counter()
        else:
            rec.t_step_s[t] = time.perf_counter() - starts[t]

    try:
        logits = forward_tokens(hf, ids, on_token)
    finally:
        pool.close()
        for hnd in handles:
            hnd.remove()
        for layer, orig in zip(hf.layers, originals, strict=True):
            layer.block.experts = orig
    width = min(spec.hidden, logits.shape[1])
    rec.outputs[:, :width] = logits[:, :width].numpy()  # the run's own output, for checks
    return finish_record(rec, pool, policy, store, 0)


def capture_hf(model, settings, store_root, *, trace=None, tokens: int | None = None,
               overrides: dict | None = None):
    """Run ``model`` (an HFModel, or a source for ``load_hf``) and return the run file's Trace
    (write it with ``.write(path)``)."""
    from moesim.executor.runfile import to_trace

    hf = model if isinstance(model, HFModel) else load_hf(model, settings.seed, overrides)
    hf.info["run_dtype"] = hf.spec.dtype
    store = store_for_hf(store_root, hf, settings.cold, settings.read_gbps)
    rec = run_hf(hf, store, settings, trace=trace, tokens=tokens)
    extra = {"hf_model": hf.info}
    if trace is not None:
        arr = trace.to_arrays()
        return to_trace(rec, hf.spec, settings, source_trace=trace, seq_lens=arr["seq_lens"],
                        phase=arr["phase"], routing="forced", expert_bytes=hf.payload_bytes,
                        extra_capture=extra)
    return to_trace(rec, hf.spec, settings, routing="own", expert_bytes=hf.payload_bytes,
                    extra_capture=extra)
