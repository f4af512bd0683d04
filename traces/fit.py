"""Fit the synthetic generator (``moesim.traces.synth``) to a real routing trace.

Each knob is estimated from the statistic it controls, through the generator's own router so
that the fitted trace reproduces the statistic rather than a formula for it:

- popularity ``[domains, layers, experts]``: the observed load shares (domains by k-means over
  the requests' load vectors when more than one is asked for);
- locality and coherence per layer: the overlap of a token's experts with those of the token d
  positions earlier in the same request, for lags d = 1..64, is mapped to a score correlation
  through simulated pairs of correlated router scores, and ``c + (1 - c) rho^d`` is fitted to it;
- affinity per layer: the successor permutation maximises the excess co-activation between
  layer l-1 and l (assignment problem); the strength is matched to how often a token's expert
  at l-1 is followed by its successor at l;
- weight scale: matched to the mean gate-weight sum (raw softmax) or the mean top-1 share
  (normalised weights).

``compare`` measures how well a synthetic trace reproduces a real one (load skew, reuse,
LRU hit rates); ``fit_report`` fits, synthesises and compares in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from moesim.errors import MoesimError, PresetError, TraceError
from moesim.model import get_model
from moesim.traces.synth import (
    SynthParams,
    calibrate_bias,
    gate_weights,
    route,
    synthesize,
)
from moesim.traces.trace import Trace

LAGS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CORRELATION_GRID = np.array([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0])
SIM_ROWS = 1024  # simulated score rows per layer and grid point
# tolerances the ESFT tests hold a fitted trace to (see docs/synthetic-traces.md)
TOLERANCES = {
    "imbalance_mean_rel_err": 0.10,
    "imbalance_layer_max_rel_err": 0.30,
    "lru_max_abs_err": 0.05,
    "reuse_distance_ks": 0.05,
    "lru_per_layer_max_abs_err": 0.05,
}


# ----- the real trace as token arrays ------------------------------------------------------------
@dataclass
class TokenArrays:
    """Routing of a trace's first tokens, token-major, with requests made contiguous."""

    experts: np.ndarray  # [T, L, K] int (-1 where a layer is absent)
    weights: np.ndarray  # [T, L, K] float32
    request: np.ndarray  # [T] request id
    phase: np.ndarray  # [T]
    seq_lens: np.ndarray  # tokens per request, in order of first appearance


def token_arrays(trace: Trace, max_tokens: int | None = None) -> TokenArrays:
    """Read up to ``max_tokens`` tokens (streaming; rows of one token are contiguous)."""
    if trace.is_counts:
        raise TraceError("this is an aggregate counts trace: fitting needs per-token routing")
    L, K = trace.meta.num_layers, trace.meta.top_k
    parts, rows = [], 0
    cap = None if max_tokens is None else (max_tokens + 1) * L
    for b in trace.iter_batches():
        parts.append(b)
        rows += len(b)
        if cap is not None and rows >= cap:
            break
    if not parts:
        raise TraceError("the trace has no rows to fit")
    cat = {name: np.concatenate([getattr(b, name) for b in parts])
           for name in ("request_id", "token_pos", "phase", "layer", "expert_ids", "gate_weights")}
    key = cat["request_id"].astype(np.int64) << 32 | cat["token_pos"].astype(np.int64)
    tok = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    T = int(tok[-1]) + 1
    if max_tokens is not None and T > max_tokens:
        keep = tok < max_tokens
        cat = {k: v[keep] for k, v in cat.items()}
        tok, T = tok[keep], max_tokens
    experts = np.full((T, L, K), -1, dtype=np.int16)
    weights = np.zeros((T, L, K), dtype=np.float32)
    experts[tok, cat["layer"]] = cat["expert_ids"]
    weights[tok, cat["layer"]] = cat["gate_weights"]
    first = np.r_[0, np.flatnonzero(np.diff(tok)) + 1]
    request = cat["request_id"][first]
    phase = cat["phase"][first]
    # requests may interleave (continuous batching): make each one's tokens contiguous, in
    # order of first appearance
    _, first_seen, inv, counts = np.unique(request, return_index=True, return_inverse=True,
                                           return_counts=True)
    appearance = np.argsort(first_seen, kind="stable")
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(len(appearance))
    order = np.lexsort((np.arange(T), rank[inv]))
    return TokenArrays(experts[order], weights[order], request[order], phase[order],
                       counts[appearance].astype(np.int64))


def _starts(request: np.ndarray) -> np.ndarray:
    return np.r_[True, request[1:] != request[:-1]]


# ----- observed statistics --------------------------------------------------------------------------
def lag_overlap(experts: np.ndarray, request: np.ndarray, lags=LAGS) -> tuple[np.ndarray, np.ndarray]:
    """Mean share of a token's experts also chosen by the token ``d`` earlier in its request,
    ``[lags, layers]``, and the number of token pairs behind each lag."""
    T, L, K = experts.shape
    out = np.full((len(lags), L), np.nan)
    pairs = np.zeros(len(lags), dtype=np.int64)
    for i, d in enumerate(lags):
        if d >= T:
            continue
        same = request[d:] == request[:-d]
        a, b = experts[d:][same], experts[:-d][same]
        valid = (a[:, :, 0] >= 0) & (b[:, :, 0] >= 0)
        if not valid.any():
            continue
        shared = (a[:, :, :, None] == b[:, :, None, :]).any(-1).sum(-1) / K
        out[i] = np.where(valid, shared, 0).sum(0) / np.maximum(valid.sum(0), 1)
        pairs[i] = int(same.sum())
    return out, pairs


def successor_match(experts: np.ndarray, successor: np.ndarray) -> np.ndarray:
    """Share of a token's experts at layer l-1 whose successor it also chose at l, ``[L]``."""
    T, L, K = experts.shape
    out = np.zeros(L)
    for layer in range(1, L):
        a, b = experts[:, layer - 1], experts[:, layer]
        valid = (a[:, 0] >= 0) & (b[:, 0] >= 0)
        nxt = successor[layer][a[valid].astype(np.int64)]
        out[layer] = (nxt[:, :, None] == b[valid][:, None, :]).any(-1).mean() if valid.any() else 0
    return out


def fit_successors(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer, the permutation of experts that maximises excess co-activation l-1 -> l."""
    T, L, K = experts.shape
    E = num_experts
    succ = np.tile(np.arange(E), (L, 1))
    for layer in range(1, L):
        a, b = experts[:, layer - 1], experts[:, layer]
        valid = (a[:, 0] >= 0) & (b[:, 0] >= 0)
        a, b = a[valid].astype(np.int64), b[valid].astype(np.int64)
        if not len(a):
            continue
        pair = (a[:, :, None] * E + b[:, None, :]).ravel()
        co = np.bincount(pair, minlength=E * E).reshape(E, E).astype(float)
        na, nb = np.bincount(a.ravel(), minlength=E), np.bincount(b.ravel(), minlength=E)
        excess = co - np.outer(na, nb) / len(a)
        rows, cols = linear_sum_assignment(excess, maximize=True)
        succ[layer, rows] = cols
    return succ


def _weight_statistic(weights: np.ndarray, params: SynthParams) -> float:
    """What the weight scale is matched to: mean weight sum (raw), else mean top-1 share."""
    if not params.norm_topk_prob:
        return float(weights.sum(-1).mean())
    return float((weights.max(-1) / weights.sum(-1)).mean())


# ----- the fit ----------------------------------------------------------------------------------------
def _routing_facts(trace: Trace, arrays: TokenArrays) -> dict:
    """Router type, weight normalisation and groups: from the model preset when the trace names
    one, the weights themselves otherwise."""
    meta = trace.meta
    facts = {"router": "softmax", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}
    try:
        preset = get_model(meta.model)
        if (preset.moe_layers, preset.num_experts) == (meta.num_layers, meta.num_experts):
            facts.update(router=preset.router, n_group=preset.n_group, topk_group=preset.topk_group)
    except PresetError:
        pass
    present = arrays.experts[:, :, 0] >= 0
    sums = arrays.weights.sum(-1)[present]
    descending = (np.diff(arrays.weights[present], axis=-1) <= 1e-6).all(-1).mean() if len(sums) else 1
    # recorders that do not sort by weight mostly keep an expert-index order (torch.topk with
    # sorted=False, ESFT: a reused expert keeps its slot), which "id" reproduces best
    facts["slot_order"] = "weight" if descending > 0.99 or meta.weight_norm == "none" else "id"
    if meta.weight_norm == "none" or not len(sums):
        facts.update(weights_recorded=False, norm_topk_prob=True)
    elif np.std(sums) < 1e-3 * max(1.0, abs(np.mean(sums))):  # renormalised over the top-k
        facts.update(norm_topk_prob=True, routed_scaling_factor=round(float(np.median(sums)), 4))
    else:
        facts.update(norm_topk_prob=False)
    return facts


def fit(trace: Trace, *, domains: int = 1, max_tokens: int = 50_000, seed: int = 0) -> SynthParams:
    """Estimate generator parameters from a routing trace (its first ``max_tokens`` tokens for
    the temporal and inter-layer statistics; all of it for the load)."""
    if domains < 1:
        raise MoesimError(f"domains must be at least 1, got {domains}")
    arrays = token_arrays(trace, max_tokens)
    meta = trace.meta
    L, E, K = meta.num_layers, meta.num_experts, meta.top_k
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    domain_of_request, popularity = _fit_popularity(trace, arrays, domains, rng)
    facts = _routing_facts(trace, arrays)
    D = popularity.shape[0]
    params = SynthParams(
        num_layers=L, num_experts=E, top_k=K, popularity=popularity,
        locality=np.zeros(L), coherence=np.zeros(L), affinity=np.zeros(L),
        successor=np.tile(np.arange(E), (L, 1)),
        domain_weights=np.bincount(domain_of_request, minlength=D) + 1e-9,
        shared_experts=meta.shared_experts, model=meta.model, expert_bytes=meta.expert_bytes,
        seq_lens=arrays.seq_lens[:10_000].tolist(),
        decode_fraction=min(0.99, float((arrays.phase == 1).mean())),
        tokens=_total_tokens(trace, arrays), skew=_zipf_exponent(popularity, K),
        source=f"fitted to {trace.path or 'an in-memory trace'} ({meta.model}, {meta.source})",
        **facts,
    )
    bias = calibrate_bias(params, seed=seed)
    sim = np.random.default_rng(np.random.SeedSequence([int(seed), 12]))
    if params.weights_recorded:
        params.weight_scale = _fit_weight_scale(arrays, params, bias, sim)
        bias = calibrate_bias(params, seed=seed) if params.router == "sigmoid" else bias
    overlap, pairs = lag_overlap(arrays.experts, arrays.request)
    corr = _overlap_to_correlation(overlap, params, bias, sim)
    params.locality, params.coherence = _fit_decay(corr, pairs)
    params.successor = fit_successors(arrays.experts, E)
    params.affinity = _fit_affinity(arrays.experts, params, bias, sim)
    params.extra = {"fit": {"tokens_used": len(arrays.request), "seed": int(seed),
                            "reuse_lag1": np.nanmean(overlap[0]).round(4).item()}}
    return params


def _total_tokens(trace: Trace, arrays: TokenArrays) -> int:
    complete = (arrays.experts[:, :, 0] >= 0).sum(1).mean() if len(arrays.request) else 1
    return max(len(arrays.request), int(round(trace.num_rows / max(complete, 1e-9))))


def _fit_popularity(trace: Trace, arrays: TokenArrays, domains: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Requests' domains and each domain's load shares (half a token of smoothing per expert)."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    n_req = len(arrays.seq_lens)
    if domains == 1:
        load = trace.load_matrix().astype(float)[None]
        labels = np.zeros(n_req, dtype=np.int64)
    else:
        if domains > n_req:
            raise MoesimError(f"cannot fit {domains} domains to {n_req} requests")
        req_index = np.repeat(np.arange(n_req), arrays.seq_lens)
        per_req = np.zeros((n_req, L * E))
        ex = arrays.experts.astype(np.int64)
        valid = ex >= 0
        cell = (np.arange(L)[None, :, None] * E + ex)
        np.add.at(per_req, (np.broadcast_to(req_index[:, None, None], ex.shape)[valid], cell[valid]), 1)
        labels = _kmeans(per_req / np.maximum(per_req.sum(1, keepdims=True), 1), domains, rng)
        load = np.stack([per_req[labels == d].sum(0).reshape(L, E) for d in range(domains)])
    load = load + 0.5
    return labels, load / load.sum(-1, keepdims=True)


def _kmeans(x: np.ndarray, k: int, rng, iterations: int = 50) -> np.ndarray:
    """Plain k-means with k-means++ seeding; returns a label per row."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    centres = np.array(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return labels


def _zipf_exponent(popularity: np.ndarray, top_k: int) -> float:
    """Mean over domains and layers of the log-log slope of the sorted load shares."""
    ranks = np.log(np.arange(1, popularity.shape[-1] + 1))
    shares = -np.sort(-popularity, axis=-1)
    slopes = [-np.polyfit(ranks, np.log(row), 1)[0] for row in shares.reshape(-1, shares.shape[-1])]
    return round(float(np.mean(slopes)), 4)


def _sample_scores(params: SynthParams, bias: np.ndarray, layer: int, rng, rows: int):
    """Router bias rows (domains drawn by their weights) and standard normal noise of ``rows``
    tokens at one layer."""
    dom = rng.choice(params.num_domains, size=rows, p=params.domain_weights)
    return bias[dom, layer].astype(np.float32), rng.standard_normal((rows, params.num_experts)).astype(np.float32)


def _fit_weight_scale(arrays: TokenArrays, params: SynthParams, bias: np.ndarray, rng) -> float:
    present = arrays.experts[:, :, 0] >= 0
    want = _weight_statistic(arrays.weights[present], params)
    layers = np.arange(params.num_layers)
    scores = np.concatenate([np.add(*_sample_scores(params, bias, lay, rng, 512)) for lay in layers])
    ids = route(scores, params)
    lo, hi = np.log(0.01), np.log(100.0)
    for _ in range(40):  # both statistics grow with the scale: bisect on its logarithm
        mid = 0.5 * (lo + hi)
        params.weight_scale = float(np.exp(mid))
        got = _weight_statistic(gate_weights(scores, ids, params), params)
        lo, hi = (mid, hi) if got < want else (lo, mid)
    return round(float(np.exp(0.5 * (lo + hi))), 5)


def _overlap_to_correlation(overlap: np.ndarray, params: SynthParams, bias: np.ndarray, rng) -> np.ndarray:
    """Invert overlap(score correlation) per layer, simulated on a grid of correlations."""
    K = params.top_k
    corr = np.full(overlap.shape, np.nan)
    for layer in range(params.num_layers):
        b, z0 = _sample_scores(params, bias, layer, rng, SIM_ROWS)
        noise = rng.standard_normal(z0.shape).astype(np.float32)
        x = route(b + z0, params)
        curve = []
        for r in CORRELATION_GRID:
            y = route(b + np.float32(r) * z0 + np.float32(np.sqrt(1 - r * r)) * noise, params)
            curve.append((x[:, :, None] == y[:, None, :]).any(-1).sum(-1).mean() / K)
        curve = np.maximum.accumulate(np.array(curve))
        ok = ~np.isnan(overlap[:, layer])
        corr[ok, layer] = np.interp(overlap[ok, layer], curve, CORRELATION_GRID)
    return corr


def _fit_decay(corr: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of corr(d) = c + (1 - c) rho^d per layer, weighted by pair counts."""
    lags = np.array(LAGS, dtype=float)
    rhos = np.linspace(0, 1, 201)
    L = corr.shape[1]
    rho_out, c_out = np.zeros(L), np.zeros(L)
    for layer in range(L):
        ok = ~np.isnan(corr[:, layer]) & (pairs > 0)
        if not ok.any():
            continue
        r, d, w = corr[ok, layer], lags[ok], pairs[ok].astype(float)
        decay = rhos[:, None] ** d[None]  # [rhos, lags]
        one_minus = 1 - decay
        num = (w * one_minus * (r - decay)).sum(1)
        den = (w * one_minus**2).sum(1)
        c = np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 0), 0, 1)
        sse = (w * (r - c[:, None] - (1 - c[:, None]) * decay) ** 2).sum(1)
        best = int(np.argmin(sse))
        rho_out[layer], c_out[layer] = rhos[best], c[best]
    return rho_out, c_out


def _fit_affinity(experts: np.ndarray, params: SynthParams, bias: np.ndarray, rng) -> np.ndarray:
    """Affinity per layer matched to the observed successor-follow share, by simulation."""
    observed = successor_match(experts, params.successor)
    K = params.top_k
    out = np.zeros(params.num_layers)
    inverse = np.argsort(params.successor, axis=1)
    grid = CORRELATION_GRID
    for layer in range(1, params.num_layers):
        dom = rng.choice(params.num_domains, size=SIM_ROWS, p=params.domain_weights)
        z_prev = rng.standard_normal((SIM_ROWS, params.num_experts)).astype(np.float32)
        noise = rng.standard_normal(z_prev.shape).astype(np.float32)
        prev_ids = route(bias[dom, layer - 1] + z_prev, params).astype(np.int64)
        nxt = params.successor[layer][prev_ids]
        curve = []
        for a in grid:
            z = a * z_prev[:, inverse[layer]] + np.sqrt(1 - a * a) * noise
            ids = route((bias[dom, layer] + z).astype(np.float32), params)
            curve.append((nxt[:, :, None] == ids[:, None, :]).any(-1).sum(-1).mean() / K)
        curve = np.maximum.accumulate(np.array(curve))
        out[layer] = np.interp(observed[layer], curve, grid)
    return out


# ----- fit quality --------------------------------------------------------------------------------------
def default_capacities(trace: Trace) -> list[int]:
    """A grid of global LRU capacities: 1/2..16 x the experts one token touches (L * k), capped."""
    m = trace.meta
    active = m.num_layers * m.top_k
    caps = sorted({max(1, int(active * f)) for f in (0.5, 1, 2, 4, 8, 16)})
    return [c for c in caps if c < m.num_layers * m.num_experts]


def compare(real: Trace, synth: Trace, capacities=None, max_tokens: int = 50_000) -> dict:
    """How closely ``synth`` reproduces ``real``: load skew, reuse and LRU hit rates."""
    from moesim.traces.stats import imbalance, lru_hit_curve, pair_pmi_of

    if (real.meta.num_layers, real.meta.num_experts) != (synth.meta.num_layers, synth.meta.num_experts):
        raise MoesimError("compare needs traces of the same layers and experts")
    caps = list(capacities) if capacities is not None else default_capacities(real)
    out: dict = {"capacities": caps}
    loads = [t.load_matrix().astype(float) for t in (real, synth)]
    imb = [imbalance(x) for x in loads]
    out["imbalance_mean"] = [float(np.nanmean(x)) for x in imb]
    out["imbalance_mean_rel_err"] = abs(out["imbalance_mean"][1] / out["imbalance_mean"][0] - 1)
    out["imbalance_layer_max_rel_err"] = float(np.nanmax(np.abs(imb[1] / imb[0] - 1)))
    shares = [-np.sort(-x / x.sum(1, keepdims=True), axis=1) for x in loads]
    out["sorted_share_max_abs_err"] = float(np.abs(shares[1] - shares[0]).max())
    arrs = [token_arrays(t, max_tokens) for t in (real, synth)]
    reuse = [np.nanmean(lag_overlap(a.experts, a.request, (1,))[0]) for a in arrs]
    out["reuse_lag1"] = [float(x) for x in reuse]
    # not fitted (the generator has no sets of experts chosen together): shown so that the gap
    # is visible where co-activation matters (cross-node placement)
    out["pair_pmi"] = [float(np.nanmean(pair_pmi_of(a.experts, real.meta.num_experts))) for a in arrs]
    for scope in ("global", "per-layer"):
        grid = caps if scope == "global" else [c for c in (1, 2, 4, 8, 16, 32) if c < real.meta.num_experts]
        curves = [lru_hit_curve(a.experts, None, scope) for a in arrs]
        name = "lru" if scope == "global" else "lru_per_layer"
        out[f"{name}_capacities"] = grid
        out[f"{name}_real"] = curves[0][grid].round(4).tolist()
        out[f"{name}_synth"] = curves[1][grid].round(4).tolist()
        out[f"{name}_max_abs_err"] = float(np.abs(curves[0][grid] - curves[1][grid]).max())
        # the LRU curve is the CDF of the stack distance; binned in powers of two (the slot
        # order inside a token shifts distances by a few), its largest gap is the KS distance
        n = min(len(curves[0]), len(curves[1]))
        edges = 2 ** np.arange(int(np.log2(n - 1)) + 1) if n > 1 else np.zeros(1, int)
        key = "reuse_distance_ks" if scope == "global" else "reuse_distance_ks_per_layer"
        out[key] = float(np.abs(curves[0][edges] - curves[1][edges]).max())
    out["within_tolerance"] = {k: bool(out[k] <= v) for k, v in TOLERANCES.items()}
    return out


def fit_report(real: Trace, *, domains: int = 1, seed: int = 0, max_tokens: int = 50_000,
               params: SynthParams | None = None) -> tuple[SynthParams, dict]:
    """Fit (unless ``params`` is given), synthesise a trace of the real one's shape, compare."""
    params = params or fit(real, domains=domains, seed=seed, max_tokens=max_tokens)
    tokens = min(params.tokens or max_tokens, max_tokens)
    synth = synthesize(params, tokens, seed=seed)
    real_part = real if (params.tokens or 0) <= max_tokens else _prefix(real, max_tokens)
    return params, compare(real_part, synth, max_tokens=max_tokens)


def _prefix(trace: Trace, tokens: int) -> Trace:
    a = token_arrays(trace, tokens)
    return Trace.from_arrays(a.experts, a.weights, a.seq_lens, a.phase, trace.meta)
