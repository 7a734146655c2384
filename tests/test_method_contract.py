"""The contract every registered method keeps, run over the method registry (``METHODS``): a method added with one
file and one registration is checked here without a line of new test code.

- lossless: greedy decoding equals the backbone's own ``generate``, with heads trained a few steps (so drafts are
  accepted and the acceptance paths run) and at several draft lengths;
- batches: a left-padded batch decodes each row exactly as the row decodes alone;
- artefacts: ``save_pretrained`` then ``from_pretrained`` gives back the same method weights and the same decode.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, make_backbone, train_method, training_prompts
from helpers import save_tiny_math_shaped_model

from lightning_mtp import METHODS, MTPModule
from lightning_mtp.methods.base import MethodContext

MAX_NEW = 20
PROMPTS = [[5], [8, 60, 48], [7, 11, 13, 17, 19, 23], list(range(20, 31))]


@pytest.fixture(scope="module")
def trained():
    """Factory: ``trained(name)`` -> an MTPModule on a tiny llama whose method trained 30 steps (built once)."""
    cache: dict[str, MTPModule] = {}

    def get(name: str) -> MTPModule:
        if name not in cache:
            cache[name] = train_method(make_backbone("llama"), {"name": name}, steps=30)
        return cache[name]

    return get


def _rows(sequences: torch.Tensor, width: int) -> list[list[int]]:
    """Each row's new tokens, cut after its EOS (what follows is padding)."""
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in sequences[:, width:].tolist()]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_greedy_decoding_is_lossless(name, trained):
    module = trained(name)
    k = module.num_draft_tokens
    for prompt in [p[0].tolist() for p in training_prompts()[:2]] + PROMPTS:
        ids = torch.tensor([prompt])
        want = module.backbone.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
        for num_draft_tokens in sorted({1, k}):
            got = module.generate(ids, max_new_tokens=MAX_NEW, num_draft_tokens=num_draft_tokens)
            assert got.sequences.tolist() == want.tolist(), (prompt, num_draft_tokens)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tree_decoding_is_lossless_or_refused_by_name(name, trained):
    """Every method that drafts trees is lossless with a static and a dynamic tree (drafts accepted: trained heads);
    one that drafts chains only says so."""
    module = trained(name)
    trees = [{"kind": "static"}, {"kind": "dynamic", "depth": 4, "top_k": 3, "total_tokens": 12}]
    if not module.method.drafter(module.parts).drafts_trees:
        with pytest.raises(ValueError, match="drafts chains only; decode without tree"):
            module.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=4, tree=trees[0])
        return
    accepted = 0
    for prompt in [p[0].tolist() for p in training_prompts()[:2]] + PROMPTS:
        ids = torch.tensor([prompt])
        want = module.backbone.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
        for tree in trees:
            got = module.generate(ids, max_new_tokens=MAX_NEW, tree=tree)
            assert got.sequences.tolist() == want.tolist(), (prompt, tree)
            accepted += sum(got.stats.accepted)
    assert accepted > 0  # the walk descended through trees, not only past them


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_batch_decodes_each_row_as_alone(name, trained):
    module = trained(name)
    prompts = [p[0].tolist() for p in training_prompts()[:2]] + PROMPTS
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # (B, width) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    assert out.sequences[:, :width].tolist() == ids.tolist()
    for prompt, row in zip(prompts, _rows(out.sequences, width), strict=True):
        alone = module.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW).sequences
        assert row == _rows(alone, len(prompt))[0], prompt


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_and_load_round_trip(name, tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": name})
    with torch.no_grad():  # away from the initial weights, so a load that kept them would show
        for p in module.method.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    loaded = MTPModule.from_pretrained(module.save_pretrained(tmp_path / "art"))
    assert loaded.method_config.to_dict() == module.method_config.to_dict()
    mine, theirs = module.method.artifact_state_dict(), loaded.method.artifact_state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = module.tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    assert torch.equal(module.generate(ids, max_new_tokens=10).sequences, loaded.generate(ids, max_new_tokens=10).sequences)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_sees_a_narrow_context_not_the_module(name, monkeypatch):
    module = MTPModule(make_backbone("llama"), method={"name": name})
    seen = []
    original = module.method.training_loss

    def spy(context, batch):
        seen.append(context)
        return original(context, batch)

    monkeypatch.setattr(module.method, "training_loss", spy)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    module.training_step({"input_ids": ids, "labels": ids.clone()}, 0)
    (context,) = seen
    assert isinstance(context, MethodContext) and not isinstance(context, MTPModule)
    assert context.backbone is module.backbone and context.parts is module.parts
    module.eval()
    assert context.training is False  # live: it follows the module's mode


def test_fast_mtp_draft_vocabulary_rows_follow_the_output_layer():
    """Decoding keeps the gathered draft rows (gathering costs a whole output-layer matmul); they must be those of
    the output layer as it is now, and the gradient path must gather afresh."""
    module = MTPModule(make_backbone("llama"), method={"name": "fast_mtp", "draft_vocab_size": 16})
    head, parts = module.method, module.parts
    head.draft_ids.copy_(torch.randperm(parts.vocab_size)[:16])
    h = torch.randn(2, 3, parts.lm_head.weight.shape[1])
    with torch.no_grad():
        cached = head.logits(parts, h)
        assert torch.equal(cached, head.logits(parts, h))
        parts.lm_head.weight.mul_(2)  # a merged adapter or an optimizer step changes the weights in place
        changed = head.logits(parts, h)
        head.draft_ids.copy_(torch.arange(16))  # prepare() picks the subset in place too
        reordered = head.logits(parts, h)
    fresh = head.logits(parts, h)  # with gradients: gathered now
    assert not torch.allclose(changed, cached) and torch.allclose(reordered, fresh.detach())
    expected = torch.nn.functional.linear(head.block.final_norm(h), parts.lm_head.weight[:16])
    assert torch.allclose(fresh, expected)
