"""Capture the small reference runs committed under traces/runs/ and validate them.

Each run is a real offloaded run on this machine, with the model's own routing (no third-party
data: the files may be committed), its experts read cold through an emulated 0.7 GB/s device
(see benchmarks/cpu_validation.py for why), 16 warm-up tokens then 48 measured tokens:

- ``stack-dsv2lite-lru``: the synthetic stack at DeepSeek-V2-Lite's dimensions, 3 layers, LRU 48;
- ``hf-qwen3moe-lfu``: transformers' Qwen3-MoE at Qwen3-30B-A3B's dimensions (64 experts, top-6,
  3 layers, bf16, random weights), LFU 48.

Beside each run file goes the profile it was validated against (``moesim calibrate`` quick plus
``calibrate-executor`` through the same device, taken right before the run) and the validation
figures (``*.validation.json``). tests/test_reference_runs.py validates the committed files
offline and checks that the figures come out the same.

    python benchmarks/reference_runs.py [--out traces/runs] [--work /tmp/moesim-reference-runs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
READ_GBPS = 0.7
WARMUP, TOKENS, LAYERS = 16, 48, 3
FIGURES = ("latency_mape", "bytes_exact", "hits_exact", "hit_rate", "bytes_measured",
           "p50_error", "p99_error", "mean_latency_measured_s", "mean_latency_simulated_s",
           "io_replay_mape", "tokens")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "traces" / "runs"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "moesim-reference-runs"))
    args = ap.parse_args()
    from moesim.calibrate import measure_machine
    from moesim.executor import RunSettings, StackSpec, capture, store_for
    from moesim.executor.calibrate import extend_profile
    from moesim.executor.hf import capture_hf, load_hf, store_for_hf
    from moesim.fileio import write_json_atomic, write_text_atomic
    from moesim.model import get_model
    from moesim.validate import validate

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cpu_validation import HF_QWEN3

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    hf = load_hf("tiny:qwen3_moe", overrides=dict(HF_QWEN3, num_hidden_layers=LAYERS),
                 dtype="bf16")
    stack = StackSpec.for_model(get_model("deepseek-v2-lite"), LAYERS)
    runs = {
        "stack-dsv2lite-lru": (stack, RunSettings(policy="lru", capacity_experts=48,
                                                  io_threads=1, warmup_tokens=WARMUP,
                                                  read_gbps=READ_GBPS)),
        "hf-qwen3moe-lfu": (hf, RunSettings(policy="lfu", capacity_experts=48, io_threads=1,
                                            warmup_tokens=WARMUP, read_gbps=READ_GBPS)),
    }
    for name, (model, settings) in runs.items():
        is_hf = model is hf
        spec = hf.spec if is_hf else model
        store = (store_for_hf(work / "store", hf, read_gbps=READ_GBPS) if is_hf
                 else store_for(work / "store", spec, read_gbps=READ_GBPS))
        profile = out / f"{name}.profile.yaml"
        write_text_atomic(profile, yaml.safe_dump(measure_machine(str(work), quick=True),
                                                  sort_keys=False))
        extend_profile(profile, [spec], threads=1, disk_dir=str(work), read_gbps=READ_GBPS,
                       loop_stores=None if is_hf else [store])
        if is_hf:
            run = capture_hf(hf, settings, work / "store", tokens=WARMUP + TOKENS)
        else:
            run = capture(spec, settings, work / "store", tokens=WARMUP + TOKENS)
        path = run.write(out / f"{name}.parquet")
        r = validate(path, profile)
        figures = {k: r[k] for k in FIGURES}
        write_json_atomic(out / f"{name}.validation.json", figures)
        print(f"{name}: {path.stat().st_size / 1024:.0f} KiB, " + json.dumps(figures))


if __name__ == "__main__":
    main()
