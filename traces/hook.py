"""Record the expert routing a Hugging Face transformers MoE model executes, while it runs.

Extra ``capture`` (torch, transformers). Nothing else in ``moesim.traces`` imports this module.

How the routing is read (transformers 5.x splits every MoE block into a router and an
``experts`` module, see docs/capture.md):

* **experts-args** (primary): a forward pre-hook on the block's ``experts`` child reads the
  ``top_k_index``/``top_k_weights`` arguments exactly as the experts receive them, so DeepSeek-V3's
  bias-corrected, group-limited choice and its ``routed_scaling_factor`` are recorded as run.
  Switch Transformers passes a one-hot dispatch mask instead of indices (tokens over capacity are
  all-zero: they run no expert and are not recorded).
* **router-*** (fallbacks, where the experts never see indices): a forward hook on the router
  decodes what the router hands to the experts: Llama4's dense sigmoid scores (zero for unchosen
  experts), JetMoE's sorted gating 5-tuple, 4.x-style ``(idx, w)`` or ``(logits, w, idx)``. Only a
  router that returns bare logits forces a recomputed top-k; such layers are named in the metadata.

Token bookkeeping comes from the module that takes ``input_ids`` (the *stream*: ``model.model`` for
a decoder, ``encoder``/``decoder`` for Switch): its pre-hook reads the batch shape, the 2-D
``attention_mask`` (left padding is dropped, positions count real tokens only), and the KV-cache
length (phase: prefill when the cache is empty, decode for one new token per row). Its post-hook
flushes one forward pass of rows to a sink, e.g. :class:`TraceSink` which streams to
:class:`moesim.traces.TraceWriter`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moesim.errors import MoesimError
from moesim.traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMeta, optional_columns

ROUTER_NAMES = ("gate", "router")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
INPUT_NAMES = ("input_ids", "inputs_embeds")


class HookError(MoesimError):
    """A model the hook cannot trace, or a forward pass it cannot account for."""


# ----- decoding routing from what the model passes around --------------------------------------
# Each decoder turns one hook's view (arguments or output) into (ids[T, k] int64, weights[T, k]),
# with -1 ids for a token that runs no expert.


def _experts_args(args: tuple, kwargs: dict, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``experts(hidden, top_k_index, top_k_weights)``: indices and weights as passed."""
    idx, weights = _positional_or_named(args, kwargs)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise HookError(f"experts received a {idx.dtype} tensor where expert indices were expected")
    if idx.dim() == 3 and idx.shape[-1] == num_experts:
        return _from_dispatch_mask(idx, weights)
    idx = idx.reshape(-1, idx.shape[-1])
    return idx.long(), weights.reshape(idx.shape)


def _positional_or_named(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rest = list(args[1:])
    for name in ("top_k_index", "router_indices", "selected_experts", "topk_indices"):
        if name in kwargs:
            rest.insert(0, kwargs[name])
    for name in ("top_k_weights", "routing_weights", "topk_weights"):
        if name in kwargs:
            rest.append(kwargs[name])
    if len(rest) < 2:
        raise HookError("experts were called without routing indices and weights")
    return rest[0], rest[1]


def _from_dispatch_mask(mask: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch: one-hot dispatch ``mask[T, k, E]`` (all zero when capacity dropped the token)."""
    hit = mask.ne(0)
    ids = torch.where(hit.any(-1), hit.to(torch.int8).argmax(-1), -1)
    return ids.reshape(mask.shape[0], -1).long(), weights.reshape(mask.shape[0], -1)


def _router_output(out, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a router's output into what its experts execute; see the module docstring."""
    if torch.is_tensor(out):
        return _topk_of_logits(out, top_k)
    out = tuple(out)
    if len(out) == 5 and isinstance(out[3], (list, tuple)):
        return _from_sorted_gating(out, top_k)
    if len(out) == 3 and _is_int(out[2]):
        return out[2].reshape(-1, top_k).long(), out[1].reshape(-1, top_k)
    if len(out) == 3 and _is_int(out[0]) and out[0].shape[-1] == num_experts:
        return _from_dispatch_mask(out[0].reshape(-1, 1, num_experts), out[1])
    if len(out) == 2 and _is_int(out[0]):
        return out[0].reshape(-1, top_k).long(), out[1].reshape(-1, top_k)
    if len(out) == 2 and out[0].shape[-1] == num_experts:
        return _from_dense_scores(out[0].reshape(-1, num_experts), top_k)
    raise HookError(f"cannot read the routing from a router returning {len(out)} values")


def _is_int(t) -> bool:
    return torch.is_tensor(t) and not t.dtype.is_floating_point and t.dtype != torch.bool


def _from_dense_scores(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4: a dense ``[T, E]`` score that scales each expert's input; unchosen experts get 0."""
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if top_k < scores.shape[-1]:
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
        if bool(scores.masked_fill(chosen, 0).ne(0).any()):
            raise HookError("router scores have more than top_k non-zero experts per token")
    return ids, weights


def _from_sorted_gating(out: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JetMoE: (index_sorted_experts, batch_index, batch_gates, expert_size, logits).

    Slot j of the sorted order is flat position ``t*k + r`` and belongs to the expert whose
    ``expert_size`` block holds j: exactly the split the parallel experts run.
    """
    sorted_pos, _, gates, sizes, logits = out
    n_tokens = logits.reshape(-1, logits.shape[-1]).shape[0]
    expert_of_slot = torch.repeat_interleave(
        torch.arange(len(sizes), device=sorted_pos.device),
        torch.as_tensor(sizes, device=sorted_pos.device),
    )
    ids = torch.empty(n_tokens * top_k, dtype=torch.long, device=sorted_pos.device)
    weights = torch.empty(n_tokens * top_k, dtype=gates.dtype, device=gates.device)
    ids[sorted_pos] = expert_of_slot
    weights[sorted_pos] = gates
    return ids.view(n_tokens, top_k), weights.view(n_tokens, top_k)


def _topk_of_logits(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last resort for routers that return bare logits: softmax then top-k (not as executed)."""
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return ids, weights


# ----- discovering MoE layers ----------------------------------------------------------------------------
@dataclass
class MoELayer:
    """One routed MoE block and how its routing is read."""

    index: int  # 0-based over the recorded MoE layers, in module order
    path: str  # module path of the block, e.g. model.layers.3.mlp
    block: nn.Module  # timed: router + experts (+ shared experts)
    source: str  # "experts-args" (pre-hook on experts) or "router-output" (hook on the router)
    source_path: str  # module whose hook reads the routing
    num_experts: int
    top_k: int
    stream: str = ""  # path of the module that takes input_ids for this block
    expert_bytes: int = 0  # bytes of one routed expert
    dense_bytes: int = 0  # everything else in the decoder layer holding this block
    exact: bool = True  # False only for a top-k recomputed from bare logits
    _source_module: nn.Module | None = field(default=None, repr=False)


def find_moe_layers(model: nn.Module, attention_experts: bool = False) -> list[MoELayer]:
    """The routed MoE blocks of ``model`` in module order; raises HookError if there are none.

    ``attention_experts`` also records JetMoE's mixture-of-attention routers (off by default:
    they are attention heads, not FFN experts).
    """
    modules = dict(model.named_modules())
    layers: list[MoELayer] = []
    for path, block in modules.items():
        children = dict(block.named_children())
        router_name = next((n for n in ROUTER_NAMES if n in children), None)
        if router_name is None:
            continue
        router = children[router_name]
        experts = children.get("experts")
        if experts is not None and not _is_attention(block):
            layer = _experts_block(model, path, block, router, experts, router_name)
        elif {"input_linear", "output_linear"} <= set(children) and (
            attention_experts or not _is_attention(block)
        ):
            layer = _sorted_gating_block(model, path, block, router, router_name)
        else:
            continue
        layer.index = len(layers)
        layers.append(layer)
    if not layers:
        raise HookError(
            f"{type(model).__name__} has no MoE block (a module with an 'experts' child and a "
            "'gate'/'router' sibling): is this a Mixture-of-Experts model?"
        )
    for layer in layers:
        layer.stream = _stream_of(modules, layer.path)
        layer.expert_bytes, layer.dense_bytes = _layer_bytes(modules, layer)
    return layers


def _is_attention(block: nn.Module) -> bool:
    return "Attention" in type(block).__name__ or "MoA" in type(block).__name__


def _experts_block(model, path, block, router, experts, router_name) -> MoELayer:
    num_experts = _num_experts(model, block, router, experts)
    top_k = _top_k(model, block, router)
    takes_routing = len(_positional_params(experts.forward)) >= 3
    if takes_routing:
        source, source_path, module = "experts-args", f"{path}.experts", experts
    else:
        source, source_path, module = "router-output", f"{path}.{router_name}", router
    # a plain nn.Linear gate (transformers 4.x) returns bare logits: top-k must be recomputed
    exact = takes_routing or type(router) is not nn.Linear
    return MoELayer(0, path, block, source, source_path, num_experts, top_k, exact=exact,
                    _source_module=module)


def _sorted_gating_block(model, path, block, router, router_name) -> MoELayer:
    num_experts = _num_experts(model, block, router, block.input_linear)
    top_k = _top_k(model, block, router)
    return MoELayer(0, path, block, "router-output", f"{path}.{router_name}", num_experts, top_k,
                    _source_module=router)


def _positional_params(fn) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def _first_int(*values) -> int | None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def text_config(model):
    """The config holding a model's text-decoder dimensions (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _num_experts(model, block, router, experts) -> int:
    cfg = text_config(model)
    ffn = getattr(cfg, "ffn_config", None)
    n = _first_int(
        getattr(experts, "num_experts", None), getattr(router, "num_experts", None),
        getattr(block, "num_experts", None),
        len(experts) if isinstance(experts, (nn.ModuleDict, nn.ModuleList)) else None,
        getattr(cfg, "num_local_experts", None), getattr(cfg, "n_routed_experts", None),
        getattr(cfg, "num_experts", None), getattr(ffn, "moe_num_experts", None),
    )
    if n is None:
        raise HookError(f"cannot tell how many experts {type(block).__name__} has")
    return n


def _top_k(model, block, router) -> int:
    cfg = text_config(model)
    ffn = getattr(cfg, "ffn_config", None)
    top1 = 1 if "Top1" in type(router).__name__ else None
    k = _first_int(
        getattr(router, "top_k", None), getattr(block, "top_k", None), top1,
        getattr(cfg, "num_experts_per_tok", None), getattr(ffn, "moe_top_k", None),
    )
    if k is None:
        raise HookError(f"cannot tell the top-k of {type(block).__name__}")
    return k


def _stream_of(modules: dict[str, nn.Module], path: str) -> str:
    """Innermost ancestor of ``path`` whose forward takes input_ids: it knows the batch layout."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:cut])
        try:
            params = inspect.signature(modules[anc].forward).parameters
        except (TypeError, ValueError):
            continue
        if any(name in params for name in INPUT_NAMES):
            return anc
    raise HookError(f"no module above {path} takes input_ids; cannot map tokens to requests")


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _layer_bytes(modules: dict[str, nn.Module], layer: MoELayer) -> tuple[int, int]:
    """(bytes of one routed expert, bytes of the rest of the decoder layer holding the block)."""
    block = layer.block
    if hasattr(block, "experts") and not _is_attention(block):
        routed = _param_bytes(block.experts)
    else:
        routed = _param_bytes(block.input_linear) + _param_bytes(block.output_linear)
    parts = layer.path.split(".")
    decoder_layer = block
    for cut in range(2, len(parts)):  # the outermost layer list: Switch nests one inside a block
        if isinstance(modules[".".join(parts[: cut - 1])], nn.ModuleList):
            decoder_layer = modules[".".join(parts[:cut])]
            break
    return routed // layer.num_experts, _param_bytes(decoder_layer) - routed


# ----- per forward pass bookkeeping ------------------------------------------------------------------
@dataclass
class StepRows:
    """Rows of one forward pass, token-major, ready for ``TraceWriter.write_rows``."""

    request_id: np.ndarray
    token_pos: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    expert_ids: np.ndarray  # [n, k] int16
    gate_weights: np.ndarray  # [n, k] float32
    t_layer_s: np.ndarray  # wall time of this row's MoE block in this pass
    t_step_s: np.ndarray  # wall time of the whole pass

    def __len__(self) -> int:
        return len(self.layer)

    def columns(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


@dataclass
class _Pass:
    """What the stream's pre-hook learned about the batch of one forward pass."""

    stream: str
    batch: int
    seq: int
    valid: np.ndarray  # [B, S] bool: a real token (not padding, not after the end)
    positions: np.ndarray  # [B, S] position of each token in its request
    request_ids: np.ndarray  # [B]
    phase: int
    step: int
    routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    timers: dict[int, list] = field(default_factory=dict)
    t0: object = None


class _Clock:
    """perf_counter on a CPU; CUDA events (read once per pass, after the pass) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    @property
    def method(self) -> str:
        return "cuda-events" if self.cuda else "perf-counter"


class RoutingRecorder:
    """Hooks on a transformers MoE model that record the executed routing, one pass at a time.

    ``sink(rows: StepRows)`` is called after every forward pass of a stream (prefill, each
    decode step, Switch's encoder pass). Use as a context manager or call attach()/detach().
    Request ids are numbered from 0 in order of appearance (one per batch row of a new
    sequence); ``set_request_ids`` names the rows of the next new batch instead.
    ``eos_token_ids``: in decode, a row whose input token is one of these has finished; it and
    all its later tokens (padding that generate() keeps feeding) are not recorded.
    """

    def __init__(self, model: nn.Module, sink: Callable[[StepRows], None] | None, *,
                 eos_token_ids: Iterable[int] | None = None, attention_experts: bool = False):
        self.model = model
        self.sink = sink
        self.layers = find_moe_layers(model, attention_experts=attention_experts)
        self.eos_token_ids = sorted(set(eos_token_ids or []))
        self._modules = dict(model.named_modules())
        self._streams = sorted({layer.stream for layer in self.layers})
        self._roles = self._stream_roles()
        self._handles: list = []
        self._pass: _Pass | None = None
        self._clock = _Clock(next(model.parameters()).device)
        self._signatures = {s: inspect.signature(self._modules[s].forward) for s in self._streams}
        self._next_request = 0
        self._explicit_ids: list[int] | None = None
        self._batch_ids: np.ndarray | None = None
        self._finished: np.ndarray | None = None
        self._encoder_len: np.ndarray | None = None
        self.steps = 0
        self.rows = 0
        self.dropped = {"padding": 0, "finished": 0, "capacity": 0}

    # ----- attach / detach -------------------------------------------------------------------
    def attach(self) -> RoutingRecorder:
        if self._handles:
            return self
        for s in self._streams:
            mod = self._modules[s]
            self._handles.append(mod.register_forward_pre_hook(self._make_stream_pre(s), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._make_stream_post(s)))
        for layer in self.layers:
            self._handles.append(layer.block.register_forward_pre_hook(self._make_block_pre(layer)))
            self._handles.append(layer.block.register_forward_hook(self._make_block_post(layer)))
            src = layer._source_module
            if layer.source == "experts-args":
                self._handles.append(src.register_forward_pre_hook(self._make_args_hook(layer), with_kwargs=True))
            else:
                self._handles.append(src.register_forward_hook(self._make_output_hook(layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pass = None

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def set_request_ids(self, ids: Iterable[int]) -> None:
        """Request ids for the rows of the next batch that starts a new sequence."""
        self._explicit_ids = [int(i) for i in ids]

    @property
    def timing_method(self) -> str:
        return self._clock.method

    # ----- stream hooks: one forward pass ----------------------------------------------------------
    def _stream_roles(self) -> dict[str, str]:
        """'encoder' / 'decoder' for an encoder-decoder model, else 'decoder-only'."""
        if not getattr(self.model.config, "is_encoder_decoder", False):
            return {s: "decoder-only" for s in self._streams}
        enc = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        return {s: "encoder" if self._modules[s] is enc or s.endswith("encoder") else "decoder"
                for s in self._streams}

    def _make_stream_pre(self, stream: str):
        def hook(module, args, kwargs):
            if self._pass is not None:  # a nested call of the same stream: the outer one counts
                return None
            bound = _bind(self._signatures[stream], args, kwargs)
            self._pass = self._begin_pass(stream, bound)
            self._pass.t0 = self._clock.now()
            return None

        return hook

    def _make_stream_post(self, stream: str):
        def hook(module, args, output):
            p = self._pass
            if p is None or p.stream != stream:
                return None
            self._pass = None
            t_step = self._clock.seconds(p.t0, self._clock.now())
            rows = self._rows_of(p, t_step)
            self.steps += 1
            if rows is not None:
                self.rows += len(rows)
                if self.sink is not None:
                    self.sink(rows)
            return None

        return hook

    def _begin_pass(self, stream: str, bound: dict) -> _Pass:
        x = next((bound[n] for n in INPUT_NAMES if bound.get(n) is not None), None)
        if x is None:
            raise HookError(f"{stream} was called without input_ids or inputs_embeds")
        B, S = int(x.shape[0]), int(x.shape[1])
        past = _cache_length(bound.get("past_key_values"))
        role = self._roles[stream]
        valid, positions = _valid_and_positions(bound.get("attention_mask"), B, S, past)
        n_layers = sum(1 for layer in self.layers if layer.stream == stream)
        self.dropped["padding"] += int((~valid).sum()) * n_layers
        if role == "decoder":
            phase = PHASE_DECODE
            new_batch = self._batch_ids is None or len(self._batch_ids) != B
        else:
            phase = PHASE_PREFILL if past == 0 or S > 1 else PHASE_DECODE
            new_batch = past == 0
        if new_batch:
            self._start_batch(B)
            if role == "encoder":
                self._encoder_len = valid.sum(axis=1)
        elif len(self._batch_ids) != B:
            raise HookError(
                f"batch size changed from {len(self._batch_ids)} to {B} within one generation "
                "(beam search is not supported; use num_beams=1)"
            )
        if role == "decoder":
            # the answer follows the prompt on one timeline per request
            positions = positions + self._encoder_lengths(bound, B)[:, None]
        if phase == PHASE_DECODE and self.eos_token_ids and bound.get("input_ids") is not None:
            last = bound["input_ids"][:, -1].detach().cpu().numpy()
            self._finished |= np.isin(last, self.eos_token_ids)
            after_end = valid & self._finished[:, None]
            self.dropped["finished"] += int(after_end.sum()) * n_layers
            valid = valid & ~after_end
        return _Pass(stream, B, S, valid, positions, self._batch_ids.copy(), phase, self.steps)

    def _start_batch(self, batch: int) -> None:
        if self._explicit_ids is not None:
            if len(self._explicit_ids) != batch:
                raise HookError(f"set_request_ids gave {len(self._explicit_ids)} ids for a batch of {batch}")
            ids = np.asarray(self._explicit_ids, dtype=np.int64)
            self._explicit_ids = None
        else:
            ids = np.arange(self._next_request, self._next_request + batch, dtype=np.int64)
        self._next_request = max(self._next_request, int(ids.max()) + 1 if len(ids) else 0)
        self._batch_ids = ids
        self._finished = np.zeros(batch, dtype=bool)

    def _encoder_lengths(self, bound: dict, batch: int) -> np.ndarray:
        mask = bound.get("encoder_attention_mask")
        if mask is not None and mask.dim() == 2:
            return mask.detach().cpu().numpy().astype(bool).sum(axis=1)
        if self._encoder_len is not None and len(self._encoder_len) == batch:
            return self._encoder_len
        enc = bound.get("encoder_hidden_states")
        return np.full(batch, 0 if enc is None else int(enc.shape[1]), dtype=np.int64)

    # ----- block hooks: one MoE layer ---------------------------------------------------------------------
    def _make_block_pre(self, layer: MoELayer):
        def hook(module, args):
            if self._pass is not None:
                self._pass.timers[layer.index] = [self._clock.now(), None]

        return hook

    def _make_block_post(self, layer: MoELayer):
        def hook(module, args, output):
            if self._pass is not None and layer.index in self._pass.timers:
                self._pass.timers[layer.index][1] = self._clock.now()

        return hook

    def _make_args_hook(self, layer: MoELayer):
        def hook(module, args, kwargs):
            if self._pass is not None:
                self._store(layer, _experts_args(args, kwargs, layer.num_experts))

        return hook

    def _make_output_hook(self, layer: MoELayer):
        def hook(module, args, output):
            if self._pass is not None:
                if torch.is_tensor(output):
                    layer.exact = False  # bare logits: recomputed, named in the metadata
                self._store(layer, _router_output(output, layer.num_experts, layer.top_k))

        return hook

    def _store(self, layer: MoELayer, routing: tuple[torch.Tensor, torch.Tensor]) -> None:
        ids, weights = routing
        if ids.shape[-1] != layer.top_k:
            raise HookError(f"{layer.source_path} routed {ids.shape[-1]} experts per token, expected top_k={layer.top_k}")
        if layer.index in self._pass.routing:
            raise HookError(f"{layer.path} ran twice in one forward pass; cannot attribute its tokens")
        self._pass.routing[layer.index] = (ids.detach(), weights.detach())

    # ----- flush -------------------------------------------------------------------------------------------
    def _rows_of(self, p: _Pass, t_step: float) -> StepRows | None:
        if not p.routing:
            return None
        order = sorted(p.routing)
        T = p.batch * p.seq
        # layers of a model split over devices (device_map) are gathered on the first one
        where = p.routing[order[0]][0].device
        ids_dev = [p.routing[i][0].to(where) for i in order]
        w_dev = [p.routing[i][1].to(where, torch.float32) for i in order]
        for i, ids in zip(order, ids_dev, strict=True):
            if ids.shape[0] != T:
                raise HookError(
                    f"{self.layers[i].path} routed {ids.shape[0]} tokens in a pass of {p.batch}x{p.seq}"
                )
        # one device-to-host copy per pass: [T, L, k]
        ids = torch.stack(ids_dev, dim=1).cpu().numpy()
        weights = torch.stack(w_dev, dim=1).cpu().numpy()
        layer_time = np.array([self._layer_seconds(p, i) for i in order])
        keep = np.flatnonzero(p.valid.reshape(-1))
        ids, weights = ids[keep], weights[keep]
        present = ids[:, :, 0] >= 0
        self.dropped["capacity"] += int((~present).sum())
        tok, lay = np.nonzero(present)  # token-major, layers ascending
        b = keep[tok] // p.seq
        n = len(tok)
        return StepRows(
            request_id=p.request_ids[b].astype(np.int32),
            token_pos=p.positions.reshape(-1)[keep[tok]].astype(np.int32),
            step=np.full(n, p.step, dtype=np.int32),
            phase=np.full(n, p.phase, dtype=np.int8),
            layer=np.asarray(order, dtype=np.int16)[lay],
            expert_ids=ids[tok, lay].astype(np.int16),
            gate_weights=weights[tok, lay].astype(np.float32),
            t_layer_s=layer_time[lay],
            t_step_s=np.full(n, t_step),
        )

    def _layer_seconds(self, p: _Pass, index: int) -> float:
        start, end = p.timers.get(index, (None, None))
        if start is None or end is None:
            return float("nan")
        return self._clock.seconds(start, end)

    # ----- facts for the trace metadata ------------------------------------------------------------------
    def meta_fields(self, model_name: str | None = None) -> dict:
        """TraceMeta fields (minus weight_norm, which TraceSink measures) for this model."""
        first = self.layers[0]
        for layer in self.layers:
            if (layer.num_experts, layer.top_k) != (first.num_experts, first.top_k):
                raise HookError(
                    f"MoE layers differ in shape ({first.path}: {first.num_experts} experts top-{first.top_k}, "
                    f"{layer.path}: {layer.num_experts} top-{layer.top_k}); one trace needs one shape"
                )
        facts = model_facts(self.model, self.layers)
        return {
            "num_layers": len(self.layers),
            "num_experts": first.num_experts,
            "top_k": first.top_k,
            "model": model_name or facts["architecture"],
            "shared_experts": facts["shared_experts"],
            "expert_id_space": "logical",
            "source": "hf-hook",
            "expert_bytes": [layer.expert_bytes for layer in self.layers],
            "dense_bytes": [layer.dense_bytes for layer in self.layers],
            "capture": {
                "timing": self.timing_method,
                "padding": "rows of attention_mask==0 dropped",
                "eos_token_ids": self.eos_token_ids,
                "layers": [
                    {"path": layer.path, "routing_from": layer.source_path, "how": layer.source,
                     "exact": layer.exact, "stream": layer.stream}
                    for layer in self.layers
                ],
            },
            "extra": facts,
        }


def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Arguments of a call by parameter name, with any ``**kwargs`` catch-all flattened in."""
    if not args:  # generate() passes everything by keyword: nothing to bind
        return kwargs
    arguments = dict(sig.bind_partial(*args, **kwargs).arguments)
    for name, param in sig.parameters.items():
        if param.kind == inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache: [layers][k, v][B, H, T, D]
    return 0


def _valid_and_positions(mask, batch: int, seq: int, past: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the B x S tokens are real, and each one's position among its request's real tokens."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] < seq:
        positions = np.broadcast_to(past + np.arange(seq), (batch, seq)).astype(np.int64)
        return np.ones((batch, seq), dtype=bool), positions
    m = mask.detach().to("cpu").numpy().astype(bool)
    positions = np.cumsum(m, axis=1)[:, -seq:] - 1
    return m[:, -seq:].copy(), positions.astype(np.int64)


# ----- model facts ---------------------------------------------------------------------------------------
CONFIG_FACTS = (
    "norm_topk_prob", "routed_scaling_factor", "n_shared_experts", "first_k_dense_replace",
    "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step",
    "moe_layers", "topk_method", "scoring_func", "n_group", "topk_group", "expert_capacity",
    "encoder_sparse_step", "router_aux_loss_coef", "shared_expert_intermediate_size",
    "moe_intermediate_size", "intermediate_size", "hidden_size", "num_hidden_layers",
)


def model_facts(model: nn.Module, layers: list[MoELayer]) -> dict:
    """Architecture facts a simulator needs and the trace cannot show (JSON-safe)."""
    cfg = text_config(model)
    facts: dict = {"architecture": getattr(cfg, "model_type", type(model).__name__),
                   "model_class": type(model).__name__}
    for name in CONFIG_FACTS:
        value = getattr(cfg, name, None)
        if value is not None and isinstance(value, (bool, int, float, str, list, tuple)):
            facts[name] = list(value) if isinstance(value, tuple) else value
    ffn = getattr(cfg, "ffn_config", None)  # DBRX keeps its MoE settings here
    if ffn is not None:
        for name in ("moe_normalize_expert_weights", "moe_top_k", "moe_num_experts", "ffn_hidden_size"):
            if getattr(ffn, name, None) is not None:
                facts[name] = getattr(ffn, name)
    shared = 0
    children = dict(layers[0].block.named_children())
    if any(n in children for n in SHARED_EXPERT_NAMES):
        shared = _first_int(getattr(cfg, "n_shared_experts", None), getattr(cfg, "num_shared_experts", None)) or 1
    facts["shared_experts"] = shared
    facts["moe_layer_paths"] = [layer.path for layer in layers]
    total = _param_bytes(model)
    in_layers = sum(layer.expert_bytes * layer.num_experts + layer.dense_bytes for layer in layers)
    facts["other_bytes"] = total - in_layers  # embeddings, head, dense (non-MoE) layers
    facts["total_bytes"] = total
    facts["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    facts["experts_implementation"] = getattr(cfg, "_experts_implementation", None)
    import transformers

    facts["transformers_version"] = transformers.__version__
    facts["torch_version"] = torch.__version__
    return facts


# ----- streaming to a trace file -----------------------------------------------------------------------
class TraceSink:
    """Streams each pass's rows into a :class:`moesim.traces.TraceWriter`.

    The hook hands over every pass as it ends; the sink writes a Parquet row group whenever
    ``row_group_rows`` rows have gathered (a decode pass holds only batch x layers rows, and one
    row group per pass would make the file slow to read), so memory stays bounded. The file is
    opened at the first pass, once the gate weights show how they were normalised
    (``weight_norm``: 'normalised' when every token's weights sum to 1, else 'scaled' when the
    model multiplies them by a routed_scaling_factor, else 'raw'); it appears atomically on
    ``close()``.
    """

    def __init__(self, path: str | Path, meta_fields: dict | Callable[[], dict],
                 timings: bool = True, row_group_rows: int = 1 << 16):
        self.path = Path(path)
        # a callable is asked when the file opens, after the first pass (facts found while running)
        self.meta_fields = meta_fields
        self.timings = timings
        self.row_group_rows = row_group_rows
        self._writer = None
        self._pending: list[StepRows] = []
        self._pending_rows = 0
        self.rows = 0

    def __call__(self, rows: StepRows) -> None:
        if self._writer is None:
            self._open(rows)
        self._pending.append(rows)
        self._pending_rows += len(rows)
        self.rows += len(rows)
        if self._pending_rows >= self.row_group_rows:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        cols = {name: np.concatenate([getattr(r, name) for r in self._pending])
                for name in self._pending[0].columns()}
        if not self.timings:
            cols.pop("t_layer_s")
            cols.pop("t_step_s")
        self._writer.write_rows(**cols)
        self._pending.clear()
        self._pending_rows = 0

    def _open(self, rows: StepRows | None) -> None:
        from moesim.traces import TraceWriter

        fields = dict(self.meta_fields() if callable(self.meta_fields) else self.meta_fields)
        fields["weight_norm"] = _weight_norm(rows, fields.get("extra", {}))
        meta = TraceMeta(**fields)
        extra = None
        if self.timings:
            known = optional_columns(meta.top_k)
            extra = {"t_layer_s": known["t_layer_s"], "t_step_s": known["t_step_s"]}
        self._writer = TraceWriter(self.path, meta, extra_schema=extra,
                                   row_group_rows=max(self.row_group_rows, 1))
        self._writer.__enter__()

    def close(self, exc: BaseException | None = None) -> None:
        """Finish the file (an empty trace if no pass ran); on ``exc`` discard it."""
        if self._writer is None:
            if exc is not None:
                return
            self._open(None)
        try:
            if exc is None:
                self._write_pending()
        except BaseException as err:
            exc = err
            raise
        finally:
            writer, self._writer = self._writer, None
            self._pending.clear()
            if exc is None:
                writer.__exit__(None, None, None)
            else:
                writer.__exit__(type(exc), exc, exc.__traceback__)


def _weight_norm(rows: StepRows | None, facts: dict) -> str:
    if rows is None or len(rows) == 0:
        return "unknown"
    sums = rows.gate_weights.astype(np.float64).sum(axis=1)
    if np.allclose(sums, 1.0, atol=1e-3):
        return "normalised"
    if facts.get("routed_scaling_factor") not in (None, 1, 1.0):
        return "scaled"  # DeepSeek: the experts receive the weights times the factor
    return "raw"
