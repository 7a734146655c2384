"""Real-data DataModule: sources, chat templates and response-only labels, truncation, packing, shuffling, errors."""

from __future__ import annotations

import json
import time

import datasets
import lightning as L
import pytest
import torch
from conftest import make_backbone
from helpers import TOKENIZER_DIR, save_tiny_math_shaped_model
from transformers import AutoTokenizer

from lightning_mtp.data.chat import RecordFormat, chat_segments
from lightning_mtp.data.datamodule import SFTDataModule
from lightning_mtp.data.files import load_source
from lightning_mtp.data.packing import PackedDataset, block_causal_mask, collate_packed, pack_best_fit
from lightning_mtp.module import MTPModule

# a chat template for the tiny-math tokenizer (which has none): role names as text, eos ends every turn
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
EOS = "<|endoftext|>"
PAIRS = [{"prompt": f"Question: {a} + {b}?\nAnswer:", "response": f" {a} + {b} = {a + b}.\n#### {a + b}"}
         for a, b in [(2, 3), (4, 4), (9, 3), (1, 1), (7, 5), (6, 2), (8, 8), (3, 9), (5, 5), (2, 7)]]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi 1"}, {"role": "assistant", "content": "Hello 2"},
                  {"role": "user", "content": "And 3?"}, {"role": "assistant", "content": "It is 3"}]},
    {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Sum 4 5"},
                  {"role": "assistant", "content": "9"}]},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def make_dm(tmp_path, train, **kwargs) -> SFTDataModule:
    kwargs = {"tokenizer": str(TOKENIZER_DIR), "val_size": 0, "cache_dir": str(tmp_path / "cache"), **kwargs}
    dm = SFTDataModule(train=train, **kwargs)
    dm.setup("fit")
    return dm


def examples(dm) -> list[dict[str, torch.Tensor]]:
    """The tokenised training records (before packing)."""
    ds = dm.train_set.base if dm.packing else dm.train_set
    return [ds[i] for i in range(len(ds))]


def trained_text(tok, ex) -> str:
    return tok.decode(ex["input_ids"][ex["labels"] != -100])


# ---------------------------------------------------------------------------------------------- labels
def test_prompt_response_pairs_train_only_the_response_and_eos(tmp_path, tok):
    dm = make_dm(tmp_path, write_jsonl(tmp_path / "d.jsonl", PAIRS))
    by_prompt = {tok.decode(e["input_ids"]): e for e in examples(dm)}
    for rec in PAIRS:
        ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"] + tok(rec["response"], add_special_tokens=False)["input_ids"]
        ex = by_prompt[rec["prompt"] + rec["response"] + EOS]
        assert ex["input_ids"].tolist() == ids + [tok.eos_token_id]
        n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
        assert (ex["labels"][:n_prompt] == -100).all()
        assert trained_text(tok, ex) == rec["response"] + EOS


def test_chat_template_rendering_and_assistant_only_labels(tmp_path, tok):
    dm = make_dm(tmp_path, write_jsonl(tmp_path / "c.jsonl", CHATS), chat_template=TEMPLATE)
    exs = examples(dm)
    assert len(exs) == 2
    for rec, ex in zip(CHATS, exs, strict=True):
        rendered = tok.apply_chat_template(rec["messages"], chat_template=TEMPLATE, tokenize=False)
        assert tok.decode(ex["input_ids"]) == rendered
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert trained_text(tok, ex) == "".join(f" {a}{EOS}" for a in answers)
        # the trained tokens are exactly the assistant turns' spans, as contiguous runs
        runs = torch.diff((ex["labels"] != -100).int()).eq(1).sum().item()
        assert runs == len(answers)

    last = make_dm(tmp_path, write_jsonl(tmp_path / "c.jsonl", CHATS), chat_template=TEMPLATE, loss_on="last_turn")
    assert trained_text(tok, examples(last)[0]) == f" It is 3{EOS}"
    every = make_dm(tmp_path, write_jsonl(tmp_path / "c.jsonl", CHATS), chat_template=TEMPLATE, loss_on="all")
    ex = examples(every)[0]
    assert torch.equal(ex["labels"], ex["input_ids"])


def test_sharegpt_fields_system_prompt_and_chat_template_for_pairs(tmp_path, tok):
    share = [{"conversations": [{"from": "human", "value": "Sum 4 5"}, {"from": "gpt", "value": "9"}]}]
    dm = make_dm(tmp_path, write_jsonl(tmp_path / "s.jsonl", share), messages_field="conversations",
                 chat_template=TEMPLATE, system_prompt="Be brief")
    ex = examples(dm)[0]
    assert tok.decode(ex["input_ids"]) == f"System: Be brief{EOS}User: Sum 4 5{EOS}Assistant: 9{EOS}"
    assert trained_text(tok, ex) == f" 9{EOS}"

    pairs = make_dm(tmp_path, write_jsonl(tmp_path / "p.jsonl", PAIRS[:1]), use_chat_template=True, chat_template=TEMPLATE)
    ex = examples(pairs)[0]
    assert tok.decode(ex["input_ids"]) == f"User: {PAIRS[0]['prompt']}{EOS}Assistant: {PAIRS[0]['response']}{EOS}"
    assert trained_text(tok, ex) == " " + PAIRS[0]["response"] + EOS  # the template's space after "Assistant:"


def test_template_that_rewrites_earlier_turns_needs_last_turn(tok):
    # like Qwen3's: earlier assistant turns lose their content once a later user turn follows
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}Assistant: ...{{ '<|endoftext|>' }}"
                 "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
    messages = CHATS[0]["messages"]
    with pytest.raises(ValueError, match=r"record 7: .*assistant message 1 .*loss_on='last_turn'"):
        chat_segments(tok, messages, rewriting, "response", "record 7")
    segments = chat_segments(tok, messages, rewriting, "last_turn", "record 7")
    assert [text for text, trained in segments if trained] == [f" It is 3{EOS}"]


def test_truncation_policies(tmp_path, tok):
    long = {"prompt": "Question: " + "1 + " * 30 + "1?\nAnswer:", "response": " 31.\n#### 31"}
    data = write_jsonl(tmp_path / "t.jsonl", [long, *PAIRS[:3]])
    n_long = len(tok(long["prompt"] + long["response"], add_special_tokens=False)["input_ids"]) + 1
    assert n_long > 40
    right = make_dm(tmp_path, data, max_length=40, truncation="right")  # the response is cut away: dropped
    assert right.stats["train"]["dropped: no response tokens"] == 1 and right.stats["train"]["records"] == 3
    left = make_dm(tmp_path, data, max_length=40, truncation="left")  # the prompt's start is cut: kept
    assert left.stats["train"]["truncated"] == 1 and left.stats["train"]["records"] == 4
    cut = max(examples(left), key=lambda e: len(e["input_ids"]))
    assert len(cut["input_ids"]) == 40 and trained_text(tok, cut) == long["response"] + EOS
    drop = make_dm(tmp_path, data, max_length=40, truncation="drop")
    assert drop.stats["train"]["dropped: too long"] == 1 and drop.stats["train"]["records"] == 3


# ---------------------------------------------------------------------------------------------- sources
def test_jsonl_parquet_text_glob_directory_and_saved_dataset_read_the_same_records(tmp_path):
    records = PAIRS[:4]
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", records[:2])
    write_jsonl(tmp_path / "dir" / "b.jsonl", records[2:])
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    cache = str(tmp_path / "cache")
    for source in ("dir", "dir/*.jsonl", "d.parquet", "saved"):
        ds = load_source(str(tmp_path / source), cache_dir=cache)
        assert [{"prompt": r["prompt"], "response": r["response"]} for r in ds] == records, source
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_source(str(tmp_path / "p.txt"), cache_dir=cache)["text"] == ["first prompt", "second prompt"]


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    a = make_dm(tmp_path, data, val_size=3, seed=1)
    b = make_dm(tmp_path, data, val_size=3, seed=1)
    c = make_dm(tmp_path, data, val_size=0.3, seed=2)
    ids = lambda ds: sorted(tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)))  # noqa: E731
    assert len(a.val_set) == 3 and len(a.train_set) == 7
    assert ids(a.val_set) == ids(b.val_set) and not set(ids(a.val_set)) & set(ids(a.train_set))
    assert len(c.val_set) == 3 and ids(c.val_set) != ids(a.val_set)
    assert len(list(a.val_dataloader())) == 1


def test_shuffle_order_is_a_function_of_seed_and_epoch(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)

    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = make_dm(tmp_path, data, batch_size=3, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls at the start of every epoch
        return [b["input_ids"][:, :12].tolist() for b in loader]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


# ---------------------------------------------------------------------------------------------- packing
def test_best_fit_packing_places_every_document_once_within_the_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (300,), generator=g).tolist()
    bins = pack_best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.2 * sum(lengths) / 64 + 1  # nearly full rows
    assert bins == pack_best_fit(lengths, 64)
    with pytest.raises(ValueError, match="document 1 has 9 tokens, more than max_length=8"):
        pack_best_fit([3, 9], 8)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_forward_equals_separate_forwards(arch, attn):
    model = make_backbone(arch)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 64, (n,), generator=g) for n in (5, 9, 3, 7, 6)]
    base = [{"input_ids": d, "labels": d} for d in docs]
    rows = PackedDataset(base, [[0, 1, 2], [3, 4]])
    batch = collate_packed([rows[0], rows[1]], pad_id=0)  # row 1 is right-padded to row 0's length
    assert batch["attention_mask"].shape == (2, 1, 17, 17)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits  # (2, 17, V)
        for row, members in enumerate(rows.bins):
            start = 0
            for i in members:
                alone = model(input_ids=docs[i][None]).logits[0]  # (n, V)
                torch.testing.assert_close(packed[row, start:start + len(docs[i])], alone, atol=1e-5, rtol=1e-5)
                start += len(docs[i])
    # labels: -100 at each document's first token and on padding, else the token
    expected = torch.cat([torch.cat([torch.tensor([-100]), docs[i][1:]]) for i in (0, 1, 2)])
    assert torch.equal(batch["labels"][0], expected)
    assert (batch["labels"][1, 13:] == -100).all()
    assert batch["position_ids"][0].tolist() == [*range(5), *range(9), *range(3)]


def test_block_mask_in_low_precision_has_no_infinities_and_no_empty_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mask = block_causal_mask(pos, dtype)[0, 0]
        assert mask.dtype == dtype and torch.isfinite(mask).all()
        allowed = mask == 0
        assert allowed.diagonal().all()
        assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]


def test_fast_mtp_loss_on_packed_batch_equals_unpacked(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method="fast_mtp").train()
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    plain = make_dm(tmp_path, data, batch_size=len(PAIRS), tokenizer=str(base))
    packed = make_dm(tmp_path, data, batch_size=len(PAIRS), tokenizer=str(base), packing=True, max_length=64)
    b_plain, b_packed = next(iter(plain.train_dataloader())), next(iter(packed.train_dataloader()))
    assert b_packed["input_ids"].shape[0] < len(PAIRS)  # documents share rows
    assert (b_plain["labels"] != -100).sum() == (b_packed["labels"] != -100).sum()  # same tokens trained
    torch.manual_seed(0)
    with torch.no_grad():
        loss_plain, logs_plain = module.method.training_loss(module.context, b_plain)
        loss_packed, logs_packed = module.method.training_loss(module.context, b_packed)
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=1e-5)
    for k in (1, 2, 3):
        torch.testing.assert_close(logs_packed[f"ce_{k}"], logs_plain[f"ce_{k}"], atol=1e-5, rtol=1e-5)
    # the same number of chain positions is scored, and the same ones are right
    assert logs_packed["draft_correct"].shape == logs_plain["draft_correct"].shape
    assert logs_packed["draft_correct"].sum() == logs_plain["draft_correct"].sum()


def test_trainer_fit_on_packed_chats_and_vocabulary_counts(tmp_path, tok):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "fast_mtp", "draft_vocab_size": 32}, learning_rate=1e-3)
    data = write_jsonl(tmp_path / "c.jsonl", CHATS * 4)
    dm = SFTDataModule(train=data, chat_template=TEMPLATE, packing=True, max_length=96, batch_size=2, val_size=2,
                       cache_dir=str(tmp_path / "cache"))  # the tokenizer comes from the model
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/tau_estimate" in trainer.callback_metrics
    counts = dm.token_counts(module.parts.vocab_size)
    manual = torch.zeros_like(counts)
    for ex in examples(dm):
        manual += torch.bincount(ex["labels"][ex["labels"] != -100], minlength=len(counts))
    assert torch.equal(counts, manual) and counts.sum() > 0
    in_draft = torch.zeros_like(counts, dtype=torch.bool)
    in_draft[module.method.draft_ids] = True  # the 32 most frequent targets (prepare ran at fit start)
    assert counts[in_draft].min() >= counts[~in_draft].max()


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"train data file '.*nope\.jsonl' does not exist"):
        make_dm(tmp_path, str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"no file matches train data pattern"):
        make_dm(tmp_path, str(tmp_path / "*.parquet"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*d\.csv.*data_format"):
        make_dm(tmp_path, str(tmp_path / "d.csv"))
    with pytest.raises(ValueError, match=r"unknown data_format 'xml'; choose one of"):
        SFTDataModule(train="x.jsonl", data_format="xml")
    with pytest.raises(ValueError, match=r"unknown loss_on 'prompt'; choose one of"):
        SFTDataModule(train="x.jsonl", loss_on="prompt")


def test_record_without_the_configured_field_is_named(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {"prompt": "Question: 1?"}, PAIRS[1]])
    with pytest.raises(ValueError, match=r"d\.jsonl line 2 has no 'response' \(a string\), got None"):
        make_dm(tmp_path, data)
    with pytest.raises(ValueError, match=r"d\.jsonl' has no field 'answer' \(its fields: \['prompt', 'response'\]\); set response_field"):
        make_dm(tmp_path, data, response_field="answer", fields="prompt_response")
    with pytest.raises(ValueError, match=r"no known field among its fields \['question'\]"):
        make_dm(tmp_path, write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}]))
    bad_chat = write_jsonl(tmp_path / "b.jsonl", [CHATS[0], {"messages": [{"speaker": "user", "text": "hi"}]}])
    with pytest.raises(ValueError, match=r"b\.jsonl line 2, field 'messages': message 0 needs a string 'role' and 'content'"):
        make_dm(tmp_path, bad_chat, chat_template=TEMPLATE)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"train data file '.*e\.jsonl' is empty: no records"):
        make_dm(tmp_path, str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError, match=r"no record left to train on"):  # every record longer than max_length
        make_dm(tmp_path, write_jsonl(tmp_path / "d.jsonl", PAIRS), max_length=4, truncation="drop")


def test_chat_data_without_a_chat_template_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", CHATS)
    with pytest.raises(ValueError, match=r"c\.jsonl' \(chat field 'messages'\) needs a chat template, but tokenizer .* has none"):
        make_dm(tmp_path, data)
    with pytest.raises(ValueError, match=r"use_chat_template needs a chat template"):
        make_dm(tmp_path, write_jsonl(tmp_path / "p.jsonl", PAIRS), use_chat_template=True)
    (tmp_path / "t.jinja").write_text(TEMPLATE)  # a template file works
    assert len(make_dm(tmp_path, data, chat_template=str(tmp_path / "t.jinja")).train_set) == 2


def test_uncached_hub_dataset_offline_is_a_quick_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"dataset 'nobody-here/no-such-dataset' \(split 'train'\) is not in the local "
                                         r"datasets cache .* offline mode is on.*load_dataset"):
        load_source("nobody-here/no-such-dataset", cache_dir=str(tmp_path), what="train data")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_reads_the_cache_at_once_instead_of_retrying(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"dataset 'nobody-here/no-such-dataset' .* the Hub cannot be reached"):
        load_source("nobody-here/no-such-dataset", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5  # datasets alone retries for ~20 s


def test_format_resolution_prefers_messages_then_pairs_then_text():
    fmt = RecordFormat()
    assert fmt.resolve(["messages", "prompt"], "d").fields == "messages"
    assert fmt.resolve(["prompt", "response", "text"], "d").fields == "prompt_response"
    assert fmt.resolve(["prompt", "text"], "d").fields == "text"
    assert fmt.resolve(["prompt"], "d", prompts_only=True).fields == "prompt_response"
