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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_mtp.backbone import BackboneParts, slot_mask
from lightning_mtp.decoding.tree import DraftTree, TreeShape, grow_tree
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import (
    DraftChain,
    MethodConfig,
    MTPMethod,
    future_labels,
    future_tokens,
    register_method,
)
from lightning_mtp.methods.cached_chain import CachedChainDrafter
from lightning_mtp.methods.mtp_block import MTPBlock

__all__ = ["FastMTP", "FastMTPHead", "FastMTPDrafter"]

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

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        if self.draft_ids is None or token_counts is None:
            return
        top = torch.topk(token_counts.float(), self.config.draft_vocab_size).indices.sort().values
        self.draft_ids.copy_(top.to(self.draft_ids.device))

    def logits(self, parts: BackboneParts, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V'), over the draft vocabulary (the full one without compression)."""
        hn = self.block.final_norm(h)
        weight, bias = parts.lm_head.weight, parts.lm_head.bias
        if self.draft_ids is not None:
            weight = weight[self.draft_ids]  # (V', H)
            bias = None if bias is None else bias[self.draft_ids]
        return F.linear(hn, weight, bias)

    def recur(self, out: torch.Tensor) -> torch.Tensor:
        """The state one application hands to the next: its output, final-normed if ``recurse_on_normed``."""
        return self.block.final_norm(out) if self.config.recurse_on_normed else out

    def _to_draft_vocab(self, ids: torch.Tensor, V: int) -> torch.Tensor:
        """Map full-vocabulary target ids to draft-vocabulary indices; ids outside the subset become -100."""
        if self.draft_ids is None:
            return ids
        table = torch.full((V,), -100, dtype=torch.long, device=ids.device)
        table[self.draft_ids] = torch.arange(len(self.draft_ids), device=ids.device)
        return torch.where(ids >= 0, table[ids.clamp(min=0)], ids)

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
            target = self._to_draft_vocab(future_labels(labels, k + 1, position_ids), V)  # (B, T)
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

    def drafter(self, parts: BackboneParts) -> FastMTPDrafter:
        return FastMTPDrafter(self, parts)

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


class FastMTPDrafter(CachedChainDrafter):
    """Chain drafting with the shared head and its own KV cache over committed positions.

    Each call first feeds the newly committed positions to the head (one call, writing their cache
    entries), then applies the head ``k`` times to its own drafts. Entries written while drafting are
    dropped at the next call (:class:`~lightning_mtp.methods.cached_chain.HeadCache` keeps that bookkeeping,
    and the slots and positions of a batch with holes).
    """

    drafts_trees = True

    def __init__(self, head: FastMTPHead, parts: BackboneParts) -> None:
        super().__init__(num_heads=1)
        self.head, self.parts = head, parts
        self.kv = self.head_caches[0]

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
            h = head.block(parts, hidden, next_ids, pos, kv.cache)[:, -1:]  # (B, 1, H) the last committed position
        else:
            cols = valid if valid is not None else torch.ones(B, m, dtype=torch.bool, device=device)  # (B, m)
            pos = kv.commit_slots(cols)  # (B, m)
            mask = slot_mask(kv.slots, m, hidden.dtype)  # (B, 1, m, slots)
            out = head.block(parts, hidden, next_ids, pos, kv.cache, attention_mask=mask)  # (B, m, H)
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
