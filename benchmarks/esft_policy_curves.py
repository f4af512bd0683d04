"""Hit rate vs capacity of every cache policy on the four ESFT traces, Belady MIN as ceiling.

Token accounting (each token's 26 layers x 6 experts looked up in execution order), one
global pool, capacity in experts (d2moe: the same number of bf16 DeepSeek-V2-Lite experts in
bytes). LRU and Belady use the stack/fast paths; the rest replay through the policy objects.
Run: python benchmarks/esft_policy_curves.py [--tokens N (default: all)] [--jobs J]
Writes benchmarks/results/esft_policy_curves.csv and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from moesim.cache import policy_names
from moesim.fileio import write_text_atomic
from moesim.model import get_model
from moesim.replay import AccessStream, belady_curve, lru_curve, run_policy
from moesim.traces import Trace

DATA = Path(os.environ.get("MOESIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIZES = [156, 312, 416, 624, 832]  # 1x and 2x the 156 experts a token touches, then 25/37.5/50 %
PARAMS = {"sch": {"m": 16}}
EXPERT_BYTES = get_model("deepseek-v2-lite").expert_bytes()


def stream_of(path: Path, tokens: int) -> tuple[AccessStream, int]:
    """The task's first ``tokens`` tokens as an access stream, and how many there were."""
    d = np.load(path)
    n = min(tokens, len(d["experts"]))
    t = Trace.from_arrays(d["experts"][:n], d["weights"][:n], None, "prefill", num_experts=64)
    return AccessStream.from_trace(t, "token", expert_bytes=EXPERT_BYTES), n


def one(path: Path, tokens: int, name: str) -> list[dict]:
    s, n = stream_of(path, tokens)
    t0 = time.perf_counter()
    if name == "lru":
        rates = lru_curve(s, SIZES)
    elif name == "belady":
        rates = belady_curve(s, SIZES)
    else:
        rates = []
        for c in SIZES:
            kw = {"capacity_bytes": c * EXPERT_BYTES} if name == "d2moe" else {"capacity_experts": c}
            rates.append(run_policy(s, name, **kw, **PARAMS.get(name, {})).stats["hit_rate"])
    dt = time.perf_counter() - t0
    task = path.stem.removeprefix("esft_")
    return [{"task": task, "tokens": n, "policy": name, "capacity_experts": c, "hit_rate": float(r),
             "seconds": dt / len(SIZES)}
            for c, r in zip(SIZES, rates, strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens per task (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    folder = DATA / "esft-dsv2lite"
    files = sorted(folder.glob("esft_*.npz"))
    if not files:
        print(f"skipped: no ESFT traces in {folder}")
        return 0
    jobs = [(f, name) for f in files for name in policy_names()]
    rows = Parallel(n_jobs=args.jobs)(delayed(one)(f, args.tokens, name) for f, name in jobs)
    df = pd.DataFrame([r for part in rows for r in part])
    bel = df[df.policy == "belady"].set_index(["task", "capacity_experts"]).hit_rate
    lru = df[df.policy == "lru"].set_index(["task", "capacity_experts"]).hit_rate
    idx = list(zip(df.task, df.capacity_experts, strict=True))
    df["belady"] = bel.loc[idx].to_numpy()
    df["gap_recovered"] = (df.hit_rate - lru.loc[idx].to_numpy()) / (df.belady - lru.loc[idx].to_numpy())
    out = Path(__file__).parent / "results"
    write_text_atomic(out / "esft_policy_curves.csv", df.to_csv(index=False, float_format="%.5f"))
    counts = ", ".join(f"{t} {n:,}" for t, n in df.groupby("task").tokens.first().items())
    lines = [f"# ESFT hit rate vs capacity (tokens per task: {counts}; token accounting, global pool)", ""]
    for task, g in df.groupby("task"):
        table = g.pivot(index="policy", columns="capacity_experts", values="hit_rate")
        table = table.loc[table[SIZES[-1]].sort_values(ascending=False).index]
        lines += [f"## {task}", "", "| policy | " + " | ".join(str(c) for c in SIZES) + " |",
                  "|---" * (len(SIZES) + 1) + "|"]
        lines += [f"| {p} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for p, row in table.iterrows()]
        lines.append("")
    write_text_atomic(out / "esft_policy_curves.md", "\n".join(lines))
    print("\n".join(lines))
    viol = df[(df.policy != "belady-bypass") & (df.hit_rate > df.belady + 1e-9) & ~df.policy.isin(["adapmoe", "hobbit", "d2moe", "edgemoe", "static"])]
    print(f"must-admit policies above Belady: {len(viol)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
