"""Model cards: the ``README.md`` of an artefact, built from its ``mtp_config.json`` (``huggingface_hub.ModelCard``).

What a method's line says comes from its config (``MethodConfig.summary``); engine flags come from the native
layouts (:mod:`lightning_mtp.native`). Nothing here names a method.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from lightning_mtp.hub_transport import is_hub_id
from lightning_mtp.methods.registry import METHODS
from lightning_mtp.native import (
    NATIVE_LAYOUTS,
    SPECULATORS_MTP_MODEL_TYPES,
    detect_native_layout,
    parallel_draft_snippet,
    serving_snippet,
    speculators_snippet,
)
from lightning_mtp.record import MTP_CONFIG

__all__ = ["model_card"]

_METRIC_COLUMNS = ("name", "tokens_per_forward", "speedup_vs_hf", "speedup_vs_ntp", "accuracy", "identical_to_ntp")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """Bench rows (``metrics["rows"]``, as ``lightning-mtp bench --json`` writes) as one table, other scalars as
    a second, and the command that produced them."""
    parts = []
    rows = metrics.get("rows") or []
    if rows:
        cols = [c for c in _METRIC_COLUMNS if any(c in r for r in rows)]
        parts.append("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |")
        parts[-1] += "".join("\n| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows)
    scalars = {k: v for k, v in metrics.items() if k not in {"rows", "command", "source"} and not isinstance(v, dict)}
    scalars.update(metrics.get("values") or {})
    if scalars:
        parts.append("| metric | value |\n| --- | --- |" + "".join(f"\n| {k} | {_fmt(v)} |" for k, v in scalars.items()))
    if metrics.get("command"):
        parts.append(f"Measured with:\n\n```bash\n{metrics['command']}\n```")
    if metrics.get("source"):
        parts.append(f"Source: {metrics['source']}")
    return "\n\n".join(parts)


def _method_summary(method: Mapping[str, Any] | None) -> str:
    """The method's own line (``MethodConfig.summary``), or its name for a method this process does not know."""
    if not method:
        return "a plain causal LM (next-token prediction; no MTP method)"
    name = method.get("name")
    config = METHODS.get(name)
    return config.summary if config is not None and config.summary else f"the {name!r} method"


def model_card(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    extra_tags: list[str] | tuple[str, ...] = (),
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for an artefact directory (or its parsed ``mtp_config.json``).

    YAML metadata: ``base_model`` (when the base is a Hub id), ``library_name: lightning-mtp``, tags, licence.
    Body: what the files are, the metrics table, usage code, serving flags where an engine supports the
    layout, and any bench plot (``*.png``) found in the directory. ``config`` replaces the directory's own
    ``mtp_config.json`` (e.g. with another base reference).
    """
    directory = None
    if isinstance(source, Mapping):
        config = dict(source)
    else:
        directory = Path(source)
        if config is None:
            config = json.loads((directory / MTP_CONFIG).read_text()) if (directory / MTP_CONFIG).is_file() else {}
    base = config.get("base_model") or {}
    base_ref = base.get("name_or_path") or ""
    method = config.get("method")
    method_name = (method or {}).get("name")
    where = repo_id or (directory.name if directory is not None else "path/to/artefact")
    tags = ["lightning-mtp", "multi-token-prediction", "speculative-decoding", *([method_name] if method_name else []),
            *extra_tags]
    data = ModelCardData(
        base_model=base_ref if is_hub_id(base_ref) else None,
        library_name="lightning-mtp",
        license=license,
        pipeline_tag="text-generation",
        tags=tags,
    )
    weights = config.get("weights") or ("method" if config.get("method") else "model")
    what = {
        "method": "only the trained MTP weights (`mtp_method.safetensors`); the base model is loaded from "
                  f"`{base_ref}`",
        "method+adapter": "the trained MTP weights and a PEFT LoRA adapter (`adapter/`); the base model is loaded "
                          f"from `{base_ref}`",
        "full": "the whole fine-tuned model (a Hugging Face model directory) plus the method's own weights",
        "native": f"a whole model in the {config.get('native_layout', 'native')} MTP layout (backbone and MTP layer "
                  "in one checkpoint), which inference engines serve directly",
        "model": "a Hugging Face model directory",
    }.get(weights, weights)
    lines = [f"# {where.split('/')[-1]}", ""]
    lines.append(f"Trained with lightning-mtp: {_method_summary(method)}.")
    if base_ref:
        rev = base.get("revision")
        lines.append(f"Base model: `{base_ref}`" + (f" (revision `{rev}`)" if rev else "")
                     + (f", vocabulary {base['vocab_size']}, hidden size {base['hidden_size']}." if "vocab_size" in base else "."))
    lines += ["", f"This repository holds {what}.", ""]
    if config.get("metrics"):
        lines += ["## Metrics", "", _metrics_markdown(config["metrics"]), ""]
    decoding = dict(config.get("decoding") or {})
    call = "".join(f", {k}={v!r}" for k, v in decoding.items())
    lines += [
        "## Usage", "",
        "```python",
        "from lightning_mtp import MTPModule",
        "",
        f'model = MTPModule.from_pretrained("{where}")',
        'ids = model.tokenizer("Question: ...\\nAnswer:", return_tensors="pt").input_ids',
        f"out = model.generate(ids, max_new_tokens=128{call})  # lossless speculative decoding by default",
        "print(model.tokenizer.decode(out.sequences[0]))",
        "print(out.stats.summary())  # tokens per forward, acceptance per position",
        "```", "",
        "```bash",
        f'lightning-mtp generate --model {where} --prompt "Question: ...\\nAnswer:"',
        "```", "",
    ]
    serving = _serving_markdown(directory, config, where)
    lines += ["## Serving", "", serving, ""]
    if method:
        lines += ["## Method configuration", "", "```json", json.dumps(method, indent=2), "```", ""]
    if directory is not None:
        for plot in sorted(directory.glob("*.png")):
            lines += [f"![{plot.stem}]({plot.name})", ""]
    version = config.get("library_version")
    if version:
        lines.append(f"Saved by lightning-mtp {version}.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def _serving_markdown(directory: Path | None, config: Mapping[str, Any], where: str) -> str:
    """Engine flags when the directory is a model with a native MTP layer an engine serves (see
    :mod:`lightning_mtp.convert`); otherwise say how to decode with lightning-mtp."""
    layout = detect_native_layout(directory) if directory is not None else None
    if layout is not None:
        k = int((config.get("decoding") or {}).get("num_draft_tokens", 3))
        return serving_snippet(layout, where, k)
    engine_config = _read_json(directory / "config.json") if directory is not None else {}
    if "speculators_model_type" in engine_config:  # lightning-mtp export --format speculators
        return speculators_snippet(where)
    if "pard_token" in engine_config:  # lightning-mtp export --format parallel_draft
        return parallel_draft_snippet(where)
    text = "vLLM and SGLang do not load lightning-mtp artefacts directly; decode with `MTPModule.generate` (above)."
    base = config.get("base_model") or {}
    method = (config.get("method") or {}).get("name")
    for lay in NATIVE_LAYOUTS.values():  # a head that a native layout can hold: say how to export it
        if lay.export_note and method == lay.default_method["name"] and base.get("model_type") == lay.backbone_model_type:
            text += f" {lay.export_note}: `lightning_mtp.convert.export_native(module, out_dir)`."
    if method in ("fast_mtp", "mtp_d") and base.get("model_type") in SPECULATORS_MTP_MODEL_TYPES:
        text += (" Its base is one speculators builds MTP layers for, so it also exports as a speculators `mtp` draft "
                 "(`lightning-mtp export DIR --format speculators --out OUT`; see docs/serving.md).")
    if method == "eagle3":
        text += (" It exports as a speculators `eagle3` draft, which `vllm serve` loads "
                 "(`lightning-mtp export DIR --format speculators --out OUT`; see docs/serving.md).")
    return text


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when there is none (or it is not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
