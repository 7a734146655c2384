"""EAGLE-3: one draft layer over the backbone's low, mid and high features (Li et al., arXiv 2503.01840), a peer baseline.

The drafter reads the outputs of three backbone layers (``aux_layers``, numbered as vLLM and speculators number
``eagle_aux_hidden_state_layer_ids``: id k is the input of layer k), fuses them with ``fc`` (3H -> H), and runs one
Llama decoder layer whose attention reads ``[input_layernorm(embed(t)); hidden_norm(g)]`` (2H wide), the residual
stream being ``g`` (or its norm, ``norm_before_residual``). Logits are ``lm_head(norm(out))`` over the draft
vocabulary (``draft_vocab_size`` most frequent training tokens; the d2t / t2d maps of the export), with the
backbone's own output rows for those tokens, frozen (as speculators keeps them); the embedding is the backbone's.

Training-time test: the layer is unrolled ``ttt_steps`` times (SpecForge's 7). Step 1 at position i takes the fused
features at i and the token i + 1; step j + 1 takes step j's own output at i and the token i + 1 + j (teacher-forced
tokens, the drafter's own states, as speculators trains it) and predicts the token i + 2 + j. Its queries see the
committed positions <= i of step 1 and their own position's entries of the earlier steps (the same keys a drafting
step sees: committed entries, then its own drafts). Loss ``sum_j decay^j KL(backbone || draft)`` (forward KL to the
backbone's distribution over the draft vocabulary; decay 0.8 as SpecForge weighs its steps).

Decoding: the recursive head drafter FastMTP uses (:class:`~lightning_mtp.methods.cached_chain.RecursiveHeadDrafter`):
the layer keeps its own KV cache over committed positions and drafts chains or trees, verified losslessly by the
shared decoder, which hands it the three layers' outputs instead of the final hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from lightning_mtp.backbone import BackboneParts, causal_mask
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import MethodConfig, MTPMethod, future_labels, future_tokens, register_method
from lightning_mtp.methods.cached_chain import RecursiveHeadDrafter
from lightning_mtp.methods.draft_vocab import most_frequent_ids

__all__ = ["Eagle3", "Eagle3DraftModel", "default_aux_layers", "draft_layer_config"]


def default_aux_layers(num_layers: int) -> list[int]:
    """speculators' and vLLM's default feature layers ``[2, L // 2, L - 3]``; on backbones too shallow for three
    distinct ones, the first, middle and last layers' outputs (fewer when L < 3)."""
    ids = [2, num_layers // 2, num_layers - 3]
    if len(set(ids)) == 3 and min(ids) >= 1:
        return ids
    return sorted({1, (num_layers + 1) // 2, num_layers})


def draft_layer_config(parts: BackboneParts) -> LlamaConfig:
    """The Llama config of the draft layer: the backbone's width, heads, MLP width and norm epsilon (what vLLM's and
    speculators' EAGLE-3 drafters read from ``transformer_layer_config``), whatever family the backbone is."""
    c, H = parts.config, parts.hidden_size
    heads = _read(c, "num_attention_heads") or max(1, H // 64)
    kv = _read(c, "num_key_value_heads") or heads
    inter = _read(c, "intermediate_size")
    rope = _read(c, "rope_parameters")
    if not (isinstance(rope, dict) and rope.get("rope_type", "default") == "default" and "rope_theta" in rope):
        rope = {"rope_type": "default", "rope_theta": 10000.0}  # a plain RoPE: the drafter's positions are its own
    return LlamaConfig(
        vocab_size=parts.vocab_size, hidden_size=H, num_hidden_layers=1,
        intermediate_size=inter if isinstance(inter, int) else 4 * H,
        num_attention_heads=heads, num_key_value_heads=kv if heads % kv == 0 else heads,
        head_dim=_read(c, "head_dim") or H // heads,
        rms_norm_eps=float(_read(c, "rms_norm_eps") or 1e-6),
        max_position_embeddings=_read(c, "max_position_embeddings") or 4096,
        rope_parameters=dict(rope), attention_bias=False, mlp_bias=False, hidden_act="silu",
        tie_word_embeddings=False, attn_implementation="sdpa",
    )


def _read(config, name: str):
    """A config value, or None where the config has none or only per-layer ones (it raises on a global read)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return None
    return value if isinstance(value, int | float | dict) and not isinstance(value, bool) else None


@register_method("eagle3")
@dataclass
class Eagle3(MethodConfig):
    """EAGLE-3: a draft layer over fused low/mid/high backbone features, trained with training-time test."""

    summary = "EAGLE-3: a draft layer over fused low, mid and high features (Li et al., arXiv 2503.01840), a peer baseline"

    ttt_steps: int = 7
    """Training-time test: unrolled steps of the draft layer on its own outputs (SpecForge's ``ttt_length``)."""
    decay: float = 0.8
    """Loss weight of step j (0-based): decay^j (SpecForge's)."""
    speculative_tokens: int = 3
    """Draft tokens per decoding step (a chain's length; speculators' ``speculative_tokens``)."""
    draft_vocab_size: int | None = None
    """The draft vocabulary: the N most frequent training tokens (EAGLE-3: 32k of Llama 3's 128k); None = all."""
    aux_layers: list[int] | None = None
    """Feature layer ids (``eagle_aux_hidden_state_layer_ids``); None: :func:`default_aux_layers`, saved once chosen."""
    norm_before_residual: bool = True
    """The residual stream is the normed features (speculators' training default) rather than the features."""

    @property
    def num_draft_tokens(self) -> int:
        return self.speculative_tokens

    def validate(self) -> None:
        for name in ("ttt_steps", "speculative_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"eagle3 {name} must be an integer >= 1, got {value!r}")
        if self.speculative_tokens > self.ttt_steps:
            raise UserInputError(f"eagle3 speculative_tokens ({self.speculative_tokens}) must be <= ttt_steps "
                                 f"({self.ttt_steps}), the depth training unrolls; decoding may still pass a longer "
                                 "num_draft_tokens")
        if not self.decay > 0:
            raise UserInputError(f"eagle3 decay must be > 0, got {self.decay!r}")
        if self.draft_vocab_size is not None and (isinstance(self.draft_vocab_size, bool) or self.draft_vocab_size < 1):
            raise UserInputError(f"eagle3 draft_vocab_size must be >= 1 or None, got {self.draft_vocab_size!r}")
        ids = self.aux_layers
        if ids is not None and (not isinstance(ids, list | tuple) or not ids or len(set(ids)) != len(ids)
                                or not all(isinstance(k, int) and not isinstance(k, bool) for k in ids)):
            raise UserInputError(f"eagle3 aux_layers must be distinct layer ids (e.g. [2, 16, 29]) or None, got {ids!r}")

    def build(self, parts: BackboneParts) -> Eagle3DraftModel:
        if parts.layers is None:
            raise UserInputError("eagle3 reads the outputs of the backbone's decoder layers, which cannot be found on "
                                 "this model; use a method that reads the final hidden state, e.g. mask_token")
        if self.aux_layers is None:
            self.aux_layers = default_aux_layers(len(parts.layers))
        self.aux_layers = [int(k) for k in self.aux_layers]
        return Eagle3DraftModel(self, parts)


class Eagle3DraftModel(MTPMethod):
    """The EAGLE-3 draft model: ``fc``, one draft layer (``layers.0``), ``norm``, named as speculators names them."""

    def __init__(self, config: Eagle3, parts: BackboneParts) -> None:
        super().__init__(config)
        H, V, dtype = parts.hidden_size, parts.vocab_size, parts.lm_head.weight.dtype
        if parts.embed_tokens.weight.shape[1] != H or parts.lm_head.weight.shape[1] != H:
            raise UserInputError(f"the backbone's embeddings and output layer must have its hidden width {H} (they have "
                                 f"{parts.embed_tokens.weight.shape[1]} and {parts.lm_head.weight.shape[1]}); eagle3 "
                                 "cannot be built on it, use a method without heads, e.g. mask_token")
        bad = [k for k in config.aux_layers if not 1 <= k <= len(parts.layers)]
        if bad:
            raise UserInputError(f"eagle3 aux_layers {bad} are out of range: the backbone has {len(parts.layers)} "
                                 f"layers, so ids run from 1 to {len(parts.layers)}")
        if config.draft_vocab_size is not None and config.draft_vocab_size > V:
            raise UserInputError(f"eagle3 draft_vocab_size {config.draft_vocab_size} exceeds the backbone's vocabulary ({V})")
        self.hidden_layers = tuple(config.aux_layers)
        self.layer_config = draft_layer_config(parts)
        self.fc = nn.Linear(len(self.hidden_layers) * H, H, bias=False, dtype=dtype)
        self.layers = nn.ModuleList([_draft_layer(self.layer_config).to(dtype)])
        self.norm = LlamaRMSNorm(H, eps=self.layer_config.rms_norm_eps).to(dtype)
        self.rotary = LlamaRotaryEmbedding(self.layer_config)
        self.needs_token_counts = config.draft_vocab_size is not None
        if config.draft_vocab_size is not None:  # until prepare() sees the data, the first N ids
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_ids = None

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        if self.draft_ids is not None and token_counts is not None:
            self.draft_ids.copy_(most_frequent_ids(token_counts, self.config.draft_vocab_size).to(self.draft_ids.device))

    def enter(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fused features: (..., n * H) -> (..., H)."""
        return self.fc(hidden)

    def recur(self, out: torch.Tensor) -> torch.Tensor:
        """A step hands the next its output as is (before the final norm)."""
        return out

    def block(self, parts: BackboneParts, state: torch.Tensor, token_ids: torch.Tensor, position_ids: torch.Tensor,
              cache=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One application of the draft layer: ``state`` (B, q, H) at each position and the token after it (B, q) to
        the layer's output (B, q, H), appending its keys to ``cache``; ``attention_mask`` additive (B or 1, 1, q, kv)."""
        layer = self.layers[0]
        hidden = layer.hidden_norm(state)
        residual = hidden if self.config.norm_before_residual else state
        x = torch.cat([layer.input_layernorm(parts.embed_tokens(token_ids)), hidden], dim=-1)  # (B, q, 2H)
        q = x.shape[1]
        if attention_mask is None and q > 1:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = causal_mask(q, past + q, x.dtype, x.device)
        attn, _ = layer.self_attn(hidden_states=x, position_embeddings=self.rotary(x, position_ids),
                                  attention_mask=attention_mask, cache=cache)
        h = residual + attn  # (B, q, H)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, parts: BackboneParts, out: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V') over the draft vocabulary, through the backbone's output rows for it."""
        weight, bias = parts.lm_head.weight, parts.lm_head.bias
        if self.draft_ids is not None:
            weight = weight[self.draft_ids]  # (V', H)
            bias = None if bias is None else bias[self.draft_ids]
        return F.linear(self.norm(out), weight, bias)

    def loss(self, parts, input_ids, labels, hidden, backbone_logits, *, attention_mask=None, position_ids=None):
        """Training-time test over ``hidden`` (B, T, n * H), the feature layers' outputs (see the module docstring)."""
        B, T = input_ids.shape
        device, S = input_ids.device, self.config.ttt_steps
        positions = position_ids if position_ids is not None else torch.arange(T, device=device).expand(B, T)
        teacher = backbone_logits.detach()  # (B, T, V)
        base = attention_mask if attention_mask is not None else causal_mask(T, T, hidden.dtype, device)  # (b, 1, T, T)
        own = torch.full((T, T), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=device).fill_diagonal_(0)
        own = own.expand(base.shape[0], 1, T, T)  # each query sees its own position's entry of an earlier step
        chain_valid = future_labels(labels, S + 1, position_ids) != -100  # (B, T) positions where every step has a target
        backbone_pred = teacher.argmax(-1)  # (B, T)
        cache, state, total = DynamicCache(), self.enter(hidden), hidden.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        correct = []
        for j in range(S):
            mask = torch.cat([base, *([own] * j)], dim=-1)  # (b, 1, T, (j + 1) T)
            state = self.block(parts, state, future_tokens(input_ids, 1 + j, 0), positions + j, cache, mask)  # (B, T, H)
            valid = future_labels(labels, 2 + j, position_ids) != -100  # (B, T) the token i + 2 + j has a label
            rows = valid | chain_valid
            logits = self.logits(parts, state[rows]).float()  # (N, V') only where a loss or a metric needs them
            kl = self._kl(logits[valid[rows]], teacher, valid, 1 + j)
            total = total + self.config.decay**j * kl
            logs[f"kl_{j + 1}"] = kl.detach()
            draft = logits[chain_valid[rows]].argmax(-1)
            draft = draft if self.draft_ids is None else self.draft_ids[draft]
            correct.append(draft == future_tokens(backbone_pred, 1 + j, -1)[chain_valid])  # (M,)
        logs["draft_correct"] = torch.stack(correct[: self.config.speculative_tokens])  # (K, M) the chain decoding drafts
        return total, logs

    def _kl(self, logits: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, offset: int) -> torch.Tensor:
        """Forward KL from the backbone's distribution at position i + ``offset`` (over the draft vocabulary) to the
        draft's ``logits`` (N, V') at the ``valid`` (B, T) positions i; 0 where none is valid."""
        b, i = valid.nonzero(as_tuple=True)
        target = teacher[b, i + offset].float()  # (N, V)
        if self.draft_ids is not None:
            target = target[:, self.draft_ids]  # (N, V')
        if target.shape[0] == 0:
            return logits.sum() * 0.0
        return F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")

    def drafter(self, parts: BackboneParts) -> RecursiveHeadDrafter:
        return RecursiveHeadDrafter(self, parts)


def _draft_layer(config: LlamaConfig) -> LlamaDecoderLayer:
    """A Llama decoder layer whose attention reads ``[embedding; features]`` (2H wide), with the features' own norm
    (``hidden_norm``): the layout vLLM's and speculators' EAGLE-3 first layer has."""
    layer = LlamaDecoderLayer(config, layer_idx=0)
    H, hd, attn = config.hidden_size, config.head_dim, layer.self_attn
    attn.q_proj = nn.Linear(2 * H, config.num_attention_heads * hd, bias=config.attention_bias)
    attn.k_proj = nn.Linear(2 * H, config.num_key_value_heads * hd, bias=config.attention_bias)
    attn.v_proj = nn.Linear(2 * H, config.num_key_value_heads * hd, bias=config.attention_bias)
    layer.hidden_norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
    return layer
