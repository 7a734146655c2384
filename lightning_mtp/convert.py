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
import math
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

import lightning_mtp.artifacts as artifacts
from lightning_mtp.commands import CommandParser
from lightning_mtp.errors import UserInputError
from lightning_mtp.export_speculators import export_speculators
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
    "EXPORT_FORMATS",
    "NATIVE_LAYOUTS",
    "NativeLayout",
    "detect_native_layout",
    "export",
    "export_mask_token",
    "export_native",
    "from_native",
    "load_native_backbone",
    "load_native_mtp",
    "main",
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

EXPORT_FORMATS = (*NATIVE_LAYOUTS, "speculators", "parallel_draft", "hf")
"""What :func:`export` writes: the native MTP layouts (a base with its MTP layers, as the engines serve them),
``speculators`` (a draft model directory that ``vllm serve`` configures itself from), and for mask-token models
``parallel_draft`` (a vLLM parallel-drafting draft model) and ``hf`` (a plain model, for any engine)."""


def export(module: MTPModule, fmt: str, directory: str | os.PathLike, verifier: str | None = None) -> Path:
    """Write ``module`` in the serving format ``fmt`` (one of :data:`EXPORT_FORMATS`) to ``directory``; returns it.
    A head that does not map exactly onto the format is refused with the mismatch named (see :func:`export_native`
    and :func:`~lightning_mtp.export_speculators.export_speculators`, which takes ``verifier``)."""
    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    if fmt == "speculators":
        return export_speculators(module, directory, verifier=verifier)
    if fmt in ("parallel_draft", "hf"):
        return export_mask_token(module, directory, parallel_draft=fmt == "parallel_draft")
    if verifier is not None:
        raise UserInputError(f"verifier names the base of a speculators draft; the {fmt!r} layout holds its base itself")
    return export_native(module, directory, layout=fmt)


def _load_source(source: str) -> MTPModule:
    """A run's Lightning checkpoint (``.ckpt``), or what :meth:`MTPModule.from_pretrained` loads (an artefact
    directory such as a run's export dir, a zoo name, a Hub id)."""
    if Path(source).is_file() and Path(source).suffix == ".ckpt":
        return MTPModule.load_from_checkpoint(source, map_location="cpu", weights_only=True)
    return MTPModule.from_pretrained(source)


def main(argv: list[str]) -> None:
    """``lightning-mtp export RUN_OR_ARTEFACT --format FORMAT --out DIR``: write a trained model as engines serve it."""
    parser = CommandParser(prog="lightning-mtp export", description=main.__doc__.splitlines()[0])
    parser.add_argument("source", help="an artefact directory, zoo name or Hub id, or a run's Lightning .ckpt")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the serving format to write")
    parser.add_argument("--out", required=True, help="the directory to write (replaced whole, never half-written)")
    parser.add_argument("--verifier", default=None,
                        help="speculators only: the base model the draft serves, as vLLM loads it (a Hub id or a "
                             "directory; default: the backbone the model was trained on)")
    args = parser.parse_args(argv)
    module = _load_source(args.source).merge_lora()  # engines load plain weights: a LoRA backbone is folded in
    print(export(module, args.format, args.out, verifier=args.verifier))


def export_mask_token(module: MTPModule, directory: str | os.PathLike, parallel_draft: bool = True) -> Path:
    """Write a mask-token model as a plain Hugging Face model directory (its ``<MTP>`` token one more vocabulary
    entry), which any engine serves as a next-token model; with ``parallel_draft`` its ``config.json`` also carries
    ``pard_token`` (the mask id), which vLLM's parallel drafting reads from a draft model's config
    (``"method": "draft_model", "parallel_drafting": true``): one forward over the last token and K - 1 masks
    drafts K tokens, as this model was trained to. Refused: another method, LoRA not merged."""
    name = None if module.method is None else module.method_config.name
    fmt = "parallel_draft" if parallel_draft else "hf"
    if name != "mask_token":
        raise UserInputError(f"export to {fmt!r} needs a mask_token module, got {name!r}: other methods leave the "
                             "backbone as it was and export their heads ('speculators' or a native layout)")
    if module.lora is not None:
        raise UserInputError(f"export to {fmt!r}: the module has a LoRA adapter; call module.merge_lora() first")
    target = Path(directory)
    with atomic_dir(target) as tmp:
        module.base_model.save_pretrained(tmp)
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(tmp)
        if parallel_draft:
            config = json.loads((tmp / "config.json").read_text())
            config["pard_token"] = module.method_config.mask_token_id
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def export_native(module: MTPModule, directory: str | os.PathLike, layout: str = "mimo") -> Path:
    """Write ``module`` (backbone + trained heads) as a ``layout`` model directory that engines serve natively.

    The backbone is written by transformers (``save_pretrained``: the checkpoint layout, e.g. per-expert MoE tensors)
    and the heads as the layout's MTP layers in a shard of their own, listed in the safetensors index: a FastMTP
    head is one layer, MTP-D's K heads are K layers (DeepSeek-V3 only: the one layout whose engines feed each
    layer the previous one's un-normed output). ``mtp_config.json`` beside them lets lightning-mtp load it back.
    Refused with one clear error, before anything is written: another method, LoRA not merged, vocabulary
    compression, a backbone of another architecture, a head whose recursion or decoder layer differs from what
    the engines run.
    """
    lay = native_layout(layout)
    heads = _native_heads(module, lay)
    base = module.base_model
    state = module.method.state_dict()
    target = Path(directory)
    with atomic_dir(target) as tmp:
        base.save_pretrained(tmp)  # also its generation config
        config = json.loads((tmp / "config.json").read_text())
        native = {}
        for i, head in enumerate(heads):
            native.update({lay.key(i, k, config): v.detach().contiguous()
                           for k, v in to_native(state, layout, head=head, model=base).items()})
            native.update({lay.key(i, k, config): getattr(module.parts, what).weight.detach().clone()  # a copy each
                           for k, what in lay.shared})
        _add_shard(tmp, native)
        config.update(model_type=lay.model_types[0], architectures=[lay.architecture], **{lay.count_field: len(heads)})
        config.pop("auto_map", None)
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])  # engines that read the pre-v5 key
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(tmp)
        base_model = base_model_record(module, ".", None, model_type=lay.model_types[0])
        mtp = mtp_record(module, weights="native", native_layout=layout, base_model=base_model,
                         decoding={"decoding": "speculative", "num_draft_tokens": module.num_draft_tokens})
        (tmp / MTP_CONFIG).write_text(json.dumps(mtp, indent=2) + "\n")
    return target


def _native_heads(module: MTPModule, lay: NativeLayout) -> list[str]:
    """The head key prefixes that become native MTP layers 0..K-1, after every check that the layout carries them
    exactly."""
    name = None if module.method is None else module.method_config.name
    where = f"export to the {lay.name} layout"
    if name not in ("fast_mtp", "mtp_d"):
        raise UserInputError(f"{where} needs a fast_mtp or mtp_d module, got {name!r}; mask_token models export as "
                             "'parallel_draft' or 'hf'")
    if module.lora is not None:
        raise UserInputError(f"{where}: the module has a LoRA adapter; call module.merge_lora() (or export with "
                             "--merge-lora) first")
    if getattr(module.method, "draft_ids", None) is not None:
        raise UserInputError(f"{where}: the head uses vocabulary compression (draft_vocab_size), which native MTP layers "
                             "do not carry; train with draft_vocab_size: null")
    model_type = module.base_model.config.model_type
    if model_type != lay.backbone_model_type:
        raise UserInputError(f"{where} needs a {lay.backbone_model_type!r} backbone, this one is {model_type!r}")
    cfg = module.method_config
    if name == "fast_mtp":
        if cfg.num_steps > 1 and cfg.recurse_on_normed != lay.recurse_on_normed:
            state = "final-normed output" if lay.recurse_on_normed else "output before its final norm"
            raise UserInputError(f"{where}: its engines feed each further draft step the layer's {state}, this head was "
                                 f"trained with recurse_on_normed={cfg.recurse_on_normed}; train with "
                                 f"method.recurse_on_normed: {str(lay.recurse_on_normed).lower()}, or set num_steps: 1")
        prefixes = ["block."]
    else:
        if lay.recurse_on_normed:
            raise UserInputError(f"{where}: its engines feed each MTP layer the previous one's final-normed output, MTP-D "
                                 "heads feed each other their output before the norm; export MTP-D heads to 'deepseek_v3'")
        prefixes = [f"heads.{k}." for k in range(cfg.num_heads)]
    if lay.max_layers is not None and len(prefixes) > lay.max_layers:
        raise UserInputError(f"{where}: the layout holds at most {lay.max_layers} MTP layer(s), this module has "
                             f"{len(prefixes)} heads")
    if lay.head_layer_at_offset:
        _check_layer_shape(module, prefixes[0], where)
    return prefixes


def _check_layer_shape(module: MTPModule, prefix: str, where: str) -> None:
    """Engines build the MTP decoder layer as the backbone's next layer (DeepSeek-V3: MoE past first_k_dense_replace);
    the head's must have the same tensors as the backbone's last layer, which is built by the same rule."""
    last = {k: tuple(v.shape) for k, v in module.parts.layers[-1].state_dict().items()}
    head = {k[len(prefix) + len("layer."):]: tuple(v.shape) for k, v in module.method.state_dict().items()
            if k.startswith(prefix + "layer.")}
    if head != last:
        raise UserInputError(f"{where}: the head's decoder layer is not shaped like the MTP layer the engines build "
                             f"(differing tensors: {sorted(set(head.items()) ^ set(last.items()))[:4]}); train with "
                             f"method.head_layer: {module.base_model.config.num_hidden_layers}")


def _add_shard(directory: Path, tensors: dict) -> None:
    """Write ``tensors`` as one more safetensors shard of the checkpoint in ``directory`` and list it in the index
    (creating one for a single-file checkpoint), as released native-MTP checkpoints keep their MTP layers."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        shard = "model-mtp.safetensors"
    else:
        single = directory / "model.safetensors"
        with safe_open(str(single), framework="pt") as f:
            keys = list(f.keys())  # noqa: SIM118
            size = sum(_nbytes(f.get_slice(k)) for k in keys)
        single.rename(directory / "model-00001-of-00002.safetensors")
        index = {"metadata": {"total_size": size}, "weight_map": dict.fromkeys(keys, "model-00001-of-00002.safetensors")}
        shard = "model-00002-of-00002.safetensors"
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index.setdefault("metadata", {})["total_size"] = sum(
        t.numel() * t.element_size() for t in tensors.values()) + int(index.get("metadata", {}).get("total_size", 0))
    index_path.write_text(json.dumps(index, indent=2) + "\n")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(tensor_slice) -> int:
    """Bytes of a safetensors tensor, read from its header (no data loaded)."""
    return math.prod(tensor_slice.get_shape()) * _DTYPE_BYTES[tensor_slice.get_dtype()]
