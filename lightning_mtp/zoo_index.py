"""The zoo index: entries, their schema, lookup and validation, and where their weights are. No loading (that is
:mod:`lightning_mtp.zoo`, which re-exports everything here and shows an entry's YAML).

Entries come from the ``zoo/`` directory of the source tree, every directory listed in ``LIGHTNING_MTP_ZOO``
(``os.pathsep``-separated) and :func:`register` at run time.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import fetch, snapshot_commit, validate_repo_id
from lightning_mtp.methods.registry import resolve_method
from lightning_mtp.native import NATIVE_LAYOUTS
from lightning_mtp.record import MTP_CONFIG, read_mtp_config

__all__ = [
    "FORMATS",
    "HUB_KWARGS",
    "ZOO_DIR",
    "ZooEntry",
    "base_location",
    "check_hub_kwargs",
    "has",
    "info",
    "list",
    "names",
    "register",
    "validate",
    "weights_location",
    "weights_path",
    "zoo_dirs",
]

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
"""The source tree's ``zoo/`` directory: shipped entries and their tiny weights."""
FORMATS = ("artifact", "full_model", "native_mtp")
"""Weights formats: a lightning-mtp artefact; a whole Hugging Face model (the base itself); a model with a
native MTP layer converted on load."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
HUB_KWARGS = ("revision", "token", "endpoint", "cache_dir", "local_files_only")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo entry, validated for structure; :func:`validate` also resolves its method and local files."""

    name: str
    description: str
    base_model: dict[str, Any]  # exactly one of entry / repo_id / path; revision with repo_id
    method: dict[str, Any] | None
    weights: dict[str, Any]  # format, and path / repo_id (+ revision) for artifacts, layout for native_mtp
    license: str
    source: dict[str, Any]
    decoding: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    origin: str = "<dict>"  # the YAML file it was read from, for error messages
    root: Path = field(default_factory=Path.cwd)  # relative paths are relative to this directory

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<dict>", root: Path | None = None) -> ZooEntry:
        """Check types and required fields; errors name ``origin`` (the file) and the field."""
        _check_mapping(data, "", origin)
        _check_keys(data, _TOP, "", origin)
        name = data["name"]
        if not _NAME.match(name):
            raise UserInputError(f"{origin}: field 'name' must be lower-case letters, digits, '.', '_' or '-', got {name!r}")
        if origin.endswith((".yaml", ".yml")) and Path(origin).stem != name:
            raise UserInputError(f"{origin}: field 'name' is {name!r} but the file is named {Path(origin).name!r}; "
                                 "they must agree")
        base = data["base_model"]
        _check_keys(base, _BASE, "base_model", origin)
        kinds = [k for k in ("entry", "repo_id", "path") if k in base]
        if len(kinds) != 1:
            raise UserInputError(f"{origin}: field 'base_model' needs exactly one of 'entry', 'repo_id' or 'path', "
                                 f"got {kinds or 'none'}")
        if "repo_id" in base:
            _check_repo_id(base["repo_id"], "base_model.repo_id", origin)
        elif "revision" in base:
            raise UserInputError(f"{origin}: field 'base_model.revision' applies to a 'repo_id' base only")
        weights = data["weights"]
        _check_keys(weights, _WEIGHTS, "weights", origin)
        fmt = weights["format"]
        if fmt not in FORMATS:
            raise UserInputError(f"{origin}: field 'weights.format' must be one of {[*FORMATS]}, got {fmt!r}")
        where = [k for k in ("path", "repo_id") if k in weights]
        if fmt == "artifact" and len(where) != 1:
            raise UserInputError(f"{origin}: field 'weights' of format 'artifact' needs exactly one of 'path' or "
                                 f"'repo_id', got {where or 'none'}")
        if fmt != "artifact" and where:
            raise UserInputError(f"{origin}: field 'weights.{where[0]}' does not apply to format {fmt!r}: those weights "
                                 "are the base_model itself")
        if "repo_id" in weights:
            _check_repo_id(weights["repo_id"], "weights.repo_id", origin)
        if fmt == "native_mtp":
            if weights.get("layout") not in NATIVE_LAYOUTS:
                raise UserInputError(f"{origin}: field 'weights.layout' must be one of {sorted(NATIVE_LAYOUTS)} for "
                                     f"format 'native_mtp', got {weights.get('layout')!r}")
        elif "layout" in weights:
            raise UserInputError(f"{origin}: field 'weights.layout' applies to format 'native_mtp' only")
        method = data["method"]
        if method is not None and not isinstance(method.get("name"), str):
            raise UserInputError(f"{origin}: field 'method.name' must be a method name (string), got "
                                 f"{type(method.get('name')).__name__} {method.get('name')!r}")
        decoding = data.get("decoding") or {}
        _check_keys(decoding, _DECODING, "decoding", origin)
        metrics = data.get("metrics") or {}
        _check_keys(metrics, _METRICS, "metrics", origin)
        if (metrics.get("values") or metrics.get("rows")) and not (metrics.get("command") or metrics.get("source")):
            raise UserInputError(f"{origin}: field 'metrics' needs 'command' (how they were measured) or 'source' "
                                 "(where they were reported)")
        source = data["source"]
        _check_keys(source, _SOURCE, "source", origin)
        if not source:
            raise UserInputError(f"{origin}: field 'source' needs at least one of {sorted(_SOURCE)}")
        return cls(
            name=name, description=data["description"], base_model=dict(base), method=None if method is None else dict(method),
            weights=dict(weights), license=data["license"], source=dict(source), decoding=dict(decoding),
            metrics=dict(metrics), origin=origin, root=Path(root) if root is not None else Path.cwd(),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ZooEntry:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserInputError(f"{path}: not valid YAML: {err}") from None
        except OSError as err:
            raise UserInputError(f"cannot read zoo entry {path}: {err}") from None
        return cls.from_dict(data, origin=str(path), root=path.parent)

    def to_dict(self) -> dict[str, Any]:
        """The entry as its YAML holds it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in {"origin", "root"}}
        return {k: v for k, v in out.items() if v or k == "method"}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def method_config(self):
        """The entry's method resolved through the registry (None for a plain model)."""
        try:
            return resolve_method(self.method)
        except ValueError as err:
            raise UserInputError(f"{self.origin}: field 'method': {err}") from None

    def local_path(self, key: str) -> Path:
        """``base_model.path`` / ``weights.path`` as an absolute directory (relative to the entry's file)."""
        section = getattr(self, key)
        path = Path(section["path"]).expanduser()
        return path if path.is_absolute() else (self.root / path)


# ------------------------------------------------------------------------------------------------ schema

_T = type | tuple[type, ...]
_STR = (str,)
_TOP: dict[str, tuple[_T, bool]] = {
    "name": (_STR, True), "description": (_STR, True), "base_model": (dict, True), "method": ((dict, type(None)), True),
    "weights": (dict, True), "license": (_STR, True), "source": (dict, True), "decoding": ((dict, type(None)), False),
    "metrics": ((dict, type(None)), False),
}
_BASE = {"entry": (_STR, False), "repo_id": (_STR, False), "path": (_STR, False), "revision": ((str, type(None)), False)}
_WEIGHTS = {"format": (_STR, True), "path": (_STR, False), "repo_id": (_STR, False),
            "revision": ((str, type(None)), False), "layout": (_STR, False)}
_DECODING = {"decoding": (_STR, False), "num_draft_tokens": ((int,), False), "do_sample": ((bool,), False),
             "temperature": ((int, float), False), "top_p": ((int, float), False), "top_k": ((int,), False),
             "tau": ((int, float), False), "k": ((int,), False), "tree": (dict, False)}
_METRICS = {"values": (dict, False), "rows": (builtins.list, False), "command": (_STR, False), "source": (_STR, False)}
_SOURCE = {"paper": (_STR, False), "recipe": (_STR, False), "url": (_STR, False), "trained_from": (_STR, False),
           "notes": (_STR, False)}


def _type_name(types: _T) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a mapping",
             builtins.list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_mapping(value: Any, where: str, origin: str) -> None:
    if not isinstance(value, dict):
        what = f"field '{where}'" if where else "the entry"
        raise UserInputError(f"{origin}: {what} must be a mapping, got {type(value).__name__} {value!r}")


def _check_keys(data: Any, spec: dict[str, tuple[_T, bool]], where: str, origin: str) -> None:
    """Unknown keys, missing required keys and wrong types, each named with its dotted path."""
    _check_mapping(data, where, origin)
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise UserInputError(f"{origin}: unknown field '{prefix}{unknown[0]}'; valid fields are {sorted(spec)}")
    for key, (types, required) in spec.items():
        if key not in data:
            if required:
                raise UserInputError(f"{origin}: missing required field '{prefix}{key}'")
            continue
        value = data[key]
        allowed = types if isinstance(types, tuple) else (types,)
        bad_bool = isinstance(value, bool) and bool not in allowed  # YAML's true is an int to Python
        if bad_bool or not isinstance(value, allowed):
            raise UserInputError(f"{origin}: field '{prefix}{key}' must be {_type_name(types)}, got "
                                 f"{type(value).__name__} {value!r}")


def _check_repo_id(repo_id: str, where: str, origin: str) -> None:
    try:
        validate_repo_id(repo_id, need_namespace=True)
    except ValueError as err:
        raise UserInputError(f"{origin}: field '{where}': {err}") from None


# ------------------------------------------------------------------------------------------------ registry

_registered: dict[str, ZooEntry] = {}
_from_dirs: tuple[tuple[str, ...], dict[str, ZooEntry]] | None = None


def zoo_dirs() -> builtins.list[Path]:
    """Directories searched for ``*.yaml`` entries: the source tree's ``zoo/``, then ``LIGHTNING_MTP_ZOO``."""
    extra = [Path(p).expanduser() for p in os.environ.get("LIGHTNING_MTP_ZOO", "").split(os.pathsep) if p]
    dirs = [ZOO_DIR, *extra]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in {x.resolve() for x in dirs[:i]}]


def _entries() -> dict[str, ZooEntry]:
    """Every known entry by name: from the zoo directories (re-read when they change) and :func:`register`."""
    global _from_dirs
    dirs = tuple(str(d) for d in zoo_dirs())
    if _from_dirs is None or _from_dirs[0] != dirs:
        found: dict[str, ZooEntry] = {}
        for d in dirs:
            for file in sorted(Path(d).glob("*.yaml")):
                entry = ZooEntry.from_file(file)
                if entry.name in found:
                    raise UserInputError(f"zoo entry {entry.name!r} is defined twice: {found[entry.name].origin} and {file}")
                found[entry.name] = entry
        _from_dirs = (dirs, found)
    return {**_from_dirs[1], **_registered}


def names() -> builtins.list[str]:
    """All entry names, sorted."""
    return sorted(_entries())


def has(name: str) -> bool:
    return isinstance(name, str) and name in _entries()


def list() -> builtins.list[str]:  # noqa: A001 (zoo.list() reads as the user expects)
    """All entry names, sorted (``lightning-mtp zoo list`` prints them with their method and weights)."""
    return names()


def info(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name is a ``ValueError`` that lists the closest names."""
    entries = _entries()
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(str(name), entries, n=3, cutoff=0.5)
    hint = f"did you mean {close}? " if close else ""
    raise UserInputError(f"{name!r} is not a zoo entry; {hint}known entries are {sorted(entries)}")


def register(
    path_or_dict: str | os.PathLike | Mapping[str, Any] | ZooEntry, *, replace: bool = False
) -> ZooEntry | builtins.list[ZooEntry]:
    """Add your own entries: a YAML file, a directory of YAML files, a mapping (paths relative to the cwd) or a
    :class:`ZooEntry` (e.g. the one :func:`push` returns).

    A name that already exists is refused unless ``replace=True``. Entries live for this process; put the
    YAML files in a directory listed in ``LIGHTNING_MTP_ZOO`` to have them everywhere.
    """
    single = isinstance(path_or_dict, (Mapping, ZooEntry))
    if isinstance(path_or_dict, ZooEntry):
        new = [path_or_dict]
    elif isinstance(path_or_dict, Mapping):
        new = [ZooEntry.from_dict(dict(path_or_dict))]
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            new = [ZooEntry.from_file(f) for f in sorted(path.glob("*.yaml"))]
            if not new:
                raise UserInputError(f"{path} holds no *.yaml zoo entries")
        elif path.is_file():
            new = [ZooEntry.from_file(path)]
        else:
            raise UserInputError(f"cannot register {str(path)!r}: no such file or directory")
    existing = _entries()
    for entry in new:
        if entry.name in existing and not replace:
            raise UserInputError(f"zoo entry {entry.name!r} already exists ({existing[entry.name].origin}); "
                                 "pass replace=True to override it")
    for entry in new:
        _registered[entry.name] = entry
    return new[0] if single or Path(path_or_dict).is_file() else new


# ------------------------------------------------------------------------------------------------ validation


def validate(name_or_entry: str | ZooEntry) -> ZooEntry:
    """Full check of one entry without touching the network: its method resolves through the method registry,
    its local directories exist, and a local artefact agrees with the entry (method, base vocab/hidden size).
    """
    entry = name_or_entry if isinstance(name_or_entry, ZooEntry) else info(name_or_entry)
    config = entry.method_config()
    if "entry" in entry.base_model:
        base = info(entry.base_model["entry"])
        if base.weights["format"] != "full_model":
            raise UserInputError(f"{entry.origin}: field 'base_model.entry' names {base.name!r}, which is not a whole "
                                 "model (weights.format full_model)")
    for key in ("base_model", "weights"):
        if "path" in getattr(entry, key) and not entry.local_path(key).is_dir():
            raise UserInputError(f"{entry.origin}: field '{key}.path' -> {entry.local_path(key)} is not a directory")
    if entry.weights["format"] == "artifact" and "path" in entry.weights:
        saved = read_mtp_config(entry.local_path("weights") / MTP_CONFIG)
        theirs = resolve_method(saved["method"])
        if (None if config is None else config.to_dict()) != (None if theirs is None else theirs.to_dict()):
            raise UserInputError(f"{entry.origin}: field 'method' {entry.method} disagrees with the artefact's "
                                 f"{saved['method']}")
        base_dir = _local_base_dir(entry)
        if base_dir is not None and (base_dir / "config.json").is_file():
            cfg = json.loads((base_dir / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)
            want = (saved["base_model"]["vocab_size"], saved["base_model"]["hidden_size"])
            have = (cfg.get("vocab_size"), cfg.get("hidden_size"))
            if theirs is not None and have[0] is not None:  # e.g. mask_token adds its <MTP> row to the base
                have = (theirs.vocab_size_after_prepare(have[0]), have[1])
            if have != want:
                raise UserInputError(f"{entry.origin}: the artefact was trained on vocab/hidden {want}, but base "
                                     f"{base_dir} gives {have}")
    return entry


def _local_base_dir(entry: ZooEntry) -> Path | None:
    if "path" in entry.base_model:
        return entry.local_path("base_model")
    if "entry" in entry.base_model:
        base = info(entry.base_model["entry"])
        return _local_base_dir(base) if base.weights["format"] == "full_model" else None
    return None


# ------------------------------------------------------------------------------------------------ loading


def base_location(entry: ZooEntry, revision: str | None, hub: dict[str, Any]) -> tuple[Path, str, str | None]:
    """``(local directory, how artefacts should name it, revision)`` of the entry's base model."""
    base = entry.base_model
    if "entry" in base:
        parent = info(base["entry"])
        if parent.weights["format"] != "full_model":
            raise UserInputError(f"{entry.origin}: base_model.entry {parent.name!r} is not a whole model")
        path, _, rev = base_location(parent, None, hub)
        return path, parent.name, rev
    if "path" in base:
        path = entry.local_path("base_model")
        if not path.is_dir():
            raise UserInputError(f"{entry.origin}: base model directory {path} is missing (a non-editable install "
                                 "has no zoo/ directory: point LIGHTNING_MTP_ZOO at a checkout's zoo/)")
        return path, entry.name if entry.weights["format"] != "artifact" else str(path), None
    rev = revision or base.get("revision")
    path = fetch(base["repo_id"], rev, **hub)
    return path, base["repo_id"], snapshot_commit(path) or rev


def weights_location(entry: ZooEntry, revision: str | None, hub: dict[str, Any]) -> Path:
    weights = entry.weights
    if weights["format"] != "artifact":
        return base_location(entry, revision, hub)[0]
    if "path" in weights:
        path = entry.local_path("weights")
        if not path.is_dir():
            raise UserInputError(f"{entry.origin}: weights directory {path} is missing (a non-editable install has "
                                 "no zoo/ directory: point LIGHTNING_MTP_ZOO at a checkout's zoo/)")
        return path
    return fetch(weights["repo_id"], revision or weights.get("revision"), **hub)


def weights_path(name: str, **hub: Any) -> Path:
    """The local directory holding entry ``name``'s weights (fetched through the Hub cache for Hub entries).

    ``hub``: ``revision``, ``token``, ``endpoint``, ``cache_dir``, ``local_files_only``.
    """
    check_hub_kwargs(hub)
    hub = dict(hub)
    revision = hub.pop("revision", None)
    return weights_location(info(name), revision, hub)


def check_hub_kwargs(hub: Mapping[str, Any]) -> None:
    unknown = sorted(set(hub) - set(HUB_KWARGS))
    if unknown:
        raise UserInputError(f"unknown option(s) {unknown}; Hub options are {[*HUB_KWARGS]}")
