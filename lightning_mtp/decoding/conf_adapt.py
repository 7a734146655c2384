"""ConfAdapt and static-k decoding with mask tokens (Kirchenbauer et al., arXiv 2602.06019): lossy, batch size 1.

Each forward feeds the tokens accepted last step plus ``k - 1`` mask tokens, using the KV cache; the logits
at the last accepted token and at each mask are k predictions of the next k tokens. ConfAdapt keeps the
longest leading run of predictions whose top-1 probability is >= tau (always at least one: the first
prediction is the model's ordinary next token); static k keeps all k. The cache entries written for the
masks are cropped right after the forward, so a mask never reaches a later step; the accepted tokens are
fed (and cached) at the next step. Nothing is verified, so the output may differ from greedy decoding:
this trades accuracy for tokens per forward (``tau`` sets the trade).

Statistics follow :class:`~lightning_mtp.decoding.speculative.DecodeStats`: predictions 2..k are counted as
draft positions 1..k-1, so ``acceptance_per_position`` is the fraction of steps that kept prediction j + 1
given they kept prediction j, and ``tokens_per_forward`` is the mean number of tokens kept per forward after
the prefill (which yields one token, as in every other decoder).
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from lightning_mtp.backbone import cached_forward, context_length, eos_ids, forward_params
from lightning_mtp.decoding.sampling import make_probs_fn, sample
from lightning_mtp.decoding.speculative import (
    DecodeStats,
    GenerateOutput,
    RecurrentStates,
    is_recurrent,
    new_cache,
    verifies_several_tokens,
)
from lightning_mtp.errors import UserInputError

__all__ = ["conf_adapt_generate", "confident_prefix_length"]


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


@torch.no_grad()
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
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UserInputError(f"ConfAdapt decodes one sequence at a time: input_ids must be (1, n), got "
                             f"{tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n == 0:
        raise UserInputError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}")
    if k > 1 and not verifies_several_tokens(model):
        raise UserInputError(f"{type(model).__name__} restarts its recurrent state when a forward takes several tokens, "
                             "so mask tokens cannot ride along: decode with k=1 or decoding='speculative'")
    context = context_length(model)
    if context is not None and n >= context:
        raise UserInputError(f"the prompt has {n} tokens but the model's context is {context}: shorten the prompt")
    probs_fn = make_probs_fn(temperature, top_p, top_k) if do_sample else None
    eos = eos_ids(model)
    device = input_ids.device
    keep_logits = "logits_to_keep" in forward_params(model)
    stats = DecodeStats(sequences=1, reached=[0] * (k - 1), accepted=[0] * (k - 1))
    t_start = time.perf_counter()

    cache = new_cache(model, rollback=k > 1)  # the masks are dropped after every forward
    states = RecurrentStates(cache) if k > 1 and is_recurrent(model) else None
    filled = 0  # tokens in the cache: where the next forward's tokens sit

    def forward(ids: torch.Tensor, last: int) -> torch.Tensor:  # (1, m) -> (last, V) logits of the last positions
        logits, _ = cached_forward(model, ids, cache, None, last if keep_logits else None, start=filled)
        stats.backbone_forwards += 1
        stats.row_forwards += 1
        return logits[0, -last:]

    def choose(logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:  # (m, V) -> tokens, confidence (m,)
        probs = torch.softmax(logits.float(), dim=-1) if probs_fn is None else probs_fn(logits)
        confidence, best = probs.max(-1)
        tokens = best if probs_fn is None else sample(probs, generator)
        return tokens.tolist(), confidence

    t0 = time.perf_counter()
    first, _ = choose(forward(input_ids, 1))
    filled = n
    stats.verify_seconds += time.perf_counter() - t0
    generated = list(first)
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(first))
    done = generated[0] in eos or max_new_tokens == 1
    masks = [mask_token_id] * (k - 1)
    pending = list(first)  # accepted tokens not yet in the cache
    while not done:
        t0 = time.perf_counter()
        ids = torch.tensor([pending + masks], dtype=input_ids.dtype, device=device)  # (1, m + k - 1)
        if states is not None and states.active:
            states.save()
        logits = forward(ids, k)  # (k, V): the last pending token, then each mask
        if masks and states is not None and states.active:  # a recurrent state saw the masks: back, and again
            states.restore()
            cache.crop(-ids.shape[1])
            forward(ids[:, : len(pending)], 1)
        elif masks:
            cache.crop(-len(masks))  # a negative count removes that many trailing slots: the masks
        filled += len(pending)
        tokens, confidence = choose(logits)
        kept = confident_prefix_length(confidence, tau)
        stats.verify_seconds += time.perf_counter() - t0
        if k > 1:  # predictions 2..k are the draft positions
            stats.draft_steps += 1
            for j in range(min(kept, k - 1)):
                stats.reached[j] += 1
            for j in range(kept - 1):
                stats.accepted[j] += 1
        new = tokens[:kept]
        for j, t in enumerate(new):
            if t in eos:
                new, done = new[: j + 1], True
                break
        remaining = max_new_tokens - len(generated)
        if len(new) >= remaining:
            new, done = new[:remaining], True
        generated.extend(new)
        if streamer is not None:
            streamer.put(torch.tensor(new))
        pending = new
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(generated)
    stats.total_seconds = time.perf_counter() - t_start
    tail = torch.tensor([generated], dtype=input_ids.dtype, device=device)
    return GenerateOutput(sequences=torch.cat([input_ids, tail], dim=1), stats=stats)
