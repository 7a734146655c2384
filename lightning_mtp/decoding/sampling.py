"""Token selection shared by the backbone and the drafters: greedy, or sampling with HF's logits warpers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightning_mtp.errors import UserInputError

__all__ = ["make_probs_fn", "sample", "rejection_accept"]


def make_probs_fn(temperature: float, top_p: float, top_k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (..., V) -> probabilities (..., V) after temperature, top-k and top-p, in HF's order."""
    if temperature <= 0:
        raise UserInputError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserInputError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def probs_fn(logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1]).float()  # (N, V)
        flat = warpers(None, flat) if warpers else flat
        return torch.softmax(flat, dim=-1).reshape(shape)

    return probs_fn


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def rejection_accept(
    draft_ids: torch.Tensor,  # (K,) proposed tokens
    draft_probs: torch.Tensor,  # (K, V) the drafter's distribution each was sampled from
    target_probs: torch.Tensor,  # (K + 1, V) the backbone's distribution at each draft position and one past
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023) for one sequence.

    Returns ``(num_accepted, next_token)``: draft j is kept with probability min(1, p_j(d_j) / q_j(d_j));
    at the first rejection the next token is drawn from normalize(max(0, p_j - q_j)); if all K are kept
    it is drawn from p_K. The emitted tokens are then distributed exactly as the backbone's own samples.
    """
    K = draft_ids.shape[0]
    idx = torch.arange(K, device=draft_ids.device)
    p = target_probs[idx, draft_ids]  # (K,)
    q = draft_probs[idx, draft_ids]  # (K,)
    u = torch.rand(K, generator=generator, device=draft_ids.device)
    ok = u * q <= p  # u < p/q without dividing by a zero q
    rejected = (~ok).nonzero()
    if len(rejected) == 0:
        return K, int(sample(target_probs[K], generator))
    j = int(rejected[0])
    residual = (target_probs[j] - draft_probs[j]).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else target_probs[j]
    return j, int(sample(residual, generator))
