"""ConfAdapt and static-k decoding with mask tokens (Kirchenbauer et al., arXiv 2602.06019): lossy, batch size 1.

Each forward feeds the tokens accepted last step plus ``k - 1`` mask tokens, using the KV cache; the logits
at the last accepted token and at each mask are k predictions of the next k tokens. ConfAdapt keeps the
longest leading run of predictions whose top-1 probability is >= tau (always at least one: the first
prediction is the model's ordinary next token); static k keeps all k. The cache entries written for the
masks are cropped right after the forward, so a mask never reaches a later step; the accepted tokens are
fed (and cached) at the next step. Nothing is verified, so the output may differ from greedy decoding:
this trades accuracy for tokens per forward (``tau`` sets the trade).

It runs in the shared decode loop (:func:`~lightning_mtp.decoding.speculative.speculative_generate` with
``trust_drafts=True``): the masks are the tokens that ride along every forward but the prefill's, and
:class:`ConfAdaptDrafter` turns what the backbone made of them into a chain of the confident predictions, which
the loop keeps unverified. So the cache, the recurrent-state rollback, the EOS/budget cut and the statistics are
the lossless decoder's own.

Statistics follow :class:`~lightning_mtp.decoding.speculative.DecodeStats`: predictions 2..k are counted as
draft positions 1..k-1, so ``acceptance_per_position`` is the fraction of steps that kept prediction j + 1
given they kept prediction j, and ``tokens_per_forward`` is the mean number of tokens kept per forward after
the prefill (which yields one token, as in every other decoder).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from lightning_mtp.decoding.drafter import AppendedOutputs, Drafter
from lightning_mtp.decoding.sampling import sample
from lightning_mtp.decoding.speculative import (
    GenerateOutput,
    check_generate_inputs,
    speculative_generate,
    verifies_several_tokens,
)
from lightning_mtp.errors import UserInputError

__all__ = ["ConfAdaptDrafter", "conf_adapt_generate", "confident_prefix_length"]


def confident_prefix_length(confidence: torch.Tensor, tau: float | None) -> int:
    """How many of k predictions ConfAdapt keeps: the longest leading run with ``confidence >= tau``, at least 1.

    ``confidence`` (k,) holds each prediction's top-1 probability; ``tau=None`` keeps all k (static k).
    The threshold is inclusive.
    """
    k = confidence.shape[0]
    if tau is None:
        return k
    run = int((confidence >= tau).long().cumprod(0).sum())
    return max(1, run)


class ConfAdaptDrafter(Drafter):
    """Drafts ConfAdapt's kept predictions 2..k from the ``k - 1`` masks that ride along each forward.

    The first prediction is the backbone's own next token (the decoder picks it from ``appended.before``); the
    masks' predictions follow it, and the chain is the confident run among them, empty when the first prediction
    itself is unsure (:func:`confident_prefix_length`). ConfAdapt's first forward is the prompt alone, so the first
    draft comes after the first step.
    """

    appended_at_prefill = False

    def __init__(self, mask_token_id: int, tau: float | None) -> None:
        self.mask_token_id, self.tau = mask_token_id, tau

    def appended_tokens(self, k: int) -> torch.Tensor:
        return torch.full((k,), self.mask_token_id, dtype=torch.long)

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int,
              probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, generator: torch.Generator | None = None,
              valid: torch.Tensor | None = None, appended: AppendedOutputs | None = None
              ) -> tuple[torch.Tensor, None]:
        if appended is None:  # only the prefill has none, and nothing drafts after it
            return next_ids.new_zeros(next_ids.shape[0], 0), None
        logits = torch.cat([appended.before[:, None], appended.logits[:, :k]], dim=1)  # (B, 1 + k, V)
        probs = torch.softmax(logits.float(), dim=-1) if probs_fn is None else probs_fn(logits)
        confidence, best = probs.max(-1)  # (B, 1 + k)
        tokens = best[:, 1:] if probs_fn is None else sample(probs[:, 1:], generator)  # (B, k) predictions 2..k+1
        kept = [confident_prefix_length(c, self.tau) - 1 if ok else 0
                for c, ok in zip(confidence, appended.complete.tolist(), strict=True)]
        n = max(kept)
        tail = torch.arange(n, device=tokens.device) >= torch.tensor(kept, device=tokens.device)[:, None]
        return tokens[:, :n].masked_fill(tail, -1), None  # (B, n): -1 past a row's own run


def conf_adapt_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    k: int,
    tau: float | None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    streamer=None,
) -> GenerateOutput:
    """Decode one sequence ``input_ids`` (1, n), keeping up to ``k`` predictions per forward (see the module
    docstring). ``tau=None`` is static k. Sampling draws each prediction from its (warped) distribution and
    reads its confidence from that distribution."""
    _check_args(model, input_ids, k)
    return speculative_generate(
        model, input_ids, ConfAdaptDrafter(mask_token_id, tau), num_draft_tokens=k - 1, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
        streamer=streamer, trust_drafts=True,
    )


def _check_args(model: PreTrainedModel, input_ids: torch.Tensor, k: int) -> None:
    """ConfAdapt's own checks (one sequence, k); the shared decoder makes every other."""
    check_generate_inputs(model, input_ids, 1)
    if input_ids.shape[0] != 1:
        raise UserInputError(f"ConfAdapt decodes one sequence at a time: input_ids must be (1, n), got "
                             f"{tuple(input_ids.shape)}")
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}")
    if k > 1 and not verifies_several_tokens(model):
        raise UserInputError(f"{type(model).__name__} restarts its recurrent state when a forward takes several tokens, "
                             "so mask tokens cannot ride along: decode with k=1 or decoding='speculative'")
