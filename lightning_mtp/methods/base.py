"""The method interface and its registry.

A method is one file holding a config dataclass registered with :func:`register_method` and the
``nn.Module`` it builds. The module trains through :meth:`MTPMethod.loss` and drafts through the
:class:`Drafter` it returns from :meth:`MTPMethod.drafter`; the shared lossless decoder verifies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_mtp.backbone import BackboneParts

__all__ = ["METHODS", "Drafter", "MTPMethod", "MethodConfig", "future_tokens", "register_method", "resolve_method"]

METHODS: dict[str, type[MethodConfig]] = {}


@dataclass
class MethodConfig:
    """Base of every method's config: a dataclass of plain values, saved in ``mtp_config.json``."""

    name: ClassVar[str] = ""

    @property
    def num_draft_tokens(self) -> int:
        """How many tokens one draft proposes (the chain length K the decoder verifies)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming any bad value (called on construction)."""

    def __post_init__(self) -> None:
        self.validate()

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
    return cls(**kwargs)


def future_tokens(ids: torch.Tensor, offset: int, fill: int) -> torch.Tensor:
    """``out[:, i] = ids[:, i + offset]``, and ``fill`` where ``i + offset`` runs past the end.

    The one place that says which token lies k positions ahead: a head at position i that is fed the
    token ``future_tokens(ids, k)`` predicts ``future_tokens(labels, k + 1)``.
    """
    B, T = ids.shape  # (B, T)
    out = ids.new_full((B, T), fill)
    if offset < T:
        out[:, : T - offset] = ids[:, offset:]
    return out  # (B, T)


class Drafter:
    """Proposes draft tokens during decoding; one instance per generate call (it holds caches).

    The decoder calls :meth:`draft` after every backbone forward with the rows that forward committed:
    their final hidden states and the token that follows each (``next_ids[:, j]`` is the token after the
    position of ``hidden[:, j]``). The drafter returns ``k`` proposed tokens that continue the sequence
    after the last of ``next_ids``, and, when ``probs_fn`` is given (sampling), each draft's full
    probability row so the decoder can run rejection sampling. Drafts are sampled with ``generator``
    (the one passed to ``generate``) so a seeded generator makes sampling reproducible.
    """

    def draft(
        self,
        hidden: torch.Tensor,  # (B, m, H) final hidden states of the newly committed positions
        next_ids: torch.Tensor,  # (B, m) the token after each of those positions
        k: int,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, k), (B, k, V) or None
        raise NotImplementedError


class MTPMethod(nn.Module):
    """A trainable multi-token-prediction method attached to a backbone."""

    config: MethodConfig

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def loss(
        self,
        parts: BackboneParts,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, T), -100 where no loss
        hidden: torch.Tensor,  # (B, T, H) the backbone's final hidden states
        backbone_pred: torch.Tensor,  # (B, T) the backbone's argmax next token at each position
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the training loss and, under ``"draft_correct"``, a (K, N) bool tensor of teacher-forced
        matches with the backbone's greedy token (for acceptance metrics), plus anything else to log."""
        raise NotImplementedError

    def drafter(self, parts: BackboneParts) -> Drafter:
        raise NotImplementedError

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        """Hook run before training with the training data's token counts, if :attr:`needs_token_counts`."""

    needs_token_counts: bool = False
