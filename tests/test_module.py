"""MTPModule contract: registry, what trains, artefact round trip, vocabulary compression, Lightning fit."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from conftest import greedy_batch, make_backbone, training_prompts
from helpers import save_tiny_math_shaped_model

from lightning_mtp import METHODS, FastMTP, MTPModule, register_method
from lightning_mtp.data.datamodule import TinyMathDataModule
from lightning_mtp.methods.base import MethodConfig, resolve_method


def test_registry_resolves_names_mappings_and_instances():
    assert "fast_mtp" in METHODS
    assert resolve_method("fast_mtp") == FastMTP()
    assert resolve_method({"name": "fast_mtp", "num_steps": 2}) == FastMTP(num_steps=2)
    cfg = FastMTP(num_steps=4, beta=0.5)
    assert resolve_method(cfg) is cfg
    assert resolve_method(None) is None
    assert resolve_method(cfg.to_dict()) == cfg


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="'fast_mtp' is already registered"):

        @register_method("fast_mtp")
        @dataclass
        class Other(MethodConfig):
            pass


def test_fast_mtp_loss_weights_follow_the_paper():
    assert FastMTP().loss_weights() == pytest.approx([0.51, 0.31, 0.18], abs=0.005)
    assert sum(FastMTP(num_steps=5, beta=0.8).loss_weights()) == pytest.approx(1.0)


def _one_backward(module, batch):
    module.train()
    module.zero_grad()
    module.training_step(batch, 0).backward()


def test_frozen_backbone_gets_no_gradient_and_the_head_does():
    model = make_backbone("llama")
    module = MTPModule(model, method="fast_mtp")
    _one_backward(module, greedy_batch(model, training_prompts(4), 8))
    assert all(p.grad is None for p in module.backbone.parameters())
    head_grads = [p.grad for p in module.method.parameters()]
    assert head_grads and all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)


def test_plain_ntp_training_trains_the_backbone():
    model = make_backbone("qwen3")
    module = MTPModule(model, method=None)
    assert module.method is None and module.num_draft_tokens == 0
    _one_backward(module, greedy_batch(model, training_prompts(4), 8))
    assert all(p.grad is not None for p in module.backbone.parameters() if p.requires_grad)


def test_lora_trains_only_the_adapter_and_the_head():
    model = make_backbone("llama")
    module = MTPModule(model, method="fast_mtp", lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("method.") for n in trainable)
    ids = training_prompts(1)[0]
    assert torch.equal(module.generate(ids, max_new_tokens=12).sequences,
                       module.backbone.generate(ids, do_sample=False, max_new_tokens=12))


def test_save_and_load_round_trip(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "fast_mtp", "num_steps": 2})
    with torch.no_grad():
        for p in module.method.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out_dir = module.save_pretrained(tmp_path / "art")
    config = json.loads((out_dir / "mtp_config.json").read_text())
    assert config["base_model"]["name_or_path"] == "../base"  # relative, never absolute
    assert config["method"] == {"name": "fast_mtp", "num_steps": 2, "beta": 0.6, "draft_vocab_size": None,
                                "recurse_on_normed": False, "head_layer": None}
    assert not any(p.name.endswith(".tmp") or p.name.startswith(".") for p in tmp_path.iterdir())
    loaded = MTPModule.from_pretrained(out_dir)
    for (k, a), (k2, b) in zip(module.method.state_dict().items(), loaded.method.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    ids = module.tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    assert torch.equal(module.generate(ids, max_new_tokens=10).sequences, loaded.generate(ids, max_new_tokens=10).sequences)


def test_plain_model_directory_loads_as_ntp(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule.from_pretrained(base)
    assert module.method is None and module.tokenizer is not None


def test_loading_heads_onto_a_different_base_is_refused(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    MTPModule(str(base), method="fast_mtp").save_pretrained(tmp_path / "art")
    other = make_backbone("llama")  # vocab 64, hidden 32 vs the tiny-math vocab
    with pytest.raises(ValueError, match="trained on a base with vocab"):
        MTPModule.from_pretrained(tmp_path / "art", backbone=other)


def test_corrupt_weights_are_a_clear_error(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    out = MTPModule(str(base), method="fast_mtp").save_pretrained(tmp_path / "art")
    (out / "mtp_method.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .*mtp_method.safetensors"):
        MTPModule.from_pretrained(out)


def test_vocabulary_compression_drafts_only_frequent_tokens_and_stays_lossless():
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "fast_mtp", "draft_vocab_size": 16})
    counts = torch.zeros(64, dtype=torch.long)
    frequent = torch.arange(20, 36)
    counts[frequent] = 100 + torch.arange(16)
    module.method.prepare(counts)
    assert torch.equal(module.method.draft_ids, frequent)
    drafter = module.method.drafter(module.parts)
    hidden = torch.randn(1, 5, 32)
    drafts, _ = drafter.draft(hidden, torch.randint(4, 64, (1, 5)), 3)
    assert set(drafts.flatten().tolist()) <= set(frequent.tolist())
    for ids in training_prompts(3):
        expected = model.generate(ids, do_sample=False, max_new_tokens=20)
        assert torch.equal(module.generate(ids, max_new_tokens=20).sequences, expected)
        # long chains ending at unconfident positions: the confidence is read over the draft vocabulary
        long = module.generate(ids, max_new_tokens=20, num_draft_tokens=8, draft_confidence_threshold=0.1)
        assert torch.equal(long.sequences, expected)


def test_fast_mtp_bench_entries_are_the_trained_chain_and_long_confident_chains():
    module = MTPModule(make_backbone("llama"), method="fast_mtp")
    entries = module.method.bench_entries()
    assert entries == [("fast_mtp", {"decoding": "speculative"}),
                       ("fast_mtp/k64@0.4", {"decoding": "speculative", "num_draft_tokens": 64,
                                             "draft_confidence_threshold": 0.4})]
    sweep = dict(module.method.bench_entries(sweep=True))
    assert [sweep[f"fast_mtp/k{n}@0.4"]["num_draft_tokens"] for n in (8, 16, 32)] == [8, 16, 32]


def test_lightning_fit_logs_acceptance_metrics(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method="fast_mtp", learning_rate=1e-3)
    dm = TinyMathDataModule(num_train=32, num_val=16, batch_size=8)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.method.state_dict().items()}
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in ("val/AR_1", "val/CAR_3", "val/tau_estimate", "train/loss"):
        assert key in metrics, key
    assert 1.0 <= float(metrics["val/tau_estimate"]) <= 4.0
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in module.method.state_dict().items())


def _perturb(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)


def test_lora_artefact_holds_the_adapter_and_round_trips(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = MTPModule(str(base), method="fast_mtp", lora=lora)
    torch.manual_seed(0)
    _perturb(p for p in module.parameters() if p.requires_grad)  # LoRA B starts at zero: make it matter
    out = module.save_pretrained(tmp_path / "art")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the frozen base is not copied
    assert json.loads((out / "mtp_config.json").read_text())["weights"] == "method+adapter"
    loaded = MTPModule.from_pretrained(out)
    ids = module.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(ids).logits, module.backbone(ids).logits)
    assert torch.equal(module.generate(ids, max_new_tokens=10).sequences, loaded.generate(ids, max_new_tokens=10).sequences)


def test_fully_trained_backbone_is_saved_whole(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method="fast_mtp", freeze_backbone=False)
    assert module.trains_backbone_weights
    torch.manual_seed(0)
    _perturb(module.parameters())
    out = module.save_pretrained(tmp_path / "art")
    assert (out / "model.safetensors").is_file() and (out / "mtp_method.safetensors").is_file()
    assert json.loads((out / "mtp_config.json").read_text())["weights"] == "full"
    shutil.rmtree(base)  # the artefact no longer needs its base
    loaded = MTPModule.from_pretrained(out)
    for (k, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_generate_takes_left_out_arguments_from_the_decoding_defaults(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method="fast_mtp")  # K = 3
    ids = module.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    assert len(module.generate(ids, max_new_tokens=6).stats.accepted) == 3
    module.decoding_defaults = {"decoding": "speculative", "num_draft_tokens": 1}
    assert len(module.generate(ids, max_new_tokens=6).stats.accepted) == 1
    assert len(module.generate(ids, max_new_tokens=6, num_draft_tokens=2).stats.accepted) == 2  # the caller wins
    module.decoding_defaults = {"decoding": "speculative", "num_draft_tokens": 3, "draft_confidence_threshold": 1.0}
    assert sum(module.generate(ids, max_new_tokens=6).stats.reached) == 0  # no position is that confident
    assert sum(module.generate(ids, max_new_tokens=6, draft_confidence_threshold=0.0).stats.reached) > 0
    module.decoding_defaults = {"decoding": "confadapt"}
    with pytest.raises(ValueError, match=r"unknown decoding 'confadapt'; this model offers \['speculative'\]"):
        module.generate(ids, max_new_tokens=6)
