"""EAGLE-3 (the peer baseline): it reads the feature layers vLLM numbers, training-time test sees what a drafting step
sees, it learns to draft, stores only what it owns, decodes losslessly as chains and trees, refuses bad settings."""

from __future__ import annotations

import pytest
import torch
from arch_sweep import build
from conftest import ARCHS, greedy_batch, make_backbone, train_method, training_prompts

from lightning_mtp import Eagle3, MTPModule
from lightning_mtp.backbone import LayerOutputs
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.eagle3 import default_aux_layers

PROMPTS = [[8, 60, 48], [4, 32, 56, 9], list(range(20, 31))]
MAX_NEW = 24


def test_feature_ids_are_the_inputs_of_those_layers():
    """Id k is ``hidden_states[k]`` of ``output_hidden_states`` (the input of layer k, as vLLM numbers it)."""
    model = make_backbone("llama", num_hidden_layers=4)
    module = MTPModule(model, method={"name": "eagle3", "aux_layers": [1, 2, 3]})
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad(), LayerOutputs(module.parts, (1, 2, 3)) as grab:
        out = model(ids, output_hidden_states=True)
        got = grab.get(out)  # (1, T, 3H)
    torch.testing.assert_close(got, torch.cat([out.hidden_states[k] for k in (1, 2, 3)], dim=-1))


@pytest.mark.parametrize(("layers", "want"), [(32, [2, 16, 29]), (12, [2, 6, 9]), (4, [1, 2, 4]), (2, [1, 2]), (1, [1])])
def test_default_feature_layers(layers, want):
    assert default_aux_layers(layers) == want


def test_training_time_test_sees_what_a_drafting_step_sees():
    """Step j of the unrolled training at position i gives the logits the drafter gives after committing positions
    0..i and drafting the next j tokens (the same tokens): the training mask is the drafting cache's view."""
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "eagle3", "ttt_steps": 3})
    method, parts = module.method, module.parts
    torch.nn.init.normal_(method.layers[0].hidden_norm.weight, 1.0, 0.3)  # nothing may cancel by symmetry
    ids = torch.tensor([list(range(4, 20))])  # (1, T)
    i = 9  # the last committed position
    with torch.no_grad(), LayerOutputs(parts, method.hidden_layers) as grab:
        features = grab.get(model(ids))  # (1, T, 2H)
        seen = {}
        method.block = _recording(method.block, seen)
        method.loss(parts, ids, ids.clone(), features, model(ids).logits)
        drafter = method.drafter(parts)
        drafter.begin(1, ids.device, holes=False)
        h = drafter._commit(features[:, : i + 1], ids[:, 1 : i + 2], None)  # (1, 1, H) after position i
        for j in range(3):
            torch.testing.assert_close(h[0, 0], seen[j][0, i], msg=f"step {j + 1}")
            h = drafter._extend(h, ids[0, i + 2 + j][None], j)


def _recording(block, seen: dict):
    def record(*args, **kwargs):
        out = block(*args, **kwargs)
        seen[len(seen)] = out
        return out
    return record


def test_training_teaches_it_to_draft():
    model = make_backbone("llama")
    batch = greedy_batch(model, training_prompts(), new_tokens=24)
    fresh = MTPModule(model, method={"name": "eagle3", "ttt_steps": 3})
    with torch.no_grad():
        before = fresh.method.training_loss(fresh.context, batch)[0]
    module = train_method(model, {"name": "eagle3", "ttt_steps": 3}, steps=60, lr=1e-2)
    with torch.no_grad():
        after, logs = module.method.training_loss(module.context, batch)
    assert after < 0.5 * before
    assert logs["draft_correct"].shape[0] == 3 and logs["draft_correct"].float().mean() > 0.5
    out = module.generate(training_prompts()[2], max_new_tokens=MAX_NEW, draft_schedule="constant")
    assert out.stats.acceptance_per_position[0] > 0.5


def test_only_its_own_weights_are_stored_and_they_load(tmp_path):
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "eagle3", "draft_vocab_size": 40})
    stored = module.method.artifact_state_dict()
    assert {k.split(".")[0] for k in stored} == {"fc", "layers", "norm", "draft_ids"}  # no embedding, no output layer
    assert stored["layers.0.self_attn.q_proj.weight"].shape == (4 * 8, 2 * 32)  # reads [embedding; features]
    loaded = MTPModule.from_pretrained(module.save_pretrained(tmp_path / "e3"), backbone=model)
    assert loaded.method.config.aux_layers == module.method.config.aux_layers == [1, 2]
    for key, value in stored.items():
        assert torch.equal(loaded.method.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tree", [None, {"kind": "static"}, {"kind": "dynamic", "depth": 4, "top_k": 3,
                                                              "total_tokens": 12}])
def test_trained_eagle3_decodes_losslessly(arch, tree):
    model = make_backbone(arch)
    module = train_method(model, {"name": "eagle3", "ttt_steps": 3, "draft_vocab_size": 48}, steps=30, lr=1e-2)
    for ids in [torch.tensor([PROMPTS[0]]), *training_prompts()[:3]]:  # the training prompts' drafts land
        out = module.generate(ids, max_new_tokens=MAX_NEW, tree=tree)
        assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)), ids
    assert out.stats.acceptance_per_position[0] > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"ttt_steps": 0}, "eagle3 ttt_steps must be an integer >= 1, got 0"),
    ({"speculative_tokens": 8}, r"eagle3 speculative_tokens \(8\) must be <= ttt_steps \(7\)"),
    ({"decay": 0}, "eagle3 decay must be > 0, got 0"),
    ({"aux_layers": [2, 2]}, r"eagle3 aux_layers must be distinct layer ids \(e.g. \[2, 16, 29\]\) or None, got \[2, 2\]"),
    ({"draft_vocab_size": 0}, "eagle3 draft_vocab_size must be >= 1 or None, got 0"),
])
def test_bad_settings_are_one_clear_error(options, message):
    with pytest.raises(UserInputError, match=message):
        Eagle3(**options)


def test_feature_layers_past_the_backbone_are_refused_by_name():
    with pytest.raises(UserInputError, match=r"eagle3 aux_layers \[3\] are out of range: the backbone has 2 layers"):
        MTPModule(make_backbone("llama"), method={"name": "eagle3", "aux_layers": [1, 3]})


def test_a_backbone_whose_layers_return_several_streams_is_refused_by_name():
    """Layer outputs that are not (B, T, H) (HY-V4's several residual streams) are refused where they are read."""
    module = MTPModule(build("hy_v4"), method="eagle3")
    with pytest.raises(UserInputError, match=r"HYV4DecoderLayer returns \(1, 3, \d+, 32\) from its forward, not the "
                                             r"\(batch, tokens, hidden_size=32\) hidden state .* e.g. fast_mtp or medusa"):
        module.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
