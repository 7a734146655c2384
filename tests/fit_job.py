"""A small, fully seeded Lightning fit of an MTPModule, in this process or as a script of its own.

test_resume.py runs it in a subprocess to kill it with SIGKILL and resumes it in-process; test_ddp.py runs it
as a script under Lightning's ``ddp`` strategy (2 CPU processes, gloo), whose launcher starts the second
process by running this same script again. Everything here is offline and tiny (a 2-layer, hidden-32 Llama with
the tiny-math tokenizer, or the shipped tiny-math base for self-distillation).

    python tests/fit_job.py --base DIR --method '{"name": "fast_mtp"}' --out DIR --max-steps 20 [--ckpt-every 5]
        [--throttle 0.1] [--devices 2 --strategy ddp --data FILE.jsonl] [--save-state FILE.safetensors]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from lightning_mtp import MTPModule
from lightning_mtp.data.datamodule import SelfDistill, SFTDataModule, TinyMathDataModule

torch.set_num_threads(1)  # the same kernels in every process, for bitwise comparisons


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAt`: the process dies here, after its last checkpoint, as a SIGKILL would leave it."""


class CrashAt(L.Callback):
    """Raise :class:`SimulatedCrash` at the end of training step ``step`` (before any checkpoint of that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crashed at step {self.step}")


class Throttle(L.Callback):
    """Sleep after every step, so that a test can kill the process while it trains."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def tiny_math_data(self_distill: bool = False, cache_dir: str | None = None, num_train: int = 64) -> TinyMathDataModule:
    """``num_train`` problems in batches of 4 (64: 16 steps per epoch, so a 24-step fit crosses an epoch boundary)."""
    settings = SelfDistill(max_new_tokens=96, batch_size=64) if self_distill else None
    return TinyMathDataModule(num_train=num_train, num_val=8, batch_size=4, max_length=96, self_distill=settings,
                              cache_dir=cache_dir)


def fit(
    base: str,
    method: str | dict | None,
    out: str | Path,
    *,
    max_steps: int,
    data: L.LightningDataModule | None = None,
    ckpt_every: int | None = None,
    ckpt_path: str | None = None,
    callbacks: list[L.Callback] | None = None,
    learning_rate: float = 3e-3,
    seed: int = 0,
    **trainer_kwargs,
) -> MTPModule:
    """Seed, build an MTPModule and fit it for ``max_steps``; ``ckpt_every`` keeps ``last.ckpt`` in ``out/ckpt``."""
    L.seed_everything(seed, verbose=False)
    module = MTPModule(base, method=method, learning_rate=learning_rate)
    callbacks = list(callbacks or [])
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True, save_top_k=0,
                                         every_n_train_steps=ckpt_every))
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out), enable_checkpointing=bool(ckpt_every), callbacks=callbacks,
        val_check_interval=trainer_kwargs.pop("val_check_interval", 7), check_val_every_n_epoch=None,
        limit_val_batches=trainer_kwargs.pop("limit_val_batches", 1), num_sanity_val_steps=0, **trainer_kwargs,
    )
    trainer.fit(module, data if data is not None else tiny_math_data(), ckpt_path=ckpt_path, weights_only=True)
    return module


def trained_state(module: MTPModule) -> dict[str, torch.Tensor]:
    """What the checkpoint of ``module`` holds as weights (its trained state), detached and contiguous."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--method", action="append", required=True, help="JSON; repeat to fit several in turn")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--throttle", type=float, default=0.0)
    parser.add_argument("--self-distill-cache", default=None, help="train on self-distilled tiny-math data")
    parser.add_argument("--num-train", type=int, default=64, help="tiny-math problems")
    parser.add_argument("--data", default=None, help="a JSONL file of text records (SFTDataModule) instead")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--save-state", action="store_true", help="write OUT/<method>.safetensors on rank 0")
    args = parser.parse_args(argv)
    for spec in args.method:
        method = json.loads(spec)
        if args.data:
            data = SFTDataModule(train=args.data, val_size=0, fields="text", loss_on="all", max_length=64,
                                 batch_size=args.batch_size, seed=0, cache_dir=str(Path(args.out) / "hf-cache"))
        else:
            data = tiny_math_data(args.self_distill_cache is not None, args.self_distill_cache, args.num_train)
        callbacks = [Throttle(args.throttle)] if args.throttle else []
        module = fit(args.base, method, args.out, max_steps=args.max_steps, data=data, ckpt_every=args.ckpt_every,
                     callbacks=callbacks, devices=args.devices, strategy=args.strategy,
                     limit_val_batches=0 if args.data else 1)
        if args.save_state and module.trainer.is_global_zero:
            name = method["name"] if isinstance(method, dict) else str(method)
            save_file(trained_state(module), str(Path(args.out) / f"{name}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
