"""Load and take apart any Hugging Face causal LM without forking its modeling code.

The helpers here find a backbone's embeddings, output head, final hidden state, decoder-layer class
and rotary embedding, so that draft heads can be built from the backbone's *own* decoder-layer class
and config: every architecture transformers supports works the same way.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import fetch
from lightning_mtp.parts import BackboneParts
from lightning_mtp.resolve import resolve_model_path

__all__ = [
    "BackboneParts",
    "LastHiddenState",
    "LayerOutputs",
    "hidden_grab",
    "backbone_parts",
    "build_decoder_layer",
    "cache_layer_types",
    "cached_forward",
    "head_layer_index",
    "takes_cache",
    "call_decoder_layer",
    "causal_mask",
    "slot_mask",
    "load_backbone",
    "context_length",
    "eos_ids",
    "pad_token_id",
]

def load_backbone(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    from_scratch: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
) -> tuple[PreTrainedModel, object | None]:
    """Load ``(model, tokenizer)``. ``from_scratch`` builds random weights from the directory's config;
    ``config_overrides`` change config fields first (e.g. ``{"num_hidden_layers": 2}`` for a small draft model)."""
    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        path = str(fetch(path))  # a Hub id: through the cache, with one clear error when offline and not cached
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        for key, value in (config_overrides or {}).items():
            if not hasattr(config, key):
                raise UserInputError(f"config_overrides: {type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        if from_scratch:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
            if isinstance(torch_dtype, torch.dtype):
                model = model.to(torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise UserInputError(f"backbone {name_or_path!r} could not be loaded: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a backbone without a tokenizer still trains on token ids
    return model, tokenizer


def eos_ids(model: PreTrainedModel) -> set[int]:
    """The ids that end a sequence: the generation config's EOS, else the model config's (empty when neither has one)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def pad_token_id(model: PreTrainedModel) -> int:
    """The id that fills the rows of a batch after they end, as HF generate does (pad, else EOS)."""
    for source in (model.generation_config, model.config):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    eos = eos_ids(model)
    return min(eos) if eos else 0


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's positions cover, when its config says (None: no limit known)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The text decoder stack: ``get_decoder()`` (the language model of a multimodal model), else the base model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    return getattr(model, model.base_model_prefix, None) or model


def _decoder_layers(base: nn.Module, config) -> nn.ModuleList | None:
    """The decoder layers: ``layers`` / ``h`` / ``blocks``, else the first ModuleList of ``num_hidden_layers``
    entries (e.g. ``encoder.layer`` of a BERT-style model used as a decoder), outside an image or audio encoder (GIT
    holds its vision tower's layers before its text layers)."""
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return getattr(base, name)
    n = getattr(config, "num_hidden_layers", None)
    found = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    text = [m for name, m in found if not any(w in name for w in ("vision", "image", "visual", "audio"))]
    return next(iter(text or [m for _, m in found]), None)


def backbone_parts(model: PreTrainedModel) -> BackboneParts:
    base = _decoder(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return BackboneParts(
        base=base,
        embed_tokens=model.get_input_embeddings(),
        lm_head=model.get_output_embeddings(),
        layers=_decoder_layers(base, config),
        rotary_emb=_rotary_embedding(base),
        config=config,
        final_norm=_final_norm(base),
    )


def _rotary_embedding(base: nn.Module) -> nn.Module | None:
    """The model-level rotary embedding: ``rotary_emb`` in most models, ``pos_emb`` in LFM2 (found by its class)."""
    return next((m for m in base.children() if type(m).__name__.endswith("RotaryEmbedding")), None)


def _final_norm(base: nn.Module) -> nn.Module | None:
    """The norm after the last decoder layer (LFM2 calls it ``embedding_norm``, though it runs at the end)."""
    names = ("norm", "ln_f", "final_layernorm", "norm_f", "embedding_norm")
    return next((getattr(base, n) for n in names if isinstance(getattr(base, n, None), nn.Module)), None)


def cache_layer_types(config) -> list[type]:
    """The cache-layer class transformers gives each decoder layer of a model with this config: ``DynamicLayer``
    (full attention), ``DynamicSlidingWindowLayer``, ``LinearAttentionLayer`` (SSM / linear attention), ..."""
    return [type(layer) for layer in DynamicCache(config=config).layers]


def head_layer_index(parts: BackboneParts) -> int:
    """The decoder layer a draft head copies the class of: the first full-attention layer, else the first
    sliding-window one. A head attends over the positions it has seen, so it needs an attention layer; on a
    backbone without one (a pure SSM) head-based methods cannot be built."""
    if parts.layers is None:
        raise UserInputError(f"cannot find the decoder layers of {type(parts.base).__name__} (expected base.layers, base.h "
                             "or a ModuleList of num_hidden_layers layers) to build a draft head from; use a method without "
                             "heads, e.g. mask_token")
    kinds = cache_layer_types(parts.config)
    if not kinds:
        return 0
    for wanted in (DynamicLayer, DynamicSlidingWindowLayer):  # exact classes: hybrid layers carry an SSM state too
        for i, kind in enumerate(kinds):
            if kind is wanted:
                return i
    found = sorted({k.__name__ for k in kinds})
    raise UserInputError(f"{type(parts.layers[0]).__name__}: the backbone has no plain attention layer to build a draft "
                         f"head from (its cache layers are {found}); use a method without heads, e.g. mask_token")


def build_head_norm(parts: BackboneParts, eps: float, dtype: torch.dtype) -> nn.Module:
    """An RMSNorm of the hidden width for a head: ``nn.RMSNorm``, or the backbone's own norm class where that scales
    by ``1 + weight`` (zero-centred weights: Qwen3-Next, Qwen3.5, Gemma). A head's norm weights then mean what the
    backbone's mean, and a native MTP layer's norms (stored zero-centred) map onto the head unchanged."""
    H = parts.hidden_size
    cls = type(parts.final_norm) if parts.final_norm is not None else None
    if cls is not None and _zero_centred(cls, H, eps):
        return cls(H, eps=eps).to(dtype)
    return nn.RMSNorm(H, eps=eps, dtype=dtype)


@torch.no_grad()
def _zero_centred(cls: type, width: int, eps: float) -> bool:
    """Whether ``cls(width, eps=eps)`` is an RMSNorm whose weight starts at zero and still scales by one."""
    try:
        norm = cls(width, eps=eps)
    except TypeError:  # a norm built from a config or other arguments: not one we can build for a head
        return False
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,) or bool(weight.any()):
        return False
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (2, width) what a unit-scale RMSNorm gives
    try:
        return torch.allclose(norm(x).float(), rms, atol=1e-4)
    except (TypeError, RuntimeError):
        return False


def layer_type(parts: BackboneParts, index: int) -> str | None:
    """The config's name for decoder layer ``index`` (``"full_attention"``, ``"sliding_attention"``, ...), if it has
    ``layer_types``."""
    types = getattr(parts.config, "layer_types", None)
    return types[index] if isinstance(types, (list, tuple)) and index < len(types) else None


def build_decoder_layer(parts: BackboneParts, index: int | None = None) -> tuple[nn.Module, str | None]:
    """A fresh decoder layer (random init) of the backbone's own class for its attention layer
    (:func:`head_layer_index`), built from the config, and its layer type (for the rotary embedding).

    The layer is built at its index in the backbone (hybrid models pick the mixer by index), or at ``index``
    when given: models whose layers differ by index (DeepSeek-V3: dense below ``first_k_dense_replace``, MoE
    above) build the layer a native MTP layer at that index has. Its mixers are then renumbered 0, because a
    head keeps a cache of its own with one layer. Raises ``ValueError`` naming the reason where the layer
    cannot serve as a head.
    """
    if getattr(parts.config, "hidden_size", None) is None:  # e.g. a byte-level model's config of several sub-models
        raise UserInputError(f"{type(parts.config).__name__} names no hidden_size for its decoder layers, so a head cannot "
                             "be built from them; use a method without heads, e.g. mask_token")
    attention = head_layer_index(parts)
    index = attention if index is None else index
    if index < len(parts.layers) and layer_type(parts, index) not in (None, layer_type(parts, attention)):
        raise UserInputError(f"head_layer {index} is a {layer_type(parts, index)!r} layer; a draft head needs an attention "
                             f"layer such as layer {attention} ({layer_type(parts, attention)!r})")
    cls = type(parts.layers[attention])
    _refuse_unusable_class(cls, parts.layers[attention])
    kind = layer_type(parts, index) or layer_type(parts, attention)
    layer = _construct(cls, parts, index, kind)
    _check_rotary(cls, parts, kind)
    for module in layer.modules():  # the mixers index the cache; the layer itself may look its type up by index
        for name in ("layer_idx", "layer_id"):
            if module is not layer and isinstance(getattr(module, name, None), int):
                setattr(module, name, 0)
    _dry_run(layer, parts, kind)
    return layer, kind


def _refuse_unusable_class(cls: type, layer: nn.Module) -> None:
    """A layer class whose forward needs an input only its backbone computes, or takes no KV cache."""
    unknown = [name for name, p in list(inspect.signature(cls.forward).parameters.items())[2:]
               if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name not in _LAYER_INPUTS]
    if unknown:
        raise UserInputError(f"{cls.__name__} needs {unknown}, which lightning-mtp cannot compute for a draft head; use a "
                             "method without heads, e.g. mask_token")
    if not forward_params(layer) & _CACHE_KWARGS:
        raise UserInputError(f"{cls.__name__} takes no KV cache, which a draft head needs; use a method without heads, "
                             "e.g. mask_token")


def _construct(cls: type, parts: BackboneParts, index: int, kind: str | None) -> nn.Module:
    """``cls`` built from the config at ``index``, initialised as the backbone's own layers were."""
    params = inspect.signature(cls.__init__).parameters
    index_arg = next((n for n in ("layer_idx", "layer_id", "layer_number") if n in params), None)
    kwargs = {index_arg: index} if index_arg else {}
    if "layer_type" in params and kind is not None:  # one class for every mixer, told which one (Bamba)
        kwargs["layer_type"] = kind
    try:
        layer = cls(parts.config, **kwargs)
    except TypeError as err:  # a constructor that needs more than the config (and its index)
        raise UserInputError(f"{cls.__name__} cannot be built from the config alone ({err}); use a method without heads, "
                             "e.g. mask_token") from None
    init = getattr(parts.base, "_init_weights", None)
    if init is not None:  # some parameters are created empty and set only by the model's own initialisation
        with torch.no_grad():
            layer.apply(init)
    return layer


def _check_rotary(cls: type, parts: BackboneParts, kind: str | None) -> None:
    """Some layer types take no rotary embedding (NoPE layers whose extras only the backbone computes)."""
    if parts.rotary_emb is None or kind is None or "layer_type" not in forward_params(parts.rotary_emb):
        return
    try:
        parts.rotary_emb(parts.embed_tokens.weight[None, :1], torch.zeros(1, 1, dtype=torch.long), layer_type=kind)
    except (KeyError, AttributeError, TypeError) as err:
        raise UserInputError(f"{cls.__name__}: the backbone's rotary embedding has none for its {kind!r} layers ({err!r}); "
                             "use a method without heads, e.g. mask_token") from None


@torch.no_grad()
def _dry_run(layer: nn.Module, parts: BackboneParts, kind: str | None) -> None:
    """Run the new layer as a head runs it (a prefill, then more tokens through its cache) on zeros: a layer that
    needs inputs only its backbone computes fails here, with one clear error, instead of in the middle of a decode."""
    training, layer.training = layer.training, False
    weight = next(layer.parameters(), parts.embed_tokens.weight)  # the layer is cast to the head's dtype later
    dtype, device = weight.dtype, parts.embed_tokens.weight.device
    cache = DynamicCache()
    try:
        for start, n in ((0, 4), (4, 2)):
            hidden = torch.zeros(1, n, parts.hidden_size, dtype=dtype, device=device)
            call_decoder_layer(layer, parts, hidden, torch.arange(start, start + n, device=device)[None], cache,
                               kind=kind)
    except (TypeError, RuntimeError, AttributeError, KeyError, IndexError) as err:
        raise UserInputError(f"{type(layer).__name__} cannot run as a draft head outside its backbone ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); use a method without heads, e.g. mask_token"
                             ) from None
    finally:
        layer.training = training


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive float mask (1, 1, q, kv): query i (the last q of kv positions) sees keys <= its own position."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv)
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(k_pos > q_pos, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, q, kv)


def slot_mask(valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask (B, 1, q, kv) over KV-cache slots of which only some hold real tokens.

    ``valid`` (B, kv) marks the slots a query may see (padding and rejected drafts are False); the last
    ``q_len`` slots are the queries themselves, each seeing valid slots up to its own.
    """
    B, kv = valid.shape
    allowed = valid[:, None, :] & (causal_mask(q_len, kv, torch.float32, valid.device)[0] == 0)  # (B, q, kv)
    mask = torch.zeros(B, q_len, kv, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, q, kv)


_SIGNATURES: dict[type, frozenset[str] | None] = {}  # forward's keyword names; None: a wrapper, look inside


def _inner(module: nn.Module) -> nn.Module | None:
    """The module a PEFT, FSDP or activation-checkpoint wrapper (whose forward takes ``**kwargs``) wraps, or None."""
    if hasattr(module, "get_base_model"):
        return module.get_base_model()
    return getattr(module, "_fsdp_wrapped_module", None) or getattr(module, "_checkpoint_wrapped_module", None)


def forward_params(module: nn.Module) -> frozenset[str]:
    """The keyword names ``module.forward`` takes, read through wrappers; a dict lookup per call once known."""
    while True:
        cls = type(module)
        params = _SIGNATURES.get(cls, ...)
        if params is ...:  # first sight of this type
            inner = _inner(module)
            params = _SIGNATURES[cls] = None if inner is not None else frozenset(inspect.signature(cls.forward).parameters)
        if params is not None:
            return params
        module = _inner(module)


def cache_kwarg(module: nn.Module) -> str:
    """The keyword a model's or decoder layer's ``forward`` takes its KV cache under: ``cache`` (transformers >= 5.24),
    else ``past_key_values`` (or a layer's older ``past_key_value``, or GPT-NeoX-style ``layer_past``)."""
    params = forward_params(module)
    return next((n for n in _CACHE_ORDER if n in params), "past_key_values")


_CACHE_ORDER = ("cache", "past_key_values", "past_key_value", "layer_past")
_CACHE_KWARGS = frozenset(_CACHE_ORDER)


def takes_cache(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes a transformers KV cache under a keyword :func:`cache_kwarg` knows."""
    return bool(forward_params(module) & _CACHE_KWARGS)


_LAYER_INPUTS = frozenset({"attention_mask", "position_ids", "position_embeddings", "alibi", "layer_past", "cache",
                           "past_key_values", "past_key_value", "use_cache", "cache_position"})
"""Decoder-layer inputs :func:`call_decoder_layer` provides."""


def _alibi(parts: BackboneParts, batch: int, kv_len: int, dtype: torch.dtype, device: torch.device):
    """ALiBi biases (B * heads, 1, kv) for a BLOOM-style layer, or None where the backbone uses none (Falcon)."""
    build = getattr(parts.base, "build_alibi_tensor", None)
    if build is None or getattr(parts.config, "alibi", True) is False:
        return None
    heads = parts.config.num_attention_heads if hasattr(parts.config, "num_attention_heads") else parts.config.n_head
    return build(torch.ones(batch, kv_len, dtype=torch.long, device=device), heads, dtype)


def call_decoder_layer(
    layer: nn.Module,
    parts: BackboneParts,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    kind: str | None = None,
) -> torch.Tensor:
    """Run one decoder layer of any architecture on ``hidden`` (B, q, H) at ``position_ids`` (B, q).

    With ``cache`` (a transformers ``Cache``), keys/values are appended to it and attention spans the
    cached positions too. ``attention_mask`` is an additive float mask (B or 1, 1, q, kv), e.g. the
    block-diagonal mask of packed documents; without it an explicit causal mask is passed for several
    query rows (correct for eager and sdpa alike) and none for one row (it sees every cached key). ``kind`` is the
    layer's type for rotary embeddings that differ by type (sliding or global layers).
    """
    accepted = forward_params(layer)  # FSDP and activation-checkpoint wrappers take **kwargs: the layer's inside
    q_len = hidden.shape[1]
    past = cache.get_seq_length() if cache is not None else 0
    # one query row sees every cached key: no mask needed (and None means "no mask" to every implementation)
    if attention_mask is None and q_len > 1:
        attention_mask = causal_mask(q_len, past + q_len, hidden.dtype, hidden.device)
    kwargs = {"attention_mask": attention_mask} if "attention_mask" in accepted else {}
    if "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    if "alibi" in accepted:
        kwargs["alibi"] = _alibi(parts, hidden.shape[0], past + q_len, hidden.dtype, hidden.device)
    if parts.rotary_emb is not None and ("position_embeddings" in accepted or "kwargs" in accepted):
        rotary_kwargs = {"layer_type": kind} if kind is not None and "layer_type" in forward_params(parts.rotary_emb) else {}
        kwargs["position_embeddings"] = parts.rotary_emb(hidden, position_ids, **rotary_kwargs)
    if cache is not None:
        kwargs[cache_kwarg(layer)] = cache
        kwargs["use_cache"] = True
        if "cache_position" in accepted:
            kwargs["cache_position"] = torch.arange(past, past + q_len, device=hidden.device)
    out = layer(hidden, **kwargs)
    if cache is not None and cache.get_seq_length() != past + q_len:  # a layer that ignores the cache would
        # silently attend to the new tokens alone
        raise UserInputError(f"{type(layer).__name__} did not write its keys and values to the KV cache; its forward takes "
                             f"none of the cache keywords lightning-mtp knows ({sorted(forward_params(layer))})")
    return out[0] if isinstance(out, tuple) else out


class LastHiddenState:
    """Capture the backbone's final hidden state with a forward hook on its final norm.

    Cheaper than ``output_hidden_states=True`` (which records every layer) and equal to its last entry.
    Falls back to that flag when the architecture has no recognisable final norm.

        with LastHiddenState(parts) as grab:
            logits = model(ids, **grab.kwargs).logits
            hidden = grab.get(outputs)
    """

    def __init__(self, parts: BackboneParts) -> None:
        self.module = parts.final_norm
        self.value: torch.Tensor | None = None
        self.handle = None

    @property
    def kwargs(self) -> dict:
        return {} if self.module is not None else {"output_hidden_states": True}

    def _hook(self, module, inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output

    def __enter__(self) -> LastHiddenState:
        if self.module is not None:
            self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def get(self, outputs) -> torch.Tensor:
        if self.module is None:
            return outputs.hidden_states[-1]
        value, self.value = self.value, None
        return value


class LayerOutputs:
    """Capture the outputs of some decoder layers (EAGLE-3's low, mid and high features), joined along the hidden
    dimension: ``get`` returns (B, T, n * H). ``layers`` are ids as vLLM and speculators number them
    (``eagle_aux_hidden_state_layer_ids``): id k is the input of decoder layer k, i.e. the output of layer k - 1
    (``hidden_states[k]`` of ``output_hidden_states``), 1 <= k <= L; id L is the last layer's output before the final
    norm (where ``hidden_states[L]`` is after it). Used like
    :class:`LastHiddenState`, whose interface it shares."""

    def __init__(self, parts: BackboneParts, layers: tuple[int, ...]) -> None:
        if parts.layers is None:
            raise UserInputError("the backbone's decoder layers cannot be found, so their hidden states cannot be read; "
                                 "use a method that reads the final hidden state, e.g. fast_mtp or mask_token")
        bad = [k for k in layers if not 1 <= k <= len(parts.layers)]
        if bad:
            raise UserInputError(f"hidden-state layer ids {bad} are out of range: the backbone has {len(parts.layers)} "
                                 f"decoder layers, so ids run from 1 to {len(parts.layers)}")
        self.modules = [parts.layers[k - 1] for k in layers]
        self.hidden_size = parts.hidden_size
        self.values: list[torch.Tensor | None] = [None] * len(layers)
        self.handles: list = []

    @property
    def kwargs(self) -> dict:
        return {}  # hooks on the layers: no forward argument needed

    def _hook(self, slot: int):
        def hook(module, inputs, output) -> None:
            self.values[slot] = output[0] if isinstance(output, tuple) else output
        return hook

    def __enter__(self) -> LayerOutputs:
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def get(self, outputs) -> torch.Tensor:
        values, self.values = self.values, [None] * len(self.modules)
        for module, value in zip(self.modules, values, strict=True):
            if not (isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[-1] == self.hidden_size):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserInputError(  # a capability this backbone lacks, found where the features are read
                    f"{type(module).__name__} returns {got} from its forward, not the (batch, tokens, hidden_size="
                    f"{self.hidden_size}) hidden state a layer-feature drafter (eagle3) reads; use a method that reads "
                    "the final hidden state, e.g. fast_mtp or medusa")
        return torch.cat(values, dim=-1)  # (B, T, n * H)


def hidden_grab(parts: BackboneParts, layers: tuple[int, ...] | None) -> LastHiddenState | LayerOutputs:
    """What captures the hidden states a method reads: the final one (``layers`` None) or those layers' outputs."""
    return LastHiddenState(parts) if layers is None else LayerOutputs(parts, tuple(layers))


def cached_forward(model, ids, cache, grab: LastHiddenState | LayerOutputs | None, keep_last: int | None, attention_mask=None,
                   position_ids=None, start: int = 0):
    """One backbone forward with the cache: logits (of the last ``keep_last`` positions, or all for None), and
    the final hidden states when ``grab`` is given. Without ``position_ids`` the tokens sit at ``start``, ``start``
    + 1, ...: positions are always explicit, because a hybrid's cache may not know them (the length transformers
    reads off its first layer is 0 when that layer keeps a recurrent state instead of keys)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **(grab.kwargs if grab is not None else {})}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is None and "position_ids" in forward_params(model):
        position_ids = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if keep_last is not None and "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = keep_last
    out = model(input_ids=ids, **kwargs)
    return out.logits, (grab.get(out) if grab is not None else None)
