"""DataModules: prompt/response pairs tokenised for causal-LM training, with optional self-distillation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_mtp.data import tiny_math

__all__ = ["PromptResponseDataset", "SelfDistill", "TinyMathDataModule", "collate_right_padded"]


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


class PromptResponseDataset(Dataset):
    """Token ids of ``prompt + response + eos``; labels are -100 on the prompt (loss on the response only)."""

    def __init__(self, prompts: list[str], responses: list[str], tokenizer, max_length: int) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
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
    ) -> None:
        super().__init__()
        for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0), ("batch_size", batch_size, 1), ("max_length", max_length, 8)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.num_train, self.num_val, self.batch_size, self.max_length = num_train, num_val, batch_size, max_length
        self.self_distill = self_distill
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
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None) is not None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        else:
            raise ValueError("TinyMathDataModule needs a tokenizer: pass tokenizer=DIR or train a model that has one")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tok = self._resolve_tokenizer()
        train = tiny_math.problems("train", self.num_train)
        val = tiny_math.problems("validation", self.num_val)
        prompts = [p.prompt for p in train]
        responses = [p.response for p in train]
        if self.self_distill is not None:
            from lightning_mtp.data.distill import cached_self_distill

            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None:
                raise ValueError("self_distill needs the model: use the datamodule with a Trainer")
            prompts, responses = cached_self_distill(module.backbone, tok, prompts, self.self_distill, cache_dir=self.cache_dir)
        self.train_set = PromptResponseDataset(prompts, responses, tok, self.max_length)
        self.val_set = PromptResponseDataset([p.prompt for p in val], [p.response for p in val], tok, self.max_length)

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
        return self._loader(self.train_set, shuffle=True)

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
        return Path.home() / ".cache" / "lightning-mtp" / "distill"
