"""The decoder's capability probes: a backbone that cannot decode through transformers' DynamicCache, or whose cache
cannot drop its last tokens, is refused with one clear error naming what the probe found, before any decode; a
healthy backbone passes both."""

from __future__ import annotations

import pytest
import torch
from arch_sweep import build
from conftest import make_backbone
from transformers import DynamicCache

from lightning_mtp import MTPModule
from lightning_mtp.decoding.speculative import crop_problem, dynamic_cache_problem, needs_row_by_row


def test_a_healthy_backbone_passes_both_probes():
    model = make_backbone("llama")
    assert dynamic_cache_problem(model) is None and crop_problem(model) is None


def test_a_cache_that_does_not_drop_tokens_is_found(monkeypatch):
    model = make_backbone("llama", seed=3)  # a model of its own: the probes remember each model's answer
    monkeypatch.setattr(DynamicCache, "crop", lambda self, max_length: None)  # keeps the dropped tokens
    assert "after a crop its logits differ" in crop_problem(model)
    module = MTPModule(model, method={"name": "fast_mtp"})
    with pytest.raises(ValueError, match="cannot drop tokens from the end of its cache.*num_draft_tokens=0"):
        module.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)


def test_a_model_with_a_cache_class_of_its_own_is_refused_by_name():
    model = build("minimax")
    assert "MiniMax uses cache of its own" in dynamic_cache_problem(model)
    module = MTPModule(model, method={"name": "mask_token", "mask_token_id": 3})
    with pytest.raises(ValueError, match=r"MiniMaxForCausalLM cannot decode through transformers' DynamicCache"):
        module.generate(torch.tensor([[5, 6, 7]]), decoding="speculative", max_new_tokens=4)


def test_a_cache_that_cannot_crop_refuses_drafts_but_decodes_without_them():
    model = build("deepseek_v4")
    assert crop_problem(model) is not None
    module = MTPModule(model, method={"name": "mask_token", "mask_token_id": 3})
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="DeepseekV4ForCausalLM cannot drop tokens from the end of its cache"):
        module.generate(ids, decoding="speculative", max_new_tokens=6)
    plain = module.generate(ids, decoding="speculative", num_draft_tokens=0, max_new_tokens=6).sequences
    assert torch.equal(plain, model.generate(ids, do_sample=False, max_new_tokens=6))


def test_a_backbone_that_loses_a_hole_through_the_cache_decodes_row_by_row():
    """GIT honours a masked slot in one forward but not once it sits in the cache: the probe finds it, and a
    left-padded batch then decodes each row as alone."""
    assert needs_row_by_row(build("git")) and not needs_row_by_row(make_backbone("llama"))


def test_a_cache_that_drops_what_one_forward_still_sees_is_probed_past_its_window():
    """Moshi's cache keeps its sliding window (8 here) while one forward over the same tokens attends past it: the
    two agree on 5 tokens and differ from the 9th on, so the probe runs two tokens past a small window and finds it."""
    model = build("moshi")
    assert model.config.sliding_window == 8
    assert "one token at a time differ from one forward's" in dynamic_cache_problem(model)
    module = MTPModule(model, method={"name": "mask_token", "mask_token_id": 3})
    with pytest.raises(ValueError, match="MoshiForCausalLM cannot decode through transformers' DynamicCache"):
        module.generate(torch.tensor([[5, 6, 7]]), decoding="speculative", max_new_tokens=4)
