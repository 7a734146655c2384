"""Lossless chain speculative decoding with the backbone's KV cache, shared by every method.

One step: the backbone runs on ``[last token, d_1 .. d_K]`` (the K drafted tokens) in one forward with
its cache, keeps the longest prefix of drafts it agrees with plus one token of its own, and drops the
cache entries of the rejected drafts. Greedy decoding keeps a draft iff it equals the backbone's argmax,
so the output is token-for-token ``backbone.generate(do_sample=False)``; sampling uses rejection
sampling, so the output distribution is the backbone's own. ``num_draft_tokens=0`` (or no drafter) is
plain next-token decoding through the same loop: the fair baseline for speed-ups.

Batches: rows of different lengths come left-padded with an ``attention_mask``. Every row accepts its own
number of drafts, so after a step the rows' caches hold different numbers of real tokens. The cache stays
one rectangle: slots of rejected drafts that some other row still needs are kept but masked out
(``valid``), each row carries its own position ids, and trailing slots no row needs are cropped. A row
that finishes (EOS or its token budget) leaves the batch: its cache rows are dropped. With batch size 1
there are never holes, so no masks or position ids are passed at all.

Drafter hooks (see :class:`~lightning_mtp.methods.base.Drafter`):

- shorter drafts: a drafter may propose fewer than K tokens, even none (fewer columns at batch size 1, a -1
  tail per row in a batch). A step verifies each row's own drafts; when rows differ, the slots of a row's
  missing drafts are hidden from it (masked out, and its later tokens take the positions right after its
  own drafts).
- appended tokens: a drafter may ask for tokens (``Drafter.appended_tokens``, e.g. K ``<MTP>`` mask tokens)
  to ride along at the end of every forward, the prefill's included: ``[last token, d_1 .. d_k, a_1 .. a_A]``.
  Their cache entries are cropped right after the forward, so they never reach a later step; their logits
  and hidden states go to ``Drafter.draft`` as ``appended``, with ``complete`` marking the rows that accepted
  every draft they verified (only there do the appended tokens sit right after the committed sequence). This
  lets a model draft for the next step in the very forward that verifies this one.

Trusted drafts (``trust_drafts=True``, lossy): a drafter whose drafts are kept as they come, unverified (ConfAdapt,
:mod:`~lightning_mtp.decoding.conf_adapt`, whose drafter keeps only its confident predictions). They are emitted as
soon as they are drafted and the next forward only feeds them, with the ride-along tokens after them; its logits at
the last one give the next token. The output is then no longer the backbone's own.

Chain length: ``draft_schedule`` (:mod:`~lightning_mtp.decoding.schedule`) sets how many drafts each step asks for,
at most ``num_draft_tokens``: ``constant`` always that many, ``adaptive`` fewer, down to none, while drafts miss.
A step without drafts is a plain step; the positions it commits reach the drafter with the next positions it is
asked to draft after, so a drafter's own cache still sees every committed position once. Its forward carries the
ride-along tokens only when the drafter drafts after it, and (adaptive) only as many as the next chain can use.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

from lightning_mtp.backbone import (
    BackboneParts,
    backbone_parts,
    cache_kwarg,
    cache_layer_types,
    cached_forward,
    context_length,
    eos_ids,
    forward_params,
    hidden_grab,
    pad_token_id,
    takes_cache,
)
from lightning_mtp.decoding.drafter import AppendedOutputs, Drafter
from lightning_mtp.decoding.sampling import make_probs_fn, rejection_accept, sample
from lightning_mtp.decoding.schedule import DraftSchedule
from lightning_mtp.decoding.tree import DraftTree, TreeShape, keep_slots, tree_masks, walk_tree
from lightning_mtp.errors import UserInputError

__all__ = [
    "DecodeStats",
    "GenerateOutput",
    "RecurrentStates",
    "is_recurrent",
    "check_context",
    "check_generate_inputs",
    "crop_problem",
    "cut_at_stop",
    "dynamic_cache_problem",
    "needs_row_by_row",
    "new_cache",
    "pad_token_id",
    "speculative_generate",
    "tree_problem",
    "verifies_several_tokens",
]


@dataclass
class DecodeStats:
    """What one generate call did, summed over its rows. Acceptance is counted per draft position j = 1..K."""

    new_tokens: int = 0
    sequences: int = 0  # rows decoded
    backbone_forwards: int = 0  # forward calls, prefill included (one call serves every row of a batch)
    row_forwards: int = 0  # forwards each row took part in, summed over rows, prefills included
    draft_steps: int = 0  # row-steps whose verify forward carried drafts for that row
    reached: list[int] = field(default_factory=list)  # reached[j]: row-steps whose drafts 1..j-1 were all accepted
    accepted: list[int] = field(default_factory=list)  # accepted[j]: row-steps that accepted draft j+1
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """tau: new tokens per backbone forward after the prefill, per row (1.0 for plain NTP).

        The prefill's forward and the token it yields are left out of both counts.
        """
        decode_forwards = self.row_forwards - self.sequences
        return (self.new_tokens - self.sequences) / decode_forwards if decode_forwards > 0 else 1.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """AR_j: fraction of steps reaching draft position j that accepted it."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached, strict=True)]

    @property
    def cumulative_acceptance(self) -> list[float]:
        """CAR_j: fraction of draft steps that accepted drafts 1..j."""
        return [a / self.draft_steps if self.draft_steps else 0.0 for a in self.accepted]

    def count_step(self, accepted: int, budget: int) -> None:
        """One row's draft step: it could use ``budget`` drafts and accepted the first ``accepted`` of them, so it
        reached positions 1 .. min(accepted + 1, budget) and accepted positions 1 .. accepted."""
        if budget > 0:
            self.draft_steps += 1
            for j in range(min(accepted + 1, budget)):
                self.reached[j] += 1
            for j in range(accepted):
                self.accepted[j] += 1

    def merge(self, other: DecodeStats) -> DecodeStats:
        n = max(len(self.accepted), len(other.accepted))

        def pad(xs: list[int]) -> list[int]:
            return xs + [0] * (n - len(xs))

        return DecodeStats(
            new_tokens=self.new_tokens + other.new_tokens,
            sequences=self.sequences + other.sequences,
            backbone_forwards=self.backbone_forwards + other.backbone_forwards,
            row_forwards=self.row_forwards + other.row_forwards,
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
            "sequences": self.sequences,
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
    sequences: torch.Tensor  # (B, prompt + new) like HF generate: the prompts as given, then new tokens, then padding
    stats: DecodeStats


def needs_row_by_row(model: PreTrainedModel) -> bool:
    """True when the backbone's cache cannot hold the masked-out slots batched decoding leaves behind.

    Sliding-window and linear-attention (SSM) layers keep a fixed window or state rather than every slot, so
    a hole left by a rejected draft would shift what they see; a backbone that takes no position ids (MPT's ALiBi),
    or takes them but reads positions off the slots anyway, would see the holes too. Such backbones decode one row
    at a time.
    """
    if "position_ids" not in forward_params(model):
        return True
    if any(kind is not DynamicLayer for kind in cache_layer_types(model.config)):
        return True
    if dynamic_cache_problem(model) is not None:  # each row is then refused, with the reason, as it would be alone
        return True
    return not _honours_holes(model)


def new_cache(model: PreTrainedModel, rollback: bool = True) -> DynamicCache:
    """The decoder's KV cache. With ``rollback`` its sliding-window and convolution layers record their past, so that
    ``crop`` can drop rejected drafts and appended tokens (recurrent states need :class:`RecurrentStates` too)."""
    cache = DynamicCache(config=model.config)
    if rollback and any(type(layer) is not DynamicLayer for layer in cache.layers):
        cache.activate_past_recording()
    return cache


_HOLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _honours_holes(model: PreTrainedModel) -> bool:
    """Whether a masked-out slot with explicit position ids leaves the other tokens' logits as they would be without
    it, in one forward and through the cache (probed once per model: three tokens, against the same three with a
    masked token between them, once in one forward and once with the last token fed after the cache holds the hole,
    as the decoder's steps feed it)."""
    if model not in _HOLES:
        device = model.device
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = ((torch.arange(4, device=device) * 5 + 3) % vocab)[None]  # (1, 4) any valid ids
        mask, pos = torch.tensor([[1, 1, 0, 1]], device=device), torch.tensor([[0, 1, 1, 2]], device=device)
        plain = model(ids[:, [0, 1, 3]], position_ids=pos[:, [0, 1, 3]], use_cache=False).logits[0, -1]
        holed = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[0, -1]
        cache = new_cache(model)
        cached_forward(model, ids[:, :3], cache, None, 1, mask[:, :3], pos[:, :3])
        stepped, _ = cached_forward(model, ids[:, 3:], cache, None, 1, mask, pos[:, 3:])
        _HOLES[model] = _mismatch(holed, plain, model) is None and _mismatch(stepped[0, -1], plain, model) is None
    return _HOLES[model]


def cut_at_stop(new: list[int], eos: set[int], remaining: int) -> tuple[list[int], bool]:
    """A step's new tokens, cut after the first EOS and to the ``remaining`` token budget exactly where HF
    generate stops; and whether the row is done."""
    for j, t in enumerate(new):
        if t in eos:
            return new[: j + 1][:remaining], True
    if len(new) >= remaining:
        return new[:remaining], True
    return new, False


def check_context(model: PreTrainedModel, longest: int) -> None:
    """Refuse a prompt of ``longest`` tokens that leaves the model's context no room for a new token."""
    context = context_length(model)
    if context is not None and longest >= context:
        raise UserInputError(f"the prompt has {longest} tokens but the model's context is {context}: shorten the prompt")


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
    attention_mask: torch.Tensor | None = None,
    draft_confidence_threshold: float = 0.0,
    draft_schedule: str = "constant",
    trust_drafts: bool = False,
    tree: TreeShape | None = None,
) -> GenerateOutput:
    """Decode ``input_ids`` (B, n) with drafts from ``drafter`` verified by ``model``; see the module docstring.

    ``attention_mask`` (B, n) marks real tokens (1) and left padding (0) when rows differ in length.
    ``num_draft_tokens`` is the longest chain a step verifies; a drafter that drafts one token at a time ends a
    chain early after EOS and before a position where its most likely token has less than
    ``draft_confidence_threshold`` probability (HF's ``assistant_confidence_threshold``); no drafter is asked for
    more drafts than the token budget can use. ``draft_schedule``: ``"constant"`` asks every step for
    ``num_draft_tokens`` drafts, ``"adaptive"`` for fewer, down to none, while they miss (see
    :mod:`~lightning_mtp.decoding.schedule`). ``trust_drafts`` keeps every draft unverified (lossy; see the module
    docstring). ``tree``: the drafter proposes token trees of that shape, at most ``num_draft_tokens`` deep, each
    verified in one forward (:mod:`~lightning_mtp.decoding.tree`; one sequence at a time, every step drafts).
    """
    real = _check_decode_args(model, input_ids, max_new_tokens, num_draft_tokens, attention_mask, streamer,
                              draft_confidence_threshold)
    B = input_ids.shape[0]
    K = num_draft_tokens if drafter is not None else 0
    if K > 0 and not verifies_several_tokens(model):
        warnings.warn(f"{type(model).__name__} restarts its recurrent state when a forward takes several tokens, so "
                      "drafts cannot be verified in one forward: decoding without drafts", stacklevel=2)
        K = 0
    problem = crop_problem(model) if K > 0 else None
    if problem is not None:
        raise UserInputError(f"{type(model).__name__} cannot drop tokens from the end of its cache, which the decoder "
                             f"does after every step that drafts (rejected drafts, ride-along tokens): {problem}; "
                             "decode it with num_draft_tokens=0")
    if K > 0 and tree is not None:
        _check_tree(model, drafter, B, trust_drafts)
        draft_schedule = "constant"  # a tree step always drafts: the schedule shortens chains
    schedule = DraftSchedule(draft_schedule, K)  # refuses an unknown name, before any forward
    probs_fn = make_probs_fn(temperature, top_p, top_k) if do_sample else None
    if K > 0 and parts is None:
        parts = backbone_parts(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if K > 0:
        drafter.min_confidence = float(draft_confidence_threshold)  # where chains end (see DraftChain)
    t_start = time.perf_counter()
    with hidden_grab(parts, drafter.hidden_layers) if K > 0 else contextlib.nullcontext() as grab:
        decoder = _Decoder(model, drafter, schedule, max_new_tokens, probs_fn, generator, streamer, grab, trust_drafts,
                           tree if K > 0 else None)
        generated, stats = decoder.run(input_ids, real)
    stats.total_seconds = time.perf_counter() - t_start
    longest = max(len(g) for g in generated)
    pad = pad_token_id(model)
    tail = torch.full((B, longest), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, tokens in enumerate(generated):
        tail[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return GenerateOutput(sequences=torch.cat([input_ids, tail], dim=1), stats=stats)


def _check_decode_args(model, input_ids, max_new_tokens, num_draft_tokens, attention_mask, streamer,
                       draft_confidence_threshold) -> torch.Tensor | None:
    """Every argument check of :func:`speculative_generate`, before any forward; returns the (B, n) bool mask of
    real tokens, or None when there is no padding."""
    check_generate_inputs(model, input_ids, max_new_tokens)
    if not takes_cache(model):
        raise UserInputError(f"{type(model).__name__} takes no transformers KV cache (its forward has none of the cache "
                             "keywords), which speculative decoding needs")
    problem = dynamic_cache_problem(model)
    if problem is not None:
        raise UserInputError(f"{type(model).__name__} cannot decode through transformers' DynamicCache, which the "
                             f"decoder keeps (it crops rejected drafts from it): {problem}")
    B, n = input_ids.shape
    if not _is_int(num_draft_tokens):
        raise UserInputError(f"num_draft_tokens must be an integer >= 0, got {num_draft_tokens!r}")
    if num_draft_tokens < 0:
        raise UserInputError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if not 0.0 <= draft_confidence_threshold <= 1.0:
        raise UserInputError(f"draft_confidence_threshold must be within [0, 1], got {draft_confidence_threshold}")
    real = _check_mask(attention_mask, input_ids)  # (B, n) bool, or None when there is no padding
    lengths = real.sum(1) if real is not None else torch.full((B,), n)
    check_context(model, int(lengths.max()))
    if B > 1 and streamer is not None:
        raise UserInputError(f"a streamer takes one sequence, got a batch of {B}; stream one prompt at a time")
    if B > 1 and needs_row_by_row(model):
        raise UserInputError(
            f"{type(model).__name__} has sliding-window or recurrent cache layers or no position ids, which batched "
            "speculative decoding cannot mask; decode its rows one at a time (MTPModule.generate does this for you)"
        )
    return real


def _check_tree(model: PreTrainedModel, drafter: Drafter, batch: int, trust: bool) -> None:
    """Refuse tree drafting where it cannot run, before any forward."""
    if not drafter.drafts_trees:
        raise UserInputError(f"{type(drafter).__name__} drafts chains only; decode without tree")
    if trust:
        raise UserInputError("trusted drafts are kept unverified: a tree needs verifying; decode without tree")
    if batch > 1:
        raise UserInputError(f"tree drafting decodes one sequence at a time, got a batch of {batch} "
                             "(MTPModule.generate decodes each row alone for you)")
    problem = tree_problem(model)
    if problem is not None:
        raise UserInputError(f"{type(model).__name__} cannot verify a token tree: {problem}; decode without tree")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_generate_inputs(model: PreTrainedModel, input_ids, max_new_tokens) -> None:
    """Refuse what ``generate`` cannot decode with one clear error, before any forward (an id outside the
    vocabulary would otherwise be an index error deep in the embedding, or a device assert on a GPU)."""
    if not isinstance(input_ids, torch.Tensor):
        raise UserInputError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise UserInputError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise UserInputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise UserInputError("the prompt is empty: give at least one token")
    if not _is_int(max_new_tokens):
        raise UserInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise UserInputError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab})")


def _split_appended(logits: torch.Tensor, hidden: torch.Tensor | None, A: int):
    """Split the outputs of the ``A`` appended tokens off a forward's (the caller crops their cache entries).

    Returns ``(logits, hidden, appended)`` with ``appended.complete`` left for the caller to fill in.
    """
    if not A:
        return logits, hidden, None
    appended = AppendedOutputs(logits[:, -A:], hidden[:, -A:] if hidden is not None else None, None)
    return logits[:, :-A], (hidden[:, :-A] if hidden is not None else None), appended


def _draft_lengths(drafts: torch.Tensor) -> list[int] | None:
    """Each row's number of drafts when some row proposes fewer than the columns hold (a -1 tail), else None."""
    missing = drafts < 0  # (b, k)
    if drafts.shape[1] == 0 or not bool(missing.any()):
        return None
    return (~missing).long().cumprod(1).sum(1).tolist()


def _check_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The (B, n) bool mask of real tokens, or None when every token is real. Padding must be on the left."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise UserInputError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    real = attention_mask.to(device=input_ids.device).bool()
    if real.all():
        return None
    if not real[:, -1].all() or (real[:, 1:].long() < real[:, :-1].long()).any():
        raise UserInputError("padding must be on the left (tokenizer.padding_side = 'left') and every row needs a token")
    return real


class RecurrentStates:
    """Rollback for linear-attention / SSM cache layers, whose recurrent state ``crop`` cannot put back.

    Attention keys and (recorded) convolution states crop exactly, but a recurrent state is one running tensor that
    a verify forward overwrites in place with every token it saw, rejected drafts and appended tokens included. So
    the state is copied before each verify forward, and a step that drops tokens puts the copies back, crops the
    whole step from the other layers and runs the kept tokens again (one more backbone forward, counted).
    """

    def __init__(self, cache: DynamicCache) -> None:
        self.layers = [layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
        self.saved: list[dict[int, torch.Tensor]] = []

    @property
    def active(self) -> bool:
        """Whether some layer holds a recurrent state (conv-only layers crop exactly and need none of this)."""
        return any(any(layer.is_recurrent_states_initialized.values()) for layer in self.layers)

    def save(self) -> None:
        self.saved = [{i: s.clone() for i, s in layer.recurrent_states.items() if s is not None} for layer in self.layers]

    def restore(self) -> None:
        for layer, saved in zip(self.layers, self.saved, strict=True):
            for i, state in saved.items():
                layer.recurrent_states[i].copy_(state)


def is_recurrent(model: PreTrainedModel) -> bool:
    """Whether the backbone has linear-attention / SSM layers (a running state instead of per-token keys)."""
    return any(issubclass(kind, LinearAttentionCacheLayerMixin) for kind in cache_layer_types(model.config))


def _mismatch(got: torch.Tensor, want: torch.Tensor, model: PreTrainedModel) -> float | None:
    """The largest difference of two logits tensors relative to ``want``'s largest logit, when it is more than
    rounding (1e-3 in float32, 3e-2 in half precision), else None: the probes' one rule."""
    error = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
    return error if error >= (1e-3 if model.dtype == torch.float32 else 3e-2) else None


def _cache_probe(model: PreTrainedModel, ids: torch.Tensor, steps: Callable[[DynamicCache], torch.Tensor],
                 raised: str, differ: str) -> str | None:
    """What a cache probe found, or None: ``steps`` runs the probe's forwards through a new cache and returns the last
    one's logits (1, 1, V), compared with one forward over ``ids`` (1, n) (positions as the decoder passes them). An
    error from the model's or the cache's own code is the finding ("``raised`` ValueError: ..."), as is a difference
    beyond rounding ("``differ`` over the same tokens by 2.5%")."""
    try:
        full = cached_forward(model, ids, new_cache(model), None, 1)[0][0, -1]
        last = steps(new_cache(model))
    except Exception as err:  # the model's own code refused or broke: that is the capability probed
        return f"{raised} {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    error = _mismatch(last[0, -1], full, model)
    return None if error is None else f"{differ} over the same tokens by {error:.1%}"


_CACHE_PROBLEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def dynamic_cache_problem(model: PreTrainedModel) -> str | None:
    """Why the backbone cannot decode through the decoder's cache (transformers' ``DynamicCache``), or None.

    Probed once per model, as plain decoding runs: three tokens, then one at a time, through a new cache, against the
    same tokens in one forward; five in all, or two past a small sliding window (up to 64 tokens) so that a cache that
    drops what the window left behind is probed where it does (moshi's one forward attends past its window, its
    cache does not). A model with a cache class of its own refuses a ``DynamicCache`` (or breaks on
    it) in its own forward: its error is the reason. One whose logits a token at a time differ from one forward's (beyond
    rounding) cannot be decoded losslessly through it either. Both go through :func:`cached_forward` with the
    positions the decoder passes.
    """
    if model not in _CACHE_PROBLEM:
        vocab = model.get_input_embeddings().weight.shape[0]
        n = _probe_length(model.config)
        ids = ((torch.arange(n, device=model.device) * 7 + 3) % vocab)[None]  # (1, n) any valid ids

        def steps(cache: DynamicCache) -> torch.Tensor:
            last, _ = cached_forward(model, ids[:, :3], cache, None, 1, start=0)
            for start in range(3, n):
                last, _ = cached_forward(model, ids[:, start : start + 1], cache, None, 1, start=start)
            return last

        _CACHE_PROBLEM[model] = _cache_probe(model, ids, steps, "its forward raised",
                                             "its logits one token at a time differ from one forward's")
    return _CACHE_PROBLEM[model]


def _probe_length(config) -> int:
    """Tokens a cache probe runs: 5, or two past the config's sliding window when that fits in 64."""
    window = getattr(config, "sliding_window", None)
    return window + 2 if isinstance(window, int) and not isinstance(window, bool) and 3 < window <= 62 else 5


_TREE_PROBLEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def tree_problem(model: PreTrainedModel) -> str | None:
    """Why the backbone cannot verify a token tree in one forward and keep one path of it, or None.

    A tree step needs cache layers that keep keys per slot (full or sliding-window attention: a recurrent state cannot
    drop a rejected branch from the middle), explicit position ids, and a forward that honours a 4D attention mask (or
    a mapping of them by layer type). Probed once per model: a prompt of three tokens (or one past a small sliding
    window), then a root with two branches (one two nodes deep) in one forward; each node's logits must equal a plain
    forward over its path, and after keeping one branch's slots the next token's logits must equal a plain forward
    over prompt, root, branch and token.
    """
    if model not in _TREE_PROBLEM:
        _TREE_PROBLEM[model] = _tree_probe(model)
    return _TREE_PROBLEM[model]


def _tree_probe(model: PreTrainedModel) -> str | None:
    kinds = [kind for kind in cache_layer_types(model.config) if kind not in (DynamicLayer, DynamicSlidingWindowLayer)]
    if kinds:
        return (f"its cache layers {sorted({k.__name__ for k in kinds})} keep a running state, from which a rejected "
                "branch cannot be dropped")
    if "position_ids" not in forward_params(model):
        return "its forward takes no position ids, which a tree's branches need"
    vocab = model.get_input_embeddings().weight.shape[0]
    n = _probe_length(model.config) - 2  # a prompt past a small sliding window, then a root and three nodes
    ids = ((torch.arange(n + 5, device=model.device) * 7 + 3) % vocab)[None]  # (1, n + 5)
    tree = DraftTree(ids[0, n + 1 : n + 4], [-1, -1, 0], 2)  # node 0 and node 2 below it; node 1 a sibling of node 0
    prompt = list(range(n + 1))  # the prompt and the root
    paths = {0: [*prompt, n + 1], 1: [*prompt, n + 2], 2: [*prompt, n + 1, n + 3]}

    def plain(cols: list[int]) -> torch.Tensor:
        return model(ids[:, cols], use_cache=False).logits[0, -1]

    try:
        cache = new_cache(model)
        cached_forward(model, ids[:, :n], cache, None, 1)
        mask, pos = tree_masks(cache, tree, n, 0, model.dtype, model.device)
        logits, _ = cached_forward(model, ids[:, n : n + 4], cache, None, None, mask, pos)
        for node, cols in paths.items():
            error = _mismatch(logits[0, 1 + node], plain(cols), model)
            if error is not None:
                return f"a tree node's logits differ from a forward over its path by {error:.1%}"
        keep_slots(cache, [0, 2], 4)  # the root and node 1
        after, _ = cached_forward(model, ids[:, n + 4 :], cache, None, 1, start=n + 2)
    except Exception as err:  # the model's own code refused the mask or the positions: that is the finding
        return f"its forward raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    error = _mismatch(after[0, -1], plain([*paths[1], n + 4]), model)
    return None if error is None else f"after keeping one branch its logits differ by {error:.1%}"


_CROP_PROBLEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def crop_problem(model: PreTrainedModel) -> str | None:
    """Why the decoder's cache of this backbone cannot drop its last tokens exactly, or None.

    Probed once per model, as a step that rejects drafts runs: three tokens, then two that are dropped again
    (``crop``), then the fourth, against the four in one forward. Recurrent states roll back another way
    (:class:`RecurrentStates`), so such backbones are not probed here.
    """
    if is_recurrent(model):
        return None
    if model not in _CROP_PROBLEM:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = ((torch.arange(4, device=model.device) * 7 + 3) % vocab)[None]  # (1, 4) any valid ids
        dropped = ((torch.arange(2, device=model.device) * 11 + 5) % vocab)[None]  # (1, 2) tokens that are cropped

        def steps(cache: DynamicCache) -> torch.Tensor:
            cached_forward(model, ids[:, :3], cache, None, 1)
            cached_forward(model, dropped, cache, None, 1, start=3)
            cache.crop(-2)
            return cached_forward(model, ids[:, 3:], cache, None, 1, start=3)[0]

        _CROP_PROBLEM[model] = _cache_probe(model, ids, steps, "the crop raised",
                                            "after a crop its logits differ from one forward's")
    return _CROP_PROBLEM[model]


_CONTINUES_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def verifies_several_tokens(model: PreTrainedModel) -> bool:
    """Whether one cached forward over several tokens continues the backbone's state, as a verify forward needs.

    Attention layers always do. Some recurrent (Mamba) layers restart their scan from a zero state whenever more
    than one token comes in, so drafts cannot be verified in one forward there. Probed once per model: eight tokens
    in one uncached forward against four and then four more through the decoder's cache (a restarted state is off
    by far more than rounding; the tolerance allows for half-precision models).
    """
    if not is_recurrent(model):
        return True
    if model not in _CONTINUES_STATE:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = ((torch.arange(8, device=model.device) * 7 + 3) % vocab)[None]  # (1, 8) any valid ids
        full = model(ids, use_cache=False).logits.float()  # (1, 8, V)
        cache = new_cache(model)
        model(ids[:, :4], **{cache_kwarg(model): cache}, use_cache=True)
        part = model(ids[:, 4:], **{cache_kwarg(model): cache}, use_cache=True).logits.float()  # (1, 4, V)
        _CONTINUES_STATE[model] = _mismatch(part, full[:, 4:], model) is None
    return _CONTINUES_STATE[model]


class _Decoder:
    """The decode loop of one call: draft -> verify -> accept -> commit -> emit, over the rows still decoding.

    State across steps: the KV ``cache``; ``valid`` (b, slots) the cache slots each row sees and ``pos`` (b,) the
    position of each row's next token (both None while every row sees every slot, as always at batch size 1);
    ``rows`` the original index of each active row, ``token`` (b,) its last emitted token, ``drafts`` (b, w) and
    ``draft_probs`` what the drafter proposed after it. Tokens a drafter asks to ride along (``append``, A of them)
    go at the end of every forward that feeds the drafter and are cropped right after it; what the backbone made of
    them reaches the drafter as ``appended``. ``held`` keeps the positions committed by steps the schedule left
    without drafts, for the drafter's next call. With ``trust`` every draft is kept unverified: emitted when drafted,
    fed by the next forward.
    """

    def __init__(self, model, drafter, schedule: DraftSchedule, max_new_tokens, probs_fn, generator, streamer,
                 grab, trust: bool = False, shape: TreeShape | None = None) -> None:
        self.model, self.drafter, self.schedule, self.K = model, drafter, schedule, schedule.longest
        self.trust, self.shape = trust, shape
        self.tree: DraftTree | None = None  # the tree the next step verifies (a chain is self.drafts)
        self.max_new_tokens, self.probs_fn, self.generator = max_new_tokens, probs_fn, generator
        self.streamer, self.grab = streamer, grab
        self.eos = eos_ids(model)
        self.stats = DecodeStats(reached=[0] * self.K, accepted=[0] * self.K)

    def draft_length(self, generated: list[list[int]], rows: torch.Tensor, done: list[bool]) -> int:
        """Drafts the next step can use: the schedule's length, or fewer where the largest token budget left among
        the rows that go on is smaller (a step keeps one token of its budget for the verifier's own); 0 when no
        row goes on. Trusted drafts are all asked for: they are cut where they are emitted."""
        left = [self.max_new_tokens - len(generated[r]) for r, d in zip(rows.tolist(), done, strict=True) if not d]
        if self.trust:
            return self.schedule.length if left else 0
        return min(self.schedule.length, max(left, default=0) - 1)

    def ride_along(self, k: int) -> int:
        """Ride-along tokens a chain step verifying ``k`` drafts carries: none unless a draft follows it, and no more
        than the next chain can use. Each costs a token of the forward, and under an adaptive schedule the next chain
        is at most twice this one (a step that keeps every draft doubles it) or one draft (the probe after a pause):
        a drafter whose drafts keep missing then rides along one token, not K. (A constant schedule's length is K:
        every forward carries all A <= K.)"""
        if not self.A or not (k > 0 or self.schedule.feeds_drafter_next):
            return 0
        return min(self.A, max(1, 2 * self.schedule.length))

    def pick(self, logits: torch.Tensor) -> torch.Tensor:  # (b, V) -> (b,)
        if self.probs_fn is None:
            return logits.argmax(-1)
        return sample(self.probs_fn(logits), self.generator)

    def run(self, input_ids: torch.Tensor, real: torch.Tensor | None) -> tuple[list[list[int]], DecodeStats]:
        self.device = input_ids.device
        if self.K > 0:  # a chain ends after an EOS draft (see DraftChain)
            self.drafter.stop_ids = torch.tensor(sorted(self.eos), dtype=torch.long, device=self.device)
        self.prefill(input_ids, real)
        while (keep := self.drop_finished()) is not None:
            self.step(keep)
        if self.streamer is not None:
            self.streamer.end()
        self.stats.new_tokens = sum(len(g) for g in self.generated)
        return self.generated, self.stats

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor, real: torch.Tensor | None) -> None:
        """One forward over the prompts (and any ride-along tokens), the first token, and the first draft."""
        model, stats, device = self.model, self.stats, self.device
        B, n = input_ids.shape
        self.cache = new_cache(model, rollback=self.K > 0)
        stats.sequences = B
        self.valid = real  # (b, slots) the cache slots holding real tokens; None while all do
        self.pos = real.sum(1) if real is not None else None  # (b,) position id of the next token to feed
        append = self.drafter.appended_tokens(self.K) if self.K > 0 else None  # (A,) tokens riding along, or None
        self.A = 0 if append is None else append.numel()
        self.held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (hidden, next_ids, cols) per plain step
        self.append = None if append is None else append.to(device=device, dtype=input_ids.dtype)
        t0 = time.perf_counter()
        recurrent = self.K > 0 and is_recurrent(model)
        A = self.A if self.drafter is None or self.drafter.appended_at_prefill else 0
        logits, hidden = self._prefill_forward(input_ids, real, recurrent, A)
        logits, hidden, appended = _split_appended(logits, hidden, A)
        self.states = RecurrentStates(self.cache) if recurrent else None
        stats.backbone_forwards += 1
        stats.row_forwards += B
        self.token = self.pick(logits[:, -1])  # (B,)
        stats.verify_seconds += time.perf_counter() - t0
        self.generated: list[list[int]] = [[t] for t in self.token.tolist()]
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())
            self.streamer.put(self.token.cpu())
        self.rows = torch.arange(B, device=device)  # original index of each active row
        self.filled = n  # cache slots in use (prompt width, padding included): where the next tokens sit when b == 1
        self.done = [g[0] in self.eos or self.max_new_tokens == 1 for g in self.generated]
        self.drafts = self.draft_probs = None
        k_next = self.draft_length(self.generated, self.rows, self.done)
        if k_next > 0:
            next_ids = torch.cat([input_ids[:, 1:], self.token[:, None]], dim=1)  # (B, n): the token after each position
            if self.A and not A:  # the drafter reads the ride-along tokens: it drafts after the first step's forward
                self.held.append((hidden, next_ids, real))
                return
            if appended is not None:
                appended = appended._replace(before=logits[:, -1])
            complete = None if appended is None else self.token.new_ones(B, dtype=torch.bool)
            self.draft(hidden, next_ids, k_next, real, appended, complete)

    def _prefill_forward(self, input_ids: torch.Tensor, real: torch.Tensor | None, recurrent: bool, A: int):
        """The prefill forward: ``(logits, hidden)`` of the prompt's last position and the ``A`` ride-along tokens."""
        model, B, n = self.model, *input_ids.shape
        position_ids = (real.long().cumsum(1) - 1).clamp(min=0) if real is not None else None  # like HF generate
        ids, mask = input_ids, (real.long() if real is not None else None)
        if A:
            ids = torch.cat([input_ids, self.append.expand(B, A)], dim=1)  # (B, n + A)
            if real is not None:
                mask = torch.cat([mask, mask.new_ones(B, A)], dim=1)
                position_ids = torch.cat([position_ids, self.pos[:, None] + torch.arange(A, device=self.device)], dim=1)
        if not (A and recurrent):
            logits, hidden = cached_forward(model, ids, self.cache, self.grab, 1 + A, mask, position_ids)
            if A:
                self.cache.crop(-A)  # a negative count removes that many trailing slots
            return logits, hidden
        # a recurrent state cannot drop the ride-along tokens: they run on a cache thrown away
        throwaway = new_cache(model, rollback=True)
        logits, hidden = cached_forward(model, ids, throwaway, self.grab, 1 + A, mask, position_ids)
        cached_forward(model, input_ids, self.cache, None, 1, real.long() if real is not None else None,
                       position_ids[:, :n] if position_ids is not None else None)
        self.stats.backbone_forwards += 1
        self.stats.row_forwards += B
        return logits, hidden

    # ------------------------------------------------------------------ one step
    def drop_finished(self) -> list[int] | None:
        """The rows that go on (indices into the current rows), after dropping finished ones; None when none do."""
        keep = [i for i, d in enumerate(self.done) if not d]
        if not keep:
            return None
        if len(keep) < len(self.done):  # rows that finished leave the batch
            idx = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(idx)
            if self.K > 0:
                self.drafter.select(idx)
            self.rows, self.token = self.rows[idx], self.token[idx]
            self.valid = self.valid[idx] if self.valid is not None else None
            self.pos = self.pos[idx] if self.pos is not None else None
            if self.drafts is not None:
                self.drafts = self.drafts[idx]
                self.draft_probs = self.draft_probs[idx] if self.draft_probs is not None else None
            self.held = [tuple(t[idx] if t is not None else None for t in held) for held in self.held]
        return keep

    def step(self, keep: list[int]) -> None:
        """Verify the drafts of every active row in one forward, accept, commit, emit, and draft the next chain."""
        if self.tree is not None:
            return self._tree_step(keep)
        remaining = [self.max_new_tokens - len(self.generated[r]) for r in self.rows.tolist()]
        budget, seen_drafts = self._budgets(remaining)
        k = max(budget)  # drafts past a row's budget would be wasted; a shorter row ignores its extra ones
        A = self.ride_along(k)
        t0 = time.perf_counter()
        step_ids, logits, hidden, appended = self._verify(k, A, seen_drafts)
        accepted, nxt = self._accept(logits, k, budget)
        drafts_list = self.drafts[:, :k].tolist() if k > 0 and not self.trust else [[] for _ in budget]  # to emit
        if not self.trust:  # trusted drafts were counted when drafted
            self._count(accepted, budget)
        self.schedule.update(budget, accepted)
        kept = self._commit(step_ids, accepted, k, A)
        self.stats.verify_seconds += time.perf_counter() - t0
        self._emit(keep, drafts_list, accepted, nxt, remaining)
        self.token = nxt
        k_next = self.draft_length(self.generated, self.rows, self.done)
        if k_next <= 0 and self.K == 0:
            self.drafts = self.draft_probs = None
            return
        # next_ids[:, j] is the token after the position of hidden[:, j]: the kept drafts, then nxt
        next_ids = torch.cat([self.drafts[:, :kept], nxt[:, None]], dim=1) if kept else nxt[:, None]  # (b, 1 + kept)
        cols = None  # (b, 1 + kept): which columns hold committed positions, None when all do
        if min(accepted) < kept:  # rows that kept fewer drafts: nxt goes right after their last kept one
            m = torch.tensor(accepted, device=self.device)[:, None]  # (b, 1)
            next_ids = next_ids.scatter(1, m, nxt[:, None])
            cols = torch.arange(1 + kept, device=self.device) <= m
        if k_next <= 0:  # a plain step next: the drafter sees these positions at its next call
            self.held.append((hidden[:, : kept + 1], next_ids, cols))
            self.drafts = self.draft_probs = None
            return
        hidden, next_ids, cols = self._with_held(hidden[:, : kept + 1], next_ids, cols)
        complete = None  # ride-along outputs follow a row's last verified slot: usable where all were accepted
        if appended is not None:
            verified = torch.tensor(seen_drafts if seen_drafts is not None else [k] * len(accepted), device=self.device)
            complete = torch.tensor(accepted, device=self.device) == verified
            last = verified - (1 + k - logits.shape[1])  # (b,) that slot's column (logits may hold the last one only)
            appended = appended._replace(before=logits[torch.arange(len(last), device=self.device), last])
        self.draft(hidden, next_ids, k_next, cols, appended, complete)

    def _tree_step(self, keep: list[int]) -> None:
        """Verify the tree in one forward (one sequence), keep the longest path the backbone agrees with and exactly
        its cache slots, emit it, and draft the next tree after it. The ride-along tokens follow the main chain."""
        remaining = self.max_new_tokens - len(self.generated[int(self.rows[0])])
        tree, self.tree, A = self.tree.pruned(remaining - 1), None, self.A
        t0 = time.perf_counter()
        ids = torch.cat([self.token[:, None], tree.tokens[None]] + ([self.append[None]] if A else []), dim=1)
        mask, pos = tree_masks(self.cache, tree, self.filled, A, self.model.dtype, self.device)  # (1, 1, q, kv), (1, q)
        logits, hidden = cached_forward(self.model, ids, self.cache, self.grab, None, mask, pos)
        self.stats.backbone_forwards += 1
        self.stats.row_forwards += 1
        logits, hidden, appended = _split_appended(logits, hidden, A)
        path, nxt = walk_tree(tree, logits[0], self.probs_fn, self.generator)
        self.stats.count_step(len(path), tree.depth)
        cols = [1 + i for i in path]  # the path's columns in the step (the root is column 0)
        keep_slots(self.cache, [0, *cols], ids.shape[1])
        self.filled += 1 + len(path)
        self.stats.verify_seconds += time.perf_counter() - t0
        path_ids = tree.tokens[path][None]  # (1, kept)
        self.token = torch.tensor([nxt], device=self.device)
        self._emit(keep, path_ids.tolist(), [len(path)], self.token, [remaining])
        k_next = self.draft_length(self.generated, self.rows, self.done)
        hidden = hidden[:, [0, *cols]] if hidden is not None else None  # (1, 1 + kept, H)
        next_ids = torch.cat([path_ids, self.token[:, None]], dim=1)  # (1, 1 + kept) the token after each
        self.drafts = None
        if k_next <= 0:
            self.held.append((hidden, next_ids, None))
            return
        hidden, next_ids, held_cols = self._with_held(hidden, next_ids, None)
        complete = None  # the ride-along tokens followed the main chain: usable when the path is all of it
        if appended is not None:
            complete = torch.tensor([path == list(range(tree.chain))], device=self.device)
            appended = appended._replace(before=logits[:, tree.chain])
        self.draft(hidden, next_ids, k_next, held_cols, appended, complete)

    def _with_held(self, hidden: torch.Tensor, next_ids: torch.Tensor, cols: torch.Tensor | None):
        """This step's committed positions after the ones held since the drafter's last call, in one tensor each:
        ``(hidden (b, m, H), next_ids (b, m), cols (b, m) or None)``."""
        if not self.held:
            return hidden, next_ids, cols
        parts, self.held = [*self.held, (hidden, next_ids, cols)], []
        if any(c is not None for _, _, c in parts):  # some step had holes: every part says which columns count
            cols = torch.cat([c if c is not None else n.new_ones(n.shape, dtype=torch.bool) for _, n, c in parts], 1)
        return torch.cat([h for h, _, _ in parts], dim=1), torch.cat([n for _, n, _ in parts], dim=1), cols

    def _budgets(self, remaining: list[int]) -> tuple[list[int], list[int] | None]:
        """Each row's usable drafts this step, and how many draft slots each row sees when some row drafted
        fewer than the longest (None when every row sees all of them)."""
        if self.drafts is None:
            return [0] * len(remaining), None
        lengths = _draft_lengths(self.drafts)  # each row's own number of drafts, None while all fill the columns
        if lengths is not None:
            self.drafts = self.drafts.clamp(min=0)  # the -1 tails become harmless ids in slots their rows never see
        width = self.drafts.shape[1]
        if self.trust:  # already emitted: every one is fed
            budget = [width] * len(remaining) if lengths is None else list(lengths)
        else:
            budget = [min(self.K, width if lengths is None else lengths[i], r - 1) for i, r in enumerate(remaining)]
        k = max(budget)
        # rows with fewer drafts than k must not see the other rows' extra slots
        seen_drafts = [min(n, k) for n in lengths] if lengths is not None else None
        return budget, (seen_drafts if seen_drafts is not None and min(seen_drafts) < k else None)

    def _verify(self, k: int, A: int, seen_drafts: list[int] | None):
        """One forward over [token, d_1 .. d_k, A ride-along tokens] for every row: ``(step_ids, logits, hidden,
        appended)``."""
        device = self.device
        b = len(self.token)
        step_ids = self.token[:, None] if k == 0 else torch.cat([self.token[:, None], self.drafts[:, :k]], dim=1)
        if A:
            step_ids = torch.cat([step_ids, self.append[:A].expand(b, A)], dim=1)  # (b, 1 + k + A)
        seen = None  # (b, 1 + k + A) bool: the step's slots each row sees; None when every row sees all
        if seen_drafts is not None:
            seen = torch.ones(b, 1 + k + A, dtype=torch.bool, device=device)
            seen[:, 1 : 1 + k] = torch.arange(k, device=device) < torch.tensor(seen_drafts, device=device)[:, None]
            if self.valid is None:  # the first time rows differ: from now on every row carries its own positions
                slots = self.cache.get_seq_length()
                self.valid = torch.ones(b, slots, dtype=torch.bool, device=device)
                self.pos = torch.full((b,), slots, device=device)
        mask = step_pos = None
        if self.valid is not None:
            step = seen if seen is not None else self.valid.new_ones(b, 1 + k + A)
            mask = torch.cat([self.valid, step], dim=1).long()  # (b, slots + 1 + k + A)
            step_pos = self.pos[:, None] + step.long().cumsum(1) - 1  # (b, 1 + k + A); a hidden slot repeats one
        if self.states is not None and self.states.active and (k or A):
            self.states.save()
        # the logits each accept rule reads: verifying, every slot's; trusting (or no drafts), the last one's
        keep = 1 + A if k == 0 or (self.trust and seen is None) else None
        logits, hidden = cached_forward(self.model, step_ids, self.cache, self.grab, keep, mask, step_pos, self.filled)
        self.stats.backbone_forwards += 1
        self.stats.row_forwards += b
        return (step_ids, *_split_appended(logits, hidden, A))

    def _accept(self, logits: torch.Tensor, k: int, budget: list[int]) -> tuple[list[int], torch.Tensor]:
        """Drafts each row keeps and the backbone's own token after them (b,). A chain is a tree of width one:
        each row walks its path of drafts while the backbone agrees (greedy: its argmax; sampling: rejection
        sampling), then takes the backbone's token at the node where the walk stopped."""
        if k == 0:
            return [0] * len(budget), self.pick(logits[:, -1])
        if self.trust:  # every draft is kept; the token after a row's last one is the backbone's
            last = torch.tensor(budget, device=self.device) - (1 + k - logits.shape[1])  # (b,) its column in logits
            return list(budget), self.pick(logits[torch.arange(len(budget), device=self.device), last])
        drafts = self.drafts[:, :k]  # (b, k) the path
        if self.probs_fn is None:
            target = logits.argmax(-1)  # (b, 1 + k) the backbone's token at each node
            agree = drafts == target[:, :k]  # (b, k)
            if min(budget) < k:
                agree &= torch.arange(k, device=self.device) < torch.tensor(budget, device=self.device)[:, None]
            m = agree.long().cumprod(1).sum(1)  # (b,) drafts kept: the longest agreeing prefix
            return m.tolist(), target.gather(1, m[:, None])[:, 0]
        accepted, picks = [], []
        for i, kb in enumerate(budget):
            m_i, t_i = rejection_accept(drafts[i, :kb], self.draft_probs[i, :kb], self.probs_fn(logits[i, : kb + 1]),
                                        self.generator)
            accepted.append(m_i)
            picks.append(t_i)
        return accepted, torch.tensor(picks, device=self.device)

    def _count(self, accepted: list[int], budget: list[int]) -> None:
        """Acceptance statistics: per draft position, rows that reached it and rows that accepted it."""
        for accepted_i, budget_i in zip(accepted, budget, strict=True):
            self.stats.count_step(accepted_i, budget_i)

    def _commit(self, step_ids: torch.Tensor, accepted: list[int], k: int, A: int) -> int:
        """Drop the ride-along slots and those no row kept (in one crop: a sliding-window layer trims itself to its
        window at every crop); mask the ones only some rows kept. Returns the most drafts any row kept."""
        cache, device = self.cache, self.device
        b, kept = len(accepted), max(accepted)
        if (kept < k or A) and self.states is not None and self.states.active:  # b == 1: such backbones go row by row
            self.states.restore()
            cache.crop(-(1 + k + A))
            cached_forward(self.model, step_ids[:, : 1 + kept], cache, None, 1, None, None, self.filled)  # again
            self.stats.backbone_forwards += 1
            self.stats.row_forwards += b
        elif kept < k or A:
            cache.crop(-(k - kept + A))  # a negative count removes that many trailing slots
        if b > 1 or self.valid is not None:
            new_valid = torch.arange(1 + kept, device=device) <= torch.tensor(accepted, device=device)[:, None]
            if self.valid is not None or not bool(new_valid.all()):
                old = self.valid if self.valid is not None else new_valid.new_ones(b, cache.get_seq_length() - 1 - kept)
                self.valid = torch.cat([old, new_valid], dim=1)  # (b, slots)
                if self.pos is None:  # the first hole: from now on every row carries its own positions
                    self.pos = torch.full((b,), cache.get_seq_length() - 1 - kept, device=device)
        if self.pos is not None:
            self.pos = self.pos + torch.tensor(accepted, device=device) + 1
        self.filled += 1 + kept
        return kept

    def _emit(self, keep: list[int], drafts_list: list[list[int]], accepted: list[int], nxt: torch.Tensor,
              remaining: list[int]) -> None:
        """Append each row's kept drafts and token; EOS and the token budget cut a row where HF generate stops."""
        nxt_list = nxt.tolist()
        for i, r in enumerate(self.rows.tolist()):
            new, done = cut_at_stop(drafts_list[i][: accepted[i]] + [nxt_list[i]], self.eos, remaining[i])
            self.done[keep[i]] = self.done[keep[i]] or done
            self.generated[r].extend(new)
            if self.streamer is not None:
                self.streamer.put(torch.tensor(new))
        self.done = [self.done[i] for i in keep]

    # ------------------------------------------------------------------ draft
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, cols: torch.Tensor | None,
              appended: AppendedOutputs | None, complete: torch.Tensor | None) -> None:
        """Ask the drafter for the next chain after the committed positions (``cols`` marks them, None: all)."""
        t0 = time.perf_counter()
        extra = {} if appended is None else {"appended": appended._replace(complete=complete)}
        if self.shape is not None:
            tree = self.drafter.draft_tree(hidden, next_ids, k, self.shape.within(k), self.probs_fn, self.generator,
                                           cols, **extra).pruned(k)
            self.tree = tree if len(tree) else None
            self.drafts, self.draft_probs = tree.tokens[None, : tree.chain], None  # (1, chain): the main chain
        else:
            self.drafts, self.draft_probs = self.drafter.draft(hidden, next_ids, k, self.probs_fn, self.generator,
                                                               cols, **extra)
        self.stats.draft_seconds += time.perf_counter() - t0
        if self.trust:
            self._emit_trusted(k)

    def _emit_trusted(self, k: int) -> None:
        """Trusted drafts are a row's next tokens as soon as they are drafted: count them as accepted out of the
        ``k`` asked for and emit them, cut where HF generate stops (the next forward feeds the rest)."""
        lengths, width = _draft_lengths(self.drafts), self.drafts.shape[1]
        drafts = self.drafts.tolist()
        for i, r in enumerate(self.rows.tolist()):
            if self.done[i]:
                continue
            n = width if lengths is None else lengths[i]
            self.stats.count_step(n, k)
            new, self.done[i] = cut_at_stop(drafts[i][:n], self.eos, self.max_new_tokens - len(self.generated[r]))
            self.generated[r].extend(new)
            if self.streamer is not None and new:
                self.streamer.put(torch.tensor(new))
