"""The bad-input sweep: the rows of docs/troubleshooting.md that no other test pinned. Each bad input gets one clear
error naming the value; on the command line that is one line on stderr, no traceback, and a non-zero exit code."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import run_cli
from helpers import REPO, save_tiny_math_shaped_model

from lightning_mtp import MTPModule
from lightning_mtp.callbacks import ExportPretrained
from lightning_mtp.cli import main
from lightning_mtp.data.datamodule import SelfDistill, SFTDataModule, TinyMathDataModule

RECIPE = REPO / "recipes/tiny-math/fast_mtp.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(save_tiny_math_shaped_model(tmp_path_factory.mktemp("sweep") / "base"))


def fit_args(base: str, *extra: str) -> list[str]:
    """The tiny-math FastMTP recipe, shrunk to seconds on the tiny base (no self-distillation, no validation)."""
    return ["fit", "--config", str(RECIPE), "--model.backbone", base, "--data.init_args.num_train", "16",
            "--data.init_args.batch_size", "4", "--data.init_args.self_distill", "null", "--trainer.max_steps", "4",
            "--trainer.limit_val_batches", "0", *extra]


def one_line(code: int, err: str, expected_code: int, message: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err


# ---------------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config", "/nonexistent/recipe.yaml"], "File does not exist: '/nonexistent/recipe.yaml'"),
        (["--trainer.max_steps", "many"], 'Parser key "trainer.max_steps": Expected a <class \'int\'>. Got value: many'),
        (["--trainer.strategy", "fsdp"], "The strategy `fsdp` requires a GPU accelerator"),
        (["--ckpt_path", "/nonexistent/last.ckpt"], "Checkpoint file not found: /nonexistent/last.ckpt"),
        (["--model.method.num_steps", "0"], "fast_mtp num_steps (K) must be an integer >= 1, got 0"),
    ],
    ids=["missing-recipe", "bad-type", "gpu-strategy-on-cpu", "missing-checkpoint", "bad-method-value"],
)
def test_fit_errors_are_one_line(extra, message, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's logger and export paths are relative
    code, err = run_cli(fit_args(base, *extra))
    one_line(code, err, 2, message)


def test_unknown_recipe_key_is_one_line(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("  learning_rate:", "  learning_rat:"))
    code, err = run_cli(fit_args(base, "--config", str(bad)))
    one_line(code, err, 2, "learning_rat")


def test_diverging_fit_stops_with_exit_code_1_in_one_line(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's NonFiniteGuard stops after 3 non-finite steps in a row
    code, err = run_cli(fit_args(base, "--model.learning_rate", "1e30", "--trainer.max_steps", "8"))
    one_line(code, err, 1, "3 optimizer steps in a row had a NaN/inf loss or gradient")
    assert not (tmp_path / "zoo/tiny-math-fastmtp").exists()  # no artefact exported from the diverged run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate"], "the following arguments are required: --model, --prompt (see lightning-mtp generate --help)"),
        (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "many"], "invalid int value: 'many'"),
    ],
)
def test_generate_argument_errors_are_one_line(argv, message):
    code, err = run_cli(argv)
    one_line(code, err, 2, message)


@pytest.mark.parametrize("command", ["bench", "zoo", "push", "distill"])
def test_missing_arguments_of_every_other_command_are_one_line(command):
    code, err = run_cli([command])
    one_line(code, err, 2, "the following arguments are required")


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="'/nonexistent/model' not found"):
        main(["generate", "--model", "/nonexistent/model", "--prompt", "x", "--debug"])


# ---------------------------------------------------------------------------------------------- the Python API
def test_export_callback_with_an_unknown_dtype():
    with pytest.raises(ValueError, match=r"dtype 'float33' is not a torch dtype; use e.g. 'bfloat16'"):
        ExportPretrained("out", dtype="float33")


def test_unknown_config_override_is_named(base):
    with pytest.raises(ValueError, match=r"config_overrides: LlamaConfig has no field 'num_layerz'"):
        MTPModule(base, method="fast_mtp", config_overrides={"num_layerz": 2})


def test_unknown_generate_option_for_speculative_decoding(base):
    import torch

    module = MTPModule(base, method="fast_mtp")
    with pytest.raises(ValueError, match=r"unknown generate option\(s\) \['tau'\] for speculative decoding"):
        module.generate(torch.tensor([[5, 6]]), max_new_tokens=2, tau=0.9)


def test_nothing_to_train(base):
    module = MTPModule(base, method=None, freeze_backbone=True)
    with pytest.raises(ValueError, match="nothing to train: the backbone is frozen and the method has no parameters"):
        module.configure_optimizers()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: (p / "mtp_config.json").write_text("{not json"), r"mtp_config.json is not valid JSON"),
        (lambda p: (p / "mtp_config.json").write_text(json.dumps({"method": None})),
         r"lacks the 'base_model' field; is it a lightning-mtp artefact\?"),
        (lambda p: shutil.rmtree(p / "adapter"), r"was trained with LoRA but holds no adapter"),
    ],
    ids=["config-not-json", "config-without-base", "lora-without-adapter"],
)
def test_damaged_artefacts_are_named(change, message, base, tmp_path):
    module = MTPModule(base, method="fast_mtp", lora={"r": 2, "target_modules": ["q_proj"]})
    out = module.save_pretrained(tmp_path / "artefact")
    change(out)
    with pytest.raises(ValueError, match=message):
        MTPModule.from_pretrained(out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_train": 0}, "num_train must be >= 1, got 0"), ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
     ({"max_length": 4}, "max_length must be >= 8, got 4"), ({"num_val": -1}, "num_val must be >= 0, got -1")],
)
def test_tiny_math_datamodule_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyMathDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"truncation": "middle"}, r"unknown truncation 'middle'; choose one of"),
     ({"packing_mask": "2d"}, r"unknown packing_mask '2d'; choose one of"),
     ({"val_size": -1}, r"val_size must be >= 0"),
     ({"max_samples": 0}, r"max_samples must be >= 1 or None, got 0"),
     ({"batch_size": 0}, r"batch_size must be >= 1, got 0")],
)
def test_sft_datamodule_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTDataModule(train="data.jsonl", **kwargs)


def test_nan_learning_rate_is_refused():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        MTPModule(backbone="/nonexistent/dir", learning_rate=float("nan"))


def test_bad_self_distillation_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SelfDistill(temperature=-1.0)
