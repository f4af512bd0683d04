"""The offloading executor: run MoE layers token by token with experts behind a cache.

Per (token, layer) -- one batch of the simulator's token accounting, in the same order of
calls as ``moesim.offload.simulate``:

1. the prefetcher (if any) proposes the next batch's keys; the policy admits them and their
   reads are queued at low priority;
2. the resident dense part runs (norm, router, shared experts);
3. the policy object -- the very class the simulator replays -- looks the batch's experts up,
   admits and evicts; misses are queued as demand reads to the I/O threads;
4. resident experts compute at once (slot order), missing ones as their reads complete.

CPU mode reads safetensors files from disk into a RAM cache (O_DIRECT or dropped pages);
CUDA mode keeps every expert in pinned host memory and a GPU cache, copying on its own stream
overlapped with compute and timing with CUDA events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moesim.cache import BatchInfo, make_layout, make_policy
from moesim.executor.stack import DenseLayer, StackSpec, expert_tensors, swiglu, token_input
from moesim.executor.store import ExecutorError, ExpertStore


@dataclass
class RunSettings:
    policy: str = "lru"
    policy_params: dict = field(default_factory=dict)
    capacity_experts: float | None = None
    capacity_bytes: float | None = None
    scope: str = "global"
    prefetcher: str = "none"
    prefetch_params: dict = field(default_factory=dict)
    io_threads: int = 2
    compute_threads: int = 1
    device: str = "cpu"
    cold: str = "direct"
    read_gbps: float | None = None  # emulated storage bandwidth (store.ReadLimiter); None: the disk's
    seed: int = 0
    warmup_tokens: int = 0  # the run's first tokens: a calibration phase validate excludes

    def __post_init__(self):
        if self.warmup_tokens < 0:
            raise ExecutorError("--warmup-tokens must be at least 0")
        if self.io_threads < 1:
            raise ExecutorError("--io-threads must be at least 1")
        if self.read_gbps is not None and not self.read_gbps > 0:
            raise ExecutorError(f"--read-gbps {self.read_gbps}: the emulated read bandwidth must be "
                                "positive (omit it to read at the disk's own speed)")
        if self.device not in ("cpu", "cuda"):
            raise ExecutorError(f"unknown device {self.device!r}; choose cpu or cuda")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunRecord:
    """What a run measured, token-major ``[T, L, K]`` / ``[T, L]`` / ``[T]`` arrays."""

    experts: np.ndarray
    weights: np.ndarray
    residency: np.ndarray  # 0 miss, 1 hit, 2 hit on a prefetched key; -1 dropped
    read_bytes: np.ndarray  # payload bytes of the slot's demand read (0 on a hit)
    read_s: np.ndarray  # duration of that read (NaN on a hit)
    t_dense_s: np.ndarray
    t_expert_s: np.ndarray
    t_wait_s: np.ndarray
    t_layer_s: np.ndarray
    t_step_s: np.ndarray
    outputs: np.ndarray  # [T, H] float32 hidden state after the last layer (not in the file)
    prefetch_bytes: np.ndarray  # [T, L] payload bytes of speculative reads issued in the batch
    transfers: list  # every read: key, priority, payload/file bytes, issued/start/end seconds
    stats: dict
    cold_mode: str
    file_header_bytes: int


# ----- routing ------------------------------------------------------------------------------------
def forced_stream(trace, spec: StackSpec):
    """The token-accounting access stream of a routing trace, with the stack's expert bytes."""
    from moesim.replay import AccessStream

    m = trace.meta
    if m.num_layers != spec.layers:
        raise ExecutorError(f"the routing has {m.num_layers} MoE layers, the stack {spec.layers}")
    if m.num_experts > spec.num_experts or m.top_k != spec.top_k:
        raise ExecutorError(f"routing with {m.num_experts} experts top-{m.top_k} does not fit a "
                            f"stack of {spec.num_experts} experts top-{spec.top_k}")
    return AccessStream.from_trace(trace, "token", expert_bytes=spec.expert_payload_bytes())


def _row_info(spec: StackSpec, layer: int, ids, weights, token: int):
    """Keys and BatchInfo of one (token, layer) exactly as the replay builds them."""
    from moesim.replay import AccessStream

    one = AccessStream.from_rows(spec.layers, spec.num_experts, [0], [token], [token], [0],
                                 [layer], np.asarray(ids).reshape(1, -1),
                                 np.asarray(weights, dtype=np.float64).reshape(1, -1), "token",
                                 np.full(spec.layers, spec.expert_payload_bytes()))
    return one.keys.tolist(), one.weight.tolist(), one.unimportance.tolist()


# ----- store ---------------------------------------------------------------------------------------
def ensure_store(spec: StackSpec, store: ExpertStore, keys) -> int:
    """Write the files of ``keys`` that the store lacks; return how many were written."""
    written = 0
    for key in sorted(set(int(k) for k in keys)):
        if not store.has(key):
            store.write(key, expert_tensors(spec, key))
            written += 1
    return written


def header_bytes(store: ExpertStore, key: int) -> int:
    import struct

    with open(store.path(key), "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# ----- the run -------------------------------------------------------------------------------------
def run(spec: StackSpec, store: ExpertStore, settings: RunSettings, *, trace=None,
        tokens: int | None = None) -> RunRecord:
    """Run ``tokens`` tokens (forced routing from ``trace``, else the router's own choice)."""
    import torch

    if settings.device == "cuda":
        from moesim.executor.cuda import run_cuda

        return run_cuda(spec, store, settings, trace=trace)
    torch.set_num_threads(int(settings.compute_threads))
    stream = forced_stream(trace, spec) if trace is not None else None
    if stream is not None:
        arrays = trace.to_arrays()
        T = int(stream.batch_clock.max()) + 1 if stream.num_batches else 0
        if tokens is not None and tokens < T:
            raise ExecutorError("select the tokens on the trace before running")
        all_keys = stream.keys
    else:
        if not tokens or tokens < 1:
            raise ExecutorError("give the number of tokens to run with the router's own routing")
        T, arrays = int(tokens), None
        all_keys = np.arange(spec.layers * spec.num_experts)
    policy, prefetcher = _policy(spec, settings, stream)
    ensure_store(spec, store, all_keys)
    store.drop_cache(np.unique(all_keys).tolist())
    from moesim.executor.io import IOPool

    _prepare(spec, store, policy, settings, int(all_keys[0]))

    L, K = spec.layers, spec.top_k
    rec = _empty_record(T, L, K, spec.hidden)
    clock = time.perf_counter
    t_origin = clock()
    pool = IOPool(store.read, settings.io_threads, clock=lambda: clock() - t_origin)
    dense = [DenseLayer(spec, layer) for layer in range(L)]
    ram: dict[int, dict] = {}
    loading: dict[int, object] = {}
    info = BatchInfo()
    b = 0
    try:
        with torch.inference_mode():
            for t in range(T):
                x = token_input(spec, t)
                tok_start = clock()
                for layer in range(L):
                    t0 = clock()
                    if stream is not None:
                        lo, hi = int(stream.batch_ptr[b]), int(stream.batch_ptr[b + 1])
                        keys = stream.keys[lo:hi].tolist()
                        if prefetcher is not None:
                            want = prefetcher.predict(b + 1) if b + 1 < stream.num_batches else []
                            for k in policy.prefetch(want, b, protect=keys):
                                _issue(pool, loading, k, 1)
                                rec.prefetch_bytes[t, layer] += spec.expert_payload_bytes()
                    h, ids, w, out = dense[layer].forward(x)
                    keys, ids_row, w_row = batch_lookup(spec, stream, arrays, info, b, t, layer,
                                                        ids[0].numpy(), w[0].numpy())
                    t1 = clock()
                    pre = [policy.resident.get(k) == 1 for k in keys]
                    hits = policy.lookup(keys, b, info, per_access=True)
                    _sync(policy, ram, loading, store)
                    t_exp, t_wait = _experts(pool, ram, loading, keys, hits, pre, h, w_row,
                                             out, rec, t, layer, clock, store)
                    if prefetcher is not None:
                        prefetcher.observe(b, keys, hits)
                    rec.experts[t, layer] = ids_row
                    rec.weights[t, layer] = w_row
                    rec.t_dense_s[t, layer] = t1 - t0
                    rec.t_expert_s[t, layer] = t_exp
                    rec.t_wait_s[t, layer] = t_wait
                    rec.t_layer_s[t, layer] = clock() - t0
                    x = out
                    b += 1
                rec.t_step_s[t] = clock() - tok_start
                rec.outputs[t] = x[0].float().numpy()
    finally:
        pool.close()
    return finish_record(rec, pool, policy, store, int(all_keys[0]) if len(all_keys) else None)


def batch_lookup(spec, stream, arrays, info, b: int, t: int, layer: int, own_ids, own_w):
    """Keys, expert ids and gate weights of batch ``b`` (token ``t``, ``layer``), with ``info``
    filled as the replay fills it: from the forced routing, or from the router's ``own_ids``,
    ``own_w`` when the routing is the model's own."""
    if stream is not None:
        lo, hi = int(stream.batch_ptr[b]), int(stream.batch_ptr[b + 1])
        keys = stream.keys[lo:hi].tolist()
        ids_row = arrays["experts"][t, layer].astype(np.int64)
        w_row = arrays["weights"][t, layer]
        info.weight = stream.weight[lo:hi].tolist()
        info.unimportance = stream.unimportance[lo:hi].tolist()
        info.count = stream.count[lo:hi].tolist()
        info.first, info.request = lo, int(stream.batch_request[b])
        info.phase = int(stream.batch_phase[b])
    else:
        ids_row, w_row = np.asarray(own_ids).astype(np.int64), np.asarray(own_w)
        keys, info.weight, info.unimportance = _row_info(spec, layer, ids_row, w_row, t)
        info.count, info.first, info.phase = [1] * spec.top_k, b * spec.top_k, 0
    info.layer, info.clock = layer, t
    return keys, ids_row, w_row


def finish_record(rec: RunRecord, pool, policy, store: ExpertStore, first_key) -> RunRecord:
    """What the run leaves besides its per-token arrays: transfers, policy counters, the cold
    read mode, the emulated device's counters and the store files' header size."""
    rec.transfers = [_transfer_row(tr) for tr in pool.log]
    rec.stats = policy.stats.to_dict()
    rec.cold_mode = store.mode
    if store.limiter is not None:
        rec.stats["emulated_read"] = {"gbps": store.limiter.bytes_per_s / 1e9,
                                      "reads": store.limiter.reads,
                                      "reads_slower_than_emulated": store.limiter.slow_reads}
    rec.file_header_bytes = header_bytes(store, first_key) if first_key is not None else 0
    return rec


def preallocate_buffers(spec, store, policy, settings, payload: int, key: int) -> None:
    """Fault in read buffers for what the cache can hold, the reads in flight and a batch's
    misses (files the size of ``key``'s), before the clock starts."""
    slots = policy.layout.capacity if policy.layout.unit == "experts" else (
        policy.layout.capacity // max(payload, 1))
    slots = min(int(slots), spec.layers * spec.num_experts)
    store.preallocate(slots + settings.io_threads + 2 * spec.top_k,
                      store.path(key).stat().st_size)


def _prepare(spec, store, policy, settings, key) -> None:
    """Allocate the cache's buffers and warm the kernels up before the clock starts."""
    import torch

    preallocate_buffers(spec, store, policy, settings, spec.expert_payload_bytes(), key)
    x = token_input(spec, -1)
    e = expert_tensors(spec, 0)
    with torch.inference_mode():
        for _ in range(3):
            DenseLayer(spec, 0).forward(x)
            swiglu(x, e["w_gate"], e["w_up"], e["w_down"])


def _policy(spec, settings, stream):
    from moesim.prefetch import make_prefetcher

    layout = make_layout(spec.layers, spec.num_experts, spec.expert_payload_bytes(),
                         capacity_bytes=settings.capacity_bytes,
                         capacity_experts=settings.capacity_experts, scope=settings.scope)
    policy = make_policy(settings.policy, layout, seed=settings.seed, **settings.policy_params)
    prefetcher = None
    if settings.prefetcher not in ("", "none"):
        prefetcher = make_prefetcher(settings.prefetcher, seed=settings.seed,
                                     **settings.prefetch_params)
    if stream is None and (policy.oracle or policy.profiled or prefetcher is not None):
        raise ExecutorError(f"policy {settings.policy!r} / prefetcher {settings.prefetcher!r} "
                            "needs the routing in advance: force it from a trace (--trace)")
    if stream is not None:
        if policy.oracle or policy.profiled:
            policy.bind(stream)
        if prefetcher is not None:
            prefetcher.bind(stream, policy)
    return policy, prefetcher


def _sync(policy, ram, loading, store) -> None:
    """Drop what the policy evicted (a read in flight for it is discarded when it lands) and
    hand the buffers back to the store for the next reads."""
    res = policy.resident
    for k in [k for k in ram if k not in res]:
        store.release(ram.pop(k))
    for k in [k for k, tr in loading.items() if k not in res and tr.done.is_set()]:
        tr = loading.pop(k)
        if tr.result is not None and all(tr.result is not r for r in ram.values()):
            store.release(tr.result)


def stack_kernel(tensors, h):
    """The synthetic stack's routed expert on ``h`` (unweighted)."""
    return swiglu(h, *_mats(tensors))


def _experts(pool, ram, loading, keys, hits, pre, h, w_row, out, rec, t, layer, clock, store,
             kernel=stack_kernel):
    """Compute the batch's experts: resident ones first, then reads in completion order;
    ``kernel(tensors, h)`` runs one expert from its loaded tensors."""
    compute = 0.0
    wait = 0.0
    waiting = []
    # every demand read is queued before any compute, as the simulator issues its loads
    for slot, (k, hit) in enumerate(zip(keys, hits, strict=True)):
        if hit is None:
            rec.residency[t, layer, slot] = -1
            continue
        rec.residency[t, layer, slot] = 0 if hit is False else (2 if pre[slot] else 1)
        if hit is False:
            # a miss is a read, even if the key was evicted and re-admitted by this very batch
            old = ram.pop(k, None)
            if old is not None:
                store.release(old)
            _issue(pool, loading, k, 0)
    for slot, (k, hit) in enumerate(zip(keys, hits, strict=True)):
        if hit is None:
            continue
        if k in ram:
            c0 = clock()
            out += float(w_row[slot]) * kernel(ram[k].tensors, h)
            compute += clock() - c0
        else:
            waiting.append((slot, k, loading[k]))
    while waiting:
        w0 = clock()
        i = _first_done(waiting)
        wait += clock() - w0
        slot, k, tr = waiting.pop(i)
        if tr.error is not None:
            raise tr.error
        if hits[slot] is False:
            rec.read_bytes[t, layer, slot] = tr.payload_bytes
            rec.read_s[t, layer, slot] = tr.duration_s
        ram[k] = tr.result
        loading.pop(k, None)
        c0 = clock()
        out += float(w_row[slot]) * kernel(ram[k].tensors, h)
        compute += clock() - c0
    return compute, wait


def _issue(pool, loading, key, priority) -> None:
    """Read an admitted key. Every admission is a read of its own, as in the simulator: a read
    still in flight for the key (an evicted prefetch) is kept aside and freed when it lands."""
    stale = loading.pop(key, None)
    if stale is not None:
        loading[(key, id(stale))] = stale
    loading[key] = pool.submit(key, priority, fresh=True)


def _first_done(waiting) -> int:
    """Index of the first entry whose read has finished, blocking until one has."""
    while True:
        for i, (_, _, tr) in enumerate(waiting):
            if tr.done.is_set():
                return i
        waiting[0][2].done.wait(0.0005)


def _mats(tensors):
    return tensors["w_gate"], tensors["w_up"], tensors["w_down"]


def _transfer_row(tr) -> dict:
    return {"key": tr.key, "priority": tr.priority, "payload_bytes": tr.payload_bytes,
            "file_bytes": tr.file_bytes, "issued_s": tr.issued_s, "start_s": tr.start_s,
            "end_s": tr.end_s, "thread": tr.thread}


def _empty_record(T, L, K, H) -> RunRecord:
    return RunRecord(
        experts=np.full((T, L, K), -1, np.int16), weights=np.zeros((T, L, K), np.float32),
        residency=np.full((T, L, K), -1, np.int8), read_bytes=np.zeros((T, L, K), np.int64),
        read_s=np.full((T, L, K), np.nan), t_dense_s=np.zeros((T, L)),
        t_expert_s=np.zeros((T, L)), t_wait_s=np.zeros((T, L)), t_layer_s=np.zeros((T, L)),
        t_step_s=np.zeros(T), outputs=np.zeros((T, H), np.float32), prefetch_bytes=np.zeros((T, L), np.int64), transfers=[],
        stats={}, cold_mode="", file_header_bytes=0)


def routing_slice(trace, layers: int, tokens: int, first_layer: int = 0, first_token: int = 0):
    """The routing a run forces: ``layers`` MoE layers from ``first_layer`` and ``tokens``
    tokens from ``first_token`` (in execution order), as a new in-memory trace."""
    from dataclasses import replace

    from moesim.traces.trace import Trace

    m = trace.meta
    if trace.is_counts:
        raise ExecutorError("a counts trace has no per-token routing to force")
    if first_layer + layers > m.num_layers:
        raise ExecutorError(f"the trace has {m.num_layers} MoE layers; cannot take {layers} "
                            f"from layer {first_layer}")
    arr = trace.to_arrays()
    T = len(arr["phase"])
    if tokens < 1 or first_token + tokens > T:
        raise ExecutorError(f"the trace has {T} tokens; cannot take {tokens} from {first_token}")
    sl = slice(first_token, first_token + tokens)
    ex = arr["experts"][sl, first_layer:first_layer + layers]
    if (ex < 0).any():
        raise ExecutorError("the selected tokens skip some layers; choose other layers or tokens")
    req = arr["request_id"][sl]
    bounds = np.flatnonzero(np.r_[True, req[1:] != req[:-1], True])
    seq_lens = np.diff(bounds)
    eb = m.expert_bytes[first_layer:first_layer + layers] if m.expert_bytes else None
    meta = replace(m, num_layers=layers, expert_bytes=eb,
                   dense_bytes=m.dense_bytes[first_layer:first_layer + layers]
                   if m.dense_bytes else None,
                   extra={**m.extra, "run_slice": {"first_layer": first_layer, "layers": layers,
                                                   "first_token": first_token,
                                                   "tokens": tokens}})
    return Trace.from_arrays(ex, arr["weights"][sl, first_layer:first_layer + layers], seq_lens,
                             arr["phase"][sl], meta)
