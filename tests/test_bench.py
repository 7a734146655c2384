"""``lightning-mtp bench``: every entry and field, peers, batched entries, outputs, and its bad input."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_math_shaped_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_mtp.bench import load_prompts
from lightning_mtp.bench import main as bench_main
from lightning_mtp.cli import main
from lightning_mtp.module import MTPModule

FIELDS = ("name", "kind", "batch_size", "tokens_per_forward", "acceptance_per_position", "cumulative_acceptance",
          "tokens_per_second", "speedup_vs_hf", "speedup_vs_ntp", "accuracy", "identical_to_ntp", "peak_memory_mb")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = save_tiny_math_shaped_model(root / "base")
    fastmtp = MTPModule(str(base), method="fast_mtp").save_pretrained(root / "fastmtp")
    two_steps = MTPModule(str(base), method={"name": "fast_mtp", "num_steps": 2}).save_pretrained(root / "fastmtp2")
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers = 1
    draft = AutoModelForCausalLM.from_config(config)
    draft.save_pretrained(root / "draft")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "draft")
    return {"base": base, "fastmtp": fastmtp, "fastmtp2": two_steps, "draft": root / "draft"}


def test_bench_runs_every_entry_with_every_field(models, tmp_path, capsys):
    out = tmp_path / "out"
    main(["bench", "--model", str(models["fastmtp"]), "--model", str(models["fastmtp2"]), "--n", "3",
                 "--max-new-tokens", "12", "--batch-size", "2", "--warmup", "1", "--peers", "--draft-model",
                 str(models["draft"]), "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
                 "--plots", str(out / "plots")])
    rows = json.loads((out / "bench.json").read_text())
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["hf_greedy", "hf_prompt_lookup", "hf_assisted", "ntp", "fast_mtp[0]",
                             "fast_mtp/k64@0.4[0]", "fast_mtp[1]", "fast_mtp/k64@0.4[1]", "hf_greedy@b2", "ntp@b2",
                             "fast_mtp[0]@b2", "fast_mtp/k64@0.4[0]@b2", "fast_mtp[1]@b2", "fast_mtp/k64@0.4[1]@b2"]
    for row in by_name.values():
        assert all(key in row for key in FIELDS), row["name"]
        assert row["identical_to_ntp"] == 1.0, row["name"]  # every entry here is lossless
        assert row["tokens_per_second"] > 0 and row["tokens_per_forward"] >= 1.0
        assert row["accuracy"] is not None  # tiny-math prompts carry answers
        assert row["peak_memory_mb"] is None or row["peak_memory_mb"] >= 0
    assert by_name["hf_greedy"]["speedup_vs_hf"] == 1.0 and by_name["ntp@b2"]["speedup_vs_ntp"] == 1.0
    assert by_name["hf_greedy"]["tokens_per_forward"] == 1.0  # counted from the backbone's forward calls
    # AR_j of the positions some step reached: at most K of them (3 and 2), at most 10 for up to 64 drafts within
    # the 12-token budget (the budget keeps one token of the prefill's and one of each step's)
    assert 1 <= len(by_name["fast_mtp[0]"]["acceptance_per_position"]) <= 3
    assert len(by_name["fast_mtp/k64@0.4[0]"]["acceptance_per_position"]) <= 10
    assert 1 <= len(by_name["fast_mtp[1]@b2"]["cumulative_acceptance"]) <= 2
    assert by_name["fast_mtp[0]"]["draft_ms_per_step"] > 0
    assert by_name["fast_mtp[1]@b2"]["model"] == str(models["fastmtp2"]) and by_name["ntp"]["model"] is None
    table = (out / "bench.md").read_text()
    assert table.count("\n") == 2 + len(rows) + 2 and "| fast_mtp[1]@b2 |" in table
    assert table.endswith(f"[i] is the i-th --model: [0] {models['fastmtp']}, [1] {models['fastmtp2']}\n")
    for png in ("speedup_vs_accuracy.png", "acceptance.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lightning-mtp bench" in capsys.readouterr().out


def test_bench_on_a_user_prompt_file(models, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "Question: Tom has 3 apples."}\n\n{"prompt": "Question: Ann has 2 pens."}\n')
    rows = bench_main(["--model", str(models["fastmtp"]), "--prompts", str(f), "--n", "5", "--max-new-tokens", "6",
                       "--batch-size", "1"])
    assert [r["name"] for r in rows] == ["hf_greedy", "ntp", "fast_mtp", "fast_mtp/k64@0.4"]  # no peers: not tiny-math
    assert all(r["accuracy"] is None and r["identical_to_ntp"] == 1.0 for r in rows)


def _exit_code(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "neither 'tiny-math' nor an existing JSONL file"),
        ("this is not json\n", "p.jsonl:1 is not valid JSON"),
        ('{"text": "hi"}\n', "p.jsonl:1 has no string 'prompt' field"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompt_files(models, tmp_path, capsys, content, message):
    f = tmp_path / "p.jsonl"
    if content is not None:
        f.write_text(content)
    code, err = _exit_code(["bench", "--model", str(models["fastmtp"]), "--prompts", str(f)], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--n", "0"), ("--repeats", "0"), ("--batch-size", "0")])
def test_bad_counts(models, capsys, flag, value):
    code, err = _exit_code(["bench", "--model", str(models["fastmtp"]), flag, value], capsys)
    assert code == 2 and f"{flag} must be >= 1, got {value}" in err


def test_unknown_method_in_an_artefact(models, tmp_path, capsys):
    art = tmp_path / "art"
    MTPModule(str(models["base"]), method="fast_mtp").save_pretrained(art)
    config = json.loads((art / "mtp_config.json").read_text())
    config["method"]["name"] = "fast_mpt"
    (art / "mtp_config.json").write_text(json.dumps(config))
    code, err = _exit_code(["bench", "--model", str(art), "--n", "1"], capsys)
    assert code == 2 and "unknown method 'fast_mpt'" in err and "fast_mtp" in err


def test_load_prompts_reads_answers_when_every_record_has_one(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "answer": 3}\n{"prompt": "b", "answer": 4}\n{"prompt": "c", "answer": 5}\n')
    assert load_prompts(str(f), 2) == (["a", "b"], [3, 4])
    prompts, answers = load_prompts("tiny-math", 4)
    assert len(prompts) == len(answers) == 4 and prompts[0].startswith("Question: ")
