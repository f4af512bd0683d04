"""Validation: simulate what a real run did and compare, token by token.

From a run file (``moesim run-real``) and a hardware profile of the same machine
(``moesim calibrate``, optionally extended with the executor's primitives by
``moesim run-real calibrate``) this builds the simulator scenario -- the device model of
``moesim.offload`` with the dense time, per-expert time and per-read time the profile predicts,
the run's I/O threads as channels -- and replays the run's routing through a *fresh* instance
of the same cache policy (and prefetcher) with the same seed. Nothing measured in the run feeds
the prediction; the run's timings are only compared against.

Compared: bytes moved and the hit/miss sequence (must be identical), per-token latency (MAPE,
P50 and P99 error), per-layer dense and expert compute time, and read durations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

BLOCK = 4096


class ValidationError(MoesimError):
    """A run file or profile that cannot be validated as given."""


@dataclass
class Scenario:
    """The simulator inputs built for one run (seconds, bytes)."""

    dense_s: float
    expert_s: float
    read_latency_s: float
    read_bandwidth: float
    header_bytes: int
    block_rounding: bool
    channels: int
    sources: dict

    def load_s(self, payload_bytes: float) -> float:
        nbytes = payload_bytes + self.header_bytes
        if self.block_rounding:
            nbytes = math.ceil(nbytes / BLOCK) * BLOCK
        return self.read_latency_s + nbytes / self.read_bandwidth

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _spec_of(run):
    from moesim.executor.stack import StackSpec
    from moesim.model import get_model

    st = run.meta.capture["stack"]
    return StackSpec(get_model(st["model"], **(st.get("overrides") or {})), int(st["layers"]), int(st["num_experts"]),
                     int(st["top_k"]), st["dtype"], int(st.get("seed", 0)))


def build_scenario(run, profile) -> Scenario:
    """Predicted primitive times of the run's stack on the profiled machine."""
    from moesim.cost import CostModel

    cap = run.meta.capture
    settings = cap["settings"]
    spec = _spec_of(run)
    cuda = settings.get("device") == "cuda"
    device = profile.accelerator if cuda else profile.device
    if device is None:
        raise ValidationError("the run used CUDA but the profile has no accelerator: calibrate "
                              "on the GPU machine")
    cost = CostModel(device, profile.table, act_dtype=spec.dtype)
    model = replace(spec.model, expert_dtype=spec.dtype, dense_dtype=spec.dtype,
                    num_experts=spec.num_experts)
    expert_s = float(cost.expert_times(model, [1])[0])
    dense_s = cost._table("moe_dense", spec.dense_shape, spec.dtype, 1)
    sources = {"expert_s": "profile table expert_ffn" if profile.table and (
        "expert_ffn", spec.expert_shape, spec.dtype) in profile.table.curves else "roofline"}
    if dense_s is None:
        dense_s = cost.router_time(model, 1) + cost.shared_expert_time(model, 1)
        sources["dense_s"] = "roofline (router + shared experts)"
    else:
        sources["dense_s"] = "profile table moe_dense"
    if cuda:
        link = profile.links.get("host_to_device")
        if link is None:
            raise ValidationError("the profile has no host_to_device link: calibrate with CUDA")
        channels, rounding, header = 1, False, 0
    else:
        link = profile.links.get("expert_read") or profile.links.get("storage")
        if link is None:
            raise ValidationError("the profile has no storage link: run 'moesim calibrate'")
        channels = int(settings.get("io_threads", 1))
        rounding = cap.get("cold_read") == "direct"
        header = int(cap.get("file_header_bytes", 0))
    sources["read"] = f"profile link {link.name}: {link.source}"
    return Scenario(float(dense_s), expert_s, float(link.latency), float(link.bandwidth), header,
                    rounding, channels, sources)


def simulate_run(run, scenario: Scenario):
    """Replay the run's routing through the device model; return (per-token DataFrame, hits per
    lookup (0 miss, 1 hit, 2 prefetch hit), miss bytes per lookup, policy stats)."""
    from moesim.cache import make_layout, make_policy
    from moesim.offload import OffloadConfig, simulate
    from moesim.prefetch import make_prefetcher
    from moesim.replay import AccessStream

    s = run.meta.capture["settings"]
    stream = AccessStream.from_trace(run, "token", expert_bytes=run.meta.expert_bytes)
    layout = make_layout(stream.num_layers, stream.num_experts, stream.expert_bytes,
                         capacity_bytes=s.get("capacity_bytes"),
                         capacity_experts=s.get("capacity_experts"), scope=s.get("scope", "global"))
    policy = make_policy(s["policy"], layout, seed=int(s.get("seed", 0)),
                         **(s.get("policy_params") or {}))
    prefetcher = None
    if s.get("prefetcher") not in (None, "", "none"):
        prefetcher = make_prefetcher(s["prefetcher"], seed=int(s.get("seed", 0)),
                                     **(s.get("prefetch_params") or {}))
    codes: list[int] = []
    key_bytes = stream.key_bytes
    miss_bytes: list[int] = []
    lookup = policy.lookup

    def recording_lookup(keys, now, info=None, *, per_access=False):
        pre = [policy.resident.get(k) == 1 for k in keys]
        out = lookup(keys, now, info, per_access=per_access)
        for k, hit, p in zip(keys, out, pre, strict=True):
            codes.append(-1 if hit is None else (0 if hit is False else (2 if p else 1)))
            miss_bytes.append(int(key_bytes[k]) if hit is False else 0)
        return out

    loads: list[float] = []

    def counting_load_s(nbytes):  # called once per load the device model performs
        loads.append(nbytes)
        return scenario.load_s(nbytes)

    policy.lookup = recording_lookup
    config = OffloadConfig(dense_s=scenario.dense_s, expert_s=scenario.expert_s,
                           load_s=counting_load_s, channels=scenario.channels)
    df = simulate(stream, policy, config, prefetcher)
    stats = policy.stats.to_dict()
    stats["bytes_moved"] = int(sum(loads))
    stats["loads"] = len(loads)
    return df, np.asarray(codes, np.int8), np.asarray(miss_bytes, np.int64), stats


def _pct(pred, meas) -> float:
    return float(100.0 * (pred - meas) / meas) if meas else float("nan")


def compare(run, profile) -> dict:
    """All figures of the validation as one dict (JSON-ready) plus per-token arrays."""
    cap = run.meta.capture
    scen = build_scenario(run, profile)
    df, codes, sim_bytes, stats = simulate_run(run, scen)
    cols = ["residency", "read_bytes", "read_s", "t_dense_s", "t_expert_s", "t_wait_s",
            "t_layer_s", "t_step_s"]
    rows = {c: [] for c in cols}
    for b in run.iter_batches(columns=cols):
        for c in cols:
            rows[c].append(b.extras[c])
    cat = {c: np.concatenate(v) for c, v in rows.items()}
    meas_codes = cat["residency"].reshape(-1).astype(np.int8)
    meas_bytes = cat["read_bytes"].reshape(-1).astype(np.int64)
    transfers = cap.get("transfers") or {}
    moved = int(np.sum(transfers.get("payload_bytes", [])))
    # bytes the device model loaded (a load in flight serves every request of its key, in the
    # simulator as in the executor), against the bytes the executor's reads returned
    sim_moved = stats["bytes_moved"]
    L = run.meta.num_layers
    step = cat["t_step_s"].reshape(-1, L)[:, 0]
    sim_lat = df.sort_values("token")["latency_s"].to_numpy()
    if len(sim_lat) != len(step):
        raise ValidationError(f"the simulator produced {len(sim_lat)} tokens, the run {len(step)}")
    err = (sim_lat - step) / step
    dense = cat["t_dense_s"].reshape(-1, L)
    n_exp = (cat["residency"] >= 0).sum(axis=1).reshape(-1, L)
    per_expert = cat["t_expert_s"].reshape(-1, L) / np.maximum(n_exp, 1)
    reads = cat["read_s"].reshape(-1)
    reads = reads[np.isfinite(reads)]
    rb = cat["read_bytes"].reshape(-1)
    rb = rb[rb > 0]
    pred_reads = np.array([scen.load_s(x) for x in rb]) if len(rb) else np.zeros(0)
    layers = []
    for layer in range(L):
        md, me = float(np.median(dense[:, layer])), float(np.median(per_expert[:, layer]))
        layers.append({"layer": layer, "dense_measured_s": md, "dense_predicted_s": scen.dense_s,
                       "dense_error_pct": _pct(scen.dense_s, md), "expert_measured_s": me,
                       "expert_predicted_s": scen.expert_s,
                       "expert_error_pct": _pct(scen.expert_s, me)})
    p50m, p99m = np.percentile(step, [50, 99])
    p50s, p99s = np.percentile(sim_lat, [50, 99])
    result = {
        "run": str(run.path) if run.path else None,
        "tokens": int(len(step)),
        "layers": L,
        "policy": cap["settings"]["policy"],
        "prefetcher": cap["settings"].get("prefetcher", "none"),
        "capacity_experts": cap["settings"].get("capacity_experts"),
        "capacity_bytes": cap["settings"].get("capacity_bytes"),
        "model": run.meta.model,
        "device": cap["settings"].get("device", "cpu"),
        "hits_exact": bool(len(codes) == len(meas_codes) and np.array_equal(codes, meas_codes)),
        "hit_mismatches": int(np.sum(codes != meas_codes)) if len(codes) == len(meas_codes)
        else int(abs(len(codes) - len(meas_codes))),
        "bytes_exact": bool(moved == sim_moved and np.array_equal(sim_bytes, meas_bytes)
                            and len(transfers.get("key", [])) == stats["loads"]),
        "bytes_measured": moved,
        "bytes_simulated": sim_moved,
        "transfers_measured": len(transfers.get("key", [])),
        "transfers_simulated": stats["loads"],
        "hit_rate": float(np.mean(meas_codes[meas_codes >= 0] > 0)),
        "latency_mape": float(100.0 * np.mean(np.abs(err))),
        "latency_bias_pct": float(100.0 * (sim_lat.sum() - step.sum()) / step.sum()),
        "p50_measured_s": float(p50m), "p50_simulated_s": float(p50s),
        "p50_error": _pct(p50s, p50m),
        "p99_measured_s": float(p99m), "p99_simulated_s": float(p99s),
        "p99_error": _pct(p99s, p99m),
        "mean_latency_measured_s": float(step.mean()),
        "mean_latency_simulated_s": float(sim_lat.mean()),
        "dense_error_pct": _pct(scen.dense_s, float(np.median(dense))),
        "expert_error_pct": _pct(scen.expert_s, float(np.median(per_expert))),
        "read_measured_s": float(np.median(reads)) if len(reads) else None,
        "read_predicted_s": float(np.median(pred_reads)) if len(pred_reads) else None,
        "read_error_pct": (_pct(float(np.median(pred_reads)), float(np.median(reads)))
                           if len(reads) else None),
        "per_layer": layers,
        "scenario": scen.to_dict(),
        "machine": cap.get("machine", {}),
    }
    return result, {"measured": step, "simulated": sim_lat}


def validate(run_path, profile_path, report: str | Path | None = None) -> dict:
    """Validate one run file; write ``report``.md and .html when given; return the figures."""
    from moesim.calibrate import load_profile
    from moesim.executor.runfile import read_run

    run = read_run(run_path)
    profile = load_profile(profile_path)
    result, series = compare(run, profile)
    result["profile"] = str(profile_path)
    if report is not None:
        base = Path(report)
        base = base.with_suffix("") if base.suffix in (".md", ".html") else base
        write_reports(result, series, base)
        result["report_md"] = str(base.with_suffix(".md"))
        result["report_html"] = str(base.with_suffix(".html"))
    return result


# ----- reports ---------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    ms = 1e3
    lines = [
        f"# Validation of {r['run']}",
        "",
        f"Model shape {r['model']}, {r['layers']} MoE layers, {r['tokens']} tokens, device "
        f"{r['device']}; policy {r['policy']} (prefetch {r['prefetcher']}), capacity "
        f"{r['capacity_experts'] or r['capacity_bytes']}; profile {r.get('profile')}.",
        "",
        "| check | measured | simulated | error |",
        "|---|---|---|---|",
        f"| hit/miss sequence | hit rate {r['hit_rate']:.3f} | | exact: {r['hits_exact']} "
        f"({r['hit_mismatches']} mismatches) |",
        f"| bytes moved | {r['bytes_measured']:,} | {r['bytes_simulated']:,} | exact: "
        f"{r['bytes_exact']} |",
        f"| per-token latency (MAPE) | | | {r['latency_mape']:.2f} % |",
        f"| mean latency | {r['mean_latency_measured_s'] * ms:.2f} ms | "
        f"{r['mean_latency_simulated_s'] * ms:.2f} ms | {r['latency_bias_pct']:+.2f} % |",
        f"| P50 latency | {r['p50_measured_s'] * ms:.2f} ms | {r['p50_simulated_s'] * ms:.2f} ms "
        f"| {r['p50_error']:+.2f} % |",
        f"| P99 latency | {r['p99_measured_s'] * ms:.2f} ms | {r['p99_simulated_s'] * ms:.2f} ms "
        f"| {r['p99_error']:+.2f} % |",
    ]
    if r["read_measured_s"] is not None:
        lines.append(f"| expert read (median) | {r['read_measured_s'] * ms:.2f} ms | "
                     f"{r['read_predicted_s'] * ms:.2f} ms | {r['read_error_pct']:+.2f} % |")
    lines += ["", "## Per layer (medians over tokens)", "",
              "| layer | dense measured | dense predicted | error | expert measured | "
              "expert predicted | error |", "|---|---|---|---|---|---|---|"]
    for row in r["per_layer"]:
        lines.append(f"| {row['layer']} | {row['dense_measured_s'] * ms:.3f} ms | "
                     f"{row['dense_predicted_s'] * ms:.3f} ms | {row['dense_error_pct']:+.1f} % | "
                     f"{row['expert_measured_s'] * ms:.3f} ms | "
                     f"{row['expert_predicted_s'] * ms:.3f} ms | {row['expert_error_pct']:+.1f} % |")
    lines += ["", "## Scenario", ""]
    for k, v in r["scenario"].items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def write_reports(result: dict, series: dict, base: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from moesim.fileio import write_text_atomic

    write_text_atomic(base.with_suffix(".md"), markdown(result))
    meas, sim = series["measured"] * 1e3, series["simulated"] * 1e3
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-token latency (ms)",
                                                        "simulated vs measured (ms)"))
    tok = np.arange(len(meas))
    fig.add_trace(go.Scatter(x=tok, y=meas, name="measured", mode="lines"), 1, 1)
    fig.add_trace(go.Scatter(x=tok, y=sim, name="simulated", mode="lines"), 1, 1)
    fig.add_trace(go.Scatter(x=meas, y=sim, mode="markers", name="tokens"), 1, 2)
    hi = float(max(meas.max(), sim.max())) if len(meas) else 1.0
    fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="y = x",
                             line={"dash": "dot"}), 1, 2)
    fig.update_layout(title=f"{result['model']} {result['policy']} cap "
                            f"{result['capacity_experts'] or result['capacity_bytes']}: MAPE "
                            f"{result['latency_mape']:.2f} %, bytes exact {result['bytes_exact']}"
                            f", hits exact {result['hits_exact']}")
    write_text_atomic(base.with_suffix(".html"), fig.to_html(include_plotlyjs="cdn"))
