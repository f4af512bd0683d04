"""EPLB-style balancing (DeepSeek's expert-parallel load balancer), from its published description.

Hierarchical policy, per layer: pack expert groups onto nodes heaviest first, each onto the
lightest node with room; inside each node replicate, one slot at a time, the expert with the
largest load per replica; then pack the replicas onto the node's GPUs the same way, with an
equal number per GPU. The global policy is the hierarchical one with one group and one node,
and is chosen when the groups do not split evenly over the nodes.

moesim extension: when replicas do not divide evenly over GPUs, each GPU has room for
ceil(replicas / GPUs) and the packing fills at most that many (the published algorithm requires
an exact multiple; with one, both behave identically).
"""

from __future__ import annotations

import math

import numpy as np

from moesim.planners.inputs import PlacementError, PlacementProblem


def balanced_packing(weights: np.ndarray, num_packs: int, capacity: int | None = None):
    """LPT with a cardinality limit: heaviest item first into the lightest pack with room.

    Returns ``(pack_of, position_in_pack)``; ties go to the lowest item index / pack index.
    """
    n = len(weights)
    if capacity is None:
        capacity = math.ceil(n / num_packs)
    if n == num_packs and capacity == 1:
        return np.arange(n), np.zeros(n, dtype=np.int64)
    pack_of = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    pack_load = np.zeros(num_packs)
    pack_size = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-np.asarray(weights, float), kind="stable"):
        open_load = np.where(pack_size < capacity, pack_load, np.inf)
        p = int(np.argmin(open_load))
        pack_of[item], pos[item] = p, pack_size[p]
        pack_load[p] += weights[item]
        pack_size[p] += 1
    return pack_of, pos


def replicate(weights: np.ndarray, num_slots: int, max_replicas: int | None = None):
    """One slot per expert, then each extra slot to the largest load per replica (D'Hondt).

    Returns ``(expert_of_slot, count)``. ``max_replicas`` caps an expert's replicas (e.g. at the
    number of GPUs, so that no GPU must hold two).
    """
    weights = np.asarray(weights, float)
    n = len(weights)
    count = np.ones(n, dtype=np.int64)
    expert_of_slot = list(range(n))
    for _ in range(num_slots - n):
        per_replica = weights / count
        if max_replicas is not None:
            per_replica = np.where(count < max_replicas, per_replica, -np.inf)
        e = int(np.argmax(per_replica))
        expert_of_slot.append(e)
        count[e] += 1
    return np.asarray(expert_of_slot, dtype=np.int64), count


def rebalance_layer(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                    num_gpus: int, slots_per_gpu: int | None = None) -> np.ndarray:
    """Hierarchical EPLB for one layer; returns phy2log (GPU-major, -1 for empty slots)."""
    weight = np.asarray(weight, float)
    E = len(weight)
    if E % num_groups:
        raise PlacementError(f"groups must divide experts: {E} experts cannot form {num_groups} equal groups")
    if num_groups % num_nodes:
        raise PlacementError(f"hierarchical EPLB needs nodes to divide groups: {num_groups} groups over {num_nodes} nodes")
    if num_gpus % num_nodes:
        raise PlacementError(f"nodes must divide GPUs: {num_gpus} GPUs over {num_nodes} nodes")
    if num_replicas % num_nodes:
        raise PlacementError(
            f"hierarchical EPLB needs nodes to divide replicas: {num_replicas} replicas over {num_nodes} nodes"
        )
    if num_replicas < E:
        raise PlacementError(f"more experts than slots: {E} experts, {num_replicas} replicas")
    group_size = E // num_groups
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    S = slots_per_gpu or math.ceil(num_replicas / num_gpus)
    if S * gpus_per_node < slots_per_node:
        raise PlacementError(f"{slots_per_node} replicas per node do not fit in {gpus_per_node} GPUs x {S} slots")

    group_load = weight.reshape(num_groups, group_size).sum(axis=1)
    node_of_group, pos_of_group = balanced_packing(group_load, num_nodes)
    phy2log = np.full(num_gpus * S, -1, dtype=np.int64)
    for node in range(num_nodes):
        groups = np.flatnonzero(node_of_group == node)
        groups = groups[np.argsort(pos_of_group[groups], kind="stable")]
        experts = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in groups])
        local, count = replicate(weight[experts], slots_per_node)
        replica_load = weight[experts][local] / count[local]
        gpu_of, slot_in_gpu = balanced_packing(replica_load, gpus_per_node, capacity=S)
        base = node * gpus_per_node * S
        phy2log[base + gpu_of * S + slot_in_gpu] = experts[local]
    return phy2log


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, policy: str = "auto", slots_per_gpu: int | None = None) -> np.ndarray:
    """phy2log ``[L, slots]`` for loads ``[L, E]``; policy 'auto' picks hierarchical iff the
    groups split evenly over the nodes, else global."""
    weight = np.atleast_2d(np.asarray(weight, float))
    if policy == "auto":
        policy = "hierarchical" if num_groups % num_nodes == 0 else "global"
    if policy == "global":
        num_groups, num_nodes = 1, 1
    elif policy != "hierarchical":
        raise PlacementError(f"unknown EPLB policy {policy!r}; choose auto, hierarchical or global")
    return np.stack([rebalance_layer(w, num_replicas, num_groups, num_nodes, num_gpus, slots_per_gpu)
                     for w in weight])


def eplb_plan(problem: PlacementProblem, policy: str = "auto") -> np.ndarray:
    c = problem.cluster
    return rebalance_experts(problem.load, problem.num_replicas, problem.num_groups, c.num_nodes,
                             c.num_gpus, policy=policy, slots_per_gpu=problem.slots_per_gpu)
