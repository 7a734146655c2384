"""Self-distillation job: sharded and resumable, filtered, trainable, and through an OpenAI-compatible server."""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import REPO, save_tiny_math_shaped_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_mtp import MTPModule, cli
from lightning_mtp.backbone import load_backbone
from lightning_mtp.data import tiny_math
from lightning_mtp.data.datamodule import (
    SelfDistill,
    SFTDataModule,
    TinyMathDataModule,
    TinyWorldDataModule,
    find_shipped,
    ship_self_distill,
)
from lightning_mtp.data.distill import (
    cached_self_distill,
    distill,
    export_self_distill,
    read_self_distill_file,
    self_distill_fingerprint,
)
from lightning_mtp.data.files import load_source
from lightning_mtp.progress import PlainProgress

TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
PROMPTS = [f"Question: Ann has {i} pens and buys {i + 2} more. How many pens does she have?\nAnswer:" for i in range(10)]
SAMPLING = SelfDistill(temperature=0.6, top_k=20, top_p=0.95, max_new_tokens=6, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_math_shaped_model(tmp_path_factory.mktemp("distill") / "model")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def run(model, data, out, **kwargs):
    kwargs = {"settings": SAMPLING, "shard_size": 3, "keep_unfinished": True, "progress": False, **kwargs}
    return distill(str(model), data, out, **kwargs)


def files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*.jsonl"))}


def comparable(summary) -> dict:
    return {k: v for k, v in vars(summary).items() if k not in ("out", "seconds")}


class KillAtShard(L.Callback):
    """Simulates a killed job: raises when the predict loop reaches shard number ``at`` of this run."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.at:
            raise RuntimeError("killed")


def test_killed_job_resumes_to_the_same_data_as_an_unbroken_run(model_dir, prompts_file, tmp_path):
    full = run(model_dir, prompts_file, tmp_path / "full")
    assert full.complete and (full.num_shards, full.generated, full.kept) == (4, 10, 10)

    out = tmp_path / "part"
    first = run(model_dir, prompts_file, out, max_shards=1)  # stop after one shard
    assert not first.complete and (first.shards_done, first.num_shards) == (1, 4)
    assert not (out / "data.jsonl").exists()
    with pytest.raises(ValueError, match=r"distill job in '.*part' is not finished \(1/4 shards\); rerun"):
        load_source(str(out))
    with pytest.raises(RuntimeError, match="killed"):
        run(model_dir, prompts_file, out, callbacks=[KillAtShard(1)])  # writes one more shard, dies in the next
    assert sorted(p.name for p in (out / "shards").glob("shard-*")) == ["shard-000000.jsonl", "shard-000001.jsonl"]
    stale = out / "shards" / ".shard-000002.jsonl.tmp-dead"
    stale.write_text('{"id": 6, "prompt": "half a reco')  # what a kill during a write leaves behind

    resumed = run(model_dir, prompts_file, out)
    assert resumed.complete and comparable(resumed) == comparable(full)
    assert files(out) == files(tmp_path / "full")  # every shard and the training data, byte for byte
    assert not stale.exists()
    data = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in data] == PROMPTS
    assert sum(r["response_tokens"] for r in data) == resumed.response_tokens


def test_a_different_job_in_the_same_directory_is_refused(model_dir, prompts_file, tmp_path):
    run(model_dir, prompts_file, tmp_path / "job", max_shards=1)
    other = SelfDistill(**{**vars(SAMPLING), "seed": 1})
    with pytest.raises(ValueError, match=r"holds a different distill job \(differs in \['sampling'\]\).*overwrite"):
        run(model_dir, prompts_file, tmp_path / "job", settings=other)
    replaced = run(model_dir, prompts_file, tmp_path / "job", settings=other, overwrite=True)
    assert replaced.complete and json.loads((tmp_path / "job" / "manifest.json").read_text())["job"]["sampling"]["seed"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"other exists and is not a distill job directory"):
        run(model_dir, prompts_file, tmp_path / "other")


def test_filters_summary_and_training_on_the_output(tmp_path):
    """The shipped tiny-math base answers and stops: duplicates and length limits are filtered and counted."""
    problems = [p.prompt for p in tiny_math.problems("validation", 4)]
    base = REPO / "zoo" / "tiny-math-base"
    greedy = SelfDistill(temperature=0.0, max_new_tokens=160, batch_size=8)
    out = tmp_path / "job"
    summary = distill(str(base), problems * 2, out, settings=greedy, shard_size=4, progress=False)
    assert (summary.generated, summary.kept, summary.filtered) == (8, 4, {"duplicate": 4})
    data = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in data] == problems and all(r["finish_reason"] == "stop" for r in data)
    assert sum(r["response_tokens"] for r in data) == summary.response_tokens
    assert sum(r["prompt_tokens"] for r in data) == summary.prompt_tokens
    assert tiny_math.answer_accuracy([r["response"] for r in data], [p.answer for p in tiny_math.problems("validation", 4)]) >= 0.75
    assert json.loads((out / "summary.json").read_text())["kept"] == 4

    # the same finished job, filtered again without generating: a length cap drops the longest answers
    cap = sorted(r["response_tokens"] for r in data)[1]
    again = distill(str(base), problems * 2, out, settings=greedy, shard_size=4, progress=False, max_response_tokens=cap)
    assert again.filtered["too_long"] == 2 * sum(r["response_tokens"] > cap for r in data) and again.kept < 4

    dm = SFTDataModule(train=str(out), tokenizer=str(base), val_size=0, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert len(dm.train_set) == again.kept

    cut = SelfDistill(temperature=0.0, max_new_tokens=8, batch_size=8)
    with pytest.raises(ValueError, match=r"kept no record of 4 \(\{'unfinished': 4\}\); raise max_new_tokens"):
        distill(str(base), problems, tmp_path / "short", settings=cut, progress=False)


def test_tiny_math_self_distillation_is_generated_once_and_cached(tmp_path):
    model, tok = load_backbone("tiny-math-base")
    problems = tiny_math.problems("validation", 4)
    prompts = [p.prompt for p in problems] * 2
    greedy = SelfDistill(temperature=0.0, max_new_tokens=160, batch_size=3)
    kept_prompts, responses = cached_self_distill(model, tok, prompts, greedy, cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("*.jsonl")
    assert len(cache.read_text().splitlines()) == 8 and kept_prompts == prompts[:4]  # duplicates dropped
    assert tiny_math.answer_accuracy(responses, [p.answer for p in problems]) >= 0.75
    written = cache.stat().st_mtime_ns
    assert cached_self_distill(model, tok, prompts, greedy, cache_dir=str(tmp_path)) == (kept_prompts, responses)
    assert cache.stat().st_mtime_ns == written and len(list(tmp_path.glob("*.jsonl"))) == 1


def test_shipped_answers_are_the_cached_ones_and_spare_generating_them(tmp_path):
    model, tok = load_backbone("tiny-math-base")
    prompts = [p.prompt for p in tiny_math.problems("validation", 4)]
    greedy = SelfDistill(temperature=0.0, max_new_tokens=160, batch_size=4)
    cache = tmp_path / "cache"
    shipped = export_self_distill(model, tok, prompts, greedy, tmp_path / "answers.jsonl.gz", cache_dir=str(cache),
                                  about={"recipe": "test"})
    (cached,) = cache.glob("*.jsonl")
    header, *records = gzip.decompress(shipped.read_bytes()).decode().splitlines()
    header = json.loads(header)
    assert header["format"] == "lightning-mtp/self-distill" and header["recipe"] == "test" and header["records"] == 4
    assert cached.name == f"{header['fingerprint']}.jsonl" and records == cached.read_text().splitlines()
    again = export_self_distill(model, tok, prompts, greedy, tmp_path / "again.jsonl.gz", cache_dir=str(cache),
                                about={"recipe": "test"})
    assert again.read_bytes() == shipped.read_bytes()  # byte for byte: no timestamp in the gzip header

    fresh = tmp_path / "fresh"
    expected = cached_self_distill(model, tok, prompts, greedy, cache_dir=str(cache))
    assert cached_self_distill(model, tok, prompts, greedy, cache_dir=str(fresh), shipped=shipped) == expected
    assert not fresh.exists()  # nothing generated
    other = dataclasses.replace(greedy, max_new_tokens=150)  # other settings: generated and cached as usual
    cached_self_distill(model, tok, prompts, other, cache_dir=str(fresh), shipped=shipped)
    assert len(list(fresh.glob("*.jsonl"))) == 1
    assert read_self_distill_file(shipped, self_distill_fingerprint(model, prompts, other)) is None

    (tmp_path / "plain.jsonl").write_text(records[0] + "\n")
    with pytest.raises(ValueError, match=r"plain.jsonl is not a self-distillation file \(its first line is no "
                                         r"'lightning-mtp/self-distill' header\); write one with export_self_distill"):
        cached_self_distill(model, tok, prompts, greedy, cache_dir=str(cache), shipped=tmp_path / "plain.jsonl")
    with pytest.raises(ValueError, match=r"self-distillation file '.*missing.jsonl' does not exist"):
        cached_self_distill(model, tok, prompts, greedy, cache_dir=str(cache), shipped=tmp_path / "missing.jsonl")


def test_the_fast_mtp_recipe_trains_on_the_answers_shipped_with_its_base(tmp_path, monkeypatch):
    """The shipped file holds answers for exactly the recipe's backbone, prompts and sampling (their fingerprint),
    so a first ``make demo`` trains at once, on what it would have generated; found from any working directory."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "recipes/tiny-math/fast_mtp.yaml").read_text())
    init = config["data"]["init_args"]
    dm = TinyMathDataModule(**{**init, "self_distill": SelfDistill(**init["self_distill"])})
    path = dm.shipped_file()
    assert path == REPO / "zoo/tiny-math-base/self_distill.jsonl.gz" and path.stat().st_size < 2**20
    prompts = [p.prompt for p in tiny_math.problems("train", dm.num_train)]
    fingerprint = self_distill_fingerprint(MTPModule(**config["model"]).backbone, prompts, dm.self_distill)
    records = read_self_distill_file(path, fingerprint)
    assert records is not None and [r["prompt"] for r in records] == prompts


@pytest.mark.parametrize("recipe", ["fast_mtp", "mtp_d", "mtp_d_loop8", "medusa", "eagle3"])
def test_the_tiny_world_head_recipes_train_on_the_continuations_shipped_with_their_base(recipe, tmp_path, monkeypatch):
    """One file serves every tiny-world head recipe: the same backbone, passages and sampling (one fingerprint)."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / f"recipes/tiny-world/{recipe}.yaml").read_text())
    init = config["data"]["init_args"]
    dm = TinyWorldDataModule(**{**init, "self_distill": SelfDistill(**init["self_distill"])})
    path = find_shipped(dm.self_distill_file)
    assert path == REPO / "zoo/tiny-world-base/self_distill.jsonl.gz" and path.stat().st_size < 2 * 2**20
    module = MTPModule(**{**config["model"], "method": None})
    prompts = dm.distill_prompts(module.tokenizer)
    records = read_self_distill_file(path, self_distill_fingerprint(module.backbone, prompts, dm.self_distill))
    assert records is not None and [r["prompt"] for r in records] == prompts


def test_a_missing_shipped_file_and_a_recipe_without_one_are_named(tmp_path):
    dm = TinyMathDataModule(self_distill=SelfDistill(), self_distill_file="no/such/answers.jsonl.gz")
    with pytest.raises(ValueError, match=r"self_distill_file 'no/such/answers.jsonl.gz' does not exist \(looked in "
                                         r"the working directory and in .*\); regenerate it with python -m "
                                         r"lightning_mtp.data.datamodule RECIPE"):
        dm.shipped_file()
    with pytest.raises(ValueError, match=r"recipe '.*base.yaml' does not train a TinyMathDataModule or "
                                         r"TinyWorldDataModule with self_distill and a self_distill_file"):
        ship_self_distill(REPO / "recipes/tiny-math/base.yaml")


def test_progress_in_a_log_is_plain_lines_not_too_many(capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 100, 3))  # each advance 3 s after the last
    monkeypatch.setattr("lightning_mtp.progress.time.monotonic", lambda: next(clock))
    with PlainProgress(interval=10) as bar:
        task = bar.add_task("self-distilling", total=20, unit="prompts")
        for _ in range(10):
            bar.advance(task, 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "self-distilling: 0/20 prompts"
    assert lines[1] == "self-distilling: 8/20 prompts (40%), 0.667 prompts/s, ~18s left"  # 12 s in: a line
    assert lines[-1] == "self-distilling: 20/20 prompts (100%), 0.667 prompts/s, done in 30s"
    assert len(lines) == 4  # start, at most one line per 10 s (12 s, 24 s), end


def test_chat_prompts_are_answered_after_the_last_user_message(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = [[{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "old answer"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum 4 5"}]]
    greedy = SelfDistill(temperature=0.0, max_new_tokens=5, batch_size=1)
    run(model_dir, [{"messages": c} for c in chats], tmp_path / "job", settings=greedy, chat_template=TEMPLATE,
        system_prompt="Be brief")
    data = [json.loads(line) for line in (tmp_path / "job" / "data.jsonl").read_text().splitlines()]
    for chat, rec in zip(chats, data, strict=True):
        history = [{"role": "system", "content": "Be brief"}, *[m for m in chat if m["content"] != "old answer"]]
        assert rec["messages"][:-1] == history and rec["messages"][-1]["role"] == "assistant"
        text = tok.apply_chat_template(history, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = model.generate(ids, do_sample=False, max_new_tokens=5)[0, ids.shape[1]:]
        assert rec["messages"][-1]["content"] == tok.decode(new, skip_special_tokens=True)
        assert rec["prompt_tokens"] == ids.shape[1]
    with pytest.raises(ValueError, match=r"chat prompts\) needs a chat template, but tokenizer .* has none"):
        run(model_dir, [{"messages": c} for c in chats], tmp_path / "no-template", settings=greedy)


def test_cli_distill_and_its_errors(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["distill", "--model", str(model_dir), "--data", prompts_file, "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "4", "--shard-size", "5", "--keep-unfinished", "--no-progress"]
    cli.main(args)
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert len((out / "data.jsonl").read_text().splitlines()) == 10
    for extra, message in ((["--temperature", "-1"], "temperature must be >= 0"),
                           (["--seed", "3"], "holds a different distill job (differs in ['sampling'])"),
                           (["--prompt-field", "question", "--fields", "prompt_response"], "has no field 'question'")):
        with pytest.raises(SystemExit) as exc:
            cli.main(args + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- server
class TinyOpenAIServer:
    """A loopback OpenAI-compatible server (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) that
    answers with a tiny local model, seeded per request like vLLM; it records every request it served."""

    def __init__(self, model_dir: Path, name: str = "tiny") -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.name, self.lock, self.requests = name, threading.Lock(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path not in ("/v1/completions", "/v1/chat/completions") or body.get("model") != server.name:
                    self._send(404, {"error": f"no {self.path} for model {body.get('model')!r}"})
                    return
                self._send(200, server.answer(self.path.endswith("chat/completions"), body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, chat: bool, body: dict) -> dict:
        tok = self.tok
        text = (tok.apply_chat_template(body["messages"], chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
                if chat else body["prompt"])
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        sample = body["temperature"] > 0
        kwargs = dict(temperature=body["temperature"], top_k=body.get("top_k"), top_p=body["top_p"]) if sample else {}
        with self.lock, torch.no_grad():
            torch.manual_seed(body["seed"])
            new = self.model.generate(ids, do_sample=sample, max_new_tokens=body["max_tokens"], pad_token_id=tok.pad_token_id,
                                      **kwargs)[0, ids.shape[1]:].tolist()
        finished = tok.eos_token_id in new
        new = new[: new.index(tok.eos_token_id)] if finished else new
        content = tok.decode(new, skip_special_tokens=True)
        self.requests.append({"chat": chat, "body": body, "response": content})
        choice = {"index": 0, "finish_reason": "stop" if finished else "length"}
        choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
        return {"id": "x", "choices": [choice], "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)}}

    def __enter__(self) -> TinyOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_generation_through_an_openai_compatible_server(model_dir, prompts_file, tmp_path):
    with TinyOpenAIServer(model_dir) as server:
        kw = {"server": server.url, "concurrency": 4}
        full = run("tiny", prompts_file, tmp_path / "full", **kw)
        assert full.complete and full.generated == 10 and len(server.requests) == 10
        data = [json.loads(line) for line in (tmp_path / "full" / "data.jsonl").read_text().splitlines()]
        served = {r["body"]["prompt"]: r for r in server.requests}
        assert sorted(served) == sorted(PROMPTS) and not any(r["chat"] for r in server.requests)
        for rec in data:  # what the server answered is what the job wrote
            assert rec["response"] == served[rec["prompt"]]["response"]
        body = server.requests[0]["body"]
        assert (body["temperature"], body["top_k"], body["top_p"], body["max_tokens"]) == (0.6, 20, 0.95, 6)
        assert len({r["body"]["seed"] for r in server.requests}) == 10  # one seed per prompt

        part = run("tiny", prompts_file, tmp_path / "part", max_shards=2, **kw)  # resumes like local generation
        assert not part.complete
        assert comparable(run("tiny", prompts_file, tmp_path / "part", **kw)) == comparable(full)
        assert files(tmp_path / "part") == files(tmp_path / "full")

        chats = [{"messages": [{"role": "user", "content": "Sum 4 5"}, {"role": "assistant", "content": "old"}]}]
        run("tiny", chats, tmp_path / "chat", system_prompt="Be brief", **kw)
        assert server.requests[-1]["chat"]
        assert server.requests[-1]["body"]["messages"] == [{"role": "system", "content": "Be brief"},
                                                           {"role": "user", "content": "Sum 4 5"}]
        rec = json.loads((tmp_path / "chat" / "data.jsonl").read_text())
        assert rec["messages"][-1] == {"role": "assistant", "content": server.requests[-1]["response"]}

        with pytest.raises(ValueError, match=r"serves \['tiny'\], not 'big'; pass one of them as model"):
            run("big", prompts_file, tmp_path / "wrong", **kw)
    with pytest.raises(ValueError, match=r"no OpenAI-compatible server answers at http://127\.0\.0\.1"):
        run("tiny", prompts_file, tmp_path / "down", **kw)  # the server is gone
