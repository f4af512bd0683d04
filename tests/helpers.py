"""Small helpers shared by several test files."""

from __future__ import annotations

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
