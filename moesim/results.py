"""Results of a simulation: tidy DataFrames, invariants, a one-screen summary, a Perfetto timeline.

Tables (one row per thing):
- ``requests``: per request arrival, admission, first token, finish, TTFT, TPOT, end-to-end
  latency, tokens and preemptions;
- ``steps``: per forward step its start, duration, tokens, stage totals, all-to-all bytes;
- ``layers``: per step and MoE layer attention, dispatch, expert (slowest and mean GPU) and
  combine times, bytes sent and received, slowest and mean GPU load (token-expert pairs);
- ``gpu_loads`` (when ``simulation.record_gpu``): per step, layer and GPU the pairs received
  and the seconds of its grouped GEMM (``experts_s``).

Invariants checked on every run (``InvariantError`` is a simulator bug, never a user error):
every request finishes exactly once; tokens out = output tokens asked for; prefill tokens =
prompt tokens (+ recomputed tokens after preemption); all-to-all bytes sent = bytes received
per step and layer; steps never overlap; first token <= finish for every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moesim.fileio import write_json_atomic

SUMMARY_KEYS = ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "throughput_tok_s", "simulated_s",
                "wall_s")


class InvariantError(RuntimeError):
    """A written invariant of the simulation does not hold: a bug in the simulator."""


@dataclass
class Results:
    scenario: str
    requests: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame
    gpu_loads: pd.DataFrame | None
    summary: dict
    routing_report: dict
    invariants: dict = field(default_factory=dict)
    overlap: bool = False

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_simulation(cls, sim, simulated_s: float, wall_s: float) -> Results:
        s = sim.scheduler
        requests = pd.DataFrame({
            "request": np.arange(s.n),
            "group": s.group,
            "arrival_s": s.arrival,
            "admitted_s": s.admitted_s,
            "first_token_s": s.first_token_s,
            "finish_s": s.finish_s,
            "prompt_tokens": s.prompt,
            "output_tokens": s.output,
            "generated_tokens": s.generated,
            "preemptions": s.preemptions,
        })
        requests["ttft_s"] = requests.first_token_s - requests.arrival_s
        requests["e2e_s"] = requests.finish_s - requests.arrival_s
        decode_gaps = (requests.output_tokens - 1).where(requests.output_tokens > 1)
        requests["tpot_s"] = (requests.finish_s - requests.first_token_s) / decode_gaps
        cols = sim.layer_columns()
        steps = sim.step_table(cols)
        layers = _layer_frame(cols)
        gpu = None
        if sim.record_gpu and sim.gpu_loads:
            arr = np.concatenate(sim.gpu_loads)  # [steps, L, G]
            S, L, G = arr.shape
            gpu = pd.DataFrame({
                "step": np.repeat(np.arange(S), L * G),
                "layer": np.tile(np.repeat(np.arange(L), G), S),
                "gpu": np.tile(np.arange(G), S * L),
                "pairs": arr.ravel(),
                "experts_s": np.concatenate(sim.gpu_expert_s).ravel(),
            })
        res = cls(sim.scenario.name, requests, steps, layers, gpu, {}, sim.routing.report(),
                  overlap=sim.overlap)
        res.invariants = check_invariants(sim, res)
        res.summary = summarize(sim, res, simulated_s, wall_s)
        return res

    # ----- views --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**self.summary, "routing": self.routing_report, "invariants": self.invariants}

    def summary_text(self) -> str:
        return render_summary(self.summary, self.routing_report)

    def write_timeline(self, path) -> int:
        """Write a Chrome-trace/Perfetto JSON timeline; return the number of events."""
        events = timeline_events(self)
        write_json_atomic(path, {"traceEvents": events, "displayTimeUnit": "ms"}, indent=None)
        return len(events)


LAYER_COLUMNS = ("attention_s", "dispatch_s", "experts_max_s", "experts_mean_s", "combine_s",
                 "sent_bytes", "recv_bytes", "load_max", "load_mean", "start_s")


def _layer_frame(cols: dict) -> pd.DataFrame:
    if not cols:
        return pd.DataFrame(columns=["step", "layer", *LAYER_COLUMNS, "bottleneck"])
    S, L = cols["dispatch_s"].shape
    frame = pd.DataFrame({"step": np.repeat(np.arange(S), L), "layer": np.tile(np.arange(L), S)})
    for key in LAYER_COLUMNS:
        frame[key] = cols[key].ravel()
    frame["bottleneck"] = cols["bottleneck"]
    return frame


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------
def check_invariants(sim, res: Results) -> dict:
    s = sim.scheduler
    complete = not getattr(sim, "stopped_early", False)
    checks = {}

    def need(name: str, ok: bool, detail: str) -> None:
        checks[name] = bool(ok)
        if not ok:
            raise InvariantError(f"invariant '{name}' failed: {detail}")

    if complete:
        need("every_request_finishes_once", bool((s.finish_count == 1).all()),
             f"finish counts {np.unique(s.finish_count).tolist()}")
        need("tokens_out_equal_tokens_asked", bool((s.generated == s.output).all())
             and s.tokens_produced == int(s.output.sum()),
             f"produced {s.tokens_produced}, asked {int(s.output.sum())}")
        need("prefill_tokens_equal_prompts_plus_recompute",
             s.prefill_tokens == s.prefill_accounted()
             and (s.preemptions.any() or s.prefill_tokens == (0 if s.role == "decode"
                                                              else int(s.prompt.sum()))),
             f"prefilled {s.prefill_tokens}, accounted {s.prefill_accounted()}, "
             f"recomputed {s.recompute_tokens}")
    else:
        need("no_request_finishes_twice", bool((s.finish_count <= 1).all()), "a request finished twice")
        need("tokens_out_at_most_asked", bool((s.generated <= s.output).all()), "over-generation")
    if len(res.layers):
        sent, recv = res.layers.sent_bytes.to_numpy(), res.layers.recv_bytes.to_numpy()
        need("bytes_sent_equal_bytes_received",
             bool(np.allclose(sent, recv, rtol=1e-9, atol=1e-6)),
             f"largest gap {float(np.abs(sent - recv).max())} bytes")
    if len(res.steps):
        st = res.steps
        ends = (st.start_s + st.duration_s).to_numpy()
        need("steps_do_not_overlap", bool((st.start_s.to_numpy()[1:] >= ends[:-1] - 1e-12).all()),
             "a step starts before the previous one ends")
        need("step_durations_positive", bool((st.duration_s > 0).all()), "a step took no time")
    done = res.requests.dropna(subset=["finish_s"])
    need("first_token_before_finish", bool((done.first_token_s <= done.finish_s + 1e-12).all()
                                           and (done.ttft_s >= -1e-12).all()),
         "a request finished before its first token or before it arrived")
    return checks


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def _q(series: pd.Series, q: float) -> float:
    s = series.dropna()
    return float(s.quantile(q)) if len(s) else float("nan")


def _mean(series: pd.Series) -> float:
    s = series.dropna()
    return float(s.mean()) if len(s) else float("nan")


def summarize(sim, res: Results, simulated_s: float, wall_s: float) -> dict:
    r, st = res.requests, res.steps
    out_tokens = int(r.generated_tokens.sum())
    busy = sim.gpu_busy / simulated_s if simulated_s > 0 else sim.gpu_busy * 0
    n_steps = len(st)
    summary = {
        "scenario": sim.scenario.name,
        "model": sim.model.name,
        "cluster": f"{sim.cluster.num_nodes}x{sim.cluster.gpus_per_node} {sim.cluster.gpu.name}",
        "gpus": sim.layout.num_gpus,
        "attention_groups": sim.layout.num_groups,
        "tp": sim.layout.tp,
        "placement": sim.scenario.placement.kind,
        "dispatcher": sim.router.dispatcher.name,
        "overlap": sim.scenario.execution.overlap,
        "routing": sim.routing.kind,
        "requests": int(len(r)),
        "finished": int(r.finish_s.notna().sum()),
        "ttft_mean_s": _mean(r.ttft_s),
        "ttft_p50_s": _q(r.ttft_s, 0.5),
        "ttft_p99_s": _q(r.ttft_s, 0.99),
        "tpot_mean_s": _mean(r.tpot_s),
        "tpot_p50_s": _q(r.tpot_s, 0.5),
        "tpot_p99_s": _q(r.tpot_s, 0.99),
        "e2e_mean_s": _mean(r.e2e_s),
        "e2e_p99_s": _q(r.e2e_s, 0.99),
        "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / simulated_s if simulated_s > 0 else 0.0,
        "prefill_tok_s": float(st.prefill_tokens.sum()) / simulated_s if n_steps else 0.0,
        "steps": n_steps,
        "step_mean_s": float(st.duration_s.mean()) if n_steps else 0.0,
        "preemptions": int(r.preemptions.sum()),
        "gpu_utilisation_mean": float(busy.mean()),
        "gpu_utilisation_max": float(busy.max()),
        "kv_capacity_tokens_per_group": int(sim.kv_capacity),
        "weights_gb_per_gpu": sim.memory["weights_gb_per_gpu"],
        "simulated_s": float(simulated_s),
        "wall_s": float(wall_s),
        "sim_s_per_wall_s": float(simulated_s / wall_s) if wall_s > 0 else float("inf"),
    }
    if n_steps:
        total = st.duration_s.sum()
        summary.update({
            "time_share_dispatch": float(st.dispatch_s.sum() / total),
            "time_share_combine": float(st.combine_s.sum() / total),
            "time_share_experts": float(st.experts_s.sum() / total),
            "a2a_bytes_per_step": float(st.sent_bytes.mean()),
        })
    if len(res.layers):
        lay = res.layers
        imbalance = (lay.load_max / lay.load_mean.where(lay.load_mean > 0)).dropna()
        summary["gpu_load_max_over_mean"] = float(imbalance.mean()) if len(imbalance) else 1.0
    if sim.router.cache_hits or sim.router.cache_misses:
        summary["comm_cache_hits"] = sim.router.cache_hits
        summary["comm_cache_misses"] = sim.router.cache_misses
    if getattr(sim, "stopped_early", False):
        summary["stopped_early"] = True
    return summary


def render_summary(s: dict, routing: dict | None = None) -> str:
    """A one-screen text summary."""
    ms = 1e3

    def f(v, scale=1.0, fmt="{:.2f}"):
        return "n/a" if v is None or v != v else fmt.format(v * scale)

    lines = [
        f"scenario {s['scenario']}: {s['model']} on {s['cluster']} ({s['gpus']} GPUs, "
        f"{s['attention_groups']} attention groups x TP{s['tp']}, EP{s['gpus']})",
        f"  placement {s['placement']}, dispatcher {s['dispatcher']}, overlap {s['overlap']}, "
        f"routing {s['routing']}",
        f"  requests    {s['finished']}/{s['requests']} finished, {s['output_tokens']:,} output "
        f"tokens, {s['preemptions']} preemptions",
        f"  TTFT        mean {f(s['ttft_mean_s'], ms)} ms   p50 {f(s['ttft_p50_s'], ms)}   "
        f"p99 {f(s['ttft_p99_s'], ms)}",
        f"  TPOT        mean {f(s['tpot_mean_s'], ms)} ms   p50 {f(s['tpot_p50_s'], ms)}   "
        f"p99 {f(s['tpot_p99_s'], ms)}",
        f"  end-to-end  mean {f(s['e2e_mean_s'])} s    p99 {f(s['e2e_p99_s'])} s",
        f"  throughput  {s['throughput_tok_s']:,.0f} output tok/s, {s['prefill_tok_s']:,.0f} "
        f"prefill tok/s; GPU busy {100 * s['gpu_utilisation_mean']:.0f}% mean",
        f"  steps       {s['steps']:,}, mean {f(s['step_mean_s'], ms)} ms",
    ]
    if "time_share_dispatch" in s:
        lines.append(
            f"  step time   dispatch {100 * s['time_share_dispatch']:.0f}%, experts "
            f"{100 * s['time_share_experts']:.0f}%, combine {100 * s['time_share_combine']:.0f}%; "
            f"GPU load max/mean {s.get('gpu_load_max_over_mean', 1.0):.2f}")
    lines.append(f"  simulated   {s['simulated_s']:.2f} s in {s['wall_s']:.2f} s wall "
                 f"({s['sim_s_per_wall_s']:,.0f}x real time)")
    if routing:
        extra = ""
        if routing.get("requests_reusing_a_sequence") or routing.get("output_tokens_beyond_sequence"):
            extra = (f"; trace shorter than the workload ({routing['on_short']}): "
                     f"{routing['requests_reusing_a_sequence']} requests reuse a sequence, "
                     f"{routing['prompt_tokens_beyond_sequence'] + routing['output_tokens_beyond_sequence']:,}"
                     " tokens beyond their sequence")
        lines.append(f"  routing     {routing.get('source', '')}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Chrome trace / Perfetto
# ---------------------------------------------------------------------------------------------
_TRACKS = {"steps": 1, "compute": 2, "comm": 3, "requests": 4}


def timeline_events(res: Results) -> list[dict]:
    """Chrome trace events (microseconds): steps, per-layer compute and comm, request lifetimes."""
    ev = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": res.scenario}}]
    for name, tid in _TRACKS.items():
        ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}})
    us = 1e6
    for row in res.steps.itertuples(index=False):
        ev.append({"ph": "X", "name": f"step {row.step}", "pid": 0, "tid": 1, "ts": row.start_s * us,
                   "dur": row.duration_s * us,
                   "args": {"decode_tokens": row.decode_tokens, "prefill_tokens": row.prefill_tokens}})
    lay = res.layers
    if len(lay):
        cols = {k: lay[k].to_numpy() for k in ("step", "layer", "start_s", "attention_s",
                                                "dispatch_s", "experts_max_s", "combine_s")}
        for i in range(len(lay)):
            t = cols["start_s"][i] * us
            a, d, e, c = (cols[k][i] * us for k in ("attention_s", "dispatch_s", "experts_max_s",
                                                    "combine_s"))
            name = f"L{cols['layer'][i]}"
            if not res.overlap:
                spans = [(2, "attention", t, a), (3, "dispatch", t + a, d),
                         (2, "experts", t + a + d, e), (3, "combine", t + a + d + e, c)]
            else:  # four slots, each stage time given for both micro-batches together
                a, d, e, c = a / 2, d / 2, e / 2, c / 2
                s1 = t + a
                s2 = s1 + max(d, a)
                s3 = s2 + max(e, d)
                spans = [(2, "attention A", t, a), (2, "attention B", s1, a),
                         (3, "dispatch A", s1, d), (2, "experts A", s2, e),
                         (3, "dispatch B", s2, d), (2, "experts B", s3, e), (3, "combine A", s3, c)]
            for tid, what, ts, dur in spans:
                if dur > 0:
                    ev.append({"ph": "X", "name": f"{name} {what}", "pid": 0, "tid": tid,
                               "ts": ts, "dur": dur})
    req = res.requests.dropna(subset=["finish_s"])
    if len(req) <= 20000:
        for row in req.itertuples(index=False):
            ev.append({"ph": "X", "name": f"request {row.request}", "pid": 1,
                       "tid": int(row.group), "ts": row.arrival_s * us,
                       "dur": (row.finish_s - row.arrival_s) * us,
                       "args": {"ttft_ms": row.ttft_s * 1e3, "prompt": int(row.prompt_tokens),
                                "output": int(row.output_tokens)}})
    return ev
