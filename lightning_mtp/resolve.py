"""What does a name point to: a local directory, a zoo entry or a Hub id. The one resolver every function that
takes a model name goes through (loading a backbone, an artefact, a base, ``init_from`` heads)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import lightning_mtp.zoo_index as zoo_index
from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import fetch, is_hub_id

__all__ = ["is_zoo_name", "locate_artifact", "resolve_base_reference", "resolve_model_path"]


def is_zoo_name(name: str) -> bool:
    """True when ``name`` is a zoo entry's name."""
    return zoo_index.has(name)


def resolve_model_path(name: str) -> str:
    """A local directory, a zoo entry (``tiny-math-base``: the directory of its weights, fetched through the Hub
    cache for Hub entries; see :mod:`lightning_mtp.zoo`), or a Hub id."""
    if os.path.isdir(name):
        return name
    if zoo_index.has(name):
        return str(zoo_index.weights_path(name))
    zoo_dir = zoo_index.ZOO_DIR / name
    if zoo_dir.is_dir():
        return str(zoo_dir)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local or not name:
        raise UserInputError(
            f"backbone {name!r} not found: no such directory, and it is not a zoo name "
            f"(zoo: {zoo_index.names()}) or a Hub id"
        )
    return name  # a Hub id: from_pretrained resolves it (cache, or download when online)


def resolve_base_reference(backbone_ref: str, save_dir: Path) -> str:
    """How a saved artefact names its base: a zoo name, a path relative to the artefact, or a Hub id."""
    if not backbone_ref:
        return backbone_ref
    if is_zoo_name(backbone_ref) and not os.path.isdir(backbone_ref):
        return backbone_ref  # already a zoo name
    if os.path.isdir(backbone_ref):
        base = Path(backbone_ref).resolve()
        try:
            return os.path.relpath(base, Path(save_dir).resolve().parent / Path(save_dir).name)
        except ValueError:  # different drives on Windows
            return str(base)
    return backbone_ref


def locate_artifact(directory: str | os.PathLike, hub: dict[str, Any]) -> tuple[Path, str | None]:
    """The local directory of an artefact given as a path or a Hub id, and the Hub id when it came from the Hub."""
    name = str(directory)
    if os.path.isdir(name):
        return Path(name), None
    if is_hub_id(name):
        return fetch(name, **hub), name
    path = resolve_model_path(name)  # a zoo directory, or a clear error for a missing local path
    if not os.path.isdir(path):
        close = difflib.get_close_matches(name, zoo_index.names(), n=3, cutoff=0.5)
        hint = f"; did you mean the zoo entr{'y' if len(close) == 1 else 'ies'} {close}?" if close else ""
        raise UserInputError(f"{name!r} is not a local directory, a zoo name or a Hub repo id ('namespace/name'){hint}")
    return Path(path), None
