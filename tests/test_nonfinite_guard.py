"""NonFiniteGuard: NaN/inf losses and gradients skip the update (logged), too many in a row stop training with a
clear message, and no checkpoint is written from non-finite weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from fit_job import tiny_math_data
from helpers import save_tiny_math_shaped_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtp import MTPModule
from lightning_mtp.callbacks import NonFiniteGuard, NonFiniteLossError


class Poisoned(MTPModule):
    """An MTPModule whose loss is NaN (or whose first trained gradient is inf) at chosen optimizer steps."""

    def __init__(self, *args, nan_at=(), inf_grad_at=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at, self.inf_grad_at = set(nan_at), set(inf_grad_at)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_at else loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_at:
            next(p for p in self.parameters() if p.requires_grad).grad.fill_(float("inf"))


class Snapshots(L.Callback):
    """The trained weights after every optimizer step, by ``global_step``."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(save_tiny_math_shaped_model(tmp_path_factory.mktemp("guard") / "base"))


def _fit(module, tmp_path, guard, max_steps=8, checkpoint=False):
    snapshots = Snapshots()
    callbacks = [guard, snapshots]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoint, limit_val_batches=0,
                        callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, tiny_math_data())
    return trainer, snapshots


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_losses_are_skipped_and_logged_and_training_goes_on(base, tmp_path):
    guard = NonFiniteGuard(max_consecutive=3)
    module = Poisoned(base, method="fast_mtp", learning_rate=1e-2, nan_at={3, 4})
    with pytest.warns(UserWarning, match=r"step 3: loss nan; skipped this update \(1 in a row, 3 stop training\)"):
        trainer, snap = _fit(module, tmp_path, guard)
    assert trainer.global_step == 8 and guard.skipped == 2 and guard.consecutive == 0
    assert _equal(snap.after[5], snap.after[3])  # steps 3 and 4 (global_step 3 -> 5) changed nothing
    assert not _equal(snap.after[6], snap.after[5])  # step 5 trained again
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    adam = trainer.optimizers[0].state
    assert all(int(s["step"]) == 8 - 2 for s in adam.values())  # the optimizer never saw the skipped steps
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2.0


def test_non_finite_gradient_with_a_finite_loss_is_skipped_too(base, tmp_path):
    guard = NonFiniteGuard(max_consecutive=2)
    module = Poisoned(base, method="fast_mtp", learning_rate=1e-2, inf_grad_at={2})
    with pytest.warns(UserWarning, match="step 2: a non-finite gradient"):
        trainer, snap = _fit(module, tmp_path, guard, max_steps=4)
    assert guard.skipped == 1 and _equal(snap.after[3], snap.after[2])


def test_too_many_in_a_row_stop_training_and_checkpoints_stay_finite(base, tmp_path):
    guard = NonFiniteGuard(max_consecutive=3)
    module = Poisoned(base, method="fast_mtp", learning_rate=1e-2, nan_at={4, 5, 6, 7})
    snapshots = Snapshots()
    with pytest.raises(NonFiniteLossError, match=r"training stopped at step 6: 3 optimizer steps in a row had a "
                                                 r"NaN/inf loss or gradient \(the last: loss nan\)"):
        trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[guard, snapshots, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                                         save_top_k=0, every_n_train_steps=1)])
        with pytest.warns(UserWarning):
            trainer.fit(module, tiny_math_data())
    last = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # the stopping step wrote nothing
    assert _equal(last["state_dict"], snapshots.after[4])  # the weights of the last finite step
    assert last["callbacks"]["NonFiniteGuard"] == {"consecutive": 2, "skipped": 2}


def test_guard_refuses_to_checkpoint_non_finite_weights(base, tmp_path):
    module = MTPModule(base, method="fast_mtp")
    trainer, _ = _fit(module, tmp_path, NonFiniteGuard(), max_steps=1)
    with torch.no_grad():
        next(p for p in module.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"refusing to write a checkpoint at step 1: the trained parameter "
                                                 r"'method\.block\.enorm\.weight' holds NaN/inf values"):
        trainer.save_checkpoint(tmp_path / "poisoned.ckpt")
    assert not (tmp_path / "poisoned.ckpt").exists()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_guard_option(value):
    with pytest.raises(ValueError, match=f"max_consecutive must be an integer >= 1, got {value!r}"):
        NonFiniteGuard(max_consecutive=value)
