"""Synthetic expert-routing traces from a small, fittable generative router model.

The model (one latent Gaussian router score per token, layer and expert):

    score[t, l, e] = bias[d, l, e] + z[t, l, e]          experts = the router's top-k of score
    z[t, l]   = a_l * z[t, l-1][successor_l^-1] + sqrt(1 - a_l^2) * w[t, l]     (inter-layer affinity)
    w[t, l]   = sqrt(c_l) * u[request, l] + sqrt(1 - c_l) * x[t, l]             (request coherence)
    x[t, l]   = rho_l * x[t-1, l] + sqrt(1 - rho_l^2) * eps[t, l]              (temporal locality)

with ``eps`` and ``u`` independent standard normals, so every ``z`` is a standard normal whatever
the knobs: popularity (``bias``, calibrated so each expert receives its target share of the
load), locality, coherence and affinity can be set independently. ``rho = 1`` repeats the
previous token's experts exactly; ``rho = 0`` draws each token afresh. ``successor_l`` maps each
expert of layer l-1 to the expert of layer l it favours. Each request belongs to one domain
``d`` (its own popularity). The router turns ``weight_scale * score`` into gate weights as the
model does (softmax, optionally renormalised over the top-k; or sigmoid, renormalised and
scaled, with DeepSeek-V3's group-limited selection).

Generation is vectorised over tokens and experts (a loop over layers only) and streams chunk by
chunk into a ``TraceWriter`` when given an output path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy.signal import lfilter
from scipy.special import ndtr, ndtri

from moesim.errors import MoesimError
from moesim.fileio import write_json_atomic
from moesim.model import MoEModel
from moesim.traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMeta
from moesim.traces.trace import Trace, TraceWriter

ROUTERS = ("softmax", "sigmoid")
# how a token's k experts are ordered in its row: by descending gate weight (torch.topk,
# llama.cpp), by expert id, or at random; per-layer LRU distances below k see the difference
SLOT_ORDERS = ("weight", "id", "random")
# The largest share of tokens one expert may receive (inclusion probability); 1 would need an
# infinite router bias.
MAX_INCLUSION = 0.98
# Latent values held at once while generating (tokens x experts per layer): bounds memory.
CHUNK_ELEMENTS = 1 << 22


class SynthError(MoesimError):
    """Bad synthetic-trace parameters or settings."""


# ----- parameters --------------------------------------------------------------------------------
@dataclass
class SynthParams:
    """Everything the generator needs; JSON-serialisable (``save`` / ``load``)."""

    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    popularity: np.ndarray  # [domains, layers, experts]: share of a layer's routed slots
    locality: np.ndarray  # [layers] rho: router-score correlation of consecutive tokens
    coherence: np.ndarray  # [layers] c: share of score variance fixed for a whole request
    affinity: np.ndarray  # [layers] a: score correlation with the previous layer (entry 0 unused)
    successor: np.ndarray  # [layers, experts]: successor[l, e] = expert of layer l favoured by e at l-1
    domain_weights: np.ndarray  # [domains]: share of requests in each domain
    weight_scale: float = 1.0  # router logits = weight_scale * score
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    shared_experts: int = 0
    weights_recorded: bool = True  # False: the source had no gate weights; write 1/k
    slot_order: str = "weight"  # "weight": slot 0 has the largest gate weight; "id"; "random"
    model: str = "custom"
    expert_bytes: list[int] | None = None
    # workload defaults (a fitted trace's shape): request length template, decode share, tokens
    seq_lens: list[int] | None = None
    decode_fraction: float = 0.0
    tokens: int | None = None
    skew: float | None = None  # the Zipf exponent the popularity came from, if any
    source: str = "synthetic"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise SynthError(f"synth params: {name} must be a positive integer, got {value!r}")
        L, E, K = self.num_layers, self.num_experts, self.top_k
        if K > E:
            raise SynthError(f"synth params: top_k={K} exceeds num_experts={E}")
        self.popularity = _array(self.popularity, "popularity", float, ndim=3)
        D = self.popularity.shape[0]
        if self.popularity.shape[1:] != (L, E) or D == 0:
            raise SynthError(
                f"synth params: popularity has shape {self.popularity.shape}, expected (domains, {L}, {E})"
            )
        if (self.popularity < 0).any() or not np.allclose(self.popularity.sum(-1), 1.0, atol=1e-6):
            raise SynthError("synth params: each popularity row must be non-negative and sum to 1")
        for name in ("locality", "coherence", "affinity"):
            arr = _array(getattr(self, name), name, float, ndim=None)
            arr = np.broadcast_to(arr, (L,)).astype(float) if arr.ndim == 0 else arr
            if arr.shape != (L,):
                raise SynthError(f"synth params: {name} needs one value per layer ({L}), got shape {arr.shape}")
            if (arr < 0).any() or (arr > 1).any():
                bad = arr[(arr < 0) | (arr > 1)][0]
                raise SynthError(f"synth params: {name} must be in [0, 1], got {bad:g}")
            setattr(self, name, arr)
        self.successor = _array(self.successor, "successor", np.int64, ndim=2)
        if self.successor.shape != (L, E) or any(
            not np.array_equal(np.sort(row), np.arange(E)) for row in self.successor
        ):
            raise SynthError(f"synth params: successor must hold {L} permutations of 0..{E - 1}")
        self.domain_weights = _array(self.domain_weights, "domain_weights", float, ndim=1)
        if self.domain_weights.shape != (D,) or (self.domain_weights < 0).any() or self.domain_weights.sum() <= 0:
            raise SynthError(f"synth params: domain_weights needs {D} non-negative values")
        self.domain_weights = self.domain_weights / self.domain_weights.sum()
        if self.slot_order not in SLOT_ORDERS:
            raise SynthError(f"synth params: slot_order must be one of {', '.join(SLOT_ORDERS)}")
        if self.router not in ROUTERS:
            raise SynthError(f"synth params: router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.n_group < 1 or E % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise SynthError(
                f"synth params: n_group={self.n_group} must divide {E} experts and "
                f"1 <= topk_group={self.topk_group} <= n_group"
            )
        if self.n_group > 1 and K > self.topk_group * (E // self.n_group):
            raise SynthError("synth params: top_k exceeds the experts of the selectable groups")
        if not (self.weight_scale > 0 and math.isfinite(self.weight_scale)):
            raise SynthError(f"synth params: weight_scale must be positive, got {self.weight_scale}")
        if not 0 <= self.decode_fraction < 1:
            raise SynthError(f"synth params: decode_fraction must be in [0, 1), got {self.decode_fraction}")
        if self.seq_lens is not None and (len(self.seq_lens) == 0 or min(self.seq_lens) <= 0):
            raise SynthError("synth params: seq_lens must be a non-empty list of positive lengths")

    @property
    def num_domains(self) -> int:
        return self.popularity.shape[0]

    @property
    def weight_norm(self) -> str:
        """The trace-metadata label of the gate weights this router writes."""
        if not self.weights_recorded:
            return "none"
        if self.routed_scaling_factor != 1.0:
            return "scaled"
        return "normalised" if self.norm_topk_prob else "raw"

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = np.round(value, 6).tolist() if value.dtype.kind == "f" else value.tolist()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict, where: str = "synth params") -> SynthParams:
        if not isinstance(data, dict):
            raise SynthError(f"{where}: expected a JSON object of synth parameters")
        known = {f.name for f in fields(cls)}
        missing = [n for n in ("num_layers", "num_experts", "top_k", "popularity", "locality",
                               "coherence", "affinity", "successor", "domain_weights") if n not in data]
        if missing:
            raise SynthError(f"{where}: key {missing[0]!r} is missing; write it with 'moesim trace fit'")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise SynthError(f"{where}: bad parameters ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> SynthParams:
        path = Path(path)
        if not path.is_file():
            raise SynthError(f"{path}: no such parameter file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SynthError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=str(path))

    def describe(self) -> dict:
        """Scalar summary of the knobs (means over layers)."""
        return {
            "model": self.model,
            "layers": self.num_layers,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "domains": self.num_domains,
            "skew": self.skew,
            "locality": round(float(self.locality.mean()), 4),
            "coherence": round(float(self.coherence.mean()), 4),
            "affinity": round(float(self.affinity[1:].mean()), 4) if self.num_layers > 1 else 0.0,
            "weight_scale": self.weight_scale,
            "router": self.router,
            "weight_norm": self.weight_norm,
        }


def _array(value, name: str, dtype, ndim: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise SynthError(f"synth params: {name} must be numeric") from None
    if ndim is not None and arr.ndim != ndim:
        raise SynthError(f"synth params: {name} must be a {ndim}-d array, got {arr.ndim}-d")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise SynthError(f"synth params: {name} holds NaN or infinite values")
    return arr


# ----- parameters from a model preset ------------------------------------------------------------
def zipf_shares(num_experts: int, skew: float) -> np.ndarray:
    """Load shares proportional to rank**-skew (rank 1 = most popular); skew 0 is uniform."""
    ranks = np.arange(1, num_experts + 1, dtype=float)
    shares = ranks ** -float(skew)
    return shares / shares.sum()


def params_for_model(
    model: MoEModel,
    *,
    skew: float = 0.8,
    locality: float = 0.3,
    coherence: float = 0.1,
    affinity: float = 0.7,
    domains: int = 1,
    weight_scale: float = 1.0,
    seed: int = 0,
) -> SynthParams:
    """Generator parameters for a model preset from scalar knobs.

    Each (domain, layer) gets Zipf(``skew``) popularity over its own random ranking of the
    experts, and each layer a random successor permutation for the inter-layer affinity. The
    defaults are close to what ``fit`` finds on the ESFT DeepSeek-V2-Lite traces (skew
    0.58-1.08, locality 0.07-0.41, coherence 0.06-0.13, affinity 0.68-0.77).
    """
    if skew < 0 or not math.isfinite(skew):
        raise SynthError(f"skew must be a finite Zipf exponent >= 0, got {skew}")
    if domains < 1:
        raise SynthError(f"domains must be at least 1, got {domains}")
    L, E = model.moe_layers, model.num_experts
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    shares = zipf_shares(E, skew)
    popularity = np.empty((domains, L, E))
    for d in range(domains):
        for layer in range(L):
            popularity[d, layer, rng.permutation(E)] = shares
    successor = np.stack([np.arange(E)] + [rng.permutation(E) for _ in range(L - 1)])
    return SynthParams(
        num_layers=L, num_experts=E, top_k=model.top_k, popularity=popularity,
        locality=np.full(L, float(locality)), coherence=np.full(L, float(coherence)),
        affinity=np.full(L, float(affinity)), successor=successor,
        domain_weights=np.full(domains, 1.0 / domains), weight_scale=float(weight_scale),
        router=model.router, norm_topk_prob=model.norm_topk_prob,
        routed_scaling_factor=model.routed_scaling_factor, n_group=model.n_group,
        topk_group=model.topk_group, shared_experts=model.shared_experts, model=model.name,
        expert_bytes=[model.expert_bytes()] * L, skew=float(skew),
        source=f"synthetic from preset {model.name} ({model.source})",
    )


# ----- the router ---------------------------------------------------------------------------------
def route(score: np.ndarray, params: SynthParams) -> np.ndarray:
    """Top-k expert ids ``[n, k]`` of router scores ``[n, E]`` (group-limited where the model is)."""
    k = params.top_k
    if params.n_group > 1:
        score = _group_limited(score, params)
    if k == score.shape[1]:
        return np.broadcast_to(np.arange(k), score.shape).copy()
    return np.argpartition(score, -k, axis=1)[:, -k:]


def _group_limited(score: np.ndarray, params: SynthParams) -> np.ndarray:
    """DeepSeek-V3 selection: rank groups by the sum of their two best sigmoid scores, keep
    the best ``topk_group`` groups, and mask the experts of the others."""
    n, E = score.shape
    G = params.n_group
    grouped = score.reshape(n, G, E // G)
    probs = _router_probs(grouped, params)
    best = min(2, E // G)
    group_score = np.partition(probs, -best, axis=2)[:, :, -best:].sum(axis=2)
    drop = np.argpartition(group_score, G - params.topk_group, axis=1)[:, : G - params.topk_group]
    masked = grouped.copy()
    masked[np.arange(n)[:, None], drop] = -np.inf
    return masked.reshape(n, E)


def _router_probs(score: np.ndarray, params: SynthParams) -> np.ndarray:
    logits = params.weight_scale * score
    if params.router == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits  # only the order matters where this is used for softmax routers


def gate_weights(score: np.ndarray, ids: np.ndarray, params: SynthParams) -> np.ndarray:
    """Gate weights of the chosen experts as the model's router computes them."""
    if not params.weights_recorded:
        return np.full(ids.shape, 1.0 / params.top_k, dtype=np.float32)
    scale = np.float32(params.weight_scale)
    chosen = scale * np.take_along_axis(score, ids, axis=1)
    if params.router == "sigmoid":
        w = 1.0 / (1.0 + np.exp(-chosen))
    else:
        # shift by the best chosen logit (the row's best, or near it under group limits)
        top = chosen.max(axis=1, keepdims=True)
        w = np.exp(chosen - top)
        if not params.norm_topk_prob:  # renormalising would cancel the softmax denominator
            w /= np.exp(scale * score - top).sum(axis=1, keepdims=True)
    if params.norm_topk_prob:
        w = w / w.sum(axis=1, keepdims=True)
    return (w * params.routed_scaling_factor).astype(np.float32)


def _sort_by_weight(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-weights, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(weights, order, axis=1)


# ----- calibration: router bias that gives each expert its target share ----------------------------
def inclusion_targets(popularity: np.ndarray, top_k: int) -> np.ndarray:
    """Per-token selection probability of each expert (k * share), capped at MAX_INCLUSION with
    the excess spread over the others (water filling)."""
    target = top_k * np.asarray(popularity, dtype=float)
    for _ in range(top_k + 1):
        over = target > MAX_INCLUSION
        if not over.any():
            break
        excess = (target - MAX_INCLUSION).clip(min=0).sum(-1, keepdims=True)
        free = np.where(over, 0.0, target)
        target = np.where(over, MAX_INCLUSION, free + excess * free / free.sum(-1, keepdims=True))
    return target


def calibrate_bias(params: SynthParams, seed: int = 0, iterations: int = 8) -> np.ndarray:
    """Router bias ``[domains, layers, experts]`` whose top-k selection frequencies match the
    popularity, by fixed-point iteration (probit update) on one Monte-Carlo sample of standard
    normal scores; the first guess is the large-E threshold approximation ``ndtri(target)``."""
    E = params.num_experts
    target = inclusion_targets(params.popularity, params.top_k).reshape(-1, E)
    bias = ndtri(target)
    # the Rao-Blackwellised estimate needs few rows; group-limited rows cost ~10x more
    samples = 512 if params.n_group > 1 else max(1024, (1 << 17) // E)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    noise = rng.standard_normal((samples, E)).astype(np.float32)
    floor = 0.5 / samples
    # a uniform row is exactly uniform at bias 0 (symmetry), without sampling noise
    todo = np.flatnonzero(np.ptp(target, axis=1) > 1e-12)
    bias[np.ptp(target, axis=1) <= 1e-12] = 0.0
    per_batch = max(1, (1 << 20) // (samples * E))
    for lo in range(0, len(todo), per_batch):
        rows = todo[lo : lo + per_batch]
        want = target[rows]
        b = bias[rows]
        best, best_err = b, np.inf
        for _ in range(iterations):
            got = selection_frequency(b.astype(np.float32), noise, params)
            err = (np.abs(got - want) / (0.01 * want + 0.1 * floor)).max()
            if err < best_err:
                best, best_err = b, err
            if err <= 1 or err > 0.9 * best_err and best is not b:
                break  # converged, or stalled at the sample's resolution
            b = b + ndtri(want.clip(floor, 1 - floor)) - ndtri(got.clip(floor, 1 - floor))
        bias[rows] = best
    return bias.reshape(params.popularity.shape)


def selection_frequency(bias: np.ndarray, noise: np.ndarray, params: SynthParams) -> np.ndarray:
    """Probability that each expert is selected, ``[B, E]``, for router biases ``[B, E]`` and
    standard normal score noise rows ``[N, E]``.

    Rao-Blackwellised: given the other experts' scores, expert e is chosen iff its own noise
    exceeds (bar - bias_e), so averaging that normal tail over the rows is exact in expectation
    and far less noisy for rarely chosen experts than counting selections.
    """
    bias = np.atleast_2d(bias)
    B, E = bias.shape
    N = len(noise)
    score = (bias[:, None, :] + noise[None]).reshape(B * N, E)
    K = params.top_k
    if K == E:
        return np.ones((B, E))
    if params.n_group > 1:
        bar = _group_selection_bar(score, params)
    else:
        part = np.partition(score, E - K - 1, axis=1)
        kth = part[:, E - K :].min(axis=1, keepdims=True)  # k-th best score
        next_best = part[:, E - K - 1 : E - K]  # (k+1)-th best: the bar for one in the top k
        bar = np.where(score >= kth, next_best, kth)
    return ndtr(bias[:, None, :] - bar.reshape(B, N, E)).mean(axis=1)


def _group_selection_bar(score: np.ndarray, params: SynthParams) -> np.ndarray:
    """The score each expert needs to be chosen under group-limited routing, others fixed.

    Raising an expert's own score only helps it, so it is chosen iff its score exceeds both the
    bar for its group to rank among the best ``topk_group`` groups and the k-th best other score
    among its group and the best other groups.
    """
    N, E = score.shape
    G, Kg, K = params.n_group, params.topk_group, params.top_k
    M = E // G
    s = params.weight_scale
    grouped = score.reshape(N, G, M)
    prob = 1.0 / (1.0 + np.exp(-s * grouped))
    top3 = np.zeros((N, G, 3), dtype=prob.dtype)
    best = -np.sort(-np.partition(prob, M - min(3, M), axis=2)[:, :, M - min(3, M) :], axis=2)
    top3[:, :, : best.shape[2]] = best
    is1 = prob >= top3[:, :, :1]
    is2 = ~is1 & (prob >= top3[:, :, 1:2])
    m1 = np.where(is1, top3[:, :, 1:2], top3[:, :, :1])  # best other member
    m2 = np.where(is1 | is2, top3[:, :, 2:3], top3[:, :, 1:2])  # second best other member
    group_score = top3[:, :, 0] + top3[:, :, 1]
    order = np.argsort(-group_score, axis=1)
    rank = np.argsort(order, axis=1)
    ranked = np.take_along_axis(group_score, order, axis=1)
    if Kg < G:  # the score a group must reach: the Kg-th best among the other groups
        bar = np.where(rank < Kg, ranked[:, Kg : Kg + 1], ranked[:, Kg - 1 : Kg])
    else:
        bar = np.full((N, G), -np.inf, dtype=prob.dtype)
    need = bar[:, :, None] - m1  # the sigmoid score the expert needs for its group to pass
    with np.errstate(divide="ignore", invalid="ignore"):
        group_bar = np.where(
            need <= m2, -np.inf,
            np.where(need >= 1, np.inf, np.log(need / (1 - need.clip(max=1 - 1e-7))) / s),
        )
    # the best Kg - 1 other groups join the pool of group g once g passes
    first = order[:, :Kg]
    not_g = first[:, None, :] != np.arange(G)[None, :, None]
    pick = np.argsort(~not_g, axis=2, kind="stable")[:, :, : Kg - 1]
    others = np.take_along_axis(np.broadcast_to(first[:, None, :], (N, G, Kg)), pick, axis=2)
    pool = np.concatenate(
        [grouped, grouped[np.arange(N)[:, None, None], others].reshape(N, G, (Kg - 1) * M)], axis=2
    )
    P = pool.shape[2]
    part = np.partition(pool, P - K - 1, axis=2)
    kth = part[:, :, P - K :].min(axis=2, keepdims=True)
    next_best = part[:, :, P - K - 1 : P - K]
    topk_bar = np.where(grouped >= kth, next_best, kth)
    return np.maximum(group_bar, topk_bar).reshape(N, E)


# ----- workload layout ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Requests run one after another: a prefill step, then one step per decode token."""

    seq_lens: np.ndarray  # [requests]
    prefill_lens: np.ndarray  # [requests]
    domain: np.ndarray  # [requests]

    @property
    def tokens(self) -> int:
        return int(self.seq_lens.sum())


def make_workload(params: SynthParams, tokens: int, requests: int | None, decode_fraction: float,
                  rng: np.random.Generator) -> Workload:
    if tokens < 1:
        raise SynthError(f"tokens must be at least 1, got {tokens}")
    if not 0 <= decode_fraction < 1:
        raise SynthError(f"decode fraction must be in [0, 1), got {decode_fraction}")
    if requests is not None:
        if not 1 <= requests <= tokens:
            raise SynthError(f"requests must be between 1 and the {tokens} tokens, got {requests}")
        seq_lens = np.full(requests, tokens // requests, dtype=np.int64)
        seq_lens[: tokens % requests] += 1
    elif params.seq_lens:
        template = np.asarray(params.seq_lens, dtype=np.int64)
        reps = -(-tokens // int(template.sum()))
        cum = np.cumsum(np.tile(template, reps))
        n = int(np.searchsorted(cum, tokens)) + 1
        seq_lens = np.diff(np.r_[0, np.minimum(cum[:n], tokens)])
    else:
        seq_lens = np.array([tokens], dtype=np.int64)
    prefill = np.maximum(1, np.round(seq_lens * (1.0 - decode_fraction))).astype(np.int64)
    prefill = np.minimum(prefill, seq_lens)
    domain = rng.choice(params.num_domains, size=len(seq_lens), p=params.domain_weights)
    return Workload(seq_lens, prefill, domain.astype(np.int64))


def _token_layout(wl: Workload, t0: int, t1: int) -> dict[str, np.ndarray]:
    """Per-token request, position, phase, step and domain for global tokens [t0, t1)."""
    ends = np.cumsum(wl.seq_lens)
    starts = ends - wl.seq_lens
    tok = np.arange(t0, t1, dtype=np.int64)
    req = np.searchsorted(ends, tok, side="right")
    pos = tok - starts[req]
    decode = pos >= wl.prefill_lens[req]
    # steps before request r: one per earlier request's prefill plus one per earlier decode token
    steps_per_req = 1 + wl.seq_lens - wl.prefill_lens
    first_step = np.cumsum(steps_per_req) - steps_per_req
    step = first_step[req] + np.where(decode, pos - wl.prefill_lens[req] + 1, 0)
    return {
        "request": req,
        "pos": pos,
        "phase": np.where(decode, PHASE_DECODE, PHASE_PREFILL).astype(np.int8),
        "step": step,
        "domain": wl.domain[req],
        "start": pos == 0,
    }


# ----- the latent score process --------------------------------------------------------------------
class _Latent:
    """Carries the per-layer temporal state across chunks so chunking never shows in the output."""

    def __init__(self, params: SynthParams, seed: np.random.SeedSequence):
        L, E = params.num_layers, params.num_experts
        self.params = params
        # one stream per layer and kind, drawn in token order: chunk sizes do not change them
        streams = seed.spawn(3 * L)
        self.eps_rng = [np.random.default_rng(s) for s in streams[:L]]
        self.req_rng = [np.random.default_rng(s) for s in streams[L : 2 * L]]
        self.slot_rng = [np.random.default_rng(s) for s in streams[2 * L :]]
        self.x_last = np.zeros((L, E))
        self.u_last = np.zeros((L, E))
        self.inverse = np.argsort(params.successor, axis=1)

    def layer_scores(self, layer: int, lay: dict[str, np.ndarray], z_prev: np.ndarray | None) -> np.ndarray:
        p = self.params
        n, E = len(lay["request"]), p.num_experts
        eps = self.eps_rng[layer].standard_normal((n, E), dtype=np.float32)
        x = _ar_with_restarts(eps, lay["start"], float(p.locality[layer]), self.x_last[layer])
        self.x_last[layer] = x[-1]
        req = lay["request"] - lay["request"][0]
        u = self.req_rng[layer].standard_normal((int(lay["start"].sum()), E), dtype=np.float32)
        if not lay["start"][0]:  # the request in progress keeps its component
            u = np.concatenate([self.u_last[layer][None].astype(np.float32), u])
        self.u_last[layer] = u[-1]
        c = float(p.coherence[layer])
        a = float(p.affinity[layer]) if z_prev is not None else 0.0
        own = math.sqrt(1.0 - a * a)
        z = x  # fresh each call: scaled in place
        if own * math.sqrt(1.0 - c) != 1.0:
            z *= np.float32(own * math.sqrt(1.0 - c))
        if c > 0:
            z += np.float32(own * math.sqrt(c)) * u[req]
        if a > 0:
            z += np.float32(a) * np.take(z_prev, self.inverse[layer], axis=1)
        return z


def _ar_with_restarts(eps: np.ndarray, start: np.ndarray, rho: float, carry: np.ndarray) -> np.ndarray:
    """Stationary AR(1) ``x_t = rho x_{t-1} + sqrt(1-rho^2) eps_t`` along axis 0, restarting
    (``x_t = eps_t``) where ``start`` is set, continuing from ``carry`` otherwise."""
    if rho == 0.0:
        return eps
    drive = eps * np.float32(math.sqrt(max(0.0, 1.0 - rho * rho)))
    drive[start] = eps[start]
    zi = (0.0 if start[0] else rho) * carry.astype(np.float32)
    y, _ = lfilter(np.ones(1, np.float32), np.array([1.0, -rho], np.float32), drive, axis=0,
                   zi=zi[None, :])
    # lfilter runs straight through request boundaries: remove what leaked in from before the
    # latest restart s, rho^(t-s+1) * y[s-1], where that is not negligible
    idx = np.arange(len(start))
    last_start = np.maximum.accumulate(np.where(start, idx, -1))
    since = idx - last_start
    horizon = len(start) if rho == 1.0 else math.log(1e-9) / math.log(rho)
    fix = np.flatnonzero((last_start >= 1) & (since < horizon))
    if len(fix):
        s = last_start[fix]
        y[fix] -= (rho ** (since[fix] + 1.0)).astype(np.float32)[:, None] * y[s - 1]
    return y


# ----- generation --------------------------------------------------------------------------------
def trace_meta(params: SynthParams, settings: dict) -> TraceMeta:
    routing = {"router": params.router, "norm_topk_prob": params.norm_topk_prob,
               "routed_scaling_factor": params.routed_scaling_factor}
    if params.n_group > 1:
        routing.update(n_group=params.n_group, topk_group=params.topk_group)
    return TraceMeta(
        num_layers=params.num_layers, num_experts=params.num_experts, top_k=params.top_k,
        model=params.model, shared_experts=params.shared_experts, weight_norm=params.weight_norm,
        source=f"moesim.traces.synth; {params.source}", expert_bytes=params.expert_bytes,
        extra={"synth": {**settings, **params.describe()}, "routing": routing},
    )


def synthesize(
    source: MoEModel | SynthParams,
    tokens: int | None = None,
    *,
    requests: int | None = None,
    decode_fraction: float | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    **knobs,
) -> Trace:
    """A synthetic routing trace of ``tokens`` tokens (rows = tokens x MoE layers).

    ``source`` is a model preset (``knobs`` go to :func:`params_for_model`: skew, locality,
    coherence, affinity, domains, weight_scale) or fitted :class:`SynthParams`. With ``out`` the
    rows stream to that Parquet file (atomically) and the returned trace reads from it.
    """
    if isinstance(source, MoEModel):
        params = params_for_model(source, seed=seed, **knobs)
    elif isinstance(source, SynthParams):
        if knobs:
            raise SynthError(f"knobs {sorted(knobs)} apply to model presets, not to fitted params")
        params = source
    else:
        raise SynthError(f"synthesize needs a MoEModel or SynthParams, got {type(source).__name__}")
    tokens = int(tokens if tokens is not None else params.tokens or 0)
    decode_fraction = params.decode_fraction if decode_fraction is None else float(decode_fraction)
    seeds = np.random.SeedSequence([int(seed), 3]).spawn(2)
    workload = make_workload(params, tokens, requests, decode_fraction, np.random.default_rng(seeds[0]))
    bias = calibrate_bias(params, seed=seed).astype(np.float32)
    settings = {"seed": int(seed), "tokens": tokens, "requests": len(workload.seq_lens),
                "decode_fraction": decode_fraction}
    meta = trace_meta(params, settings)
    latent = _Latent(params, seeds[1])
    chunks = _chunks(params, workload, bias, latent)
    if out is not None:
        with TraceWriter(out, meta) as writer:
            for lay, ids, weights in chunks:
                writer.write_rows(**_rows(lay, ids, weights))
        return Trace.read(out)
    parts = list(chunks)
    ids = np.concatenate([p[1] for p in parts])
    weights = np.concatenate([p[2] for p in parts])
    lay = {key: np.concatenate([p[0][key] for p in parts]) for key in ("phase", "step")}
    return Trace.from_arrays(ids, weights, workload.seq_lens, lay["phase"], meta, steps=lay["step"])


def _chunks(params: SynthParams, wl: Workload, bias: np.ndarray, latent: _Latent):
    """Yield (token layout, expert ids [n, L, k], gate weights [n, L, k]) chunk by chunk."""
    L, K = params.num_layers, params.top_k
    step = max(256, CHUNK_ELEMENTS // params.num_experts)
    for t0 in range(0, wl.tokens, step):
        lay = _token_layout(wl, t0, min(wl.tokens, t0 + step))
        n = len(lay["request"])
        ids_out = np.empty((n, L, K), dtype=np.int16)
        w_out = np.empty((n, L, K), dtype=np.float32)
        z = None
        for layer in range(L):
            z = latent.layer_scores(layer, lay, z)
            score = z + bias[lay["domain"], layer] if params.num_domains > 1 else z + bias[0, layer]
            ids = route(score, params)
            ids, w = _sort_by_weight(ids, gate_weights(score, ids, params))
            if params.slot_order != "weight":
                key = ids if params.slot_order == "id" else latent.slot_rng[layer].random(ids.shape)
                order = key.argsort(axis=1)
                ids = np.take_along_axis(ids, order, axis=1)
                w = np.take_along_axis(w, order, axis=1)
            ids_out[:, layer] = ids
            w_out[:, layer] = w
        yield lay, ids_out, w_out


def _rows(lay: dict[str, np.ndarray], ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Token-major (token, layer) rows of one chunk, as TraceWriter.write_rows takes them."""
    n, L, K = ids.shape
    return {
        "request_id": np.repeat(lay["request"], L),
        "token_pos": np.repeat(lay["pos"], L),
        "step": np.repeat(lay["step"], L),
        "phase": np.repeat(lay["phase"], L),
        "layer": np.tile(np.arange(L, dtype=np.int16), n),
        "expert_ids": ids.reshape(n * L, K),
        "gate_weights": weights.reshape(n * L, K),
    }
