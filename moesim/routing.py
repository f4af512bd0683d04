"""Routing sources: which experts each token of a simulated step selects.

- ``TraceReplay`` replays a routing trace. Each request is assigned one trace sequence; its
  prompt positions replay that sequence's prefill tokens in order and its output tokens replay
  the sequence's decode tokens (a prefill-only trace replays its tokens for both). When the
  workload is longer than the trace, ``wrap`` reuses sequences round-robin and continues a
  sequence from its start; ``resample`` draws sequences at random (seeded) and continues a
  sequence that ran out in another randomly drawn one. ``report()`` says how much was reused.
- ``synthetic``: a trace drawn from ``moesim.traces.synth`` for the model preset (seeded), then
  replayed as above.
- ``AggregateRouting`` (counts): only the per-layer share of selections each expert receives
  (from a counts trace, a routing trace's load matrix, or uniform); a step routes its tokens
  in expectation. Much faster, and blind to per-token co-selection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.model import MoEModel

PREFILL, DECODE = 0, 1


class RoutingError(MoesimError):
    """A routing source that does not fit the model or the workload."""


def check_trace_fits(meta, model: MoEModel, where: str) -> None:
    want = (model.moe_layers, model.num_experts, model.top_k)
    got = (meta.num_layers, meta.num_experts, meta.top_k)
    if want != got:
        raise RoutingError(
            f"{where}: trace has {got[0]} MoE layers x {got[1]} experts, top-{got[2]}, but model "
            f"{model.name} has {want[0]} x {want[1]}, top-{want[2]}; use a trace of this model"
        )


@dataclass
class TraceReplay:
    """Replay of per-token routing: ``experts[T, L, K]`` rows grouped by sequence."""

    experts: np.ndarray  # [T, L, K] int16, rows ordered by sequence, then phase, then position
    pre_start: np.ndarray  # [S] first row of each sequence's prefill tokens
    pre_len: np.ndarray  # [S]
    dec_start: np.ndarray  # [S] first row of each sequence's decode tokens
    dec_len: np.ndarray  # [S] (0: prefill-only trace; decode replays the prefill tokens)
    on_short: str = "wrap"
    seed: int = 0
    source: str = "trace"
    kind: str = "trace"
    _report: dict = field(default_factory=dict)

    @classmethod
    def from_trace(cls, trace, model: MoEModel, on_short: str = "wrap", seed: int = 0,
                   source: str = "trace") -> TraceReplay:
        where = str(trace.path) if trace.path else source
        if trace.is_counts:
            raise RoutingError(f"{where}: a counts trace has no per-token routing; "
                               "use routing source 'counts' for it")
        check_trace_fits(trace.meta, model, where)
        arr = trace.to_arrays()
        if len(arr["experts"]) == 0:
            raise RoutingError(f"{where}: the trace holds no tokens")
        req, phase, pos = arr["request_id"], arr["phase"], arr["token_pos"]
        order = np.lexsort((pos, phase, req))
        req, phase = req[order], phase[order]
        experts = np.ascontiguousarray(arr["experts"][order])
        seq_first = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
        seq_end = np.r_[seq_first[1:], len(req)]
        n_pre = np.add.reduceat((phase == PREFILL).astype(np.int64), seq_first)
        pre_start, pre_len = seq_first, n_pre
        dec_start, dec_len = seq_first + n_pre, seq_end - seq_first - n_pre
        # a sequence with no prefill rows (decode-only capture) replays decode rows for prompts
        no_pre = pre_len == 0
        pre_start = np.where(no_pre, dec_start, pre_start)
        pre_len = np.where(no_pre, dec_len, pre_len)
        return cls(experts, pre_start, pre_len, dec_start, dec_len, on_short, seed, source)

    @property
    def num_sequences(self) -> int:
        return len(self.pre_start)

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    def bind(self, prompt: np.ndarray, output: np.ndarray) -> None:
        """Assign a trace sequence to each request (round-robin or seeded draws)."""
        n, S = len(prompt), self.num_sequences
        self._rng_seed = np.random.SeedSequence([int(self.seed), 7]).generate_state(1)[0]
        if self.on_short == "wrap" or n <= S:
            seq = np.arange(n) % S
        else:
            rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), 5]))
            seq = np.r_[np.arange(S), rng.integers(0, S, n - S)]
        self.seq = seq.astype(np.int64)
        # prefill-only traces replay their prefill rows for output tokens too
        self.has_decode = self.dec_len[seq] > 0
        d_len = np.where(self.has_decode, self.dec_len[seq], self.pre_len[seq])
        beyond_pre = np.maximum(prompt - self.pre_len[seq], 0)
        beyond_dec = np.maximum(output - d_len, 0)
        self._report = {
            "source": self.source,
            "sequences": int(S),
            "requests": int(n),
            "on_short": self.on_short,
            "requests_reusing_a_sequence": int(max(n - S, 0)),
            "prompt_tokens_beyond_sequence": int(beyond_pre.sum()),
            "output_tokens_beyond_sequence": int(beyond_dec.sum()),
            "decode_from_prefill_rows": bool((~self.has_decode).any()),
        }

    def report(self) -> dict:
        return dict(self._report)

    def rows(self, req: np.ndarray, pos: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """Trace rows routing the tokens at sequence positions ``pos`` of requests ``req``.

        Positions below the request's prompt length replay prefill rows, the others decode
        rows (output token j sits at position prompt + j).
        """
        s = self.seq[req]
        is_dec = pos >= prompt
        idx = np.where(is_dec, pos - prompt, pos)
        use_dec = is_dec & self.has_decode[req]
        start = np.where(use_dec, self.dec_start[s], self.pre_start[s])
        length = np.where(use_dec, self.dec_len[s], self.pre_len[s])
        if self.on_short == "wrap":
            return start + idx % length
        # resample: block b of a request continues in a pseudo-random sequence (hashing keeps it
        # deterministic and independent of the step order)
        block = idx // length
        inside = block == 0
        if inside.all():
            return start + idx
        h = (req.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + block.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(self._rng_seed))
        h ^= h >> np.uint64(31)
        other = (h % np.uint64(self.num_sequences)).astype(np.int64)
        o_start = np.where(use_dec & (self.dec_len[other] > 0), self.dec_start[other],
                           self.pre_start[other])
        o_len = np.where(use_dec & (self.dec_len[other] > 0), self.dec_len[other],
                         self.pre_len[other])
        return np.where(inside, start + idx, o_start + (idx % length) % o_len)


@dataclass
class AggregateRouting:
    """Per-layer expert shares ``share[L, E]`` (each row sums to 1): tokens route in expectation."""

    share: np.ndarray
    top_k: int
    source: str = "counts"
    kind: str = "counts"

    @classmethod
    def from_load(cls, load: np.ndarray, top_k: int, source: str) -> AggregateRouting:
        load = np.asarray(load, dtype=float)
        totals = load.sum(axis=1, keepdims=True)
        if (totals <= 0).any():
            raise RoutingError(f"{source}: a layer has no routed tokens; cannot derive shares")
        return cls(load / totals, top_k, source)

    def bind(self, prompt: np.ndarray, output: np.ndarray) -> None:
        self._report = {"source": self.source, "requests": int(len(prompt)),
                        "mode": "expected counts per step from per-layer expert shares"}

    def report(self) -> dict:
        return dict(self._report)


@functools.lru_cache(maxsize=4)
def synthetic_trace(model: MoEModel, tokens: int, requests: int, seed: int, skew: float,
                    locality: float):
    """A seeded synthetic trace (half prefill, half decode tokens per sequence), memoised so
    that scenarios differing only in placement or policy replay the very same routing."""
    from moesim.traces.synth import synthesize

    return synthesize(model, tokens, requests=requests, decode_fraction=0.5, seed=seed, skew=skew,
                      locality=locality)


def build_routing(section, model: MoEModel, base_dir: str | Path = ".",
                  trace_override: str | Path | None = None):
    """The routing source a scenario's ``routing`` section names (``--trace`` overrides)."""
    source = section.source
    path = trace_override or section.trace
    if trace_override is not None and source in ("synthetic", "uniform"):
        source = "trace"
    if path is not None and source in ("trace", "counts"):
        path = Path(path)
        if not path.is_absolute() and trace_override is None:
            path = Path(base_dir) / path
    if source == "uniform":
        share = np.full((model.moe_layers, model.num_experts), 1.0 / model.num_experts)
        return AggregateRouting(share, model.top_k, "uniform")
    if source == "synthetic":
        trace = synthetic_trace(model, section.synth_tokens, section.synth_requests, section.seed,
                                section.skew, section.locality)
        return TraceReplay.from_trace(trace, model, section.on_short, section.seed,
                                      source=f"synthetic(seed={section.seed}, skew={section.skew})")
    from moesim.traces import Trace

    trace = Trace.read(path)
    if source == "counts":
        check_trace_fits(trace.meta, model, str(path))
        return AggregateRouting.from_load(trace.load_matrix(), model.top_k, str(path))
    return TraceReplay.from_trace(trace, model, section.on_short, section.seed, source=str(path))
