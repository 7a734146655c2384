"""The artefact format: what ``MTPModule.save_pretrained`` writes and ``from_pretrained`` reads.

Only what was trained is saved, next to ``mtp_config.json`` and a model card::

    mtp_config.json          method and its config, LoRA config, what the weights are, base model (name, revision,
                             vocab and hidden size, model type), decoding defaults (keyword arguments of
                             ``MTPModule.generate``), metrics, library version
    mtp_method.safetensors   the method's own parameters (heads), when it has any
    adapter/                 the PEFT LoRA adapter, when one was trained
    config.json, model.safetensors, tokenizer files
                             the whole backbone, only when its own weights trained (full fine-tuning); the
                             artefact is then a loadable Hugging Face model directory too
    README.md                the model card (``huggingface_hub.ModelCard``; see :mod:`lightning_mtp.hub`)

``weights`` in ``mtp_config.json`` says which of these hold the model: ``"method"``, ``"method+adapter"``,
``"full"``, or ``"native"`` (a model directory with a native MTP layer, see :mod:`lightning_mtp.convert`).
A backbone trained with no method and no LoRA (``method=None``) is saved as a plain Hugging Face model
directory, with no ``mtp_config.json``. Every write goes to a temporary sibling directory that replaces
the target only when complete.

Loading takes a local directory, a zoo name (:mod:`lightning_mtp.zoo`) or a Hub repo id (fetched through the
cache, offline aware: :func:`lightning_mtp.hub.fetch`). A base model named by a Hub id is fetched the same way,
at the revision the artefact recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from safetensors.torch import load_file, save_file

from lightning_mtp import __version__
from lightning_mtp.backbone import resolve_model_path

__all__ = [
    "METHOD_WEIGHTS",
    "MTP_CONFIG",
    "WEIGHTS_KINDS",
    "atomic_dir",
    "atomic_write_text",
    "load_artifact",
    "read_mtp_config",
    "resolve_base_reference",
    "save_artifact",
]

MTP_CONFIG = "mtp_config.json"
METHOD_WEIGHTS = "mtp_method.safetensors"
ADAPTER_DIR = "adapter"
_KNOWN_KEYS = frozenset(
    {"library", "library_version", "method", "lora", "weights", "native_layout", "base_model", "decoding", "metrics"}
)
_HUB_KWARGS = ("revision", "token", "endpoint", "cache_dir", "local_files_only")
WEIGHTS_KINDS = ("method", "method+adapter", "full", "native")
"""The values of ``weights`` in ``mtp_config.json`` (``save_artifact`` writes the first three, ``convert`` the last)."""


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` whole, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artefact directory is meant to be shared
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors) create private files; artefacts are shared
            path.chmod(0o755 if path.is_dir() else 0o644)
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


def _is_zoo_name(name: str) -> bool:
    from lightning_mtp import zoo

    return zoo.has(name)


def resolve_base_reference(backbone_ref: str, save_dir: Path) -> str:
    """How a saved artefact names its base: a zoo name, a path relative to the artefact, or a Hub id."""
    if not backbone_ref:
        return backbone_ref
    if _is_zoo_name(backbone_ref) and not os.path.isdir(backbone_ref):
        return backbone_ref  # already a zoo name
    if os.path.isdir(backbone_ref):
        base = Path(backbone_ref).resolve()
        try:
            return os.path.relpath(base, Path(save_dir).resolve().parent / Path(save_dir).name)
        except ValueError:  # different drives on Windows
            return str(base)
    return backbone_ref


def read_mtp_config(path: Path) -> dict:
    """Parse and check ``mtp_config.json``: one ``ValueError`` naming the field, its value and what it must be;
    a warning for an artefact written by a newer lightning-mtp, and for fields this version does not know."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    for key in ("method", "base_model"):
        if key not in config:
            raise ValueError(f"{path} lacks the {key!r} field; is it a lightning-mtp artefact?")
    _check_library(path, config)
    _check_fields(path, config)
    if config["method"] is None and (path.parent / METHOD_WEIGHTS).is_file():
        raise ValueError(f"{path} records no method (\"method\": null), but {METHOD_WEIGHTS} holds method weights "
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
        raise ValueError(f"{path}: field 'library' is {library!r}; expected 'lightning-mtp' (this is not a "
                         "lightning-mtp artefact)")
    saved = config.get("library_version")
    if saved is None:
        return
    bad = ValueError(f"{path}: field 'library_version' is {saved!r}; expected a version string such as {__version__!r}")
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
            raise ValueError(f"{path}: field {field!r} is {config[field]!r}; expected {expected}")
    base = config["base_model"]
    for field in _BASE_REQUIRED:
        if field not in base:
            raise ValueError(f"{path}: field 'base_model' lacks {field!r} (the base's {field}, a positive integer)")
    for field, (ok, expected) in _BASE_FIELDS.items():
        if field in base and not ok(base[field]):
            raise ValueError(f"{path}: field 'base_model.{field}' is {base[field]!r}; expected {expected}")


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


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def _save_backbone(module, directory: Path, dtype: torch.dtype | None) -> None:
    """The whole backbone as a Hugging Face model directory (with its tokenizer)."""
    backbone = module.backbone
    if dtype is None:
        backbone.save_pretrained(directory)
    else:
        # store the weights small, but keep config.json's dtype: loading computes in the training dtype
        backbone.save_pretrained(directory, state_dict=_cast(backbone.state_dict(), dtype))
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(backbone.dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(directory)


def _base_revision(module) -> str | None:
    """The commit the base was loaded at: recorded by zoo/Hub loading, or the one transformers read from the cache."""
    revision = getattr(module, "base_revision", None)
    if revision:
        return revision
    return getattr(module._base_model.config, "_commit_hash", None) or None


def save_artifact(
    module,
    save_directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metrics: dict | None = None,
    *,
    decoding: dict | None = None,
    card: bool = True,
) -> Path:
    """Write ``module`` (an MTPModule) to ``save_directory``; see the module docstring for the layout.

    ``metrics``: measured numbers to keep with the weights (e.g. ``{"rows": <bench --json rows>, "command": ...}``);
    ``decoding``: generate keyword arguments to record as defaults (merged over the module's own).
    """
    target = Path(save_directory)
    with atomic_dir(target) as tmp:
        if module.method is None and module.lora is None:
            _save_backbone(module, tmp, dtype)
            return target
        full = module.trains_backbone_weights
        if full:
            _save_backbone(module, tmp, dtype)
        tensors = {} if module.method is None else {k: v.detach().contiguous()
                                                     for k, v in module.method.artifact_state_dict().items()}
        if tensors:
            save_file(_cast(tensors, dtype), str(tmp / METHOD_WEIGHTS), metadata={"format": "pt"})
        if module.lora is not None:
            module.backbone.save_pretrained(tmp / ADAPTER_DIR)
            (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's blank card: ours is the top-level one
            if dtype is not None:  # PEFT writes the adapter in its training dtype
                adapter = tmp / ADAPTER_DIR / "adapter_model.safetensors"
                save_file(_cast(_read_safetensors(adapter), dtype), str(adapter), metadata={"format": "pt"})
        base = module._base_model
        base_ref = resolve_base_reference(module.backbone_ref, target)
        defaults = {"decoding": "speculative", "num_draft_tokens": module.num_draft_tokens}
        defaults.update(getattr(module, "decoding_defaults", None) or {})
        defaults.update(decoding or {})
        config = {
            "library": "lightning-mtp",
            "library_version": __version__,
            "method": None if module.method_config is None else module.method_config.to_dict(),
            "lora": module.lora,
            "weights": "full" if full else ("method+adapter" if module.lora is not None else "method"),
            "base_model": {
                "name_or_path": base_ref,
                "revision": _base_revision(module) if not os.path.isdir(str(module.backbone_ref)) else None,
                "vocab_size": module.parts.vocab_size,
                "hidden_size": module.parts.hidden_size,
                "model_type": base.config.model_type,
            },
            "decoding": defaults,
            "metrics": metrics or {},
        }
        (tmp / MTP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if card:
            from lightning_mtp.hub import model_card

            (tmp / "README.md").write_text(str(model_card(tmp, config=config, repo_id=target.name)))
    return target


def _locate(directory: str | os.PathLike, hub: dict[str, Any]) -> tuple[Path, str | None]:
    """The local directory of an artefact given as a path or a Hub id, and the Hub id when it came from the Hub."""
    from lightning_mtp import hub as hub_mod

    name = str(directory)
    if os.path.isdir(name):
        return Path(name), None
    if hub_mod.is_hub_id(name):
        return hub_mod.fetch(name, **hub), name
    path = resolve_model_path(name)  # a zoo directory, or a clear error for a missing local path
    if not os.path.isdir(path):
        import difflib

        from lightning_mtp import zoo

        close = difflib.get_close_matches(name, zoo.names(), n=3, cutoff=0.5)
        hint = f"; did you mean the zoo entr{'y' if len(close) == 1 else 'ies'} {close}?" if close else ""
        raise ValueError(f"{name!r} is not a local directory, a zoo name or a Hub repo id ('namespace/name'){hint}")
    return Path(path), None


def _resolve_base(path: Path, base_ref: str, base_rev: str | None, hub: dict[str, Any]):
    """The backbone argument for an artefact's base: a local directory, a zoo name, or a loaded native-MTP model."""
    from lightning_mtp import convert
    from lightning_mtp import hub as hub_mod

    if base_ref and (path / base_ref).is_dir():
        local = (path / base_ref).resolve()
    elif _is_zoo_name(base_ref):
        from lightning_mtp import zoo

        local = zoo.weights_path(base_ref, **hub)
    elif hub_mod.is_hub_id(base_ref):
        local = hub_mod.fetch(base_ref, **{**hub, "revision": base_rev or hub.get("revision")})
    else:
        return base_ref  # a path that no longer exists: MTPModule says so
    if convert.detect_native_layout(local) is not None:
        return convert.load_native_backbone(local)
    return str(local)


def load_artifact(
    cls,
    directory: str | os.PathLike,
    *,
    backbone=None,
    method_overrides: dict | None = None,
    **kwargs: Any,
):
    """Build ``cls`` (MTPModule) from an artefact or a plain Hugging Face model (directory, zoo name or Hub id).

    ``backbone`` replaces the base the artefact names; ``method_overrides`` changes method options that leave
    the weights' shapes alone (e.g. fast_mtp ``num_steps``). Hub options (``revision``, ``token``, ``endpoint``,
    ``cache_dir``, ``local_files_only``) apply to the artefact and its base; other ``kwargs`` go to ``cls``.
    """
    from lightning_mtp import convert, zoo

    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    given = backbone
    name = str(directory)
    if not os.path.isdir(name) and zoo.has(name):
        return zoo.load_entry(zoo.info(name), method_overrides=method_overrides, backbone=backbone, **hub, **kwargs)
    path, hub_id = _locate(directory, hub)
    hub = {k: v for k, v in hub.items() if k != "revision"}  # the artefact's revision does not apply to its base
    if not (path / MTP_CONFIG).is_file():
        if convert.detect_native_layout(path) is not None:
            return convert.load_native_mtp(path, method=method_overrides or None, name_or_path=hub_id, **kwargs)
        module = cls(backbone=backbone or str(path), method=None, **kwargs)
        if hub_id is not None and backbone is None:
            module.backbone_ref = hub_id
        return module
    config = read_mtp_config(path / MTP_CONFIG)
    method = config["method"]
    if method_overrides:
        if method is None:
            raise ValueError(f"{path} has no method; method options {sorted(method_overrides)} do not apply")
        method = {**method, **method_overrides}
    base = config["base_model"]
    base_ref = base.get("name_or_path") or ""
    weights = config.get("weights")
    if weights == "native":
        module = convert.load_native_mtp(path, method=method, name_or_path=hub_id, **kwargs)
        module.decoding_defaults = dict(config.get("decoding") or {})
        return module
    full = weights == "full"
    if backbone is None:
        backbone = str(path) if full else _resolve_base(path, base_ref, base.get("revision"), hub)
    tokenizer = None
    if isinstance(backbone, tuple):  # a native-MTP base, loaded as its transformers architecture
        backbone, tokenizer = backbone
    if full:
        kwargs.setdefault("freeze_backbone", False)
    module = cls(backbone=backbone, method=method, lora=config.get("lora"), **kwargs)
    if tokenizer is not None:
        module.tokenizer = tokenizer
    if isinstance(backbone, str) or tokenizer is not None:
        module.backbone_ref = base_ref
    module.base_revision = base.get("revision")
    module.decoding_defaults = dict(config.get("decoding") or {})
    if method_overrides:  # the saved draft length belongs to the saved method config
        module.decoding_defaults.pop("num_draft_tokens", None)
    _check_base(module, path, base, _backbone_name(given, base_ref))
    if module.method is not None:
        _load_method_weights(module.method, path, config)
    if module.lora is not None:
        _load_adapter(module.backbone, path)
    return module


def _backbone_name(backbone, base_ref: str) -> str:
    """How errors name the backbone a module was built on: the one passed, else the artefact's recorded base."""
    if backbone is None:
        return base_ref
    if isinstance(backbone, str):
        return backbone
    config = getattr(backbone, "config", None)
    return getattr(config, "_name_or_path", "") or f"a {type(backbone).__name__}"


def _check_base(module, path: Path, base: dict, backbone: str) -> None:
    want_v, want_h = base["vocab_size"], base["hidden_size"]
    if (module.parts.vocab_size, module.parts.hidden_size) != (want_v, want_h):
        raise ValueError(
            f"{path} was trained on a base with vocab {want_v} and hidden size {want_h}, but the backbone "
            f"{backbone!r} has vocab {module.parts.vocab_size} and hidden size {module.parts.hidden_size}"
        )


def _load_method_weights(method, path: Path, config: dict) -> None:
    """Load ``mtp_method.safetensors`` into ``method``; refuse a missing file, missing or extra keys and wrong
    shapes, each in one line (a method with no parameters of its own, such as mask_token, needs no file)."""
    weights_file = path / METHOD_WEIGHTS
    name = config["method"]["name"]
    wanted = method.artifact_state_dict()
    if not weights_file.is_file():
        if wanted:
            raise ValueError(
                f"{path} lacks {METHOD_WEIGHTS}: its {MTP_CONFIG} records method {name!r} (weights "
                f"{config.get('weights', 'method')!r}), whose {len(wanted)} trained tensor(s) live in that file; "
                "without it the heads would be untrained. Copy the whole artefact directory again, or save it anew "
                "with MTPModule.save_pretrained"
            )
        return
    state = _read_safetensors(weights_file)
    own = method.state_dict()
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            raise ValueError(f"{weights_file}: tensor {key!r} has shape {tuple(tensor.shape)}, but method {name!r} "
                             f"on this backbone has shape {tuple(own[key].shape)}; the file belongs to another "
                             "method configuration or base model")
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not fit method {name!r}: missing keys {missing}, unexpected keys "
                         f"{unexpected}")
    # not strict: heads shared with a zoo entry are not in the file; missing and unexpected keys were checked above
    method.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _load_adapter(backbone, path: Path) -> None:
    """Load the PEFT adapter into ``backbone``; wrong shapes and unexpected keys are one-line errors."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise ValueError(f"{path} was trained with LoRA but holds no adapter at {adapter}")
    state = _read_safetensors(adapter)
    own = get_peft_model_state_dict(backbone)  # the names and shapes the file should have
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            raise ValueError(f"{adapter}: tensor {key!r} has shape {tuple(tensor.shape)}, but the LoRA adapter on "
                             f"this backbone has shape {tuple(own[key].shape)}; the adapter belongs to another LoRA "
                             "configuration or base model")
    result = set_peft_model_state_dict(backbone, state)
    if result.unexpected_keys:
        raise ValueError(f"{adapter} does not fit the backbone: unexpected keys {result.unexpected_keys}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path}: {err}") from None
