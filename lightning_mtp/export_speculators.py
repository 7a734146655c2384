"""Export a trained head as a `speculators <https://github.com/vllm-project/speculators>`_ draft model directory,
which ``vllm serve DIR`` configures its speculative decoding from.

The ``mtp`` type of speculators (checked against speculators 0.9.0, its ``MTPSpeculatorConfig`` and
``MTPDraftModel``) is one MTP layer over the verifier's last hidden state and the next token's embedding::

    mtp_layers.0.token_layernorm, hidden_layernorm    RMSNorm of the embedding / of the hidden state
    mtp_layers.0.input_proj                           Linear 2H -> H on cat([embedding, hidden])
    mtp_layers.0.input_layernorm, self_attn.*, ...    one decoder layer of the verifier's architecture
    mtp_layers.0.final_layernorm                      RMSNorm before the verifier's lm_head

applied ``speculative_tokens`` times, each step fed the previous step's final-normed output. That is our
:class:`~lightning_mtp.methods.mtp_block.MTPBlock` (same concatenation order) with ``recurse_on_normed=True``.
The embedding and output head are not written: speculators reads them from the verifier named in the config.

What maps: a FastMTP head (its ``num_steps`` become ``speculative_tokens``); of MTP-D only the first head, since the
format holds one layer (``num_nextn_predict_layers`` must be 1), as a one-token draft. The verifier's
``model_type`` must be one speculators builds an MTP layer for (:data:`SPECULATORS_MTP_MODEL_TYPES`).

The ``eagle3`` type (its ``Eagle3SpeculatorConfig`` and ``Eagle3DraftModel``; vLLM serves it as
``Eagle3LlamaForCausalLM``) is what our :mod:`~lightning_mtp.methods.eagle3` draft model is, tensor for tensor:
``fc``, ``layers.0.*`` (a Llama layer whose q/k/v read 2H, with ``hidden_norm``), ``norm``, and ``lm_head`` (the
verifier's output rows for the draft vocabulary), with ``d2t`` (draft index -> target id offset) and ``t2d`` (the
target ids in the draft vocabulary) when the vocabulary is compressed. Any verifier architecture exports: the draft
layer is a Llama layer whatever the verifier is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_mtp.errors import UserInputError
from lightning_mtp.hub_transport import is_hub_id
from lightning_mtp.io import atomic_dir
from lightning_mtp.module import MTPModule
from lightning_mtp.native import (
    DECODER_LAYER_RENAMES,
    SPECULATORS_MTP_MODEL_TYPES,
    SPECULATORS_VERSION,
    rename_block,
)

__all__ = ["SPECULATORS_MTP_MODEL_TYPES", "SPECULATORS_VERSION", "export_speculators"]

_RENAMES = (("token_layernorm.", "enorm."), ("hidden_layernorm.", "hnorm."), ("input_proj.", "proj."),
            ("final_layernorm.", "final_norm."), *DECODER_LAYER_RENAMES)


def export_speculators(module: MTPModule, directory: str | os.PathLike, verifier: str | None = None) -> Path:
    """Write ``module``'s head as a speculators draft model in ``directory`` (``eagle3`` for an EAGLE-3 module,
    ``mtp`` for FastMTP and MTP-D); returns it.

    ``verifier`` is what the config names as the model the draft serves (a Hub id or a directory, as vLLM loads
    it); default: the module's backbone reference, when it is one of those. Refused with one clear error before
    anything is written: another method, LoRA not merged, vocabulary compression, an architecture speculators has
    no MTP layer for, a FastMTP head trained to recurse on its output before the final norm.
    """
    _check_exportable(module)
    name_or_path = _verifier(module, verifier)
    tensors, config = (_eagle3(module, name_or_path) if module.method_config.name == "eagle3"
                       else _mtp(module, name_or_path))
    target = Path(directory)
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def _speculators_config(algorithm: str, steps: int, base, name_or_path: str) -> dict:
    return {
        "algorithm": algorithm,
        "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": steps, "accept_tolerance": 0.0,
                              "verifier_accept_k": 1}],
        "verifier": {"name_or_path": name_or_path, "architectures": list(base.config.architectures or [])},
    }


def _eagle3(module: MTPModule, name_or_path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An EAGLE-3 draft model's tensors and config: our names are speculators' names."""
    method, parts = module.method, module.parts
    tensors = {k: v.detach().contiguous() for k, v in method.state_dict().items() if k != "draft_ids"}
    rows = parts.lm_head.weight if method.draft_ids is None else parts.lm_head.weight[method.draft_ids]
    tensors["lm_head.weight"] = rows.detach().contiguous()  # (V', H) the verifier's rows, frozen in training
    if method.draft_ids is not None:
        tensors["d2t"] = (method.draft_ids - torch.arange(len(method.draft_ids))).contiguous()  # target = draft + d2t
        t2d = torch.zeros(parts.vocab_size, dtype=torch.bool)
        t2d[method.draft_ids] = True
        tensors["t2d"] = t2d
    cfg = method.config
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": method.layer_config.to_diff_dict(),
        "draft_vocab_size": parts.vocab_size if method.draft_ids is None else len(method.draft_ids),
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
        "speculators_config": _speculators_config("eagle3", cfg.speculative_tokens, module.base_model, name_or_path),
    }
    return tensors, config


def _mtp(module: MTPModule, name_or_path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An MTP draft model's tensors and config: the head's block renamed as speculators names an MTP layer."""
    prefix, steps = _exported_head(module)
    base = module.base_model
    block = {k[len(prefix):]: v.detach().contiguous() for k, v in module.method.state_dict().items()
             if k.startswith(prefix)}
    tensors = {"mtp_layers.0." + k: v for k, v in rename_block(block, _RENAMES, False, "a speculators MTP layer").items()}
    layer_config = base.config.to_diff_dict()
    layer_config.pop("auto_map", None)
    config = {
        "architectures": ["MTPDraftModel"],
        "speculators_model_type": "mtp",
        "speculators_version": SPECULATORS_VERSION,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "transformer_layer_config": layer_config,
        "speculators_config": _speculators_config("mtp", steps, base, name_or_path),
    }
    return tensors, config


def _check_exportable(module: MTPModule) -> None:
    """Refuse, before anything is written, what no speculators format carries."""
    name = None if module.method is None else module.method_config.name
    if name not in ("fast_mtp", "mtp_d", "eagle3"):
        raise UserInputError(f"export to speculators needs a fast_mtp, mtp_d or eagle3 module, got {name!r}; "
                             "mask_token models export as 'parallel_draft' or 'hf'")
    if module.lora is not None:
        raise UserInputError("export to speculators: the module has a LoRA adapter; call module.merge_lora() first")
    if name == "eagle3" and module.parts.lm_head.bias is not None:
        raise UserInputError("export to speculators: the backbone's output layer has a bias, which speculators' "
                             "EAGLE-3 lm_head has no place for")


def _exported_head(module: MTPModule) -> tuple[str, int]:
    """The head's key prefix and the draft steps it serves, after every check that the format carries it exactly."""
    name = module.method_config.name
    where = "export to speculators"
    if getattr(module.method, "draft_ids", None) is not None:
        raise UserInputError(f"{where}: the head uses vocabulary compression (draft_vocab_size), which speculators' MTP "
                             "does not support; train with draft_vocab_size: null")
    model_type = module.base_model.config.model_type
    if model_type not in SPECULATORS_MTP_MODEL_TYPES:
        raise UserInputError(f"{where}: speculators {SPECULATORS_VERSION} builds MTP layers for "
                             f"{list(SPECULATORS_MTP_MODEL_TYPES)} only, this backbone is {model_type!r}")
    cfg = module.method_config
    if name == "mtp_d":  # one layer per format: the first head, drafting one token
        return "heads.0.", 1
    if cfg.num_steps > 1 and not cfg.recurse_on_normed:
        raise UserInputError(f"{where}: speculators feeds each further draft step the layer's final-normed output, this "
                             "head was trained with recurse_on_normed=False; train with method.recurse_on_normed: "
                             "true, or set num_steps: 1")
    return "block.", cfg.num_steps


def _verifier(module: MTPModule, verifier: str | None) -> str:
    """What the config names as the verifier: ``verifier``, else the backbone's reference or the directory it was
    loaded from, whichever vLLM can load (a Hub id or a directory)."""
    candidates = [verifier] if verifier is not None else [module.backbone_ref, module.base_model.name_or_path]
    for ref in candidates:
        if isinstance(ref, str) and ref and os.path.isdir(ref):
            return str(Path(ref).resolve())
        if isinstance(ref, str) and is_hub_id(ref):
            return ref
    raise UserInputError(f"export to speculators: the verifier {candidates[0]!r} is neither a Hub id nor a directory; "
                         "name the base model the draft serves with verifier= (--verifier)")
