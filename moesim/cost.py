"""Compute and transfer time of the operations of an MoE layer on one device.

A roofline per operation: ``time = max(FLOPs / achieved FLOP rate, bytes / achieved memory
rate) + launch overhead``. The achieved FLOP rate is peak x ``compute_efficiency`` x the row-tile
efficiency ``m / (ceil(m / tile) * tile)`` (a GEMM with m rows pays for whole tiles, which is
what makes small per-expert batches inefficient). Measured tables (CSV: operation, shape, dtype,
tokens, seconds) override the roofline where they cover an operation; between measured token
counts the time is interpolated linearly, beyond the largest it grows in proportion to tokens.
Units: seconds, bytes, FLOPs.
"""

from __future__ import annotations

import csv
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.hardware import Device, Link
from moesim.model import BYTES_PER_PARAM, MoEModel


class CostError(MoesimError):
    """A malformed cost table or an impossible operation shape."""


# ---------------------------------------------------------------------------------------------
# Measured tables
# ---------------------------------------------------------------------------------------------
@dataclass
class CostTable:
    """Measured seconds by (operation, shape, dtype), each a curve over token counts."""

    curves: dict[tuple[str, str, str], tuple[list[float], list[float]]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows) -> CostTable:
        points: dict[tuple[str, str, str], dict[float, float]] = {}
        for i, row in enumerate(rows):
            try:
                key = (str(row["operation"]), str(row["shape"]), str(row["dtype"]))
                tokens, secs = float(row["tokens"]), float(row["seconds"])
            except (KeyError, ValueError, TypeError) as exc:
                raise CostError(
                    f"cost table row {i + 1}: need operation, shape, dtype, tokens, seconds "
                    f"({exc.__class__.__name__}: {exc})"
                ) from None
            if tokens < 0 or secs < 0 or not math.isfinite(secs):
                raise CostError(f"cost table row {i + 1}: tokens and seconds must be >= 0")
            points.setdefault(key, {})[tokens] = secs
        curves = {k: (sorted(v), [v[t] for t in sorted(v)]) for k, v in points.items()}
        return cls(curves)

    @classmethod
    def from_csv(cls, path: str | Path) -> CostTable:
        path = Path(path)
        if not path.exists():
            raise CostError(f"{path}: no such cost table")
        with path.open(newline="") as f:
            return cls.from_rows(list(csv.DictReader(f)))

    def lookup(self, operation: str, shape: str, dtype: str, tokens: float) -> float | None:
        curve = self.curves.get((operation, shape, dtype))
        if curve is None:
            return None
        xs, ys = curve
        if tokens <= xs[0]:
            return ys[0]
        if tokens >= xs[-1]:
            return ys[-1] * tokens / xs[-1] if xs[-1] > 0 else ys[-1]
        i = bisect_left(xs, tokens)
        w = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])

    def lookup_array(self, operation: str, shape: str, dtype: str, tokens) -> np.ndarray | None:
        """``lookup`` for an array of token counts (same interpolation and scaling)."""
        curve = self.curves.get((operation, shape, dtype))
        if curve is None:
            return None
        xs, ys = np.asarray(curve[0]), np.asarray(curve[1])
        t = np.asarray(tokens, dtype=float)
        inside = np.interp(t, xs, ys)
        if xs[-1] <= 0:
            return inside
        return np.where(t >= xs[-1], ys[-1] * t / xs[-1], inside)


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------
def tile_efficiency(m, tile: int):
    """Useful fraction of the rows a GEMM computes when m rows are padded to whole tiles."""
    m = np.asarray(m, dtype=float)
    padded = np.ceil(m / tile) * tile
    return np.divide(m, padded, out=np.zeros_like(m), where=padded > 0)


def transfer_time(link: Link, nbytes: float) -> float:
    """Seconds to move ``nbytes`` over ``link``: latency + bytes / (rate x size efficiency)."""
    return link.transfer_time(nbytes)


class CostModel:
    """Operation times of an MoE model on one device (roofline, overridden by a table)."""

    def __init__(self, device: Device, table: CostTable | None = None,
                 act_dtype: str = "bf16"):
        self.device = device
        self.table = table
        self.act_bytes = BYTES_PER_PARAM[act_dtype]

    # ----- primitives --------------------------------------------------------------------------
    def roofline(self, flops, nbytes, dtype: str, tile_eff=1.0):
        """Seconds of an operation (array-friendly), without the launch overhead."""
        d = self.device
        rate = d.peak_flops(dtype) * d.compute_efficiency * np.asarray(tile_eff, dtype=float)
        compute = np.divide(flops, rate, out=np.zeros_like(np.asarray(flops, dtype=float)),
                            where=rate > 0)
        memory = np.asarray(nbytes, dtype=float) / (d.memory.read_bw * d.memory_efficiency)
        return np.maximum(compute, memory)

    def gemm_time(self, m: int, n: int, k: int, dtype: str = "bf16",
                  operation: str = "gemm") -> float:
        """[m, k] x [k, n] with the weight in ``dtype`` read once."""
        if m <= 0:
            return 0.0
        hit = self._table(operation, f"{k}x{n}", dtype, m)
        if hit is not None:
            return hit
        flops = 2.0 * m * n * k
        nbytes = n * k * BYTES_PER_PARAM[dtype] + (m * k + m * n) * self.act_bytes
        eff = tile_efficiency(m, self.device.gemm_tile_m)
        return float(self.roofline(flops, nbytes, dtype, eff)) + self.device.kernel_overhead

    def _table(self, operation, shape, dtype, tokens):
        return self.table.lookup(operation, shape, dtype, tokens) if self.table else None

    # ----- MoE layer pieces ----------------------------------------------------------------
    def expert_times(self, model: MoEModel, tokens_per_expert) -> np.ndarray:
        """Seconds of each local expert's FFN for its token count (0 tokens: 0 s, no weights)."""
        m = np.asarray(tokens_per_expert, dtype=float)
        shape = f"{model.hidden}x{model.moe_intermediate}"
        if self.table and (("expert_ffn", shape, model.expert_dtype) in self.table.curves):
            hit = self.table.lookup_array("expert_ffn", shape, model.expert_dtype, m)
            return np.where(m > 0, hit, 0.0)
        flops = m * model.expert_flops_per_token()
        act = m * (2 * model.hidden + model.ffn_matrices * model.moe_intermediate) * self.act_bytes
        nbytes = np.where(m > 0, model.expert_bytes() + act, 0.0)
        eff = tile_efficiency(m, self.device.gemm_tile_m)
        return np.where(m > 0, self.roofline(flops, nbytes, model.expert_dtype, eff), 0.0)

    def expert_roofline_terms(self, model: MoEModel):
        """``expert_times`` on the roofline as max(a x ceil(m / tile), b + c x m) for m > 0:
        (a, b, c, tile), or None where a measured table covers the expert FFN. The padded-tile
        compute is flops per token x padded rows / rate, so it needs no per-row efficiency."""
        shape = f"{model.hidden}x{model.moe_intermediate}"
        if self.table and (("expert_ffn", shape, model.expert_dtype) in self.table.curves):
            return None
        d = self.device
        tile = d.gemm_tile_m
        rate = d.peak_flops(model.expert_dtype) * d.compute_efficiency
        if not rate > 0:
            return None
        bw = d.memory.read_bw * d.memory_efficiency
        act = (2 * model.hidden + model.ffn_matrices * model.moe_intermediate) * self.act_bytes
        return (model.expert_flops_per_token() * tile / rate, model.expert_bytes() / bw,
                act / bw, tile)

    def grouped_gemm_time(self, model: MoEModel, tokens_per_expert) -> float:
        """One grouped-GEMM launch over a GPU's local experts (sum of per-expert rooflines)."""
        return float(self.grouped_gemm_times(model, np.asarray(tokens_per_expert, dtype=float)))

    def grouped_gemm_times(self, model: MoEModel, tokens_per_expert) -> np.ndarray:
        """``grouped_gemm_time`` of many GPUs at once: ``tokens_per_expert[..., local experts]``."""
        per = self.expert_times(model, tokens_per_expert)
        return per.sum(-1) + np.where((per > 0).any(-1), self.device.kernel_overhead, 0.0)

    def shared_expert_time(self, model: MoEModel, tokens: int) -> float:
        if model.shared_experts == 0 or tokens <= 0:
            return 0.0
        width = (model.shared_intermediate or model.moe_intermediate) * model.shared_experts
        return self._ffn(model.hidden, width, tokens, model.expert_dtype, model.ffn_matrices)

    def dense_ffn_time(self, model: MoEModel, tokens: int) -> float:
        if model.dense_intermediate == 0 or tokens <= 0:
            return 0.0
        return self._ffn(model.hidden, model.dense_intermediate, tokens, model.dense_dtype,
                         model.ffn_matrices)

    def _ffn(self, hidden, width, tokens, dtype, matrices) -> float:
        up = self.gemm_time(tokens, width * (matrices - 1), hidden, dtype, "ffn_up")
        down = self.gemm_time(tokens, hidden, width, dtype, "ffn_down")
        return up + down

    def router_time(self, model: MoEModel, tokens: int) -> float:
        """Gate GEMM [tokens, H] x [H, E] plus top-k (memory-bound pass over the scores)."""
        if tokens <= 0:
            return 0.0
        gemm = self.gemm_time(tokens, model.num_experts, model.hidden, "bf16", "router")
        topk = tokens * model.num_experts * 4 / (self.device.memory.read_bw
                                                  * self.device.memory_efficiency)
        return gemm + topk + self.device.kernel_overhead

    def attention_time(self, model: MoEModel, new_tokens, context) -> float:
        """One layer's attention for sequences with ``new_tokens[i]`` after ``context[i]``.

        Projections are GEMMs over all new tokens; the score/value part costs
        2 x (qk_dim + v_dim) x heads FLOPs per (query, key) pair, causal within the new tokens,
        and reads every cached key/value once. MLA prefill uses the decompressed head dims,
        MLA decode the absorbed latent (kv_lora_rank + rope for scores, kv_lora_rank for values).
        """
        n = np.asarray(new_tokens, dtype=float).ravel()
        c = np.asarray(context, dtype=float).ravel()
        if n.shape != c.shape:
            raise CostError("new_tokens and context must have one entry per sequence")
        total = float(n.sum())
        if total <= 0:
            return 0.0
        pairs = float((n * c + n * (n + 1) / 2).sum())
        return float(self.attention_times(model, total, pairs, float((c + n).sum()),
                                          bool(np.all(n == 1))))

    def attention_times(self, model: MoEModel, tokens, pairs, kv_tokens, decode) -> np.ndarray:
        """``attention_time`` of many devices at once, from each one's totals: new ``tokens``,
        (query, key) ``pairs``, cached + new tokens read (``kv_tokens``), ``decode`` (all new
        tokens are single-token decodes: MLA then uses the absorbed latent)."""
        total, pairs, kv = np.broadcast_arrays(*(np.asarray(x, dtype=float)
                                                 for x in (tokens, pairs, kv_tokens)))
        decode = np.broadcast_to(np.asarray(decode, dtype=bool), total.shape)
        if model.attention == "mla":
            qk = np.where(decode, model.kv_lora_rank + model.qk_rope_head_dim,
                          model.qk_nope_head_dim + model.qk_rope_head_dim)
            v = np.where(decode, model.kv_lora_rank, model.v_head_dim)
        else:
            qk = v = model.head_dim
        proj_flops = 2.0 * model.attention_params() * total
        core_flops = 2.0 * (qk + v) * model.num_heads * pairs
        kv_per_token = model.kv_bytes_per_token("bf16") / model.num_layers
        nbytes = (model.attention_params() * BYTES_PER_PARAM[model.dense_dtype]
                  + kv * kv_per_token + 4 * total * model.hidden * self.act_bytes)
        eff = tile_efficiency(total, self.device.gemm_tile_m)
        t_proj = self.roofline(proj_flops, 0.0, model.dense_dtype, eff)
        t_core = self.roofline(core_flops, 0.0, "bf16")
        t_mem = self.roofline(0.0, nbytes, model.dense_dtype)
        out = np.maximum(t_proj + t_core, t_mem) + 2 * self.device.kernel_overhead
        for phase, is_phase in (("decode", decode), ("prefill", ~decode)):
            hit = self.table.lookup_array(f"attention_{phase}", f"{model.hidden}",
                                          model.dense_dtype, total) if self.table else None
            if hit is not None:
                out = np.where(is_phase, hit, out)
        return np.where(total > 0, out, 0.0)

    def prefill_attention_time(self, model: MoEModel, seq_lens) -> float:
        lens = np.asarray(seq_lens)
        return self.attention_time(model, lens, np.zeros_like(lens))

    def decode_attention_time(self, model: MoEModel, context_lens) -> float:
        ctx = np.asarray(context_lens)
        return self.attention_time(model, np.ones_like(ctx), ctx)

    # ----- linear form for offloading engines ----------------------------------------------
    def linear_expert_coeffs(self, model: MoEModel) -> tuple[float, float]:
        """(a, b) with expert time ~ a x tokens + b on this device, no compute/load overlap.

        b = reading one expert's weights from main memory, a = one token's FLOPs at the
        achieved rate; a measured ``expert_ffn`` curve in the table replaces both by a
        least-squares line through it.
        """
        shape = f"{model.hidden}x{model.moe_intermediate}"
        curve = self.table.curves.get(("expert_ffn", shape, model.expert_dtype)) \
            if self.table else None
        if curve and len(curve[0]) >= 2:
            a, b = np.polyfit(curve[0], curve[1], 1)
            return float(a), float(max(b, 0.0))
        d = self.device
        a = model.expert_flops_per_token() / (d.peak_flops(model.expert_dtype)
                                              * d.compute_efficiency)
        b = model.expert_bytes() / (d.memory.read_bw * d.memory_efficiency) + d.kernel_overhead
        return a, b
