"""Sequence packing: several tokenised documents per training row, each still isolated from the others.

Packing removes padding (short chat answers otherwise waste most of a batch), but the backbone must not
attend across documents and positional encodings must restart per document. What isolates them, measured
on transformers 5 (docs/data.md):

- an additive float block-diagonal causal mask of shape (B, 1, T, T) (0 where allowed, ``finfo.min``
  elsewhere), which eager and sdpa attention both honour; a bool mask is silently wrong with eager;
- ``position_ids`` restarting at 0 for every document (RoPE / learned positions, and the only signal
  flash-attention-2/3 need: they derive sequence boundaries from it). Position ids alone do NOT isolate
  documents with eager or sdpa attention.

A packed row's ``labels`` are -100 at the first token of each document, so no loss asks a document to
predict the next one's first token; ``future_labels`` (methods/base.py) keeps MTP head targets inside a
document from ``position_ids``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lightning_mtp.errors import UserInputError

__all__ = ["PACKING_MASKS", "PackedDataset", "block_causal_mask", "collate_packed", "pack_best_fit"]

PACKING_MASKS = ("4d", "position_ids")


def pack_best_fit(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group document indices into bins of at most ``max_length`` tokens (best-fit decreasing).

    Longest documents are placed first, each into the fullest bin that still has room, so bins end up
    nearly full. Deterministic: ties are broken by index, and each bin lists its documents in index order.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), ascending
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > max_length:
            raise UserInputError(f"document {i} has {n} tokens, more than max_length={max_length}; truncate it first")
        j = bisect.bisect_left(free, (n, -1))  # the bin with the least room that still fits n tokens
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return [sorted(b) for b in bins]


class PackedDataset(Dataset):
    """Rows built from groups of documents of ``base`` (each item a dict with ``input_ids`` and ``labels``).

    An item holds the concatenated ``input_ids`` and ``labels`` (with -100 at every document's first token)
    and ``position_ids`` restarting at 0 per document; :func:`collate_packed` turns a list of them into a batch.
    """

    def __init__(self, base: Dataset, bins: list[list[int]]) -> None:
        self.base, self.bins = base, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        docs = [self.base[i] for i in self.bins[k]]
        ids = [torch.as_tensor(d["input_ids"], dtype=torch.long) for d in docs]
        labels = []
        for d in docs:
            lab = torch.as_tensor(d["labels"], dtype=torch.long).clone()
            lab[0] = -100  # never a target: it would be predicted from the previous document
            labels.append(lab)
        return {
            "input_ids": torch.cat(ids),  # (T,)
            "labels": torch.cat(labels),  # (T,)
            "position_ids": torch.cat([torch.arange(len(x)) for x in ids]),  # (T,) restarting per document
        }


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask from per-document ``position_ids`` (B, T) that restart at 0.

    Query i sees key j iff j <= i and both lie in the same document: 0 there, ``finfo(dtype).min``
    elsewhere. Every query sees at least itself, so no softmax row is fully masked (padding, given its
    own run of position ids, forms its own block).
    """
    B, T = position_ids.shape
    doc = torch.cumsum(position_ids == 0, dim=-1)  # (B, T) document number of each position
    same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    idx = torch.arange(T, device=position_ids.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) key <= query
    allowed = same & causal  # (B, T, T)
    mask = torch.zeros(B, T, T, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


def collate_packed(batch: list[dict[str, torch.Tensor]], pad_id: int, mask: str = "4d") -> dict[str, torch.Tensor]:
    """Right-pad packed rows to the longest; padding gets label -100 and its own run of position ids.

    ``mask="4d"`` adds the additive (B, 1, T, T) float32 block-diagonal causal ``attention_mask`` (eager and
    sdpa attention); ``mask="position_ids"`` leaves it out, for flash-attention-2/3, which isolate
    documents from ``position_ids`` alone (and would reject a 4D mask).
    """
    if mask not in PACKING_MASKS:
        raise UserInputError(f"unknown packing mask {mask!r}; choose one of {list(PACKING_MASKS)}")
    T = max(len(b["input_ids"]) for b in batch)
    B = len(batch)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), -100, dtype=torch.long),
        "position_ids": torch.arange(T).repeat(B, 1),  # (B, T); overwritten below, padding keeps a fresh run
    }
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = b["input_ids"]
        out["labels"][i, :n] = b["labels"]
        out["position_ids"][i, :n] = b["position_ids"]
        out["position_ids"][i, n:] = torch.arange(T - n)
    if mask == "4d":
        out["attention_mask"] = block_causal_mask(out["position_ids"])  # (B, 1, T, T)
    return out
