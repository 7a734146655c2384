"""Self-distillation: the backbone writes its own responses to prompts, and MTP heads train on those
(FastMTP, sec. 3: self-generated data beats the original dataset, 1.81x vs 1.67x).

Two entry points:

- :func:`distill` (``lightning-mtp distill --model M --data D --out DIR``): a resumable, sharded job for real
  datasets. Prompts are cut into shards of ``shard_size``; each shard is generated in batches by Lightning's
  predict loop (one shard per ``predict_step``, so shards spread over devices and processes) or by an
  OpenAI-compatible server (vLLM / SGLang ``serve``), and written atomically (a temporary name, then a
  rename), so a shard file exists only when complete. Sampling is seeded per shard, so a job killed and
  rerun produces exactly what an unbroken run does. When every shard exists, the records are filtered
  (unfinished, empty, too short or long, exact duplicates) into ``DIR/data.jsonl`` with a
  ``summary.json``; ``SFTDataModule(train=DIR)`` trains on it and refuses an unfinished job.
- :func:`cached_self_distill`: the in-process path of ``TinyMathDataModule(self_distill=...)``: small prompt
  sets, cached on disk as JSONL keyed by a hash of the weights, the prompts and the sampling settings.

Layout of a job directory::

    manifest.json        what the job is (model, data, sampling, shard size, prompts' hash), progress
    shards/shard-000000.jsonl ...   raw generations, one record per prompt
    data.jsonl           the filtered training records (prompt/response or messages), when complete
    summary.json         counts, tokens, what was filtered and why
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_mtp.backbone import load_backbone
from lightning_mtp.commands import CommandParser
from lightning_mtp.data.chat import RecordFormat, prompt_of, require_chat_template
from lightning_mtp.data.files import DISTILL_FORMAT, load_source
from lightning_mtp.errors import UserInputError
from lightning_mtp.io import atomic_write_text
from lightning_mtp.progress import LogProgressBar, is_terminal, progress_bar
from lightning_mtp.resolve import resolve_model_path

__all__ = [
    "DistillSummary",
    "OpenAIServer",
    "SelfDistill",
    "cached_self_distill",
    "default_cache_dir",
    "distill",
    "export_self_distill",
    "generate_batch",
    "main",
    "read_self_distill_file",
    "self_distill",
    "self_distill_fingerprint",
]

MANIFEST, SUMMARY, DATA_FILE, SHARD_DIR = "manifest.json", "summary.json", "data.jsonl", "shards"
SELF_DISTILL_FORMAT = "lightning-mtp/self-distill"  # the header of a shipped self-distillation file
APIS = ("auto", "completions", "chat")


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class SelfDistill:
    """Let the backbone write its own responses to the training prompts, and train on those.

    Defaults are FastMTP's sampling settings (temperature 0.6, top-k 20, top-p 0.95).
    """

    temperature: float = 0.6
    """Sampling temperature; 0 means greedy."""
    top_k: int = 20
    """Keep only the k most likely tokens (0 disables)."""
    top_p: float = 0.95
    """Nucleus sampling threshold (1.0 disables)."""
    max_new_tokens: int = 128
    """Longest response generated."""
    batch_size: int = 64
    """Prompts generated together."""
    seed: int = 0
    """Seed of the sampling RNG (the cache key includes it)."""
    deduplicate: bool = True
    """Drop exact duplicate (prompt, response) pairs."""

    def __post_init__(self) -> None:
        checks = {
            "temperature": (self.temperature, self.temperature >= 0, ">= 0 (0 is greedy)"),
            "top_k": (self.top_k, self.top_k >= 0, ">= 0 (0 disables)"),
            "top_p": (self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 disables)"),
            "max_new_tokens": (self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            "batch_size": (self.batch_size, self.batch_size >= 1, ">= 1"),
        }
        for name, (value, ok, valid) in checks.items():
            if not ok:
                raise UserInputError(f"SelfDistill {name} must be {valid}, got {value!r}")



def default_cache_dir() -> Path:
    """Where self-distilled answers are cached unless a ``cache_dir`` is given."""
    return Path.home() / ".cache" / "lightning-mtp" / "distill"


def generate_batch(model, prompts: Sequence[Sequence[int]], settings, pad_id: int,
                   stop_ids: set[int]) -> list[tuple[list[int], bool]]:
    """Sample one response per prompt (token ids) in one left-padded ``generate`` call.

    Returns ``(response ids, finished)`` per prompt: the ids stop before the first stop token, and
    ``finished`` is False when the response ran to ``settings.max_new_tokens`` without one.
    """
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[i, T - len(p):] = 1
    kwargs: dict[str, Any] = {"do_sample": settings.temperature > 0}
    if settings.temperature > 0:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k or None, top_p=settings.top_p)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, **kwargs)
    results = []
    for row in out[:, T:].tolist():  # (B, new)
        stop = next((j for j, t in enumerate(row) if t in stop_ids), None)
        results.append((row, False) if stop is None else (row[:stop], True))
    return results


def _stop_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def _pad_id(tokenizer, stop_ids: set[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if not stop_ids:
        raise UserInputError("the tokenizer has no pad or eos token, and the model no eos: cannot batch generation")
    return min(stop_ids)


def self_distill(model, tokenizer, prompts: list[str], settings, progress: bool = True) -> list[tuple[str, bool]]:
    """Sample one response per prompt from ``model`` with the :class:`SelfDistill` ``settings``.

    Returns ``(text, complete)`` pairs: ``complete`` is False when the response hit ``max_new_tokens``
    before the end-of-sequence token.
    """
    stop = {tokenizer.eos_token_id} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(settings.seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    was_training = model.training
    model.eval()
    responses: list[tuple[str, bool]] = []
    try:
        with progress_bar(disable=not progress) as bar, torch.no_grad():
            task = bar.add_task("self-distilling", total=len(prompts), unit="prompts")
            for i in range(0, len(prompts), settings.batch_size):
                chunk = prompts[i : i + settings.batch_size]
                ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                for new, complete in generate_batch(model, ids, settings, pad, stop):
                    responses.append((tokenizer.decode(new, skip_special_tokens=True), complete or not stop))
                bar.advance(task, len(chunk))
    finally:
        model.train(was_training)
        torch.set_rng_state(torch_state)
    return responses


def self_distill_fingerprint(model, prompts: list[str], settings) -> str:
    """The key of self-distilled answers (cache file name, shipped file header): a hash of the sampling settings,
    the prompts and the model's weights, byte for byte (a sum of the weights would depend on how many threads
    added them up, and the shipped answers must be found on every machine)."""
    h = hashlib.sha256()
    h.update(json.dumps(vars(settings) if not hasattr(settings, "__dataclass_fields__") else
                        {k: getattr(settings, k) for k in settings.__dataclass_fields__}, sort_keys=True).encode())
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def _cached_records(model, tokenizer, prompts: list[str], settings, cache_dir: str | None,
                    fingerprint: str) -> list[dict]:
    """Every generated ``{prompt, response, complete}`` record, from the cache or generated and cached."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"{fingerprint}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    responses = self_distill(model, tokenizer, prompts, settings)
    records = [{"prompt": p, "response": r, "complete": c} for p, (r, c) in zip(prompts, responses, strict=True)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def cached_self_distill(model, tokenizer, prompts: list[str], settings, cache_dir: str | None = None,
                        shipped: str | os.PathLike | None = None, keep_unfinished: bool = False
                        ) -> tuple[list[str], list[str]]:
    """Self-distilled ``(prompts, responses)``, from the cache when the same model/prompts/settings ran before.

    ``shipped``: a file written by :func:`export_self_distill`; its answers are used when they were generated for
    this model, these prompts and these settings (else they are generated and cached as usual). Exact duplicate
    pairs are dropped when ``settings.deduplicate``; empty responses always are, and unfinished ones (cut at
    ``max_new_tokens``) unless ``keep_unfinished`` (continuations of documents, which rarely end within it).
    """
    fingerprint = self_distill_fingerprint(model, prompts, settings)
    records = read_self_distill_file(shipped, fingerprint) if shipped is not None else None
    if shipped is not None and records is None:
        rank_zero_info(f"{shipped} holds answers generated for another model, prompts or sampling; self-distilling")
    if records is None:
        records = _cached_records(model, tokenizer, prompts, settings, cache_dir, fingerprint)
    seen: set[tuple[str, str]] = set()
    out_p, out_r = [], []
    for rec in records:
        key = (rec["prompt"], rec["response"])
        unfinished = not rec["complete"] and not keep_unfinished
        if not rec["response"].strip() or unfinished or (settings.deduplicate and key in seen):
            continue
        seen.add(key)
        out_p.append(rec["prompt"])
        out_r.append(rec["response"])
    if not out_p:
        raise UserInputError(f"self-distillation produced no usable responses (fingerprint {fingerprint}); check the "
                             "backbone")
    return out_p, out_r


def _header(path: Path, line: str) -> dict:
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != SELF_DISTILL_FORMAT:
        raise UserInputError(f"{path} is not a self-distillation file (its first line is no {SELF_DISTILL_FORMAT!r} "
                             "header); write one with export_self_distill (make self-distill)")
    return header


def read_self_distill_file(path: str | os.PathLike, fingerprint: str) -> list[dict] | None:
    """The records of a file written by :func:`export_self_distill` (JSONL, gzipped when it ends in ``.gz``), or
    None when it was generated for another model, prompts or settings (another ``fingerprint``)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"self-distillation file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        header = _header(path, f.readline())
        if header.get("fingerprint") != fingerprint:
            return None
        return [json.loads(line) for line in f if line.strip()]


def export_self_distill(model, tokenizer, prompts: list[str], settings, path: str | os.PathLike,
                        cache_dir: str | None = None, about: dict | None = None) -> Path:
    """Write the self-distilled answers :func:`cached_self_distill` trains on (taken from the cache, or generated
    into it) to ``path``, for shipping: a header line (format, fingerprint, ``about``), then the cache's records
    as they are. A ``.gz`` path is gzipped, byte-reproducibly (no timestamp)."""
    fingerprint = self_distill_fingerprint(model, prompts, settings)
    records = _cached_records(model, tokenizer, prompts, settings, cache_dir, fingerprint)
    header = {"format": SELF_DISTILL_FORMAT, "fingerprint": fingerprint, "records": len(records), **(about or {})}
    text = json.dumps(header) + "\n" + "".join(json.dumps(r) + "\n" for r in records)
    data = text.encode()
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class DistillSummary:
    """What a :func:`distill` run left in ``out``; ``complete`` once every shard exists and data.jsonl is written."""

    out: str
    complete: bool
    shards_done: int
    num_shards: int
    prompts: int
    generated: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    """Dropped records by reason: unfinished (hit the length limit), empty, too_short, too_long, duplicate."""
    prompt_tokens: int = 0
    """Prompt tokens of the kept records."""
    response_tokens: int = 0
    """Response tokens of the kept records."""
    seconds: float = 0.0
    """Wall time of this run."""

    def __str__(self) -> str:
        if not self.complete:
            return (f"distill {self.out}: {self.shards_done}/{self.num_shards} shards done ({self.prompts:,} prompts); "
                    "rerun the same command to continue")
        dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(self.filtered.items())) or "none"
        return (f"distill {self.out}: {self.kept:,} of {self.generated:,} records kept "
                f"({self.prompt_tokens:,} prompt + {self.response_tokens:,} response tokens); filtered: {dropped}; "
                f"{self.num_shards} shards, {self.seconds:.1f} s in this run\n"
                f"train on it with: data: {{class_path: lightning_mtp.data.datamodule.SFTDataModule, "
                f"init_args: {{train: {self.out}}}}}")


def distill(
    model,
    data: str | Sequence[str] | Sequence[dict],
    out: str | os.PathLike,
    *,
    settings=None,
    tokenizer=None,
    split: str = "train",
    dataset_config: str | None = None,
    data_format: str = "auto",
    fields: str = "auto",
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    text_field: str = "text",
    use_chat_template: bool = False,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    max_prompts: int | None = None,
    shard_size: int = 1000,
    max_shards: int | None = None,
    min_response_tokens: int = 1,
    max_response_tokens: int | None = None,
    keep_unfinished: bool = False,
    server: str | None = None,
    api: str = "auto",
    concurrency: int = 16,
    request_timeout: float = 600.0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    dtype: str = "auto",
    callbacks: list | None = None,
    progress: bool = True,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> DistillSummary:
    """Let ``model`` answer every prompt of ``data`` and write the answers to ``out`` as training data.

    Resumable: rerunning the same call continues where a killed one stopped (shards already written are
    kept; their sampling is seeded per shard, so the result equals an unbroken run's). A different job in
    ``out`` is refused unless ``overwrite``.

    Args:
        model: a model directory, zoo name or Hub id (loaded with its tokenizer), a loaded ``PreTrainedModel``
            (pass ``tokenizer``), or with ``server`` the model name the server serves.
        data: prompts: a source :func:`~lightning_mtp.data.files.load_source` reads (file, glob, directory, Hub
            id), or a list of prompt strings or records. Chats are answered after their last non-assistant
            message; plain prompts are ``[bos] prompt`` as in training.
        out: the job directory.
        settings: a :class:`~lightning_mtp.data.datamodule.SelfDistill` (sampling, batch size, seed,
            deduplication); default FastMTP's sampling (temperature 0.6, top-k 20, top-p 0.95).
        tokenizer: a tokenizer or its directory; default the model's. With ``server`` it is optional, and
            needed only to render chats for ``api="completions"``.
        split: the split of a Hub dataset (or ``DatasetDict``) to read.
        dataset_config: the configuration (subset) of a Hub dataset.
        data_format: ``auto`` (file suffix, or a Hub id), ``json``, ``parquet``, ``text``, ``disk``, ``hub``
            (see ``load_source``).
        fields: which kind of record holds the prompt: ``messages``, ``prompt_response``, ``text``, or ``auto``
            (messages, then prompt, then text).
        prompt_field: field of a plain prompt.
        messages_field: field of a chat.
        text_field: field of plain text.
        use_chat_template: render plain prompts as a one-turn chat (the output records are then chats).
        chat_template: a Jinja template used instead of the tokenizer's.
        system_prompt: put first in every chat without a system message.
        max_prompts: use only the first N prompts.
        shard_size: prompts per shard (the unit of resumption and of work per device).
        max_shards: generate at most this many new shards in this run, then stop (the rest on a later run).
        min_response_tokens: drop responses shorter than this many tokens.
        max_response_tokens: drop responses longer than this many tokens (None: no upper bound).
        keep_unfinished: keep responses cut at ``max_new_tokens`` (dropped by default: they teach no ending).
        server: base URL of an OpenAI-compatible server (``http://host:8000``); None generates locally.
        api: ``completions``, ``chat``, or ``auto`` (chat endpoint for chats, completions for plain prompts).
        concurrency: requests in flight at once (the server batches them).
        request_timeout: seconds one request may take.
        accelerator: the Lightning ``Trainer`` accelerator of local generation.
        devices: the ``Trainer`` devices of local generation (``devices=4`` generates on four GPUs with DDP,
            one shard per step each).
        strategy: the ``Trainer`` strategy of local generation.
        dtype: dtype the model is loaded in (``bfloat16`` on GPUs).
        callbacks: extra Lightning callbacks for the predict loop.
        progress: progress bars and the final summary on stderr.
        overwrite: replace a different job found in ``out``.
        cache_dir: the ``datasets`` cache for reading ``data``.
    """
    settings = settings if settings is not None else SelfDistill()
    _check_settings(settings, shard_size, max_shards, min_response_tokens, max_response_tokens, api, concurrency)
    started = time.perf_counter()
    fmt = RecordFormat(fields=fields, prompt_field=prompt_field, messages_field=messages_field, text_field=text_field,
                       use_chat_template=use_chat_template, chat_template=_read_template(chat_template),
                       system_prompt=system_prompt)
    model_ref, model, tokenizer = _resolve_model(model, tokenizer, server)  # weights are loaded only if needed
    records, source = _read_prompts(data, split, dataset_config, data_format, max_prompts, cache_dir)
    fmt = fmt.resolve(records.column_names, source, prompts_only=True)
    chat = fmt.uses_chat_template
    api = ("chat" if chat else "completions") if api == "auto" else api
    template = None
    if chat and not (server is not None and api == "chat"):  # the chat is rendered here, not by a server
        if tokenizer is None:
            raise UserInputError("api='completions' sends rendered text, so chat prompts need a local tokenizer with a "
                                 "chat template: pass tokenizer, or use api='chat'")
        template = require_chat_template(tokenizer, fmt, f"{source} (chat prompts)")
    use_tok = tokenizer if (server is None or template is not None) else None
    items = []
    for i, record in enumerate(_progress_iter(records, "reading prompts", progress and _is_rank_zero())):
        ids, text, history = prompt_of(record, fmt, use_tok, template, f"row {i + 1} of {source}")
        items.append({"id": i, "ids": ids, "text": text, "history": history})

    out = Path(out)
    spec = {
        "format": DISTILL_FORMAT,
        "model": model_ref,
        "data": source,
        "fields": asdict(fmt) | {"chat_template": None if fmt.chat_template is None else _sha(fmt.chat_template)},
        "sampling": {k: v for k, v in asdict(settings).items() if k != "deduplicate"},  # a filter, applied at the end
        "shard_size": shard_size,
        "server": None if server is None else {"api": api},
        "num_prompts": len(items),
        "num_shards": math.ceil(len(items) / shard_size),
        "prompts_sha256": _sha(json.dumps([[it["text"], it["history"]] for it in items])),
    }
    manifest = _open_job(out, spec, overwrite)
    shard_dir = out / SHARD_DIR
    done = _done_shards(shard_dir, spec["num_shards"])
    pending = [s for s in range(spec["num_shards"]) if s not in done]
    if max_shards is not None:
        pending = pending[:max_shards]
    if pending:
        shards = [{"index": s, "items": items[s * shard_size:(s + 1) * shard_size]} for s in pending]
        if server is None:
            if model is None:
                model = load_backbone(model_ref, dtype=dtype)[0]
            rank_zero = _generate_local(model, tokenizer, shards, settings, shard_dir, accelerator, devices, strategy,
                                        callbacks or [], progress)
        else:
            _generate_server(OpenAIServer(server, model_ref, timeout=request_timeout), shards, settings, api,
                             shard_dir, concurrency, progress, use_tok)
            rank_zero = True
        if not rank_zero:  # other processes of a multi-device run: rank 0 writes the data and summary
            return DistillSummary(str(out), False, len(_done_shards(shard_dir, spec["num_shards"])), spec["num_shards"], len(items))
    summary = _finish(out, manifest, settings, min_response_tokens, max_response_tokens, keep_unfinished,
                      time.perf_counter() - started)
    if progress:
        print(summary, file=sys.stderr)
    return summary


def _check_settings(settings, shard_size, max_shards, min_tokens, max_tokens, api, concurrency) -> None:
    checks = [
        ("temperature", settings.temperature, settings.temperature >= 0, ">= 0 (0 is greedy)"),
        ("top_k", settings.top_k, settings.top_k >= 0, ">= 0 (0 disables)"),
        ("top_p", settings.top_p, 0 < settings.top_p <= 1, "in (0, 1]"),
        ("max_new_tokens", settings.max_new_tokens, settings.max_new_tokens >= 1, ">= 1"),
        ("batch_size", settings.batch_size, settings.batch_size >= 1, ">= 1"),
        ("shard_size", shard_size, shard_size >= 1, ">= 1"),
        ("max_shards", max_shards, max_shards is None or max_shards >= 1, ">= 1 or None"),
        ("min_response_tokens", min_tokens, min_tokens >= 0, ">= 0"),
        ("max_response_tokens", max_tokens, max_tokens is None or max_tokens >= max(min_tokens, 1),
         ">= min_response_tokens or None"),
        ("concurrency", concurrency, concurrency >= 1, ">= 1"),
    ]
    for name, value, ok, want in checks:
        if not ok:
            raise UserInputError(f"{name} must be {want}, got {value!r}")
    if api not in APIS:
        raise UserInputError(f"unknown api {api!r}; choose one of {list(APIS)}")


def _read_template(template: str | None) -> str | None:
    if template is None or "{" in template:
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise UserInputError(f"chat_template file {template!r} does not exist")
    return path.read_text()


def _resolve_model(model, tokenizer, server: str | None):
    """``(reference recorded in the manifest, the model if already loaded, tokenizer or None)``."""
    from transformers import AutoTokenizer, PreTrainedModel

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if server is not None:
        if not isinstance(model, str) or not model:
            raise UserInputError("with server, model must be the name the server serves its model under")
        return model, None, tokenizer
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise UserInputError("distill with a loaded model needs its tokenizer: pass tokenizer")
        return getattr(model, "name_or_path", "") or type(model).__name__, model, tokenizer
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(model)))
        except (OSError, ValueError) as err:
            raise UserInputError(f"model {str(model)!r} has no loadable tokenizer ({err}); pass tokenizer") from None
    return str(model), None, tokenizer


def _read_prompts(data, split, dataset_config, data_format, max_prompts, cache_dir):
    import datasets

    if isinstance(data, str):
        records, source = load_source(data, split=split, data_format=data_format, dataset_config=dataset_config,
                                      cache_dir=cache_dir, what="distill data"), f"distill data {data!r}"
    else:
        rows = [{"prompt": r} if isinstance(r, str) else r for r in data]
        if not rows:
            raise UserInputError("distill data is an empty list: no prompts")
        if not all(isinstance(r, dict) for r in rows):
            raise UserInputError("distill data must be a source string, or a list of prompt strings or of records")
        records, source = datasets.Dataset.from_list(rows), "distill data (list)"
    if max_prompts is not None:
        if max_prompts < 1:
            raise UserInputError(f"max_prompts must be >= 1 or None, got {max_prompts}")
        records = records.select(range(min(max_prompts, len(records))))
    return records, source


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _open_job(out: Path, spec: dict, overwrite: bool) -> dict:
    """The job's manifest: created, or the existing one when it describes the same job."""
    path = out / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        job = manifest.get("job", {})
        differ = sorted(k for k in spec if job.get(k) != spec[k])
        if differ and not overwrite:
            raise UserInputError(f"{out} holds a different distill job (differs in {differ}); "
                                 "use another out directory, or overwrite=True (--overwrite) to replace it")
        if not differ:
            return manifest
        for name in (MANIFEST, SUMMARY, DATA_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out} exists and is not a distill job directory (no {MANIFEST}); choose another out")
    manifest = {"format": spec["format"], "version": 1, "job": spec, "num_shards": spec["num_shards"],
                "shards_done": 0, "complete": False, "data_file": DATA_FILE}
    if _is_rank_zero():
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _shard_path(shard_dir: Path, index: int) -> Path:
    return shard_dir / f"shard-{index:06d}.jsonl"


def _done_shards(shard_dir: Path, num_shards: int) -> set[int]:
    """Indices of complete shards. A shard file exists only when complete; leftovers of a killed write
    (hidden temporary names) are removed."""
    if not shard_dir.is_dir():
        return set()
    if _is_rank_zero():
        for stale in shard_dir.glob(".shard-*.tmp-*"):
            stale.unlink(missing_ok=True)
    return {s for s in range(num_shards) if _shard_path(shard_dir, s).is_file()}


def _write_shard(shard_dir: Path, index: int, records: list[dict]) -> None:
    atomic_write_text(_shard_path(shard_dir, index), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _shard_seed(seed: int, index: int) -> int:
    """Sampling seed of shard ``index``: a function of the job's seed and the shard alone, so resuming
    (or spreading shards over devices) reproduces an unbroken run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") % (2**63)


def _record(item: dict, response: str, finish_reason: str, prompt_tokens: int, response_tokens: int) -> dict:
    """The training record of one answered prompt: a chat when the prompt was one, else prompt/response."""
    base = ({"messages": [*item["history"], {"role": "assistant", "content": response}]} if item["history"] is not None
            else {"prompt": item["text"], "response": response})
    return {"id": item["id"], **base, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens}


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _progress_iter(records, description: str, enabled: bool):
    with progress_bar(disable=not enabled) as bar:
        task = bar.add_task(description, total=len(records), unit="records")
        for record in records:
            yield record
            bar.advance(task)


# ---------------------------------------------------------------------------------------------- local
def _identity(x):
    return x


def _generate_local(model, tokenizer, shards, settings, shard_dir, accelerator, devices, strategy, callbacks,
                    progress) -> bool:
    """Generate ``shards`` with Lightning's predict loop (one shard per step; shards spread over devices).
    Returns whether this process is rank 0."""
    from torch.utils.data import DataLoader

    lines = [LogProgressBar()] if progress and not is_terminal() else []  # a log gets lines, not tqdm redraws
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                        callbacks=[ShardWriter(shard_dir), *callbacks, *lines])
    loader = DataLoader(shards, batch_size=None, shuffle=False, collate_fn=_identity)  # one shard per step
    with warnings.catch_warnings():  # the writer needs no batch indices; Lightning warns it cannot infer them
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(ShardGenerator(model, tokenizer, settings), dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("distill")  # every process's shards are on disk before rank 0 finishes the job
    return trainer.is_global_zero


class ShardGenerator(L.LightningModule):
    """``predict_step`` answers one shard: batched ``generate`` with the sampling seeded for that shard."""

    def __init__(self, model, tokenizer, settings) -> None:
        super().__init__()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.stop_ids = _stop_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.stop_ids)

    def predict_step(self, shard: dict, batch_idx: int) -> dict:
        torch.manual_seed(_shard_seed(self.settings.seed, shard["index"]))
        records, bs = [], self.settings.batch_size
        items = shard["items"]
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            outs = generate_batch(self.model, [it["ids"] for it in chunk], self.settings, self.pad_id, self.stop_ids)
            for it, (new, finished) in zip(chunk, outs, strict=True):
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                records.append(_record(it, text, "stop" if finished else "length", len(it["ids"]), len(new)))
        return {"index": shard["index"], "records": records}


class ShardWriter(BasePredictionWriter):
    """Writes each shard the predict loop returns, atomically, as ``shards/shard-NNNNNN.jsonl``."""

    def __init__(self, shard_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        _write_shard(self.shard_dir, prediction["index"], prediction["records"])


# ---------------------------------------------------------------------------------------------- server
class OpenAIServer:
    """A small client of an OpenAI-compatible server (``vllm serve``, ``python -m sglang.launch_server``).

    Sends ``/v1/completions`` (prompt text) or ``/v1/chat/completions`` (messages; the server applies the
    model's chat template) with the job's sampling (``top_k`` is a vLLM/SGLang extension) and a per-prompt
    ``seed``. A key in ``OPENAI_API_KEY`` is sent as a bearer token and never printed.
    """

    def __init__(self, url: str, model: str, timeout: float = 600.0, retries: int = 3) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model, self.timeout, self.retries = model, timeout, retries

    def _request(self, path: str, payload: dict | None = None, retries: int | None = None) -> dict:
        """GET (no payload) or POST JSON; server errors and dropped connections are retried with back-off."""
        retries = self.retries if retries is None else retries
        headers = {"Content-Type": "application/json"}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if payload is None else json.dumps(payload).encode()
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                             method="GET" if payload is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == retries:
                    body = err.read().decode(errors="replace")[:500]
                    raise RuntimeError(f"{self.base}{path} answered HTTP {err.code}: {body}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == retries:
                    raise ConnectionError(f"{self.base}{path} did not answer: {err}") from None
            time.sleep(min(2**attempt, 8))
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Fail early and clearly: the server answers and serves ``self.model``."""
        try:
            served = [m.get("id") for m in self._request("/models", retries=0).get("data", [])]
        except (ConnectionError, RuntimeError) as err:
            raise UserInputError(f"no OpenAI-compatible server answers at {self.base}: {err}") from None
        if served and self.model not in served:
            raise UserInputError(f"the server at {self.base} serves {served}, not {self.model!r}; pass one of them as model")

    def generate(self, item: dict, settings, api: str, seed: int) -> tuple[str, str, int, int]:
        """``(text, finish_reason, prompt_tokens, completion_tokens)`` of one prompt."""
        payload: dict[str, Any] = {"model": self.model, "max_tokens": settings.max_new_tokens,
                                   "temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}
        if settings.top_k:
            payload["top_k"] = settings.top_k
        if api == "chat":
            history = item["history"] if item["history"] is not None else [{"role": "user", "content": item["text"]}]
            answer = self._request("/chat/completions", {**payload, "messages": history})
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        else:
            answer = self._request("/completions", {**payload, "prompt": item["text"]})
            choice = answer["choices"][0]
            text = choice.get("text") or ""
        usage = answer.get("usage") or {}
        return text, choice.get("finish_reason") or "stop", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)


def _generate_server(client: OpenAIServer, shards, settings, api, shard_dir, concurrency, progress, tokenizer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client.check()
    total = sum(len(s["items"]) for s in shards)
    with ThreadPoolExecutor(max_workers=concurrency) as pool, progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"generating on {client.base}", total=total, unit="prompts")

        def one(item: dict) -> dict:
            # seeded per prompt: the server may batch requests in any order
            text, reason, p_tok, r_tok = client.generate(item, settings, api, _shard_seed(settings.seed, item["id"]))
            if not r_tok and tokenizer is not None:  # a server that reports no usage: count locally
                r_tok = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            bar.advance(task)
            return _record(item, text, reason, p_tok, r_tok)

        for shard in shards:  # requests of one shard in flight together; the shard is written when all answered
            _write_shard(shard_dir, shard["index"], list(pool.map(one, shard["items"])))


# ---------------------------------------------------------------------------------------------- finishing
def _finish(out: Path, manifest: dict, settings, min_tokens: int, max_tokens: int | None, keep_unfinished: bool,
            seconds: float) -> DistillSummary:
    """Filter the complete shards into data.jsonl and write summary.json; report progress while incomplete."""
    num_shards = manifest["num_shards"]
    done = _done_shards(out / SHARD_DIR, num_shards)
    prompts = manifest["job"]["num_prompts"]
    if len(done) < num_shards:
        manifest = {**manifest, "shards_done": len(done), "complete": False}
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return DistillSummary(str(out), False, len(done), num_shards, prompts, seconds=seconds)
    filtered: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[str] = []
    generated = p_tokens = r_tokens = 0
    for s in range(num_shards):
        for line in _shard_path(out / SHARD_DIR, s).read_text().splitlines():
            rec = json.loads(line)
            generated += 1
            response = rec["messages"][-1]["content"] if "messages" in rec else rec["response"]
            key = json.dumps(rec.get("messages") or [rec.get("prompt"), response], ensure_ascii=False)
            if rec["finish_reason"] != "stop" and not keep_unfinished:
                filtered["unfinished"] += 1
            elif not response.strip():
                filtered["empty"] += 1
            elif rec["response_tokens"] < min_tokens:
                filtered["too_short"] += 1
            elif max_tokens is not None and rec["response_tokens"] > max_tokens:
                filtered["too_long"] += 1
            elif settings.deduplicate and key in seen:
                filtered["duplicate"] += 1
            else:
                seen.add(key)
                kept.append(line)
                p_tokens += rec["prompt_tokens"]
                r_tokens += rec["response_tokens"]
    if not kept:
        raise UserInputError(f"self-distillation in {out} kept no record of {generated} ({dict(filtered)}); "
                             "raise max_new_tokens, or relax min/max_response_tokens")
    summary = DistillSummary(str(out), True, num_shards, num_shards, prompts, generated, len(kept), dict(filtered),
                             p_tokens, r_tokens, seconds)
    atomic_write_text(out / DATA_FILE, "".join(line + "\n" for line in kept))
    record = asdict(summary) | {"filters": {"min_response_tokens": min_tokens, "max_response_tokens": max_tokens,
                                            "keep_unfinished": keep_unfinished, "deduplicate": settings.deduplicate}}
    atomic_write_text(out / SUMMARY, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / MANIFEST, json.dumps({**manifest, "shards_done": num_shards, "complete": True}, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> None:
    """``lightning-mtp distill --model M --data D --out DIR [options]``."""
    d = SelfDistill()
    p = CommandParser(prog="lightning-mtp distill",
                      description="Let a model answer prompts (resumable, sharded) and write training data.")
    p.add_argument("--model", required=True, help="model directory, zoo name or Hub id; with --server the served name")
    p.add_argument("--data", required=True, help="prompts: JSONL/Parquet/text file, glob, directory, or Hub dataset id")
    p.add_argument("--out", required=True, help="job directory (rerun the same command to resume)")
    g = p.add_argument_group("data")
    g.add_argument("--split", default="train")
    g.add_argument("--dataset-config", default=None, help="configuration (subset) of a Hub dataset")
    g.add_argument("--data-format", default="auto", help="auto, json, parquet, text, disk, hub")
    g.add_argument("--fields", default="auto", help="auto, messages, prompt_response, text")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--messages-field", default="messages")
    g.add_argument("--text-field", default="text")
    g.add_argument("--use-chat-template", action="store_true", help="render plain prompts as a one-turn chat")
    g.add_argument("--chat-template", default=None, help="a Jinja template (text or .jinja file) replacing the tokenizer's")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--max-prompts", type=int, default=None)
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g = p.add_argument_group("sampling (FastMTP defaults)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per generate call")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("job and filtering")
    g.add_argument("--shard-size", type=int, default=1000)
    g.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards")
    g.add_argument("--min-response-tokens", type=int, default=1)
    g.add_argument("--max-response-tokens", type=int, default=None)
    g.add_argument("--keep-unfinished", action="store_true", help="keep responses cut at --max-new-tokens")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicate (prompt, response) pairs")
    g.add_argument("--overwrite", action="store_true", help="replace a different job found in --out")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("where to generate")
    g.add_argument("--server", default=None, help="OpenAI-compatible server URL (vLLM / SGLang), e.g. http://localhost:8000")
    g.add_argument("--api", default="auto", help="auto, completions, chat")
    g.add_argument("--concurrency", type=int, default=16)
    g.add_argument("--accelerator", default="auto")
    g.add_argument("--devices", default="auto", help="Lightning devices (e.g. 4)")
    g.add_argument("--strategy", default="auto")
    g.add_argument("--dtype", default="auto", help="e.g. bfloat16")
    a = p.parse_args(argv)
    settings = SelfDistill(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                           batch_size=a.batch_size, seed=a.seed, deduplicate=not a.no_dedup)
    devices = int(a.devices) if str(a.devices).isdigit() else a.devices
    distill(a.model, a.data, a.out, settings=settings, tokenizer=a.tokenizer, split=a.split,
            dataset_config=a.dataset_config, data_format=a.data_format, fields=a.fields, prompt_field=a.prompt_field,
            messages_field=a.messages_field, text_field=a.text_field, use_chat_template=a.use_chat_template,
            chat_template=a.chat_template, system_prompt=a.system_prompt, max_prompts=a.max_prompts,
            shard_size=a.shard_size, max_shards=a.max_shards, min_response_tokens=a.min_response_tokens,
            max_response_tokens=a.max_response_tokens, keep_unfinished=a.keep_unfinished, server=a.server, api=a.api,
            concurrency=a.concurrency, accelerator=a.accelerator, devices=devices, strategy=a.strategy, dtype=a.dtype,
            progress=not a.no_progress, overwrite=a.overwrite)
