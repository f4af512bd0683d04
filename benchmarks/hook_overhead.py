"""Overhead of the routing hook: generate() wall time with the hook off, on (rows discarded) and
on while streaming a Parquet trace.

    python benchmarks/hook_overhead.py                 # CPU
    python benchmarks/hook_overhead.py --device cuda   # a GPU
    python benchmarks/hook_overhead.py --json --out benchmarks/results/hook_overhead_cpu.json

Models are random-weight Mixtral-style configs (no download); sizes are listed in the output.
Each configuration runs ``--repeats`` times with the three modes interleaved (so drift hits all
three alike); the medians are reported. Overhead % = (median on - median off) / median off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# (name, hidden, intermediate, layers, experts, top_k)
SIZES = {
    "tiny": (64, 128, 2, 8, 2),
    "small": (512, 1024, 8, 8, 2),
    "medium": (1024, 2816, 8, 16, 2),
}


def build(size: str, device: str, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, layers, experts, top_k = SIZES[size]
    cfg = AutoConfig.for_model(
        "mixtral", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
        num_experts_per_tok=top_k, vocab_size=32000, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=None, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def inputs(batch: int, prompt_len: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):  # left padding: row r is r*prompt_len/(2*batch) tokens shorter
        pad = row * prompt_len // (2 * batch)
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def timed_generate(model, enc, new_tokens: int, device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one generate()."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(size: str, args) -> dict:
    import torch

    from moesim.traces.hook import RoutingRecorder, TraceSink

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build(size, args.device, dtype)
    enc = inputs(args.batch, args.prompt_len, args.device)
    times = {"off": [], "hook": [], "hook+parquet": []}
    cpu = {"off": [], "hook": [], "hook+parquet": []}
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        timed_generate(model, enc, 2, args.device)  # warm-up
        meta = RoutingRecorder(model, lambda r: None).meta_fields(size)
        for rep in range(args.repeats):
            for mode, (wall, used) in (
                ("off", timed_generate(model, enc, args.new_tokens, args.device)),
                ("hook", _with_hook(model, enc, args, lambda r: None)),
                ("hook+parquet", _with_hook(model, enc, args,
                                            TraceSink(Path(tmp) / f"t{rep}.parquet", meta))),
            ):
                times[mode].append(wall)
                cpu[mode].append(used)
        rows = _rows_written(Path(tmp) / "t0.parquet")
    off = statistics.median(times["off"])
    hidden, inter, layers, experts, top_k = SIZES[size]
    result = {
        "size": size, "hidden": hidden, "intermediate": inter, "layers": layers,
        "experts": experts, "top_k": top_k, "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "rows_per_generate": rows, "repeats": args.repeats,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
    }
    cpu_off = statistics.median(cpu["off"])
    result["overhead_pct"] = {k: 100.0 * (statistics.median(v) - off) / off
                              for k, v in times.items() if k != "off"}
    result["cpu_overhead_pct"] = {k: 100.0 * (statistics.median(v) - cpu_off) / cpu_off
                                  for k, v in cpu.items() if k != "off"}
    return result


def _with_hook(model, enc, args, sink) -> tuple[float, float]:
    """generate() with the recorder attached; a TraceSink is closed inside the timing."""
    from moesim.traces.hook import RoutingRecorder, TraceSink

    t0, c0 = time.perf_counter(), time.process_time()
    with RoutingRecorder(model, sink):
        timed_generate(model, enc, args.new_tokens, args.device)
    if isinstance(sink, TraceSink):
        sink.close()  # the footer and the rename are part of the cost
    return time.perf_counter() - t0, time.process_time() - c0


def _rows_written(path: Path) -> int:
    from moesim.traces import Trace

    return Trace.read(path).num_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="tiny,small", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch default); 1 keeps a shared machine's noise down")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    report = {
        "benchmark": "hook_overhead", "device": args.device, "device_name": device_name,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "command": " ".join(["python benchmarks/hook_overhead.py", *(argv or sys.argv[1:])]),
        "results": [measure(size, args) for size in args.sizes.split(",")],
    }
    if args.out:
        from moesim.fileio import write_json_atomic

        write_json_atomic(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"hook overhead on {device_name} ({report['torch_threads']} threads), "
          f"generate(batch={args.batch}, prompt={args.prompt_len}, new={args.new_tokens}), median of {args.repeats}")
    for r in report["results"]:
        m, o = r["median_s"], r["overhead_pct"]
        print(f"  {r['size']:6s} hidden {r['hidden']:5d} x {r['layers']} layers, {r['experts']} experts top-{r['top_k']}, "
              f"{r['rows_per_generate']} rows: off {m['off']:.3f} s, hook {m['hook']:.3f} s ({o['hook']:+.1f}%), "
              f"hook+parquet {m['hook+parquet']:.3f} s ({o['hook+parquet']:+.1f}%)")
        c, co = r["median_cpu_s"], r["cpu_overhead_pct"]
        print(f"  {'':6s} CPU time: off {c['off']:.3f} s, hook {c['hook']:.3f} s ({co['hook']:+.1f}%), "
              f"hook+parquet {c['hook+parquet']:.3f} s ({co['hook+parquet']:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
