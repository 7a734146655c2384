"""The architecture sweep: every causal LM that transformers registers, built tiny, decoded by every method.

Each architecture in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built from its config class with a generic shrink
(:data:`SHRINK`: a few layers, hidden 32, 4 heads, 4 experts, small states and windows, vocabulary 300; sub-configs
of multimodal models shrink the same way), plus :data:`OVERRIDES` only where the generic shrink cannot build it.
Every registered method then decodes it three ways:

- ``greedy``: a prompt alone equals the backbone's own ``generate(do_sample=False)``;
- ``batched``: three prompts of different lengths left-padded in one batch with an attention mask: each row equals
  the backbone's own ``generate`` of that row alone;
- ``sampling``: a seeded sampled decode returns the requested tokens and repeats with the same seed.

Architectures that cannot work are skipped with the reason (:func:`skip_reason`): encoder-decoder models, models
that need an optional package, models with no KV cache. A method that cannot be built on an architecture says
why in one ``ValueError`` (e.g. a head-based method on a backbone without an attention layer); the matrix shows it.

``python -m tests.arch_sweep --write docs/architectures.md`` (``make architectures``) regenerates the support
matrix; ``tests/test_architectures.py`` runs the sweep and checks that the page is current.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lightning_mtp import MTPModule
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods import METHODS

CACHE_KEYWORDS = {"cache", "past_key_values", "past_key_value", "layer_past"}
VOCAB = 300
EOS = 2
MAX_NEW = 16
SAMPLED = 12  # tokens of each sampled decode
PROMPTS = ([5, 17, 42, 99, 7, 250, 31], [120, 8, 64], [33, 201, 77, 15, 160])
CHECKS = ("greedy", "batched", "sampling")
DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"

SHRINK = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8, initializer_range=0.2,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_shared_experts=1, n_group=1, topk_group=1, shared_expert_intermediate_size=32,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    state_size=8, ssm_state_size=8, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2, expand=2,
    conv_kernel=4, mamba_d_conv=4, time_step_rank=4, n_groups=1, mamba_n_groups=1,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    rotary_dim=4, is_decoder=True, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64, ffn_dim=64, d_model=32,
    linear_head_dim=8, linear_num_heads=4, num_layers=2, ffn_hidden_size=64, expert_ffn_hidden_size=32,
    zero_expert_num=2, moe_topk=2, vocab_size_per_layer_input=VOCAB, emb_dim=32, n_layers=2, n_heads=4, mamba_num_heads=4, mamba_head_dim=16,
    attn_layer_period=2, attn_layer_offset=1, attn_layer_indices=[1], expert_layer_period=2, expert_layer_offset=1,
    unpadded_vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
)
"""The generic shrink: every field a config class has takes this value."""

_QWEN4_EXP_QSA = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                      indexer_compress_ratio=4)  # no defaults for its indexed attention; budget 8 keeps it sparse
_DOTS3_SWA = dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16,
                  swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8)  # its sliding layers' own sizes

OVERRIDES: dict[str, dict] = {
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},  # its default is Mamba layers only
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "big_bird": {"attention_type": "original_full"},  # block-sparse attention needs sequences of whole blocks
    "falcon_h1": {"mamba_d_ssm": 64},  # mamba_n_heads * mamba_d_head
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "mamba2": {"num_heads": 4, "head_dim": 16},  # hidden_size * expand == num_heads * head_dim
    "zaya": {"num_experts_per_tok": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one entry per layer
    # Zamba's default layer list starts with 3 fixed layers; its hybrid layers tie one shared attention block (two
    # of them at least)
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"]},  # its default is a fixed 54-layer list
    "xmod": {"default_language": "en_XX"},  # every forward needs a language adapter (set_default_language)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # no default layer types
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # its attention reads both; no defaults
    "cohere_compass_text": {"layer_types": ["sliding_attention", "full_attention"],  # rope parameters per layer type
                            "rope_parameters": dict.fromkeys(["sliding_attention", "full_attention"],
                                                             {"rope_type": "default", "rope_theta": 10000.0})},
    "qwen4_exp_text": _QWEN4_EXP_QSA,
    "qwen4_exp": {"text_config": _QWEN4_EXP_QSA},
    "dots3_note_text": _DOTS3_SWA,
    "dots3_note": {"text_config": _DOTS3_SWA,  # adapters sized to the text; a 2-layer vision MoE schedule
                   "audio_config": {"adapter_input_size": 32, "adapter_out_dim": 32},
                   "vision_config": {"pyramid_num_routed": [-1, 4], "adapter_in_dim": 32, "adapter_out_dim": 32}},
    "xlstm": {"qk_dim_factor": 2.0, "v_dim_factor": 2.0},  # HF sizes its cache with these dims rounded up to 64,
    # its layers without rounding: they agree only where hidden_size * factor is a multiple of 64
    "blt": {"encoder_hash_byte_group_vocab": 64, "encoder_config": {"hidden_size_global": 32},
            "decoder_config": {"hidden_size_global": 32},
            "num_hidden_layers": 2},  # DynamicCache(config=BltConfig) reads it, which BltConfig lacks (HF's own)
}
"""Per-architecture fields where the generic shrink cannot build the model (kept as short as possible)."""


KNOWN_FAILURES: dict[str, str] = {}
"""Architectures that build but fail a check for a reason not yet fixed: their test is a strict xfail (it fails as
soon as they pass, so the entry is removed) and the page shows the reason. Kept short; each is an open defect."""


def skip_reason(arch: str) -> str | None:
    """Why ``arch`` cannot work with lightning-mtp at all, or None."""
    if getattr(_default_config(CONFIG_MAPPING[arch]), "is_encoder_decoder", False):
        return "encoder-decoder"
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch], None)
    if model_class is not None and not forward_params_of(model_class) & CACHE_KEYWORDS:
        return "no KV cache (a state of its own)"
    return None


def forward_params_of(cls) -> set[str]:
    return set(inspect.signature(cls.forward).parameters)


def _default_config(cfg_cls):
    """The config class's defaults (some classes refuse their own defaults until shrunk: then the class itself)."""
    try:
        return cfg_cls()
    except Exception:  # e.g. a strict validator rejecting default sizes; the class attributes still tell the fields
        return cfg_cls


def _fields(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set(vars(obj))


def _shrunk_kwargs(cfg_cls, extra: dict) -> dict:
    """Keyword arguments that build ``cfg_cls`` tiny: the generic shrink on every field the class has, one layer
    of each kind of a hybrid's ``layer_types`` (in order of first appearance), sub-configs shrunk the same way;
    then ``extra`` (a dict for a sub-config updates its shrunk fields)."""
    default = _default_config(cfg_cls)
    names = _fields(cfg_cls) if default is cfg_cls else _fields(default)
    kw = {k: v for k, v in SHRINK.items() if k in names}
    if "kv_lora_rank" in kw:  # multi-head latent attention has no grouped KV heads
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    try:
        layer_types = getattr(default, "layer_types", None)
    except Exception:
        layer_types = None
    if "layer_types" in names and isinstance(layer_types, (list, tuple)) and layer_types:
        kinds = list(dict.fromkeys(layer_types))
        kw["layer_types"] = kinds if len(kinds) > 1 else kinds * 2
        kw["num_hidden_layers"] = len(kw["layer_types"])
    for name in names:
        try:
            sub = getattr(default, name, None)
        except Exception:  # a per-layer attribute read globally (Gemma 4): not a sub-config anyway
            continue
        if isinstance(sub, transformers.PreTrainedConfig):
            kw[name] = _shrunk_kwargs(type(sub), {})
    # an override of a sub-config (a dict) updates its shrunk fields rather than replacing them all
    return {**kw, **{k: {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
                     for k, v in extra.items()}}


MAX_PARAMETERS = 20_000_000
"""A shrunk model larger than this keeps some full-size field: CI time would grow unnoticed, so it is an error."""


def build(arch: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random ``arch`` model, seeded, in eval mode, with EOS :data:`EOS` and pad 0."""
    cfg_cls = CONFIG_MAPPING[arch]
    config = cfg_cls(**_shrunk_kwargs(cfg_cls, OVERRIDES.get(arch, {})))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the shrunk {arch} has {size:,} parameters: a full-size field needs an override")
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
    return out[0, len(prompt):].tolist()


def left_padded(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (n - len(p)) + list(p) for p in prompts])  # (B, n)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])  # (B, n)
    return ids, mask


def _new_tokens(sequence: torch.Tensor, prompt_len: int) -> list[int]:
    """The tokens after the prompt up to and including the first EOS (padding after it dropped)."""
    out = sequence[prompt_len:].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


@dataclass
class MethodResult:
    """One method on one architecture: per check, None (passed) or what went wrong; or why it cannot be built."""

    unsupported: str | None = None
    failures: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # every check refused with one clear error: a capability the library probes for


METHOD_OPTIONS: dict[str, dict] = {
    "fast_mtp": {"num_steps": 2},
    "mtp_d": {"num_heads": 2},
    "mask_token": {"mask_token_id": VOCAB - 1, "num_speculative_tokens": 2},
}
"""Two drafts per step (several drafts to verify, accept and roll back, at a small drafting cost). The last row stands
in as mask_token's mask token, so no row is added: every method decodes the very model HF decodes, and one set of HF
references serves them all (adding a row is tested in tests/test_mask_token.py)."""


def build_method(model: PreTrainedModel, method: str) -> tuple[MTPModule | None, MethodResult]:
    """The method on ``model`` (which it leaves as it is), or why it cannot be built."""
    try:
        return MTPModule(model, method={"name": method, **METHOD_OPTIONS.get(method, {})}).eval(), MethodResult()
    except ValueError as err:  # the method says clearly that it cannot be built on this backbone
        return None, MethodResult(unsupported=str(err).splitlines()[0])
    except Exception as err:  # a crash while building is a failure of every check
        return None, MethodResult(failures=dict.fromkeys(CHECKS, f"building the method: {_describe(err)}"))


def check_method(model: PreTrainedModel, method: str, want: list[list[int]]) -> MethodResult:
    module, result = build_method(model, method)
    if module is None:
        return result
    refusals = {}
    for check in CHECKS:
        try:
            failure = CHECK_FUNCTIONS[check](module, want)
        except UserInputError as err:  # the library refused the model by a capability probe, with its reason
            refusals[check], failure = str(err).splitlines()[0], None
        except Exception as err:  # a crash is a failed check; the sweep goes on to record the others
            failure = _describe(err)
        if failure is not None:
            result.failures[check] = failure
    if refusals and len(refusals) < len(CHECKS):  # a refusal of some checks only is not a capability: a failure
        result.failures.update({c: f"refused: {r}" for c, r in refusals.items()})
    elif refusals:
        result.refused = refusals[CHECKS[0]]
    return result


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def check_greedy(module: MTPModule, want: list[list[int]]) -> str | None:
    """The first prompt alone (the batched check compares every row with HF's decode of that row alone)."""
    got = _new_tokens(module.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_NEW).sequences[0], len(PROMPTS[0]))
    return None if got == want[0] else f"{got} != HF {want[0]}"


def check_batched(module: MTPModule, want: list[list[int]]) -> str | None:
    ids, mask = left_padded(PROMPTS)
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW).sequences
    for i in range(len(PROMPTS)):
        got = _new_tokens(out[i], ids.shape[1])
        if got != want[i]:
            return f"row {i}: {got} != alone {want[i]}"
    return None


def check_sampling(module: MTPModule, want: list[list[int]]) -> str | None:
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        seq = module.generate(torch.tensor([PROMPTS[0]]), do_sample=True, generator=g, max_new_tokens=SAMPLED).sequences
        runs.append(_new_tokens(seq[0], len(PROMPTS[0])))
    if runs[0] != runs[1]:
        return "two decodes with the same seed differ"
    if len(runs[0]) != SAMPLED and runs[0][-1:] != [EOS]:
        return f"{len(runs[0])} new tokens, not {SAMPLED} and no EOS"
    return None


CHECK_FUNCTIONS = {"greedy": check_greedy, "batched": check_batched, "sampling": check_sampling}


@dataclass
class ArchResult:
    arch: str
    model_class: str = ""
    skipped: str | None = None
    build_error: str | None = None  # the tiny model could not be built or HF could not decode it
    methods: dict[str, MethodResult] = field(default_factory=dict)


@cache
def sweep_one(arch: str, decode: bool = True) -> ArchResult:
    """Build ``arch`` and run every registered method on it (memoised: the tests and the page share one run).
    ``decode=False`` only builds the methods: what the page shows when every check passes."""
    reason = skip_reason(arch)
    if reason is not None:
        return ArchResult(arch, skipped=reason)
    try:
        model = build(arch)
        want = [hf_greedy(model, p) for p in PROMPTS] if decode else []
    except ImportError as err:
        package = re.search(r"requires the (\S+) library", str(err))
        return ArchResult(arch, skipped=f"needs the optional package {package.group(1) if package else str(err)[:60]}")
    except Exception as err:  # recorded: the test for this architecture fails and shows it
        return ArchResult(arch, build_error=_describe(err))
    result = ArchResult(arch, model_class=type(model).__name__)
    for name in sorted(METHODS):
        result.methods[name] = check_method(model, name, want) if decode else build_method(model, name)[1]
    return result


def architectures() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def render_row(r: ArchResult) -> str:
    """One architecture's row of the support matrix."""
    methods = sorted(METHODS)
    blank = " | ".join("" for _ in methods)
    if r.skipped is not None:
        return f"| `{r.arch}` | skipped: {r.skipped} | {blank} |"
    if r.arch in KNOWN_FAILURES:
        return f"| `{r.arch}` | ✗ known failure: {KNOWN_FAILURES[r.arch]} | {blank} |"
    if r.build_error is not None:
        return f"| `{r.arch}` | ✗ cannot be built: {r.build_error} | {blank} |"
    cells = []
    for name in methods:
        m = r.methods[name]
        if m.unsupported is not None:
            cells.append(f"n/a: {m.unsupported}")
        elif m.refused is not None:
            cells.append(f"refused: {m.refused.split(': ', 1)[-1]}")
        else:
            cells.append(" ".join(f"{c} {'✗' if c in m.failures else '✓'}" for c in CHECKS))
    return f"| `{r.arch}` | `{r.model_class}` | " + " | ".join(cells) + " |"


def header() -> list[str]:
    methods = sorted(METHODS)
    return [
        "# Supported architectures",
        "",
        "Every causal-LM architecture that transformers registers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built tiny",
        "from its config class and decoded by every method: **greedy** (a prompt alone equals the backbone's own",
        "`generate`), **batched** (three left-padded prompts in one batch, each row equal to the backbone's `generate` of",
        "that row alone) and",
        "**sampling** (seeded, the requested length, reproducible). Generated by `make architectures` from the sweep in",
        "`tests/arch_sweep.py`, which CI runs; a cell is ✓ only when that check passed. *n/a* is a method that says",
        "why it cannot be built on that backbone (heads need an attention layer they can run on their own);",
        "*refused* is a backbone the decoder refuses by a capability probe, with the probe's finding (e.g. a model",
        "that cannot decode through transformers' DynamicCache, which the decoder crops rejected drafts from);",
        "*skipped* is an architecture lightning-mtp cannot decode at all.",
        "",
        f"Generated with transformers {transformers.__version__}.",
        "",
        "| architecture | model class | " + " | ".join(methods) + " |",
        "| --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]


def _fails(result: ArchResult) -> bool:
    """Whether the tiny model could not be built or some method failed a check on it."""
    return result.build_error is not None or any(m.failures for m in result.methods.values())


def render(results: list[ArchResult]) -> str:
    """The support matrix as Markdown (docs/architectures.md)."""
    known = sum(r.arch in KNOWN_FAILURES for r in results)
    failing = sum(r.skipped is None and r.arch not in KNOWN_FAILURES and _fails(r) for r in results)
    skipped = sum(r.skipped is not None for r in results)
    passed = len(results) - known - failing - skipped
    footer = ["", f"{passed} architectures supported, {failing} failing, {known} known failures, {skipped} skipped."]
    return "\n".join(header() + [render_row(r) for r in results] + footer) + "\n"


def _sweep_in_worker(arch: str) -> ArchResult:
    if arch in KNOWN_FAILURES:  # its row states the known failure; its test (a strict xfail) runs it
        return ArchResult(arch)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    return sweep_one(arch)


def main(argv: list[str] | None = None) -> None:
    """Print each architecture's result as it comes (``--after NAME`` starts after it); ``--write`` the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the support matrix here (else print it)")
    parser.add_argument("--after", default=None, help="start after this architecture")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="architectures swept at once")
    parser.add_argument("archs", nargs="*", help="only these architectures (default: all)")
    args = parser.parse_args(argv)
    names = args.archs or architectures()
    if args.after:
        names = names[names.index(args.after) + 1 :]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = []
        for r in pool.map(_sweep_in_worker, names):
            bad = {n: m.failures for n, m in r.methods.items() if m.failures}
            unsupported = {n: m.unsupported for n, m in r.methods.items() if m.unsupported}
            status = r.skipped or r.build_error or ("FAIL " + str(bad) if bad else "ok") + (
                f" unsupported {unsupported}" if unsupported else "")
            print(f"{r.arch:28s} {status}", flush=True)
            results.append(r)
    if args.write is not None:
        args.write.write_text(render(results))


if __name__ == "__main__":
    main()
