"""The MoE layers the executor runs: a synthetic stack at a preset's real dimensions.

Each layer is what an MoE decoder layer does around its routed experts: RMSNorm, the router
(gate GEMM, softmax, top-k), the shared experts (resident), the routed experts (offloaded,
SwiGLU: ``down(silu(gate x) * up x)``) combined by their gate weights, and the residual. Attention
is not run: the executor measures the expert path, which is what offloading changes.
Weights are random (seeded per tensor), at the preset's hidden size, expert width, shared
experts and expert dtype; formats without a CPU kernel (fp8, mxfp4, int4) are stored as bf16,
which the run file records.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.executor.store import ExecutorError
from moesim.model import BYTES_PER_PARAM, MoEModel

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@dataclass(frozen=True)
class StackSpec:
    """What is run: the preset's dimensions, how many MoE layers, the routing's experts and k."""

    model: MoEModel
    layers: int
    num_experts: int
    top_k: int
    dtype: str  # storage and compute dtype of every weight
    seed: int = 0

    def __post_init__(self):
        if self.layers < 1:
            raise ExecutorError("run at least one MoE layer (--layers)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ExecutorError(f"top-k {self.top_k} must be within 1..{self.num_experts} experts")
        if self.dtype not in COMPUTE_DTYPES:
            raise ExecutorError(f"dtype {self.dtype!r} has no CPU kernel; use one of "
                                f"{', '.join(COMPUTE_DTYPES)}")

    @classmethod
    def for_model(cls, model: MoEModel, layers: int, num_experts: int | None = None,
                  top_k: int | None = None, dtype: str | None = None, seed: int = 0) -> StackSpec:
        dtype = dtype or (model.expert_dtype if model.expert_dtype in COMPUTE_DTYPES else "bf16")
        return cls(model, int(layers), int(num_experts or model.num_experts),
                   int(top_k or model.top_k), dtype, int(seed))

    @property
    def hidden(self) -> int:
        return self.model.hidden

    @property
    def inter(self) -> int:
        return self.model.moe_intermediate

    @property
    def shared_width(self) -> int:
        m = self.model
        return (m.shared_intermediate or m.moe_intermediate) * m.shared_experts

    def expert_payload_bytes(self) -> int:
        """Bytes of one routed expert's three matrices in the stack's dtype."""
        return int(3 * self.hidden * self.inter * BYTES_PER_PARAM[self.dtype])

    @property
    def dense_shape(self) -> str:
        return f"{self.hidden}x{self.num_experts}x{self.shared_width}"

    @property
    def expert_shape(self) -> str:
        return f"{self.hidden}x{self.inter}"

    def overrides(self) -> dict:
        """Dimensions that differ from the named preset (tests use small ones)."""
        from moesim.model import get_model

        base = get_model(self.model.name)
        return {k: getattr(self.model, k) for k in ("hidden", "moe_intermediate", "shared_experts",
                                                   "shared_intermediate")
                if getattr(self.model, k) != getattr(base, k)}

    def to_dict(self) -> dict:
        return {"model": self.model.name, "overrides": self.overrides(), "layers": self.layers, "num_experts": self.num_experts,
                "top_k": self.top_k, "dtype": self.dtype, "seed": self.seed, "hidden": self.hidden,
                "moe_intermediate": self.inter, "shared_width": self.shared_width,
                "model_expert_dtype": self.model.expert_dtype}


def _randn(shape, scale: float, seed: int, dtype):
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def expert_tensors(spec: StackSpec, key: int) -> dict:
    """The seeded random weights of routed expert ``key`` (= layer * E + expert)."""
    dt = torch_dtype(spec.dtype)
    H, inter = spec.hidden, spec.inter
    s = spec.seed * 1_000_003 + int(key) * 3
    return {"w_gate": _randn((inter, H), H ** -0.5, s, dt),
            "w_up": _randn((inter, H), H ** -0.5, s + 1, dt),
            "w_down": _randn((H, inter), inter ** -0.5, s + 2, dt)}


def swiglu(x, w_gate, w_up, w_down):
    """One FFN: the kernel every routed and shared expert runs."""
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class DenseLayer:
    """The resident part of one MoE layer: norm weight, router, shared experts."""

    def __init__(self, spec: StackSpec, layer: int, device="cpu"):
        import torch

        dt = torch_dtype(spec.dtype)
        H, S = spec.hidden, spec.shared_width
        base = (spec.seed + 7) * 1_000_003 + layer * 5 + 10_000_000
        self.norm = torch.ones(H, dtype=dt, device=device)
        self.gate = _randn((spec.num_experts, H), H ** -0.5, base, dt).to(device)
        self.shared = None
        if S:
            self.shared = (_randn((S, H), H ** -0.5, base + 1, dt).to(device),
                           _randn((S, H), H ** -0.5, base + 2, dt).to(device),
                           _randn((H, S), S ** -0.5, base + 3, dt).to(device))
        self.top_k = spec.top_k

    def forward(self, x):
        """Return (normed input for the experts, router top-k ids, their softmax weights,
        the residual plus shared-expert output)."""
        import torch

        var = x.float().pow(2).mean(-1, keepdim=True)
        h = (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.norm
        logits = torch.nn.functional.linear(h, self.gate).float()
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        out = x + swiglu(h, *self.shared) if self.shared is not None else x.clone()
        return h, ids, w, out


def token_input(spec: StackSpec, token: int, device="cpu"):
    """The hidden state entering the first MoE layer for ``token`` (seeded)."""
    return _randn((1, spec.hidden), 1.0, spec.seed * 7919 + int(token) + 20_000_000,
                  torch_dtype(spec.dtype)).to(device)
