"""DataModules: records tokenised for causal-LM / MTP training.

- :class:`SFTDataModule`: prompt/response pairs, chats (``messages`` rendered with the tokenizer's chat
  template) or plain text, from JSONL / Parquet / text files, a finished ``lightning-mtp distill`` job or a
  Hugging Face dataset; response-only loss, truncation, packing, seeded shuffling, train/val split.
- :class:`TinyMathDataModule`: the synthetic tiny-math world, optionally self-distilled (the shipped base's
  answers to the FastMTP recipe's prompts ship in ``zoo/tiny-math-base/``; ``python -m
  lightning_mtp.data.datamodule RECIPE`` regenerates them, see :func:`ship_self_distill`).

The batch contract every DataModule here produces (what ``MTPMethod.training_loss`` consumes):

- ``input_ids`` (B, T) long; ``labels`` (B, T) long, -100 where no loss (prompt tokens when training on
  responses, padding, and the first token of every packed document);
- ``attention_mask``: a (B, T) 0/1 padding mask (right padding), or for packed rows an additive float
  (B, 1, T, T) block-diagonal causal mask (0 where allowed, ``finfo(dtype).min`` elsewhere), cast to the
  backbone's dtype after the transfer to the device;
- ``position_ids`` (B, T), restarting at 0 for every packed document (packed rows only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoTokenizer

from lightning_mtp.data import tiny_math, tiny_world
from lightning_mtp.data.chat import (
    STATUS_NAMES,
    TRUNCATED,
    TRUNCATIONS,
    RecordEncoder,
    RecordFormat,
    require_chat_template,
    require_usable,
)
from lightning_mtp.data.distill import SelfDistill, cached_self_distill, default_cache_dir, export_self_distill
from lightning_mtp.data.files import DATA_FORMATS, load_source
from lightning_mtp.data.packing import PACKING_MASKS, PackedDataset, block_causal_mask, collate_packed, pack_best_fit
from lightning_mtp.errors import UserInputError
from lightning_mtp.module import MTPModule
from lightning_mtp.zoo_index import ZOO_DIR

__all__ = ["BlockDataset", "PromptResponseDataset", "SFTDataModule", "SelfDistill", "TinyMathDataModule",
           "TinyWorldDataModule", "collate_right_padded", "ship_self_distill"]

CHECKOUT = ZOO_DIR.parent  # where a relative self_distill_file is looked for when the working directory lacks it


class PromptResponseDataset(Dataset):
    """Token ids of ``prompt + response + eos``; labels are -100 on the prompt (loss on the response only)."""

    def __init__(self, prompts: list[str], responses: list[str], tokenizer, max_length: int) -> None:
        if len(prompts) != len(responses):
            raise UserInputError(f"{len(prompts)} prompts but {len(responses)} responses")
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        self.examples: list[tuple[list[int], int]] = []
        for p, r in zip(p_ids, r_ids, strict=True):
            ids = (p + r + ([eos] if eos is not None else []))[:max_length]
            self.examples.append((ids, min(len(p), len(ids))))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, n_prompt = self.examples[i]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[:n_prompt] = -100
        return {"input_ids": input_ids, "labels": labels}


def collate_right_padded(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids`` with ``pad_id``, ``labels`` with -100, a 0/1 ``attention_mask``."""
    T = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.full((len(batch), T), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), T), -100, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), T), dtype=torch.long),
    }
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = b["input_ids"]
        out["labels"][i, :n] = b["labels"]
        out["attention_mask"][i, :n] = 1
    return out


def find_shipped(self_distill_file: str | None) -> Path | None:
    """A datamodule's ``self_distill_file``: as given, else relative to the lightning-mtp checkout; None for none."""
    if self_distill_file is None:
        return None
    path = Path(self_distill_file).expanduser()
    for candidate in (path, CHECKOUT / path):
        if candidate.is_file():
            return candidate
    raise UserInputError(f"self_distill_file {self_distill_file!r} does not exist (looked in the working directory and "
                         f"in {CHECKOUT}); regenerate it with python -m lightning_mtp.data.datamodule RECIPE (make "
                         "self-distill), or set it to null to generate the answers at fit time")


class TinyMathDataModule(L.LightningDataModule):
    """The tiny-math world as training data: ground-truth solutions, or the backbone's own (self-distilled).

    Args:
        num_train: training problems.
        num_val: validation problems (a separate seed stream from train and test).
        batch_size: sequences per batch.
        max_length: longest tokenised sequence; longer ones are truncated.
        self_distill: None trains on the worked solutions; a :class:`SelfDistill` trains on the backbone's
            own responses to the same prompts, generated once and cached under ``cache_dir``.
        cache_dir: where self-distilled responses are cached (default ``~/.cache/lightning-mtp/distill``).
        tokenizer: a tokenizer directory; None takes the tokenizer of the model being trained.
        num_workers: DataLoader worker processes.
        self_distill_file: shipped self-distilled responses (written by :func:`ship_self_distill`; JSONL,
            gzipped when it ends in ``.gz``), used instead of generating them when they were generated from the
            same backbone, prompts and ``self_distill`` settings; otherwise they are generated (and cached) as
            usual. A relative path is read from the working directory, else from the lightning-mtp checkout.
            Unused when ``self_distill`` is None.
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 200,
        batch_size: int = 32,
        max_length: int = 192,
        self_distill: SelfDistill | None = None,
        cache_dir: str | None = None,
        tokenizer: str | None = None,
        num_workers: int = 0,
        self_distill_file: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0), ("batch_size", batch_size, 1), ("max_length", max_length, 8)):
            if value < low:
                raise UserInputError(f"{name} must be >= {low}, got {value}")
        self.num_train, self.num_val, self.batch_size, self.max_length = num_train, num_val, batch_size, max_length
        self.self_distill = self_distill
        self.self_distill_file = self_distill_file
        self.cache_dir = cache_dir
        self.tokenizer_path = tokenizer
        self.num_workers = num_workers
        self.tokenizer = None
        self.train_set: PromptResponseDataset | None = None
        self.val_set: PromptResponseDataset | None = None

    def _resolve_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_path is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None) is not None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        else:
            raise UserInputError("TinyMathDataModule needs a tokenizer: pass tokenizer=DIR or train a model that has one")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tok = self._resolve_tokenizer()
        train = tiny_math.problems("train", self.num_train)
        val = tiny_math.problems("validation", self.num_val)
        prompts = self.distill_prompts(tok) if self.self_distill is not None else [p.prompt for p in train]
        responses = [p.response for p in train]
        if self.self_distill is not None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None:
                raise UserInputError("self_distill needs the model: use the datamodule with a Trainer")
            prompts, responses = cached_self_distill(module.backbone, tok, prompts, self.self_distill,
                                                     cache_dir=self.cache_dir, shipped=self.shipped_file())
        self.train_set = PromptResponseDataset(prompts, responses, tok, self.max_length)
        self.val_set = PromptResponseDataset([p.prompt for p in val], [p.response for p in val], tok, self.max_length)

    def shipped_file(self) -> Path | None:
        """The ``self_distill_file``, found (see its argument); None when there is none."""
        return find_shipped(self.self_distill_file)

    def distill_prompts(self, tokenizer) -> list[str]:
        """The prompts self-distillation answers (the first ``num_train`` train problems)."""
        return [p.prompt for p in tiny_math.problems("train", self.num_train)]

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=lambda b: collate_right_padded(b, pad),
        )

    def train_dataloader(self) -> DataLoader:
        # the seed of seed_everything orders the data, as Lightning's own distributed sampler does
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return _resumable_loader(self, self.train_set, self.batch_size, seed, self.num_workers,
                                 functools.partial(collate_right_padded, pad_id=self._pad_id()))

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id occurs in the training targets (for vocabulary compression)."""
        self.setup("fit")
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for ids, _ in self.train_set.examples:
            counts += torch.bincount(torch.tensor(ids), minlength=vocab_size)[:vocab_size]
        return counts

    @staticmethod
    def default_cache_dir() -> Path:
        return default_cache_dir()


class BlockDataset(Dataset):
    """Fixed windows of ``block_size`` tokens cut from token streams (nanoGPT-style pre-training blocks).

    Item ``i`` is one window of one stream; ``labels`` equal ``input_ids`` (the backbone shifts them), so every
    position is trained, across document boundaries too (documents in a stream are joined by EOS).
    """

    def __init__(self, streams: list[torch.Tensor], block_size: int, limit: int | None = None) -> None:
        self.block_size = block_size
        self.index: list[tuple[int, int]] = []  # (stream, start)
        for s, stream in enumerate(streams):
            starts = range(0, len(stream) - block_size + 1, block_size)
            self.index += [(s, start) for start in starts][:limit]
        self.streams = streams

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, start = self.index[i]
        ids = self.streams[s][start : start + self.block_size].long()  # (T,)
        return {"input_ids": ids, "labels": ids.clone()}


class TinyWorldDataModule(L.LightningDataModule):
    """The tiny-world (Python code, English literature, tiny-math; :mod:`lightning_mtp.data.tiny_world`): pre-training
    blocks, or the backbone's own continuations of passages (self-distilled, for draft heads).

    Without ``self_distill`` the training rows are windows of ``block_size`` tokens of each domain's train documents
    joined by EOS (the base recipe; for heads, the corpus itself). With it, the rows are ``num_prompts`` prompts
    (passages of ``prompt_tokens`` tokens of train documents, and tiny-math train questions, evenly over the domains)
    followed by the backbone's own sampled continuation, the loss on the continuation only (FastMTP's recipe).
    Validation rows are always ``val_blocks`` windows per domain of the held-out documents. Token streams are cached
    under ``~/.cache/lightning-mtp/tiny-world/tokens``; self-distilled continuations like tiny-math's.

    Args:
        block_size: tokens per pre-training row (and per validation row).
        batch_size: rows per batch.
        val_blocks: validation rows per domain.
        domains: the domains trained on (default: all three).
        tokenizer: a tokenizer directory; None takes the tokenizer of the model being trained.
        num_workers: DataLoader worker processes.
        self_distill: None trains on the documents; a :class:`SelfDistill` on the backbone's continuations (kept
            when cut at ``max_new_tokens``: a passage rarely ends within it).
        num_prompts: self-distillation prompts, over all domains.
        prompt_tokens: tokens per code or prose prompt.
        cache_dir: where self-distilled continuations are cached (default ``~/.cache/lightning-mtp/distill``).
        self_distill_file: shipped self-distilled continuations, as :class:`TinyMathDataModule`'s.
    """

    def __init__(self, block_size: int = 512, batch_size: int = 16, val_blocks: int = 32,
                 domains: tuple[str, ...] = tiny_world.DOMAINS, tokenizer: str | None = None, num_workers: int = 0,
                 self_distill: SelfDistill | None = None, num_prompts: int = 4000, prompt_tokens: int = 192,
                 cache_dir: str | None = None, self_distill_file: str | None = None) -> None:
        super().__init__()
        for name, value, low in (("block_size", block_size, 8), ("batch_size", batch_size, 1),
                                 ("val_blocks", val_blocks, 0), ("num_prompts", num_prompts, 1),
                                 ("prompt_tokens", prompt_tokens, 1)):
            if value < low:
                raise UserInputError(f"{name} must be >= {low}, got {value}")
        unknown = sorted(set(domains) - set(tiny_world.DOMAINS))
        if unknown or not domains:
            raise UserInputError(f"domains {list(domains)!r}: choose one or more of {', '.join(tiny_world.DOMAINS)}")
        self.block_size, self.batch_size, self.val_blocks = block_size, batch_size, val_blocks
        self.domains = tuple(domains)
        self.tokenizer_path = tokenizer
        self.num_workers = num_workers
        self.self_distill, self.num_prompts, self.prompt_tokens = self_distill, num_prompts, prompt_tokens
        self.cache_dir, self.self_distill_file = cache_dir, self_distill_file
        self.tokenizer = None
        self.train_set: Dataset | None = None
        self.val_set: BlockDataset | None = None

    def distill_prompts(self, tokenizer) -> list[str]:
        """The prompts self-distillation continues (passages and questions, evenly over the domains)."""
        return tiny_world.passages(self.domains, self.num_prompts, self.prompt_tokens, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tok = self.tokenizer = _resolve_tokenizer(self, self.tokenizer_path)
        test = [tiny_world.token_stream(d, "test", tok) for d in self.domains]
        self.val_set = BlockDataset(test, self.block_size, limit=self.val_blocks)
        if self.self_distill is None:
            self.train_set = BlockDataset([tiny_world.token_stream(d, "train", tok) for d in self.domains],
                                          self.block_size)
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise UserInputError("self_distill needs the model: use the datamodule with a Trainer")
        prompts, responses = cached_self_distill(module.backbone, tok, self.distill_prompts(tok), self.self_distill,
                                                 cache_dir=self.cache_dir, shipped=find_shipped(self.self_distill_file),
                                                 keep_unfinished=True)
        self.train_set = PromptResponseDataset(prompts, responses, tok, self.block_size)

    def train_dataloader(self) -> DataLoader:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        collate = None if self.self_distill is None else functools.partial(collate_right_padded, pad_id=self._pad_id())
        return _resumable_loader(self, self.train_set, self.batch_size, seed, self.num_workers, collate)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id occurs in the training rows (for vocabulary compression)."""
        self.setup("fit")
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for i in range(len(self.train_set)):
            counts += torch.bincount(self.train_set[i]["input_ids"], minlength=vocab_size)[:vocab_size]
        return counts


def _resolve_tokenizer(datamodule: L.LightningDataModule, path: str | None):
    """The tokenizer at ``path``, else the one of the model being trained (``trainer.lightning_module.tokenizer``)."""
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    module = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    if getattr(module, "tokenizer", None) is not None:
        return module.tokenizer
    raise UserInputError(f"{type(datamodule).__name__} needs a tokenizer: pass tokenizer=DIR or train a model that has one")


class SFTDataModule(L.LightningDataModule):
    """Prompt/response pairs, chats or text from files or a Hugging Face dataset, tokenised for MTP training.

    Construction only records the arguments (recipes parse offline); ``setup`` reads and tokenises the data
    (``prepare_data`` first downloads a Hub dataset on one process). Tokenisation runs through
    ``datasets.map``, cached next to the parsed data, so a second run with the same data, tokenizer and
    options starts at once. The training order is a function of ``seed`` and the epoch alone (a seeded
    ``DistributedSampler``, which Lightning advances each epoch), on one device or many.

    Args:
        train: the training records: a JSONL / Parquet / text file, a glob, a directory (of such files, a
            finished ``lightning-mtp distill`` output, or a ``save_to_disk`` dataset), or a Hub dataset id.
        val: validation records, the same kinds; None holds out ``val_size`` of ``train`` (or reads
            ``val_split`` of it).
        val_size: with ``val`` and ``val_split`` None: a fraction (< 1) or a count (>= 1) of the training
            records held out for validation, drawn with ``seed``; 0 disables validation.
        split: the split of a Hub dataset (or ``DatasetDict``) to train on.
        val_split: the split to validate on (of ``val``, or of ``train`` when ``val`` is None).
        dataset_config: the configuration (subset) of a Hub dataset.
        data_format: ``auto`` (file suffix, or a Hub id), ``json`` (JSON Lines), ``parquet``, ``text`` (one
            record per line, field ``text``), ``disk`` (``save_to_disk``), ``hub``.
        fields: ``prompt_response``, ``messages`` (chat), ``text``, or ``auto``: the first of those whose
            field the data has.
        prompt_field: field of the prompt (``query`` for MetaMathQA).
        response_field: field of the response.
        messages_field: field of the chat (``conversations`` for ShareGPT; ``from``/``value`` are accepted).
        text_field: field of plain text.
        use_chat_template: render prompt/response pairs as a one-turn chat with the chat template (chats
            always are): what an instruct model sees at inference.
        chat_template: a Jinja chat template (text, or a path to a ``.jinja`` file) used instead of the
            tokenizer's own.
        system_prompt: put first in every chat that has no system message.
        loss_on: ``response`` (assistant turns or responses, with their end token), ``last_turn`` (only the
            final assistant turn: for templates that rewrite earlier turns), or ``all`` (every token).
        max_length: longest tokenised sequence (and longest packed row).
        truncation: for longer records: ``right`` (cut the end), ``left`` (cut the start, keeping the
            response), or ``drop`` (skip them). Records left with no trained token are dropped either way.
        packing: pack several records per row of ``max_length`` tokens (best-fit decreasing), isolated by a
            block-diagonal mask and restarting position ids.
        packing_mask: ``4d`` (additive (B, 1, T, T) mask: eager and sdpa attention) or ``position_ids`` (no
            mask; only for flash-attention-2/3 backbones, which isolate documents from position ids).
        batch_size: rows per batch (packed rows when packing).
        seed: seed of the shuffling and of the validation hold-out.
        max_samples: use only the first N training records (quick runs); None uses all.
        tokenizer: a tokenizer directory or Hub id; None takes the tokenizer of the model being trained.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenisation (``datasets.map``); None tokenises in this process.
        cache_dir: the ``datasets`` cache for parsed files and tokenised data (default: datasets' own).
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        val_size: float = 0.01,
        split: str = "train",
        val_split: str | None = None,
        dataset_config: str | None = None,
        data_format: str = "auto",
        fields: str = "auto",
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        text_field: str = "text",
        use_chat_template: bool = False,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        loss_on: str = "response",
        max_length: int = 2048,
        truncation: str = "right",
        packing: bool = False,
        packing_mask: str = "4d",
        batch_size: int = 8,
        seed: int = 0,
        max_samples: int | None = None,
        tokenizer: str | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()

        self.format = RecordFormat(  # validates fields and loss_on
            fields=fields, prompt_field=prompt_field, response_field=response_field, messages_field=messages_field,
            text_field=text_field, use_chat_template=use_chat_template, chat_template=chat_template,
            system_prompt=system_prompt, loss_on=loss_on,
        )
        for name, value, choices in (("data_format", data_format, DATA_FORMATS), ("truncation", truncation, TRUNCATIONS),
                                     ("packing_mask", packing_mask, PACKING_MASKS)):
            if value not in choices:
                raise UserInputError(f"unknown {name} {value!r}; choose one of {list(choices)}")
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < low:
                raise UserInputError(f"{name} must be >= {low}, got {value}")
        if val_size < 0:
            raise UserInputError(f"val_size must be >= 0 (a fraction < 1 or a count), got {val_size}")
        if max_samples is not None and max_samples < 1:
            raise UserInputError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.train, self.val, self.val_size = train, val, val_size
        self.split, self.val_split, self.dataset_config, self.data_format = split, val_split, dataset_config, data_format
        self.max_length, self.truncation, self.packing, self.packing_mask = max_length, truncation, packing, packing_mask
        self.batch_size, self.seed, self.max_samples = batch_size, seed, max_samples
        self.tokenizer_path, self.num_workers, self.num_proc, self.cache_dir = tokenizer, num_workers, num_proc, cache_dir
        self.tokenizer = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._train_tokens = None  # the tokenised training records (a datasets.Dataset), for token_counts
        self.stats: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ reading
    def _load(self, source: str, split: str, what: str):

        return load_source(source, split=split, data_format=self.data_format, dataset_config=self.dataset_config,
                           cache_dir=self.cache_dir, what=what)

    def _sources(self) -> list[tuple[str, str, str]]:
        out = [(self.train, self.split, "train data")]
        if self.val is not None or self.val_split is not None:
            out.append((self.val or self.train, self.val_split or self.split, "validation data"))
        return out

    def prepare_data(self) -> None:
        """Download Hub datasets into the local cache (Lightning runs this on one process per node)."""
        for source, split, what in self._sources():
            self._load(source, split, what)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.tokenizer = self.tokenizer or _resolve_tokenizer(self, self.tokenizer_path)
        sources = self._sources()
        train = self._load(*sources[0])
        if self.max_samples is not None:
            train = train.select(range(min(self.max_samples, len(train))))
        val = self._load(*sources[1]) if len(sources) > 1 else None
        if val is None and self.val_size > 0:
            n_val = int(self.val_size) if self.val_size >= 1 else max(1, round(self.val_size * len(train)))
            if n_val >= len(train):
                raise UserInputError(f"val_size={self.val_size} holds out {n_val} of only {len(train)} training records; "
                                     "lower it or pass val")
            parts = train.train_test_split(test_size=n_val, seed=self.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
        self.train_set, self._train_tokens = self._prepare(train, f"train data {self.train!r}", "train")
        self.val_set = None if val is None else self._prepare(val, f"validation data {sources[-1][0]!r}", "val")[0]

    def _prepare(self, raw, source: str, name: str):
        """Tokenise ``raw`` records, drop those with nothing to train on, pack if asked; log a summary."""
        import numpy as np
        from lightning.pytorch.utilities import rank_zero_info


        fmt = self.format.resolve(raw.column_names, source)
        template = None
        if fmt.uses_chat_template:
            if fmt.chat_template is not None and "{" not in fmt.chat_template:  # a path: templates hold "{%"
                path = Path(fmt.chat_template).expanduser()
                if not path.is_file():
                    raise UserInputError(f"chat_template file {fmt.chat_template!r} does not exist")
                fmt = dataclasses.replace(fmt, chat_template=path.read_text())
            why = f"{source} (chat field {fmt.messages_field!r})" if fmt.fields == "messages" else "use_chat_template"
            template = require_chat_template(self.tokenizer, fmt, why)
        encoder = RecordEncoder(self.tokenizer, fmt, template, self.max_length, self.truncation, source)
        enc = raw.map(encoder, batched=True, with_indices=True, remove_columns=raw.column_names, num_proc=self.num_proc,
                      desc=f"tokenizing {name}")
        counts = np.bincount(np.asarray(enc["status"], dtype=np.int64), minlength=len(STATUS_NAMES))
        enc = enc.filter(lambda status: [s <= TRUNCATED for s in status], input_columns="status", batched=True,
                         desc=f"dropping unusable {name} records")
        stats = {STATUS_NAMES[k]: int(v) for k, v in enumerate(counts) if v}
        if len(enc) == 0:
            require_usable(source, stats)  # names each reason records were dropped for, and its fix
        lengths = enc["length"]
        stats.update(records=len(enc), tokens=int(sum(lengths)), trained_tokens=int(sum(enc["targets"])))
        base = enc.with_format("torch", columns=["input_ids", "labels"])
        dataset: Dataset = base
        line = f"{name}: {stats['records']:,} records, {stats['tokens']:,} tokens ({stats['trained_tokens']:,} trained)"
        if self.packing:
            bins = pack_best_fit(lengths, self.max_length)
            dataset = PackedDataset(base, bins)
            stats["packed_rows"] = len(bins)
            line += f", packed into {len(bins):,} rows of <= {self.max_length} ({stats['tokens'] / (len(bins) * self.max_length):.0%} full)"
        dropped = {k: v for k, v in stats.items() if k.startswith(("dropped", "truncated"))}
        if dropped:
            line += "; " + ", ".join(f"{k}: {v:,}" for k, v in dropped.items())
        rank_zero_info(line)
        self.stats[name] = stats
        return dataset, enc

    # ------------------------------------------------------------------ loading
    def _collate(self):

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise UserInputError("the tokenizer has neither a pad nor an eos token to pad batches with")
        if self.packing:
            return functools.partial(collate_packed, pad_id=pad, mask=self.packing_mask)
        return functools.partial(collate_right_padded, pad_id=pad)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise UserInputError("call setup() before train_dataloader()")
        return _resumable_loader(self, self.train_set, self.batch_size, self.seed, self.num_workers, self._collate())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collate())

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Give a packed batch's 4D mask the backbone's dtype (sdpa wants the query's dtype; a float32
        ``finfo.min`` would round to -inf in bfloat16)."""
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 4 and self.trainer is not None:
            dtype = _compute_dtype(self.trainer)
            if dtype != mask.dtype:

                batch["attention_mask"] = block_causal_mask(batch["position_ids"], dtype)
        return batch

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id is a training target (for FastMTP's vocabulary compression)."""
        import numpy as np
        import pyarrow.compute as pc

        self.setup("fit")
        counts = np.zeros(vocab_size, dtype=np.int64)
        for table in self._train_tokens.with_format("arrow").iter(batch_size=4096):
            flat = pc.list_flatten(table.column("labels")).to_numpy()
            flat = flat[(flat >= 0) & (flat < vocab_size)]
            counts += np.bincount(flat, minlength=vocab_size)
        return torch.from_numpy(counts)


def _resumable_loader(datamodule: L.LightningDataModule, dataset: Dataset, batch_size: int, seed: int,
                      num_workers: int, collate_fn) -> DataLoader:
    """The training loader: shuffled by a seeded ``DistributedSampler`` (on one device too), in a torchdata
    ``StatefulDataLoader``.

    The order is a function of ``seed`` and the epoch alone, on one device or many: Lightning calls ``set_epoch``
    every epoch and keeps this sampler as it is when training is distributed. The loader is stateful, so Lightning
    checkpoints its position inside the epoch and a resumed fit continues with the next batch instead of
    restarting the epoch (Lightning's mid-epoch resume). The sampler starts at the trainer's current epoch because
    a resumed loader fast-forwards as soon as it is iterated, before Lightning's ``set_epoch`` call. Its own
    generator keeps the loader from drawing on the global random state that training uses.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    if trainer is not None:
        sampler.set_epoch(trainer.current_epoch)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


def _compute_dtype(trainer: L.Trainer) -> torch.dtype:
    """The dtype attention runs in: the backbone's parameter dtype, or float32 under autocast (mixed precision)."""
    if str(trainer.precision).endswith("-mixed"):
        return torch.float32  # autocast casts the mask along with the query
    module = trainer.lightning_module
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# ---------------------------------------------------------------------------------------------- shipped answers
_SHIPPING = {"TinyMathDataModule": TinyMathDataModule, "TinyWorldDataModule": TinyWorldDataModule}


def _recipe_sections(recipe: str | os.PathLike) -> tuple[dict, dict, type]:
    """``(model section, datamodule init_args, datamodule class)`` of a recipe that self-distils into a
    self_distill_file."""
    path = Path(recipe)
    if not path.is_file():
        raise UserInputError(f"recipe {str(recipe)!r} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    data = config.get("data") or {}
    init = data.get("init_args") or {}
    cls = _SHIPPING.get(str(data.get("class_path", "")).rsplit(".", 1)[-1])
    if cls is None or not init.get("self_distill_file") or init.get("self_distill") is None:
        raise UserInputError(f"recipe {str(recipe)!r} does not train a {' or '.join(_SHIPPING)} with self_distill and "
                             "a self_distill_file; those are the recipes whose answers ship (e.g. "
                             "recipes/tiny-math/fast_mtp.yaml)")
    return config.get("model") or {}, init, cls


def ship_self_distill(recipe: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """Write the self-distilled answers a tiny-math or tiny-world recipe trains on to the file its
    ``self_distill_file`` names.

    The model is built from the recipe's ``model`` section as ``lightning-mtp fit`` builds it; the prompts and the
    sampling are its ``data`` section's. The answers come from the cache (``cache_dir``, default
    ``~/.cache/lightning-mtp/distill``) or are generated into it, so the file holds exactly what a fit without it
    would generate and train on. A relative ``self_distill_file`` is written relative to the working directory
    (run it from the checkout). Returns the file's path.
    """
    model_args, init, cls = _recipe_sections(recipe)
    module = MTPModule(**model_args)
    datamodule = cls(**{**init, "self_distill": SelfDistill(**init["self_distill"])})
    tokenizer = AutoTokenizer.from_pretrained(datamodule.tokenizer_path) if datamodule.tokenizer_path else \
        module.tokenizer
    prompts = datamodule.distill_prompts(tokenizer)
    about = {
        "recipe": Path(recipe).as_posix(),
        "backbone": str(model_args.get("backbone")),
        "prompts": f"{cls.__name__}.distill_prompts: {len(prompts)}",
        "settings": dataclasses.asdict(datamodule.self_distill),
        "regenerate": f"python -m lightning_mtp.data.datamodule {Path(recipe).as_posix()}",
    }
    return export_self_distill(module.backbone, tokenizer, prompts, datamodule.self_distill,
                               Path(datamodule.self_distill_file).expanduser(), cache_dir=cache_dir, about=about)


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_mtp.data.datamodule RECIPE...``: regenerate the shipped self-distilled answers."""
    parser = argparse.ArgumentParser(prog="python -m lightning_mtp.data.datamodule",
                                     description="Write the self-distilled answers of tiny-math and tiny-world recipes to the "
                                                 "self_distill_file each one names (see ship_self_distill).")
    parser.add_argument("recipes", nargs="+", help="recipe YAML files, e.g. recipes/tiny-math/fast_mtp.yaml")
    parser.add_argument("--cache-dir", default=None, help="the self-distillation cache (default: "
                        "~/.cache/lightning-mtp/distill); answers found there are not generated again")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        started = time.perf_counter()
        try:
            path = ship_self_distill(recipe, cache_dir=args.cache_dir)
        except ValueError as err:
            parser.error(str(err))
        print(f"{path}: {path.stat().st_size / 2**20:.2f} MiB in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
