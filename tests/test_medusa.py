"""Medusa-1 (the peer baseline): heads start as the identity, train to predict further ahead, store only what they
own, decode losslessly as chains and as trees, and refuse bad settings by name."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_batch, make_backbone, train_method, training_prompts

from lightning_mtp import Medusa, MTPModule
from lightning_mtp.backbone import LastHiddenState
from lightning_mtp.errors import UserInputError

PROMPTS = [[8, 60, 48], [4, 32, 56, 9], list(range(20, 31))]
MAX_NEW = 24


def test_fresh_heads_start_from_the_backbone_output_layer():
    """The ResBlocks start at W = 0 (Medusa's initialisation): head k is the backbone's output layer applied to
    ``h + SiLU(b)``, close to what the backbone predicts."""
    module = MTPModule(make_backbone("llama"), method={"name": "medusa", "num_heads": 3})
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad(), LastHiddenState(module.parts) as grab:
        out = module.backbone(ids, **grab.kwargs)
        hidden = grab.get(out)
        for k in range(3):
            block = module.method.heads[k][0]
            assert not block.linear.weight.any()
            want = module.parts.lm_head(hidden + torch.nn.functional.silu(block.linear.bias))
            torch.testing.assert_close(module.method.logits(module.parts, k, hidden), want)


def test_training_teaches_each_head_the_token_further_ahead():
    model = make_backbone("llama")
    batch = greedy_batch(model, training_prompts(), new_tokens=24)
    fresh = MTPModule(model, method="medusa")
    with torch.no_grad():
        before = fresh.method.training_loss(fresh.context, batch)[0]
    module = train_method(model, "medusa", steps=60, lr=1e-2)
    with torch.no_grad():
        after, logs = module.method.training_loss(module.context, batch)
    assert after < 0.7 * before
    assert logs["draft_correct"].shape[0] == 4 and (logs["draft_correct"].float().mean(1) > 0.3).all()
    out = module.generate(training_prompts()[2], max_new_tokens=MAX_NEW, draft_schedule="constant")
    assert out.stats.acceptance_per_position[0] > 0.5


def test_a_shared_output_layer_is_not_stored_and_an_own_one_is(tmp_path):
    model = make_backbone("llama")
    shared = MTPModule(model, method="medusa").method.artifact_state_dict()
    assert all(key.startswith("heads.") for key in shared) and len(shared) == 4 * 2  # weight and bias per ResBlock
    own = MTPModule(model, method={"name": "medusa", "own_lm_head": True})
    assert sum(key.startswith("lm_heads.") for key in own.method.artifact_state_dict()) == 4
    assert all(p.requires_grad for p in own.method.lm_heads.parameters())
    loaded = MTPModule.from_pretrained(own.save_pretrained(tmp_path / "own"), backbone=model)
    for key, value in own.method.state_dict().items():
        assert torch.equal(loaded.method.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tree", [None, {"kind": "static"}, {"kind": "dynamic", "depth": 4, "top_k": 3,
                                                              "total_tokens": 12}])
def test_trained_medusa_decodes_losslessly(arch, tree):
    model = make_backbone(arch)
    module = train_method(model, "medusa", steps=30, lr=1e-2)
    for ids in [torch.tensor([PROMPTS[0]]), *training_prompts()[:3]]:  # the training prompts' drafts land
        out = module.generate(ids, max_new_tokens=MAX_NEW, tree=tree)
        assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)), ids


@pytest.mark.parametrize(("options", "message"), [
    ({"num_heads": 0}, "medusa num_heads must be an integer >= 1, got 0"),
    ({"num_layers": 1.5}, "medusa num_layers must be an integer >= 1, got 1.5"),
    ({"decay": 0}, "medusa decay must be > 0, got 0"),
    ({"own_lm_head": "yes"}, "medusa own_lm_head must be true or false, got 'yes'"),
])
def test_bad_settings_are_one_clear_error(options, message):
    with pytest.raises(UserInputError, match=message):
        Medusa(**options).validate()


def test_a_chain_longer_than_the_heads_is_refused_and_a_deeper_tree_is_cut():
    module = MTPModule(make_backbone("llama"), method={"name": "medusa", "num_heads": 2})
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(UserInputError, match="medusa has 2 heads, so it drafts at most that many tokens per step"):
        module.generate(ids, max_new_tokens=8, num_draft_tokens=3)
    out = module.generate(ids, max_new_tokens=8, tree={"kind": "static"})  # depth 6, cut to the 2 heads
    assert len([r for r in out.stats.reached if r]) <= 2
