"""Native MTP layers of released checkpoints <-> our FastMTP head: build a module from one, export one.

The layouts, key mapping and backbone loading are :mod:`lightning_mtp.native` (re-exported here); this face
builds :class:`~lightning_mtp.MTPModule` from them and exports a trained one back.

Some models ship their own MTP layer inside the checkpoint. MiMo-7B (``XiaomiMiMo/MiMo-7B-RL``) and FastMTP
(``TencentBAC/FastMTP``, MiMo-7B-RL with a fine-tuned MTP layer) store it under ``model.mtp_layers.0.*``::

    token_layernorm, hidden_layernorm    RMSNorm of the next token's embedding / of the previous hidden state
    input_proj                           Linear 2H -> H on cat([hidden, embedding])   (hidden FIRST)
    input_layernorm, self_attn.*, post_attention_layernorm, mlp.*    one Qwen2 decoder layer
    final_layernorm                      RMSNorm before the shared lm_head

MiMo's backbone is exactly Qwen2 (``model.layers.*``, q/k/v biases); only its ``model_type`` ("mimo") needs
remote code in transformers. We load it as ``Qwen2ForCausalLM`` from the same files (no remote code) and map
the MTP layer onto :class:`~lightning_mtp.methods.mtp_block.MTPBlock`: ``enorm``/``hnorm``/``proj``/``layer``/
``final_norm``. Our ``proj`` takes cat([embedding, hidden]) (DeepSeek-V3's order), so the two column halves
of ``input_proj`` swap. Every tensor under the prefix is mapped and every head parameter is filled, or the
conversion stops naming the key.

Decoding note: MiMo (and SGLang/vLLM serving it) feed the *final-normed* MTP output back in for further draft
steps, so converted heads set ``recurse_on_normed=True`` and draft exactly as the engines do.

:func:`export_native` goes the other way: a FastMTP head trained with lightning-mtp on a Qwen2-architecture
base becomes a MiMo-layout model directory that vLLM and SGLang serve with their MTP speculative decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import lightning_mtp.artifacts as artifacts
from lightning_mtp.errors import UserInputError
from lightning_mtp.io import atomic_dir
from lightning_mtp.module import MTPModule
from lightning_mtp.native import (
    NATIVE_LAYOUTS,
    NativeLayout,
    detect_native_layout,
    from_native,
    load_native_backbone,
    native_layout,
    read_native_mtp_tensors,
    serving_snippet,
    to_native,
)
from lightning_mtp.record import MTP_CONFIG, base_model_record, mtp_record

__all__ = [
    "NATIVE_LAYOUTS",
    "NativeLayout",
    "detect_native_layout",
    "export_native",
    "from_native",
    "load_native_backbone",
    "load_native_mtp",
    "read_native_mtp_tensors",
    "serving_snippet",
    "to_native",
]


def load_native_mtp(directory: str | os.PathLike, **kwargs: Any) -> MTPModule:
    """An MTPModule whose backbone and FastMTP head come from a native-MTP checkpoint directory.

    ``kwargs``: ``method`` (a fast_mtp config; default: the layout's), ``mtp_layer`` (which native layer becomes
    the shared head), ``dtype``, ``name_or_path`` (how saved artefacts refer to this base) and MTPModule
    arguments; see :func:`lightning_mtp.artifacts.load_native_mtp`.
    """
    return artifacts.load_native_mtp(MTPModule, directory, **kwargs)


# ------------------------------------------------------------------------------------------ export


def export_native(module: MTPModule, directory: str | os.PathLike, layout: str = "mimo") -> Path:
    """Write ``module`` (backbone + trained FastMTP head) as a ``layout`` model directory engines serve natively.

    Needs a backbone of the layout's architecture (Qwen2 for MiMo), a fast_mtp method and no vocabulary
    compression or LoRA. The directory also holds ``mtp_config.json``, so lightning-mtp loads it back.
    """
    lay = native_layout(layout)
    base = module.base_model
    if module.method is None or module.method_config.name != "fast_mtp":
        raise UserInputError(f"export to the {layout} layout needs a fast_mtp module, got "
                             f"{None if module.method is None else module.method_config.name!r}")
    if module.method.draft_ids is not None or module.lora is not None:
        raise UserInputError(f"export to the {layout} layout supports neither vocabulary compression nor LoRA")
    if base.config.model_type != lay.backbone_model_type:
        raise UserInputError(f"the {layout} layout needs a {lay.backbone_model_type!r} backbone, this one is "
                             f"{base.config.model_type!r}")
    state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    if base.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    native = to_native(module.method.state_dict(), layout)
    state.update({f"{lay.prefix}0.{k}": v.detach().contiguous() for k, v in native.items()})
    config = base.config.to_dict()
    config.update(model_type=layout, architectures=[lay.architecture], num_nextn_predict_layers=1)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])  # engines that read the pre-v5 key
    target = Path(directory)
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if base.generation_config is not None:
            base.generation_config.save_pretrained(tmp)
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(tmp)
        base_model = base_model_record(module, ".", None, model_type=layout)
        mtp = mtp_record(module, weights="native", native_layout=layout, base_model=base_model,
                         decoding={"decoding": "speculative", "num_draft_tokens": module.num_draft_tokens})
        (tmp / MTP_CONFIG).write_text(json.dumps(mtp, indent=2) + "\n")
    return target
