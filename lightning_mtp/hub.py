"""The Hugging Face Hub side of artefacts: fetch (cache first, offline aware), model cards, push in one commit.

The face of three modules, re-exported here: :mod:`lightning_mtp.hub_transport` (settings, repo-id checks,
:func:`fetch`), :mod:`lightning_mtp.card` (:func:`model_card`) and :mod:`lightning_mtp.upload` (the one-commit
upload). This module adds what needs :class:`~lightning_mtp.MTPModule`: pushing a Lightning ``.ckpt``, and the
``lightning-mtp push`` command.

Everything goes through the real ``huggingface_hub`` client. Its settings (endpoint, cache, offline mode) are
read from the environment *at call time* (``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE``),
and can be given explicitly, so that a process can change them after ``huggingface_hub`` was imported (the
client reads its own constants once, at import).

Offline rules (:func:`fetch`): with ``HF_HUB_OFFLINE=1`` the local cache is the only source; without network
(or with the Hub down) the cache is used when it holds the snapshot; otherwise one ``ValueError`` says what is
missing and how to get it. The first request has a short timeout (``HF_HUB_ETAG_TIMEOUT``, 10 s by default),
so an unreachable endpoint fails fast instead of hanging.

Tokens come from the usual ``huggingface_hub`` sources (``token=``, ``HF_TOKEN``, ``hf auth login``) and are
never printed or written anywhere.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import CommitInfo

import lightning_mtp.upload as upload
from lightning_mtp.card import model_card
from lightning_mtp.commands import CommandParser
from lightning_mtp.hub_transport import (
    MODEL_FILES,
    HubSettings,
    fetch,
    hub_settings,
    is_hub_id,
    snapshot_commit,
    validate_repo_id,
)
from lightning_mtp.module import MTPModule

__all__ = [
    "MODEL_FILES",
    "HubSettings",
    "fetch",
    "hub_settings",
    "is_hub_id",
    "main",
    "model_card",
    "push_to_hub",
    "snapshot_commit",
    "validate_repo_id",
]


def _load_checkpoint(path: str) -> MTPModule:
    return MTPModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def push_to_hub(source: Any, repo_id: str, **kwargs: Any) -> CommitInfo:
    """Upload an artefact to ``repo_id`` as one commit; returns ``huggingface_hub.CommitInfo`` (``.oid``, ``.commit_url``).

    ``source`` is an MTPModule, an artefact directory (``save_pretrained`` output, or any Hugging Face model
    directory) or a Lightning ``.ckpt``. ``kwargs``: ``private``, ``token``, ``endpoint``, ``revision``,
    ``commit_message``, ``base_model``, ``metrics``, ``license``, ``card``; see
    :func:`lightning_mtp.upload.push_to_hub`.
    """
    return upload.push_to_hub(source, repo_id, load_checkpoint=_load_checkpoint, **kwargs)


def main(argv: list[str]) -> None:
    """``lightning-mtp push CKPT_OR_DIR --repo-id NAMESPACE/NAME``: upload in one commit, print the commit URL."""
    parser = CommandParser(prog="lightning-mtp push", description=main.__doc__.splitlines()[0])
    parser.add_argument("source", help="an artefact directory (save_pretrained output) or a Lightning .ckpt")
    parser.add_argument("--repo-id", required=True, help="the Hub repo to create or update, 'namespace/name'")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--base-model", default=None, help="Hub id to record as the base (for a local-path base)")
    parser.add_argument("--license", default=None, help="licence for the model card metadata, e.g. apache-2.0")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--no-card", action="store_true", help="do not write README.md (keep the directory's own)")
    args = parser.parse_args(argv)
    commit = push_to_hub(
        args.source, args.repo_id, private=args.private, endpoint=args.endpoint, revision=args.revision,
        commit_message=args.commit_message, base_model=args.base_model, license=args.license, card=not args.no_card,
    )
    print(commit.commit_url)
