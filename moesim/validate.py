"""Validation: simulate what a real run did and compare, token by token.

From a run file (``moesim run-real``) and a hardware profile of the same machine
(``moesim calibrate``, optionally extended with the executor's primitives by
``moesim calibrate-executor``) this builds the simulator scenario -- the device model of
``moesim.offload`` with the dense time, per-expert time, per-layer overhead and per-read time
the profile predicts, the run's I/O threads as channels sharing one disk -- and replays the run's routing through a *fresh* instance
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
    layer_overhead_s: float = 0.0
    shared_bandwidth: float | None = None  # bytes/s of all I/O threads together (CPU disk)

    def load_s(self, payload_bytes: float) -> float:
        nbytes = payload_bytes + self.header_bytes
        if self.block_rounding:
            nbytes = math.ceil(nbytes / BLOCK) * BLOCK
        return self.read_latency_s + nbytes / self.read_bandwidth

    def disk(self):
        """The shared-bandwidth disk of a CPU run (None for CUDA copies)."""
        from moesim.storage import SharedDisk

        if self.shared_bandwidth is None:
            return None
        return SharedDisk(self.read_latency_s, self.read_bandwidth, self.shared_bandwidth,
                          self.header_bytes, BLOCK if self.block_rounding else 1)

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
    from moesim.executor.calibrate import overhead_shape

    overhead = cost._table("executor_overhead", overhead_shape(spec), spec.dtype, 1)
    sources["layer_overhead_s"] = ("profile table executor_overhead" if overhead is not None
                                   else "none in the profile (0)")
    shared = None
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
        both = profile.links.get("expert_read_shared")
        if channels == 1:
            shared = float(link.bandwidth)
        elif both is not None:
            shared = float(both.bandwidth)
            sources["shared_bandwidth"] = f"profile link {both.name}: {both.source}"
        else:
            shared = channels * float(link.bandwidth)
            sources["shared_bandwidth"] = "no expert_read_shared link: threads independent"
    sources["read"] = f"profile link {link.name}: {link.source}"
    return Scenario(float(dense_s), expert_s, float(link.latency), float(link.bandwidth), header,
                    rounding, channels, sources, float(overhead or 0.0), shared)


def simulate_run(run, scenario: Scenario, read_durations=None):
    """Replay the run's routing through the device model; return (per-token DataFrame, hits per
    lookup (0 miss, 1 hit, 2 prefetch hit), miss bytes per lookup, policy stats).

    ``read_durations`` (seconds, in the order the reads were issued) replaces the disk model:
    each load then takes the duration its read took in the run (a diagnostic, see
    ``io_replay_mape``)."""
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
    load_s, disk = scenario.load_s, scenario.disk()
    if read_durations is not None:
        measured = iter(read_durations)

        def load_s(_nbytes):  # called once per load, when the load is issued
            return next(measured)

        disk = None
    config = OffloadConfig(dense_s=scenario.dense_s, expert_s=scenario.expert_s,
                           load_s=load_s, channels=scenario.channels,
                           layer_overhead_s=scenario.layer_overhead_s, disk=disk)
    df = simulate(stream, policy, config, prefetcher, record=True)
    lookups, loads = df.attrs["lookups"], df.attrs["loads"]
    stats = policy.stats.to_dict()
    stats["bytes_moved"] = int(np.sum(loads["bytes"]))
    stats["loads"] = len(loads["bytes"])
    return df, lookups["hit"], lookups["miss_bytes"], stats


def _pct(pred, meas) -> float:
    return float(100.0 * (pred - meas) / meas) if meas else float("nan")


def _measured(run) -> dict:
    cols = ["residency", "read_bytes", "read_s", "t_dense_s", "t_expert_s", "t_wait_s",
            "t_layer_s", "t_step_s"]
    rows = {c: [] for c in cols}
    for b in run.iter_batches(columns=cols):
        for c in cols:
            rows[c].append(b.extras[c])
    return {c: np.concatenate(v) for c, v in rows.items()}


def _overhead(cat, L):
    """Per token and layer: the wall time besides dense part, expert compute and read waits."""
    return (cat["t_step_s"].reshape(-1, L)[:, 0] - cat["t_dense_s"].reshape(-1, L).sum(1)
            - cat["t_expert_s"].reshape(-1, L).sum(1) - cat["t_wait_s"].reshape(-1, L).sum(1)) / L


def warmup_scenario(run, scen: Scenario, cat: dict, warmup: int) -> Scenario:
    """The scenario recalibrated on the run's warm-up tokens (excluded from the figures): the
    dense part, per-expert compute and per-layer overhead are their medians over those tokens,
    and the read bandwidths are scaled so that the simulated warm-up reads match the measured
    ones in median (the profile's per-read latency and shared/single ratio are kept)."""
    L = run.meta.num_layers
    rows = warmup * L
    res = cat["residency"][:rows]
    n_exp = np.maximum((res >= 0).sum(axis=1), 1)
    new = replace(scen, dense_s=float(np.median(cat["t_dense_s"][:rows])),
                  expert_s=float(np.median(cat["t_expert_s"][:rows] / n_exp)),
                  layer_overhead_s=max(float(np.median(_overhead(cat, L)[:warmup])), 0.0))
    meas = cat["read_s"][:rows]
    meas = meas[np.isfinite(meas)]
    if len(meas):
        df = simulate_run(run, new)[0]
        loads = df.attrs["loads"]
        end = float(df.sort_values("token")["end_s"].to_numpy()[warmup - 1])
        mine = (loads["priority"] == 0) & (loads["issued_s"] < end)
        sim = (loads["end_s"] - loads["start_s"])[mine]
        lat = min(scen.read_latency_s, 0.5 * float(np.median(meas)))
        # the simulated reads moved their bytes in (sim - the profile's latency); they must move
        # them in (meas - the new latency): a profile whose fitted latency exceeds ``lat`` would
        # otherwise come out too fast
        if len(sim) and np.median(sim) > scen.read_latency_s:
            k = (float(np.median(sim)) - scen.read_latency_s) / (float(np.median(meas)) - lat)
            new = replace(new, read_latency_s=lat, read_bandwidth=scen.read_bandwidth * k,
                          shared_bandwidth=(scen.shared_bandwidth * k if scen.shared_bandwidth
                                            else None))
    src = f"warm-up tokens 0..{warmup - 1} of the run (excluded from the figures)"
    new.sources = {**scen.sources, "dense_s": src, "expert_s": src, "layer_overhead_s": src,
                   "read": f"{scen.sources['read']}; bandwidth scaled to the {src}"}
    return new


def io_replay_mape(run, scen: Scenario, step, W: int) -> float | None:
    """Latency MAPE over the measured tokens with every read replayed at the duration it took
    in the run (dense, expert and overhead times still from ``scen``). A diagnostic, not a
    prediction: it separates the error of the compute / overlap model from the error of the
    read-time model (a disk whose speed changes during the run shows as a large
    ``latency_mape`` with a small ``io_replay_mape``). None when the run's reads cannot be
    paired one to one with the simulator's loads."""
    tr = run.meta.capture.get("transfers") or {}
    if not len(tr.get("key", [])):
        return None
    issued = np.asarray(tr["issued_s"], dtype=float)
    order = np.argsort(issued, kind="stable")  # the executor's submission order
    dur = (np.asarray(tr["end_s"], dtype=float) - np.asarray(tr["start_s"], dtype=float))[order]
    try:
        df, _, _, stats = simulate_run(run, scen, read_durations=dur.tolist())
    except StopIteration:
        return None
    if stats["loads"] != len(dur):
        return None
    sim = df.sort_values("token")["latency_s"].to_numpy()[W:]
    return float(100.0 * np.mean(np.abs(sim - step) / step))


def compare(run, profile, warmup_calibration: bool = True) -> dict:
    """All figures of the validation as one dict (JSON-ready) plus per-token arrays.

    A run with ``warmup_tokens`` W > 0 (``moesim run-real --warmup-tokens``) is simulated
    whole (cache state carries over) but its figures cover tokens W.. only; with
    ``warmup_calibration`` the scenario's times are recalibrated on the warm-up tokens."""
    cap = run.meta.capture
    scen = build_scenario(run, profile)
    cat = _measured(run)
    L = run.meta.num_layers
    W = int(cap["settings"].get("warmup_tokens", 0) or 0)
    if W >= len(cat["t_step_s"]) // L:
        raise ValidationError(f"the run has no tokens after its {W} warm-up tokens")
    if W and warmup_calibration:
        scen = warmup_scenario(run, scen, cat, W)
    df, codes, sim_bytes, stats = simulate_run(run, scen)
    meas_codes = cat["residency"].reshape(-1).astype(np.int8)
    meas_bytes = cat["read_bytes"].reshape(-1).astype(np.int64)
    transfers = cap.get("transfers") or {}
    moved = int(np.sum(transfers.get("payload_bytes", [])))
    # bytes the device model loaded (a load in flight serves every request of its key, in the
    # simulator as in the executor), against the bytes the executor's reads returned
    sim_moved = stats["bytes_moved"]
    step = cat["t_step_s"].reshape(-1, L)[:, 0]
    sim_lat = df.sort_values("token")["latency_s"].to_numpy()
    if len(sim_lat) != len(step):
        raise ValidationError(f"the simulator produced {len(sim_lat)} tokens, the run {len(step)}")
    rest = _overhead(cat, L)[W:]
    # the figures below cover the measured tokens only (the warm-up is excluded)
    step, sim_lat = step[W:], sim_lat[W:]
    cat = {c: v[W * L:] for c, v in cat.items()}
    err = (sim_lat - step) / step
    dense = cat["t_dense_s"].reshape(-1, L)
    n_exp = (cat["residency"] >= 0).sum(axis=1).reshape(-1, L)
    per_expert = cat["t_expert_s"].reshape(-1, L) / np.maximum(n_exp, 1)
    reads = cat["read_s"].reshape(-1)
    reads = reads[np.isfinite(reads)]
    rb = cat["read_bytes"].reshape(-1)
    rb = rb[rb > 0]
    pred_reads = np.array([scen.load_s(x) for x in rb]) if len(rb) else np.zeros(0)
    # reads of the measured tokens slower than 1.5x what the scenario predicts for their bytes:
    # the disk changed speed after the calibration (see io_replay_mape)
    rs_pair = cat["read_s"].reshape(-1)[cat["read_bytes"].reshape(-1) > 0]
    slow_pct = (float(100.0 * np.mean(rs_pair > 1.5 * pred_reads)) if len(pred_reads)
                and len(rs_pair) == len(pred_reads) else None)
    loads = df.attrs["loads"]
    t_first = float(df.sort_values("token")["start_s"].to_numpy()[W])
    sim_reads = (loads["end_s"] - loads["start_s"])[
        (loads["priority"] == 0) & (loads["issued_s"] >= t_first)] if len(loads["bytes"]) \
        else np.zeros(0)
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
        "warmup_tokens": W,
        "warmup_calibration": bool(W and warmup_calibration),
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
        "hit_rate": float(np.mean(cat["residency"][cat["residency"] >= 0] > 0)),
        "latency_mape": float(100.0 * np.mean(np.abs(err))),
        "abs_error_p50_pct": float(100.0 * np.median(np.abs(err))),
        "abs_error_p90_pct": float(100.0 * np.percentile(np.abs(err), 90)),
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
        "read_simulated_s": float(np.median(sim_reads)) if len(sim_reads) else None,
        "read_error_pct": (_pct(float(np.median(sim_reads)), float(np.median(reads)))
                           if len(reads) and len(sim_reads) else None),
        "read_mean_measured_s": float(np.mean(reads)) if len(reads) else None,
        "reads_slow_pct": slow_pct,
        "io_replay_mape": io_replay_mape(run, scen, step, W),
        "overhead_measured_s": float(np.median(rest)),
        "overhead_predicted_s": scen.layer_overhead_s,
        "per_layer": layers,
        "scenario": scen.to_dict(),
        "machine": cap.get("machine", {}),
    }
    return result, {"measured": step, "simulated": sim_lat}


def validate(run_path, profile_path, report: str | Path | None = None,
             warmup_calibration: bool = True) -> dict:
    """Validate one run file; write ``report``.md and .html when given; return the figures."""
    from moesim.calibrate import load_profile
    from moesim.executor.runfile import read_run

    run = read_run(run_path)
    profile = load_profile(profile_path)
    result, series = compare(run, profile, warmup_calibration)
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
        lines.append(f"| expert read (median, in the run) | {r['read_measured_s'] * ms:.2f} ms | "
                     f"{r['read_simulated_s'] * ms:.2f} ms | {r['read_error_pct']:+.2f} % |")
        lines.append(f"| expert read (mean, in the run) | {r['read_mean_measured_s'] * ms:.2f} ms "
                     f"| | {r['reads_slow_pct'] or 0:.1f} % of reads > 1.5x predicted |")
    if r.get("io_replay_mape") is not None:
        lines.append(f"| latency MAPE with the run's read durations replayed (diagnostic) | | | "
                     f"{r['io_replay_mape']:.2f} % |")
    lines.append(f"| per-layer overhead (median) | {r['overhead_measured_s'] * ms:.3f} ms | "
                 f"{r['overhead_predicted_s'] * ms:.3f} ms | |")
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
