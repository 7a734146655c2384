"""The drafter interface the decoder drives: :class:`Drafter` (what a method returns to propose drafts),
:class:`DraftChain` (a chain grown a token at a time that knows where it ends) and :class:`AppendedOutputs`
(what the backbone made of tokens a drafter asked to ride along a verify forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lightning_mtp.decoding.sampling import sample
from lightning_mtp.decoding.tree import DraftTree, TreeShape

__all__ = ["AppendedOutputs", "DraftChain", "Drafter", "chain_over_positions"]


class AppendedOutputs(NamedTuple):
    """What the backbone made of the tokens a drafter asked to append (:meth:`Drafter.appended_tokens`)."""

    logits: torch.Tensor  # (B, a, V) the backbone's logits at the appended positions
    hidden: torch.Tensor | None  # (B, a, H) their final hidden states (None when the decoder has none)
    complete: torch.Tensor  # (B,) bool: the row committed every position before the appended tokens
    before: torch.Tensor | None = None  # (B, V) the backbone's logits at the slot the appended tokens follow (where
    # ``complete``, the distribution the decoder's own next token came from)


class Drafter:
    """Proposes draft tokens during decoding; one instance per generate call (it holds caches).

    The decoder calls :meth:`draft` after every backbone forward with the positions that forward committed:
    their final hidden states and the token that follows each (``next_ids[:, j]`` is the token after the
    position of ``hidden[:, j]``). In a batch, rows commit different numbers of positions: ``valid`` marks
    the columns that hold committed positions (after the prefill, left padding is not valid; after a verify
    step, a row's columns past its accepted drafts are not); None means every column is valid. The drafter
    returns ``k`` proposed tokens per row that continue the sequence after the last valid column, and, when
    ``probs_fn`` is given (sampling), each draft's full probability row so the decoder can run rejection
    sampling. Drafts are sampled with ``generator`` (the one passed to ``generate``) so a seeded generator
    makes sampling reproducible. When rows finish, the decoder calls :meth:`select` with the rows that go on.

    A drafter may propose fewer than ``k`` tokens, even none: at batch size 1 it returns fewer columns; in a
    batch a shorter row fills its tail with -1. The decoder verifies each row's own drafts only.

    A drafter that reads the backbone itself (mask-token MTP) asks, through :meth:`appended_tokens`, for tokens
    to ride along at the end of every backbone forward (the prefill's too), after the drafts being verified.
    They cost no extra forward: their cache entries are dropped right after it, and what the backbone made
    of them reaches :meth:`draft` as ``appended``. Those outputs continue the committed sequence only in rows
    whose every verified draft was accepted (``appended.complete``); other rows must draft without them.
    :attr:`appended_at_prefill` says whether the prefill's forward carries them too (then the first draft can read
    them); without, the first draft comes after the first step's forward.

    Where a chain ends: the decoder sets :attr:`stop_ids` (the backbone's EOS ids) and :attr:`min_confidence`
    (``draft_confidence_threshold``) before the first call; a drafter that drafts one token at a time builds its
    chain through :class:`DraftChain`, which ends it after a stop token and before an unconfident position.
    """

    stop_ids: torch.Tensor | None = None
    """(E,) token ids after which a chain ends: nothing after an EOS can be emitted, so drafting on is wasted."""
    min_confidence: float = 0.0
    """A chain ends before a position whose most likely draft has less probability than this (0: never)."""
    appended_at_prefill: bool = True
    """Whether the prefill's forward carries the :meth:`appended_tokens` too (when there are any)."""

    hidden_layers: tuple[int, ...] | None = None
    """The backbone hidden states :meth:`draft` receives: None for the final ones (B, m, H), or decoder-layer ids
    whose outputs the decoder joins, (B, m, n * H) (:class:`~lightning_mtp.backbone.LayerOutputs`)."""

    drafts_trees: bool = False
    """Whether :meth:`draft_tree` proposes token trees (then ``generate(tree=...)`` verifies them)."""

    def draft_tree(
        self,
        hidden: torch.Tensor,  # (1, m, H) as for draft(): one sequence
        next_ids: torch.Tensor,  # (1, m)
        k: int,  # the deepest the tree may be
        shape: TreeShape,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
        appended: AppendedOutputs | None = None,
    ) -> DraftTree:
        """A token tree of ``shape`` (at most ``k`` deep) after the committed positions, grown with
        :func:`~lightning_mtp.decoding.tree.grow_tree`; an empty tree for no drafts this step. Drafters that set
        :attr:`drafts_trees` implement it."""
        raise NotImplementedError(f"{type(self).__name__} drafts chains only")

    def appended_tokens(self, k: int) -> torch.Tensor | None:
        """Token ids (a,) to append after the ``k`` drafts of every forward, or None (the default) for none. Where
        the next chain will be shorter, a forward carries only the first few of them (enough for that chain)."""
        return None

    def draft(
        self,
        hidden: torch.Tensor,  # (B, m, H) final hidden states of the newly committed positions
        next_ids: torch.Tensor,  # (B, m) the token after each of those positions
        k: int,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,  # (B, m) bool: columns holding committed positions; None = all
        appended: AppendedOutputs | None = None,  # passed only when appended_tokens() asks for tokens
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, k), (B, k, V) or None; fewer columns allowed
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a LongTensor of indices into the current rows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop finished rows of a batch")


class DraftChain:
    """The draft chain of a batch, grown a token at a time, that knows where each row's chain ends.

    A row's chain ends after a stop token (EOS) and before a position where the drafter's most likely token has
    less than ``min_confidence`` probability: the verifier would likely reject that draft, so drafting it and
    the ones after it costs time for nothing (HF's ``assistant_confidence_threshold``, EAGLE-2's confidence-
    guided drafting). The rule reads the drafter's distribution, never the token sampled from it, so rejection
    sampling stays exact; and nothing after an EOS can be emitted. Rows whose chain ended hold -1 in later
    columns, as :meth:`Drafter.draft` allows. With neither rule in force nothing is checked, so a chain costs no
    host synchronisation per token; with one, one per token.
    """

    def __init__(self, drafter: Drafter, batch: int, device: torch.device, sampling: bool = False) -> None:
        self.stop_ids = None if drafter.stop_ids is None else drafter.stop_ids.to(device)
        self.min_confidence = drafter.min_confidence
        self.sampling = sampling
        self.open = torch.ones(batch, dtype=torch.bool, device=device)  # (B,) rows whose chain goes on
        self.checks = self.min_confidence > 0 or (self.stop_ids is not None and self.stop_ids.numel() > 0)
        self.tokens: list[torch.Tensor] = []  # (B,) each: the drafts so far, -1 where a row's chain has ended
        self.probs: list[torch.Tensor] = []  # (B, V) each, when sampling: what rejection sampling needs

    @property
    def needs_probs(self) -> bool:
        """Whether :meth:`add` needs the drafter's probabilities (greedy drafters compute them only then)."""
        return self.sampling or self.min_confidence > 0

    def add(self, token: torch.Tensor, probs: torch.Tensor | None = None) -> bool:
        """Offer each row's next draft ``token`` (B,), drawn from the drafter's distribution ``probs`` (B, V): read
        by the confidence rule and kept for rejection sampling when sampling. Returns whether the chain goes on:
        False when no row took this draft, or no row's chain continues past it."""
        if not self.checks:
            self._append(token, probs)
            return True
        keep = self.open
        if self.min_confidence > 0:
            if probs is None:
                raise ValueError("DraftChain.add needs the drafter's probabilities when min_confidence > 0")
            keep = keep & (probs.amax(-1) >= self.min_confidence)
        self.open = keep if self.stop_ids is None else keep & ~torch.isin(token, self.stop_ids)
        if not bool(keep.any()):
            return False
        self._append(token.masked_fill(~keep, -1), probs)
        return bool(self.open.any())

    def pick(
        self,
        logits: torch.Tensor,  # (B, V) the drafter's logits for the next draft
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next draft per row (B,) and the distribution it came from (B, V): the argmax when greedy (its
        probabilities only when :attr:`needs_probs`), a sample of ``probs_fn(logits)`` when sampling."""
        if probs_fn is None:
            return logits.argmax(-1), (logits.softmax(-1) if self.needs_probs else None)
        probs = probs_fn(logits)
        return sample(probs, generator), probs

    def _append(self, token: torch.Tensor, probs: torch.Tensor | None) -> None:
        self.tokens.append(token)
        if self.sampling:
            self.probs.append(probs)

    def __len__(self) -> int:
        return len(self.tokens)

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(drafts, probs)`` as :meth:`Drafter.draft` returns them: (B, n) and, when sampling, (B, n, V)."""
        if not self.tokens:
            return self.open.new_zeros(len(self.open), 0, dtype=torch.long), None
        return torch.stack(self.tokens, dim=1), (torch.stack(self.probs, dim=1) if self.sampling else None)


def chain_over_positions(
    drafter: Drafter,
    logits: torch.Tensor,  # (B, k, V) draft j's logits, each from the committed sequence alone
    probs_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chain from drafts predicted position by position (Medusa's heads, mask-token's masks): each position's
    argmax, or a sample of its distribution when sampling (a valid proposal for rejection sampling: it need not
    depend on the drafts before it), ended where :class:`DraftChain` ends a chain. ``(drafts (B, k'), probs)``."""
    if probs_fn is None:
        drafts, probs = logits.argmax(-1), None  # (B, k)
    else:
        probs = probs_fn(logits)  # (B, k, V)
        drafts = sample(probs, generator)  # (B, k)
    chain = DraftChain(drafter, drafts.shape[0], drafts.device, sampling=probs is not None)
    if not chain.checks:
        return drafts, probs
    scores = probs if probs is not None else (logits.softmax(-1) if chain.needs_probs else None)
    for j in range(drafts.shape[1]):  # end each row's chain after EOS / before an unconfident position
        if not chain.add(drafts[:, j], None if scores is None else scores[:, j]):
            break
    return chain.result()
