"""Artefact plumbing: atomic directory writes and the ``mtp_config.json`` reference to the base model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lightning_mtp.backbone import ZOO_DIR

__all__ = ["atomic_dir", "atomic_write_text", "read_mtp_config", "resolve_base_reference"]


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` whole, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artefact directory is meant to be shared
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_base_reference(backbone_ref: str, save_dir: Path) -> str:
    """How a saved artefact names its base: a zoo name, a path relative to the artefact, or a Hub id."""
    if not backbone_ref:
        return backbone_ref
    if (ZOO_DIR / backbone_ref).is_dir() and not os.path.isdir(backbone_ref):
        return backbone_ref  # already a zoo name
    if os.path.isdir(backbone_ref):
        base = Path(backbone_ref).resolve()
        try:
            return os.path.relpath(base, Path(save_dir).resolve().parent / Path(save_dir).name)
        except ValueError:  # different drives on Windows
            return str(base)
    return backbone_ref


def read_mtp_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    for key in ("method", "base_model"):
        if key not in config:
            raise ValueError(f"{path} lacks the {key!r} field; is it an lightning-mtp artefact?")
    return config


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
