"""Import throughput of the trace importers (rows of the resulting trace per second).

    python benchmarks/import_bench.py [--out benchmarks/results/import_bench.json]

Times ``import_trace`` (parse, validate, build the in-memory trace) on the real recordings in
../shared/data when present (the four ESFT npz files, the phone route_trace CSV), and on
synthetic inputs in the documented shapes of the other formats (seeded): a vLLM ``.npz`` of
32 requests x 1024 tokens, a route_trace CSV of 2,000 tokens, an SGLang per_token dump (if
torch is installed), and a MoE-Infinity count matrix. Each figure is the best of 3 runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOESIM_SHARED_DATA", REPO.parent / "shared" / "data"))
L, E, K = 48, 128, 8  # Qwen3-30B-A3B shape


def routing(rng, tokens: int, k: int = K) -> np.ndarray:
    """Distinct top-k ids per (token, layer) with a skewed popularity."""
    scores = rng.random((tokens, L, E)) ** (1.0 / (1.0 + np.arange(E) % 7))
    return np.argsort(-scores, axis=2)[:, :, :k].astype(np.int32)


def write_inputs(folder: Path, rng) -> dict[str, tuple[str, Path]]:
    inputs = {}
    vllm = {f"req{i}": routing(rng, 1024) for i in range(32)}
    np.savez(folder / "vllm.npz", **vllm, prompt_lens=np.full(32, 512))
    inputs["vllm-routed-experts (32 x 1024 tokens, .npz)"] = ("vllm-routed-experts", folder / "vllm.npz")

    ids = routing(rng, 2000, k=6)
    lines = ["# route_trace v1", f"# model=synthetic arch=qwen3moe n_layer={L} n_expert={E} n_expert_used=6"]
    lines += [f"# layer={i} expert_bytes=3059712 dense_bytes=11953152" for i in range(L)]
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    for t in range(2000):
        phase = int(t >= 100)
        for layer in range(L):
            for slot in range(6):
                lines.append(f"0,{phase},{t},{layer},{slot},{ids[t, layer, slot]},0.1667,1,0")
    (folder / "route.csv").write_text("\n".join(lines) + "\n")
    inputs["route-trace-v1 (2000 tokens, synthetic CSV)"] = ("route-trace-v1", folder / "route.csv")

    np.save(folder / "eam.npy", rng.integers(0, 200, size=(1000, L, E)))
    inputs["moe-infinity (1000 sequences)"] = ("moe-infinity", folder / "eam.npy")

    try:
        import torch
    except ImportError:
        return inputs
    records = []
    for p in range(64):  # 64 passes of 256 tokens (one request each, chunked prefill)
        topk = torch.full((L, 256, 8), -1, dtype=torch.int32)
        topk[:, :, :K] = torch.from_numpy(routing(rng, 256).transpose(1, 0, 2).copy())
        records.append(dict(forward_pass_id=p, rank=0, gatherer_key="primary",
                            input_ids=[0] * 256, positions=list(range(256 * p, 256 * (p + 1))),
                            extend_seq_lens=[256], forward_mode=1, topk_ids_of_layer=topk,
                            misc_objects=[]))
    torch.save(dict(records=records, last_physical_to_logical_map=torch.arange(E).repeat(L, 1)),
               folder / "sglang.pt")
    inputs["sglang-per-token (64 passes x 256 tokens)"] = ("sglang-per-token", folder / "sglang.pt")
    return inputs


def real_inputs() -> dict[str, tuple[str, Path]]:
    inputs = {}
    for path in sorted((SHARED / "esft-dsv2lite").glob("esft_*.npz")):
        inputs[f"arrays-npz ({path.name})"] = ("arrays-npz", path)
    phone = SHARED / "edge-qwen3-phone" / "qwen.route.csv"
    if phone.exists():
        inputs["route-trace-v1 (qwen.route.csv, phone)"] = ("route-trace-v1", phone)
    return inputs


def time_import(fmt: str, path: Path, repeats: int = 3) -> dict:
    from moesim.traces.importers import import_trace

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        trace = import_trace(path, fmt)
        best = min(best, time.perf_counter() - start)
    rows = trace.num_rows
    return {"format": fmt, "rows": rows, "seconds": round(best, 4),
            "rows_per_s": round(rows / best), "input_bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {**real_inputs(), **write_inputs(Path(tmp), rng)}
        for name, (fmt, path) in cases.items():
            results[name] = time_import(fmt, path)
            r = results[name]
            print(f"{name:50s} {r['rows']:>9,d} rows  {r['seconds']:7.3f} s  {r['rows_per_s']:>11,d} rows/s")
    if args.out:
        from moesim.fileio import write_json_atomic

        meta = {"python": sys.version.split()[0], "machine": platform.machine(),
                "cpus": os.cpu_count(), "command": "python benchmarks/import_bench.py --out ..."}
        write_json_atomic(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
