"""The cluster as a networkx graph: GPUs, NVSwitches, NICs, rail (leaf) switches and a spine.

Vertices are tuples: ``("gpu", rank)``, ``("nvswitch", node)``, ``("nic", index)``,
``("leaf", rail)`` and ``("spine", 0)``. Every edge carries ``bandwidth`` (bytes/s per
direction), ``latency`` (s) and ``kind``. Rail-optimised fabric: NIC j of every node hangs off
leaf j, so same-rail traffic crosses one leaf and other rails go through the spine. Without
rails every NIC hangs off one core switch (modelled as leaf 0).
"""

from __future__ import annotations

import networkx as nx

from moesim.errors import MoesimError
from moesim.hardware import Cluster


class TopologyError(MoesimError):
    """A query about a GPU or path the cluster does not have."""


def build_graph(cluster: Cluster) -> nx.Graph:
    g = nx.Graph(name=cluster.name)
    gpn, nodes = cluster.gpus_per_node, cluster.num_nodes
    nvl = cluster.nvl_bw()
    for node in range(nodes):
        g.add_node(("nvswitch", node), kind="nvswitch", node=node)
        for local in range(gpn):
            rank = node * gpn + local
            g.add_node(("gpu", rank), kind="gpu", node=node, local=local)
            g.add_edge(("gpu", rank), ("nvswitch", node), bandwidth=nvl,
                       latency=cluster.nvlink.latency / 2, kind="nvlink")
    if cluster.nic is None or cluster.nics_per_node == 0:
        return g
    k = cluster.nics_per_node
    rails = k if cluster.rail_optimized else 1
    pcie = cluster.pcie.bandwidth if cluster.pcie else cluster.nic.bandwidth
    for rail in range(rails):
        g.add_node(("leaf", rail), kind="leaf")
    if rails > 1:
        g.add_node(("spine", 0), kind="spine")
        for rail in range(rails):  # non-blocking: a leaf's uplink carries all its NICs
            g.add_edge(("leaf", rail), ("spine", 0), bandwidth=cluster.nic.bandwidth * nodes,
                       latency=cluster.nic.latency / 4, kind="fabric")
    for node in range(nodes):
        for j in range(k):
            nic = ("nic", node * k + j)
            g.add_node(nic, kind="nic", node=node, rail=j)
            g.add_edge(nic, ("leaf", j if rails > 1 else 0), bandwidth=cluster.nic.bandwidth,
                       latency=cluster.nic.latency / 2, kind=cluster.nic.kind)
            # GPUs that share NIC j (or the GPU that owns it) reach it over PCIe
            for local in range(gpn):
                if (local * k) // gpn == j or (k > gpn and j // (k // gpn) == local):
                    g.add_edge(("gpu", node * gpn + local), nic, bandwidth=pcie,
                               latency=0.0, kind="pcie")
    return g


class Topology:
    """Path, latency and bottleneck-bandwidth queries between GPU ranks."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.graph = build_graph(cluster)

    def _gpu(self, rank: int):
        if not 0 <= rank < self.cluster.num_gpus:
            raise TopologyError(f"GPU {rank} is not in 0..{self.cluster.num_gpus - 1}")
        return ("gpu", rank)

    def path(self, src: int, dst: int) -> list[tuple]:
        """Vertices of the lowest-latency path (fewest hops on ties) from GPU src to dst."""
        a, b = self._gpu(src), self._gpu(dst)
        if a == b:
            return [a]
        try:
            return nx.shortest_path(self.graph, a, b,
                                    weight=lambda u, v, d: d["latency"] + 1e-9)
        except nx.NetworkXNoPath:
            raise TopologyError(f"no path from GPU {src} to GPU {dst}") from None

    def edges(self, src: int, dst: int) -> list[dict]:
        p = self.path(src, dst)
        return [self.graph.edges[u, v] for u, v in zip(p, p[1:], strict=False)]

    def bottleneck_bandwidth(self, src: int, dst: int) -> float:
        """Smallest per-direction rate on the path (inf for a GPU to itself)."""
        e = self.edges(src, dst)
        return min(x["bandwidth"] for x in e) if e else float("inf")

    def latency(self, src: int, dst: int) -> float:
        return sum(x["latency"] for x in self.edges(src, dst))

    def link_kinds(self, src: int, dst: int) -> list[str]:
        return [x["kind"] for x in self.edges(src, dst)]

    def transfer_time(self, src: int, dst: int, nbytes: float) -> float:
        """Latency + bytes / bottleneck rate of one point-to-point message."""
        if src == dst or nbytes <= 0:
            return 0.0
        return self.latency(src, dst) + nbytes / self.bottleneck_bandwidth(src, dst)
