"""Vocabulary compression, shared by the heads that draft over a subset of the vocabulary (FastMTP, EAGLE-3).

A head keeps the ``draft_vocab_size`` most frequent token ids of its training data (``draft_ids``, sorted) and
computes logits over those alone; targets outside the subset carry no loss. Verification always uses the full
vocabulary, so decoding stays lossless.
"""

from __future__ import annotations

import torch

__all__ = ["most_frequent_ids", "to_draft_vocab"]


def most_frequent_ids(token_counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent token ids of ``token_counts`` (V,), sorted ascending: (n,)."""
    return torch.topk(token_counts.float(), n).indices.sort().values


def to_draft_vocab(ids: torch.Tensor, draft_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary ids (any shape, -100 ignored) as indices into ``draft_ids``; ids outside it become -100."""
    if draft_ids is None:
        return ids
    table = torch.full((vocab_size,), -100, dtype=torch.long, device=ids.device)
    table[draft_ids] = torch.arange(len(draft_ids), device=ids.device)
    return torch.where(ids >= 0, table[ids.clamp(min=0)], ids)
