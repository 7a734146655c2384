"""What a Lightning checkpoint of an :class:`~lightning_mtp.MTPModule` holds, and what it must match to be loaded.

Only what trains. ``MTPModule.state_dict()``, hence every Lightning checkpoint (one device, DDP, and Lightning's
FSDP with full or sharded state dicts, where the same filter runs on the FSDP wrapper), holds

- the method's whole state (its heads and buffers, frozen heads of a looped extension included: they are small,
  and a resume must not depend on re-reading ``init_from``);
- the backbone's parameters that train: the LoRA adapter (and PEFT trainable tokens), or the whole backbone
  (buffers included) when its own weights train (full fine-tuning, ``method=None``, mask_token's default);

and never the frozen backbone weights, which the module reads again from its ``backbone`` reference when it is
built, nor a teacher copy (methods keep teachers outside the module tree; see mask_token). Optimizer and scheduler
state come from Lightning and cover the trainable parameters only (the optimizer is given nothing else). Loading
a state dict forgives exactly the frozen keys it does not hold; a missing trained key is still an error.

Identity. ``on_save_checkpoint`` records :func:`run_identity` under ``checkpoint["lightning_mtp"]``: the base
model (reference, revision, vocabulary and hidden size, model type), the method and its configuration, the LoRA
configuration and which weights train. :func:`check_identity` refuses, with one ``ValueError`` naming every
difference, to load a checkpoint into a module built from another base or method.

Parameter names are compared without the wrappers that strategies insert (FSDP's ``_fsdp_wrapped_module``,
activation checkpointing's ``_checkpoint_wrapped_module``, ``torch.compile``'s ``_orig_mod``), so the same keys
come out on one device and under FSDP with ``use_orig_params=True`` (Lightning's default). FSDP without
``use_orig_params`` hides the original parameters behind flat ones: the state dict is then left whole.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from lightning_mtp.errors import UserInputError
from lightning_mtp.record import (
    IDENTITY_FIELDS,
    LEGACY_WEIGHTS,
    base_model_record,
    base_revision,
    mtp_record,
    weights_kind,
)

__all__ = [
    "IDENTITY_KEY",
    "check_identity",
    "checkpoint_tensors_bytes",
    "clean_name",
    "install_on_wrapper",
    "install_trained_state_dict",
    "run_identity",
    "trained_keys",
]

IDENTITY_KEY = "lightning_mtp"
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter or state-dict name without the wrapper segments strategies insert."""
    for segment in _WRAPPERS:
        name = name.replace(segment, "")
    return name


def _trainable(module) -> set[str] | None:
    """Clean names of the module's trainable parameters; None when FSDP flat parameters hide them."""
    names = set()
    for name, p in module.named_parameters():
        if name.endswith("_flat_param"):
            return None
        if p.requires_grad:
            names.add(clean_name(name))
    return names


def _is_frozen_key(module, key: str, trainable: set[str]) -> bool:
    """``key`` (clean, relative to the module) belongs to the backbone and does not train."""
    return key.startswith("backbone.") and not module.trains_backbone_weights and key not in trainable


def _fsdp_wrapped(module) -> bool:
    """Is ``module`` inside Lightning's FSDP (FSDP units among its submodules, or an FSDP strategy attached)?"""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return True
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and type(trainer.strategy).__name__ == "FSDPStrategy"


def _drop_frozen_keys(module, state_dict: dict[str, Any], prefix: str) -> None:
    trainable = _trainable(module)
    if trainable is None:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if _is_frozen_key(module, clean_name(key[len(prefix):]), trainable):
            del state_dict[key]


def _drop_frozen(module, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of the module: remove the frozen backbone entries (in place).

    Not under FSDP: the root FSDP unit checks, after its children's hooks ran, that every parameter it manages
    is in the state dict; there the same filter runs on the wrapper instead (:func:`install_on_wrapper`).
    """
    if not _fsdp_wrapped(module):
        _drop_frozen_keys(module, state_dict, prefix)


def _drop_frozen_at_root(module, root, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of the outermost wrapper (after FSDP's own hooks): the filter of ``module``."""
    _drop_frozen_keys(module, state_dict, prefix)


def _note_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook: remember where this module's keys start, for :func:`_forgive_frozen`."""
    module._load_prefix = prefix


def _forgive_frozen(module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: frozen backbone keys are absent by design, not missing."""
    prefix = clean_name(getattr(module, "_load_prefix", ""))  # FSDP reports missing keys by their clean names
    trainable = _trainable(module)
    if trainable is None:
        return

    def frozen(key: str) -> bool:
        key = clean_name(key)
        return key.startswith(prefix) and _is_frozen_key(module, key[len(prefix):], trainable)

    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not frozen(k)]


def install_trained_state_dict(module) -> None:
    """Make ``module.state_dict()`` hold only what trains and ``load_state_dict`` accept exactly that (see above)."""
    module.register_state_dict_post_hook(_drop_frozen)
    module.register_load_state_dict_pre_hook(_note_prefix)
    module.register_load_state_dict_post_hook(_forgive_frozen)


def install_on_wrapper(module, wrapper) -> None:
    """Filter the state dict of ``wrapper`` (the FSDP root a strategy wrapped ``module`` in) as ``module``'s own.

    Lightning's FSDP checkpoints call the wrapper's ``state_dict`` (full or sharded) and use it as the template
    that sharded checkpoints load into; ``MTPModule.on_fit_start`` calls this once the strategy has wrapped the
    module and before a checkpoint is restored. Other wrappers (DDP) are left alone: their checkpoints come from
    the module itself.
    """
    if wrapper is module or wrapper is None or not _fsdp_wrapped(module) or getattr(wrapper, "_mtp_filtered", False):
        return
    wrapper.register_state_dict_post_hook(functools.partial(_drop_frozen_at_root, module))
    wrapper._mtp_filtered = True


def trained_keys(module) -> list[str]:
    """The state-dict keys a checkpoint of ``module`` holds (what :func:`install_trained_state_dict` keeps)."""
    return list(module.state_dict())


# ---------------------------------------------------------------------------------------------- identity
def _reference(ref: str) -> str:
    """A base reference as compared: a local directory by its name (a run may move to a machine that keeps its
    models elsewhere; vocabulary, hidden size and model type are compared too), zoo names and Hub ids as given."""
    if ref and os.path.isdir(ref):
        return Path(ref).resolve().name
    return ref


def run_identity(module) -> dict[str, Any]:
    """What a checkpoint of ``module`` must match to be loaded into another module (plain JSON-like values): the
    identity fields of its artefact record, with the base named as checkpoints name it."""
    base = base_model_record(module, _reference(module.backbone_ref), base_revision(module))
    record = mtp_record(module, weights=weights_kind(module, module.trains_backbone_weights), base_model=base)
    return {key: record[key] for key in IDENTITY_FIELDS}


def _describe(identity: dict[str, Any]) -> str:
    base = identity["base_model"]
    method = identity.get("method")
    what = "plain next-token training" if method is None else f"method {method.get('name')!r}"
    return (f"base {base.get('name_or_path') or '(unnamed)'!r} (vocab {base.get('vocab_size')}, hidden "
            f"{base.get('hidden_size')}, {base.get('model_type')}), {what}, weights {identity.get('weights')!r}")


def _differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    out = []
    sb, mb = saved.get("base_model") or {}, mine["base_model"]
    for field in ("vocab_size", "hidden_size", "model_type"):
        if sb.get(field) != mb[field]:
            out.append(f"base {field}: checkpoint {sb.get(field)!r}, this module {mb[field]!r}")
    for field in ("name_or_path", "revision"):  # compared when both sides know them
        if sb.get(field) and mb[field] and sb[field] != mb[field]:
            out.append(f"base {field}: checkpoint {sb[field]!r}, this module {mb[field]!r}")
    sm, mm = saved.get("method"), mine["method"]
    if (sm or {}).get("name") != (mm or {}).get("name"):
        out.append(f"method: checkpoint {(sm or {}).get('name')!r}, this module {(mm or {}).get('name')!r}")
    elif sm != mm:
        keys = sorted(k for k in set(sm) | set(mm) if sm.get(k) != mm.get(k))
        out.extend(f"method option {k}: checkpoint {sm.get(k)!r}, this module {mm.get(k)!r}" for k in keys)
    if saved.get("lora") != mine["lora"]:
        out.append(f"lora: checkpoint {saved.get('lora')!r}, this module {mine['lora']!r}")
    if LEGACY_WEIGHTS.get(saved.get("weights"), saved.get("weights")) != mine["weights"]:
        out.append(f"trained weights: checkpoint {saved.get('weights')!r}, this module {mine['weights']!r}")
    return out


def check_identity(module, checkpoint: dict[str, Any]) -> None:
    """Refuse, with one ``ValueError``, a checkpoint written for another base model, method or LoRA set-up, or one
    that lacks trained weights ``module`` needs."""
    saved = checkpoint.get(IDENTITY_KEY)
    if not isinstance(saved, dict) or "base_model" not in saved:
        raise UserInputError("this checkpoint was not written by a lightning-mtp MTPModule (it has no "
                             f"{IDENTITY_KEY!r} record): resume only from checkpoints of an MTPModule fit")
    mine = run_identity(module)
    diffs = _differences(saved, mine)
    if diffs:
        raise UserInputError(f"the checkpoint belongs to another run: it was written for {_describe(saved)}, but this "
                             f"module is {_describe(mine)}. Differences: {'; '.join(diffs)}. Resume with the same model "
                             "and method settings as the checkpoint, or start a new run without ckpt_path")
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):  # FSDP loads the weights itself before this hook; then there is nothing to see
        wanted = set(trained_keys(module))
        missing = sorted(wanted - set(state))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserInputError(f"the checkpoint lacks {len(missing)} trained weight(s) of this module: {shown}")


def checkpoint_tensors_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in a (nested) checkpoint structure: for measuring what a checkpoint holds."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(checkpoint_tensors_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(checkpoint_tensors_bytes(v) for v in state)
    return 0
