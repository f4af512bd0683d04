"""How far any group-aligned placement can cut cross-node tokens at DeepSeek-V3 scale.

The synthetic DeepSeek-V3 trace of ``placement_bench.py`` (58 MoE layers x 256 experts, top-8,
8 groups with 4 chosen per token; 4096 tokens, seed 0) onto 8 nodes. Hierarchical EPLB puts one
group on each node, so a token reaches only the nodes of its (at most 4) groups; every other
group-aligned plan reaches the same nodes. With ``spare`` redundant slots per node and nearest
replica selection (SGLang static dispatch: a token uses a replica on its own node when there is
one), a node can also hold extra replicas, and a token from that node skips a group when all
its experts of the group have a replica there. For 4, 8 and 12 spare slots per node (32, 64
and 96 redundant slots in all) this prints the cut against hierarchical EPLB of
(a) the same experts on every node and (b) each node its own best extra replicas (greedy, exact
gains; ``placement_bench.dsv3_structure``), with no balance cap at all, and (c) a valid upper
bound on the cut of every group-aligned plan: per layer and node, the LP relaxation (HiGHS) of
"choose s experts to replicate on the node, covering the most (token, other group) pairs whose
experts of that group are all replicated" (a token's group is local only then) for every s the
node's free slots allow (5 or 6 slots per GPU), then the best split of the redundant slots over
the nodes (the plan may put more on some nodes than on others).

    python benchmarks/dsv3_cut_ceiling.py   # writes benchmarks/results/dsv3_cut_ceiling.{json,md}
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from placement_bench import dsv3_structure  # noqa: E402

from moesim.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from moesim.model import get_model  # noqa: E402
from moesim.traces.synth import synthesize  # noqa: E402

SPARES = (4, 8, 12)
GROUPS = NODES = GPUS_PER_NODE = 8


def node_cover_bounds(experts: np.ndarray, group: np.ndarray, node: int, most: int) -> np.ndarray:
    """LP upper bounds ``[most + 1]`` on the (token, group) pairs of one layer that s = 0..most
    extra replicas on ``node`` (home of group ``node``) can make local: max sum w_p y_p,
    y_p <= x_e for every expert e of pair p, sum x_e <= s, 0 <= x, y <= 1 (HiGHS, the same
    model re-solved with a new right-hand side)."""
    import highspy

    g = group[experts]
    pairs = Counter()
    for row, grow in zip(experts.tolist(), g.tolist(), strict=True):
        for gg in set(grow) - {node}:
            pairs[tuple(sorted(e for e, h in zip(row, grow, strict=True) if h == gg))] += 1
    keys = [k for k in pairs if len(k) <= most]  # a pair needing more experts is never local
    cols = {e: i for i, e in enumerate(sorted({e for k in keys for e in k}))}
    nx, ny = len(cols), len(keys)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.addVars(nx + ny, np.zeros(nx + ny), np.ones(nx + ny))
    cost = np.r_[np.zeros(nx), -np.array([pairs[k] for k in keys], float)]
    h.changeColsCost(nx + ny, np.arange(nx + ny, dtype=np.int32), cost)
    starts, index, value = [], [], []
    for p, k in enumerate(keys):
        for e in k:
            starts.append(len(index))
            index += [nx + p, cols[e]]
            value += [1.0, -1.0]
    h.addRows(len(starts), np.full(len(starts), -highspy.kHighsInf), np.zeros(len(starts)), len(index),
              np.array(starts, np.int32), np.array(index, np.int32), np.array(value))
    h.addRow(-highspy.kHighsInf, 0.0, nx, np.arange(nx, dtype=np.int32), np.ones(nx))
    out = np.zeros(most + 1)
    for spare in range(1, most + 1):
        h.changeRowBounds(len(starts), -highspy.kHighsInf, float(spare))
        h.run()
        out[spare] = -h.getInfo().objective_function_value
    return out


def best_split(bounds: np.ndarray, total: int) -> float:
    """max sum_h bounds[h, s_h] over s_h >= 0 with sum_h s_h <= total (a knapsack over nodes)."""
    best = np.zeros(total + 1)  # best[t]: the nodes so far with t slots in all
    for row in bounds:
        nxt = np.full(total + 1, -np.inf)
        for s, v in enumerate(row):
            nxt[s:] = np.maximum(nxt[s:], best[: total + 1 - s] + v)
        best = nxt
    return float(best.max())


def group_aligned_bound(trace, redundant: int) -> float:
    """Upper bound on the cut of any group-aligned plan with ``redundant`` extra slots per layer
    spread over the nodes as it likes (each node at most its free slots; tokens' sources even
    over the nodes)."""
    experts = trace.to_arrays()["experts"]  # [T, L, K]
    T, L, _ = experts.shape
    E = trace.meta.num_experts
    group = np.arange(E) // (E // GROUPS)
    free = GPUS_PER_NODE * -(-(E + redundant) // (GPUS_PER_NODE * NODES)) - E // NODES  # per node
    base = covered = 0.0
    for lay in range(L):
        x = experts[:, lay, :]
        chosen = np.zeros((T, GROUPS), bool)
        chosen[np.arange(T)[:, None], group[x]] = True
        base += chosen.sum() * (NODES - 1) / NODES
        bounds = np.stack([node_cover_bounds(x, group, h, free) for h in range(NODES)])
        covered += best_split(bounds, redundant) / NODES
    return covered / base


def main() -> None:
    t0 = time.perf_counter()
    trace = synthesize(get_model("deepseek-v3"), 4096, seed=0)
    rows = []
    for spare in SPARES:
        r = dsv3_structure(trace, spare_per_node=spare, search_layers=())
        rows.append({"spare_per_node": spare, "redundant": spare * 8,
                     "same_on_every_node_cut": r["group_aligned_4_everywhere_cut"],
                     "best_per_node_cut": r["group_aligned_best_4_per_node_cut"],
                     "group_aligned_cut_upper_bound": round(group_aligned_bound(trace, spare * NODES), 4),
                     "hierarchical_eplb_cross_node_tokens": r["group_aligned_cross_node_tokens"]})
    lines = ["| spare slots per node | redundant in all | same experts on every node | each node its own best "
             "| upper bound, any group-aligned plan |", "|---|---|---|---|---|"]
    lines += [f"| {r['spare_per_node']} | {r['redundant']} | {r['same_on_every_node_cut']:.1%} "
              f"| {r['best_per_node_cut']:.1%} | {r['group_aligned_cut_upper_bound']:.1%} |" for r in rows]
    print("\n".join(lines))
    out = HERE / "results" / "dsv3_cut_ceiling.json"
    write_json_atomic(out, {"trace": {"model": "deepseek-v3", "tokens": 4096, "seed": 0}, "rows": rows,
                            "wall_s": round(time.perf_counter() - t0, 1)})
    write_text_atomic(out.with_suffix(".md"),
                      "# Group-aligned cross-node cut ceilings at DeepSeek-V3 scale\n\n"
                      "`python benchmarks/dsv3_cut_ceiling.py`: cut in cross-node tokens against "
                      "hierarchical EPLB (one group per node) of group-aligned plans with extra "
                      "replicas under nearest selection, no balance cap: two greedy plans and the "
                      "LP upper bound over every group-aligned plan.\n\n"
                      + "\n".join(lines) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
