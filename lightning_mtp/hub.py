"""The Hugging Face Hub side of artefacts: fetch (cache first, offline aware), model cards, push in one commit.

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

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

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
    from huggingface_hub import constants

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
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"a Hub repo id must be a non-empty string like 'namespace/name', got {repo_id!r}")
    try:
        _validate(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {err}") from None
    if need_namespace and "/" not in repo_id:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: give the namespace too, e.g. 'your-name/{repo_id}'")
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


def _network_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the Hub cannot be reached now" (as opposed to "this repo does not exist")."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transport: tuple[type[BaseException], ...] = ()
    for http_stack in ("httpx2", "httpx"):  # huggingface_hub 2.x / 1.x
        try:
            transport += (importlib.import_module(http_stack).TransportError,)
        except ImportError:
            pass
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
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from lightning_mtp import __version__

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
            raise ValueError(f"{repo_id!r} on {s.endpoint} is gated: accept its terms on the model page, then log "
                             "in (`hf auth login`) or pass token=") from None
        except RepositoryNotFoundError:
            raise ValueError(f"repository {repo_id!r} not found on {s.endpoint}; check the id, or log in "
                             "(`hf auth login`, HF_TOKEN or token=) if it is private") from None
        except RevisionNotFoundError:
            raise ValueError(f"revision {rev!r} of {repo_id!r} not found on {s.endpoint}") from None
        except _network_errors() as err:
            problem = err
    try:
        return Path(snapshot_download(**common, local_files_only=True))
    except (OSError, ValueError) as err:
        why = ("HF_HUB_OFFLINE is set" if s.offline
               else f"the Hub at {s.endpoint} cannot be reached ({type(problem).__name__}: {_first_line(problem)})")
        get = f"hf download {repo_id}" + (f" --revision {rev}" if rev != "main" else "")
        raise ValueError(
            f"{repo_id!r} (revision {rev!r}) is not in the local Hugging Face cache {s.cache_dir}, and {why}. "
            f"Fetch it once with network access: `{get}` (same HF_HUB_CACHE/HF_HOME), then load again"
        ) from err


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit sha of a Hub-cache snapshot directory (``.../snapshots/<sha>``), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------------- model card

_METRIC_COLUMNS = ("name", "tokens_per_forward", "speedup_vs_hf", "speedup_vs_ntp", "accuracy", "identical_to_ntp")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """Bench rows (``metrics["rows"]``, as ``lightning-mtp bench --json`` writes) as one table, other scalars as
    a second, and the command that produced them."""
    parts = []
    rows = metrics.get("rows") or []
    if rows:
        cols = [c for c in _METRIC_COLUMNS if any(c in r for r in rows)]
        parts.append("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |")
        parts[-1] += "".join("\n| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows)
    scalars = {k: v for k, v in metrics.items() if k not in {"rows", "command", "source"} and not isinstance(v, dict)}
    scalars.update(metrics.get("values") or {})
    if scalars:
        parts.append("| metric | value |\n| --- | --- |" + "".join(f"\n| {k} | {_fmt(v)} |" for k, v in scalars.items()))
    if metrics.get("command"):
        parts.append(f"Measured with:\n\n```bash\n{metrics['command']}\n```")
    if metrics.get("source"):
        parts.append(f"Source: {metrics['source']}")
    return "\n\n".join(parts)


def _method_summary(method: Mapping[str, Any] | None) -> str:
    if not method:
        return "a plain causal LM (next-token prediction; no MTP method)"
    name = method.get("name")
    blurb = {
        "fast_mtp": "one shared FastMTP head applied recursively (Cai et al., arXiv 2509.18362)",
        "mtp_d": "K sequential MTP-D heads trained with self-distillation (Zhao et al., arXiv 2603.23911)",
        "mask_token": "mask-token multi-token prediction by on-policy self-distillation "
                      "(Kirchenbauer et al., arXiv 2602.06019)",
    }.get(name, f"the {name!r} method")
    return blurb


def model_card(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    extra_tags: list[str] | tuple[str, ...] = (),
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for an artefact directory (or its parsed ``mtp_config.json``).

    YAML metadata: ``base_model`` (when the base is a Hub id), ``library_name: lightning-mtp``, tags, licence.
    Body: what the files are, the metrics table, usage code, serving flags where an engine supports the
    layout, and any bench plot (``*.png``) found in the directory. ``config`` replaces the directory's own
    ``mtp_config.json`` (e.g. with another base reference).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from lightning_mtp.artifacts import MTP_CONFIG

    directory = None
    if isinstance(source, Mapping):
        config = dict(source)
    else:
        directory = Path(source)
        if config is None:
            config = json.loads((directory / MTP_CONFIG).read_text()) if (directory / MTP_CONFIG).is_file() else {}
    base = config.get("base_model") or {}
    base_ref = base.get("name_or_path") or ""
    method = config.get("method")
    method_name = (method or {}).get("name")
    where = repo_id or (directory.name if directory is not None else "path/to/artefact")
    tags = ["lightning-mtp", "multi-token-prediction", "speculative-decoding", *([method_name] if method_name else []),
            *extra_tags]
    data = ModelCardData(
        base_model=base_ref if is_hub_id(base_ref) else None,
        library_name="lightning-mtp",
        license=license,
        pipeline_tag="text-generation",
        tags=tags,
    )
    weights = config.get("weights") or ("method" if config.get("method") else "model")
    what = {
        "method": "only the trained MTP weights (`mtp_method.safetensors`); the base model is loaded from "
                  f"`{base_ref}`",
        "method+adapter": "the trained MTP weights and a PEFT LoRA adapter (`adapter/`); the base model is loaded "
                          f"from `{base_ref}`",
        "full": "the whole fine-tuned model (a Hugging Face model directory) plus the method's own weights",
        "native": f"a whole model in the {config.get('native_layout', 'native')} MTP layout (backbone and MTP layer "
                  "in one checkpoint), which inference engines serve directly",
        "model": "a Hugging Face model directory",
    }.get(weights, weights)
    lines = [f"# {where.split('/')[-1]}", ""]
    lines.append(f"Trained with lightning-mtp: {_method_summary(method)}.")
    if base_ref:
        rev = base.get("revision")
        lines.append(f"Base model: `{base_ref}`" + (f" (revision `{rev}`)" if rev else "")
                     + (f", vocabulary {base['vocab_size']}, hidden size {base['hidden_size']}." if "vocab_size" in base else "."))
    lines += ["", f"This repository holds {what}.", ""]
    if config.get("metrics"):
        lines += ["## Metrics", "", _metrics_markdown(config["metrics"]), ""]
    decoding = dict(config.get("decoding") or {})
    call = "".join(f", {k}={v!r}" for k, v in decoding.items())
    lines += [
        "## Usage", "",
        "```python",
        "from lightning_mtp import MTPModule",
        "",
        f'model = MTPModule.from_pretrained("{where}")',
        'ids = model.tokenizer("Question: ...\\nAnswer:", return_tensors="pt").input_ids',
        f"out = model.generate(ids, max_new_tokens=128{call})  # lossless speculative decoding by default",
        "print(model.tokenizer.decode(out.sequences[0]))",
        "print(out.stats.summary())  # tokens per forward, acceptance per position",
        "```", "",
        "```bash",
        f'lightning-mtp generate --model {where} --prompt "Question: ...\\nAnswer:"',
        "```", "",
    ]
    serving = _serving_markdown(directory, config, where)
    lines += ["## Serving", "", serving, ""]
    if method:
        lines += ["## Method configuration", "", "```json", json.dumps(method, indent=2), "```", ""]
    if directory is not None:
        for plot in sorted(directory.glob("*.png")):
            lines += [f"![{plot.stem}]({plot.name})", ""]
    version = config.get("library_version")
    if version:
        lines.append(f"Saved by lightning-mtp {version}.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def _serving_markdown(directory: Path | None, config: Mapping[str, Any], where: str) -> str:
    """Engine flags when the directory is a model with a native MTP layer an engine serves (see
    :mod:`lightning_mtp.convert`); otherwise say how to decode with lightning-mtp."""
    from lightning_mtp.convert import detect_native_layout, serving_snippet

    layout = detect_native_layout(directory) if directory is not None else None
    if layout is not None:
        k = int((config.get("decoding") or {}).get("num_draft_tokens", 3))
        return serving_snippet(layout, where, k)
    text = "vLLM and SGLang do not load lightning-mtp artefacts directly; decode with `MTPModule.generate` (above)."
    base = config.get("base_model") or {}
    if (config.get("method") or {}).get("name") == "fast_mtp" and base.get("model_type") == "qwen2":
        text += (" This FastMTP head sits on a Qwen2-architecture base, so it can be exported to the MiMo native "
                 "MTP layout, which both engines serve: `lightning_mtp.convert.export_native(module, out_dir)`.")
    return text


# ---------------------------------------------------------------------------------------------------- push


def _materialise(source: Any, tmp: Path) -> Path:
    """The directory to upload: an artefact directory as is, or a module / Lightning checkpoint saved into ``tmp``."""
    from lightning_mtp.module import MTPModule

    if isinstance(source, MTPModule):
        return source.save_pretrained(tmp / "artifact")
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt":
        module = MTPModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
        return module.save_pretrained(tmp / "artifact")
    if not path.is_dir():
        raise ValueError(f"nothing to push at {str(source)!r}: give an artefact directory, a Lightning .ckpt file "
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
) -> CommitInfo:
    """Upload an artefact to ``repo_id`` as one commit; returns ``huggingface_hub.CommitInfo`` (``.oid``, ``.commit_url``).

    ``source`` is an MTPModule, an artefact directory (``save_pretrained`` output, or any Hugging Face model
    directory) or a Lightning ``.ckpt``. The repo is created if needed (``private`` applies then). ``base_model``
    replaces the base reference in the uploaded ``mtp_config.json`` (e.g. the Hub id of the local copy you
    trained on); a base that is a local path is refused, as nobody else could load it. ``metrics`` are added to
    the uploaded ``mtp_config.json`` (and so to the card's metrics table). ``card`` writes a fresh
    ``README.md`` (model card) into the commit for a lightning-mtp artefact, or for a model directory that has
    none. Local files are only read: a push that fails part-way leaves
    them as they were, and the Hub applies a commit whole or not at all.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from lightning_mtp import __version__
    from lightning_mtp.artifacts import MTP_CONFIG

    validate_repo_id(repo_id, need_namespace=True)
    if base_model is not None and not is_hub_id(base_model):
        from lightning_mtp.zoo import names as zoo_names

        if base_model not in zoo_names():
            raise ValueError(f"base_model {base_model!r} must be a Hub id ('namespace/name') or a zoo name")
    s = hub_settings(endpoint)
    with tempfile.TemporaryDirectory(prefix="lightning-mtp-push-") as tmp:
        directory = _materialise(source, Path(tmp))
        files = _files(directory)
        if not files:
            raise ValueError(f"{directory} holds no files to push")
        overrides: dict[str, bytes] = {}
        config = None
        if (directory / MTP_CONFIG).is_file():
            from lightning_mtp.artifacts import read_mtp_config

            config = read_mtp_config(directory / MTP_CONFIG)
            ref = config["base_model"].get("name_or_path") or ""
            if base_model is not None:
                config["base_model"]["name_or_path"] = base_model
            if metrics:
                config["metrics"] = {**(config.get("metrics") or {}), **metrics}
            if base_model is not None or metrics:
                overrides[MTP_CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
            native = config.get("weights") in {"full", "native"}
            if base_model is None and not native and not is_hub_id(ref) and not _is_zoo_name(ref):
                raise ValueError(
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
        except _network_errors() + (ValueError,) as err:
            raise ValueError(
                f"push of {directory} to {repo_id!r} on {s.endpoint} failed while {stage}: "
                f"{type(err).__name__}: {_first_line(err)}. Nothing from this push was committed (a Hub commit "
                "lands whole or not at all) and the local files are unchanged; fix the cause and push again"
            ) from None


def _is_zoo_name(name: str) -> bool:
    from lightning_mtp.zoo import names as zoo_names

    return bool(name) and name in zoo_names()



def main(argv: list[str]) -> None:
    """``lightning-mtp push CKPT_OR_DIR --repo-id NAMESPACE/NAME``: upload in one commit, print the commit URL."""
    from lightning_mtp.cli import CommandParser

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
