"""Reaching the Hugging Face Hub: settings, repo-id checks, and fetch (cache first, offline aware). A leaf.

Settings are read from the environment at call time, and :func:`fetch` follows the offline rules described in
:mod:`lightning_mtp.hub` (which re-exports this module's functions). Tokens are never printed or written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from lightning_mtp.errors import UserInputError
from lightning_mtp.version import __version__

_HTTP_STACKS = []  # the HTTP client huggingface_hub talks through: httpx2 (huggingface_hub 2.x) or httpx (1.x)
try:
    import httpx2

    _HTTP_STACKS.append(httpx2)
except ImportError:
    pass
try:
    import httpx

    _HTTP_STACKS.append(httpx)
except ImportError:
    pass

__all__ = [
    "MODEL_FILES",
    "HubSettings",
    "fetch",
    "first_line",
    "hub_settings",
    "is_hub_id",
    "network_errors",
    "snapshot_commit",
    "validate_repo_id",
]

MODEL_FILES: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
"""What :func:`fetch` downloads by default: configs, safetensors weights and tokenizer files (never pickles,
GGUF or the ``original/`` checkpoints some repos also hold)."""

_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSettings:
    """Where and how to reach the Hub for one call."""

    endpoint: str
    cache_dir: str
    offline: bool
    timeout: float


def hub_settings(
    endpoint: str | None = None, cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None
) -> HubSettings:
    """Explicit values first, then the environment as it is now, then ``huggingface_hub``'s own defaults."""
    env = os.environ
    if cache_dir is None:
        if env.get("HF_HUB_CACHE"):
            cache_dir = env["HF_HUB_CACHE"]
        elif env.get("HF_HOME"):
            cache_dir = os.path.join(env["HF_HOME"], "hub")
        else:
            cache_dir = constants.HF_HUB_CACHE
    if local_files_only is None:
        flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
        local_files_only = flag.strip().lower() in _TRUE if flag else constants.HF_HUB_OFFLINE
    timeout = env.get("HF_HUB_ETAG_TIMEOUT")
    return HubSettings(
        endpoint=(endpoint or env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        cache_dir=str(Path(cache_dir).expanduser()),
        offline=bool(local_files_only),
        timeout=float(timeout) if timeout else 10.0,
    )


def validate_repo_id(repo_id: str, *, need_namespace: bool = False) -> str:
    """Return ``repo_id`` or raise a ``ValueError`` saying what a valid one looks like."""
    if not isinstance(repo_id, str) or not repo_id:
        raise UserInputError(f"a Hub repo id must be a non-empty string like 'namespace/name', got {repo_id!r}")
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserInputError(f"invalid Hub repo id {repo_id!r}: {err}") from None
    if need_namespace and "/" not in repo_id:
        raise UserInputError(f"invalid Hub repo id {repo_id!r}: give the namespace too, e.g. 'your-name/{repo_id}'")
    return repo_id


def is_hub_id(name: str) -> bool:
    """True when ``name`` reads as ``namespace/name`` on the Hub and is not a local path."""
    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def network_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the Hub cannot be reached now" (as opposed to "this repo does not exist")."""
    transport = tuple(stack.TransportError for stack in _HTTP_STACKS)
    return (*transport, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError, TimeoutError)


def fetch(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: list[str] | tuple[str, ...] | None = MODEL_FILES,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local directory of ``repo_id`` at ``revision``: downloaded into the Hub cache, or taken from it.

    Raises one ``ValueError`` when the snapshot is neither reachable nor cached, naming the repo, the cache
    and the command that fetches it; never waits longer than the settings' timeout for an unreachable Hub.
    """
    validate_repo_id(repo_id)
    s = hub_settings(endpoint, cache_dir, local_files_only)
    rev = revision or "main"
    patterns = None if allow_patterns is None else [*allow_patterns]
    common = dict(repo_id=repo_id, revision=rev, cache_dir=s.cache_dir, allow_patterns=patterns)
    problem: BaseException | None = None
    if not s.offline:
        api = HfApi(endpoint=s.endpoint, token=token, library_name="lightning-mtp", library_version=__version__)
        try:
            api.repo_info(repo_id, revision=rev, timeout=s.timeout)  # reachability and existence, fast
            return Path(snapshot_download(**common, endpoint=s.endpoint, token=token, etag_timeout=s.timeout,
                                          library_name="lightning-mtp", library_version=__version__))
        except GatedRepoError:
            raise UserInputError(f"{repo_id!r} on {s.endpoint} is gated: accept its terms on the model page, then log "
                                 "in (`hf auth login`) or pass token=") from None
        except RepositoryNotFoundError:
            raise UserInputError(f"repository {repo_id!r} not found on {s.endpoint}; check the id, or log in "
                                 "(`hf auth login`, HF_TOKEN or token=) if it is private") from None
        except RevisionNotFoundError:
            raise UserInputError(f"revision {rev!r} of {repo_id!r} not found on {s.endpoint}") from None
        except network_errors() as err:
            problem = err
    try:
        return Path(snapshot_download(**common, local_files_only=True))
    except (OSError, ValueError) as err:
        why = ("HF_HUB_OFFLINE is set" if s.offline
               else f"the Hub at {s.endpoint} cannot be reached ({type(problem).__name__}: {first_line(problem)})")
        get = f"hf download {repo_id}" + (f" --revision {rev}" if rev != "main" else "")
        raise UserInputError(
            f"{repo_id!r} (revision {rev!r}) is not in the local Hugging Face cache {s.cache_dir}, and {why}. "
            f"Fetch it once with network access: `{get}` (same HF_HUB_CACHE/HF_HOME), then load again"
        ) from err


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit sha of a Hub-cache snapshot directory (``.../snapshots/<sha>``), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def first_line(err: BaseException | None) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
