"""Hub round trips with the real ``huggingface_hub`` client against the loopback Hub of ``hub_server.py``:
push in one commit with a model card, load back with identical output, offline rules, and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from pathlib import Path

import huggingface_hub
import lightning as L
import pytest
import torch
import yaml
from helpers import save_tiny_math_shaped_model
from hub_server import HubServer

from lightning_mtp import MTPModule, cli, hub, zoo, zoo_index
from lightning_mtp.data.datamodule import TinyMathDataModule

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_loopbackTestToken0123456789"
PROMPT = "Question: Ann has 4 pens. She buys 2 more pens. How many pens does Ann have now?\nAnswer:"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback Hub that wants ``TOKEN`` for writes; the client's cache and home live in ``tmp_path``."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # "the usual sources": nothing passes token= below
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the client read it at import
    monkeypatch.setattr(zoo_index, "_registered", {})  # the registrations live in the index
    with HubServer(token=TOKEN) as hub_server:
        yield hub_server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(module: MTPModule) -> torch.Tensor:
    return module.tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- push and load back


def test_push_a_trained_variant_and_load_it_back(server):
    reference = zoo.load("tiny-math-fastmtp")
    want = reference.generate(_ids(reference), max_new_tokens=32).sequences
    local = _snapshot(REPO / "zoo" / "tiny-math-fastmtp")

    entry = zoo.push("tiny-math-fastmtp", "me/tiny-math-fastmtp", endpoint=server.url)

    assert [p for m, p in server.requests if m == "POST" and "/commit/" in p] == ["/api/models/me/tiny-math-fastmtp/commit/main"]
    files = server.files("me/tiny-math-fastmtp")
    assert set(files) == {".gitattributes", "README.md", "mtp_config.json", "mtp_method.safetensors"}
    assert files["mtp_method.safetensors"] == (REPO / "zoo" / "tiny-math-fastmtp" / "mtp_method.safetensors").read_bytes()
    assert _snapshot(REPO / "zoo" / "tiny-math-fastmtp") == local  # pushing only reads
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "lightning-mtp" and "fast_mtp" in meta["tags"] and meta["license"] == "apache-2.0"
    assert "| tokens_per_forward | 3.83 |" in card  # the entry's metrics went into the card...
    assert 'MTPModule.from_pretrained("me/tiny-math-fastmtp")' in card  # ...with usage code for this repo
    assert json.loads(files["mtp_config.json"])["metrics"]["values"]["tokens_per_forward"] == 3.83
    assert entry.weights == {"format": "artifact", "repo_id": "me/tiny-math-fastmtp", "revision": server.repos[
        "me/tiny-math-fastmtp"].branches["main"]}
    assert entry.base_model == {"entry": "tiny-math-base"} and entry.name == "me--tiny-math-fastmtp"

    loaded = MTPModule.from_pretrained("me/tiny-math-fastmtp", endpoint=server.url)
    assert torch.equal(loaded.generate(_ids(loaded), max_new_tokens=32).sequences, want)
    zoo.register(entry)  # the returned entry is a zoo entry pinned to the new commit
    again = zoo.load(entry.name, endpoint=server.url)
    assert torch.equal(again.generate(_ids(again), max_new_tokens=32).sequences, want)


def test_module_push_to_hub_private_repo_round_trip(server, tmp_path):
    module = MTPModule("tiny-math-base", method={"name": "fast_mtp", "num_steps": 2})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.method.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    commit = module.push_to_hub("me/private-heads", private=True, endpoint=server.url)
    assert server.repos["me/private-heads"].private and commit.oid == server.repos["me/private-heads"].branches["main"]
    loaded = MTPModule.from_pretrained("me/private-heads", endpoint=server.url)  # reading needs the token too
    for k, v in module.method.state_dict().items():
        assert torch.equal(v, loaded.method.state_dict()[k]), k
    ids = _ids(module)
    assert torch.equal(loaded.generate(ids, max_new_tokens=16).sequences, module.generate(ids, max_new_tokens=16).sequences)
    # a second push of the same files changes nothing on the Hub
    module.push_to_hub("me/private-heads", endpoint=server.url)
    assert server.commit_count("me/private-heads") == 2  # the initial commit and ours


def test_token_is_sent_but_never_printed_logged_or_uploaded(server, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    zoo.push("tiny-math-fastmtp", "me/secret-check", endpoint=server.url)
    MTPModule.from_pretrained("me/secret-check", endpoint=server.url)
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err and TOKEN not in caplog.text
    assert all(TOKEN.encode() not in content for content in server.files("me/secret-check").values())
    cli.main(["push", str(REPO / "zoo" / "tiny-math-fastmtp"), "--repo-id", "me/secret-check", "--endpoint", server.url])
    out, err = capsys.readouterr()
    assert out.strip().startswith(f"{server.url}/me/secret-check/commit/") and TOKEN not in out + err


def test_push_without_a_valid_token_is_a_clear_error(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ValueError, match=r"push of .*tiny-math-fastmtp to 'me/x' .* failed while creating the repository"):
        zoo.push("tiny-math-fastmtp", "me/x", endpoint=server.url)


def test_push_a_lightning_checkpoint_from_the_cli(server, tmp_path, capsys):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method="fast_mtp", learning_rate=1e-2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, TinyMathDataModule(num_train=16, num_val=4, batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    # the checkpoint's base is a local path: refused unless the Hub id of that base is given
    with pytest.raises(SystemExit):
        cli.main(["push", str(ckpt), "--repo-id", "me/from-ckpt", "--endpoint", server.url])
    assert "pass base_model='namespace/name'" in capsys.readouterr().err
    cli.main(["push", str(ckpt), "--repo-id", "me/from-ckpt", "--endpoint", server.url, "--base-model", "me/base"])
    config = json.loads(server.files("me/from-ckpt")["mtp_config.json"])
    assert config["base_model"]["name_or_path"] == "me/base"
    loaded = MTPModule.from_pretrained("me/from-ckpt", endpoint=server.url, backbone=str(base))
    for k, v in module.method.state_dict().items():
        assert torch.equal(v, loaded.method.state_dict()[k]), k


# ---------------------------------------------------------------- failures


def test_push_failing_midway_leaves_local_files_intact(server, tmp_path):
    art = MTPModule("tiny-math-base", method="fast_mtp").save_pretrained(tmp_path / "art")
    before = _snapshot(tmp_path)
    server.fail_commits = 1
    with pytest.raises(ValueError, match=r"failed while committing 3 files: HfHubHTTPError: .*500.*local files are unchanged"):
        hub.push_to_hub(art, "me/midway", endpoint=server.url)
    assert _snapshot(tmp_path) == before
    assert server.commit_count("me/midway") == 1  # the repo exists, with nothing but its initial commit
    hub.push_to_hub(art, "me/midway", endpoint=server.url)  # the same push, again, lands whole
    assert {"mtp_config.json", "mtp_method.safetensors", "README.md"} <= set(server.files("me/midway"))


@pytest.mark.parametrize("repo_id", ["me/bad name", "me/a/b", "no-namespace", "me/trailing-", "me/x--y"])
def test_invalid_repo_ids_are_refused_before_any_request(server, repo_id):
    with pytest.raises(ValueError, match=rf"invalid Hub repo id '{repo_id}'"):
        hub.push_to_hub(REPO / "zoo" / "tiny-math-fastmtp", repo_id, endpoint=server.url)
    assert server.requests == []


def test_push_of_nothing(server, tmp_path):
    with pytest.raises(ValueError, match=r"nothing to push at '.*missing'"):
        hub.push_to_hub(tmp_path / "missing", "me/x", endpoint=server.url)


# ---------------------------------------------------------------- offline


def test_offline_uses_the_cache_then_says_what_is_missing(server, monkeypatch):
    zoo.push("tiny-math-fastmtp", "me/cached", endpoint=server.url)
    online = MTPModule.from_pretrained("me/cached", endpoint=server.url)
    want = online.generate(_ids(online), max_new_tokens=24).sequences
    url = server.url
    server.stop()  # from here on nothing answers at url
    start = time.perf_counter()
    down = MTPModule.from_pretrained("me/cached", endpoint=url)  # Hub unreachable: the cache serves
    assert time.perf_counter() - start < 15
    assert torch.equal(down.generate(_ids(down), max_new_tokens=24).sequences, want)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = MTPModule.from_pretrained("me/cached", endpoint=url)
    assert torch.equal(cached.generate(_ids(cached), max_new_tokens=24).sequences, want)
    with pytest.raises(ValueError, match=r"'me/other' \(revision 'main'\) is not in the local Hugging Face cache .*"
                                         r"HF_HUB_OFFLINE is set.*`hf download me/other`"):
        MTPModule.from_pretrained("me/other", endpoint=url)


def test_unreachable_endpoint_fails_fast_with_one_clear_error(server):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"'me/never' \(revision 'main'\) is not in the local Hugging Face cache .*"
                                         r"the Hub at http://127.0.0.1:\d+ cannot be reached \(ConnectError"):
        MTPModule.from_pretrained("me/never", endpoint=endpoint)
    assert time.perf_counter() - start < 5


def test_zoo_hub_entry_offline_without_cache(server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'jwkirchenbauer/Qwen3-4B-Inst-2507-MTP' \(revision 'main'\) is not in the "
                                         r"local Hugging Face cache.*`hf download jwkirchenbauer/Qwen3-4B-Inst-2507-MTP`"):
        zoo.weights_path("qwen3-4b-mtp")
    assert server.requests == []


def test_unknown_repo_and_revision(server):
    zoo.push("tiny-math-fastmtp", "me/exists", endpoint=server.url)
    with pytest.raises(ValueError, match=r"repository 'me/absent' not found on http://127.0.0.1"):
        hub.fetch("me/absent", endpoint=server.url)
    with pytest.raises(ValueError, match=r"revision 'v9' of 'me/exists' not found"):
        hub.fetch("me/exists", "v9", endpoint=server.url)


# ---------------------------------------------------------------- model card


def test_model_card_has_metrics_table_usage_and_bench_plot(server, tmp_path):
    module = MTPModule("tiny-math-base", method="fast_mtp")
    rows = [{"name": "hf_greedy", "tokens_per_forward": 1.0, "speedup_vs_hf": 1.0, "accuracy": 1.0},
            {"name": "fast_mtp", "tokens_per_forward": 3.5, "speedup_vs_hf": 2.0, "accuracy": 1.0}]
    art = module.save_pretrained(tmp_path / "art", metrics={"rows": rows, "command": "lightning-mtp bench --n 5"})
    (art / "bench.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    card = hub.model_card(art, repo_id="me/card")
    assert card.data.library_name == "lightning-mtp" and card.data.base_model is None  # a zoo name is no Hub id
    text = str(card)
    assert "| fast_mtp | 3.5 | 2 | 1 |" in text and "lightning-mtp bench --n 5" in text
    assert "![bench](bench.png)" in text and "num_draft_tokens=3" in text
    hub.push_to_hub(art, "me/card", endpoint=server.url)  # the test Hub validates the card's YAML
    assert "bench.png" in server.files("me/card")
    on_hub = hub.model_card({"base_model": {"name_or_path": "Qwen/Qwen3-4B", "model_type": "qwen2"},
                             "method": {"name": "fast_mtp", "num_steps": 3}}, repo_id="me/q")
    assert on_hub.data.base_model == "Qwen/Qwen3-4B" and "export_native" in str(on_hub)


# ---------------------------------------------------------------- a released full model (the seeds' format)


def _save_mask_token_lookalike(path: Path) -> tuple[torch.nn.Module, int]:
    """A tiny Qwen3 whose embedding matrix has padded rows beyond its tokenizer, one of which is the mask
    token (as in Qwen3-4B-Inst-2507-MTP, whose <MTP> is id 151669), saved as a plain Hugging Face model."""
    from helpers import TOKENIZER_DIR
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    vocab = len(tok) + 23  # padded rows
    config = AutoConfig.for_model(
        "qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, vocab - 3


@pytest.mark.parametrize("method", [None, "mask_token"])
def test_released_full_model_entry_loads_from_the_hub_then_offline(server, tmp_path, monkeypatch, method):

    model, mask_id = _save_mask_token_lookalike(tmp_path / "release")
    hub.push_to_hub(tmp_path / "release", "seed/Qwen3-tiny-MTP", endpoint=server.url)
    config = None if method is None else {"name": method, "mask_token_id": mask_id, "k_max": 4, "tau": 0.9}
    zoo.register({"name": "qwen3-tiny-mtp", "description": "lookalike of a released mask-token model",
                  "base_model": {"repo_id": "seed/Qwen3-tiny-MTP", "revision": "main"}, "method": config,
                  "weights": {"format": "full_model"}, "decoding": {"decoding": "speculative"},
                  "license": "apache-2.0", "source": {"notes": "test"}})
    module = zoo.load("qwen3-tiny-mtp", endpoint=server.url)
    assert module.backbone_ref == "seed/Qwen3-tiny-MTP"
    assert module.base_revision == server.repos["seed/Qwen3-tiny-MTP"].branches["main"]  # pinned to the commit
    if method is not None:
        assert module.method_config.mask_token_id == mask_id
    ids = torch.tensor([[5, 17, 40, 33, 21, 8]])
    with torch.no_grad():
        torch.testing.assert_close(module.backbone(ids).logits, model(ids).logits)
    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = zoo.load("qwen3-tiny-mtp")
    with torch.no_grad():
        torch.testing.assert_close(cached.backbone(ids).logits, model(ids).logits)
