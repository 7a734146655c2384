"""Lossless chain speculative decoding with the backbone's KV cache, shared by every method.

One step: the backbone runs on ``[last token, d_1 .. d_K]`` (the K drafted tokens) in one forward with
its cache, keeps the longest prefix of drafts it agrees with plus one token of its own, and crops the
cache entries of the rejected drafts. Greedy decoding keeps a draft iff it equals the backbone's argmax,
so the output is token-for-token ``backbone.generate(do_sample=False)``; sampling uses rejection
sampling, so the output distribution is the backbone's own. ``num_draft_tokens=0`` (or no drafter) is
plain next-token decoding through the same loop: the fair baseline for speed-ups.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from lightning_mtp.backbone import BackboneParts, LastHiddenState, backbone_parts
from lightning_mtp.decoding.sampling import make_probs_fn, rejection_accept, sample
from lightning_mtp.methods.base import Drafter

__all__ = ["DecodeStats", "GenerateOutput", "speculative_generate"]


@dataclass
class DecodeStats:
    """What one generate call did. Acceptance is counted per draft position j = 1..K."""

    new_tokens: int = 0
    backbone_forwards: int = 0  # prefill included
    draft_steps: int = 0  # verify forwards that carried drafts
    reached: list[int] = field(default_factory=list)  # reached[j]: steps whose drafts 1..j-1 were all accepted
    accepted: list[int] = field(default_factory=list)  # accepted[j]: steps that accepted draft j+1
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """tau: new tokens per backbone forward after the prefill (1.0 for plain NTP)."""
        decode_forwards = max(1, self.backbone_forwards - 1)
        return max(0, self.new_tokens - 1) / decode_forwards if self.new_tokens > 1 else 1.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """AR_j: fraction of steps reaching draft position j that accepted it."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached, strict=True)]

    @property
    def cumulative_acceptance(self) -> list[float]:
        """CAR_j: fraction of draft steps that accepted drafts 1..j."""
        return [a / self.draft_steps if self.draft_steps else 0.0 for a in self.accepted]

    def merge(self, other: DecodeStats) -> DecodeStats:
        n = max(len(self.accepted), len(other.accepted))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        return DecodeStats(
            new_tokens=self.new_tokens + other.new_tokens,
            backbone_forwards=self.backbone_forwards + other.backbone_forwards,
            draft_steps=self.draft_steps + other.draft_steps,
            reached=[a + b for a, b in zip(pad(self.reached), pad(other.reached), strict=True)],
            accepted=[a + b for a, b in zip(pad(self.accepted), pad(other.accepted), strict=True)],
            draft_seconds=self.draft_seconds + other.draft_seconds,
            verify_seconds=self.verify_seconds + other.verify_seconds,
            total_seconds=self.total_seconds + other.total_seconds,
        )

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "backbone_forwards": self.backbone_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_per_position": self.acceptance_per_position,
            "cumulative_acceptance": self.cumulative_acceptance,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
        }

    def summary(self) -> str:
        ar = " ".join(f"{a:.2f}" for a in self.acceptance_per_position) or "-"
        return (
            f"{self.new_tokens} new tokens in {self.backbone_forwards} backbone forwards "
            f"({self.tokens_per_forward:.2f} tokens/forward), acceptance per position [{ar}], "
            f"{self.new_tokens / max(self.total_seconds, 1e-9):.1f} tokens/s"
        )


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, prompt + new) like HF generate
    stats: DecodeStats


def _eos_ids(model: PreTrainedModel) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _context_length(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_ACCEPTS_LOGITS_TO_KEEP: dict[type, bool] = {}


def _forward(model, ids, cache, grab: LastHiddenState | None, keep_last_only: bool):
    """One backbone forward with the cache: logits, and the final hidden states when ``grab`` is given."""
    kwargs = {"past_key_values": cache, "use_cache": True, **(grab.kwargs if grab is not None else {})}
    cls = type(model)
    if cls not in _ACCEPTS_LOGITS_TO_KEEP:
        _ACCEPTS_LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    if keep_last_only and _ACCEPTS_LOGITS_TO_KEEP[cls]:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, **kwargs)
    return out.logits, (grab.get(out) if grab is not None else None)


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    drafter: Drafter | None = None,
    num_draft_tokens: int = 0,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    streamer=None,
    parts: BackboneParts | None = None,
) -> GenerateOutput:
    """Decode ``input_ids`` (1, n) with drafts from ``drafter`` verified by ``model``; see the module docstring."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding takes one sequence at a time (batch size 1), got batch size {input_ids.shape[0]}; "
            "call generate once per prompt"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    context = _context_length(model)
    if context is not None and input_ids.shape[1] >= context:
        raise ValueError(
            f"the prompt has {input_ids.shape[1]} tokens but the model's context is {context}: shorten the prompt"
        )
    K = num_draft_tokens if drafter is not None else 0
    probs_fn = make_probs_fn(temperature, top_p, top_k) if do_sample else None
    eos = _eos_ids(model)
    stats = DecodeStats(reached=[0] * K, accepted=[0] * K)
    t_start = time.perf_counter()
    if K > 0 and parts is None:
        parts = backbone_parts(model.get_base_model() if hasattr(model, "get_base_model") else model)
    with LastHiddenState(parts) if K > 0 else contextlib.nullcontext() as grab:
        return _decode(model, input_ids, drafter, K, max_new_tokens, probs_fn, generator, streamer, eos, stats,
                       t_start, grab)


def _decode(model, input_ids, drafter, K, max_new_tokens, probs_fn, generator, streamer, eos, stats, t_start, grab):

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (1, V) -> (1,)
        return sample(probs_fn(logits), generator) if probs_fn is not None else logits.argmax(-1)

    cache = DynamicCache(config=model.config)
    if K > 0 and hasattr(cache, "activate_past_recording") and any(
        type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [])
    ):
        cache.activate_past_recording()  # sliding-window / recurrent layers must be able to roll back

    # ---- prefill
    t0 = time.perf_counter()
    logits, hidden = _forward(model, input_ids, cache, grab=grab, keep_last_only=True)
    stats.backbone_forwards += 1
    token = pick(logits[:, -1])  # (1,)
    stats.verify_seconds += time.perf_counter() - t0
    generated: list[int] = [int(token)]
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(token.cpu())
    finished = int(token) in eos or max_new_tokens == 1

    drafts = draft_probs = None
    if K > 0 and not finished:
        t0 = time.perf_counter()
        next_ids = torch.cat([input_ids[:, 1:], token[:, None]], dim=1)  # (1, n): the token after each position
        drafts, draft_probs = drafter.draft(hidden, next_ids, K, probs_fn, generator)
        stats.draft_seconds += time.perf_counter() - t0

    # ---- decode
    while not finished:
        remaining = max_new_tokens - len(generated)
        k = min(K, remaining - 1) if drafts is not None else 0  # drafts past the budget would be wasted
        t0 = time.perf_counter()
        step_ids = token[:, None] if k == 0 else torch.cat([token[:, None], drafts[:, :k]], dim=1)  # (1, 1 + k)
        logits, hidden = _forward(model, step_ids, cache, grab=grab, keep_last_only=k == 0)
        stats.backbone_forwards += 1
        if k == 0:
            m, token = 0, pick(logits[:, -1])
            new = [int(token)]
        else:
            if probs_fn is None:
                target = logits[0].argmax(-1)  # (1 + k,)
                agree = (drafts[0, :k] == target[:k]).long().cumprod(0)  # (k,) 1 while drafts match
                m = int(agree.sum())
                nxt = int(target[m])
            else:
                m, nxt = rejection_accept(drafts[0, :k], draft_probs[0, :k], probs_fn(logits[0]), generator)
            new = drafts[0, :m].tolist() + [nxt]
            token = torch.tensor([nxt], device=input_ids.device)
            stats.draft_steps += 1
            for j in range(min(m + 1, k)):
                stats.reached[j] += 1
            for j in range(m):
                stats.accepted[j] += 1
            if m < k:
                cache.crop(-(k - m))  # drop the rejected drafts (a negative count removes that many tokens)
        stats.verify_seconds += time.perf_counter() - t0

        # EOS and the token budget cut the accepted run exactly where HF generate would stop
        for i, t in enumerate(new):
            if t in eos:
                new = new[: i + 1]
                finished = True
                break
        if len(new) >= remaining:
            new, finished = new[:remaining], True
        generated.extend(new)
        if streamer is not None:
            streamer.put(torch.tensor(new))
        if not finished and K > 0:
            t0 = time.perf_counter()
            next_ids = torch.tensor([new], device=input_ids.device)  # (1, m + 1)
            drafts, draft_probs = drafter.draft(hidden[:, : m + 1], next_ids, K, probs_fn, generator)
            stats.draft_seconds += time.perf_counter() - t0

    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(generated)
    stats.total_seconds = time.perf_counter() - t_start
    sequences = torch.cat([input_ids, torch.tensor([generated], device=input_ids.device, dtype=input_ids.dtype)], dim=1)
    return GenerateOutput(sequences=sequences, stats=stats)
