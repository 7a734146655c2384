"""A small byte-level BPE tokenizer for the tiny-math world, with every digit its own token."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from lightning_mtp.data.tiny_math import problems

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "make_tiny_math_init", "tiny_math_corpus", "train_tokenizer", "write_base_init"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; digits are split one per token so numbers compose."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None, padding_side="left"
    )


def tiny_math_corpus(n: int = 20000) -> list[str]:
    """Prompt + response texts of ``n`` train problems: the corpus the tiny-math tokenizer is trained on."""
    return [p.prompt + p.response for p in problems("train", n)]


def write_base_init(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int, hidden_size: int, num_layers: int,
                    num_key_value_heads: int, max_position_embeddings: int) -> None:
    """Write an untrained base: a byte-level BPE trained on ``texts`` and a deep, narrow Llama config (heads of 32
    dimensions, tied embeddings, the MLP 8/3 of the width rounded down to 64), for a world's base recipe to train."""
    tok = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 64 * 64,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def make_tiny_math_init(out_dir: str, vocab_size: int = 768, hidden_size: int = 192, num_layers: int = 10) -> None:
    """Write the untrained tiny-math base (multi-head attention, 256 positions).

    ``lightning-mtp fit --config recipes/tiny-math/base.yaml`` trains it from scratch.
    """
    write_base_init(out_dir, tiny_math_corpus(), vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                    num_key_value_heads=hidden_size // 32, max_position_embeddings=256)


if __name__ == "__main__":
    import sys

    make_tiny_math_init(sys.argv[1] if len(sys.argv) > 1 else "recipes/tiny-math/base-init")
