"""What the cached chain drafters (FastMTP, MTP-D) share: heads that keep a KV cache over committed positions,
extend it with a speculative chain while drafting, and drop that chain at the next call.

In a batch the decoder leaves holes (rows accept different numbers of drafts), so from the first hole on a head
cache also tracks which of its entries each row may see (``slots``) and each row's committed positions
(``positions``); at batch size 1 neither is needed and both stay None.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lightning_mtp.decoding.drafter import Drafter

__all__ = ["CachedChainDrafter", "HeadCache"]


class HeadCache:
    """One draft head's KV cache: ``committed`` entries of committed positions (with holes: slots, not
    positions), then ``speculative`` entries written while drafting, dropped at the next call."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.committed = 0
        self.speculative = 0
        self.slots: torch.Tensor | None = None  # (B, committed) bool valid entries, None while all are
        self.positions: torch.Tensor | None = None  # (B,) committed positions per row, None while == committed

    def drop_speculative(self) -> None:
        if self.speculative:
            self.cache.crop(-self.speculative)  # a negative count removes that many trailing entries
            self.speculative = 0

    def track_slots(self, batch: int, device: torch.device) -> None:
        """Start tracking slots and per-row positions (from the first hole on; a no-op once started)."""
        if self.slots is None:
            self.slots = torch.ones(batch, self.committed, dtype=torch.bool, device=device)
            self.positions = torch.full((batch,), self.committed, device=device)

    def commit_slots(self, cols: torch.Tensor) -> torch.Tensor:
        """Record n new entries, of which ``cols`` (B, n) are committed, and return their positions (B, n)."""
        pos = self.positions[:, None] + (cols.long().cumsum(1) - 1).clamp(min=0)  # (B, n)
        self.slots = torch.cat([self.slots, cols], dim=1)  # (B, slots)
        self.positions = self.positions + cols.sum(1)
        return pos

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        if self.slots is not None:
            self.slots, self.positions = self.slots[rows], self.positions[rows]


class CachedChainDrafter(Drafter):
    """A drafter whose heads each keep a :class:`HeadCache`; subclasses keep only what their heads do."""

    def __init__(self, num_heads: int) -> None:
        self.head_caches = [HeadCache() for _ in range(num_heads)]

    @property
    def caches(self) -> list[DynamicCache]:
        """Each head's KV cache."""
        return [head_cache.cache for head_cache in self.head_caches]

    def begin(self, batch: int, device: torch.device, holes: bool) -> None:
        """Start a call: drop the last chain's entries, and track slots once the batch has holes."""
        for head_cache in self.head_caches:
            head_cache.drop_speculative()
            if holes:
                head_cache.track_slots(batch, device)

    def select(self, rows: torch.Tensor) -> None:
        for head_cache in self.head_caches:
            head_cache.select(rows)
