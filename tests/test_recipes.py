"""Every recipe in recipes/ parses and instantiates through LightningCLI, with the backbone swapped for a tiny one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO, save_tiny_math_shaped_model
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_mtp.module import MTPModule

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


class CPUTrainer(Trainer):
    """A Trainer that builds a recipe's GPU-only strategy (FSDP, DeepSpeed) as given, keeps it as
    ``gpu_strategy``, and runs on this CPU machine with the default strategy instead."""

    def __init__(self, *args, strategy="auto", accelerator="auto", devices="auto", **kwargs):
        gpu_strategy = None
        if not isinstance(strategy, str) and type(strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy"):
            gpu_strategy, strategy, accelerator, devices = strategy, "auto", "cpu", 1
        super().__init__(*args, strategy=strategy, accelerator=accelerator, devices=devices, **kwargs)
        self.gpu_strategy = gpu_strategy


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_math_shaped_model(tmp_path_factory.mktemp("tiny") / "model")


def test_there_are_recipes():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"tiny-math/base.yaml", "tiny-math/fast_mtp.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_parses_and_instantiates(recipe, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers and exports resolve relative paths here, never in the repo
    monkeypatch.setattr(sys, "argv", ["lightning-mtp"])
    args = ["--config", str(recipe), "--model.backbone", str(tiny_dir)]
    if "init_from:" in recipe.read_text():  # heads trained on the real base do not fit the tiny one
        args += ["--model.method.init_from", "null"]
    if "draft_vocab_size: 2048" in recipe.read_text():  # a quarter of the tiny-world vocabulary, larger than the tiny one
        args += ["--model.method.draft_vocab_size", "null"]
    cli = LightningCLI(MTPModule, run=False, args=args, trainer_class=CPUTrainer)
    assert isinstance(cli.model, MTPModule)
    assert cli.datamodule is not None
    assert cli.trainer.max_steps > 0
    if "FSDPStrategy" in recipe.read_text():  # built from the recipe, then swapped for this CPU machine
        assert type(cli.trainer.gpu_strategy).__name__ == "FSDPStrategy"
        assert cli.trainer.gpu_strategy.kwargs["use_orig_params"]  # frozen backbone next to trained heads


def test_unknown_recipe_key_is_an_error(tiny_dir, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes/tiny-math/fast_mtp.yaml").read_text().replace("  learning_rate:", "  learning_rat:"))
    monkeypatch.setattr(sys, "argv", ["lightning-mtp"])
    with pytest.raises(SystemExit) as exc:
        LightningCLI(MTPModule, run=False, args=["--config", str(bad), "--model.backbone", str(tiny_dir)])
    assert exc.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def test_method_fields_can_be_overridden_on_the_command_line(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-mtp"])
    recipe = REPO / "recipes/tiny-math/fast_mtp.yaml"
    args = ["--config", str(recipe), "--model.backbone", str(tiny_dir), "--model.method.num_steps", "4",
            "--model.method.draft_vocab_size", "100", "--trainer.max_steps", "7"]
    cli = LightningCLI(MTPModule, run=False, args=args)
    assert cli.model.method_config.num_steps == 4  # an int, not the string "4"
    assert cli.model.method_config.draft_vocab_size == 100
    assert cli.model.num_draft_tokens == 4 and cli.trainer.max_steps == 7
