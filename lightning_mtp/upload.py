"""Upload an artefact to the Hugging Face Hub in one commit, with a fresh model card.

``source`` is a directory, or anything with ``save_pretrained`` (an MTPModule): this layer knows no module
class; :func:`lightning_mtp.hub.push_to_hub` adds Lightning ``.ckpt`` files.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from lightning_mtp.card import model_card
from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import first_line, hub_settings, is_hub_id, network_errors, validate_repo_id
from lightning_mtp.record import MTP_CONFIG, read_mtp_config
from lightning_mtp.resolve import is_zoo_name
from lightning_mtp.version import __version__

__all__ = ["push_to_hub"]


def _materialise(source: Any, tmp: Path, load_checkpoint: Callable[[str], Any] | None) -> Path:
    """The directory to upload: an artefact directory as is, or a module / Lightning checkpoint saved into ``tmp``."""
    if hasattr(source, "save_pretrained") and not isinstance(source, (str, os.PathLike)):  # an MTPModule
        return source.save_pretrained(tmp / "artifact")
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt" and load_checkpoint is not None:
        return load_checkpoint(str(path)).save_pretrained(tmp / "artifact")
    if not path.is_dir():
        raise UserInputError(f"nothing to push at {str(source)!r}: give an artefact directory, a Lightning .ckpt file "
                             "or an MTPModule")
    return path


def _files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` but hidden ones (``.cache``, editor files)."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    metrics: dict | None = None,
    license: str | None = None,
    card: bool = True,
    load_checkpoint: Callable[[str], Any] | None = None,
) -> CommitInfo:
    """Upload an artefact to ``repo_id`` as one commit; returns ``huggingface_hub.CommitInfo`` (``.oid``, ``.commit_url``).

    ``source`` is an MTPModule, an artefact directory (``save_pretrained`` output, or any Hugging Face model
    directory) or a Lightning ``.ckpt``. The repo is created if needed (``private`` applies then). ``base_model``
    replaces the base reference in the uploaded ``mtp_config.json`` (e.g. the Hub id of the local copy you
    trained on); a base that is a local path is refused, as nobody else could load it. ``metrics`` are added to
    the uploaded ``mtp_config.json`` (and so to the card's metrics table). ``card`` writes a fresh
    ``README.md`` (model card) into the commit for a lightning-mtp artefact, or for a model directory that has
    none. Local files are only read: a push that fails part-way leaves
    them as they were, and the Hub applies a commit whole or not at all. ``load_checkpoint`` turns a ``.ckpt``
    path into a module (:func:`lightning_mtp.hub.push_to_hub` passes ``MTPModule.load_from_checkpoint``).
    """
    validate_repo_id(repo_id, need_namespace=True)
    if base_model is not None and not is_hub_id(base_model):
        if not is_zoo_name(base_model):
            raise UserInputError(f"base_model {base_model!r} must be a Hub id ('namespace/name') or a zoo name")
    s = hub_settings(endpoint)
    with tempfile.TemporaryDirectory(prefix="lightning-mtp-push-") as tmp:
        directory = _materialise(source, Path(tmp), load_checkpoint)
        files = _files(directory)
        if not files:
            raise UserInputError(f"{directory} holds no files to push")
        overrides: dict[str, bytes] = {}
        config = None
        if (directory / MTP_CONFIG).is_file():
            config = read_mtp_config(directory / MTP_CONFIG)
            ref = config["base_model"].get("name_or_path") or ""
            if base_model is not None:
                config["base_model"]["name_or_path"] = base_model
            if metrics:
                config["metrics"] = {**(config.get("metrics") or {}), **metrics}
            if base_model is not None or metrics:
                overrides[MTP_CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
            native = config.get("weights") in {"full", "native"}
            if base_model is None and not native and not is_hub_id(ref) and not is_zoo_name(ref):
                raise UserInputError(
                    f"{directory / MTP_CONFIG} names its base model by the local path {ref!r}, which nobody else can "
                    "load; pass base_model='namespace/name' (the Hub id of that base) to record it in the upload"
                )
        if card and (config is not None or not (directory / "README.md").is_file()):  # keep a foreign model's card
            overrides["README.md"] = str(model_card(directory, config=config, repo_id=repo_id, license=license)).encode()
        operations = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=overrides.pop(rel, None) or str(path))
            for path in files
            for rel in [path.relative_to(directory).as_posix()]
        ]
        operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data) for rel, data in overrides.items()]
        api = HfApi(endpoint=s.endpoint, token=token, library_name="lightning-mtp", library_version=__version__)
        stage = "creating the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            stage = f"committing {len(operations)} files"
            return api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload {directory.name} with lightning-mtp {__version__}",
                revision=revision,
                repo_type="model",
            )
        except network_errors() + (ValueError,) as err:
            raise UserInputError(
                f"push of {directory} to {repo_id!r} on {s.endpoint} failed while {stage}: "
                f"{type(err).__name__}: {first_line(err)}. Nothing from this push was committed (a Hub commit "
                "lands whole or not at all) and the local files are unchanged; fix the cause and push again"
            ) from None
