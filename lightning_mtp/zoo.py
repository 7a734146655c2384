"""The model zoo: named, validated recipes for getting a ready-to-decode :class:`~lightning_mtp.MTPModule`.

One YAML file per entry (``zoo/<name>.yaml``)::

    name: tiny-math-fastmtp                    # = the file name
    description: FastMTP head (K=3) for the shipped tiny-math base
    base_model:                                # what the backbone is: exactly one of
      entry: tiny-math-base                    #   another zoo entry,
      # repo_id: Qwen/Qwen3-4B                 #   a Hub repo (with revision:), or
      # path: tiny-math-base                   #   a directory (relative to this file)
    method: {name: fast_mtp, num_steps: 3}     # the method and its config (null: plain next-token model)
    weights:                                   # where the trained weights live, and in which format:
      format: artifact                         #   artifact: a lightning-mtp artefact (save_pretrained output)
      path: tiny-math-fastmtp                  #     at path: (relative to this file) or repo_id: (+ revision:)
                                               #   full_model: the base_model is the whole trained model
                                               #   native_mtp: the base_model holds a native MTP layer
                                               #     (layout: mimo), converted by lightning_mtp.convert
    decoding: {decoding: speculative, num_draft_tokens: 3}   # defaults: keyword arguments of MTPModule.generate
    metrics:                                   # measured numbers and the command that produced them
      values: {tokens_per_forward: 3.83, speedup_vs_hf: 2.14, accuracy: 1.0}
      command: lightning-mtp bench --model zoo/tiny-math-fastmtp --prompts tiny-math --n 50
    license: apache-2.0
    source: {recipe: recipes/tiny-math/fast_mtp.yaml, paper: arXiv 2509.18362}

Where entries come from: the ``zoo/`` directory of the source tree, every directory listed in the
``LIGHTNING_MTP_ZOO`` environment variable (``os.pathsep``-separated; this is how an installed, non-editable
lightning-mtp finds a zoo checkout or a team's own entries), and :func:`register` at run time.

The index (entries, schema, lookup, validation, where weights are) is :mod:`lightning_mtp.zoo_index`, re-exported
here; this face adds what builds modules: :func:`load`, :func:`load_entry`, :func:`push` and the ``zoo`` command.

Loading (:func:`load`) is offline for entries whose weights are local directories; Hub entries go through the
Hugging Face cache with the offline rules of :func:`lightning_mtp.hub.fetch`.
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedModel

import lightning_mtp.artifacts as artifacts
from lightning_mtp.commands import CommandParser
from lightning_mtp.errors import UserInputError
from lightning_mtp.hub import push_to_hub
from lightning_mtp.hub_transport import fetch, is_hub_id
from lightning_mtp.methods import METHODS
from lightning_mtp.module import MTPModule
from lightning_mtp.native import detect_native_layout
from lightning_mtp.record import MTP_CONFIG
from lightning_mtp.zoo_index import (
    FORMATS,
    HUB_KWARGS,
    ZooEntry,
    has,
    info,
    list,
    names,
    register,
    validate,
    weights_location,
    weights_path,
    zoo_dirs,
)

__all__ = [
    "FORMATS",
    "ZooEntry",
    "has",
    "info",
    "list",
    "load",
    "load_entry",
    "main",
    "names",
    "push",
    "register",
    "validate",
    "weights_path",
    "zoo_dirs",
]


def load_entry(
    entry: ZooEntry,
    *,
    method_overrides: Mapping[str, Any] | None = None,
    backbone: str | PreTrainedModel | None = None,
    **kwargs: Any,
) -> MTPModule:
    """Build the MTPModule an entry describes (see :func:`load`, which also sorts keyword arguments); ``kwargs``
    are Hub options (``revision``, ``token``, ``endpoint``, ``cache_dir``, ``local_files_only``) and MTPModule
    arguments."""
    return artifacts.load_entry(MTPModule, entry, method_overrides=method_overrides, backbone=backbone, **kwargs)


def load(name: str, **overrides: Any) -> MTPModule:
    """An :class:`~lightning_mtp.MTPModule` for zoo entry ``name``, ready for ``.generate``.

    ``overrides``: options of the entry's method (e.g. ``num_steps=2`` for fast_mtp: those that leave the
    weights' shapes alone), ``MTPModule`` arguments (``dtype="bfloat16"``, ``lora=...``, ``backbone=`` a local
    copy of the base), and Hub options (``revision``, ``token``, ``endpoint``, ``cache_dir``, ``local_files_only``).
    The entry's decoding defaults are in ``zoo.info(name).decoding`` (keyword arguments of ``generate``).
    """
    entry = info(name)
    method_fields: set[str] = set()
    if entry.method is not None and entry.method.get("name") in METHODS:
        method_fields = {f.name for f in dataclasses.fields(METHODS[entry.method["name"]])}
    module_params = set(inspect.signature(MTPModule.__init__).parameters) - {"self", "method"}
    method_overrides = {k: v for k, v in overrides.items() if k in method_fields}
    rest = {k: v for k, v in overrides.items() if k not in method_fields}
    unknown = sorted(set(rest) - module_params - set(HUB_KWARGS))
    if unknown:
        raise UserInputError(f"unknown option(s) {unknown} for zoo entry {name!r}; method options are "
                             f"{sorted(method_fields)}, module options {sorted(module_params)}, Hub options "
                             f"{[*HUB_KWARGS]}")
    return load_entry(entry, method_overrides=method_overrides, **rest)


# ------------------------------------------------------------------------------------------------ push


def push(source: Any, repo_id: str, *, name: str | None = None, license: str | None = None, **kwargs: Any) -> ZooEntry:
    """Push a zoo entry's local weights, an artefact directory, a Lightning ``.ckpt`` or an MTPModule to the Hub.

    Returns a :class:`ZooEntry` for what now lives at ``repo_id`` (pinned to the new commit; named ``name``, by
    default ``namespace--name``), ready for
    :func:`register` or for writing to a YAML file (``entry.to_yaml()``). ``kwargs`` go to
    :func:`lightning_mtp.hub.push_to_hub` (``private``, ``token``, ``endpoint``, ``base_model``, ...).
    """
    entry = None
    if isinstance(source, str) and not os.path.exists(source) and has(source):
        entry = info(source)
        if "path" not in entry.weights and not (entry.weights["format"] != "artifact" and "path" in entry.base_model):
            raise UserInputError(f"zoo entry {source!r} already lives on the Hub; nothing local to push")
        source = weights_location(entry, None, {})
    if entry is not None and entry.metrics and "metrics" not in kwargs:
        kwargs["metrics"] = entry.metrics
    commit = push_to_hub(source, repo_id, license=license or (entry.license if entry else None), **kwargs)
    endpoint = kwargs.get("endpoint")
    local = fetch(repo_id, commit.oid, endpoint=endpoint, token=kwargs.get("token"), allow_patterns=["*.json"])
    config = json.loads((local / MTP_CONFIG).read_text()) if (local / MTP_CONFIG).is_file() else None
    weights: dict[str, Any] = {"format": "full_model"}
    base: dict[str, Any] = {"repo_id": repo_id, "revision": commit.oid}
    method = None
    if config is not None and config.get("weights") != "native":
        ref = config["base_model"].get("name_or_path") or ""
        weights = {"format": "artifact", "repo_id": repo_id, "revision": commit.oid}
        if config.get("weights") == "full":
            base = {"repo_id": repo_id, "revision": commit.oid}
        elif has(ref):
            base = {"entry": ref}
        elif is_hub_id(ref):
            base = {"repo_id": ref, **({"revision": config["base_model"]["revision"]}
                                       if config["base_model"].get("revision") else {})}
        method = config["method"]
    elif detect_native_layout(local) is not None:
        weights = {"format": "native_mtp", "layout": detect_native_layout(local)}
        method = (config or {}).get("method")
    data = {
        "name": name or repo_id.replace("/", "--").lower(),  # the Hub cache's spelling: never a shipped name
        "description": f"{entry.description} (pushed to {repo_id})" if entry else f"pushed to {repo_id}",
        "base_model": base,
        "method": method,
        "weights": weights,
        "decoding": (entry.decoding if entry else None) or (config or {}).get("decoding") or {},
        "license": license or (entry.license if entry else "unspecified"),
        "source": {**(entry.source if entry else {}), "url": commit.commit_url},
    }
    if entry is not None and entry.metrics:
        data["metrics"] = entry.metrics
    return ZooEntry.from_dict(data)


# ------------------------------------------------------------------------------------------------ CLI


def _summary(entry: ZooEntry) -> tuple[str, str, str]:
    method = "-" if entry.method is None else entry.method["name"]
    w = entry.weights
    where = w.get("path") or w.get("repo_id") or "(base)"
    base = entry.base_model
    base_s = base.get("entry") or base.get("repo_id") or base.get("path")
    return method, f"{w['format']}: {where}", str(base_s)


def main(argv: builtins.list[str]) -> None:
    """``lightning-mtp zoo list`` / ``lightning-mtp zoo info NAME``."""
    parser = CommandParser(prog="lightning-mtp zoo", description="List and describe the model zoo.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every entry with its method, weights and base")
    p_info = sub.add_parser("info", help="one entry in full (YAML)")
    p_info.add_argument("name")
    args = parser.parse_args(argv)
    if args.action == "list":
        rows = [("name", "method", "weights", "base model", "license")]
        rows += [(e.name, *_summary(e), e.license) for e in (info(n) for n in names())]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return
    entry = info(args.name)
    print(f"# {entry.origin}")
    print(entry.to_yaml(), end="")
