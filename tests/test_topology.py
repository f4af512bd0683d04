"""The networkx cluster graph: paths, latency, bottleneck bandwidth."""

from __future__ import annotations

import pytest

from moesim.hardware import get_cluster
from moesim.topology import Topology, TopologyError


@pytest.fixture(scope="module")
def topo():
    return Topology(get_cluster("h800-ib").for_ep(32))


def test_intra_node_goes_through_nvswitch(topo):
    assert topo.path(0, 5) == [("gpu", 0), ("nvswitch", 0), ("gpu", 5)]
    assert topo.bottleneck_bandwidth(0, 5) == topo.cluster.nvl_bw()
    assert topo.link_kinds(0, 5) == ["nvlink", "nvlink"]


def test_same_rail_crosses_one_leaf(topo):
    p = topo.path(3, 8 + 3)
    assert ("leaf", 3) in p and ("spine", 0) not in p
    assert topo.bottleneck_bandwidth(3, 11) == topo.cluster.nic.bandwidth


def test_other_rail_forwards_over_nvlink_first(topo):
    # lowest latency to another rail: NVLink to the same-rail GPU, then that rail (NCCL PXN)
    p = topo.path(3, 8 + 4)
    assert p[:3] == [("gpu", 3), ("nvswitch", 0), ("gpu", 4)] and ("leaf", 4) in p
    assert ("spine", 0) not in p
    assert topo.latency(3, 12) > topo.latency(3, 11) > topo.latency(3, 4)
    assert topo.graph.has_edge(("leaf", 0), ("spine", 0))


def test_transfer_time_closed_form(topo):
    nic = topo.cluster.nic
    t = topo.transfer_time(0, 8, 1e9)
    assert t == pytest.approx(nic.latency + 1e9 / nic.bandwidth)
    assert topo.transfer_time(2, 2, 1e9) == 0.0


def test_graph_size_and_errors(topo):
    kinds = [d["kind"] for _, d in topo.graph.nodes(data=True)]
    assert kinds.count("gpu") == 32 and kinds.count("nic") == 32 and kinds.count("leaf") == 8
    with pytest.raises(TopologyError, match="not in 0..31"):
        topo.path(0, 32)


def test_single_node_and_shared_nics():
    t = Topology(get_cluster("h800-ib").for_ep(8))
    assert "ib" not in t.link_kinds(0, 7)
    l40 = Topology(get_cluster("l40s-pcie").for_ep(16))  # 4 NICs per 8 GPUs: pairs share
    assert ("nic", 0) in l40.path(0, 8) and ("nic", 0) in l40.path(1, 9)
