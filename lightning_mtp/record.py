"""The artefact record: ``mtp_config.json``, what it holds, how it is checked, and the one place it is built.

``weights`` says which files hold the model: ``"method"``, ``"method+adapter"``, ``"full"``, or ``"native"``
(see :mod:`lightning_mtp.artifacts` for the directory layout and :mod:`lightning_mtp.convert` for the native one).
:func:`mtp_record` builds the record for ``save_pretrained``, native export and (its identity fields) Lightning
checkpoints, so the three say the same thing about the same module.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from lightning_mtp.errors import UserInputError
from lightning_mtp.version import __version__

__all__ = [
    "ADAPTER_DIR",
    "IDENTITY_FIELDS",
    "METHOD_WEIGHTS",
    "MTP_CONFIG",
    "WEIGHTS_KINDS",
    "base_model_record",
    "base_revision",
    "mtp_record",
    "read_mtp_config",
]

MTP_CONFIG = "mtp_config.json"
METHOD_WEIGHTS = "mtp_method.safetensors"
ADAPTER_DIR = "adapter"
_KNOWN_KEYS = frozenset(
    {"library", "library_version", "method", "lora", "weights", "native_layout", "base_model", "decoding", "metrics"}
)
WEIGHTS_KINDS = ("method", "method+adapter", "full", "native")
"""The values of ``weights`` in ``mtp_config.json`` (``save_artifact`` writes the first three, ``convert`` the last)."""
IDENTITY_FIELDS = ("library_version", "base_model", "method", "lora", "weights")
"""The fields of the record a Lightning checkpoint carries as its identity (:mod:`lightning_mtp.checkpoint`)."""


LEGACY_WEIGHTS = {"adapter": "method+adapter"}
"""Kinds older checkpoints recorded: LoRA without a method was "adapter" in a checkpoint's identity only."""


def weights_kind(module, full: bool) -> str:
    """Which files hold ``module``'s trained weights (the record's ``weights``): one answer for artefacts, exports and
    checkpoint identities. ``full``: the whole backbone is saved (it trains, or the caller asks for it)."""
    if full:
        return "full"
    return "method+adapter" if module.lora is not None else "method"


def base_model_record(module, name_or_path: str | None, revision: str | None, model_type: str | None = None) -> dict:
    """What a record says about ``module``'s base: how to find it again, and what it must match to be reused."""
    return {
        "name_or_path": name_or_path,
        "revision": revision,
        "vocab_size": module.parts.vocab_size,
        "hidden_size": module.parts.hidden_size,
        "model_type": model_type or module.base_model.config.model_type,
    }


def base_revision(module) -> str | None:
    """The commit the base was loaded at: recorded by zoo/Hub loading, or the one transformers read from the cache."""
    revision = getattr(module, "base_revision", None)
    if revision:
        return revision
    return getattr(module.base_model.config, "_commit_hash", None) or None


def mtp_record(
    module,
    *,
    weights: str,
    base_model: dict[str, Any],
    decoding: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    native_layout: str | None = None,
) -> dict[str, Any]:
    """The ``mtp_config.json`` of ``module`` (an MTPModule), in the field order the files have always had."""
    record: dict[str, Any] = {
        "library": "lightning-mtp",
        "library_version": __version__,
        "method": None if module.method_config is None else module.method_config.to_dict(),
        "lora": module.lora,
        "weights": weights,
    }
    if native_layout is not None:
        record["native_layout"] = native_layout
    record.update(base_model=base_model, decoding=decoding or {}, metrics=metrics or {})
    return record


def read_mtp_config(path: Path) -> dict:
    """Parse and check ``mtp_config.json``: one ``ValueError`` naming the field, its value and what it must be;
    a warning for an artefact written by a newer lightning-mtp, and for fields this version does not know."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path} must hold a JSON object, got {type(config).__name__}")
    for key in ("method", "base_model"):
        if key not in config:
            raise UserInputError(f"{path} lacks the {key!r} field; is it a lightning-mtp artefact?")
    _check_library(path, config)
    _check_fields(path, config)
    if config["method"] is None and (path.parent / METHOD_WEIGHTS).is_file():
        raise UserInputError(f"{path} records no method (\"method\": null), but {METHOD_WEIGHTS} holds method weights "
                             "that nothing would load; restore the method's configuration in the 'method' field, or "
                             "save the artefact again")
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(f"{path} has field(s) {unknown} unknown to lightning-mtp {__version__} (written by "
                      f"{config.get('library_version', 'an unknown version')}); they are ignored", stacklevel=2)
    return config


def _check_library(path: Path, config: dict) -> None:
    """Written by lightning-mtp, by a version this one can read (a newer one is warned about, as PEFT does)."""
    library = config.get("library", "lightning-mtp")
    if library != "lightning-mtp":
        raise UserInputError(f"{path}: field 'library' is {library!r}; expected 'lightning-mtp' (this is not a "
                             "lightning-mtp artefact)")
    saved = config.get("library_version")
    if saved is None:
        return
    bad = UserInputError(f"{path}: field 'library_version' is {saved!r}; expected a version string such as {__version__!r}")
    if not isinstance(saved, str):
        raise bad
    try:
        newer = Version(saved) > Version(__version__)
    except InvalidVersion:
        raise bad from None
    if newer:
        warnings.warn(f"{path} was written by lightning-mtp {saved}, newer than this lightning-mtp {__version__}: "
                      "what it added may be ignored or misread; upgrade lightning-mtp to load it as written",
                      stacklevel=3)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_method(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and isinstance(value.get("name"), str))


_OPTIONAL_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
_OPTIONAL_OBJECT = (lambda v: v is None or isinstance(v, dict), "a JSON object or null")
_TOP_FIELDS = {  # field: (check, what it must be)
    "method": (_is_method, 'null or an object with a string "name"'),
    "lora": _OPTIONAL_OBJECT,
    "weights": (lambda v: v in WEIGHTS_KINDS, f"one of {list(WEIGHTS_KINDS)}"),
    "native_layout": _OPTIONAL_STR,
    "base_model": (lambda v: isinstance(v, dict), "a JSON object"),
    "decoding": _OPTIONAL_OBJECT,
    "metrics": _OPTIONAL_OBJECT,
}
_BASE_FIELDS = {
    "name_or_path": _OPTIONAL_STR,
    "revision": _OPTIONAL_STR,
    "vocab_size": (_is_count, "a positive integer"),
    "hidden_size": (_is_count, "a positive integer"),
    "model_type": _OPTIONAL_STR,
}
_BASE_REQUIRED = ("vocab_size", "hidden_size")  # what loading compares with the backbone


def _check_fields(path: Path, config: dict) -> None:
    """Each known field of the right type (what loading reads, before it reads it)."""
    for field, (ok, expected) in _TOP_FIELDS.items():
        if field in config and not ok(config[field]):
            raise UserInputError(f"{path}: field {field!r} is {config[field]!r}; expected {expected}")
    base = config["base_model"]
    for field in _BASE_REQUIRED:
        if field not in base:
            raise UserInputError(f"{path}: field 'base_model' lacks {field!r} (the base's {field}, a positive integer)")
    for field, (ok, expected) in _BASE_FIELDS.items():
        if field in base and not ok(base[field]):
            raise UserInputError(f"{path}: field 'base_model.{field}' is {base[field]!r}; expected {expected}")
