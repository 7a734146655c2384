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
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import logging as hf_logging

from lightning_mtp.errors import UserInputError

__all__ = [
    "NATIVE_LAYOUTS",
    "NativeLayout",
    "detect_native_layout",
    "from_native",
    "native_layout",
    "load_native_backbone",
    "DECODER_LAYER_RENAMES",
    "SPECULATORS_MTP_MODEL_TYPES",
    "SPECULATORS_VERSION",
    "read_native_mtp_tensors",
    "parallel_draft_snippet",
    "serving_snippet",
    "speculators_snippet",
    "rename_block",
    "to_native",
]

@dataclass(frozen=True)
class NativeLayout:
    """How one family stores its MTP layers, what its backbone is in transformers, and how engines run them."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values of this layout
    architecture: str  # config.json "architectures" entry engines look for
    backbone_model_type: str  # the transformers architecture the backbone loads as, without remote code
    count_field: str  # the config.json field holding the number of MTP layers
    key_format: str  # checkpoint key of MTP layer i's tensor "rest": format(i=..., rest=...)
    renames: tuple[tuple[str, str], ...]  # (native key prefix, MTPBlock key prefix)
    swap_proj_halves: bool  # native projection input is cat([hidden, embedding]); ours is [embedding, hidden]
    recurse_on_normed: bool  # engines feed draft step k+1 the layer's final-normed output (else the output itself)
    default_method: dict[str, Any]
    serving: Callable[[str, int], str]
    index_offset_field: str | None = None  # layer i is stored at index i + config[field] (DeepSeek-V3: after the backbone)
    shared: tuple[tuple[str, str], ...] = ()  # (native key, "embed_tokens" | "lm_head"): copies of the backbone's tensors
    max_layers: int | None = None  # how many MTP layers the format can hold (None: any)
    head_layer_at_offset: bool = False  # the engine builds the MTP decoder layer as backbone layer num_hidden_layers
    export_note: str = ""  # model cards of heads that export to this layout say so (see export_native)

    def offset(self, config: dict) -> int:
        return int(config.get(self.index_offset_field) or 0) if self.index_offset_field else 0

    def key(self, index: int, rest: str, config: dict) -> str:
        """The checkpoint key of MTP layer ``index``'s tensor ``rest`` (a native name such as ``eh_proj.weight``)."""
        return self.key_format.format(i=index + self.offset(config), rest=rest)

    def split(self, key: str, config: dict) -> tuple[int, str] | None:
        """``(MTP layer index, native name)`` when ``key`` belongs to an MTP layer, else None."""
        head, _, tail = self.key_format.partition("{i}")
        if "{i}" not in self.key_format:  # one layer under a fixed prefix (Qwen3-Next: "mtp.")
            prefix = self.key_format.removesuffix("{rest}")
            return (0, key[len(prefix):]) if key.startswith(prefix) and len(key) > len(prefix) else None
        if not key.startswith(head):
            return None
        index, dot, rest = key[len(head):].partition(".")
        if not (index.isdigit() and dot and rest) or tail != ".{rest}":
            return None
        i = int(index) - self.offset(config)
        return (i, rest) if i >= 0 else None


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


def _nextn_serving(repo: str, k: int) -> str:
    return (
        "vLLM (native MTP layers; `mtp` maps the architecture to its MTP draft class):\n\n"
        "```bash\n"
        f"vllm serve {repo} --speculative-config '{{\"method\": \"mtp\", \"num_speculative_tokens\": {k}}}'\n"
        "```\n\n"
        "SGLang (NEXTN, its name for native MTP layers):\n\n"
        "```bash\n"
        f"python -m sglang.launch_server --model-path {repo} --speculative-algorithm NEXTN \\\n"
        f"    --speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}\n"
        "```"
    )


DECODER_LAYER_RENAMES = (
    ("input_layernorm.", "layer.input_layernorm."),
    ("post_attention_layernorm.", "layer.post_attention_layernorm."),
    ("self_attn.", "layer.self_attn."),
    ("mlp.", "layer.mlp."),
)

NATIVE_LAYOUTS: dict[str, NativeLayout] = {
    # MiMo-7B and FastMTP's release: Qwen2 backbone, "model.mtp_layers.{i}.*", hidden state first, normed recursion
    "mimo": NativeLayout(
        name="mimo",
        model_types=("mimo",),
        architecture="MiMoForCausalLM",
        backbone_model_type="qwen2",
        count_field="num_nextn_predict_layers",
        key_format="model.mtp_layers.{i}.{rest}",
        renames=(("token_layernorm.", "enorm."), ("hidden_layernorm.", "hnorm."), ("input_proj.", "proj."),
                 ("final_layernorm.", "final_norm."), *DECODER_LAYER_RENAMES),
        swap_proj_halves=True,
        recurse_on_normed=True,  # vLLM's and SGLang's MiMo MTP return the final-normed state
        # MiMo's own layer was trained for one step ahead; further steps recurse on its final-normed output
        default_method={"name": "fast_mtp", "num_steps": 1, "recurse_on_normed": True},
        serving=_mimo_serving,
        export_note="This FastMTP head sits on a Qwen2-architecture base, so it can be exported to the MiMo native "
                    "MTP layout, which both engines serve",
    ),
    # DeepSeek-V3 / R1: MTP layer i is "model.layers.{num_hidden_layers + i}.*" with its own copies of the embedding
    # and output head; embedding first; the un-normed output feeds the next step
    "deepseek_v3": NativeLayout(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        architecture="DeepseekV3ForCausalLM",
        backbone_model_type="deepseek_v3",
        count_field="num_nextn_predict_layers",
        key_format="model.layers.{i}.{rest}",
        index_offset_field="num_hidden_layers",
        renames=(("enorm.", "enorm."), ("hnorm.", "hnorm."), ("eh_proj.", "proj."),
                 ("shared_head.norm.", "final_norm."), *DECODER_LAYER_RENAMES),
        shared=(("embed_tokens.weight", "embed_tokens"), ("shared_head.head.weight", "lm_head")),
        swap_proj_halves=False,
        recurse_on_normed=False,  # vLLM's DeepSeekMTP hands the next step the layer output before shared_head.norm
        head_layer_at_offset=True,  # vLLM builds it as layer num_hidden_layers: MoE when past first_k_dense_replace
        default_method={"name": "fast_mtp", "num_steps": 1},
        serving=_nextn_serving,
        export_note="This head sits on a DeepSeek-V3-architecture base, so it can be exported to DeepSeek-V3's "
                    "native MTP layout (one layer per head), which both engines serve",
    ),
    # Qwen3-Next: one MTP layer under "mtp.", embedding first, zero-centred norms, normed recursion
    "qwen3_next": NativeLayout(
        name="qwen3_next",
        model_types=("qwen3_next",),
        architecture="Qwen3NextForCausalLM",
        backbone_model_type="qwen3_next",
        count_field="mtp_num_hidden_layers",
        key_format="mtp.{rest}",
        renames=(("fc.", "proj."), ("pre_fc_norm_embedding.", "enorm."), ("pre_fc_norm_hidden.", "hnorm."),
                 ("norm.", "final_norm."), ("layers.0.", "layer.")),
        swap_proj_halves=False,
        recurse_on_normed=True,  # vLLM's Qwen3NextMTP returns the state after its final norm
        max_layers=1,
        default_method={"name": "fast_mtp", "num_steps": 1, "recurse_on_normed": True},
        serving=_nextn_serving,
        export_note="This FastMTP head sits on a Qwen3-Next base, so it can be exported to Qwen3-Next's native MTP "
                    "layout, which both engines serve",
    ),
}


SPECULATORS_VERSION = "0.9.0"
"""The speculators release whose ``mtp`` loader our speculators export is checked against
(tests/test_export_speculators.py)."""
SPECULATORS_MTP_MODEL_TYPES = ("qwen3", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
"""Verifier architectures that release builds an MTP layer for (its ``mtp_model_classes``)."""


def speculators_snippet(repo: str) -> str:
    """How vLLM serves a speculators draft directory (``lightning-mtp export --format speculators``)."""
    return ("vLLM (a speculators draft: vLLM reads the verifier, the method and the draft length from `config.json`; "
            "checked with the speculators package, tests/test_export_speculators.py):\n\n"
            f"```bash\nvllm serve {repo}\n```")


def parallel_draft_snippet(repo: str) -> str:
    """How vLLM uses a mask-token model as a parallel-drafting draft model (``--format parallel_draft``)."""
    return ("vLLM (parallel drafting: this model drafts K tokens in one forward from `pard_token` masks, for the base "
            "it was trained from; checked as a transformers model, tests/test_export_mask_token.py):\n\n"
            "```bash\nvllm serve BASE_MODEL --speculative-config \\\n"
            f"    '{{\"model\": \"{repo}\", \"method\": \"draft_model\", \"parallel_drafting\": true, "
            "\"num_speculative_tokens\": 3}'\n```")


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
    """The layout name when ``directory`` is a model with a native MTP layer we can convert, else None.

    The config must declare MTP layers and the weights hold them: a plain DeepSeek-V3 or Qwen3-Next model saved by
    transformers (whose config may carry the count) is no native-MTP checkpoint.
    """
    if directory is None:
        return None
    config = _read_config(Path(directory))
    for layout in NATIVE_LAYOUTS.values():
        if config.get("model_type") in layout.model_types and int(config.get(layout.count_field) or 0) > 0:
            return layout.name if _holds_mtp_keys(Path(directory), layout, config) else None
    return None


def _holds_mtp_keys(directory: Path, layout: NativeLayout, config: dict) -> bool:
    try:
        files = _safetensors_files(directory)
    except UserInputError:
        return False
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                if any(layout.split(key, config) is not None for key in f.keys()):  # noqa: SIM118
                    return True
        except Exception:  # noqa: BLE001 an unreadable file is reported when the weights are read
            return True
    return False


def serving_snippet(layout: str, repo: str, num_draft_tokens: int) -> str:
    """Markdown with the engine flags that serve a ``layout`` model from ``repo`` with MTP speculative decoding."""
    return native_layout(layout).serving(repo, num_draft_tokens)


# ------------------------------------------------------------------------------------------ key mapping


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(H, 2H) [a | b] -> [b | a]: the same projection for inputs concatenated in the other order."""
    H = weight.shape[1] // 2
    return torch.cat([weight[:, H:], weight[:, :H]], dim=1).contiguous()  # (H, 2H)


def _fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert MoE weights as checkpoints store them (``experts.{e}.gate_proj.weight`` (I, H), ``up_proj`` (I, H),
    ``down_proj`` (H, I)) -> the fused tensors transformers' modules hold (``experts.gate_up_proj`` (E, 2I, H),
    ``experts.down_proj`` (E, H, I)); :func:`to_native` reverses it with transformers' own conversion."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition("experts.")
        index, _, name = tail.partition(".")
        if sep and index.isdigit() and name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            groups.setdefault(head + sep, {}).setdefault(int(index), {})[name] = value
        else:
            out[key] = value
    for prefix, experts in groups.items():
        order = [experts[e] for e in sorted(experts)]
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([e["gate_proj.weight"], e["up_proj.weight"]]) for e in order])
        out[prefix + "down_proj"] = torch.stack([e["down_proj.weight"] for e in order])
    return out


def from_native(tensors: dict[str, torch.Tensor], layout: str = "mimo", into: str = "block.",
                fuse_experts: bool = False) -> dict[str, torch.Tensor]:
    """One native MTP layer's tensors (keys without the layer prefix, the backbone copies left out) -> an
    :class:`MTPBlock` state dict under ``into`` (``"block."`` for FastMTP, ``"heads.{k}."`` for MTP-D).
    ``fuse_experts``: the head's decoder layer holds its MoE experts fused, as transformers' modules do."""
    lay = native_layout(layout)
    out = {}
    for key, value in tensors.items():
        rename = next(((src, dst) for src, dst in lay.renames if key.startswith(src)), None)
        if rename is None:
            raise UserInputError(f"native {layout} MTP key {key!r} has no place in our MTP head "
                                 f"(known prefixes: {[src for src, _ in lay.renames]})")
        ours = rename[1] + key[len(rename[0]):]
        out[into + ours] = _swap_halves(value) if lay.swap_proj_halves and ours == "proj.weight" else value
    return _fuse_experts(out) if fuse_experts else out


def to_native(state: dict[str, torch.Tensor], layout: str = "mimo", head: str = "block.",
              model: PreTrainedModel | None = None) -> dict[str, torch.Tensor]:
    """One :class:`MTPBlock`'s tensors (the keys under ``head`` in ``state``) -> a native MTP layer's (keys without the
    layer prefix). ``model``: the backbone, whose transformers conversion mapping un-fuses MoE experts."""
    lay = native_layout(layout)
    block = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    if model is not None:  # checkpoint names for the decoder layer's weights (per-expert MoE tensors)
        layer = revert_weight_conversion(model, {k: v for k, v in block.items() if k.startswith("layer.")})
        block = {**{k: v for k, v in block.items() if not k.startswith("layer.")}, **layer}
    return rename_block(block, lay.renames, lay.swap_proj_halves, f"the native {layout} MTP layer")


def rename_block(block: dict[str, torch.Tensor], renames: tuple[tuple[str, str], ...], swap_proj_halves: bool,
                 where: str) -> dict[str, torch.Tensor]:
    """An :class:`MTPBlock`'s tensors (keys ``enorm.weight``, ``layer.self_attn...``) under another format's names:
    ``renames`` holds (format prefix, block prefix) pairs; ``swap_proj_halves`` when the format's projection takes
    cat([hidden, embedding]). A key with no place is refused, naming ``where``."""
    out = {}
    for key, value in block.items():
        rename = next(((src, dst) for src, dst in renames if key.startswith(dst)), None)
        if rename is None:
            raise UserInputError(f"MTP head key {key!r} has no place in {where}")
        out[rename[0] + key[len(rename[1]):]] = _swap_halves(value) if swap_proj_halves and key == "proj.weight" else value
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
    """``{layer index: {native name: tensor}}`` for every native MTP layer in the checkpoint's safetensors (the
    layout's copies of the backbone's embedding and output head included)."""
    lay = native_layout(layout)
    config = _read_config(Path(directory))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for file in _safetensors_files(Path(directory)):
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {key: f.get_tensor(key) for key in f.keys() if lay.split(key, config) is not None}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for missing or corrupt files
            raise UserInputError(f"cannot read {file}: {err}") from None
        for key, tensor in found.items():
            index, rest = lay.split(key, config)
            layers.setdefault(index, {})[rest] = tensor
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
    unexpected = [k for k in info.get("unexpected_keys", []) if lay.split(k, raw) is None]
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
