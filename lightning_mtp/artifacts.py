"""The artefact format: what ``MTPModule.save_pretrained`` writes and ``from_pretrained`` reads.

Only what was trained is saved, next to ``mtp_config.json``::

    mtp_config.json          method and its config, LoRA config, base model (name, vocab and hidden size),
                             what the weights are, decoding defaults, metrics, library version
    mtp_method.safetensors   the method's own parameters (heads), when it has any
    adapter/                 the PEFT LoRA adapter, when one was trained
    config.json, model.safetensors, tokenizer files
                             the whole backbone, only when its own weights trained (full fine-tuning); the
                             artefact is then a loadable Hugging Face model directory too

A backbone trained with no method and no LoRA (``method=None``) is saved as a plain Hugging Face model
directory, with no ``mtp_config.json``. Every write goes to a temporary sibling directory that replaces
the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lightning_mtp.backbone import ZOO_DIR, resolve_model_path

__all__ = [
    "METHOD_WEIGHTS",
    "MTP_CONFIG",
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


def save_artifact(module, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,
                  metrics: dict | None = None) -> Path:
    """Write ``module`` (an MTPModule) to ``save_directory``; see the module docstring for the layout."""
    from lightning_mtp import __version__

    target = Path(save_directory)
    with atomic_dir(target) as tmp:
        if module.method is None and module.lora is None:
            _save_backbone(module, tmp, dtype)
            return target
        full = module.trains_backbone_weights
        if full:
            _save_backbone(module, tmp, dtype)
        tensors = {} if module.method is None else {k: v.detach().contiguous() for k, v in module.method.state_dict().items()}
        if tensors:
            save_file(_cast(tensors, dtype), str(tmp / METHOD_WEIGHTS), metadata={"format": "pt"})
        if module.lora is not None:
            module.backbone.save_pretrained(tmp / ADAPTER_DIR)
        base = module._base_model
        config = {
            "library": "lightning-mtp",
            "library_version": __version__,
            "method": None if module.method_config is None else module.method_config.to_dict(),
            "lora": module.lora,
            "weights": "full" if full else ("method+adapter" if module.lora is not None else "method"),
            "base_model": {
                "name_or_path": resolve_base_reference(module.backbone_ref, target),
                "vocab_size": module.parts.vocab_size,
                "hidden_size": module.parts.hidden_size,
                "model_type": base.config.model_type,
            },
            "decoding": {"num_draft_tokens": module.num_draft_tokens},
            "metrics": metrics or {},
        }
        (tmp / MTP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return target


def load_artifact(cls, directory: str | os.PathLike, *, backbone=None, **kwargs: Any):
    """Build ``cls`` (MTPModule) from an artefact directory or a plain Hugging Face model directory."""
    path = Path(resolve_model_path(str(directory)))
    if not (path / MTP_CONFIG).is_file():
        if not path.is_dir():
            raise ValueError(f"{str(directory)!r} is not a local directory; download it first or give a zoo name")
        return cls(backbone=backbone or str(path), method=None, **kwargs)
    config = read_mtp_config(path / MTP_CONFIG)
    base_ref = config["base_model"]["name_or_path"]
    full = config.get("weights") == "full"
    if backbone is None:
        if full:
            backbone = str(path)
        else:
            backbone = str((path / base_ref).resolve()) if base_ref and (path / base_ref).is_dir() else base_ref
    if full:
        kwargs.setdefault("freeze_backbone", False)
    module = cls(backbone=backbone, method=config["method"], lora=config.get("lora"), **kwargs)
    if isinstance(backbone, str):
        module.backbone_ref = base_ref
    want_v, want_h = config["base_model"]["vocab_size"], config["base_model"]["hidden_size"]
    if (module.parts.vocab_size, module.parts.hidden_size) != (want_v, want_h):
        raise ValueError(
            f"{path} was trained on a base with vocab {want_v} and hidden size {want_h}, but the backbone "
            f"{base_ref!r} has vocab {module.parts.vocab_size} and hidden size {module.parts.hidden_size}"
        )
    weights = path / METHOD_WEIGHTS
    if module.method is not None and weights.is_file():
        state = _read_safetensors(weights)
        own = module.method.state_dict()
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
        missing, unexpected = module.method.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit method {config['method']['name']!r}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
    adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
    if module.lora is not None:
        if not adapter.is_file():
            raise ValueError(f"{path} was trained with LoRA but holds no adapter at {adapter}")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module.backbone, _read_safetensors(adapter))
        if result.unexpected_keys:
            raise ValueError(f"{adapter} does not fit the backbone: unexpected keys {result.unexpected_keys}")
    return module


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path}: {err}") from None
