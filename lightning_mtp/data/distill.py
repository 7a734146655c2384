"""Self-distillation: the backbone writes its own responses to the training prompts (FastMTP, sec. 3).

Responses are generated in batches with ``generate`` (left padding), cached on disk as JSONL keyed by a
hash of the backbone's weights, the prompts and the sampling settings, and written atomically, so a
second run reuses them and a killed run never leaves a half file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lightning_mtp.artifacts import atomic_write_text

__all__ = ["self_distill", "cached_self_distill"]


def self_distill(model, tokenizer, prompts: list[str], settings, progress: bool = True) -> list[tuple[str, bool]]:
    """Sample one response per prompt from ``model`` with the :class:`SelfDistill` ``settings``.

    Returns ``(text, complete)`` pairs: ``complete`` is False when the response hit ``max_new_tokens``
    before the end-of-sequence token.
    """
    from rich.progress import Progress

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(settings.seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    responses: list[tuple[str, bool]] = []
    eos = tokenizer.eos_token_id
    sample = settings.temperature > 0
    try:
        with Progress(disable=not progress, transient=True) as bar, torch.no_grad():
            task = bar.add_task("self-distilling", total=len(prompts))
            for i in range(0, len(prompts), settings.batch_size):
                chunk = prompts[i : i + settings.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                kwargs = {"do_sample": sample}
                if sample:
                    kwargs.update(temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p)
                out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, pad_token_id=pad, **kwargs)
                new = out[:, enc["input_ids"].shape[1] :]
                complete = (new == eos).any(dim=1).tolist() if eos is not None else [True] * len(chunk)
                responses.extend(zip(tokenizer.batch_decode(new, skip_special_tokens=True), complete, strict=True))
                bar.advance(task, len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.set_rng_state(torch_state)
    return responses


def _fingerprint(model, prompts: list[str], settings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(vars(settings) if not hasattr(settings, "__dataclass_fields__") else
                        {k: getattr(settings, k) for k in settings.__dataclass_fields__}, sort_keys=True).encode())
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    with torch.no_grad():
        for name, param in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(f"{float(param.float().sum()):.6e}/{float(param.float().abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def cached_self_distill(model, tokenizer, prompts: list[str], settings, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """Self-distilled ``(prompts, responses)``, from the cache when the same model/prompts/settings ran before.

    Exact duplicate pairs are dropped when ``settings.deduplicate``; empty and unfinished responses (cut
    at ``max_new_tokens``) always are.
    """
    from lightning_mtp.data.datamodule import TinyMathDataModule

    root = Path(cache_dir) if cache_dir else TinyMathDataModule.default_cache_dir()
    path = root / f"{_fingerprint(model, prompts, settings)}.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
    else:
        responses = self_distill(model, tokenizer, prompts, settings)
        records = [{"prompt": p, "response": r, "complete": c} for p, (r, c) in zip(prompts, responses, strict=True)]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    seen: set[tuple[str, str]] = set()
    out_p, out_r = [], []
    for rec in records:
        key = (rec["prompt"], rec["response"])
        if not rec["response"].strip() or not rec["complete"] or (settings.deduplicate and key in seen):
            continue
        seen.add(key)
        out_p.append(rec["prompt"])
        out_r.append(rec["response"])
    if not out_p:
        raise ValueError(f"self-distillation produced no usable responses (cache {path}); check the backbone")
    return out_p, out_r
