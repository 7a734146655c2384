"""Exact resume and what Lightning checkpoints hold.

A fit killed with SIGKILL (or crashing) mid-epoch and resumed from its last checkpoint ends with the same weights,
bit for bit, as the unbroken fit; self-distilled data is not generated again; checkpoints hold only what trains
plus optimizer/scheduler state, and refuse to load into a module of another base model or method.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from fit_job import CrashAt, SimulatedCrash, fit, tiny_math_data, trained_state
from helpers import REPO, save_tiny_math_shaped_model

from lightning_mtp import METHODS, MTPModule
from lightning_mtp.checkpoint import IDENTITY_KEY, check_identity, checkpoint_tensors_bytes, run_identity

# 16 steps per epoch; checkpoints every 5 steps; the crash at step 23 loses 3 steps after the checkpoint at step 20
# (in the middle of epoch 1), a validation (every 7 steps) ran at step 21 in between, and the resumed fit crosses
# into epoch 2 at step 32
MAX_STEPS, EVERY, CRASH = 36, 5, 23


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(save_tiny_math_shaped_model(tmp_path_factory.mktemp("resume") / "base"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_crash_mid_epoch_then_resume_equals_the_unbroken_run(method, base, tmp_path):
    unbroken = trained_state(fit(base, method, tmp_path / "unbroken", max_steps=MAX_STEPS))
    with pytest.raises(SimulatedCrash):
        fit(base, method, tmp_path / "run", max_steps=MAX_STEPS, ckpt_every=EVERY, callbacks=[CrashAt(CRASH)])
    last = torch.load(tmp_path / "run/ckpt/last.ckpt", weights_only=True)
    assert last["global_step"] == 20 and last["epoch"] == 1
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_num_yielded"] == 4  # mid-epoch
    resumed = fit(base, method, tmp_path / "run", max_steps=MAX_STEPS, ckpt_every=EVERY, ckpt_path="last")
    assert resumed.trainer.global_step == MAX_STEPS
    assert_same_weights(trained_state(resumed), unbroken)


def test_killed_fit_resumes_without_regenerating_self_distilled_data(tmp_path):
    """SIGKILL a real ``fit`` process on self-distilled tiny-math data once a checkpoint exists; resume it here."""
    cache, out = tmp_path / "distill-cache", tmp_path / "run"
    steps, every, data = 12, 3, dict(self_distill=True, cache_dir=str(cache), num_train=32)  # 8 steps per epoch
    cmd = [sys.executable, str(REPO / "tests/fit_job.py"), "--base", "tiny-math-base", "--method", '"fast_mtp"',
           "--out", str(out), "--max-steps", str(steps), "--ckpt-every", str(every), "--throttle", "0.3",
           "--self-distill-cache", str(cache), "--num-train", "32"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "ckpt/last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the fit ended before it was killed:\n{err[-3000:]}"
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert every <= killed_at < steps
    generated = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(generated) == 1  # one finished cache file (written atomically), no temporary left behind

    resumed = fit("tiny-math-base", "fast_mtp", out, max_steps=steps, data=tiny_math_data(**data), ckpt_every=every,
                  ckpt_path="last")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == generated  # reused, not generated again
    unbroken = fit("tiny-math-base", "fast_mtp", tmp_path / "unbroken", max_steps=steps, data=tiny_math_data(**data))
    assert_same_weights(trained_state(resumed), trained_state(unbroken))


# ---------------------------------------------------------------------------------------------- what checkpoints hold
def _checkpoint(module: MTPModule, tmp_path: Path) -> dict:
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, tiny_math_data())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    return torch.load(tmp_path / "x.ckpt", weights_only=True)


SETUPS = {
    **{name: dict(method=name) for name in sorted(METHODS)},  # each method as it trains by default
    "fast_mtp+lora": dict(method="fast_mtp", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "mtp_d+full": dict(method="mtp_d", freeze_backbone=False),
    "ntp": dict(method=None),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_checkpoint_holds_only_what_trains_and_its_optimizer_state(setup, base, tmp_path):
    module = MTPModule(base, learning_rate=1e-3, **SETUPS[setup])
    ckpt = _checkpoint(module, tmp_path)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    method = {f"method.{k}" for k in module.method.state_dict()} if module.method is not None else set()
    whole = {f"backbone.{k}" for k in module.backbone.state_dict()} if module.trains_backbone_weights else set()
    assert set(ckpt["state_dict"]) == trainable | method | whole
    if not module.trains_backbone_weights:  # a frozen backbone is read again from its reference, never stored
        frozen = [k for k in ckpt["state_dict"] if k.startswith("backbone.") and "lora_" not in k]
        assert not frozen
    # one copy of each trained weight (a teacher copy would double the backbone), AdamW moments for exactly them
    stored = checkpoint_tensors_bytes(ckpt["state_dict"])
    expected = sum(v.numel() * v.element_size() for k, v in module.state_dict().items())
    assert stored == expected
    assert len(ckpt["optimizer_states"][0]["state"]) == len(trainable)
    assert ckpt["lr_schedulers"] and ckpt[IDENTITY_KEY]["method"] == (module.method_config and module.method_config.to_dict())


def test_checkpoint_size_of_a_frozen_backbone_run_is_the_head_and_its_moments(base, tmp_path):
    module = MTPModule(base, method="fast_mtp")
    ckpt = _checkpoint(module, tmp_path)
    head = sum(p.numel() * 4 for p in module.method.parameters())
    backbone = sum(p.numel() * 4 for p in module.backbone.parameters())
    weights, moments = checkpoint_tensors_bytes(ckpt["state_dict"]), checkpoint_tensors_bytes(ckpt["optimizer_states"])
    assert weights == head and head <= moments <= 2 * head + 1024  # exp_avg + exp_avg_sq (+ step counters)
    assert (tmp_path / "x.ckpt").stat().st_size < 3 * head + backbone // 4  # no copy of the backbone


# ---------------------------------------------------------------------------------------------- refusing a mismatch
@pytest.fixture(scope="module")
def fast_mtp_ckpt(base, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    _checkpoint(MTPModule(base, method="fast_mtp"), tmp)
    return tmp / "x.ckpt"


def _resume(module: MTPModule, ckpt: Path, tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, tiny_math_data(), ckpt_path=ckpt, weights_only=True)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda base, other: MTPModule(base, method="mtp_d"), r"method: checkpoint 'fast_mtp', this module 'mtp_d'"),
        (lambda base, other: MTPModule(base, method={"name": "fast_mtp", "num_steps": 4}),
         r"method option num_steps: checkpoint 3, this module 4"),
        (lambda base, other: MTPModule(other, method="fast_mtp"), r"base name_or_path: checkpoint '.*base'"),
        (lambda base, other: MTPModule(base, method="fast_mtp", lora={"r": 4, "target_modules": ["q_proj"]}),
         r"lora: checkpoint None"),
        (lambda base, other: MTPModule(base, method="fast_mtp", from_scratch=True,
                                                config_overrides={"hidden_size": 48}),
         r"base hidden_size: checkpoint 32, this module 48"),
    ],
    ids=["other-method", "other-method-option", "other-base", "lora-added", "other-hidden-size"],
)
def test_checkpoint_of_another_base_or_method_is_refused(build, message, base, fast_mtp_ckpt, tmp_path):
    other = str(save_tiny_math_shaped_model(tmp_path / "other-base", seed=1))  # same shapes, other weights
    module = build(base, other)
    with pytest.raises(ValueError, match=r"the checkpoint belongs to another run: .*" + message):
        _resume(module, fast_mtp_ckpt, tmp_path)


class _Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_of_a_plain_lightning_module_is_refused(base, tmp_path):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Plain())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="was not written by a lightning-mtp MTPModule"):
        _resume(MTPModule(base, method="fast_mtp"), tmp_path / "plain.ckpt", tmp_path)


def test_checkpoint_missing_a_trained_weight_is_named(base, fast_mtp_ckpt):
    module = MTPModule(base, method="fast_mtp")
    ckpt = torch.load(fast_mtp_ckpt, weights_only=True)
    del ckpt["state_dict"]["method.block.proj.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 trained weight\(s\) of this module: method.block.proj.weight"):
        module.on_load_checkpoint(ckpt)


def test_load_from_checkpoint_rebuilds_the_frozen_backbone_from_its_reference(base, fast_mtp_ckpt):
    loaded = MTPModule.load_from_checkpoint(fast_mtp_ckpt, map_location="cpu", weights_only=True)
    fresh = MTPModule(base, method="fast_mtp")
    ckpt = torch.load(fast_mtp_ckpt, weights_only=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ckpt["state_dict"].items())
    assert all(torch.equal(a, b) for a, b in zip(loaded.backbone.parameters(), fresh.backbone.parameters(), strict=True))


def test_checkpoint_identity_names_the_weights_as_the_artefact_does_and_reads_the_legacy_adapter_kind(base, tmp_path):
    module = MTPModule(base, lora={"r": 4, "target_modules": ["q_proj"]})  # LoRA without a method
    identity = run_identity(module)
    saved = json.loads((module.save_pretrained(tmp_path / "art") / "mtp_config.json").read_text())
    assert identity["weights"] == saved["weights"] == "method+adapter"
    check_identity(module, {IDENTITY_KEY: {**identity, "weights": "adapter"}})  # written before the two agreed
    with pytest.raises(ValueError, match=r"trained weights: checkpoint 'full', this module 'method\+adapter'"):
        check_identity(module, {IDENTITY_KEY: {**identity, "weights": "full"}})
