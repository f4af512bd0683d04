"""MoE architecture specs and presets of real models.

Every preset carries the source of its numbers (the model's published ``config.json`` on its
Hugging Face model card, or its paper). Sizes are derived from the dimensions, never typed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from moesim.errors import unknown_name

# Bytes per parameter of common storage formats. MXFP4 = 4-bit values + one 8-bit scale per
# 32 values (OCP microscaling spec); Q4_K_M is llama.cpp's mix, about 4.85 bits per weight.
BYTES_PER_PARAM = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "mxfp4": 4.25 / 8,
    "q4_k_m": 4.85 / 8,
}


@dataclass(frozen=True)
class MoEModel:
    """Dimensions of a decoder-only MoE transformer, enough to size weights, FLOPs and KV cache."""

    name: str
    num_layers: int  # decoder layers, dense and MoE together
    hidden: int
    num_experts: int  # routed experts per MoE layer
    top_k: int
    moe_intermediate: int  # FFN width of one routed expert
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    first_dense_layers: int = 0  # DeepSeek's first_k_dense_replace
    dense_intermediate: int = 0  # FFN width of the dense layers (0 if none)
    shared_experts: int = 0
    shared_intermediate: int = 0  # width of one shared expert (defaults to moe_intermediate)
    gated_ffn: bool = True  # SwiGLU: gate, up and down projections (3 matrices)
    expert_bias: bool = False  # gpt-oss experts carry biases
    router: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # DeepSeek-V3 group-limited routing: experts in n_group groups
    topk_group: int = 1  # ... of which at most topk_group are chosen per token
    attention: str = "gqa"  # gqa | mla
    kv_lora_rank: int = 0  # MLA compressed KV width
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    expert_dtype: str = "bf16"
    dense_dtype: str = "bf16"
    source: str = ""
    notes: str = field(default="", compare=False)

    # ----- structure -----------------------------------------------------------------------
    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated_ffn else 2

    # ----- parameters and bytes ------------------------------------------------------------
    def expert_params(self) -> int:
        bias = (2 * self.moe_intermediate + self.hidden) if self.expert_bias else 0
        width = self.moe_intermediate * (2 if self.gated_ffn else 1)
        # gpt-oss fuses gate and up into one matrix of width 2*I; the count is the same.
        return self.hidden * width + self.moe_intermediate * self.hidden + bias

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights in ``expert_dtype``: what a cache miss moves."""
        return int(round(self.expert_params() * BYTES_PER_PARAM[self.expert_dtype]))

    def shared_expert_params(self) -> int:
        width = self.shared_intermediate or self.moe_intermediate
        return self.shared_experts * self.ffn_matrices * self.hidden * width

    def router_params(self) -> int:
        return self.hidden * self.num_experts

    def attention_params(self) -> int:
        h = self.hidden
        if self.attention == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
            else:
                q = h * self.num_heads * qk_head
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            out = self.num_heads * self.v_head_dim * h
            return q + kv_down + kv_up + out
        q = h * self.num_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        out = self.num_heads * self.head_dim * h
        return q + kv + out

    def dense_ffn_params(self) -> int:
        return self.ffn_matrices * self.hidden * self.dense_intermediate

    def total_params(self) -> int:
        moe = self.moe_layers * (
            self.num_experts * self.expert_params() + self.shared_expert_params() + self.router_params()
        )
        dense = self.first_dense_layers * self.dense_ffn_params()
        attn = self.num_layers * self.attention_params()
        embed = 2 * self.vocab * self.hidden
        return moe + dense + attn + embed

    def active_params(self) -> int:
        """Parameters one token touches (top-k routed + shared experts + everything dense)."""
        moe = self.moe_layers * (
            self.top_k * self.expert_params() + self.shared_expert_params() + self.router_params()
        )
        dense = self.first_dense_layers * self.dense_ffn_params()
        return moe + dense + self.num_layers * self.attention_params() + 2 * self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        """KV-cache bytes one token occupies over all layers (MLA caches the compressed latent)."""
        if self.attention == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_kv_heads * self.head_dim
        return int(self.num_layers * per_layer * BYTES_PER_PARAM[dtype])

    def expert_flops_per_token(self) -> int:
        """FLOPs of one (token, routed expert) pair: 2 per multiply-add."""
        return 2 * self.ffn_matrices * self.hidden * self.moe_intermediate

    def summary(self) -> dict:
        d = asdict(self)
        d.update(
            moe_layers=self.moe_layers,
            expert_bytes=self.expert_bytes(),
            total_params=self.total_params(),
            active_params=self.active_params(),
        )
        return d


def _hf(repo: str) -> str:
    return f"config.json of huggingface.co/{repo}"


PRESETS: dict[str, MoEModel] = {
    "mixtral-8x7b": MoEModel(
        name="mixtral-8x7b", num_layers=32, hidden=4096, num_experts=8, top_k=2,
        moe_intermediate=14336, vocab=32000, num_heads=32, num_kv_heads=8, head_dim=128,
        source=_hf("mistralai/Mixtral-8x7B-v0.1") + "; arXiv 2401.04088",
    ),
    "mixtral-8x22b": MoEModel(
        name="mixtral-8x22b", num_layers=56, hidden=6144, num_experts=8, top_k=2,
        moe_intermediate=16384, vocab=32768, num_heads=48, num_kv_heads=8, head_dim=128,
        source=_hf("mistralai/Mixtral-8x22B-v0.1"),
    ),
    "deepseek-v2-lite": MoEModel(
        name="deepseek-v2-lite", num_layers=27, first_dense_layers=1, hidden=2048,
        dense_intermediate=10944, num_experts=64, top_k=6, moe_intermediate=1408,
        shared_experts=2, vocab=102400, num_heads=16, num_kv_heads=16, head_dim=192,
        norm_topk_prob=False, attention="mla", kv_lora_rank=512, q_lora_rank=0,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        source=_hf("deepseek-ai/DeepSeek-V2-Lite") + "; arXiv 2405.04434",
    ),
    "deepseek-v3": MoEModel(
        name="deepseek-v3", num_layers=61, first_dense_layers=3, hidden=7168,
        dense_intermediate=18432, num_experts=256, top_k=8, moe_intermediate=2048,
        shared_experts=1, vocab=129280, num_heads=128, num_kv_heads=128, head_dim=192,
        router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
        topk_group=4, attention="mla", kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        expert_dtype="fp8", dense_dtype="fp8",
        source=_hf("deepseek-ai/DeepSeek-V3") + "; arXiv 2412.19437",
    ),
    "qwen3-30b-a3b": MoEModel(
        name="qwen3-30b-a3b", num_layers=48, hidden=2048, num_experts=128, top_k=8,
        moe_intermediate=768, vocab=151936, num_heads=32, num_kv_heads=4, head_dim=128,
        source=_hf("Qwen/Qwen3-30B-A3B"),
    ),
    "qwen3-235b-a22b": MoEModel(
        name="qwen3-235b-a22b", num_layers=94, hidden=4096, num_experts=128, top_k=8,
        moe_intermediate=1536, vocab=151936, num_heads=64, num_kv_heads=4, head_dim=128,
        source=_hf("Qwen/Qwen3-235B-A22B"),
    ),
    "qwen1.5-moe-a2.7b": MoEModel(
        name="qwen1.5-moe-a2.7b", num_layers=24, hidden=2048, num_experts=60, top_k=4,
        moe_intermediate=1408, shared_experts=1, shared_intermediate=5632, vocab=151936,
        num_heads=16, num_kv_heads=16, head_dim=128, norm_topk_prob=False,
        source=_hf("Qwen/Qwen1.5-MoE-A2.7B") + " (one shared expert of width 5632)",
    ),
    "olmoe-1b-7b": MoEModel(
        name="olmoe-1b-7b", num_layers=16, hidden=2048, num_experts=64, top_k=8,
        moe_intermediate=1024, vocab=50304, num_heads=16, num_kv_heads=16, head_dim=128,
        norm_topk_prob=False, source=_hf("allenai/OLMoE-1B-7B-0924") + "; arXiv 2409.02060",
    ),
    "gpt-oss-120b": MoEModel(
        name="gpt-oss-120b", num_layers=36, hidden=2880, num_experts=128, top_k=4,
        moe_intermediate=2880, vocab=201088, num_heads=64, num_kv_heads=8, head_dim=64,
        expert_bias=True, expert_dtype="mxfp4",
        source=_hf("openai/gpt-oss-120b") + "; gpt-oss model card (experts in MXFP4)",
    ),
    "gpt-oss-20b": MoEModel(
        name="gpt-oss-20b", num_layers=24, hidden=2880, num_experts=32, top_k=4,
        moe_intermediate=2880, vocab=201088, num_heads=64, num_kv_heads=8, head_dim=64,
        expert_bias=True, expert_dtype="mxfp4",
        source=_hf("openai/gpt-oss-20b") + "; gpt-oss model card (experts in MXFP4)",
    ),
}

ALIASES = {
    "mixtral": "mixtral-8x7b",
    "dsv2-lite": "deepseek-v2-lite",
    "dsv3": "deepseek-v3",
    "qwen3-30b": "qwen3-30b-a3b",
    "olmoe": "olmoe-1b-7b",
}


def get_model(name: str, **overrides) -> MoEModel:
    """Look up a preset by name (case-insensitive, aliases allowed); fields may be overridden."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise unknown_name("model preset", name, PRESETS)
    model = PRESETS[key]
    return replace(model, **overrides) if overrides else model


def model_names() -> list[str]:
    return sorted(PRESETS)
