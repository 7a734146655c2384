"""FastMTP's vocabulary compression applied to the shipped tiny-world head: artefacts whose draft head scores only
the N most frequent tokens of its training rows (the paper's recipe keeps the high-frequency subset at drafting;
verification always uses the whole vocabulary, so decoding stays lossless). The head's weights are the shipped
ones, trained on the whole vocabulary: this measures what the subset costs in acceptance and gains in drafting
time at an 8,192-token vocabulary, without retraining.

    .venv/bin/python benchmarks/fastmtp_draft_vocab.py 1024 2048 4096   # writes runs/fastmtp-vocab<N>/
    .venv/bin/lightning-mtp bench --model tiny-world-fastmtp --model runs/fastmtp-vocab2048 ... --no-peers
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_mtp import zoo
from lightning_mtp.data.datamodule import TinyWorldDataModule
from lightning_mtp.data.distill import SelfDistill, cached_self_distill
from lightning_mtp.module import MTPModule

REPO = Path(__file__).resolve().parent.parent
ENTRY = "tiny-world-fastmtp"


def response_counts(module: MTPModule) -> torch.Tensor:
    """(V,) how often each token occurs in the head's training targets: the base's shipped continuations of the
    3,000 passages of recipes/tiny-world/fast_mtp.yaml (the same prompts and sampling settings, so the same file)."""
    dm = TinyWorldDataModule(num_prompts=3000, prompt_tokens=192, self_distill=SelfDistill(max_new_tokens=128,
                                                                                         batch_size=64))
    tok = module.tokenizer
    _, responses = cached_self_distill(module.backbone, tok, dm.distill_prompts(tok), dm.self_distill,
                                       shipped=REPO / "zoo" / "tiny-world-base" / "self_distill.jsonl.gz",
                                       keep_unfinished=True)
    ids = torch.tensor([t for r in tok(responses, add_special_tokens=False)["input_ids"] for t in r])
    return torch.bincount(ids, minlength=module.parts.vocab_size)


def main(sizes: list[int]) -> None:
    shipped = zoo.load(ENTRY)
    counts = response_counts(shipped)  # (V,)
    for size in sizes:
        method = {**shipped.method_config.to_dict(), "draft_vocab_size": size}
        module = MTPModule(shipped.backbone_ref, method=method)
        keys = module.method.load_state_dict(shipped.method.state_dict(), strict=False)
        assert keys.missing_keys == ["draft_ids"] and not keys.unexpected_keys, keys  # all but the subset: shipped
        module.method.prepare(counts)
        out = module.save_pretrained(REPO / "runs" / f"fastmtp-vocab{size}")
        print(f"{out}: draft vocabulary {size} of {shipped.parts.vocab_size}, "
              f"{counts[module.method.draft_ids].sum() / counts.sum():.3f} of the training tokens")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2048])
