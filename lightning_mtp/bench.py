"""``lightning-mtp bench``: decoders side by side, in one process, on the same prompts, interleaved.

Entries (batch size 1 unless the name says ``@bN``):

- ``hf_greedy``: ``backbone.generate`` greedy with KV cache, the baseline every speed-up is measured against;
- ``hf_prompt_lookup``: HF prompt-lookup decoding (``prompt_lookup_num_tokens``), a peer;
- ``hf_assisted``: HF assisted generation with a small draft model (``assistant_model``), a peer;
- ``ntp``: our decoder with no drafts: the same machinery as the methods, so ``speedup_vs_ntp`` is the gain
  due to drafting alone;
- each model's own entries (``MTPMethod.bench_entries``: ``fast_mtp``, ``mtp_d``, ``mask_token/confadapt@0.9``...);
- ``hf_greedy@b8``, ``ntp@b8`` and the methods' entries ``@b8``: batches of 8 left-padded prompts.

Timing: warm-up runs first; then every prompt (or batch) goes through every decoder of its batch size in
a rotating order, ``--repeats`` times, and the median time per prompt is kept. Ratios are against the
baseline of the same batch size measured in the same run on the same prompts. Peak memory comes from one
extra untimed run per entry (CUDA: the allocator's peak; CPU with glibc: the peak of heap bytes in use).
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

import lightning_mtp.convert as convert
import lightning_mtp.hub as hub
import lightning_mtp.zoo as zoo
from lightning_mtp.artifacts import MTP_CONFIG, atomic_write_text, read_mtp_config
from lightning_mtp.backbone import eos_ids, load_backbone
from lightning_mtp.cli import CommandParser
from lightning_mtp.data import tiny_world
from lightning_mtp.data.chat import RecordFormat, prompt_of, render_chat
from lightning_mtp.data.tiny_math import answer_accuracy, problems
from lightning_mtp.decoding.speculative import pad_token_id
from lightning_mtp.decoding.tree import TreeShape
from lightning_mtp.errors import UserInputError
from lightning_mtp.module import MTPModule
from lightning_mtp.progress import progress_bar
from lightning_mtp.resolve import resolve_model_path
from lightning_mtp.zoo_index import ZOO_DIR

__all__ = ["Decoder", "load_models", "load_prompts", "prompt_sets", "read_prompts", "render_prompts", "run_bench",
           "main", "markdown_table", "summary_rows", "write_plots"]

# the shipped worlds' bases and the draft models of their hf_assisted peer (peers default to on for them)
SHIPPED_DRAFTS = {"tiny-math-base": "tiny-math-draft", "tiny-world-base": "tiny-world-draft"}
BASE = -1  # Decoder.reference of the entries that run on the untouched base model (baselines, peers)
CHAT = RecordFormat(fields="messages")  # how a prompt file's chat records are read
PROMPTS_DIR = ZOO_DIR.parent / "benchmarks" / "prompts"  # the shipped prompt sets, in the checkout
WORLDS = {"tiny-world": tiny_world.DOMAINS}  # a world name on --prompts: one prompt set per domain


# ---------------------------------------------------------------------------------------------- prompts


Prompt = str | list[dict[str, str]]  # a prompt's text, or a chat to render with the tokenizer's chat template


def read_prompts(spec: str, n: int) -> tuple[list[Prompt], list[int] | None]:
    """``tiny-math`` (held-out test problems, with answers) or a JSONL file whose records have a ``prompt`` (text)
    or a ``messages`` field (a chat: a list of ``{role, content}``, answered after its last non-assistant message).

    Chats come back as message lists, for :func:`render_prompts`; ``answer`` (an int in every record) is kept.
    """
    if n < 1:
        raise UserInputError(f"--n must be >= 1, got {n}")
    if spec == "tiny-math":
        ps = problems("test", n)
        return [p.prompt for p in ps], [p.answer for p in ps]
    path = Path(spec)
    if not path.is_file():
        raise UserInputError(f"prompt set {spec!r} is neither 'tiny-math' nor an existing JSONL file (the other "
                             f"shipped sets: tiny-world, or one of its domains {', '.join(WORLDS['tiny-world'])})")
    prompts: list[Prompt] = []
    answers: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = _record(line, f"{spec}:{lineno}")
        prompts.append(_prompt(record, f"{spec}:{lineno}"))
        if isinstance(record.get("answer"), int):
            answers.append(record["answer"])
        if len(prompts) == n:
            break
    if not prompts:
        raise UserInputError(f"{spec} holds no prompts")
    return prompts, (answers if len(answers) == len(prompts) else None)


def _record(line: str, where: str) -> dict:
    expected = "expected one JSON object per line with a 'prompt' or a 'messages' field"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise UserInputError(f"{where} is not valid JSON ({expected})") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{where} is a JSON {type(record).__name__}, not an object ({expected})")
    return record


def _prompt(record: dict, where: str) -> Prompt:
    """A record's prompt: its ``prompt`` text, or its ``messages`` chat, checked and cut (see ``prompt_of``)."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if "messages" in record:
        return prompt_of(record, CHAT, None, None, where)[2]  # no tokenizer yet: the checked chat
    raise UserInputError(f"{where} has no string 'prompt' field and no 'messages' field (a chat)")


def render_prompts(prompts: list[Prompt], tokenizer, spec: str) -> list[str]:
    """Prompt texts: chats rendered with the tokenizer's chat template and its generation prompt."""
    if all(isinstance(p, str) for p in prompts):
        return list(prompts)
    if tokenizer is None:
        raise UserInputError(f"{spec} holds chats ('messages'): pass the tokenizer that renders them")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "the base model"
        raise UserInputError(f"{spec} holds chats ('messages'), which bench renders with the tokenizer's chat template, "
                             f"but the tokenizer of {name!r} has none: write the prompts rendered as text in a 'prompt' "
                             "field, or bench a model whose tokenizer has a chat template")
    return [p if isinstance(p, str) else render_chat(tokenizer, p, template, f"{spec}, prompt {i}",
                                                     add_generation_prompt=True)
            for i, p in enumerate(prompts)]


def prompt_sets(spec: str) -> list[tuple[str, str]]:
    """``(domain, prompt set)`` for each comma-separated item of ``--prompts``.

    An item is ``tiny-math``, a JSONL file (its domain is the file's stem), a tiny-world domain (``code``, ``prose``,
    ``math``: the held-out prompts shipped in ``benchmarks/prompts/tiny-world``) or a world name (``tiny-world``:
    all of its domains). One set gives one table; several give a table each plus a summary (Spec-Bench style).
    """
    sets = []
    for item in (part.strip() for part in spec.split(",")):
        if item in WORLDS:
            sets += [(domain, str(PROMPTS_DIR / item / f"{domain}.jsonl")) for domain in WORLDS[item]]
        elif item in WORLDS["tiny-world"]:
            sets.append((item, str(PROMPTS_DIR / "tiny-world" / f"{item}.jsonl")))
        elif item:
            sets.append((item if item == "tiny-math" else Path(item).stem, item))
    if not sets:
        raise UserInputError(f"--prompts {spec!r} names no prompt set")
    names = [name for name, _ in sets]
    if len(set(names)) < len(names):
        raise UserInputError(f"--prompts {spec!r} names a domain twice ({', '.join(names)}): give each set once")
    return sets


def load_prompts(spec: str, n: int, tokenizer=None) -> tuple[list[str], list[int] | None]:
    """:func:`read_prompts` then :func:`render_prompts` (a file of chats needs the ``tokenizer``)."""
    prompts, answers = read_prompts(spec, n)
    return render_prompts(prompts, tokenizer, spec), answers


# ---------------------------------------------------------------------------------------------- decoders


@dataclass
class Decoder:
    """One bench entry: ``run(ids, mask)`` decodes a (B, n) batch and returns each row's new tokens, our
    decoder's stats (None for HF's) and the number of backbone forwards it made."""

    name: str
    batch_size: int
    run: Callable[[torch.Tensor, torch.Tensor | None], tuple[list[list[int]], object | None, int]]
    reference: int  # index of the model whose backbone's greedy output this entry must reproduce; BASE: the base
    kind: str  # "baseline", "peer" or "method"
    seconds: list[float] = field(default_factory=list)  # per prompt or batch, median over repeats
    outputs: list[list[int]] = field(default_factory=list)  # per prompt
    forwards: int = 0
    stats: object | None = None  # merged DecodeStats of our decoders
    peak_memory_mb: float | None = None


def _cut(sequences: torch.Tensor, width: int, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first EOS (what follows is padding)."""
    rows = []
    for row in sequences[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


class _CountForwards:
    """Counts calls of a module's forward (how many target-model forwards an HF decoding made) until closed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


def _hf_decoder(backbone, counter: _CountForwards, eos: set[int], pad: int, max_new_tokens: int, **kwargs):
    def run(ids: torch.Tensor, mask: torch.Tensor | None):
        before = counter.calls
        seq = backbone.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **kwargs)
        return _cut(seq, ids.shape[1], eos), None, counter.calls - before
    return run


def _our_decoder(module, eos: set[int], max_new_tokens: int, **options):
    def run(ids: torch.Tensor, mask: torch.Tensor | None):
        out = module.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **options)
        return _cut(out.sequences, ids.shape[1], eos), out.stats, out.stats.backbone_forwards
    return run


# ---------------------------------------------------------------------------------------------- memory


class _PeakMemory:
    """Peak memory of the code inside the ``with`` block, in MB above where it started (None if unknown)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.used = _heap_in_use()
            if self.used is not None:
                self.start = self.peak = self.used()
                self.stop = False
                self.thread = threading.Thread(target=self._poll, daemon=True)
                self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.used())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.used is not None:
            self.stop = True
            self.thread.join()
            self.peak_mb = (max(self.peak, self.used()) - self.start) / 2**20


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes the C heap has handed out (glibc ``mallinfo2``), where torch's CPU tensors live; None elsewhere."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # small blocks in use + large (mmap'd) blocks

    return used


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class _Base:
    """The untouched base model a ``--model`` was trained on, as its artefact records it."""

    location: str  # a local directory (resolved) or a Hub id
    revision: str | None  # the Hub revision (None for local directories)
    vocab_size: int | None  # the vocabulary the model's own backbone has (None: a plain model, the base itself)
    shares: bool  # the model's backbone is the base's, untouched (method weights only, no LoRA)

    @property
    def name(self) -> str:
        return f"{self.location}@{self.revision}" if self.revision else self.location


def _local_dir(spec: str) -> Path | None:
    """The local directory of a ``--model`` (a Hub id is fetched through the cache); None if there is none."""
    path = resolve_model_path(spec)
    if not os.path.isdir(path) and hub.is_hub_id(path):
        path = str(hub.fetch(path))
    return Path(path) if os.path.isdir(path) else None


def _base_of(spec: str) -> _Base:
    """Where ``spec``'s base model is, from its ``mtp_config.json``; a plain model directory is its own base."""
    path = _local_dir(spec)
    if path is None or not (path / MTP_CONFIG).is_file():
        return _Base(str(path.resolve()) if path is not None else spec, None, None, shares=True)
    config = read_mtp_config(path / MTP_CONFIG)
    recorded = config["base_model"]
    ref = recorded.get("name_or_path") or ""
    if ref and (path / ref).is_dir():  # relative to the artefact (a native-MTP model names itself ".")
        location, revision = str((path / ref).resolve()), None
    elif zoo.has(ref):
        location, revision = str(zoo.weights_path(ref).resolve()), None
    else:
        location, revision = ref, recorded.get("revision")
    shares = config.get("weights", "method") == "method" and not config.get("lora")  # older artefacts omit "weights"
    return _Base(location, revision, recorded.get("vocab_size"), shares)


def _one_base(specs: list[str], bases: list[_Base]) -> _Base:
    """The base every model shares; a clear error when they differ (the base's greedy output is the reference)."""
    names = {b.name for b in bases}
    if len(names) > 1:
        which = ", ".join(f"{spec!r} on {b.name!r}" for spec, b in zip(specs, bases, strict=True))
        raise UserInputError(f"the models have different base models ({which}); one bench compares models of one base "
                             "against that base's own decoding: bench each base in its own run")
    return bases[0]


def _load_base(base: _Base) -> MTPModule:
    """The untouched base model, for the baselines and the peers."""
    location = base.location
    if not os.path.isdir(location):  # a Hub id, at the revision the artefacts recorded
        location = str(hub.fetch(location, base.revision))
    if convert.detect_native_layout(location) is not None:
        model, tokenizer = convert.load_native_backbone(location)
        module = MTPModule(model, method=None)
        module.tokenizer = tokenizer
    else:
        module = MTPModule(location, method=None)
    return module.eval()


def load_models(specs: list[str]) -> tuple[list[MTPModule], MTPModule]:
    """Load every ``--model`` and the untouched base model they were all trained on: ``(modules, base)``.

    Models whose backbone is the untouched base (method weights only, no LoRA, same vocabulary) share the base's
    backbone object; the others (LoRA, a backbone fine-tuned or given new embedding rows) keep their own, with
    their LoRA adapters merged (:meth:`MTPModule.merge_lora`) as they are served. Models of different bases are
    refused.
    """
    if not specs:
        raise UserInputError("no --model given")
    bases = [_base_of(spec) for spec in specs]
    base = _load_base(_one_base(specs, bases))
    modules = []
    for spec, recorded in zip(specs, bases, strict=True):
        share = recorded.shares and recorded.vocab_size in (None, base.parts.vocab_size)
        module = MTPModule.from_pretrained(spec, backbone=base.backbone if share else None)
        if module.tokenizer is None:  # a shared backbone comes without one: it is the base's
            module.tokenizer = base.tokenizer
        modules.append(module.merge_lora())  # decode LoRA models as they are served: merged
    return modules, base


def _untouched(modules) -> MTPModule:
    """The first module whose backbone is the untouched base: a plain model, or a frozen one with no LoRA."""
    for module in modules:
        if module.lora is None and (module.method is None or module.freeze_backbone):
            return module
    raise UserInputError("no model here has the untouched base model as its backbone (LoRA or fine-tuned backbones): "
                         "pass base=MTPModule(<base model>, method=None), or load the models with "
                         "lightning_mtp.bench.load_models")


def _shipped_draft(module) -> str | None:
    """The zoo's draft model for the base of a shipped world (tiny-math, tiny-world), once it is in the zoo."""
    draft = SHIPPED_DRAFTS.get(Path(str(module.backbone_ref)).name)
    return draft if draft is not None and zoo.has(draft) else None


def _load_draft(draft_model: str, base: MTPModule) -> PreTrainedModel:
    """The draft model of hf_assisted, checked once against the base's vocabulary and tokenizer."""
    assistant, tokenizer = load_backbone(draft_model)
    want = base.backbone.config.get_text_config().vocab_size
    have = assistant.config.get_text_config().vocab_size
    if have != want:
        raise UserInputError(f"--draft-model {draft_model!r} has a vocabulary of {have} tokens but the base model "
                             f"{str(base.backbone_ref)!r} has {want}; hf_assisted needs a draft model with the base's "
                             "tokenizer: pass one with --draft-model, or leave the peers out with --no-peers")
    if tokenizer is not None and base.tokenizer is not None and tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise UserInputError(f"--draft-model {draft_model!r} has another tokenizer than the base model "
                             f"{str(base.backbone_ref)!r} (same size, {have} tokens, different tokens); pass a draft "
                             "model with the base's tokenizer, or leave the peers out with --no-peers")
    return assistant.eval().to(base.device)


def build_decoders(modules, *, max_new_tokens: int, batch_size: int, peers: bool, draft_model: str | None,
                   prompt_lookup_tokens: int, counter: _CountForwards, sweep: bool = False,
                   base: MTPModule | None = None, constant_schedule: bool = False, trees: bool = False) -> list[Decoder]:
    """Every entry: the baselines and peers on ``base`` (the untouched base model), then each module's own;
    ``constant_schedule`` adds each method's default decoding with a constant chain (``{name}/constant``), ``trees``
    its decoding with the token trees of :func:`bench_trees` (``{name}/tree-dynamic-d4k4t16``) where it drafts
    trees."""
    base = base if base is not None else _untouched(modules)
    backbone = base.backbone
    eos, pad = eos_ids(backbone), pad_token_id(backbone)

    def hf(**kwargs):
        return _hf_decoder(backbone, counter, eos, pad, max_new_tokens, **kwargs)

    decoders = [Decoder("hf_greedy", 1, hf(), BASE, "baseline")]
    if peers:
        decoders.append(Decoder("hf_prompt_lookup", 1, hf(prompt_lookup_num_tokens=prompt_lookup_tokens), BASE, "peer"))
        if draft_model is not None:
            decoders.append(Decoder("hf_assisted", 1, hf(assistant_model=_load_draft(draft_model, base)), BASE, "peer"))
    ntp = _our_decoder(base, eos, max_new_tokens, num_draft_tokens=0, decoding="speculative")
    decoders.append(Decoder("ntp", 1, ntp, BASE, "baseline"))
    method_entries = []
    for i, module in enumerate(modules):
        if module.method is None:
            continue
        for name, options in module.method.bench_entries(sweep=sweep):
            method_entries.append((name, i, module, options))
            if constant_schedule and options == {"decoding": "speculative"}:  # the default, with a constant chain
                method_entries.append((f"{name}/constant", i, module, {**options, "draft_schedule": "constant"}))
            if trees and options == {"decoding": "speculative"} and module.method.drafter(module.parts).drafts_trees:
                named = [o.get("tree") for _, o in module.method.bench_entries(sweep=sweep)]  # a method's own trees
                method_entries += [(f"{name}/tree-{shape.label}", i, module, {**options, "tree": shape.as_dict()})
                                   for shape in bench_trees(module.num_draft_tokens, sweep)
                                   if shape.as_dict() not in named]
    names = [e[0] for e in method_entries]
    for name, i, module, options in method_entries:
        label = name if names.count(name) == 1 else f"{name}[{i}]"  # two models of one method: say which
        decoders.append(Decoder(label, 1, _our_decoder(module, eos, max_new_tokens, **options), i, "method"))
    if batch_size > 1:
        at = f"@b{batch_size}"
        decoders.append(Decoder("hf_greedy" + at, batch_size, hf(), BASE, "baseline"))
        decoders.append(Decoder("ntp" + at, batch_size, ntp, BASE, "baseline"))
        for d in [d for d in decoders if d.kind == "method" and d.batch_size == 1 and "/tree-" not in d.name]:
            decoders.append(Decoder(d.name + at, batch_size, d.run, d.reference, "method"))
    return decoders


def bench_trees(k: int, sweep: bool = False) -> list[TreeShape]:
    """The token trees ``--trees`` benches for a method of chain length ``k``: EAGLE-2 dynamic trees of ``k`` levels
    (the chain's drafting depth) and ``k + 1``, 16 nodes each, and the default static tree; ``sweep`` adds a wide
    (32 nodes, top 8) and a narrow (8 nodes, top 2) one."""
    shapes = [TreeShape("dynamic", k, 4, 16), TreeShape("dynamic", k + 1, 4, 16), TreeShape("static")]
    if sweep:
        shapes += [TreeShape("dynamic", k + 1, 8, 32), TreeShape("dynamic", k, 2, 8)]
    return shapes


def run_bench(modules, prompts: list[str], answers: list[int] | None = None, *, max_new_tokens: int = 128,
              repeats: int = 1, warmup: int = 2, batch_size: int = 8, peers: bool | None = None,
              draft_model: str | None = None, prompt_lookup_tokens: int = 10, sweep: bool = False,
              progress: bool = True, model_names: list[str] | None = None, base: MTPModule | None = None,
              constant_schedule: bool = False, trees: bool = False) -> list[dict]:
    """Time every decoder on ``prompts`` in one process, interleaved; return one JSON-ready row per entry.

    ``modules`` are MTPModules (or a single one). ``base`` is the untouched base model they were trained on (see
    :func:`load_models`): the baselines (``hf_greedy``, ``ntp``) and the peers run on it; None takes the first
    module whose backbone is that base (a frozen backbone without LoRA), and refuses when there is none. ``peers``
    (HF prompt lookup and assisted generation) default to on for the shipped worlds' models, whose draft model is in the
    zoo; ``batch_size`` > 1 adds batched entries. ``model_names`` (one per module, e.g. the ``--model``
    arguments) fill each method row's ``model`` field. ``constant_schedule``, ``trees``: see :func:`build_decoders`.
    """
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    base = base if base is not None else _untouched(modules)
    tok = base.tokenizer
    if tok is None:
        raise UserInputError("the base model has no tokenizer to encode the prompts with")
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {batch_size}")
    if peers is None:
        peers = _shipped_draft(base) is not None
    if peers and draft_model is None:
        draft_model = _shipped_draft(base)
    for m in [base, *modules]:
        m.eval()
    counter = _CountForwards(base.backbone)
    try:
        decoders = build_decoders(modules, max_new_tokens=max_new_tokens, batch_size=batch_size, peers=peers,
                                  draft_model=draft_model, prompt_lookup_tokens=prompt_lookup_tokens, counter=counter,
                                  sweep=sweep, base=base, constant_schedule=constant_schedule, trees=trees)
        _time(decoders, base, tok, prompts, batch_size, repeats, warmup, progress)
        references = _reference_outputs(modules, base, decoders, max_new_tokens, tok, prompts)
    finally:
        counter.close()
    rows = [_row(d, decoders, references, answers, tok) for d in decoders]
    singles = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for p in prompts]
    for d, row in zip(decoders, rows, strict=True):
        row["model"] = model_names[d.reference] if model_names and d.kind == "method" else None
        row["token_agreement"] = token_agreement(d.outputs, references[d.reference])
        row["mean_logprob"] = mean_logprob(base.backbone, singles, d.outputs)
    return rows


def token_agreement(outputs: list[list[int]], references: list[list[int]]) -> float:
    """The fraction of the reference's tokens that the output has at the same position (1.0: identical)."""
    # an output may be shorter or longer than its reference: positions past the shorter one never match
    same = sum(sum(a == b for a, b in zip(o, r, strict=False)) for o, r in zip(outputs, references, strict=True))
    return same / max(1, sum(len(r) for r in references))


@torch.no_grad()
def mean_logprob(backbone, prompts: list[torch.Tensor], outputs: list[list[int]]) -> float | None:
    """The backbone's mean log-likelihood per generated token of ``outputs`` after their ``prompts`` (1-D ids):
    what a lossy decoder costs on text with no answer to check (greedy output scores highest, about)."""
    total, count = 0.0, 0
    for prompt, out in zip(prompts, outputs, strict=True):
        if not out:
            continue
        ids = torch.cat([prompt, torch.tensor(out, dtype=prompt.dtype)]).to(backbone.device)[None]  # (1, P + N)
        logits = backbone(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (N, V): predicts each output
        total += logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum().item()
        count += len(out)
    return total / count if count else None


def _time(decoders: list[Decoder], base, tok, prompts: list[str], batch_size: int, repeats: int, warmup: int,
          progress: bool) -> None:
    device = base.device
    singles = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for p in prompts]
    batches = []
    if batch_size > 1:
        side = tok.padding_side
        tok.padding_side = "left"
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))
        tok.padding_side = side
    units = {1: [(ids, None) for ids in singles]}
    if batch_size > 1:
        units[batch_size] = batches

    # warm-up (also drops decoders whose method cannot decode batches)
    for d in list(decoders):
        for ids, mask in units[d.batch_size][: max(1, warmup)]:
            try:
                d.run(ids, mask)
            except ValueError:
                if d.batch_size == 1:
                    raise
                decoders.remove(d)  # e.g. a lossy method mode that decodes one row at a time
                break

    with progress_bar(disable=not progress) as bar:
        for size in sorted({d.batch_size for d in decoders}):
            group = [d for d in decoders if d.batch_size == size]
            task = bar.add_task(f"bench (batch {size})", total=len(units[size]) * repeats * len(group), unit="decodes")
            for u, (ids, mask) in enumerate(units[size]):
                times: dict[str, list[float]] = {d.name: [] for d in group}
                for r in range(repeats):
                    shift = (u + r) % len(group)
                    for d in group[shift:] + group[:shift]:  # rotate who goes first
                        t0 = time.perf_counter()
                        rows, stats, forwards = d.run(ids, mask)
                        times[d.name].append(time.perf_counter() - t0)
                        bar.advance(task)
                        if r == 0:
                            d.outputs.extend(rows)
                            d.forwards += forwards
                            if stats is not None:
                                d.stats = stats if d.stats is None else d.stats.merge(stats)
                for d in group:
                    d.seconds.append(statistics.median(times[d.name]))
        task = bar.add_task("peak memory", total=len(decoders), unit="decodes")
        for d in decoders:
            ids, mask = units[d.batch_size][0]
            with _PeakMemory(device) as mem:
                d.run(ids, mask)
            d.peak_memory_mb = mem.peak_mb
            bar.advance(task)


def _reference_outputs(modules, base, decoders, max_new_tokens, tok, prompts) -> dict[int, list[list[int]]]:
    """Greedy output per prompt of the base (``BASE``) and of each model's own backbone (by index): what the
    lossless entries must reproduce. A model sharing the base's backbone shares its reference."""
    refs = {BASE: next(d for d in decoders if d.name == "hf_greedy").outputs}
    singles = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
    for i, module in enumerate(modules):
        if module.backbone is base.backbone:
            refs[i] = refs[BASE]
            continue
        eos = eos_ids(module.backbone)
        refs[i] = [
            _cut(module.generate(ids.to(module.device), max_new_tokens=max_new_tokens, num_draft_tokens=0,
                                 decoding="speculative").sequences, ids.shape[1], eos)[0]
            for ids in singles
        ]
    return refs


def _row(d: Decoder, decoders: list[Decoder], references, answers, tokenizer) -> dict:
    def tps(entry: Decoder) -> float:
        total = sum(entry.seconds)
        return sum(len(o) for o in entry.outputs) / total if total else 0.0

    hf = next(e for e in decoders if e.kind == "baseline" and e.name.startswith("hf_greedy") and e.batch_size == d.batch_size)
    ntp = next(e for e in decoders if e.kind == "baseline" and e.name.startswith("ntp") and e.batch_size == d.batch_size)
    new_tokens = sum(len(o) for o in d.outputs)
    reference = references[d.reference]
    row = {
        "name": d.name,
        "kind": d.kind,
        "batch_size": d.batch_size,
        "tokens_per_forward": 1.0,
        "acceptance_per_position": None,
        "cumulative_acceptance": None,
        "tokens_per_second": tps(d),
        "speedup_vs_hf": tps(d) / tps(hf) if tps(hf) else 0.0,
        "speedup_vs_ntp": tps(d) / tps(ntp) if tps(ntp) else 0.0,
        "accuracy": None,
        "identical_to_ntp": sum(a == b for a, b in zip(d.outputs, reference, strict=True)) / max(1, len(d.outputs)),
        "peak_memory_mb": d.peak_memory_mb,
        "new_tokens": new_tokens,
        "seconds": sum(d.seconds),
    }
    if d.stats is not None:
        s = d.stats
        steps = max(1, s.row_forwards - s.sequences)  # decode steps per row, prefills excluded
        reached = max((j + 1 for j, r in enumerate(s.reached) if r), default=0)  # AR past it is undefined, not 0
        row.update(
            tokens_per_forward=s.tokens_per_forward,
            acceptance_per_position=s.acceptance_per_position[:reached],
            cumulative_acceptance=s.cumulative_acceptance[:reached],
            draft_ms_per_step=1000 * s.draft_seconds / steps,
            verify_ms_per_step=1000 * s.verify_seconds / steps,
        )
    elif d.batch_size == 1 and d.forwards > len(d.outputs):  # HF entries: target forwards counted by a hook
        row["tokens_per_forward"] = (new_tokens - len(d.outputs)) / (d.forwards - len(d.outputs))
    if answers is not None and tokenizer is not None:
        row["accuracy"] = answer_accuracy(tokenizer.batch_decode(d.outputs, skip_special_tokens=True), answers)
    return row


# ---------------------------------------------------------------------------------------------- output

COLUMNS = {  # JSON key: table header
    "name": "name",
    "tokens_per_forward": "tok/fwd",
    "tokens_per_second": "tok/s",
    "speedup_vs_hf": "x hf",
    "speedup_vs_ntp": "x ntp",
    "accuracy": "acc",
    "identical_to_ntp": "same",
    "token_agreement": "tok same",
    "mean_logprob": "logp",
    "acceptance_per_position": "AR per position",
    "draft_ms_per_step": "draft ms",
    "verify_ms_per_step": "verify ms",
    "peak_memory_mb": "peak MB",
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):  # acceptance per position: the first 8 in a table (the JSON keeps them all)
        return " ".join(f"{x:.2f}" for x in v[:8]) + (f" .. ({len(v)})" if len(v) > 8 else "") or "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict], title: str = "lightning-mtp bench") -> None:
    table = Table(title=title, caption=_legend(rows))
    for key, header in COLUMNS.items():
        table.add_column(header, justify="left" if key == "name" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*[_fmt(row.get(key)) for key in COLUMNS])
    _console().print(table)


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=200)  # a log or pipe: do not squeeze into 80 columns


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for key in COLUMNS) + " |" for row in rows]
    if legend := _legend(rows):
        lines += ["", legend]
    return "\n".join(lines) + "\n"


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per entry over the domains of a multi-domain run (Spec-Bench style): ``DOMAIN/tau`` and
    ``DOMAIN/speedup_vs_hf`` for each domain, then their ``mean_speedup_vs_hf``."""
    summary: dict[tuple[str, int], dict] = {}
    for row in rows:
        entry = summary.setdefault((row["name"], row["batch_size"]), {"name": row["name"],
                                                                      "batch_size": row["batch_size"]})
        entry[f"{row['domain']}/tau"] = row["tokens_per_forward"]
        entry[f"{row['domain']}/speedup_vs_hf"] = row["speedup_vs_hf"]
    for entry in summary.values():
        speedups = [v for k, v in entry.items() if k.endswith("/speedup_vs_hf")]
        entry["mean_speedup_vs_hf"] = sum(speedups) / len(speedups)
    return list(summary.values())


def _summary_columns(summary: list[dict]) -> dict[str, str]:
    columns = {"name": "name"}
    for key in summary[0]:
        if "/" in key:
            domain, what = key.split("/")
            columns[key] = f"{domain} {'tau' if what == 'tau' else 'x hf'}"
    return columns | {"mean_speedup_vs_hf": "mean x hf"}


def print_summary(rows: list[dict]) -> None:
    summary = summary_rows(rows)
    columns = _summary_columns(summary)
    table = Table(title="lightning-mtp bench: summary over domains")
    for key, header in columns.items():
        table.add_column(header, justify="left" if key == "name" else "right", no_wrap=True)
    for entry in summary:
        table.add_row(*[_fmt(entry.get(key)) for key in columns])
    _console().print(table)


def markdown_report(rows: list[dict]) -> str:
    """One table per domain, then the summary (or the single table of a one-domain run)."""
    domains = list(dict.fromkeys(row.get("domain") for row in rows))
    if len(domains) == 1:
        return markdown_table(rows)
    parts = [f"## {d}\n\n" + markdown_table([r for r in rows if r["domain"] == d]) for d in domains]
    summary = summary_rows(rows)
    columns = _summary_columns(summary)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(e.get(k)) for k in columns) + " |" for e in summary]
    return "\n".join(parts) + "\n## summary\n\n" + "\n".join(lines) + "\n"


def _legend(rows: list[dict]) -> str | None:
    """Entries named ``method[i]`` (several models of one method): which model ``i`` is."""
    models = {}
    for row in rows:
        if row.get("model") and "[" in row["name"]:
            models.setdefault(int(row["name"].split("[", 1)[1].split("]", 1)[0]), row["model"])
    if not models:
        return None
    return "[i] is the i-th --model: " + ", ".join(f"[{i}] {m}" for i, m in sorted(models.items()))


def write_plots(rows: list[dict], directory: str | Path) -> list[Path]:
    """``speedup_vs_accuracy.png`` and ``acceptance.png`` (acceptance per draft position per batch-size-1 entry)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    def quality(row: dict) -> float:
        return row["accuracy"] if row["accuracy"] is not None else row["identical_to_ntp"]

    middle = (min(map(quality, rows)) + max(map(quality, rows))) / 2
    for i, row in enumerate(sorted(rows, key=lambda r: r["speedup_vs_hf"])):
        acc = quality(row)
        marker = {"baseline": "s", "peer": "^", "method": "o"}[row["kind"]]
        ax.scatter(row["speedup_vs_hf"], acc, marker=marker, s=40)
        # neighbours along the x axis get their labels at staggered heights (below the upper points, above the
        # lower ones), joined to their point by a hairline
        dy = 8 + 11 * (i % 6)
        ax.annotate(row["name"], (row["speedup_vs_hf"], acc), fontsize=7, xytext=(6, dy if acc < middle else -6 - dy),
                    textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.3, "color": "grey"})
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speed-up over HF greedy (same batch size)")
    ax.set_ylabel("task accuracy" if any(r["accuracy"] is not None for r in rows) else "identical to greedy")
    ax.set_title("speed vs accuracy")
    written = [_save(fig, directory / "speedup_vs_accuracy.png")]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ar = row.get("acceptance_per_position")
        if ar and row["batch_size"] == 1:  # batched entries draft the same chains
            ax.plot(range(1, len(ar) + 1), ar, marker="o", label=f"{row['name']} (tau {row['tokens_per_forward']:.2f})")
    ax.set_xlabel("draft position j")
    ax.set_ylabel("acceptance rate AR_j")
    ax.set_ylim(0, 1.05)
    ax.set_title("acceptance per draft position")
    if ax.lines:
        ax.legend(fontsize=7)
    written.append(_save(fig, directory / "acceptance.png"))
    return written


def write_domain_plot(rows: list[dict], directory: str | Path) -> Path:
    """``acceptance_by_domain.png``: acceptance per draft position, one panel per domain, one line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(row["domain"] for row in rows))
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 4), sharey=True, squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for row in rows:
            ar = row.get("acceptance_per_position")
            if row["domain"] == domain and ar and row["batch_size"] == 1:
                ax.plot(range(1, len(ar) + 1), ar, marker="o", ms=3,
                        label=f"{row['name']} (tau {row['tokens_per_forward']:.2f})")
        ax.set_title(domain)
        ax.set_xlabel("draft position j")
        ax.set_ylim(0, 1.05)
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("acceptance rate AR_j")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return _save(fig, directory / "acceptance_by_domain.png")


def _save(fig, path: Path) -> Path:
    """Write a figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _parser() -> CommandParser:
    parser = CommandParser(prog="lightning-mtp bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True,
                        help="artefact directory or zoo name; repeat to bench several models of one base model, "
                             "whose untouched copy runs the baselines and the peers")
    parser.add_argument("--prompts", default="tiny-math",
                        help="'tiny-math', 'tiny-world' (its domains code, prose, math: a table each and a summary), "
                             "one of those domains, or a JSONL file whose records have a 'prompt' (text) or a "
                             "'messages' field (a chat, rendered with the tokenizer's chat template); several, "
                             "comma-separated, give a table each and a summary")
    parser.add_argument("--n", type=int, default=50, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and decoder (median kept)")
    parser.add_argument("--warmup", type=int, default=2, help="prompts decoded by every decoder before timing")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the batched entries (1: none)")
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument("--peers", dest="peers", action="store_true", default=None,
                       help="run HF prompt lookup and assisted generation (default: on for the tiny-math and tiny-world "
                            "models, whose draft models ship in the zoo)")
    peers.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--draft-model", default=None, help="draft model of hf_assisted, with the base model's "
                        "tokenizer (default for the shipped worlds' bases: " + ", ".join(SHIPPED_DRAFTS.values()) + ")")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of hf_prompt_lookup")
    parser.add_argument("--sweep", action="store_true",
                        help="also run each method's speed/accuracy sweep (e.g. ConfAdapt thresholds, static draft lengths)")
    parser.add_argument("--constant-schedule", action="store_true",
                        help="also run each method's default decoding with a constant chain length ({name}/constant), "
                             "beside the adaptive default")
    parser.add_argument("--trees", action="store_true",
                        help="also run each tree-drafting method with token trees (dynamic at its K and K + 1 levels, "
                             "the default static tree; --sweep adds wider and narrower ones), one sequence at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table to this Markdown file")
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    for flag, value, low in (("--repeats", args.repeats, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--warmup", args.warmup, 0), ("--batch-size", args.batch_size, 1),
                             ("--prompt-lookup-tokens", args.prompt_lookup_tokens, 1)):
        if value < low:
            raise UserInputError(f"{flag} must be >= {low}, got {value}")
    sets = [(domain, spec, *read_prompts(spec, args.n)) for domain, spec in prompt_sets(args.prompts)]
    if args.threads:  # (the prompt files were read first: a bad one fails before the models load)
        torch.set_num_threads(args.threads)
    modules, base = load_models(args.model)
    rows = []
    for domain, spec, prompts, answers in sets:
        domain_rows = run_bench(modules, render_prompts(prompts, base.tokenizer, spec), answers, base=base,
                                max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
                                batch_size=args.batch_size, peers=args.peers, draft_model=args.draft_model,
                                prompt_lookup_tokens=args.prompt_lookup_tokens, sweep=args.sweep,
                                model_names=args.model, constant_schedule=args.constant_schedule, trees=args.trees)
        rows += [{**row, "domain": domain} for row in domain_rows]
        print_table(domain_rows, title="lightning-mtp bench" + (f": {domain}" if len(sets) > 1 else ""))
    if len(sets) > 1:
        print_summary(rows)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(Path(args.markdown), markdown_report(rows))
    if args.plots:
        _write_all_plots(rows, Path(args.plots), [domain for domain, *_ in sets])
    return rows


def _write_all_plots(rows: list[dict], directory: Path, domains: list[str]) -> None:
    """One domain: its plots in ``directory``; several: each domain's in ``directory/DOMAIN``, and the
    acceptance of every domain side by side."""
    if len(domains) == 1:
        write_plots(rows, directory)
        return
    for domain in domains:
        write_plots([r for r in rows if r["domain"] == domain], directory / domain)
    write_domain_plot(rows, directory)
