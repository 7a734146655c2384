"""Native MTP layouts of released checkpoints (what they are, how to spot one, how their tensors map onto our
FastMTP head, how to load their backbone without remote code): the format layer under :mod:`lightning_mtp.convert`,
whose docstring describes the MiMo layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from lightning_mtp.errors import UserInputError

__all__ = [
    "NATIVE_LAYOUTS",
    "NativeLayout",
    "detect_native_layout",
    "from_native",
    "native_layout",
    "load_native_backbone",
    "read_native_mtp_tensors",
    "serving_snippet",
    "to_native",
]

@dataclass(frozen=True)
class NativeLayout:
    """How one family stores its MTP layer, and what its backbone is in transformers."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values of this layout
    architecture: str  # config.json "architectures" entry engines look for
    backbone_model_type: str  # the transformers architecture the backbone loads as, without remote code
    prefix: str  # checkpoint keys "{prefix}{i}.{name}" hold MTP layer i
    renames: tuple[tuple[str, str], ...]  # (native key prefix, our FastMTPHead key prefix)
    swap_proj_halves: bool  # native projection input is cat([hidden, embedding]); ours is [embedding, hidden]
    default_method: dict[str, Any]
    serving: Callable[[str, int], str]
    export_note: str = ""  # model cards of heads that export to this layout say so (see export_native)


def _mimo_serving(repo: str, k: int) -> str:
    return (
        "vLLM (MTP speculative decoding, native MiMo support):\n\n"
        "```bash\n"
        f"vllm serve {repo} --speculative-config '{{\"method\": \"mtp\", \"num_speculative_tokens\": {k}}}'\n"
        "```\n\n"
        "SGLang (the FastMTP authors' setting; add `--speculative-token-map FILE` for vocabulary compression):\n\n"
        "```bash\n"
        f"python -m sglang.launch_server --model-path {repo} --speculative-algorithm EAGLE \\\n"
        f"    --speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}\n"
        "```"
    )


NATIVE_LAYOUTS: dict[str, NativeLayout] = {
    "mimo": NativeLayout(
        name="mimo",
        model_types=("mimo",),
        architecture="MiMoForCausalLM",
        backbone_model_type="qwen2",
        prefix="model.mtp_layers.",
        renames=(
            ("token_layernorm.", "block.enorm."),
            ("hidden_layernorm.", "block.hnorm."),
            ("input_proj.", "block.proj."),
            ("final_layernorm.", "block.final_norm."),
            ("input_layernorm.", "block.layer.input_layernorm."),
            ("post_attention_layernorm.", "block.layer.post_attention_layernorm."),
            ("self_attn.", "block.layer.self_attn."),
            ("mlp.", "block.layer.mlp."),
        ),
        swap_proj_halves=True,
        # MiMo's own layer was trained for one step ahead; further steps recurse on its final-normed output
        default_method={"name": "fast_mtp", "num_steps": 1, "recurse_on_normed": True},
        serving=_mimo_serving,
        export_note="This FastMTP head sits on a Qwen2-architecture base, so it can be exported to the MiMo native "
                    "MTP layout, which both engines serve",
    ),
}


def native_layout(name: str) -> NativeLayout:
    """The layout called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in NATIVE_LAYOUTS:
        raise UserInputError(f"unknown native MTP layout {name!r}; known layouts are {sorted(NATIVE_LAYOUTS)}")
    return NATIVE_LAYOUTS[name]


def _read_config(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def detect_native_layout(directory: str | os.PathLike | None) -> str | None:
    """The layout name when ``directory`` is a model with a native MTP layer we can convert, else None."""
    if directory is None:
        return None
    config = _read_config(Path(directory))
    for layout in NATIVE_LAYOUTS.values():
        if config.get("model_type") in layout.model_types and int(config.get("num_nextn_predict_layers") or 0) > 0:
            return layout.name
    return None


def serving_snippet(layout: str, repo: str, num_draft_tokens: int) -> str:
    """Markdown with the engine flags that serve a ``layout`` model from ``repo`` with MTP speculative decoding."""
    return native_layout(layout).serving(repo, num_draft_tokens)


# ------------------------------------------------------------------------------------------ key mapping


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(H, 2H) [a | b] -> [b | a]: the same projection for inputs concatenated in the other order."""
    H = weight.shape[1] // 2
    return torch.cat([weight[:, H:], weight[:, :H]], dim=1).contiguous()  # (H, 2H)


def from_native(tensors: dict[str, torch.Tensor], layout: str = "mimo") -> dict[str, torch.Tensor]:
    """One native MTP layer's tensors (keys without the ``{prefix}{i}.`` part) -> a FastMTPHead state dict."""
    lay = native_layout(layout)
    out = {}
    for key, value in tensors.items():
        rename = next(((src, dst) for src, dst in lay.renames if key.startswith(src)), None)
        if rename is None:
            raise UserInputError(f"native {layout} MTP key {key!r} has no place in our FastMTP head "
                                 f"(known prefixes: {[src for src, _ in lay.renames]})")
        ours = rename[1] + key[len(rename[0]):]
        out[ours] = _swap_halves(value) if lay.swap_proj_halves and ours == "block.proj.weight" else value
    return out


def to_native(state: dict[str, torch.Tensor], layout: str = "mimo") -> dict[str, torch.Tensor]:
    """A FastMTPHead state dict -> one native MTP layer's tensors (keys without the ``{prefix}{i}.`` part)."""
    lay = native_layout(layout)
    out = {}
    for key, value in state.items():
        rename = next(((src, dst) for src, dst in lay.renames if key.startswith(dst)), None)
        if rename is None:
            raise UserInputError(f"FastMTP head key {key!r} has no place in the native {layout} MTP layer")
        native = rename[0] + key[len(rename[1]):]
        out[native] = _swap_halves(value) if lay.swap_proj_halves and key == "block.proj.weight" else value
    return out


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserInputError(f"{index} is not a safetensors index (no 'weight_map'): {err}") from None
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserInputError(f"{directory} holds no *.safetensors weights")
    return files


def read_native_mtp_tensors(directory: str | os.PathLike, layout: str = "mimo") -> dict[int, dict[str, torch.Tensor]]:
    """``{layer index: {key without prefix: tensor}}`` for every native MTP layer in the checkpoint's safetensors."""
    lay = native_layout(layout)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for file in _safetensors_files(Path(directory)):
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {key: f.get_tensor(key) for key in f.keys() if key.startswith(lay.prefix)}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for missing or corrupt files
            raise UserInputError(f"cannot read {file}: {err}") from None
        for key, tensor in found.items():
            index, _, rest = key[len(lay.prefix):].partition(".")
            if not index.isdigit() or not rest:
                raise UserInputError(f"{file}: key {key!r} is not '{lay.prefix}<index>.<name>'")
            layers.setdefault(int(index), {})[rest] = tensor
    return layers


# ------------------------------------------------------------------------------------------ loading


def load_native_backbone(directory: str | os.PathLike, *, dtype: str | torch.dtype = "auto") -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)``: the backbone of a native-MTP checkpoint as its transformers architecture, no remote code.

    The MTP tensors are left out of the backbone (they are read by :func:`read_native_mtp_tensors`); any other
    key that does not load is an error.
    """
    directory = Path(directory)
    name = detect_native_layout(directory)
    if name is None:
        raise UserInputError(f"{directory} is not a model with a native MTP layer we know (layouts: {sorted(NATIVE_LAYOUTS)})")
    lay = NATIVE_LAYOUTS[name]
    raw = _read_config(directory)
    kwargs = {k: v for k, v in raw.items() if k not in {"model_type", "architectures", "auto_map", "transformers_version"}}
    config = AutoConfig.for_model(lay.backbone_model_type, **kwargs)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the MTP tensors as unexpected: we check keys below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, config=config, dtype=torch_dtype, output_loading_info=True, trust_remote_code=False
        )
    except OSError as err:
        raise UserInputError(f"backbone of {directory} could not be loaded: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(lay.prefix)]
    missing = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected or missing:
        raise UserInputError(f"{directory} does not load as {type(model).__name__}: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
    model.config.architectures = [type(model).__name__]
    try:
        # the backbone's config, not config.json: its auto_map would make transformers ask about remote code
        tokenizer = AutoTokenizer.from_pretrained(directory, config=config, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model.eval(), tokenizer
