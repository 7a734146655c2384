"""What the cached chain drafters (FastMTP, EAGLE-3, MTP-D) share: heads that keep a KV cache over committed positions,
extend it with a speculative chain while drafting, and drop that chain at the next call.

In a batch the decoder leaves holes (rows accept different numbers of drafts), so from the first hole on a head
cache also tracks which of its entries each row may see (``slots``) and each row's committed positions
(``positions``); at batch size 1 neither is needed and both stay None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from lightning_mtp.backbone import slot_mask
from lightning_mtp.decoding.drafter import DraftChain, Drafter
from lightning_mtp.decoding.tree import DraftTree, TreeShape, grow_tree
from lightning_mtp.parts import BackboneParts

__all__ = ["CachedChainDrafter", "HeadCache", "RecursiveHeadDrafter"]


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


class RecursiveHeadDrafter(CachedChainDrafter):
    """Drafting with one head applied recursively (FastMTP, EAGLE-3) and its own KV cache over committed positions.

    The head provides ``block(parts, state, token_ids, position_ids, cache, attention_mask)`` (one application:
    the state at a position and the embedding of the token after it, to the head's output there), ``enter`` (the
    state the first application takes from the backbone's hidden states), ``recur`` (the state an application hands
    the next), ``logits(parts, out)`` over its draft vocabulary and ``draft_ids`` (that vocabulary's token ids, None
    for the full one), and ``hidden_layers`` (which backbone hidden states it reads).

    Each call first feeds the newly committed positions to the head (one call, writing their cache
    entries), then applies the head ``k`` times to its own drafts. Entries written while drafting are
    dropped at the next call (:class:`~lightning_mtp.methods.cached_chain.HeadCache` keeps that bookkeeping,
    and the slots and positions of a batch with holes).
    """

    drafts_trees = True

    def __init__(self, head: nn.Module, parts: BackboneParts) -> None:
        super().__init__(num_heads=1)
        self.head, self.parts = head, parts
        self.kv = self.head_caches[0]
        self.hidden_layers = head.hidden_layers

    def draft_tree(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, shape: TreeShape,
                   probs_fn=None, generator=None, valid=None, appended=None) -> DraftTree:
        """A tree grown with the head: each expanded node is one more application of the head to that node's token
        after its parent's output, all of a level in one call, each seeing the committed entries and its ancestors'
        (a tree mask over the head's own cache)."""
        self.begin(1, next_ids.device, holes=False)
        h = self._commit(hidden, next_ids, valid)  # (1, 1, H) the head's output at the last committed position
        states: dict[int, torch.Tensor] = {-1: h[0]}  # node -> (1, H) the head's output after it (-1: the root)
        slots: dict[int, int] = {}  # node -> its speculative entry in the head's cache

        def expand(tree: DraftTree, nodes: list[int]) -> torch.Tensor:  # (w, V) the logits after each node
            out = self._expand(tree, nodes, states, slots)  # (1, w, H)
            for j, node in enumerate(nodes):
                states[node] = out[:, j]
            return self._full_vocab(self.head.logits(self.parts, out)[0])

        return grow_tree(self._full_vocab(self.head.logits(self.parts, h)[0])[-1], expand, shape, self.stop_ids)

    def _expand(self, tree: DraftTree, nodes: list[int], states: dict[int, torch.Tensor],
                slots: dict[int, int]) -> torch.Tensor:
        """Apply the head to ``nodes`` (w) after their parents' outputs in one call: (1, w, H)."""
        head, kv = self.head, self.kv
        device, depths = tree.tokens.device, tree.depths
        committed, spec, w = kv.committed, kv.speculative, len(nodes)
        allowed = torch.zeros(w, committed + spec + w, dtype=torch.bool, device=device)  # (w, kv)
        allowed[:, :committed] = True
        for j, node in enumerate(nodes):
            parent = tree.parents[node]
            while parent >= 0:  # an ancestor's entry (every ancestor was expanded: it has a child)
                allowed[j, committed + slots[parent]] = True
                parent = tree.parents[parent]
            allowed[j, committed + spec + j] = True
            slots[node] = spec + j
        prev = torch.cat([states[tree.parents[n]] for n in nodes])[None]  # (1, w, H)
        mask = torch.zeros(allowed.shape, dtype=prev.dtype, device=device).masked_fill_(~allowed, torch.finfo(prev.dtype).min)
        pos = torch.tensor([[committed + depths[n] - 1 for n in nodes]], device=device)  # (1, w)
        out = head.block(self.parts, head.recur(prev), tree.tokens[nodes][None], pos, kv.cache,
                         attention_mask=mask[None, None])
        kv.speculative += w
        return out

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(w, V') draft-vocabulary logits -> (w, V), -inf outside the draft vocabulary."""
        if self.head.draft_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.parts.vocab_size), float("-inf"))
        full[:, self.head.draft_ids] = logits
        return full

    def draft(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        k: int,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, m = next_ids.shape
        device = next_ids.device
        self.begin(B, device, holes=valid is not None)
        h = self._commit(hidden, next_ids, valid)  # (B, 1, H) the head's output at each row's last position
        chain = DraftChain(self, B, device, sampling=probs_fn is not None)
        for j in range(k):
            tok, p = self._pick(h, chain, probs_fn, generator)
            if not chain.add(tok, p) or j == k - 1:
                break
            h = self._extend(h, tok, j)
        return chain.result()  # (B, k') with k' <= k, -1 after a row's chain ended; (B, k', V) when sampling

    def _commit(self, hidden: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Feed the m newly committed positions to the head; its output (B, 1, H) at each row's last one."""
        head, parts, kv = self.head, self.parts, self.kv
        B, m = next_ids.shape
        device = next_ids.device
        if kv.slots is None:
            pos = torch.arange(kv.committed, kv.committed + m, device=device).expand(B, m)  # (B, m)
            h = head.block(parts, head.enter(hidden), next_ids, pos, kv.cache)[:, -1:]  # (B, 1, H) the last committed position
        else:
            cols = valid if valid is not None else torch.ones(B, m, dtype=torch.bool, device=device)  # (B, m)
            pos = kv.commit_slots(cols)  # (B, m)
            mask = slot_mask(kv.slots, m, hidden.dtype)  # (B, 1, m, slots)
            out = head.block(parts, head.enter(hidden), next_ids, pos, kv.cache, attention_mask=mask)  # (B, m, H)
            last = (cols.long() * torch.arange(m, device=device)).argmax(1)  # (B,) each row's last valid column
            h = out[torch.arange(B, device=device), last][:, None]  # (B, 1, H)
        kv.committed += m
        return h

    def _pick(self, h: torch.Tensor, chain: DraftChain, probs_fn, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next draft (B,) from the head's output ``h`` (B, 1, H), through the compressed vocabulary if any."""
        head, parts = self.head, self.parts
        logits = head.logits(parts, h)[:, -1]  # (B, V')
        idx, p = chain.pick(logits, probs_fn, generator)  # (B,), (B, V') or None
        if probs_fn is not None and head.draft_ids is not None:  # spread back over the full vocabulary
            full = p.new_zeros(p.shape[0], parts.vocab_size)  # (B, V) for rejection sampling
            full[:, head.draft_ids] = p
            p = full
        return (idx if head.draft_ids is None else head.draft_ids[idx]), p

    def _extend(self, h: torch.Tensor, tok: torch.Tensor, j: int) -> torch.Tensor:
        """Apply the head to draft ``j`` (``tok``, (B,)) after its own output ``h``: one speculative cache entry."""
        head, parts, kv = self.head, self.parts, self.kv
        B = tok.shape[0]
        if kv.slots is None:
            pos, mask = torch.full((B, 1), kv.committed + j, device=tok.device), None
        else:
            pos = (kv.positions + j)[:, None]  # (B, 1)
            seen = torch.cat([kv.slots, kv.slots.new_ones(B, j + 1)], dim=1)  # drafts so far + this one
            mask = slot_mask(seen, 1, h.dtype)  # (B, 1, 1, slots + j + 1)
        h = head.block(parts, head.recur(h), tok[:, None], pos, kv.cache, attention_mask=mask)  # (B, 1, H)
        kv.speculative += 1
        return h
