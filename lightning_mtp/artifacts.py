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
at the revision the artefact recorded. This is the one loader: :func:`load_artifact` (directories, Hub ids, zoo
names), :func:`load_entry` (a zoo entry) and :func:`load_native_mtp` (a native-MTP checkpoint) all build the module
class they are given (``MTPModule.from_pretrained``, ``zoo.load`` and ``convert.load_native_mtp`` pass theirs), so
this module sits below :mod:`lightning_mtp.module`. The record itself (``mtp_config.json``) is
:mod:`lightning_mtp.record`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

import lightning_mtp.zoo_index as zoo_index
from lightning_mtp.card import model_card
from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import fetch, is_hub_id
from lightning_mtp.io import atomic_dir, atomic_write_text, read_safetensors
from lightning_mtp.methods.registry import resolve_method
from lightning_mtp.native import (
    NATIVE_LAYOUTS,
    detect_native_layout,
    from_native,
    load_native_backbone,
    read_native_mtp_tensors,
)
from lightning_mtp.record import (
    ADAPTER_DIR,
    METHOD_WEIGHTS,
    MTP_CONFIG,
    WEIGHTS_KINDS,
    base_model_record,
    base_revision,
    mtp_record,
    read_mtp_config,
    weights_kind,
)
from lightning_mtp.resolve import is_zoo_name, locate_artifact, resolve_base_reference
from lightning_mtp.zoo_index import HUB_KWARGS, ZooEntry

__all__ = [
    "METHOD_WEIGHTS",
    "MTP_CONFIG",
    "WEIGHTS_KINDS",
    "atomic_dir",
    "atomic_write_text",
    "load_artifact",
    "load_entry",
    "load_native_mtp",
    "read_mtp_config",
    "resolve_base_reference",
    "save_artifact",
]


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
            # Not the embedding matrices: LoRA leaves them frozen, and a row a method adds (the mask token) is rebuilt
            # on load the same way; PEFT's "auto" would write both whole matrices (an 8k-row vocabulary: 8 MB).
            module.backbone.save_pretrained(tmp / ADAPTER_DIR, save_embedding_layers=False)
            (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's blank card: ours is the top-level one
            if dtype is not None:  # PEFT writes the adapter in its training dtype
                adapter = tmp / ADAPTER_DIR / "adapter_model.safetensors"
                save_file(_cast(read_safetensors(adapter), dtype), str(adapter), metadata={"format": "pt"})
        base_ref = resolve_base_reference(module.backbone_ref, target)
        revision = base_revision(module) if not os.path.isdir(str(module.backbone_ref)) else None
        defaults = {"decoding": "speculative", "num_draft_tokens": module.num_draft_tokens}
        defaults.update(getattr(module, "decoding_defaults", None) or {})
        defaults.update(decoding or {})
        config = mtp_record(module, weights=weights_kind(module, full), base_model=base_model_record(module, base_ref, revision),
                            decoding=defaults, metrics=metrics)
        (tmp / MTP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if card:
            (tmp / "README.md").write_text(str(model_card(tmp, config=config, repo_id=target.name)))
    return target


def _resolve_base(path: Path, base_ref: str, base_rev: str | None, hub: dict[str, Any]):
    """The backbone argument for an artefact's base: a local directory, a zoo name, or a loaded native-MTP model."""
    if base_ref and (path / base_ref).is_dir():
        local = (path / base_ref).resolve()
    elif is_zoo_name(base_ref):
        local = zoo_index.weights_path(base_ref, **hub)
    elif is_hub_id(base_ref):
        local = fetch(base_ref, **{**hub, "revision": base_rev or hub.get("revision")})
    else:
        return base_ref  # a path that no longer exists: MTPModule says so
    if detect_native_layout(local) is not None:
        return load_native_backbone(local)
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
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    given = backbone
    name = str(directory)
    if not os.path.isdir(name) and zoo_index.has(name):
        return load_entry(cls, zoo_index.info(name), method_overrides=method_overrides, backbone=backbone, **hub, **kwargs)
    path, hub_id = locate_artifact(directory, hub)
    hub = {k: v for k, v in hub.items() if k != "revision"}  # the artefact's revision does not apply to its base
    if not (path / MTP_CONFIG).is_file():
        if detect_native_layout(path) is not None:
            return load_native_mtp(cls, path, method=method_overrides or None, name_or_path=hub_id, **kwargs)
        module = cls(backbone=backbone or str(path), method=None, **kwargs)
        if hub_id is not None and backbone is None:
            module.backbone_ref = hub_id
        return module
    config = read_mtp_config(path / MTP_CONFIG)
    method = config["method"]
    if method_overrides:
        if method is None:
            raise UserInputError(f"{path} has no method; method options {sorted(method_overrides)} do not apply")
        method = {**method, **method_overrides}
    base = config["base_model"]
    base_ref = base.get("name_or_path") or ""
    weights = config.get("weights")
    if weights == "native":
        module = load_native_mtp(cls, path, method=method, name_or_path=hub_id, **kwargs)
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
        raise UserInputError(
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
            raise UserInputError(
                f"{path} lacks {METHOD_WEIGHTS}: its {MTP_CONFIG} records method {name!r} (weights "
                f"{config.get('weights', 'method')!r}), whose {len(wanted)} trained tensor(s) live in that file; "
                "without it the heads would be untrained. Copy the whole artefact directory again, or save it anew "
                "with MTPModule.save_pretrained"
            )
        return
    state = read_safetensors(weights_file)
    own = method.state_dict()
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            raise UserInputError(f"{weights_file}: tensor {key!r} has shape {tuple(tensor.shape)}, but method {name!r} "
                                 f"on this backbone has shape {tuple(own[key].shape)}; the file belongs to another "
                                 "method configuration or base model")
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserInputError(f"{weights_file} does not fit method {name!r}: missing keys {missing}, unexpected keys "
                             f"{unexpected}")
    # not strict: heads shared with a zoo entry are not in the file; missing and unexpected keys were checked above
    method.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _load_adapter(backbone, path: Path) -> None:
    """Load the PEFT adapter into ``backbone``; wrong shapes and unexpected keys are one-line errors."""
    adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise UserInputError(f"{path} was trained with LoRA but holds no adapter at {adapter}")
    state = read_safetensors(adapter)
    own = get_peft_model_state_dict(backbone)  # the names and shapes the file should have
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            raise UserInputError(f"{adapter}: tensor {key!r} has shape {tuple(tensor.shape)}, but the LoRA adapter on "
                                 f"this backbone has shape {tuple(own[key].shape)}; the adapter belongs to another LoRA "
                                 "configuration or base model")
    result = set_peft_model_state_dict(backbone, state)
    if result.unexpected_keys:
        raise UserInputError(f"{adapter} does not fit the backbone: unexpected keys {result.unexpected_keys}")


def load_entry(
    cls: type,
    entry: ZooEntry,
    *,
    method_overrides: Mapping[str, Any] | None = None,
    backbone: str | PreTrainedModel | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    **module_kwargs: Any,
) -> Any:
    """Build ``cls`` (MTPModule) as a zoo entry describes (see :func:`lightning_mtp.zoo.load`, which also sorts
    keyword arguments)."""

    hub = dict(token=token, endpoint=endpoint, cache_dir=cache_dir, local_files_only=local_files_only)
    fmt = entry.weights["format"]
    overrides = dict(method_overrides or {})
    method = None if entry.method is None else {**entry.method, **overrides}
    if entry.method is None and overrides:
        raise UserInputError(f"zoo entry {entry.name!r} has no method; method options {sorted(overrides)} do not apply")
    if fmt == "artifact":
        directory = zoo_index.weights_location(entry, revision, hub)
        saved = read_mtp_config(directory / MTP_CONFIG)["method"] if (directory / MTP_CONFIG).is_file() else None
        if saved is not None and entry.method is not None:
            ours, theirs = entry.method_config(), resolve_method(saved)
            if ours.to_dict() != theirs.to_dict():
                raise UserInputError(f"{entry.origin}: field 'method' {entry.method} disagrees with the artefact's {saved}")
        if backbone is None:
            base_dir, base_ref, base_rev = zoo_index.base_location(entry, None, hub)
            backbone = load_native_backbone(base_dir) if detect_native_layout(base_dir) else str(base_dir)
        else:
            base_ref, base_rev = None, None
        module = load_artifact(cls, directory, backbone=backbone[0] if isinstance(backbone, tuple) else backbone,
                               method_overrides=overrides or None, **module_kwargs)
        if isinstance(backbone, tuple):
            module.tokenizer = backbone[1]
        if base_ref is not None:
            module.backbone_ref, module.base_revision = base_ref, base_rev
    else:
        directory, ref, rev = zoo_index.base_location(entry, revision, hub)
        if fmt == "native_mtp":
            module = load_native_mtp(cls, directory, method=method, name_or_path=ref, **module_kwargs)
        else:
            module = cls(backbone=backbone if backbone is not None else str(directory), method=method,
                               **module_kwargs)
            if backbone is None:
                module.backbone_ref = ref
        module.base_revision = rev
    defaults = {"decoding": "speculative", "num_draft_tokens": module.num_draft_tokens}
    module.decoding_defaults = {**defaults, **(getattr(module, "decoding_defaults", None) or {}), **entry.decoding}
    return module


def load_native_mtp(
    cls: type,
    directory: str | os.PathLike,
    *,
    method: str | dict | None = None,
    mtp_layer: int | None = None,
    dtype: str | torch.dtype = "auto",
    name_or_path: str | None = None,
    **module_kwargs: Any,
) -> Any:
    """A ``cls`` (MTPModule) whose backbone and heads come from a native-MTP checkpoint directory.

    ``method``: a fast_mtp config (one shared head; default: the layout's, e.g. one draft step for MiMo; the fields
    it leaves out that the layout sets, such as MiMo's ``recurse_on_normed``, are the layout's, so the head still
    runs as the engines run it) or an mtp_d config (one head per native layer, in order; its ``num_heads`` is the number of layers).
    ``mtp_layer``: which native MTP layer becomes the shared fast_mtp head when the checkpoint holds several.
    ``name_or_path``: how saved artefacts refer to this base (e.g. its Hub id); default: the directory.
    """
    directory = Path(directory)
    layout = detect_native_layout(directory)
    if layout is None:
        raise UserInputError(f"{directory} is not a model with a native MTP layer (layouts: {sorted(NATIVE_LAYOUTS)})")
    lay = NATIVE_LAYOUTS[layout]
    layers = read_native_mtp_tensors(directory, layout)
    config = _native_method(lay, method, len(layers))
    model, tokenizer = load_native_backbone(directory, dtype=dtype)
    if lay.head_layer_at_offset:  # the head's decoder layer has the shape of the native one (MoE past first_k_dense)
        config.head_layer = model.config.num_hidden_layers
    module = cls(model, method=config, **module_kwargs)
    module.tokenizer = tokenizer
    module.backbone_ref = name_or_path or str(directory)
    chosen = _chosen_layers(directory, layers, config, mtp_layer)
    own = module.method.state_dict()
    fused = any(k.endswith("experts.gate_up_proj") for k in own)
    state = {}
    for into, index in chosen:
        _check_backbone_copies(lay, layers[index], module.parts, directory)
        tensors = {k: v for k, v in layers[index].items() if k not in dict(lay.shared)}
        state.update(from_native(tensors, layout, into=into, fuse_experts=fused))
    missing = sorted(set(own) - set(state))
    if missing:
        raise UserInputError(f"the native {layout} MTP layers {[i for _, i in chosen]} of {directory} lack tensors for "
                             f"{missing}")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserInputError(f"native tensor for {key} has shape {tuple(value.shape)}, our head expects "
                                 f"{tuple(own[key].shape)}")
    module.method.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return module.eval()


def _native_method(lay, method: str | dict | None, num_layers: int):
    """The method config a native checkpoint converts to: fast_mtp (the layout's default) or mtp_d (one head a layer)."""
    if num_layers == 0:
        raise UserInputError(f"the checkpoint declares a native {lay.name} MTP layer but its weights hold none")
    if isinstance(method, str) and method == "mtp_d" or isinstance(method, dict) and method.get("name") == "mtp_d":
        base = {"name": "mtp_d"} if isinstance(method, str) else dict(method)
        config = resolve_method({**base, "num_heads": num_layers})
    elif isinstance(method, dict) and method.get("name") == lay.default_method["name"]:
        config = resolve_method({**lay.default_method, **method})  # what the engines run, unless overridden
    else:
        config = resolve_method(method if method is not None else dict(lay.default_method))
    if config is None or config.name not in ("fast_mtp", "mtp_d"):
        raise UserInputError(f"native {lay.name} MTP layers convert to the 'fast_mtp' or 'mtp_d' method, got "
                             f"{None if config is None else config.name!r}")
    if getattr(config, "draft_vocab_size", None) is not None:
        raise UserInputError("fast_mtp draft_vocab_size (vocabulary compression) needs the token subset of training; "
                             "convert with draft_vocab_size=None")
    return config


def _chosen_layers(directory: Path, layers: dict, config, mtp_layer: int | None) -> list[tuple[str, int]]:
    """``[(head key prefix, native layer index)]``: every layer in order for mtp_d, the one shared head for fast_mtp."""
    if config.name == "mtp_d":
        if sorted(layers) != list(range(len(layers))):
            raise UserInputError(f"{directory} holds native MTP layers {sorted(layers)}; mtp_d needs layers 0..K-1")
        return [(f"heads.{k}.", k) for k in range(len(layers))]
    if mtp_layer is None:
        if len(layers) > 1:
            raise UserInputError(f"{directory} holds {len(layers)} native MTP layers {sorted(layers)}; fast_mtp uses one "
                                 "shared head: choose it with mtp_layer=, or load them all as method='mtp_d'")
        mtp_layer = next(iter(layers))
    if mtp_layer not in layers:
        raise UserInputError(f"mtp_layer {mtp_layer} not in {directory}; it holds layers {sorted(layers)}")
    return [("block.", mtp_layer)]


def _check_backbone_copies(lay, tensors: dict[str, torch.Tensor], parts, directory: Path) -> None:
    """A layout whose MTP layers store their own embedding / output head (DeepSeek-V3): ours share the backbone's,
    so the copies must equal it."""
    for key, what in lay.shared:
        if key in tensors and not torch.equal(tensors[key].to(getattr(parts, what).weight.dtype),
                                              getattr(parts, what).weight.detach()):
            raise UserInputError(f"{directory}: the native MTP layer's {key} differs from the backbone's {what}; our heads "
                                 "share the backbone's embedding and output head, so this layer cannot be converted")
