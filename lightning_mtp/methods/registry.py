"""The method registry: :class:`MethodConfig` (the base of every method's config), :func:`register_method` and
:func:`resolve_method`.

It sits low in the package (the zoo index and model cards read it) and knows no method: each method's file
registers itself when :mod:`lightning_mtp.methods` imports it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml
from torch import nn

from lightning_mtp.errors import UserInputError
from lightning_mtp.parts import BackboneParts

__all__ = ["METHODS", "MethodConfig", "register_method", "resolve_method"]

METHODS: dict[str, type[MethodConfig]] = {}


@dataclass
class MethodConfig:
    """Base of every method's config: a dataclass of plain values, saved in ``mtp_config.json``."""

    name: ClassVar[str] = ""
    trains_backbone_by_default: ClassVar[bool] = False
    """Whether the backbone's own weights train unless ``freeze_backbone`` says otherwise."""
    summary: ClassVar[str] = ""
    """One line for model cards: what the method is, with its paper (default: "the '<name>' method")."""
    even_loss_options: ClassVar[dict[str, Any]] = {}
    """Options under which the loss is a plain mean over equally many tokens per process (no random draws per
    row): the distributed tests compare two processes with one under them."""

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

    def build(self, parts: BackboneParts) -> nn.Module:
        """The method this config describes, for the backbone ``parts`` take apart: its
        :class:`~lightning_mtp.methods.base.MTPMethod` (the interface sits above the registry, so it is named here
        only as the ``nn.Module`` it is)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def register_method(name: str) -> Callable[[type[MethodConfig]], type[MethodConfig]]:
    """Class decorator: register a method config under ``name`` (duplicates are refused)."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        if name in METHODS:
            raise UserInputError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
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
            raise UserInputError(f"a method given as a mapping needs a 'name' key, one of {sorted(METHODS)}; got {method!r}")
    else:
        raise UserInputError(f"method must be a name, a mapping or a MethodConfig, got {type(method).__name__}")
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; registered methods are {sorted(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise UserInputError(f"unknown option(s) {unknown} for method {name!r}; valid options are {sorted(fields)}")
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
