"""``lightning-mtp bench``: every entry and field, peers, batched entries, outputs, and its bad input."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_math_shaped_model
from test_distill import TEMPLATE
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_mtp.bench import load_models, load_prompts, run_bench
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
        ('["a prompt"]\n', "p.jsonl:1 is a JSON list, not an object"),
        ('{"text": "hi"}\n', "p.jsonl:1 has no string 'prompt' field and no 'messages' field (a chat)"),
        ('{"messages": []}\n', "p.jsonl:1, field 'messages': expected a non-empty list of messages"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "has no user message to answer"),
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


# ---------------------------------------------------------------------------------------------- the base model
def test_a_mask_token_model_alone_runs_the_baselines_and_peers_on_its_untouched_base():
    """Its backbone has an extra <MTP> row and merged LoRA weights; HF assisted generation with the shipped draft
    model needs the base's vocabulary, and hf_greedy must be the base's own greedy decoding."""
    rows = bench_main(["--model", "tiny-math-mask-token", "--n", "2", "--max-new-tokens", "16", "--warmup", "0",
                       "--batch-size", "1"])
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["hf_greedy", "hf_prompt_lookup", "hf_assisted", "ntp", "mask_token/confadapt@0.9",
                             "mask_token/lossless"]
    for name in ("hf_prompt_lookup", "hf_assisted", "ntp", "mask_token/lossless"):  # lossless: each its reference
        assert by_name[name]["identical_to_ntp"] == 1.0, name


def test_models_of_one_base_share_it_and_a_changed_backbone_keeps_its_own():
    modules, base = load_models(["tiny-math-fastmtp", "tiny-math-mask-token"])
    fast, mask = modules
    assert fast.backbone is base.backbone and mask.backbone is not base.backbone
    assert (base.parts.vocab_size, mask.parts.vocab_size) == (617, 618)  # the <MTP> row is the mask-token model's
    prompts, answers = load_prompts("tiny-math", 2)
    rows = run_bench(modules, prompts, answers, base=base, max_new_tokens=16, repeats=1, warmup=0, batch_size=1,
                     progress=False, model_names=["tiny-math-fastmtp", "tiny-math-mask-token"])
    by_name = {r["name"]: r for r in rows}
    assert [n for n in by_name if n.startswith("hf_")] == ["hf_greedy", "hf_prompt_lookup", "hf_assisted"]
    assert by_name["fast_mtp"]["identical_to_ntp"] == by_name["mask_token/lossless"]["identical_to_ntp"] == 1.0
    assert by_name["mask_token/lossless"]["model"] == "tiny-math-mask-token"
    with pytest.raises(ValueError, match=r"no model here has the untouched base model as its backbone .*pass "
                                         r"base=MTPModule\(<base model>, method=None\)"):
        run_bench([mask], prompts, answers, max_new_tokens=4, warmup=0, batch_size=1, progress=False)


def test_models_of_different_bases_are_refused(models, tmp_path):
    other = save_tiny_math_shaped_model(tmp_path / "other-base", seed=1)
    art = MTPModule(str(other), method="fast_mtp").save_pretrained(tmp_path / "other-fastmtp")
    with pytest.raises(ValueError, match=r"the models have different base models \('.*/fastmtp' on '.*/base', "
                                         r"'.*/other-fastmtp' on '.*/other-base'\); .*bench each base in its own run"):
        bench_main(["--model", str(models["fastmtp"]), "--model", str(art), "--n", "1", "--max-new-tokens", "2",
                    "--batch-size", "1", "--warmup", "0"])


def test_a_draft_model_of_another_vocabulary_is_refused_naming_both_sizes(models, tmp_path):
    config = AutoConfig.from_pretrained(models["draft"])
    vocab = config.vocab_size
    config.vocab_size = vocab + 5
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "draft")
    with pytest.raises(ValueError, match=rf"--draft-model '.*/draft' has a vocabulary of {vocab + 5} tokens but the "
                                         rf"base model '.*/base' has {vocab}; .*--no-peers"):
        bench_main(["--model", str(models["fastmtp"]), "--n", "1", "--max-new-tokens", "2", "--batch-size", "1",
                    "--warmup", "0", "--peers", "--draft-model", str(tmp_path / "draft")])


# ---------------------------------------------------------------------------------------------- chat prompt files
CHATS = [
    {"messages": [{"role": "user", "content": "Tom has 3 apples."}]},
    {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Ann has 2 pens."},
                  {"role": "assistant", "content": "old answer"}], "answer": 2},  # answered after the user turn
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A fastmtp artefact whose base tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("chat")
    base = save_tiny_math_shaped_model(root / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    return MTPModule(str(base), method="fast_mtp").save_pretrained(root / "fastmtp"), tok


def test_a_prompt_file_of_chats_is_rendered_with_the_chat_template(chat_model, tmp_path):
    art, tok = chat_model
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    prompts, answers = load_prompts(str(f), 5, tok)
    assert prompts == ["User: Tom has 3 apples.<|endoftext|>Assistant:",
                       "System: Be brief<|endoftext|>User: Ann has 2 pens.<|endoftext|>Assistant:"]
    assert answers is None  # not every record has one
    rows = bench_main(["--model", str(art), "--prompts", str(f), "--max-new-tokens", "6", "--batch-size", "1"])
    assert [r["name"] for r in rows] == ["hf_greedy", "ntp", "fast_mtp", "fast_mtp/k64@0.4"]
    assert all(r["identical_to_ntp"] == 1.0 for r in rows)


@pytest.mark.parametrize(("flag", "added"), [
    ("--constant-schedule", ["fast_mtp/constant"]),  # a constant chain beside each default decoding
    ("--trees", ["fast_mtp/tree-dynamic-d3k4t16", "fast_mtp/tree-dynamic-d4k4t16", "fast_mtp/tree-static-14"]),
])
def test_a_flag_adds_entries_beside_each_default_decoding(flag, added, chat_model, tmp_path):
    art, _ = chat_model
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    rows = bench_main(["--model", str(art), "--prompts", str(f), "--max-new-tokens", "6", "--batch-size", "1", flag])
    assert [r["name"] for r in rows] == ["hf_greedy", "ntp", "fast_mtp", *added, "fast_mtp/k64@0.4"]
    assert all(r["identical_to_ntp"] == 1.0 for r in rows)


def test_chats_with_a_tokenizer_without_a_chat_template_are_one_clear_error(models, tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    with pytest.raises(ValueError, match=rf"{f} holds chats \('messages'\), which bench renders with the tokenizer's "
                                         r"chat template, but the tokenizer of '.*' has none: write the prompts "
                                         r"rendered as text in a 'prompt' field, or bench a model whose tokenizer has"):
        bench_main(["--model", str(models["fastmtp"]), "--prompts", str(f), "--batch-size", "1"])


def test_bench_over_several_domains_writes_a_table_each_a_summary_and_the_quality_fields(models, tmp_path, capsys):
    for name, text in (("alpha", "Question: Tom has 3 apples."), ("beta", "Question: Ann has 2 pens and 4 cups.")):
        (tmp_path / f"{name}.jsonl").write_text(f'{{"prompt": "{text}"}}\n{{"prompt": "{text} More?"}}\n')
    out = tmp_path / "out"
    rows = bench_main(["--model", str(models["fastmtp"]), "--prompts",
                       f"{tmp_path / 'alpha.jsonl'},{tmp_path / 'beta.jsonl'}", "--max-new-tokens", "8",
                       "--batch-size", "1", "--warmup", "0", "--json", str(out / "bench.json"),
                       "--markdown", str(out / "bench.md"), "--plots", str(out / "plots")])
    names = ["hf_greedy", "ntp", "fast_mtp", "fast_mtp/k64@0.4"]
    assert [(r["domain"], r["name"]) for r in rows] == [(d, n) for d in ("alpha", "beta") for n in names]
    assert json.loads((out / "bench.json").read_text()) == rows
    for row in rows:
        assert all(key in row for key in (*FIELDS, "token_agreement", "mean_logprob")), row["name"]
        hf = next(r for r in rows if r["domain"] == row["domain"] and r["name"] == "hf_greedy")
        # every entry here is lossless: the same tokens as greedy, so the base model scores them the same
        assert row["token_agreement"] == 1.0 and row["mean_logprob"] == pytest.approx(hf["mean_logprob"], abs=1e-5)
        assert row["mean_logprob"] < 0
    report = (out / "bench.md").read_text()
    assert report.index("## alpha") < report.index("## beta") < report.index("## summary")
    assert "| name | alpha tau | alpha x hf | beta tau | beta x hf | mean x hf |" in report
    assert report.count("| fast_mtp/k64@0.4 |") == 3  # its row in each domain's table and in the summary
    for png in ("alpha/acceptance.png", "beta/speedup_vs_accuracy.png", "acceptance_by_domain.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "lightning-mtp bench: alpha" in printed and "summary over domains" in printed


def test_token_agreement_counts_positions_of_the_reference():
    from lightning_mtp.bench import token_agreement

    assert token_agreement([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == 1.0
    assert token_agreement([[1, 9, 3], [4, 5]], [[1, 2, 3], [4]]) == 3 / 4  # a longer output costs nothing extra
    assert token_agreement([[1]], [[1, 2, 3, 4]]) == 1 / 4  # a shorter one misses the rest

