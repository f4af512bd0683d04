"""Figures of merit of any plan, on the trace it was planned on or on another one.

Load model: an expert's tokens split evenly over its replicas (uniform replica choice, as SGLang
"dynamic" and vLLM do), or, with ``selection="nearest"`` (SGLang "static"), each node's share of
an expert's tokens served by the expert's replicas on that node when it has some
(``objectives.replica_loads``). Token-level figures need a routing trace; with loads only they are None.

- balance: per layer max / mean GPU load; ``max_mean_load`` = its mean over layers;
  ``balancedness`` = sum over layers of mean load / sum of max load (vLLM's definition);
  node-level max / mean likewise.
- traffic: expected distinct destination GPUs and nodes per (token, layer); ``cross_node_tokens``
  = token copies that leave their source node, with each token's source spread evenly over the
  GPUs (data-parallel attention), i.e. sum over rows of E[distinct nodes] x (1 - 1/nodes);
  ``cross_gpu_tokens`` likewise per GPU.
- ``gpu_hops_per_token`` (ExFlow): over consecutive layers, the expected number of times a
  token's top-1 expert (largest gate weight) sits on another GPU than at the layer before.
- modelled dispatch/combine seconds through moesim.comm (``comm_times``).
- operational: replicas migrated from a previous plan (and bytes), same-GPU duplicate replicas,
  solve time and gap as recorded in the plan.
"""

from __future__ import annotations

import numpy as np

from moesim.planners.inputs import PlacementError
from moesim.planners.objectives import shares, source_node_shares
from moesim.planners.plan import Plan

ROW_CHUNK = 1 << 15


def _check(plan: Plan, num_layers: int, num_experts: int, what: str) -> None:
    if (num_layers, num_experts) != (plan.num_layers, plan.num_experts):
        raise PlacementError(
            f"the plan is for {plan.num_layers} layers x {plan.num_experts} experts, the {what} has "
            f"{num_layers} x {num_experts}"
        )


def balance_metrics(plan: Plan, load: np.ndarray, selection: str | None = None) -> dict:
    load = np.asarray(load, float)
    _check(plan, *load.shape, "load matrix")
    gpu = plan.gpu_loads(load, selection)  # [L, P]
    node_of = np.arange(plan.num_gpus) // (plan.num_gpus // plan.num_nodes)
    node = np.stack([np.bincount(node_of, weights=row, minlength=plan.num_nodes) for row in gpu])
    mean, peak = gpu.mean(axis=1), gpu.max(axis=1)
    ratio = np.divide(peak, mean, out=np.ones_like(peak), where=mean > 0)
    node_ratio = np.divide(node.max(axis=1), node.mean(axis=1), out=np.ones_like(peak), where=mean > 0)
    return {
        "max_mean_load": float(ratio.mean()),
        "max_mean_load_worst_layer": float(ratio.max()),
        "balancedness": float(mean.sum() / peak.sum()) if peak.sum() > 0 else 1.0,
        "node_max_mean_load": float(node_ratio.mean()),
        "per_layer_max_mean": ratio.round(6).tolist(),
        "per_layer_node_max_mean": node_ratio.round(6).tolist(),
    }


def traffic_metrics(plan: Plan, trace, selection: str | None = None) -> dict:
    """Token-level traffic figures from a routing trace (streamed), under the replica selection
    rule (default: the plan's). With ``nearest`` the node figures are exact expectations over
    the source node (``objectives.source_node_shares``); the GPU figures (distinct GPUs, hops)
    stay the uniform-choice ones."""
    selection = selection or plan.replica_selection
    meta = trace.meta
    _check(plan, meta.num_layers, meta.num_experts, "trace")
    P, N = plan.num_gpus, plan.num_nodes
    node_of = np.arange(P) // (P // N)
    per_gpu = plan.per_gpu()
    f_gpu = np.empty((plan.num_layers, plan.num_experts, P))
    f_node = np.empty((plan.num_layers, plan.num_experts, N))
    q_node = np.empty((plan.num_layers, N, plan.num_experts, N)) if selection != "uniform" else None
    for lay in range(plan.num_layers):
        f_gpu[lay], f_node[lay] = shares(per_gpu[lay], node_of, N)
        if q_node is not None:
            q_node[lay] = source_node_shares(per_gpu[lay], node_of, N, selection)
    rows = 0
    gpus = nodes = cross = 0.0
    hops = 0.0
    prev = None  # last row of the previous batch: (key, layer, top-1 expert)
    token_keys = set()
    for b in trace.iter_batches():
        layer = b.layer.astype(np.int64)
        ids = b.expert_ids.astype(np.int64)
        for s in range(0, len(layer), ROW_CHUNK):
            lay, e = layer[s:s + ROW_CHUNK], ids[s:s + ROW_CHUNK]
            miss_g = np.prod(1 - f_gpu[lay[:, None], e], axis=1)  # [n, P]
            gpus += float((1 - miss_g).sum())
            if q_node is None:
                miss_n = np.prod(1 - f_node[lay[:, None], e], axis=1)
                nodes += float((1 - miss_n).sum())
                cross += float((1 - miss_n).sum()) * (1 - 1 / N)
            else:  # source node s with probability 1/N
                for s_node in range(N):
                    reached = 1 - np.prod(1 - q_node[lay[:, None], s_node, e], axis=1)  # [n, N]
                    nodes += float(reached.sum()) / N
                    cross += float(reached.sum() - reached[:, s_node].sum()) / N
        rows += len(layer)
        key = (b.request_id.astype(np.int64) << 32) | b.token_pos.astype(np.int64)
        token_keys.update(np.unique(key).tolist())
        top1 = ids[np.arange(len(ids)), np.argmax(b.gate_weights, axis=1)]
        if prev is not None:
            key, layer, top1 = np.r_[prev[0], key], np.r_[prev[1], layer], np.r_[prev[2], top1]
        nxt = np.flatnonzero((key[1:] == key[:-1]) & (layer[1:] == layer[:-1] + 1))
        same = (f_gpu[layer[nxt], top1[nxt]] * f_gpu[layer[nxt + 1], top1[nxt + 1]]).sum(axis=1)
        hops += float((1 - same).sum())
        prev = (key[-1:], layer[-1:], top1[-1:])
    tokens = max(len(token_keys), 1)
    return {
        "token_layer_rows": rows,
        "tokens": len(token_keys),
        "dest_gpus_per_token": gpus / max(rows, 1),
        "dest_nodes_per_token": nodes / max(rows, 1),
        "cross_gpu_tokens": gpus * (1 - 1 / P),
        "cross_node_tokens": cross,
        "replica_selection": selection,
        "gpu_hops_per_token": hops / tokens,
    }


def comm_times(plan: Plan, trace, hidden: int, cluster=None, dispatcher: str = "deepep-normal",
               tokens_per_gpu: int = 4096, max_layers: int | None = None, selection: str | None = None) -> dict:
    """Modelled dispatch and combine seconds per MoE layer step through ``moesim.comm``.

    The trace's tokens are dealt to the GPUs round-robin as one micro-batch of
    ``tokens_per_gpu`` tokens per GPU (the first P x tokens_per_gpu tokens, repeated if the
    trace is shorter); each layer's time is the model's (max over GPUs and links); the figures
    are the mean and the slowest layer. ``cluster`` is a ``moesim.hardware.Cluster`` (default:
    the 'h100-ib' preset cut to the plan's GPUs and nodes).
    """
    from moesim import comm
    from moesim.hardware import get_cluster

    P, N = plan.num_gpus, plan.num_nodes
    nearest = (selection or plan.replica_selection) == "nearest"  # moesim.comm's "nearest": same GPU, node, first
    if cluster is None:
        base = get_cluster("h100-ib")
        cluster = base.model_copy(update={"num_nodes": N, "gpus_per_node": P // N})
    if cluster.num_gpus != P or cluster.num_nodes != N:
        raise PlacementError(f"the cluster has {cluster.num_nodes} nodes x {cluster.gpus_per_node} GPUs, "
                             f"the plan {N} x {P // N}")
    arrays = trace.to_arrays()
    experts = arrays["experts"]
    need = P * tokens_per_gpu
    idx = np.arange(need) % max(len(experts), 1)
    src = np.arange(need) % P
    layers = range(plan.num_layers if max_layers is None else min(max_layers, plan.num_layers))
    dispatch, combine = [], []
    for lay in layers:
        placement = comm.Placement.from_slots(plan.phy2log[lay], P, plan.num_experts,
                                              selection="nearest" if nearest else "random")
        ids = experts[idx, lay].astype(np.int64)
        res = comm.layer_comm(cluster, hidden=hidden, dispatcher=dispatcher, placement=placement,
                              src_gpu=src, expert_ids=ids)
        dispatch.append(res.dispatch_s)
        combine.append(res.combine_s)
    return {
        "dispatcher": dispatcher,
        "tokens_per_gpu": tokens_per_gpu,
        "dispatch_s_mean": float(np.mean(dispatch)),
        "dispatch_s_max": float(np.max(dispatch)),
        "combine_s_mean": float(np.mean(combine)),
        "combine_s_max": float(np.max(combine)),
    }


def operational_metrics(plan: Plan, previous: Plan | np.ndarray | None = None, expert_bytes: int = 0) -> dict:
    per_gpu = plan.per_gpu()
    out = {
        "same_gpu_duplicates": int(np.maximum(per_gpu - 1, 0).sum()),
        "solve_s": plan.solve_s,
        "gap": _largest_gap(plan.gap),
        "solver": plan.solver,
        "status": plan.status,
    }
    if previous is not None:
        prev = previous.phy2log if isinstance(previous, Plan) else np.asarray(previous)
        from moesim.planners.plan import replicas_per_gpu

        old = replicas_per_gpu(prev, plan.num_experts, plan.num_gpus)
        moved = int(np.maximum(per_gpu - old, 0).sum())
        out["replicas_migrated"] = moved
        out["bytes_migrated"] = moved * int(expert_bytes)
    return out


def _largest_gap(gaps) -> float | None:
    """Largest per-layer gap; None when unknown for some layer (no bound)."""
    if not gaps or any(g is None for g in gaps):
        return None
    return float(max(gaps))


def evaluate(plan: Plan, trace=None, load: np.ndarray | None = None, previous=None, expert_bytes: int = 0,
             hidden: int | None = None, dispatcher: str = "deepep-normal", selection: str | None = None) -> dict:
    """All figures for a plan: from a trace (load and token-level) or from a load matrix, under
    the replica selection rule ``selection`` (default: the one the plan was made for)."""
    if trace is None and load is None:
        raise PlacementError("evaluate needs a trace or a load matrix")
    if load is None:
        load = trace.load_matrix()
    out = balance_metrics(plan, load, selection)
    out["replica_selection"] = selection or plan.replica_selection
    routing = trace is not None and not trace.is_counts
    out.update(traffic_metrics(plan, trace, selection) if routing else
               {"cross_node_tokens": None, "cross_gpu_tokens": None, "dest_gpus_per_token": None,
                "dest_nodes_per_token": None, "gpu_hops_per_token": None})
    out.update(operational_metrics(plan, previous, expert_bytes))
    out["comm"] = None
    if routing and hidden:
        out["comm"] = comm_times(plan, trace, hidden, dispatcher=dispatcher, selection=selection)
    return out
