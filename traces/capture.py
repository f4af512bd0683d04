"""Run prompts through a transformers MoE model with ``generate()`` and capture a routing trace.

Extra ``capture`` (torch, transformers). MODEL is a local directory (weights + tokenizer) or
``tiny:ARCH``: a small random-weight model built from that architecture's config class, seeded,
with a byte-level tokenizer, so capture can be exercised with no downloads. No hub is reachable
from moesim's machines, so ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import MoesimError, unknown_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ----- tiny random-weight models ------------------------------------------------------------------
# Two layers, hidden 32, 8 experts, top-2 (Switch: top-1), vocabulary 288 (256 bytes + specials).
# Each architecture keeps its own routing features: shared experts, group-limited routing with a
# correction bias and a scaling factor (DeepSeek), sparsemixer (PhiMoE), sigmoid scores (Llama4),
# capacity-limited top-1 routing (Switch).
TINY_VOCAB = 288
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=0)
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(_DECODER, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, norm_topk_prob=False),
    "qwen3_moe": dict(_DECODER, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "olmoe": dict(_DECODER, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(_DECODER, **_MLA, q_lora_rank=None, n_shared_experts=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=16.0),
    "deepseek_v3": dict(_DECODER, **_MLA, q_lora_rank=16, n_shared_experts=1, n_group=4,
                        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    "phimoe": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                        intermediate_size_mlp=64, interleave_moe_layer_step=1),
    "jetmoe": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, kv_channels=8),
    # DBRX from a fresh config: set rope_theta and clip_qkv by hand (transformers 5.23 pitfalls)
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=TINY_VOCAB,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0)),
    "switch_transformers": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                num_decoder_layers=2, num_experts=8, encoder_sparse_step=1,
                                decoder_sparse_step=1, expert_capacity=64, vocab_size=TINY_VOCAB,
                                pad_token_id=0, eos_token_id=2, decoder_start_token_id=0),
}
TINY_ALIASES = {"llama4": "llama4_text", "switch": "switch_transformers", "gpt-oss": "gpt_oss",
                "deepseek-v2": "deepseek_v2", "deepseek-v3": "deepseek_v3", "qwen2-moe": "qwen2_moe",
                "qwen3-moe": "qwen3_moe"}


def tiny_arch(name: str) -> str:
    arch = TINY_ALIASES.get(name, name).replace("-", "_")
    if arch not in TINY_CONFIGS:
        raise unknown_name("tiny architecture", name, TINY_CONFIGS)
    return arch


def tiny_config(arch: str, **overrides):
    """The config of ``tiny:ARCH`` (a transformers PretrainedConfig)."""
    from transformers import AutoConfig

    arch = tiny_arch(arch)
    return AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})


def build_tiny_model(arch: str, seed: int = 0, device: str = "cpu",
                     experts_implementation: str | None = None, **config_overrides):
    """A random-weight model of ``arch`` (same seed, same weights), in eval mode.

    ``experts_implementation`` ("eager", "grouped_mm", ...) applies where the architecture lets
    transformers switch it; None keeps transformers' default.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            # a correction bias of zeros would make DeepSeek-V3's choice equal top-k of the logits
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    if experts_implementation is not None and type(model)._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
    return model.to(device).eval()


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3; 0 pad, 1 bos, 2 eos), padding on the left."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str], return_tensors: str = "pt", **_):
        import torch

        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----- loading a model --------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    source: str  # "tiny" or "local"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def load_model(spec: str, device: str = "cpu", dtype: str = "auto", seed: int = 0) -> LoadedModel:
    """``tiny:ARCH`` or a local directory; a hub id gives one clear line (no hub here)."""
    _check_device(device)
    if spec.startswith("tiny:"):
        arch = tiny_arch(spec.removeprefix("tiny:"))
        model = build_tiny_model(arch, seed=seed, device=device)
        if dtype not in ("auto", "float32"):
            model = model.to(_torch_dtype(dtype))
        return LoadedModel(model, ByteTokenizer(), f"tiny:{arch}", "tiny")
    path = Path(spec).expanduser()
    if not path.exists() and (path.is_absolute() or spec.startswith((".", "~"))):
        raise MoesimError(f"{spec}: no such model directory")
    if not path.exists():
        raise MoesimError(
            f"model {spec!r} is not a local directory, and no model hub is reachable from here "
            "(HF_HUB_OFFLINE=1): download it on a connected machine and pass its path, or use "
            f"tiny:ARCH ({', '.join(TINY_CONFIGS)})"
        )
    if not (path / "config.json").exists():
        raise MoesimError(f"{path}: no config.json; expected a transformers model directory")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise MoesimError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "beside the weights (tokenizer.save_pretrained)"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, local_files_only=True, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoesimError(f"{path}: cannot load the model or its tokenizer ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.to(device).eval(), tokenizer, path.name, "local")


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoesimError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise MoesimError(f"--device must be cpu or cuda[:N], got {device!r}")


def _torch_dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise unknown_name("dtype", name, table)
    return table[name]


# ----- prompts -------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line, or JSON Lines with a "prompt" (or "text") per line."""
    path = Path(path)
    if not path.is_file():
        raise MoesimError(f"{path}: no such prompts file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MoesimError(f"{path}: prompts must be UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoesimError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            text = item if isinstance(item, str) else (item.get("prompt") or item.get("text")
                                                       if isinstance(item, dict) else None)
            if not isinstance(text, str):
                raise MoesimError(f'{path}:{number}: expected a string or an object with "prompt"')
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise MoesimError(f"{path}: no prompts (one per line, or JSON Lines with \"prompt\")")
    return prompts


# ----- capture -----------------------------------------------------------------------------------------
def capture(loaded: LoadedModel, prompts: Sequence[str], out: str | os.PathLike, *,
            max_new_tokens: int, batch_size: int = 1, seed: int = 0, do_sample: bool = False,
            timings: bool = True, settings: dict | None = None) -> dict:
    """Generate for every prompt (in batches, left-padded) and stream the routing to ``out``.

    Returns a summary (requests, tokens, rows, passes, wall time, where rows were dropped).
    The file appears only if every batch ran.
    """
    import torch

    from moesim.traces.hook import RoutingRecorder, TraceSink

    if max_new_tokens < 1:
        raise MoesimError("--max-new-tokens must be at least 1")
    if batch_size < 1:
        raise MoesimError("--batch-size must be at least 1")
    model, tok = loaded.model, loaded.tokenizer
    eos = _eos_ids(model)
    holder: dict = {}
    recorder = RoutingRecorder(model, lambda rows: holder["sink"](rows), eos_token_ids=eos)
    device = next(model.parameters()).device
    recorder.meta_fields(loaded.name)  # refuse a model that cannot make one trace, before running
    driver = {"driver": "generate", "device": str(device), "batch_size": batch_size,
              "max_new_tokens": max_new_tokens, "do_sample": do_sample, "seed": seed,
              "prompts": len(prompts), "model_source": loaded.source, **(settings or {})}

    def fields() -> dict:
        meta = recorder.meta_fields(loaded.name)
        meta["capture"].update(driver)
        return meta

    sink = TraceSink(out, fields, timings=timings)
    holder["sink"] = sink
    pad = getattr(tok, "pad_token_id", None)
    prompt_tokens = generated = 0
    t0 = time.perf_counter()
    try:
        with recorder, torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start:start + batch_size])
                enc = tok(batch, return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                recorder.set_request_ids(range(start, start + len(batch)))
                torch.manual_seed(seed + start)
                result = model.generate(**enc, max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, num_beams=1, pad_token_id=pad)
                prompt_tokens += int(enc["attention_mask"].sum())
                generated += _generated_tokens(result, enc, model, eos)
    except BaseException as exc:
        sink.close(exc)
        raise
    sink.close()
    wall = time.perf_counter() - t0
    return {
        "out": str(out), "model": loaded.name, "requests": len(prompts),
        "prompt_tokens": prompt_tokens, "generated_tokens": generated, "rows": sink.rows,
        "forward_passes": recorder.steps, "moe_layers": len(recorder.layers),
        "experts": recorder.layers[0].num_experts, "top_k": recorder.layers[0].top_k,
        "wall_s": wall, "timing": recorder.timing_method,
        "dropped_rows": dict(recorder.dropped),
    }


def _eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generated_tokens(result, enc, model, eos: list[int]) -> int:
    """New tokens up to and including each row's first end-of-sequence token."""
    new = result if model.config.is_encoder_decoder else result[:, enc["input_ids"].shape[1]:]
    if model.config.is_encoder_decoder:
        new = new[:, 1:]  # the decoder start token is not generated
    total = 0
    for row in new.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        total += n
    return total
