"""A SimPy model of one device running an MoE with offloaded experts.

Per (token, layer) batch of the stream: the dense part computes, the gate picks the experts,
the cache policy (the same objects the replay uses) says which are resident; missing experts
load through ``channels`` parallel I/O slots (flash threads, or a PCIe copy engine) while the
resident ones compute; a prefetcher's loads for the next batch are issued as the current batch
starts, overlapping its compute. With ``preempt=True`` (ProMoE) demand loads pre-empt
speculative ones; otherwise they queue first-come first-served at a lower priority. A hybrid
scheduler (``moesim.schedule``) may run missing experts on the CPU instead of loading them.
With ``disk`` (``moesim.storage.SharedDisk``) the channels are threads reading one disk whose
bandwidth they share; ``layer_overhead_s`` is a fixed cost per batch (an engine's bookkeeping:
lookup, queueing). The result is one row per token: latency, stall, bytes read; with
``record=True`` also every lookup's outcome and every load (``df.attrs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.cache import BatchInfo
from moesim.errors import MoesimError


@dataclass(frozen=True)
class OffloadConfig:
    dense_s: float  # non-expert compute of one layer for one batch, seconds
    expert_s: float  # one expert's compute for one token on the accelerator, seconds
    load_s: object  # callable(nbytes) -> seconds for one expert load on one channel
    channels: int = 1
    preempt: bool = False
    scheduler: str | None = None  # moesim.schedule name: CPU may compute misses
    costs: object = None  # moesim.schedule.HybridCosts when scheduler is set
    layer_overhead_s: float = 0.0  # fixed seconds per batch besides dense and expert compute
    disk: object = None  # moesim.storage.SharedDisk: loads share its bandwidth (load_s unused)

    def __post_init__(self):
        if self.dense_s < 0 or self.expert_s < 0 or self.channels < 1 or self.layer_overhead_s < 0:
            raise MoesimError("offload config needs non-negative times and at least one I/O channel")
        if self.disk is not None and self.preempt:
            raise MoesimError("a shared disk does not model pre-empted loads; use preempt=False")
        if self.scheduler and self.costs is None:
            raise MoesimError("a hybrid scheduler needs HybridCosts (moesim.schedule)")


def simulate(stream, policy, config: OffloadConfig, prefetcher=None, max_batches: int | None = None,
             record: bool = False):
    """Run the stream through the device model; return a pandas DataFrame, one row per token.

    ``record=True`` adds ``df.attrs["lookups"]`` (per looked-up key in stream order: ``hit``
    0 miss, 1 hit, 2 hit on a key a prefetch admitted, -1 dropped; ``miss_bytes``) and
    ``df.attrs["loads"]`` (per load performed: ``key``, ``bytes``, ``priority``, ``start_s``,
    ``end_s``), the sequences a real run is checked against."""
    import pandas as pd
    import simpy

    from moesim.schedule import plan_layer

    if (policy.oracle or policy.profiled) and policy.stream is not stream:
        policy.bind(stream)
    if prefetcher is not None:
        prefetcher.bind(stream, policy)
    env = simpy.Environment()
    io = simpy.PreemptiveResource(env, capacity=config.channels) if config.preempt else \
        simpy.PriorityResource(env, capacity=config.channels)
    gpu = simpy.Resource(env, capacity=1)
    cpu = simpy.Resource(env, capacity=1)
    per_access = stream.accounting == "token"
    inflight: dict[int, simpy.Event] = {}
    kbytes = stream.key_bytes
    nb = stream.num_batches if max_batches is None else min(max_batches, stream.num_batches)
    tok_rows: dict[int, dict] = {}
    hit_codes: list[int] = []
    miss_bytes: list[int] = []
    loads: list[tuple] = []
    share = None
    if config.disk is not None:
        from moesim.storage import FairShare

        share = FairShare(env, config.disk)

    def load(key, prio, fresh=False):
        # every admission is a read of its own (``fresh``): a key evicted while its prefetch
        # was in flight and admitted again is read again, however the timing falls
        done = inflight.get(key)
        if done is not None and not fresh:
            return done
        done = env.event()
        inflight[key] = done

        def run():
            t_issue = env.now
            if share is not None:
                with io.request(priority=prio) as req:
                    yield req
                    t_start = env.now
                    yield env.timeout(config.disk.latency)
                    yield share.transfer(config.disk.disk_bytes(float(kbytes[key])))
                if inflight.get(key) is done:
                    del inflight[key]
                if record:
                    loads.append((key, int(kbytes[key]), prio, t_issue, t_start, env.now))
                done.succeed()
                return
            remaining = config.load_s(float(kbytes[key]))
            t_start = None
            while remaining > 1e-15:
                with io.request(priority=prio, **({"preempt": prio == 0} if config.preempt else {})) as req:
                    yield req
                    start = env.now
                    t_start = start if t_start is None else t_start
                    try:
                        yield env.timeout(remaining)
                        remaining = 0.0
                    except simpy.Interrupt:
                        remaining -= env.now - start  # resume the rest after the demand load
            if inflight.get(key) is done:
                del inflight[key]
            if record:
                loads.append((key, int(kbytes[key]), prio, t_issue,
                              env.now if t_start is None else t_start, env.now))
            done.succeed()

        env.process(run())
        return done

    def compute(res, seconds):
        with res.request() as req:
            yield req
            yield env.timeout(seconds)

    def run_all():
        info = BatchInfo()
        ptr = stream.batch_ptr
        for b in range(nb):
            lo, hi = int(ptr[b]), int(ptr[b + 1])
            keys = stream.keys[lo:hi].tolist()
            clock = int(stream.batch_clock[b])
            row = tok_rows.setdefault(clock, {"token": clock, "phase": int(stream.batch_phase[b]),
                                              "start_s": env.now, "stall_s": 0.0, "bytes_read": 0,
                                              "misses": 0, "cpu_experts": 0})
            if prefetcher is not None:
                want = prefetcher.predict(b + 1) if b + 1 < nb else []
                for k in policy.prefetch(want, b, protect=keys):
                    load(k, 1, fresh=True)
            yield env.timeout(config.dense_s + config.layer_overhead_s)
            info.layer, info.phase, info.request, info.clock, info.first = (
                int(stream.batch_layer[b]), row["phase"], int(stream.batch_request[b]), clock, lo)
            info.weight = stream.weight[lo:hi].tolist()
            info.unimportance = stream.unimportance[lo:hi].tolist()
            info.count = stream.count[lo:hi].tolist()
            b0 = policy.stats.bytes_read
            if record:
                pre = [policy.resident.get(k) == 1 for k in keys]
            out = policy.lookup(keys, b, info, per_access=per_access)
            if record:
                for k, h, p in zip(keys, out, pre, strict=True):
                    hit_codes.append(-1 if h is None else (0 if h is False else (2 if p else 1)))
                    miss_bytes.append(int(kbytes[k]) if h is False else 0)
            row["bytes_read"] += policy.stats.bytes_read - b0
            counts = dict(zip(keys, stream.count[lo:hi].tolist(), strict=False))
            missing = [k for k, h in zip(keys, out, strict=False) if h is False]
            row["misses"] += len(missing)
            on_cpu: list[int] = []
            if config.scheduler and missing:
                resident = [k for k, h in zip(keys, out, strict=False) if h]
                plan = plan_layer(config.scheduler, {k: counts[k] for k in keys if k in counts}, resident, config.costs)
                on_cpu = plan.cpu
            waits = []
            t_gate = env.now
            gpu_busy = 0.0
            for k, h in zip(keys, out, strict=False):
                if h is None:
                    continue
                if k in on_cpu:
                    waits.append(env.process(compute(cpu, config.costs.cpu(counts[k]))))
                    continue
                ready = load(k, 0, fresh=True) if h is False else inflight.get(k)
                gpu_busy += config.expert_s * counts[k]
                waits.append(env.process(_expert(env, gpu, ready, config.expert_s * counts[k])))
            row["cpu_experts"] += len(on_cpu)
            if waits:
                yield simpy.AllOf(env, waits)
            # stall: the part of the layer's expert phase the GPU spent waiting for weights
            row["stall_s"] += max(0.0, env.now - t_gate - gpu_busy)
            if prefetcher is not None:
                prefetcher.observe(b, keys, out)
            row["end_s"] = env.now

    env.process(run_all())
    env.run()
    df = pd.DataFrame(list(tok_rows.values()))
    if len(df):
        df["latency_s"] = df["end_s"] - df["start_s"]
    if record:
        cols = ("key", "bytes", "priority", "issued_s", "start_s", "end_s")
        df.attrs["lookups"] = {"hit": np.asarray(hit_codes, np.int8),
                               "miss_bytes": np.asarray(miss_bytes, np.int64)}
        df.attrs["loads"] = {c: np.asarray([r[i] for r in loads]) for i, c in enumerate(cols)}
    return df


def _expert(env, gpu, ready, seconds):
    if ready is not None and not ready.triggered:
        yield ready
    with gpu.request() as req:
        yield req
        yield env.timeout(seconds)


def summarize(df) -> dict:
    """Mean per-token latency and stall, split by phase (seconds)."""
    out = {"tokens": int(len(df)), "latency_s_mean": float(df["latency_s"].mean()) if len(df) else float("nan"),
           "stall_s_mean": float(df["stall_s"].mean()) if len(df) else float("nan")}
    dec = df[df["phase"] == 1] if len(df) else df
    out["decode_latency_s_mean"] = float(dec["latency_s"].mean()) if len(dec) else float("nan")
    out["bytes_read"] = int(np.sum(df["bytes_read"])) if len(df) else 0
    return out
