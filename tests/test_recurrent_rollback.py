"""Backbones whose cache holds a running state (linear attention, SSM, convolutions): after a rejected draft the
decoder's cache must be exactly what an uncached forward over the committed tokens gives, and draft heads are
built from an attention layer (or refused by name where there is none)."""

from __future__ import annotations

import pytest
import torch
from arch_sweep import MAX_NEW, PROMPTS, build
from test_decoding import OracleDrafter

from lightning_mtp import MTPModule
from lightning_mtp.backbone import backbone_parts, build_decoder_layer, cache_layer_types, head_layer_index
from lightning_mtp.decoding.speculative import speculative_generate

RECURRENT = ["qwen3_next", "lfm2", "nemotron_h", "olmo_hybrid"]  # linear attention, convolutions, Mamba-2 hybrids


class HalfRightDrafter(OracleDrafter):
    """The backbone's own continuation with its second draft wrong: every step keeps one draft, rejects the rest."""

    def draft(self, hidden, next_ids, k, probs_fn=None, generator=None, valid=None):
        drafts, probs = super().draft(hidden, next_ids, k, probs_fn, generator, valid)
        if drafts.shape[1] > 1:
            drafts = drafts.clone()
            drafts[:, 1] = (drafts[:, 1] + 1) % self.model.get_input_embeddings().weight.shape[0]
        return drafts, probs


def assert_matches_uncached_argmax(model, sequence: torch.Tensor, prompt_len: int) -> None:
    """Every new token is the argmax of a full uncached forward over the tokens before it."""
    with torch.no_grad():
        logits = model(sequence, use_cache=False).logits[0]  # (T, V)
    new = sequence[0, prompt_len:].tolist()
    want = logits[prompt_len - 1 : prompt_len - 1 + len(new)].argmax(-1).tolist()
    assert new == want


@pytest.mark.parametrize("arch", RECURRENT)
@pytest.mark.parametrize("drafter", [HalfRightDrafter, OracleDrafter])
def test_rejections_leave_the_cache_as_an_uncached_forward_would(arch, drafter):
    model = build(arch)
    model.generation_config.eos_token_id = model.config.eos_token_id = None  # the whole budget: more rollbacks
    ids = torch.tensor([PROMPTS[0]])
    out = speculative_generate(model, ids, drafter=drafter(model, ids), num_draft_tokens=3, max_new_tokens=MAX_NEW)
    assert out.sequences.shape[1] == ids.shape[1] + MAX_NEW
    assert_matches_uncached_argmax(model, out.sequences, ids.shape[1])
    if drafter is HalfRightDrafter:
        assert out.stats.accepted[0] > 0 and out.stats.accepted[1] == 0  # one draft kept, the rest rolled back


@pytest.mark.parametrize("arch", ["qwen3_next", "nemotron_h"])
def test_mask_tokens_riding_along_never_reach_a_recurrent_state(arch):
    module = MTPModule(build(arch), method="mask_token").eval()
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=MAX_NEW)
        assert_matches_uncached_argmax(module.backbone, out.sequences, ids.shape[1])


def test_heads_are_built_from_an_attention_layer_of_a_hybrid():
    model = build("qwen3_next")  # layer 0 is linear attention, layer 1 full attention
    parts = backbone_parts(model)
    assert [k.__name__ for k in cache_layer_types(model.config)] == ["LinearAttentionLayer", "DynamicLayer"]
    assert head_layer_index(parts) == 1
    layer, kind = build_decoder_layer(parts)
    assert kind == "full_attention" and hasattr(layer, "self_attn")
    assert all(m.layer_idx == 0 for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))


def test_a_backbone_without_attention_refuses_head_methods_by_name():
    model = build("mamba")
    for method in ("fast_mtp", "mtp_d"):
        with pytest.raises(ValueError, match="no plain attention layer.*use a method without heads, e.g. mask_token"):
            MTPModule(model, method=method)


@pytest.mark.parametrize("arch", ["qwen3_next", "olmo_hybrid"])
def test_confadapt_masks_never_reach_a_recurrent_state(arch):
    # tau = 1.0 keeps one token per forward (nothing is that sure): the output is greedy, while every forward still
    # carries the mask tokens that must be rolled back out of the recurrent state
    module = MTPModule(build(arch), method={"name": "mask_token", "mask_token_id": 299}).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = module.generate(ids, decoding="confadapt", tau=1.0, max_new_tokens=MAX_NEW)
        assert_matches_uncached_argmax(module.backbone, out.sequences, ids.shape[1])
