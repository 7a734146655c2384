"""Builders for small saved models with the tiny-math tokenizer (for CLI, recipe and artefact tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "recipes" / "tiny-math" / "base-init"


def save_tiny_math_shaped_model(path: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A 2-layer, hidden-32 Llama with the tiny-math tokenizer, saved as a plain HF model directory."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, initializer_range=0.2, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
