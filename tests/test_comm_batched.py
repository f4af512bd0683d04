"""The all-layers form of the pair dispatchers (flat, deepep-ll) and its agreement with the
per-layer dispatchers of moesim.comm."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import comm
from moesim.errors import MoesimError
from moesim.hardware import CommParams, get_cluster


def test_pair_paths_by_hand():
    # 2 nodes x 2 GPUs; GPU 0 sends 3 pairs to itself, 2 to GPU 1 (same node), 5 to GPU 3
    Z = np.zeros((4, 4))
    Z[0, 0], Z[0, 1], Z[0, 3] = 3, 2, 5
    Z[2, 0] = 7
    out, into = comm.pair_paths(Z, gpus_per_node=2)
    assert out[0].tolist() == [3, 2, 5] and out[2].tolist() == [0, 0, 7]
    assert into[0].tolist() == [3, 0, 7] and into[1].tolist() == [0, 2, 0]
    assert into[3].tolist() == [0, 0, 5]


def test_flat_layers_closed_form():
    """Flat on 2 nodes: the busiest link is GPU 0's NIC-out; time = fixed cost + bytes / rate."""
    cl = get_cluster("h800-ib", num_nodes=2).model_copy(
        update={"gpus_per_node": 2, "nics_per_node": 2,
                "comm": CommParams(a2a_latency=10e-6, per_peer=1e-6)})
    out = np.zeros((1, 4, 3))
    into = np.zeros((1, 4, 3))
    out[0, 0] = [4, 1, 6]  # GPU 0: 6 pairs to the other node, 1 to its neighbour
    into[0, 2, 2] = 6
    into[0, 1, 1] = 1
    row = 1000
    res = comm.pair_comm_layers("flat", cl, out, into, row, 2 * row)
    alpha = 10e-6 + 3 * 1e-6
    t = max(6 * row / cl.rdma_bw(), 1 * row / cl.nvl_bw())
    assert res.dispatch_s[0] == pytest.approx(alpha + t)
    assert res.combine_s[0] == pytest.approx(alpha + 2 * t)
    assert res.sent_bytes[0] == 7 * row and res.recv_bytes[0] == 7 * row  # own pairs stay local
    assert res.bottleneck == ["nic_out"]


def _routing(G: int, L: int, E: int, K: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, G, n)
    # skewed differently per layer, K distinct experts per token
    ids = np.stack([np.argsort(rng.random((n, E)) ** (1 + 2 * i), axis=1)[:, :K]
                    for i in range(L)], axis=1)
    return src, ids


@pytest.mark.parametrize("dispatcher", comm.PAIR_DISPATCHERS)
@pytest.mark.parametrize("preset,nodes", [("h800-ib", 1), ("h800-ib", 2), ("l40s-pcie", 2)])
def test_all_layers_form_agrees_with_the_per_layer_dispatchers(dispatcher, preset, nodes):
    """Per layer, pair_comm_layers over the stacked path counts = Dispatcher.run on Z."""
    cl = get_cluster(preset, num_nodes=nodes)
    G, L, E, K, n = cl.num_gpus, 4, 32, 4, 500
    src, ids = _routing(G, L, E, K, n, seed=nodes)
    plan = comm.Placement.contiguous(E, G)
    rows = comm.wire_rows(dispatcher, 7168, "fp8")
    per_layer, outs, ins = [], [], []
    for layer in range(L):
        counts = comm.counts_from_tokens(src, ids[:, layer], plan, cl)
        per_layer.append(comm.get_dispatcher(dispatcher).run(counts, cl, *rows))
        o, i = comm.pair_paths(counts.Z, cl.gpus_per_node)
        outs.append(o)
        ins.append(i)
    res = comm.pair_comm_layers(dispatcher, cl, np.stack(outs), np.stack(ins), *rows)
    for layer, one in enumerate(per_layer):
        assert res.dispatch_s[layer] == pytest.approx(one.dispatch_s, rel=1e-12)
        assert res.combine_s[layer] == pytest.approx(one.combine_s, rel=1e-12)
        assert res.sent_bytes[layer] == pytest.approx(one.send_bytes.sum(), rel=1e-12)
        assert res.recv_bytes[layer] == pytest.approx(one.recv_bytes.sum(), rel=1e-12)
        assert one.bottleneck.startswith(res.bottleneck[layer] + " ")
    # every pair is sent once and received once
    assert res.sent_bytes.tolist() == pytest.approx(res.recv_bytes.tolist())


def test_low_latency_moves_own_pairs_through_the_nic():
    """deepep-ll (pure RDMA) counts a GPU's pairs to itself; flat keeps them local."""
    cl = get_cluster("h800-ib", num_nodes=1)
    out = np.zeros((1, cl.num_gpus, 3))
    into = np.zeros((1, cl.num_gpus, 3))
    out[0, 0, comm.SAME_GPU] = into[0, 0, comm.SAME_GPU] = 10
    ll = comm.pair_comm_layers("deepep-ll", cl, out, into, 100, 100)
    flat = comm.pair_comm_layers("flat", cl, out, into, 100, 100)
    assert ll.sent_bytes[0] == 1000 and flat.sent_bytes[0] == 0
    assert flat.dispatch_s[0] == pytest.approx(comm.pair_fixed_cost("flat", cl))
    rate = cl.comm.ll_rdma_bw or cl.rdma_bw()
    assert ll.dispatch_s[0] == pytest.approx(comm.pair_fixed_cost("deepep-ll", cl) + 1000 / rate)


def test_other_dispatchers_are_refused_in_one_line():
    cl = get_cluster("h800-ib", num_nodes=1)
    z = np.zeros((1, cl.num_gpus, 3))
    with pytest.raises(MoesimError, match="deepep-normal"):
        comm.pair_comm_layers("deepep-normal", cl, z, z, 1, 1)
