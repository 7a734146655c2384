"""Medusa-1: K parallel heads on the backbone's last hidden state (Cai et al., arXiv 2401.10774), as a baseline.

Head k (0-based) reads the backbone's final hidden state at position t and predicts the token k + 2 ahead (the
backbone's own head predicts t + 1): ``logits_k = lm_head(ResBlock_k(h_t))``, ``ResBlock(x) = x + SiLU(W x + b)``,
``num_layers`` blocks per head. W starts at zero (as Medusa initialises it), so every head starts from the backbone's
own output layer, its input shifted by ``SiLU(b)``. ``lm_head`` is the backbone's, shared and frozen (``own_lm_head: false``,
the default: small artefacts), or a trainable copy per head (``own_lm_head: true``, Medusa's layout). Loss: ``sum_k
decay^k * CE_k`` (``decay`` 0.8, Medusa's ``medusa_decay_coefficient``), on the base model's own continuations
(self-distilled data), backbone frozen: Medusa-1.

Decoding: the heads see the committed sequence only, never each other's drafts, so draft k comes from head k alone;
a step drafts all K in one pass of the heads over the last committed position. Chains take each head's argmax (or a
sample when sampling); trees take each head's top candidates at its depth (Medusa's tree attention: the default
static tree, or a dynamic one), verified by the shared lossless decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtp.backbone import BackboneParts
from lightning_mtp.decoding.drafter import Drafter, chain_over_positions
from lightning_mtp.decoding.tree import DraftTree, TreeShape, tree_over_positions
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import MethodConfig, MTPMethod, future_labels, future_tokens, register_method

__all__ = ["Medusa", "MedusaDrafter", "MedusaHeads", "ResBlock"]


@register_method("medusa")
@dataclass
class Medusa(MethodConfig):
    """Medusa-1: K parallel heads on the last hidden state."""

    summary = "Medusa-1: K parallel heads on the last hidden state (Cai et al., arXiv 2401.10774), a peer baseline"

    num_heads: int = 4
    """K: heads, and draft tokens per decoding step (head k predicts the token k + 2 ahead)."""
    num_layers: int = 1
    """ResBlocks per head (Medusa's ``medusa_num_layers``)."""
    decay: float = 0.8
    """Loss weight of head k: decay^k (Medusa's ``medusa_decay_coefficient``)."""
    own_lm_head: bool = False
    """Give each head a trainable copy of the backbone's output layer (Medusa's layout) instead of sharing it."""

    @property
    def num_draft_tokens(self) -> int:
        return self.num_heads

    def validate(self) -> None:
        for name in ("num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"medusa {name} must be an integer >= 1, got {value!r}")
        if not self.decay > 0:
            raise UserInputError(f"medusa decay must be > 0, got {self.decay!r}")
        if not isinstance(self.own_lm_head, bool):
            raise UserInputError(f"medusa own_lm_head must be true or false, got {self.own_lm_head!r}")

    def build(self, parts: BackboneParts) -> MedusaHeads:
        return MedusaHeads(self, parts)


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, with W starting at zero (Medusa's initialisation)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        return x + self.act(self.linear(x))


class MedusaHeads(MTPMethod):
    def __init__(self, config: Medusa, parts: BackboneParts) -> None:
        super().__init__(config)
        H, dtype = parts.hidden_size, parts.lm_head.weight.dtype
        if parts.lm_head.weight.shape[1] != H:  # the heads feed the final hidden state straight to the output layer
            raise UserInputError(f"the backbone's output layer reads {parts.lm_head.weight.shape[1]} dimensions but its "
                                 f"hidden states have {H} (a projection between them); Medusa heads cannot be built on it, "
                                 "use a method without heads, e.g. mask_token")
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(H, dtype) for _ in range(config.num_layers))) for _ in range(config.num_heads)
        )
        self.lm_heads = None
        if config.own_lm_head:
            self.lm_heads = nn.ModuleList(copy.deepcopy(parts.lm_head).requires_grad_(True)
                                          for _ in range(config.num_heads))

    def logits(self, parts: BackboneParts, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k's logits (..., V) from final hidden states (..., H)."""
        x = self.heads[k](hidden)
        return (self.lm_heads[k] if self.lm_heads is not None else parts.lm_head)(x)

    def loss(self, parts, input_ids, labels, hidden, backbone_logits, *, attention_mask=None, position_ids=None):
        K = self.config.num_heads
        backbone_pred = backbone_logits.argmax(-1)  # (B, T) the backbone's greedy next token
        targets = [future_labels(labels, k + 2, position_ids) for k in range(K)]  # (B, T) each: the token k + 2 ahead
        chain_valid = torch.stack([t != -100 for t in targets]).all(0)  # (B, T) where every head has a target
        total = hidden.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        correct = []
        for k in range(K):
            target = targets[k]
            has = target != -100  # (B, T): only these positions reach the output layer (the costly part)
            logits = self.logits(parts, k, hidden[has]).float()  # (M, V)
            ce = torch.nan_to_num(F.cross_entropy(logits, target[has]))  # a batch with no target at this depth
            total = total + self.config.decay**k * ce
            logs[f"ce_{k + 1}"] = ce.detach()
            draft = logits.argmax(-1)[chain_valid[has]]  # (N,): chain_valid positions have every head's target
            correct.append(draft == future_tokens(backbone_pred, k + 1, -1)[chain_valid])  # (N,)
        logs["draft_correct"] = torch.stack(correct)  # (K, N)
        return total, logs

    def drafter(self, parts: BackboneParts) -> MedusaDrafter:
        return MedusaDrafter(self, parts)

    def bench_entries(self, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The chain of K drafts, and Medusa's own way: the default static tree."""
        return [("medusa", {"decoding": "speculative"}),
                ("medusa/tree-static", {"decoding": "speculative", "tree": TreeShape("static").as_dict()})]


class MedusaDrafter(Drafter):
    """Drafts K tokens from the heads at each row's last committed position; keeps no state between calls."""

    drafts_trees = True

    def __init__(self, method: MedusaHeads, parts: BackboneParts) -> None:
        self.method, self.parts = method, parts

    def _logits(self, hidden: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
        """(B, k, V): head j's logits at each row's last committed position."""
        if k > self.method.config.num_heads:
            raise UserInputError(f"medusa has {self.method.config.num_heads} heads, so it drafts at most that many "
                                 f"tokens per step; got num_draft_tokens={k}")
        B, m, _ = hidden.shape
        last = torch.full((B,), m - 1, device=hidden.device) if valid is None else \
            (valid.long() * torch.arange(m, device=hidden.device)).argmax(1)  # (B,) each row's last valid column
        h = hidden[torch.arange(B, device=hidden.device), last]  # (B, H)
        return torch.stack([self.method.logits(self.parts, j, h) for j in range(k)], dim=1)  # (B, k, V)

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int,
              probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, generator: torch.Generator | None = None,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return chain_over_positions(self, self._logits(hidden, valid, k), probs_fn, generator)

    def draft_tree(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, shape: TreeShape,
                   probs_fn=None, generator=None, valid=None, appended=None) -> DraftTree:
        k = min(k, self.method.config.num_heads)  # a deeper shape is cut to the heads there are
        return tree_over_positions(self._logits(hidden, valid, k)[0], shape, self.stop_ids)

    def select(self, rows: torch.Tensor) -> None:
        """Nothing to do: the drafter keeps no per-row state."""
