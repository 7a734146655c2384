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

from lightning_mtp.backbone import cached_forward, eos_ids, forward_params
from lightning_mtp.decoding.sampling import make_probs_fn, sample
from lightning_mtp.decoding.speculative import (
    DecodeStats,
    GenerateOutput,
    RecurrentStates,
    check_context,
    check_generate_inputs,
    cut_at_stop,
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
    _check_args(model, input_ids, k, max_new_tokens)
    probs_fn = make_probs_fn(temperature, top_p, top_k) if do_sample else None
    loop = _ConfAdapt(model, k, probs_fn, generator)
    t_start = time.perf_counter()
    generated = loop.decode(input_ids, [mask_token_id] * (k - 1), tau, max_new_tokens, streamer)
    loop.stats.new_tokens = len(generated)
    loop.stats.total_seconds = time.perf_counter() - t_start
    tail = torch.tensor([generated], dtype=input_ids.dtype, device=input_ids.device)
    return GenerateOutput(sequences=torch.cat([input_ids, tail], dim=1), stats=loop.stats)


def _check_args(model: PreTrainedModel, input_ids: torch.Tensor, k: int, max_new_tokens: int) -> None:
    """ConfAdapt's own checks (one sequence, k), then those every decoder makes (the prompt, the budget, the context)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UserInputError(f"ConfAdapt decodes one sequence at a time: input_ids must be (1, n), got "
                             f"{tuple(input_ids.shape)}")
    check_generate_inputs(model, input_ids, max_new_tokens)
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}")
    if k > 1 and not verifies_several_tokens(model):
        raise UserInputError(f"{type(model).__name__} restarts its recurrent state when a forward takes several tokens, "
                             "so mask tokens cannot ride along: decode with k=1 or decoding='speculative'")
    check_context(model, input_ids.shape[1])


class _ConfAdapt:
    """One ConfAdapt decode: its cache (mask tokens ride along every forward and are cropped right after it)."""

    def __init__(self, model: PreTrainedModel, k: int, probs_fn, generator) -> None:
        self.model, self.k, self.probs_fn, self.generator = model, k, probs_fn, generator
        self.keep_logits = "logits_to_keep" in forward_params(model)
        self.stats = DecodeStats(sequences=1, reached=[0] * (k - 1), accepted=[0] * (k - 1))
        self.cache = new_cache(model, rollback=k > 1)  # the masks are dropped after every forward
        self.states = RecurrentStates(self.cache) if k > 1 and is_recurrent(model) else None
        self.filled = 0  # tokens in the cache: where the next forward's tokens sit

    def forward(self, ids: torch.Tensor, last: int) -> torch.Tensor:  # (1, m) -> (last, V) logits of the last ones
        logits, _ = cached_forward(self.model, ids, self.cache, None, last if self.keep_logits else None,
                                   start=self.filled)
        self.stats.backbone_forwards += 1
        self.stats.row_forwards += 1
        return logits[0, -last:]

    def choose(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:  # (m, V) -> tokens, confidence (m,)
        probs = torch.softmax(logits.float(), dim=-1) if self.probs_fn is None else self.probs_fn(logits)
        confidence, best = probs.max(-1)
        tokens = best if self.probs_fn is None else sample(probs, self.generator)
        return tokens.tolist(), confidence

    def decode(self, input_ids: torch.Tensor, masks: list[int], tau: float | None, max_new_tokens: int,
               streamer) -> list[int]:
        """The new tokens: the prefill's, then each step's confident prefix, cut at EOS and the budget."""
        eos, self.device = eos_ids(self.model), input_ids.device
        t0 = time.perf_counter()
        first, _ = self.choose(self.forward(input_ids, 1))
        self.filled = input_ids.shape[1]
        self.stats.verify_seconds += time.perf_counter() - t0
        generated = list(first)
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(torch.tensor(first))
        done = generated[0] in eos or max_new_tokens == 1
        pending = list(first)  # accepted tokens not yet in the cache
        while not done:
            tokens, kept = self.step(pending, masks, tau, input_ids.dtype)
            pending, done = cut_at_stop(tokens[:kept], eos, max_new_tokens - len(generated))
            generated.extend(pending)
            if streamer is not None:
                streamer.put(torch.tensor(pending))
        if streamer is not None:
            streamer.end()
        return generated

    def step(self, pending: list[int], masks: list[int], tau: float | None, dtype: torch.dtype
             ) -> tuple[list[int], int]:
        """One forward over [pending tokens, masks]: the k predictions, and how many of them are kept."""
        t0 = time.perf_counter()
        ids = torch.tensor([pending + masks], dtype=dtype, device=self.device)  # (1, m + k - 1)
        if self.states is not None and self.states.active:
            self.states.save()
        logits = self.forward(ids, self.k)  # (k, V): the last pending token, then each mask
        if masks and self.states is not None and self.states.active:  # a recurrent state saw the masks: back, again
            self.states.restore()
            self.cache.crop(-ids.shape[1])
            self.forward(ids[:, : len(pending)], 1)
        elif masks:
            self.cache.crop(-len(masks))  # a negative count removes that many trailing slots: the masks
        self.filled += len(pending)
        tokens, confidence = self.choose(logits)
        kept = confident_prefix_length(confidence, tau)
        self.stats.verify_seconds += time.perf_counter() - t0
        if self.k > 1:  # predictions 2..k are the draft positions
            self.stats.count_step(kept - 1, self.k - 1)
        return tokens, kept
