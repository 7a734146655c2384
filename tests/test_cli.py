"""The lightning-mtp command: generate, bench and fit entry points, and their one-line errors."""

from __future__ import annotations

import pytest
from helpers import REPO, save_tiny_math_shaped_model

from lightning_mtp.cli import main
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
