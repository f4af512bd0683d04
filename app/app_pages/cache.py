"""Cache & offload: policies against capacity with Belady as the ceiling; per-token latency
split into compute, transfer and stall on an offloading device."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from moesim.app import charts
from moesim.app.state import (
    Progress,
    fingerprint,
    guarded,
    int_list,
    require_trace,
    show_error,
    trace_of,
)
from moesim.errors import MoesimError

st.title("Cache & offload")
name, path, trace = require_trace("the cache replay")
meta = trace.meta
if trace.is_counts:
    st.warning("This is a counts-only trace: cache replay needs per-token routing.")
    st.stop()


def policy_names() -> list[str]:
    from moesim.cache import policy_names as names

    return names()


def presets() -> list[str]:
    from moesim.model import PRESETS

    return list(PRESETS)


def storage_presets() -> list[str]:
    from moesim.storage import storage_names

    return storage_names()


@st.cache_resource(max_entries=8, show_spinner=False)
def access_stream(path: str, fp: tuple, accounting: str, expert_bytes: int | None):
    from moesim.replay import AccessStream

    return AccessStream.from_trace(trace_of(path), accounting, expert_bytes=expert_bytes)


@st.cache_data(max_entries=64, show_spinner=False)
def policy_point(path: str, fp: tuple, accounting: str, expert_bytes: int | None, policy: str,
                 capacity: int, scope: str, seed: int) -> dict:
    from moesim.replay import run_policy

    stream = access_stream(path, fp, accounting, expert_bytes)
    return run_policy(stream, policy, capacity_experts=capacity, scope=scope, seed=seed).summary()


@st.cache_data(max_entries=32, show_spinner=False)
def reference_curves(path: str, fp: tuple, accounting: str, expert_bytes: int | None,
                     capacities: tuple, scope: str) -> dict:
    from moesim.replay import belady_curve, lru_curve

    stream = access_stream(path, fp, accounting, expert_bytes)
    return {"lru": lru_curve(stream, capacities, scope).tolist(),
            "belady": belady_curve(stream, capacities, scope).tolist()}


def expert_bytes_for(model: str) -> int | None:
    if meta.expert_bytes is not None:
        return None  # the trace knows
    if not model:
        return None
    from moesim.model import get_model

    return int(get_model(model).expert_bytes())


# ----- policies against capacity --------------------------------------------------------------------
st.header("Policies against capacity")
st.write(f"Trace '{name}': {meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k}. "
         "Each policy is replayed at each capacity; LRU and Belady MIN (the offline optimum) are "
         "computed at the same capacities, and the gap a policy recovers is "
         "(policy - LRU) / (Belady - LRU).")
c1, c2, c3, c4 = st.columns(4)
all_policies = policy_names()
default = [p for p in ("lru", "lfu", "fifo") if p in all_policies]
policies = c1.multiselect("Policies", all_policies, default=default, key="cache_policies")
caps_text = c2.text_input("Capacities (experts per layer)", value=", ".join(
    str(c) for c in sorted({1, max(1, meta.top_k), 2 * meta.top_k, 4 * meta.top_k}) if c < meta.num_experts),
    key="cache_caps")
scope = c3.selectbox("Scope", ["global", "per-layer"], key="cache_scope",
                     help="global: one cache over all layers (capacity x layers experts); "
                          "per-layer: one cache of the capacity per layer.")
accounting = c4.selectbox("Accounting", ["token", "batch"], key="cache_accounting",
                          help="token: each (token, layer) looks its k experts up; batch: one "
                               "lookup per unique expert per (step, layer).")
seed = st.number_input("Seed (randomised policies)", 0, 2**31 - 1, 0, key="cache_seed")

if st.button("Compare policies", key="cache_run", type="primary"):
    try:
        per_layer = int_list(caps_text, "capacities")
        if not policies:
            raise MoesimError("choose at least one policy")
    except MoesimError as exc:
        show_error(exc)
        st.stop()
    # capacities are totals over all pools: per-layer scope splits them evenly
    totals = tuple(c * meta.num_layers for c in per_layer)
    fp = fingerprint(path)
    runs = len(policies) * len(totals) + 1
    bar = Progress("replaying")
    st.button("Stop", key="cache_stop", help="Stops the replay (any click interrupts a run).")
    rows = []
    try:
        bar.update(0, "LRU and Belady reference curves", force=True)
        ref = reference_curves(path, fp, accounting, None, totals, scope)
        done = 1
        for pol in policies:
            for c, total in zip(per_layer, totals, strict=True):
                bar.update(done / runs, f"{pol} at {c} experts per layer", force=True)
                r = policy_point(path, fp, accounting, None, pol, total, scope, int(seed))
                rows.append({"policy": pol, "capacity": c, "hit_rate": r["hit_rate"],
                             "hit_rate_decode": r["hit_rate_decode"], "misses": r["misses"],
                             "lookups": r["lookups"], "dropped": r["dropped"]})
                done += 1
    except MoesimError as exc:
        show_error(exc)
        st.stop()
    bar.done(f"{runs - 1} replays done")
    table = pd.DataFrame(rows)
    ref_rows = [{"policy": "Belady MIN (ceiling)", "capacity": c, "hit_rate": b}
                for c, b in zip(per_layer, ref["belady"], strict=True)]
    ref_rows += [{"policy": "LRU (reference)", "capacity": c, "hit_rate": v}
                 for c, v in zip(per_layer, ref["lru"], strict=True)]
    lru = dict(zip(per_layer, ref["lru"], strict=True))
    bel = dict(zip(per_layer, ref["belady"], strict=True))
    table["hit_rate_lru"] = table.capacity.map(lru)
    table["hit_rate_belady"] = table.capacity.map(bel)
    span = table.hit_rate_belady - table.hit_rate_lru
    table["gap_recovered"] = np.where(span > 1e-12, (table.hit_rate - table.hit_rate_lru) / span.where(span > 1e-12), np.nan)
    st.session_state["cache_result"] = (name, table, pd.DataFrame(ref_rows))

result = st.session_state.get("cache_result")
if result is not None and result[0] == name:
    _, table, ref = result
    curves = pd.concat([table[["policy", "capacity", "hit_rate"]], ref], ignore_index=True)
    st.plotly_chart(charts.lines(curves, "capacity", "hit_rate", "policy",
                                 "Hit rate against capacity (Belady MIN is the ceiling)",
                                 "capacity (experts per layer)", "hit rate",
                                 dashed=("Belady MIN (ceiling)", "LRU (reference)")), key="cache_curves")
    st.dataframe(table.round(4), hide_index=True, key="cache_table")


# ----- per-token latency on an offloading device --------------------------------------------------
st.header("Per-token latency on an offloading device")
st.write("The SimPy device model (`moesim.offload`) runs the trace token by token: non-expert "
         "compute, the cache lookup, missing experts loading through the storage's I/O channels "
         "while resident ones compute. Compute and expert times are the device's roofline; loads "
         "follow the storage preset.")
d1, d2, d3, d4, d5 = st.columns(5)
lat_policy = d1.selectbox("Policy", all_policies, index=all_policies.index("lru") if "lru" in all_policies else 0,
                          key="lat_policy")
lat_cap = d2.number_input("Capacity (experts per layer)", 1, meta.num_experts, min(2 * meta.top_k, meta.num_experts),
                          key="lat_cap")
device = d3.selectbox("Device / storage", storage_presets(), key="lat_device")
model_default = meta.model if meta.model in presets() else ""
lat_model = d4.selectbox("Model preset (expert sizes, compute)", ["", *presets()],
                         index=(["", *presets()]).index(model_default), key="lat_model")
max_tokens = d5.number_input("Tokens to run", 1, 100_000, 128, key="lat_tokens")
def host_memory_default(device: str) -> int:
    from moesim.storage import get_storage

    return 1 if get_storage(device).host_link_bw > 0 else 0  # a discrete GPU reads host DRAM


source = st.radio("Experts load from", ["flash", "dram"], index=host_memory_default(device), horizontal=True,
                  key="lat_tier", help="flash: read from storage (then over PCIe on a discrete GPU); "
                                       "dram: copied from host memory over PCIe.")


@st.cache_data(max_entries=16, show_spinner=False)
def token_latency(path: str, fp: tuple, policy: str, capacity: int, device: str, model: str,
                  tokens: int, tier: str, seed: int) -> tuple[pd.DataFrame, dict]:
    from moesim.cache import make_layout, make_policy
    from moesim.cost import CostModel
    from moesim.hardware import get_machine
    from moesim.model import get_model
    from moesim.offload import OffloadConfig, simulate
    from moesim.storage import STORAGE_PRESETS, get_storage

    mdl = get_model(model)
    storage = get_storage(device)
    machine = get_machine(STORAGE_PRESETS[device][0])
    compute = machine.accelerator or machine.host
    cost = CostModel(compute)
    expert_s = float(cost.expert_times(mdl, [1])[0])
    dense_s = float(cost.router_time(mdl, 1) + cost.shared_expert_time(mdl, 1)
                    + cost.attention_time(mdl, 1, 512))
    stream = access_stream(path, fp, "token", int(mdl.expert_bytes()))
    layout = make_layout(stream.num_layers, stream.num_experts, stream.expert_bytes,
                         capacity_experts=capacity * stream.num_layers, scope="global")
    pol = make_policy(policy, layout, seed=seed)
    config = OffloadConfig(dense_s=dense_s, expert_s=expert_s,
                           load_s=lambda b: storage.load_time(b, tier), channels=storage.flash.threads)
    df = simulate(stream, pol, config, max_batches=tokens * stream.num_layers)
    per_miss = df.bytes_read / df.misses.where(df.misses > 0)
    # summed I/O time of the token's expert loads (channels may run several at once)
    df["transfer_s"] = df.misses * per_miss.fillna(0).map(lambda b: storage.load_time(b, tier) if b else 0.0)
    df["compute_s"] = df.latency_s - df.stall_s
    return df, {"dense_s": dense_s, "expert_s": expert_s, "hit_rate": pol.stats.to_dict()["hit_rate"]}


if st.button("Run the device model", key="lat_run", type="primary"):
    if not lat_model:
        show_error("choose a model preset: it gives the expert sizes and compute times")
    else:
        with st.spinner("simulating token by token"):
            out = guarded(token_latency, path, fingerprint(path), lat_policy, int(lat_cap), device,
                         lat_model, int(max_tokens), source, int(seed))
        if out is not None:
            st.session_state["latency_result"] = (name, *out)

lat = st.session_state.get("latency_result")
if lat is not None and lat[0] == name:
    _, df, info = lat
    ms = df[["token", "compute_s", "stall_s", "transfer_s", "latency_s"]].copy()
    for col in ("compute_s", "stall_s", "transfer_s", "latency_s"):
        ms[col] = ms[col] * 1e3
    k1, k2, k3, k4 = st.columns(4)
    k1.metric("mean latency per token", f"{ms.latency_s.mean():.2f} ms")
    k2.metric("mean stall per token", f"{ms.stall_s.mean():.2f} ms")
    k3.metric("hit rate", f"{info['hit_rate']:.3f}")
    k4.metric("bytes read", f"{df.bytes_read.sum() / 2**30:.2f} GiB")
    st.plotly_chart(charts.stacked(ms, "token", {"compute_s": "compute", "stall_s": "stall (waiting for experts)"},
                                   "Per-token latency: compute + stall; the line is the summed I/O time of "
                                   "the token's expert loads", "token", "ms",
                                   line=("transfer_s", "transfer (I/O)")), key="latency_chart")
    st.caption(f"per layer: non-expert compute {info['dense_s'] * 1e3:.3f} ms (router, shared experts, "
               f"attention at 512 tokens of context), one expert for one token "
               f"{info['expert_s'] * 1e3:.3f} ms; transfer = summed load time of the token's "
               "misses (the device has several I/O channels, and loads overlap compute, so stall "
               "can be less).")
