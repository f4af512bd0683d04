"""CUDA mode of the executor: experts in pinned host memory, a GPU expert cache, host-to-device
copies on their own streams overlapped with compute, CUDA events for every timing.

The same per-batch protocol as the CPU mode (``moesim.executor.runner``): prefetch loads are
issued on a low-priority copy stream at the start of a batch, demand misses on a high-priority
one; the compute stream runs the dense part, then resident experts, then each missing expert
after waiting on its copy's event. A token ends with a synchronisation (batch-1 decoding needs
its output), which is when the events are read.

Status: written against the PyTorch CUDA API but NOT run on a GPU in this project's sessions;
the CPU mode is the validated path (see docs/validation.md).
"""

from __future__ import annotations

import numpy as np

from moesim.executor.runner import (
    RunSettings,
    _empty_record,
    _policy,
    ensure_store,
    forced_stream,
    header_bytes,
)
from moesim.executor.stack import DenseLayer, StackSpec, swiglu, token_input
from moesim.executor.store import ExecutorError, ExpertStore


def run_cuda(spec: StackSpec, store: ExpertStore, settings: RunSettings, *, trace=None):
    import torch

    if not torch.cuda.is_available():
        raise ExecutorError("--device cuda: no CUDA device is visible to PyTorch")
    if trace is None:
        raise ExecutorError("CUDA mode runs forced routing: give --trace")
    dev = torch.device("cuda")
    stream = forced_stream(trace, spec)
    arrays = trace.to_arrays()
    T = int(stream.batch_clock.max()) + 1
    L, K = spec.layers, spec.top_k
    policy, prefetcher = _policy(spec, settings, stream)
    keys_all = np.unique(stream.keys).tolist()
    ensure_store(spec, store, keys_all)
    # host tier: every routed expert once in pinned memory (what a miss copies from)
    host = {k: {n: t.pin_memory() for n, t in store.read(k).tensors.items()} for k in keys_all}
    dense = [DenseLayer(spec, layer, device=dev) for layer in range(L)]
    comp = torch.cuda.current_stream()
    copy_hi = torch.cuda.Stream(priority=-1)  # demand misses
    copy_lo = torch.cuda.Stream(priority=0)  # speculative loads
    gpu: dict[int, tuple[dict, object]] = {}  # key -> (device tensors, copy-done event)
    transfers = []  # (key, priority, bytes, start event, end event)
    rec = _empty_record(T, L, K, spec.hidden)
    payload = spec.expert_payload_bytes()

    def ev():
        return torch.cuda.Event(enable_timing=True)

    def load(key, prio):
        if key in gpu:
            return
        s = copy_hi if prio == 0 else copy_lo
        start, end = ev(), ev()
        with torch.cuda.stream(s):
            start.record(s)
            tensors = {n: t.to(dev, non_blocking=True) for n, t in host[key].items()}
            end.record(s)
        for t in tensors.values():
            t.record_stream(comp)  # freed only after the compute stream used it
        gpu[key] = (tensors, end)
        transfers.append((key, prio, payload, start, end))

    b = 0
    origin = ev()
    origin.record(comp)
    marks = []  # per token: [(layer start, dense end, layer end)] events
    with torch.inference_mode():
        for t in range(T):
            x = token_input(spec, t, device=dev)
            layer_marks = []
            for layer in range(L):
                e0, e1, e2 = ev(), ev(), ev()
                e0.record(comp)
                lo, hi = int(stream.batch_ptr[b]), int(stream.batch_ptr[b + 1])
                keys = stream.keys[lo:hi].tolist()
                if prefetcher is not None:
                    want = prefetcher.predict(b + 1) if b + 1 < stream.num_batches else []
                    for k in policy.prefetch(want, b, protect=keys):
                        load(k, 1)
                        rec.prefetch_bytes[t, layer] += payload
                h, _, _, out = dense[layer].forward(x)
                e1.record(comp)
                from moesim.cache import BatchInfo

                info = BatchInfo(layer=layer, phase=int(stream.batch_phase[b]),
                                 request=int(stream.batch_request[b]), clock=t, first=lo,
                                 weight=stream.weight[lo:hi].tolist(),
                                 unimportance=stream.unimportance[lo:hi].tolist(),
                                 count=stream.count[lo:hi].tolist())
                pre = [policy.resident.get(k) == 1 for k in keys]
                hits = policy.lookup(keys, b, info, per_access=True)
                for k in [k for k in gpu if k not in policy.resident]:
                    del gpu[k]
                w_row = arrays["weights"][t, layer]
                order = sorted(range(len(keys)), key=lambda s: hits[s] is False)  # hits first
                for slot in order:
                    k, hit = keys[slot], hits[slot]
                    if hit is None:
                        continue
                    rec.residency[t, layer, slot] = 0 if hit is False else (2 if pre[slot] else 1)
                    if hit is False:
                        load(k, 0)
                        rec.read_bytes[t, layer, slot] = payload
                    tensors, ready = gpu[k]
                    comp.wait_event(ready)
                    out += float(w_row[slot]) * swiglu(h, tensors["w_gate"], tensors["w_up"],
                                                       tensors["w_down"])
                if prefetcher is not None:
                    prefetcher.observe(b, keys, hits)
                e2.record(comp)
                layer_marks.append((e0, e1, e2))
                rec.experts[t, layer] = arrays["experts"][t, layer]
                rec.weights[t, layer] = w_row
                x = out
                b += 1
            torch.cuda.synchronize()
            marks.append(layer_marks)
            for layer, (e0, e1, e2) in enumerate(layer_marks):
                rec.t_dense_s[t, layer] = e0.elapsed_time(e1) / 1e3
                rec.t_layer_s[t, layer] = e0.elapsed_time(e2) / 1e3
                rec.t_expert_s[t, layer] = e1.elapsed_time(e2) / 1e3  # includes copy waits
                rec.t_wait_s[t, layer] = np.nan  # not separable from kernels on one stream
            rec.t_step_s[t] = layer_marks[0][0].elapsed_time(layer_marks[-1][2]) / 1e3
            rec.outputs[t] = x[0].float().cpu().numpy()
    torch.cuda.synchronize()
    rec.transfers = [{"key": k, "priority": p, "payload_bytes": n, "file_bytes": n,
                      "issued_s": origin.elapsed_time(s) / 1e3,
                      "start_s": origin.elapsed_time(s) / 1e3,
                      "end_s": origin.elapsed_time(e) / 1e3, "thread": p}
                     for k, p, n, s, e in transfers]
    by_slot = {}
    for tr in rec.transfers:
        by_slot.setdefault(tr["key"], []).append(tr)
    # demand copies' durations, slot by slot in issue order
    for t in range(T):
        for layer in range(L):
            for slot in range(K):
                if rec.residency[t, layer, slot] == 0:
                    key = layer * spec.num_experts + int(rec.experts[t, layer, slot])
                    trs = [x for x in by_slot.get(key, []) if x["priority"] == 0]
                    if trs:
                        tr = trs.pop(0)
                        by_slot[key].remove(tr)
                        rec.read_s[t, layer, slot] = tr["end_s"] - tr["start_s"]
    rec.stats = policy.stats.to_dict()
    rec.cold_mode = "pinned-host"
    rec.file_header_bytes = header_bytes(store, keys_all[0])
    return rec
