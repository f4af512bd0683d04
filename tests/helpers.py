"""Small helpers shared by several test files."""

from __future__ import annotations

import numpy as np
import pytest


def with_changes(scenario: dict, changes: dict) -> dict:
    """Set dotted keys (``"serving.max_running": 4``) in a scenario dict, creating sections."""
    for key, value in changes.items():
        node = scenario
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return scenario


def assert_exact_deltas(move, swap, node, value, positions: int) -> None:
    """Every move (expert e to position m) and swap (e <-> f) delta equals the change of
    ``value`` recomputed from scratch on the moved assignment."""
    base = value(node)
    for e in range(len(node)):
        for m in range(positions):
            if m != node[e]:
                moved = node.copy()
                moved[e] = m
                assert move[e, m] == pytest.approx(value(moved) - base)
        for f in range(len(node)):
            if node[e] != node[f]:
                swapped = node.copy()
                swapped[e], swapped[f] = node[f], node[e]
                assert swap[e, f] == pytest.approx(value(swapped) - base)


def assert_node_search_deltas_exact(seed: int, num_experts: int, everywhere: bool) -> None:
    """``partition.NodeSearch`` on 40 random top-3 tokens over 3 nodes: its move and swap deltas
    are exact (``assert_exact_deltas``); with ``everywhere``, experts may also sit at the
    pseudo-node 3, "replicated on every node"."""
    from moesim.planners.partition import NodeSearch, token_sets

    rng = np.random.default_rng(seed)
    E, N, K = num_experts, 3, 3
    positions = N + 1 if everywhere else N
    sets, weight = token_sets(np.stack([rng.choice(E, K, replace=False) for _ in range(40)]))
    node = rng.integers(0, positions, E)

    def value(assign):
        return NodeSearch(sets, weight, E, N, assign, positions=positions).value()

    move, swap = NodeSearch(sets, weight, E, N, node, positions=positions).deltas()
    assert_exact_deltas(move, swap, node, value, positions)
