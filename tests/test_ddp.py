"""Multi-process training: every registered method under Lightning's DDP (2 CPU processes, gloo) matches one process
with the same global batch; under FSDP (torch's, on CPU, wrapped as Lightning's FSDPStrategy wraps it) checkpoints
and optimizer state cover only what trains and the frozen backbone gets no gradient."""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from fit_job import fit, trained_state
from helpers import REPO, save_tiny_math_shaped_model
from safetensors.torch import load_file

from lightning_mtp import METHODS, MTPModule
from lightning_mtp.data.datamodule import SFTDataModule

STEPS, PER_PROCESS_BATCH = 4, 2

# Options that make each method's loss a plain mean over equally many tokens per process, so that DDP's mean of the
# two processes' gradients is the one-process gradient of the whole batch. mask_token: a fixed k, and every position
# an anchor (which positions are anchors is otherwise drawn per batch row, so it depends on how rows are split).
DDP_OPTIONS = {name: config.even_loss_options for name, config in METHODS.items()}  # each method says its own


def method_spec(name: str) -> dict:
    return {"name": name, **DDP_OPTIONS.get(name, {})}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[str, str, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    base = str(save_tiny_math_shaped_model(tmp / "base"))
    rng = random.Random(0)
    data = tmp / "digits.jsonl"  # 16 digits = 16 tokens each: every row, on every process, has the same length
    data.write_text("".join(json.dumps({"text": "".join(rng.choice("0123456789") for _ in range(16))}) + "\n"
                            for _ in range(48)))
    return base, str(data), tmp


def _sft(data: str, batch_size: int, cache: Path) -> SFTDataModule:
    return SFTDataModule(train=data, val_size=0, fields="text", loss_on="all", max_length=64, batch_size=batch_size,
                         seed=0, cache_dir=str(cache))


@pytest.fixture(scope="module")
def ddp_states(setup) -> dict[str, dict[str, torch.Tensor]]:
    """Every registered method trained under ``strategy="ddp"``, 2 CPU processes x batch 2, in one script run."""
    base, data, tmp = setup
    out = tmp / "ddp"
    cmd = [sys.executable, str(REPO / "tests/fit_job.py"), "--base", base, "--out", str(out), "--max-steps", str(STEPS),
           "--data", data, "--batch-size", str(PER_PROCESS_BATCH), "--devices", "2", "--strategy", "ddp",
           "--save-state"]
    for name in sorted(METHODS):
        cmd += ["--method", json.dumps(method_spec(name))]
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "MASTER_PORT": str(port)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "distributed_backend=gloo" in run.stderr and "All distributed processes registered" in run.stderr
    return {name: load_file(str(out / f"{name}.safetensors")) for name in sorted(METHODS)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(method, setup, ddp_states):
    base, data, tmp = setup
    spec = method_spec(method)
    single = trained_state(fit(base, spec, tmp / f"single-{method}", max_steps=STEPS, limit_val_batches=0,
                               data=_sft(data, 2 * PER_PROCESS_BATCH, tmp / "single-cache")))
    initial = trained_state(MTPModule(base, method=spec))
    ddp = ddp_states[method]
    assert ddp.keys() == single.keys()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    diff = max((single[k] - ddp[k]).abs().max().item() for k in single)
    # float32 sums in another order (and, for mask_token, student argmax ties) are all that may differ: measured
    # differences are 1e-7..3e-5 against moves of 1e-2..0.4
    assert moved > 1e-3 and diff <= 1e-2 * moved, (diff, moved)


# ---------------------------------------------------------------------------------------------- FSDP on CPU
@pytest.fixture
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["backbone-layers", "layer-class"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp_checkpoints_and_optimizer_hold_only_what_trains(method, wrap, setup, process_group, tmp_path):
    """Wrap as Lightning's FSDPStrategy does (auto-wrap and activation checkpointing per decoder layer,
    ``use_orig_params``), on CPU with one gloo process: full and sharded state dicts hold only the trained keys and
    load back strictly, the frozen backbone gets no gradient and no optimizer state, and a teacher stays outside.

    ``layer-class`` is the recipes' policy (every instance of the decoder-layer class, the heads' too);
    ``backbone-layers`` wraps only the backbone's own layers.
    """
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    base, data, _ = setup
    module = MTPModule(base, method=method)
    expected = set(module.state_dict())  # what a one-device checkpoint holds
    layer = type(module.parts.layers[0])
    if wrap == "layer-class":
        strategy = FSDPStrategy(auto_wrap_policy={layer}, activation_checkpointing_policy={layer})
    else:
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        own = {id(m) for m in module.parts.layers}
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in own)
        strategy = FSDPStrategy(auto_wrap_policy=policy, activation_checkpointing_policy={layer})
        strategy._activation_checkpointing_kwargs = {"check_fn": lambda m: id(m) in own}
    wrapped = FSDP(module, sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs)
    _setup_activation_checkpointing(wrapped, strategy._activation_checkpointing_kwargs)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.model = wrapped
    module.trainer = trainer
    module.on_fit_start()  # what Lightning calls between wrapping and restoring a checkpoint
    module.trainer = None  # no loop is running: the step below logs nowhere

    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)  # MTPModule.configure_optimizers gives it exactly these
    batch = {"input_ids": torch.randint(3, 600, (2, 24)), "labels": torch.randint(3, 600, (2, 24))}
    module.train()
    loss = _ForwardRedirection()(wrapped, module, "training_step", batch, 0)  # how Lightning runs the step
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in trainable)
    osd = FSDP.optim_state_dict(wrapped, optimizer)
    assert set(osd["state"]) <= expected and len(osd["state"]) == len(trainable)

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
        full = wrapped.state_dict()
        assert set(full) == expected
        assert not wrapped.load_state_dict(full, strict=True).missing_keys
    with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):  # Lightning's sharded save and load
        dcp.save({"model": wrapped.state_dict()}, checkpoint_id=tmp_path / "sharded")
        template = {"model": wrapped.state_dict()}
        assert set(template["model"]) == expected
        dcp.load(template, checkpoint_id=tmp_path / "sharded")
        wrapped.load_state_dict(template["model"], strict=True)
    teacher = getattr(module.method, "_teacher", None)
    if teacher is not None:  # mask_token's frozen copy: outside the FSDP tree, no gradient, not checkpointed
        assert not any(m is teacher for m in wrapped.modules())
        assert not any(p.requires_grad for p in teacher.parameters())
