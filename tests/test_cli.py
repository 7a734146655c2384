"""The lightning-mtp command: generate, bench and fit entry points, and their one-line errors."""

from __future__ import annotations

import logging
import re
import shutil
import warnings

import pytest
from cli_helpers import run_cli
from helpers import REPO, save_tiny_math_shaped_model
from test_safe_loading import hostile_ckpt  # noqa: F401 (a fixture)

from lightning_mtp.cli import fit, main, quiet_expected_noise
from lightning_mtp.module import MTPModule


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_math_shaped_model(root / "base")
    return MTPModule(str(base), method="fast_mtp").save_pretrained(root / "fastmtp")


def _exit_code(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_unknown_command(capsys):
    code, _, err = _exit_code(["frobnicate"], capsys)
    assert code == 2 and "unknown command 'frobnicate'" in err


def test_generate_streams_text_and_prints_stats(artefact, capsys):
    main(["generate", "--model", str(artefact), "--prompt", "Question: Tom has 3 apples.", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert out.out.startswith("Question: Tom has 3 apples.")
    assert "8 new tokens" in out.err and "tokens/forward" in out.err


def test_fit_with_unknown_method_is_one_line(artefact, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = REPO / "recipes/tiny-math/fast_mtp.yaml"
    code, _, err = _exit_code(["fit", "--config", str(recipe), "--model.backbone", str(artefact.parent / "base"),
                               "--model.method", "nope"], capsys)
    assert code == 2
    assert "unknown method 'nope'" in err and "fast_mtp" in err and "Traceback" not in err


def test_missing_model_directory(capsys):
    code, _, err = _exit_code(["generate", "--model", "/nonexistent/model", "--prompt", "x"], capsys)
    assert code == 2 and "'/nonexistent/model' not found" in err


def test_generate_with_a_draft_confidence_threshold(artefact, capsys):
    main(["generate", "--model", str(artefact), "--prompt", "Question: Tom has 3 apples.", "--max-new-tokens", "8",
          "--num-draft-tokens", "16", "--draft-confidence-threshold", "0.5"])
    assert "8 new tokens" in capsys.readouterr().err
    code, _, err = _exit_code(["generate", "--model", str(artefact), "--prompt", "x", "--draft-confidence-threshold",
                               "2"], capsys)
    assert code == 2 and "draft_confidence_threshold must be within [0, 1], got 2.0" in err


def _resume_from_last(hostile: tuple, tmp_path) -> list[str]:
    """Arguments of ``fit --ckpt_path last`` where the last checkpoint is ``hostile``: Lightning finds and reads it,
    not LightningCLI's own parser (which reads a given path with weights_only=True already)."""
    path, _ = hostile
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    shutil.copy(path, ckpt_dir / "last.ckpt")
    checkpointing = tmp_path / "checkpointing.yaml"
    checkpointing.write_text(f"trainer:\n  enable_checkpointing: true\n  callbacks:\n"
                             f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                             f"      init_args:\n        dirpath: {ckpt_dir}\n        save_last: true\n")
    base = save_tiny_math_shaped_model(tmp_path / "base")
    return ["--config", str(REPO / "recipes/tiny-math/fast_mtp.yaml"), "--config", str(checkpointing),
            "--model.backbone", str(base), "--data.init_args.num_train", "8", "--data.init_args.self_distill", "null",
            "--trainer.max_steps", "1", "--ckpt_path", "last"]


def test_resuming_reads_checkpoints_weights_only_even_when_torch_is_told_to_unpickle(hostile_ckpt, tmp_path,  # noqa: F811
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # turns torch.load(weights_only=None) into unpickling
    code, err = run_cli(["fit", *_resume_from_last(hostile_ckpt, tmp_path)])
    assert not hostile_ckpt[1].exists(), "the checkpoint's pickled code ran"
    assert code == 2 and "Weights only load failed" in err and len(err.splitlines()) == 1


def test_weights_only_false_is_refused(hostile_ckpt, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--weights_only false would let a checkpoint run code while it is read; "
                                         r"lightning-mtp reads checkpoints with weights_only=True only"):
        fit([*_resume_from_last(hostile_ckpt, tmp_path), "--weights_only", "false"])
    assert not hostile_ckpt[1].exists()


def test_fit_in_a_log_prints_progress_lines_and_not_the_expected_noise(artefact, capfd, tmp_path, monkeypatch):
    """stdout is not a terminal here (as in CI or ``| tee log``): progress comes as lines; Lightning's tip and the
    warnings a fit of a frozen backbone always raises are gone."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(REPO / "recipes/tiny-math/fast_mtp.yaml"), "--model.backbone",
              str(artefact.parent / "base"), "--data.init_args.num_train", "64", "--data.init_args.self_distill", "null",
              "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"])
    out, err = capfd.readouterr()
    assert re.search(r"^step 1/3 \(epoch 0\), [\d.]+ steps/s, ~\d+s left; train/loss [\d.]+$", out, re.MULTILINE)
    assert re.search(r"^validation at step 3: .*val/loss [\d.]+", out, re.MULTILINE)
    assert re.search(r"^step 3/3, [\d.]+ steps/s, done in \d+s; train/loss [\d.]+$", out, re.MULTILINE)
    assert "Tip:" not in out + err
    noise = [str(w.message) for w in caught if re.search(r"eval mode|set_vital|LeafSpec", str(w.message))]
    assert not noise


def test_only_the_expected_noise_is_silenced():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_expected_noise():
                warnings.warn_explicit("'set_vital' is deprecated, please do not call", UserWarning,
                                       "stateful_dataloader.py", 1, module="torchdata.stateful_dataloader.stateful_dataloader")
                warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)  # not torchdata's
                logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
                logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
    assert [w.filename for w in caught] == [__file__]
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]


def test_bad_input_is_one_line_but_a_library_bug_shows_its_traceback(monkeypatch, capsys):
    """Only the library's own UserInputError (a ValueError) is bad input; any other ValueError is a bug."""
    from lightning_mtp import cli
    from lightning_mtp.errors import UserInputError

    def bad_input(argv):
        raise UserInputError("--answer must be 42, got 41")

    def bug(argv):
        raise ValueError("shapes (2, 3) and (4, 5) do not match")

    assert issubclass(UserInputError, ValueError)  # pytest.raises(ValueError, match=...) keeps catching it
    monkeypatch.setattr(cli, "generate", bad_input)
    code, _, err = _exit_code(["generate"], capsys)
    assert code == 2 and err.strip() == "lightning-mtp generate: error: --answer must be 42, got 41"
    monkeypatch.setattr(cli, "generate", bug)
    with pytest.raises(ValueError, match=r"shapes \(2, 3\)"):
        main(["generate"])
