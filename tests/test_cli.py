"""The lightning-mtp command: generate, bench and fit entry points, and their one-line errors."""

from __future__ import annotations

import json

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


def test_bench_writes_every_field(artefact, tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["bench", "--model", str(artefact), "--n", "2", "--max-new-tokens", "12", "--json", str(path)])
    rows = {r["name"]: r for r in json.loads(path.read_text())}
    assert list(rows) == ["hf_greedy", "ntp", "fast_mtp"]
    for row in rows.values():
        for key in ("tokens_per_forward", "tokens_per_second", "speedup_vs_hf", "speedup_vs_ntp", "accuracy", "identical_to_ntp"):
            assert key in row, (row["name"], key)
        assert row["identical_to_ntp"] == 1.0
        assert row["tokens_per_second"] > 0
    fm = rows["fast_mtp"]
    assert len(fm["acceptance_per_position"]) == 3 and fm["tokens_per_forward"] >= 1.0
    assert fm["draft_ms_per_step"] > 0 and fm["verify_ms_per_step"] > 0
    assert rows["hf_greedy"]["speedup_vs_hf"] == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts", "/nonexistent/prompts.jsonl"], "neither 'tiny-math' nor an existing JSONL file"),
        (["--n", "0"], "--n must be >= 1, got 0"),
    ],
)
def test_bench_bad_input_is_one_line(artefact, capsys, argv, message):
    code, _, err = _exit_code(["bench", "--model", str(artefact), *argv], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_prompt_file_without_prompt_field(artefact, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "hi"}\n')
    code, _, err = _exit_code(["bench", "--model", str(artefact), "--prompts", str(f)], capsys)
    assert code == 2 and "p.jsonl:1 has no string 'prompt' field" in err


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
