"""A SimPy model of one device running an MoE with offloaded experts.

Per (token, layer) batch of the stream: the dense part computes, the gate picks the experts,
the cache policy (the same objects the replay uses) says which are resident; missing experts
load through ``channels`` parallel I/O slots (flash threads, or a PCIe copy engine) while the
resident ones compute; a prefetcher's loads for the next batch are issued as the current batch
starts, overlapping its compute. With ``preempt=True`` (ProMoE) demand loads pre-empt
speculative ones; otherwise they queue first-come first-served at a lower priority. A hybrid
scheduler (``moesim.schedule``) may run missing experts on the CPU instead of loading them.
The result is one row per token: latency, stall, bytes read.
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

    def __post_init__(self):
        if self.dense_s < 0 or self.expert_s < 0 or self.channels < 1:
            raise MoesimError("offload config needs non-negative times and at least one I/O channel")
        if self.scheduler and self.costs is None:
            raise MoesimError("a hybrid scheduler needs HybridCosts (moesim.schedule)")


def simulate(stream, policy, config: OffloadConfig, prefetcher=None, max_batches: int | None = None):
    """Run the stream through the device model; return a pandas DataFrame, one row per token."""
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

    def load(key, prio):
        done = inflight.get(key)
        if done is not None:
            return done
        done = env.event()
        inflight[key] = done

        def run():
            remaining = config.load_s(float(kbytes[key]))
            while remaining > 1e-15:
                with io.request(priority=prio, **({"preempt": prio == 0} if config.preempt else {})) as req:
                    yield req
                    start = env.now
                    try:
                        yield env.timeout(remaining)
                        remaining = 0.0
                    except simpy.Interrupt:
                        remaining -= env.now - start  # resume the rest after the demand load
            inflight.pop(key, None)
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
                    load(k, 1)
            yield env.timeout(config.dense_s)
            info.layer, info.phase, info.request, info.clock, info.first = (
                int(stream.batch_layer[b]), row["phase"], int(stream.batch_request[b]), clock, lo)
            info.weight = stream.weight[lo:hi].tolist()
            info.unimportance = stream.unimportance[lo:hi].tolist()
            info.count = stream.count[lo:hi].tolist()
            b0 = policy.stats.bytes_read
            out = policy.lookup(keys, b, info, per_access=per_access)
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
                ready = load(k, 0) if h is False else inflight.get(k)
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
