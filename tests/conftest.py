"""Shared fixtures: tiny random backbones of several architectures, built offline from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

torch.set_num_threads(1)  # the test machine is small and shared

VOCAB = 64
EOS = 3  # inside the vocabulary; prompts use ids >= 4
ARCHS = ("llama", "qwen3", "mistral", "gpt2")

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=0, initializer_range=0.2)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_CONFIGS = {
    "llama": dict(_DECODER),
    "qwen3": dict(_DECODER, head_dim=8),
    "mistral": dict(_DECODER, sliding_window=8),  # prompts + generations run past the window
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def make_backbone(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A 2-layer, hidden-32, vocab-64 causal LM of ``arch``, random but seeded, in eval mode.

    The large init (0.2) keeps argmax logits well separated, so greedy decoding does not hinge on
    float noise between kernel shapes (cached vs uncached, 1 vs K+1 query rows).
    """
    config = AutoConfig.for_model(arch, **{**_COMMON, **_CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture
def tiny_backbone():
    """Factory: ``tiny_backbone("llama")`` -> a fresh seeded tiny model (see :func:`make_backbone`)."""
    return make_backbone


def training_prompts(num: int = 16, prompt_len: int = 6, seed: int = 1234) -> list[torch.Tensor]:
    """The (1, prompt_len) prompts whose greedy continuations :func:`train_fast_mtp` trains on."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (1, prompt_len), generator=g) for _ in range(num)]


def greedy_batch(model: PreTrainedModel, prompts: list[torch.Tensor], new_tokens: int) -> dict:
    """A training batch of the backbone's own greedy continuations of ``prompts`` (right-padded)."""
    seqs = [model.generate(ids, do_sample=False, max_new_tokens=new_tokens)[0] for ids in prompts]
    T = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):  # sequences that hit EOS early are shorter
        input_ids[i, : len(s)], labels[i, : len(s)], attention_mask[i, : len(s)] = s, s, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_fast_mtp(model: PreTrainedModel, steps: int = 40, lr: float = 3e-3, **method):
    """An MTPModule whose FastMTP head was self-distilled for ``steps`` AdamW steps on ``model``'s greedy output."""
    return train_method(model, {"name": "fast_mtp", **method}, steps=steps, lr=lr)


def train_method(model: PreTrainedModel, method, steps: int = 40, lr: float = 3e-3):
    """An MTPModule whose ``method`` was trained for ``steps`` AdamW steps on ``model``'s own greedy output."""
    from lightning_mtp import MTPModule

    module = MTPModule(model, method=method)
    torch.manual_seed(0)
    return train_steps(module, greedy_batch(model, training_prompts(), new_tokens=24), steps, lr)


def train_steps(module, batch: dict, steps: int, lr: float = 3e-3):
    """``steps`` AdamW steps of ``module`` (an MTPModule) on one ``batch``; returns it in eval mode."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for i in range(steps):
        loss = module.training_step(batch, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


@pytest.fixture(scope="session")
def trained_fast_mtp():
    """Factory: ``trained_fast_mtp("llama")`` -> an MTPModule with a trained FastMTP head (built once per arch)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = train_fast_mtp(make_backbone(arch))
        return cache[arch]

    return get
