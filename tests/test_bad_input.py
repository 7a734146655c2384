"""Bad input fails fast with a ValueError that names the bad value (and the valid choices where there are some)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_backbone

from lightning_mtp import FastMTP, MTPModule
from lightning_mtp.decoding.speculative import speculative_generate


@pytest.fixture(scope="module")
def module() -> MTPModule:
    return MTPModule(make_backbone("llama"), method="fast_mtp")


PROMPT = torch.tensor([[5, 6, 7, 8]])


# ---------------------------------------------------------------- methods


def test_unknown_method_name_lists_the_registered_ones():
    # the method is resolved before the backbone is loaded: the missing directory is never touched
    with pytest.raises(ValueError, match=r"unknown method 'fast_mpt'; registered methods are \[.*'fast_mtp'.*\]"):
        MTPModule(backbone="/nonexistent/dir", method="fast_mpt")
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*'fast_mtp'"):
        MTPModule(make_backbone("llama"), method={"name": "nope"})


@pytest.mark.parametrize("num_steps", [0, -2])
def test_chain_length_below_one_is_refused(num_steps):
    with pytest.raises(ValueError, match=rf"num_steps \(K\) must be an integer >= 1, got {num_steps}"):
        FastMTP(num_steps=num_steps)
    with pytest.raises(ValueError, match=rf"num_steps \(K\) must be an integer >= 1, got {num_steps}"):
        MTPModule(backbone="/nonexistent/dir", method={"name": "fast_mtp", "num_steps": num_steps})


def test_non_integer_chain_length_is_refused():
    with pytest.raises(ValueError, match=r"num_steps \(K\) must be an integer >= 1, got 2.5"):
        FastMTP(num_steps=2.5)


def test_unknown_method_option_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) \['num_stpes'\] for method 'fast_mtp'; valid options are \[.*'num_steps'.*\]",
    ):
        MTPModule(backbone="/nonexistent/dir", method={"name": "fast_mtp", "num_stpes": 2})


def test_method_mapping_without_a_name():
    with pytest.raises(ValueError, match=r"needs a 'name' key, one of \[.*'fast_mtp'.*\]"):
        MTPModule(backbone="/nonexistent/dir", method={"num_steps": 2})


def test_method_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"method must be a name, a mapping or a MethodConfig, got int"):
        MTPModule(backbone="/nonexistent/dir", method=3)


@pytest.mark.parametrize(("option", "value"), [("beta", 0.0), ("beta", -1.0), ("draft_vocab_size", 0)])
def test_bad_method_values_are_named(option, value):
    with pytest.raises(ValueError, match=rf"fast_mtp {option} must be .*got {value}"):
        FastMTP(**{option: value})


def test_draft_vocabulary_larger_than_the_backbone_vocabulary():
    with pytest.raises(ValueError, match=r"draft_vocab_size 100 exceeds the backbone's vocabulary \(64\)"):
        MTPModule(make_backbone("llama"), method={"name": "fast_mtp", "draft_vocab_size": 100})


# ---------------------------------------------------------------- backbone and module options


@pytest.mark.parametrize("path", ["/nonexistent/dir", "./no/such/model"])
def test_missing_backbone_directory(path):
    with pytest.raises(ValueError, match=rf"backbone '{path}' not found: no such directory.*zoo"):
        MTPModule(backbone=path, method="fast_mtp")


def test_bad_optimizer_options():
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got 0"):
        MTPModule(backbone="/nonexistent/dir", learning_rate=0)
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\), got 1.0"):
        MTPModule(backbone="/nonexistent/dir", warmup_ratio=1.0)


# ---------------------------------------------------------------- generate


def test_prompt_longer_than_the_context():
    model = make_backbone("llama", max_position_embeddings=16)
    prompt = torch.arange(4, 24)[None]  # (1, 20)
    with pytest.raises(ValueError, match=r"the prompt has 20 tokens but the model's context is 16"):
        MTPModule(model, method="fast_mtp").generate(prompt, max_new_tokens=4)


def test_prompt_longer_than_a_gpt2_context():
    model = make_backbone("gpt2", n_positions=16)  # GPT-2 names its context n_positions
    with pytest.raises(ValueError, match=r"the prompt has 20 tokens but the model's context is 16"):
        MTPModule(model, method="fast_mtp").generate(torch.arange(4, 24)[None], max_new_tokens=4)


def test_streaming_a_batch(module):
    from transformers import TextStreamer

    class Tok:  # a streamer needs a tokenizer only to decode, which the refusal comes before
        def decode(self, *args, **kwargs):
            return ""

    with pytest.raises(ValueError, match=r"a streamer takes one sequence, got a batch of 2"):
        module.generate(PROMPT.repeat(2, 1), max_new_tokens=4, streamer=TextStreamer(Tok()))


def test_prompt_of_the_wrong_shape(module):
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\), got shape \(4,\)"):
        module.generate(PROMPT[0], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"the prompt is empty"):
        module.generate(PROMPT[:, :0], max_new_tokens=4)


@pytest.mark.parametrize("max_new_tokens", [0, -1])
def test_max_new_tokens_below_one(module, max_new_tokens):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be >= 1, got {max_new_tokens}"):
        module.generate(PROMPT, max_new_tokens=max_new_tokens)


def test_negative_draft_count(module):
    with pytest.raises(ValueError, match=r"num_draft_tokens must be >= 0, got -1"):
        module.generate(PROMPT, max_new_tokens=4, num_draft_tokens=-1)
    with pytest.raises(ValueError, match=r"num_draft_tokens must be >= 0, got -2"):
        speculative_generate(module.backbone, PROMPT, num_draft_tokens=-2)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_non_positive_temperature_when_sampling(module, temperature):
    with pytest.raises(ValueError, match=rf"temperature must be > 0 when sampling, got {temperature}"):
        module.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=temperature)
    # greedy decoding ignores the temperature
    assert module.generate(PROMPT, max_new_tokens=4, temperature=temperature).sequences.shape == (1, 8)


def test_bad_top_p_and_top_k(module):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        module.generate(PROMPT, max_new_tokens=4, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        module.generate(PROMPT, max_new_tokens=4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 disables it\), got -1"):
        module.generate(PROMPT, max_new_tokens=4, do_sample=True, top_k=-1)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_draft_confidence_threshold_outside_zero_to_one(module, threshold):
    with pytest.raises(ValueError, match=rf"draft_confidence_threshold must be within \[0, 1\], got {threshold}"):
        module.generate(PROMPT, max_new_tokens=4, draft_confidence_threshold=threshold)


def test_draft_confidence_threshold_with_a_mode_that_does_not_draft_chains():
    module = MTPModule(make_backbone("llama"), method="mask_token")
    with pytest.raises(ValueError, match=r"draft_confidence_threshold applies to speculative decoding, not 'confadapt'"):
        module.generate(PROMPT, max_new_tokens=4, decoding="confadapt", draft_confidence_threshold=0.5)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[5, 64, 7]]), r"input_ids holds token id 64, outside the model's vocabulary \[0, 64\)"),
    (torch.tensor([[5, -1, 7]]), r"input_ids holds token id -1, outside the model's vocabulary \[0, 64\)"),
    (torch.tensor([[5.0, 6.0]]), r"input_ids must hold integer token ids \(torch.long\), got dtype torch.float32"),
    (torch.tensor([[True, False]]), r"input_ids must hold integer token ids \(torch.long\), got dtype torch.bool"),
    ([[5, 6]], r"input_ids must be a torch.Tensor of token ids, got list"),
])
def test_token_ids_are_checked_before_any_forward(module, ids, message):
    for decoding in ("speculative", None):
        with pytest.raises(ValueError, match=message):
            module.generate(ids, max_new_tokens=4, decoding=decoding)
    if isinstance(ids, torch.Tensor):
        with pytest.raises(ValueError, match=message):
            speculative_generate(module.backbone, ids, max_new_tokens=4)


@pytest.mark.parametrize("max_new_tokens", [2.5, "8", True, None])
def test_max_new_tokens_must_be_an_integer(module, max_new_tokens):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 1, got {re.escape(repr(max_new_tokens))}"):
        module.generate(PROMPT, max_new_tokens=max_new_tokens)
