"""The method interface and its registry.

A method is one file holding a config dataclass registered with :func:`register_method` and the
``nn.Module`` it builds. The module trains through :meth:`MTPMethod.loss` and drafts through the
:class:`Drafter` it returns from :meth:`MTPMethod.drafter`; the shared lossless decoder verifies.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import yaml
from torch import nn

from lightning_mtp.backbone import BackboneParts

__all__ = ["METHODS", "AppendedOutputs", "Drafter", "DraftChain", "MTPMethod", "MethodConfig", "future_labels", "future_tokens", "main_head_metrics", "register_method", "resolve_method"]

METHODS: dict[str, type[MethodConfig]] = {}


@dataclass
class MethodConfig:
    """Base of every method's config: a dataclass of plain values, saved in ``mtp_config.json``."""

    name: ClassVar[str] = ""
    trains_backbone_by_default: ClassVar[bool] = False
    """Whether the backbone's own weights train unless ``freeze_backbone`` says otherwise."""

    @property
    def num_draft_tokens(self) -> int:
        """How many tokens one draft proposes (the chain length K the decoder verifies)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming any bad value (called on construction)."""

    def __post_init__(self) -> None:
        self.validate()

    def prepare_backbone(self, model, tokenizer) -> None:
        """Adapt the loaded backbone before LoRA wraps it and parameters are frozen (default: nothing).

        For example, add a special token and resize the embeddings; record what was chosen in a config field
        so that it is saved and reused on load.
        """

    def vocab_size_after_prepare(self, vocab_size: int) -> int:
        """The embedding rows :meth:`prepare_backbone` leaves on a backbone with ``vocab_size`` rows (default: the
        same); lets a zoo entry be checked against its base without loading it."""
        return vocab_size

    def build(self, parts: BackboneParts) -> MTPMethod:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def register_method(name: str) -> Callable[[type[MethodConfig]], type[MethodConfig]]:
    """Class decorator: register a method config under ``name`` (duplicates are refused)."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def resolve_method(method: str | dict | MethodConfig | None) -> MethodConfig | None:
    """``"fast_mtp"``, ``{"name": "fast_mtp", "num_steps": 3}``, a config instance, or None (plain NTP)."""
    if method is None or isinstance(method, MethodConfig):
        return method
    if isinstance(method, str):
        name, kwargs = method, {}
    elif isinstance(method, dict):
        kwargs = dict(method)
        name = kwargs.pop("name", None)
        if name is None:
            raise ValueError(f"a method given as a mapping needs a 'name' key, one of {sorted(METHODS)}; got {method!r}")
    else:
        raise ValueError(f"method must be a name, a mapping or a MethodConfig, got {type(method).__name__}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are {sorted(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options are {sorted(fields)}")
    return cls(**_coerce_strings(cls, kwargs))


def _coerce_strings(cls: type[MethodConfig], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Values given on the command line (``--model.method.num_steps 4``) arrive as strings: read them as YAML
    scalars when the field is not a string field, so ``"4"`` becomes 4 and ``"null"`` None."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        takes_str = hint is str or str in typing.get_args(hint)
        out[key] = yaml.safe_load(value) if isinstance(value, str) and not takes_str else value
    return out


def future_tokens(ids: torch.Tensor, offset: int, fill: float) -> torch.Tensor:
    """``out[:, i] = ids[:, i + offset]``, and ``fill`` where ``i + offset`` runs past the end.

    The one place that says which token lies k positions ahead: a head at position i that is fed the
    token ``future_tokens(ids, k)`` predicts ``future_tokens(labels, k + 1)``, and the main head's logits for
    that same token are ``future_tokens(logits, k)``. ``ids`` is (B, T) or (B, T, ...).
    """
    T = ids.shape[1]
    out = ids.new_full(ids.shape, fill)  # (B, T, ...)
    if offset < T:
        out[:, : T - offset] = ids[:, offset:]
    return out


def future_labels(labels: torch.Tensor, offset: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, i] = labels[:, i + offset]``, or -100 past the end and, with packed documents (``position_ids``
    restarting per document), wherever position ``i + offset`` lies in another document than ``i``."""
    out = future_tokens(labels, offset, -100)  # (B, T)
    if position_ids is not None:
        same_doc = future_tokens(position_ids, offset, -1) == position_ids + offset  # (B, T)
        out = out.masked_fill(~same_doc, -100)
    return out


def main_head_metrics(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """The backbone's own next-token cross-entropy and accuracy on ``labels`` (logged as ``main_ce`` and
    ``main_acc`` during validation, so joint training's effect on the main head shows)."""
    with torch.no_grad():
        target = future_labels(labels, 1, position_ids)  # (B, T) the token each position predicts
        valid = target != -100
        if not valid.any():
            return {}
        flat = logits[valid].float()  # (N, V)
        return {
            "main_ce": torch.nn.functional.cross_entropy(flat, target[valid]),
            "main_acc": (flat.argmax(-1) == target[valid]).float().mean(),
        }


class AppendedOutputs(NamedTuple):
    """What the backbone made of the tokens a drafter asked to append (:meth:`Drafter.appended_tokens`)."""

    logits: torch.Tensor  # (B, a, V) the backbone's logits at the appended positions
    hidden: torch.Tensor | None  # (B, a, H) their final hidden states (None when the decoder has none)
    complete: torch.Tensor  # (B,) bool: the row committed every position before the appended tokens


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

    Where a chain ends: the decoder sets :attr:`stop_ids` (the backbone's EOS ids) and :attr:`min_confidence`
    (``draft_confidence_threshold``) before the first call; a drafter that drafts one token at a time builds its
    chain through :class:`DraftChain`, which ends it after a stop token and before an unconfident position.
    """

    stop_ids: torch.Tensor | None = None
    """(E,) token ids after which a chain ends: nothing after an EOS can be emitted, so drafting on is wasted."""
    min_confidence: float = 0.0
    """A chain ends before a position whose most likely draft has less probability than this (0: never)."""

    def appended_tokens(self, k: int) -> torch.Tensor | None:
        """Token ids (a,) to append after the ``k`` drafts of every forward, or None (the default) for none."""
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


class MTPMethod(nn.Module):
    """A trainable multi-token-prediction method attached to a backbone.

    What a method overrides:

    - :meth:`loss` (most methods): the loss from one backbone forward's final hidden states. The default
      :meth:`training_loss` runs that forward (with gradients only when the backbone trains).
    - :meth:`training_loss` (methods that drive the backbone themselves, e.g. with mask tokens or a teacher).
    - :meth:`drafter`: what proposes drafts for the shared lossless decoder.
    - :meth:`generate` and :attr:`decodings` (optional): extra decoding modes of the method's own, e.g. a
      lossy one; ``"speculative"`` (lossless, through :meth:`drafter`) is always available.
    - :meth:`bench_entries`: the decoders ``lightning-mtp bench`` runs for this method.
    """

    config: MethodConfig
    needs_token_counts: bool = False
    decodings: tuple[str, ...] = ("speculative",)
    """Decoding modes :meth:`MTPModule.generate` accepts for this method (``decoding=...``)."""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def attach(self, module) -> None:
        """Called once the owning MTPModule is built (default: nothing); e.g. to set up a teacher."""

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters a saved artefact stores (default: all of the method's state)."""
        return self.state_dict()

    def training_loss(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch for ``module`` (an MTPModule).

        The batch holds ``input_ids`` and ``labels`` (B, T), and optionally ``attention_mask`` (a (B, T)
        padding mask, or an additive float (B, 1, T, T) mask such as the block-diagonal one of packed
        documents) and ``position_ids`` (B, T). Runs the backbone once (with gradients only when some
        backbone weight trains), hands its final hidden states to :meth:`loss`, and adds the backbone's own
        next-token loss when it trains.
        """
        from lightning_mtp.backbone import LastHiddenState

        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        trains_backbone = module.training and any(p.requires_grad for p in module.backbone.parameters())
        with torch.set_grad_enabled(trains_backbone), LastHiddenState(module.parts) as grab:
            out = module.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels if trains_backbone else None,
                **grab.kwargs,
            )
            hidden = grab.get(out)  # (B, T, H) the final hidden state (after the final norm)
        loss, logs = self.loss(
            module.parts, input_ids, labels, hidden, out.logits,
            attention_mask=attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None,
            position_ids=position_ids,
        )
        if trains_backbone and out.loss is not None:
            logs["ntp_loss"] = out.loss.detach()
            loss = loss + out.loss
        if not module.training:  # the main head's own quality, to see whether joint training hurt it
            logs.update(main_head_metrics(out.logits, labels, position_ids))
        return loss, logs

    def loss(
        self,
        parts: BackboneParts,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, T), -100 where no loss
        hidden: torch.Tensor,  # (B, T, H) the backbone's final hidden states
        backbone_logits: torch.Tensor,  # (B, T, V) the main head's logits (with gradient when the backbone trains)
        *,
        attention_mask: torch.Tensor | None = None,  # (B, 1, T, T) additive, only for non-causal layouts (packing)
        position_ids: torch.Tensor | None = None,  # (B, T), None means 0..T-1
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the training loss and, under ``"draft_correct"``, a (K, N) bool tensor of teacher-forced
        matches with the backbone's greedy token ``backbone_logits.argmax(-1)`` (for acceptance metrics), plus
        anything else to log. Detach ``backbone_logits`` before using them as a teacher.

        Heads with attention must use ``attention_mask`` and ``position_ids`` when given, so that packed
        documents stay isolated as they are in the backbone. Labels are -100 wherever no loss belongs
        (prompts, padding, and the first token of each packed document).
        """
        raise NotImplementedError

    def drafter(self, parts: BackboneParts) -> Drafter:
        raise NotImplementedError

    def generate(self, module, input_ids: torch.Tensor, *, decoding: str, **options: Any):
        """Decode with one of the method's own modes (any of :attr:`decodings` but ``"speculative"``)."""
        raise ValueError(f"method {self.config.name!r} has no decoding {decoding!r}; choose one of {list(self.decodings)}")

    def bench_entries(self, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """``(entry name, generate options)`` for each decoder ``lightning-mtp bench`` runs for this method.

        Names start with the method's registered name (``mask_token/confadapt@0.9``); the default is its
        lossless speculative decoding. ``sweep`` (``lightning-mtp bench --sweep``) asks for the method's
        speed/accuracy curve too, e.g. several thresholds or draft lengths.
        """
        return [(self.config.name, {"decoding": "speculative"})]

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        """Hook run before training with the training data's token counts, if :attr:`needs_token_counts`."""
