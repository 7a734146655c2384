"""Lightning callbacks of lightning-mtp.

- :class:`ExportPretrained`: write the trained artefact (``save_pretrained``) when ``fit`` ends.
- :class:`NonFiniteGuard`: skip optimizer steps whose loss or gradients are NaN/inf, stop after too many in a row,
  and never let a checkpoint hold non-finite weights.
- :class:`ExactResume`: carry the random state through checkpoints so that a resumed fit continues exactly as
  the unbroken one would (``MTPModule`` adds it to every fit by itself).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mtp.errors import UserInputError

__all__ = ["ExactResume", "ExportPretrained", "NonFiniteGuard", "NonFiniteLossError"]


class ExportPretrained(L.Callback):
    """At the end of ``fit``, write the trained artefact with ``MTPModule.save_pretrained(dirpath)``.

    Args:
        dirpath: where the artefact goes (replaced atomically if it exists).
        dtype: store floating-point weights in this dtype (e.g. ``bfloat16`` to ship small files); loading
            computes in the dtype the model was trained in.
    """

    def __init__(self, dirpath: str, dtype: str | None = None) -> None:
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserInputError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'")
        self.dirpath = dirpath
        self.dtype = getattr(torch, dtype) if dtype else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.save_pretrained(self.dirpath, dtype=self.dtype)


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss (or the gradients) stayed NaN/inf for too many optimizer steps in a row."""


class NonFiniteGuard(L.Callback):
    """Skip the optimizer step whenever the loss or a gradient is NaN/inf; stop after ``max_consecutive`` in a row.

    A skipped step updates nothing: its gradients are dropped before the optimizer runs (AdamW leaves parameters
    without a gradient, and their moments, untouched), so weights and optimizer state keep their last finite
    values. The step still counts (``global_step`` and the learning-rate schedule move on). Each skip is logged
    (``train/skipped_steps``, the running total) and warned about with the step and the loss. After
    ``max_consecutive`` skips in a row training stops with :class:`NonFiniteLossError`; the checkpoints already
    written are all from finite states, and the guard refuses to write one whose trainable weights are not
    finite (which only mixed-precision overflow or ``check_gradients=False`` could let through).

    Under data parallelism (DDP, FSDP, DeepSpeed) the decision is taken over all processes (any rank's NaN skips
    the step everywhere), so the replicas never diverge. With fp16 mixed precision the gradient scaler already
    skips steps with inf gradients while it searches for a scale; the guard then looks at the loss only.

    Args:
        max_consecutive: skipped steps in a row after which training stops (>= 1).
        check_gradients: also skip steps whose loss is finite but whose gradients are not.
    """

    def __init__(self, max_consecutive: int = 3, check_gradients: bool = True) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise UserInputError(f"NonFiniteGuard max_consecutive must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.consecutive = 0  # skipped steps in a row, up to now
        self.skipped = 0  # skipped steps in this run, in total
        self._bad_loss: float | None = None  # the non-finite loss of the step being accumulated, if any

    # ------------------------------------------------------------------ state carried by checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.skipped = int(state_dict.get("skipped", 0))

    # ------------------------------------------------------------------ detection
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().sum())  # called once per micro-batch: keep the bad one

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = bad_loss is not None
        fp16 = str(trainer.precision).startswith("16")
        if not bad and self.check_gradients and grads and not fp16:
            bad = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # one sync for all
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # any rank's NaN skips the step on all
        if not bad:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # no gradient, no update: the optimizer skips these parameters
        self.consecutive += 1
        self.skipped += 1
        step = trainer.global_step
        what = f"loss {bad_loss}" if bad_loss is not None else "a non-finite gradient (the loss was finite)"
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"training stopped at step {step}: {self.consecutive} optimizer steps in a row had a NaN/inf loss or "
                f"gradient (the last: {what}); their updates were skipped, so the weights and checkpoints are those "
                "of the last finite step. Lower the learning rate, clip gradients (trainer.gradient_clip_val), "
                "train in bf16 rather than fp16, or look for a bad batch; raise NonFiniteGuard(max_consecutive=...) "
                "to tolerate longer runs of bad steps"
            )
        rank_zero_warn(f"step {step}: {what}; skipped this update ({self.consecutive} in a row, "
                       f"{self.max_consecutive} stop training)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for name, p in pl_module.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
                raise NonFiniteLossError(f"refusing to write a checkpoint at step {trainer.global_step}: the trained "
                                         f"parameter {name!r} holds NaN/inf values")


class ExactResume(L.Callback):
    """Carry the random state through checkpoints, so that a fit resumed from one continues exactly.

    Lightning checkpoints restore weights, optimizer, scheduler, loop counters and (with a stateful data loader:
    lightning-mtp's datamodules use torchdata's ``StatefulDataLoader``) the position inside the epoch, but not the
    global random generators, which methods draw from during training (mask_token draws k and its mask regions
    each step; dropout does too). This callback

    - stores the torch, CUDA, numpy and Python random states in every checkpoint (as plain tensors and numbers, so
      ``torch.load(weights_only=True)`` reads them), and sets them back at the first training batch after a resume,
      after everything that runs at start-up (model set-up, data loader creation, the sanity check) drew its own;
    - runs validation on a forked random state, so whether a validation ran between the last checkpoint and a crash
      changes nothing afterwards.

    Under data parallelism the state of rank 0 is saved and every rank gets it back; ranks started from the same
    seed (``seed_everything``) hold the same state anyway. :class:`~lightning_mtp.MTPModule` adds this callback to
    every fit (``configure_callbacks``); passing one to the Trainer too is harmless.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None  # loaded random state, set at the next training batch
        self._outside_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _collect_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _restore_rng(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outside_validation = _collect_rng()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            _restore_rng(self._outside_validation)
            self._outside_validation = None


def _collect_rng() -> dict[str, Any]:
    """The global random states, in types ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def _restore_rng(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
