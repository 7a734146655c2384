"""Mask-token models export as a plain Hugging Face model (``hf``, any engine serves it as a next-token model) and as
a vLLM parallel-drafting draft model (``parallel_draft``: the same, with ``pard_token``, the config field vLLM's
``_init_parallel_drafting_params`` reads the mask id from)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_backbone
from transformers import AutoModelForCausalLM

from lightning_mtp import MTPModule
from lightning_mtp.convert import export


@pytest.fixture(scope="module")
def mask_module() -> MTPModule:
    module = MTPModule(make_backbone("llama"), method={"name": "mask_token"}).eval()
    with torch.no_grad():  # the mask row moved off its initial value, so that its export is checked
        module.base_model.get_input_embeddings().weight[VOCAB].add_(0.5)
    return module


@pytest.mark.parametrize("fmt", ["parallel_draft", "hf"])
def test_a_mask_token_model_exports_as_a_model_engines_load(tmp_path, mask_module, fmt):
    out = export(mask_module, fmt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert ("pard_token" in config) is (fmt == "parallel_draft")
    if fmt == "parallel_draft":
        assert config["pard_token"] == mask_module.method_config.mask_token_id == VOCAB
    served = AutoModelForCausalLM.from_pretrained(out).eval()
    assert served.get_input_embeddings().weight.shape[0] == VOCAB + 1  # the <MTP> row travels with the model
    ids = torch.tensor([[5, 17, 42, 8, VOCAB, VOCAB]])  # a prompt, then two masks: what a parallel draft feeds
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, mask_module.backbone(ids).logits)
    prompt = ids[:, :4]
    assert torch.equal(served.generate(prompt, do_sample=False, max_new_tokens=8),
                       mask_module.backbone.generate(prompt, do_sample=False, max_new_tokens=8))


def test_other_methods_and_unmerged_adapters_are_refused(tmp_path):
    heads = MTPModule(make_backbone("llama"), method={"name": "fast_mtp"})
    with pytest.raises(ValueError, match="needs a mask_token module, got 'fast_mtp'"):
        export(heads, "parallel_draft", tmp_path / "a")
    lora = MTPModule(make_backbone("llama"), method={"name": "mask_token"},
                     lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match="has a LoRA adapter; call module.merge_lora"):
        export(lora, "hf", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    merged = export(lora.merge_lora(), "hf", tmp_path / "c")
    assert (merged / "config.json").is_file()


def test_the_card_of_a_parallel_draft_export_says_how_vllm_drafts_with_it(tmp_path, mask_module):
    from lightning_mtp.hub import model_card

    card = str(model_card(export(mask_module, "parallel_draft", tmp_path / "pard"), repo_id="me/pard"))
    assert '"model": "me/pard", "method": "draft_model", "parallel_drafting": true' in card
    assert "parallel_drafting" not in str(model_card(export(mask_module, "hf", tmp_path / "hf"), repo_id="me/hf"))
