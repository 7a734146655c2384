"""FastMTP: one shared MTP head applied recursively (Cai et al., arXiv 2509.18362).

Training: the same :class:`MTPBlock` runs K times; step k takes its previous hidden state (the
backbone's final hidden state for k = 1) and the embedding of the token k positions ahead (teacher
forcing) and predicts the token k + 1 ahead through the backbone's frozen output head. Loss
``sum_k a_k * CE_k`` with ``a_k = beta^(k-1) / sum_j beta^(j-1)`` (beta = 0.6, K = 3: 0.51 / 0.31 / 0.18).

Vocabulary compression (optional): the head's output layer keeps only the ``draft_vocab_size`` most
frequent token ids of the training data; drafting computes logits over that subset alone. Targets
outside it carry no loss. Verification always uses the full vocabulary, so decoding stays lossless.

Decoding: the head keeps its own KV cache over committed positions; after each verify it ingests the
committed rows in one call and then drafts up to ``num_draft_tokens`` tokens recursively, one call each (the
trained K by default; any length at decode time), ending a chain early after EOS or an unconfident draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_mtp.backbone import BackboneParts
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import (
    MethodConfig,
    MTPMethod,
    future_labels,
    future_tokens,
    register_method,
)
from lightning_mtp.methods.cached_chain import RecursiveHeadDrafter
from lightning_mtp.methods.draft_vocab import most_frequent_ids, to_draft_vocab
from lightning_mtp.methods.mtp_block import MTPBlock

__all__ = ["FastMTP", "FastMTPHead"]

LONG_CHAIN = 64
"""The longest chain of the bench's long-chain entry: the shared head applied up to 64 times per step."""
LONG_CHAIN_CONFIDENCE = 0.4
"""Its draft confidence threshold (HF assisted generation's default ``assistant_confidence_threshold``)."""
SWEEP_CHAINS = (8, 16, 32)


@register_method("fast_mtp")
@dataclass
class FastMTP(MethodConfig):
    """FastMTP: one shared head applied recursively."""

    summary = "one shared FastMTP head applied recursively (Cai et al., arXiv 2509.18362)"

    num_steps: int = 3
    """K: recursive applications of the head in training, and draft tokens per decoding step."""
    beta: float = 0.6
    """Decay of the per-step loss weights a_k = beta^(k-1) / sum_j beta^(j-1)."""
    draft_vocab_size: int | None = None
    """Vocabulary compression: keep the N most frequent training tokens in the draft head (None = all)."""
    recurse_on_normed: bool = False
    """Feed step k+1 the head's output after its final norm (as MiMo's MTP layer and the serving engines do)
    instead of before it (as DeepSeek-V3's MTP modules do)."""
    head_layer: int | None = None
    """The backbone layer index whose structure the head's decoder layer takes (models whose layers differ by
    index, e.g. DeepSeek-V3's dense and MoE layers); None: the first attention layer. Native layouts set it to
    where their MTP layer sits (DeepSeek-V3: ``num_hidden_layers``), so the head has the native layer's shape."""

    @property
    def num_draft_tokens(self) -> int:
        return self.num_steps

    def validate(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise UserInputError(f"fast_mtp num_steps (K) must be an integer >= 1, got {self.num_steps!r}")
        if not self.beta > 0:
            raise UserInputError(f"fast_mtp beta must be > 0, got {self.beta!r}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise UserInputError(f"fast_mtp draft_vocab_size must be >= 1 or None, got {self.draft_vocab_size!r}")
        if self.head_layer is not None and (isinstance(self.head_layer, bool) or not isinstance(self.head_layer, int)
                                            or self.head_layer < 0):
            raise UserInputError(f"fast_mtp head_layer must be a layer index >= 0 or None, got {self.head_layer!r}")

    def loss_weights(self) -> list[float]:
        raw = [self.beta**k for k in range(self.num_steps)]
        return [w / sum(raw) for w in raw]

    def build(self, parts: BackboneParts) -> FastMTPHead:
        return FastMTPHead(self, parts)


class FastMTPHead(MTPMethod):
    needs_token_counts = False

    def __init__(self, config: FastMTP, parts: BackboneParts) -> None:
        super().__init__(config)
        V = parts.vocab_size
        if config.draft_vocab_size is not None and config.draft_vocab_size > V:
            raise UserInputError(f"fast_mtp draft_vocab_size {config.draft_vocab_size} exceeds the backbone's vocabulary ({V})")
        self.block = MTPBlock(parts, config.head_layer)
        self.needs_token_counts = config.draft_vocab_size is not None
        if config.draft_vocab_size is not None:
            # until prepare() sees the data, the subset is the first N ids
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_ids = None
        self._gathered = None  # (key, rows, bias) of the draft vocabulary, while no gradient flows (_draft_rows)

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        if self.draft_ids is None or token_counts is None:
            return
        self.draft_ids.copy_(most_frequent_ids(token_counts, self.config.draft_vocab_size).to(self.draft_ids.device))

    def logits(self, parts: BackboneParts, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V'), over the draft vocabulary (the full one without compression)."""
        hn = self.block.final_norm(h)
        weight, bias = parts.lm_head.weight, parts.lm_head.bias
        if self.draft_ids is not None:
            weight, bias = self._draft_rows(weight, bias)  # (V', H), (V',) or None
        return F.linear(hn, weight, bias)

    def _draft_rows(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """The output layer's rows of the draft vocabulary. Gathering them costs what the whole output layer's
        matmul does at batch 1 (8k x 256 on a CPU: 0.36 ms against 0.33), so without gradients (decoding,
        validation) the gathered copy is kept until the weights, the ids or their device change."""
        if torch.is_grad_enabled():
            return weight[self.draft_ids], None if bias is None else bias[self.draft_ids]
        key = (weight.data_ptr(), weight._version, self.draft_ids.data_ptr(), self.draft_ids._version,
               None if bias is None else (bias.data_ptr(), bias._version))
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = (key, weight[self.draft_ids], None if bias is None else bias[self.draft_ids])
        return self._gathered[1:]

    def recur(self, out: torch.Tensor) -> torch.Tensor:
        """The state one application hands to the next: its output, final-normed if ``recurse_on_normed``."""
        return self.block.final_norm(out) if self.config.recurse_on_normed else out

    def loss(self, parts, input_ids, labels, hidden, backbone_logits, *, attention_mask=None, position_ids=None):
        B, T = input_ids.shape
        backbone_pred = backbone_logits.argmax(-1)  # (B, T) the backbone's greedy next token
        K, V = self.config.num_steps, parts.vocab_size
        positions = position_ids if position_ids is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        pad = 0
        total = hidden.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        correct = []
        chain_valid = future_labels(labels, K + 1, position_ids) != -100  # (B, T) positions where every step has a target
        h = hidden  # (B, T, H) what step 1 consumes: the backbone's final hidden state
        for k, a_k in enumerate(self.config.loss_weights(), start=1):
            out = self.block(parts, h, future_tokens(input_ids, k, pad), positions, attention_mask=attention_mask)
            logits = self.logits(parts, out).float()  # (B, T, V')
            h = self.recur(out)  # (B, T, H) what step k + 1 consumes
            target = to_draft_vocab(future_labels(labels, k + 1, position_ids), self.draft_ids, V)  # (B, T)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            ce = torch.nan_to_num(ce)  # a batch with no valid target at this depth
            total = total + a_k * ce
            logs[f"ce_{k}"] = ce.detach()
            draft = logits.argmax(-1)
            if self.draft_ids is not None:
                draft = self.draft_ids[draft]
            correct.append((draft == future_tokens(backbone_pred, k, -1))[chain_valid])  # (N,)
        logs["draft_correct"] = torch.stack(correct)  # (K, N)
        return total, logs

    def enter(self, hidden: torch.Tensor) -> torch.Tensor:
        """The state the first application takes from the backbone's hidden state: that state itself."""
        return hidden

    def drafter(self, parts: BackboneParts) -> RecursiveHeadDrafter:
        return RecursiveHeadDrafter(self, parts)

    def bench_entries(self, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The trained K, and long chains that end at EOS or a draft below ``LONG_CHAIN_CONFIDENCE``; ``sweep``
        adds the chain lengths of ``SWEEP_CHAINS``."""
        def chain(n: int) -> tuple[str, dict[str, Any]]:
            return (f"fast_mtp/k{n}@{LONG_CHAIN_CONFIDENCE:g}", {
                "decoding": "speculative", "num_draft_tokens": n, "draft_confidence_threshold": LONG_CHAIN_CONFIDENCE})

        entries = [("fast_mtp", {"decoding": "speculative"}), chain(LONG_CHAIN)]
        if sweep:
            entries += [chain(n) for n in SWEEP_CHAINS]
        return entries
