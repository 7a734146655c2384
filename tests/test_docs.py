"""Every code block in docs/ runs here, so the documentation cannot drift from the code.

Each page is one test: its blocks are checked in document order, its python blocks sharing one namespace, in a
scratch directory that mirrors the checkout's ``zoo/``, ``recipes/`` and ``benchmarks/`` (links to the files:
relative paths work, and nothing a block writes lands in the repository), with ``HOME`` and the Hugging Face
caches in the scratch directory and a loopback Hugging Face Hub (tests/hub_server.py) as ``HF_ENDPOINT``, so
pushing and loading back run for real, offline. What each kind of fenced block gets (docs/index.md tells
readers the same):

- ``python``: runs.
- ``bash``: runs in bash with ``lightning-mtp``, ``python`` and ``make`` replaced by recorders (loops, variables
  and line continuations expand as they would for a user; any other command fails), then every recorded command
  is checked: ``fit``/``validate`` parse through LightningCLI with ``--print_config``, and their method through
  the method registry (the recipe and every override type-checked; nothing trains); ``zoo`` and ``generate``
  run for real (shipped models, seconds); ``bench``, ``distill`` and ``push`` parse through their own parsers;
  ``python -c CODE`` compiles, ``python FILE`` names an existing file, ``python -m MODULE`` an importable
  module, ``make TARGET`` a target of the Makefile. Any argument that names a path in the checkout
  (``zoo/...``, ``recipes/...``, ...) must exist.
- ``yaml``: parses; a recipe (only top-level recipe keys) also parses through LightningCLI like ``fit``, and a zoo
  entry through ``ZooEntry``. A line ``--8<-- "PATH"`` includes a file of the checkout (pymdownx.snippets), as
  on the site.
- ``text``: output or file listings, not code: not run.

A block that cannot run here (a GPU launch, say) is preceded by ``<!-- not-tested: REASON -->``; the site shows
the reason above the block. Such opt-outs are counted and capped by ``MAX_OPT_OUTS``.

A failing block fails its page's test with ``docs/<page>.md:<line>`` and the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from helpers import REPO

DOCS = REPO / "docs"
MAX_OPT_OUTS = 3
LANGUAGES = {"python", "bash", "yaml", "text"}
LINKED = ("zoo", "recipes", "benchmarks")  # checkout directories a scratch directory mirrors
CHECKOUT_PATH = re.compile(r"^(?:\./)?(zoo|recipes|benchmarks|docs|lightning_mtp|tests)/[^\s'\"]*$")
OPT_OUT = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
SNIPPET = re.compile(r"""^\s*--8<--\s+["'](?P<path>[^"']+)["']\s*$""")
HUB_TOKEN = "hf_docsLoopbackToken0123456789"


class DocsError(AssertionError):
    """A block of the docs failed; the message starts with ``docs/<page>.md:<line>``."""


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    opt_out: str | None  # the reason of a <!-- not-tested: ... --> marker right before the block

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


def _rel(page: Path) -> str:
    try:
        return page.relative_to(REPO).as_posix()
    except ValueError:
        return str(page)


def parse_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented by their fence's indentation."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise DocsError(f"{_rel(page)}:{i + 1}: code block is never closed")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = OPT_OUT.match(lines[k]) if k >= 0 else None
        blocks.append(Block(page, i + 1, m["lang"].lower(), "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return blocks


def dangling_opt_outs(page: Path, text: str | None = None) -> list[int]:
    """Lines of opt-out markers that are not followed by a code block."""
    lines = (page.read_text() if text is None else text).splitlines()
    bad = []
    for n, line in enumerate(lines):
        if OPT_OUT.match(line):
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k == len(lines) or not FENCE.match(lines[k]):
                bad.append(n + 1)
    return bad


PAGES = sorted(DOCS.rglob("*.md"))
ALL_BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


def _ids(pages: list[Path]) -> list[str]:
    return [p.relative_to(DOCS).as_posix() for p in pages]


# ---------------------------------------------------------------------------------------------- scratch set-up
@pytest.fixture
def hub():
    from hub_server import HubServer

    with HubServer(token=HUB_TOKEN) as server:
        yield server


@pytest.fixture
def scratch(tmp_path, monkeypatch, hub):
    """A working directory like a checkout's, isolated: caches, HOME and the Hub are the test's own."""
    import datasets.config
    import huggingface_hub.constants

    from lightning_mtp import zoo_index
    from lightning_mtp.methods import METHODS

    work = tmp_path / "work"
    for name in LINKED:  # real directories of links to the files: a new or replaced file stays in the scratch
        for src in sorted((REPO / name).rglob("*")):
            if src.is_file():
                dst = work / src.relative_to(REPO)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(work)
    for key, value in {"HOME": home, "HF_HOME": home / "hf", "HF_HUB_CACHE": home / "hf-cache",
                       "HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(key, str(value))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LIGHTNING_MTP_ZOO"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the client read it at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(zoo_index, "_registered", {})  # the registrations live in the index
    methods = dict(METHODS)  # a page may register a method of its own (adding_a_method.md)
    yield work
    METHODS.clear()
    METHODS.update(methods)


# ---------------------------------------------------------------------------------------------- python
def run_python(block: Block, namespace: dict) -> str:
    """Run one python block in ``namespace``; a failure names the page and the line."""
    filename = str(block.page)
    code = "\n" * block.line + block.code  # line numbers in tracebacks are the page's own
    try:
        compiled = compile(code, filename, "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compiled, namespace)
    except Exception as err:
        line = block.line
        if isinstance(err, SyntaxError) and err.filename == filename and err.lineno:
            line = err.lineno
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == filename]
        if frames:
            line = frames[-1].lineno
        raise DocsError(f"{_rel(block.page)}:{line}: {type(err).__name__}: {err}") from err
    return "ran"


# ---------------------------------------------------------------------------------------------- bash
SHIMS = r"""
__docs_record() { printf '%s\0' "${BASH_LINENO[1]}" "$#" "$@" >> "$DOCS_RECORD"; }
lightning-mtp() { __docs_record lightning-mtp "$@"; }
python() { __docs_record python "$@"; }
python3() { __docs_record python "$@"; }
make() { __docs_record make "$@"; }
set -e
"""


@dataclass
class Command:
    block: Block
    line: int  # line in the page
    argv: list[str]

    @property
    def where(self) -> str:
        return f"{_rel(self.block.page)}:{self.line}"

    def __str__(self) -> str:
        return shlex.join(self.argv)


def record_commands(block: Block, work: Path) -> list[Command]:
    """Run a bash block with recorders in place of the commands; return what it would have run."""
    script = re.sub(r"(?<![\w/.])\.venv/bin/", "", block.code)
    (work / ".docs-block.sh").write_text(script)
    (work / ".docs-shims.sh").write_text(SHIMS)
    record = work / ".docs-record"
    record.write_bytes(b"")
    empty = work / ".docs-empty-path"
    empty.mkdir(exist_ok=True)
    run = subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", "source .docs-shims.sh; source .docs-block.sh"],
                         cwd=work, env={"PATH": str(empty), "DOCS_RECORD": str(record), "HOME": str(work)},
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise DocsError(f"{block.where}: the block failed in bash (exit {run.returncode}): {run.stderr.strip()}")
    fields = record.read_bytes().decode().split("\0")[:-1]
    commands, i = [], 0
    while i < len(fields):
        line, n = int(fields[i]), int(fields[i + 1])
        commands.append(Command(block, block.line + line, fields[i + 2 : i + 2 + n]))
        i += 2 + n
    return commands


class _Parsed(BaseException):
    """Raised right after a command's parser accepted its arguments: the command itself does not run."""


def _cli(argv: list[str], parse_only: bool = False) -> tuple[int, str, str]:
    """``lightning-mtp ARGV`` in this process: (exit code, stdout, stderr)."""
    from lightning_mtp import cli

    real = cli.CommandParser.parse_args

    def parse_args(self, args=None, namespace=None):
        parsed = real(self, args, namespace)
        if parse_only:
            raise _Parsed(parsed)
        return parsed

    out, err, code = io.StringIO(), io.StringIO(), 0
    with (mock.patch.object(cli.CommandParser, "parse_args", parse_args), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err), warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        try:
            cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except _Parsed:
            code = 0
    return code, out.getvalue(), err.getvalue()


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    return lines[-1] if lines else stderr.strip()[-2000:]


def check_command(cmd: Command) -> str:
    """Validate one recorded command (see the module docstring); return what was done, raise DocsError if bad."""
    argv = cmd.argv
    for arg in argv[1:]:
        for piece in [arg, *arg.split("=", 1)[1:]]:
            if CHECKOUT_PATH.match(piece) and not (REPO / piece.removeprefix("./")).exists():
                raise DocsError(f"{cmd.where}: `{cmd}` names {piece!r}, which is not in the checkout")
    tool = argv[0]
    if tool == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a] or ["install"]
        rules = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
        missing = [t for t in targets if t not in rules]
        if missing:
            raise DocsError(f"{cmd.where}: `{cmd}`: the Makefile has no target {missing}")
        return "make target exists"
    if tool == "python":
        args = argv[1:]
        if args[:1] == ["-c"]:
            try:
                compile(args[1], cmd.where, "exec")
            except SyntaxError as err:
                raise DocsError(f"{cmd.where}: `python -c` code does not compile: {err}") from err
            return "compiled"
        if args[:1] == ["-m"]:
            if importlib.util.find_spec(args[1]) is None:
                raise DocsError(f"{cmd.where}: `{cmd}`: no module {args[1]!r}")
            return "module exists"
        if not args or not (REPO / args[0]).is_file():
            raise DocsError(f"{cmd.where}: `{cmd}`: no script {args[:1]}")
        return "script exists"
    assert tool == "lightning-mtp", tool
    sub, rest = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if sub in ("fit", "validate"):
        if "--print_config" in rest:
            rest = [a for a in rest if a != "--print_config"]
        code, out, err = _cli([sub, *rest, "--print_config"])
        if code != 0:
            raise DocsError(f"{cmd.where}: `{cmd}` does not parse: {_error_line(err)}")
        from lightning_mtp.methods import resolve_method

        config = yaml.safe_load(out)
        try:
            resolve_method(config["model"]["method"])
        except ValueError as e:
            raise DocsError(f"{cmd.where}: `{cmd}`: {e}") from e
        return "parsed (--print_config)"
    if sub in ("zoo", "generate"):
        code, out, err = _cli([sub, *rest])
        if code != 0:
            raise DocsError(f"{cmd.where}: `{cmd}` failed: {_error_line(err)}")
        return "ran"
    if sub in ("bench", "distill", "push"):
        code, out, err = _cli([sub, *rest], parse_only=True)
        if code != 0:
            raise DocsError(f"{cmd.where}: `{cmd}` does not parse: {_error_line(err)}")
        return "parsed"
    raise DocsError(f"{cmd.where}: `{cmd}`: the docs tests do not know how to check `lightning-mtp {sub}`")


def run_bash(block: Block, work: Path) -> str:
    commands = record_commands(block, work)
    if not commands:
        raise DocsError(f"{block.where}: the bash block runs no command the docs tests can check")
    return "; ".join(f"{cmd.line}: {check_command(cmd)}" for cmd in commands)


# ---------------------------------------------------------------------------------------------- yaml
RECIPE_KEYS = {"seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler"}


def expand_snippets(block: Block) -> str:
    def include(line: str) -> str:
        m = SNIPPET.match(line)
        if not m:
            return line
        path = REPO / m["path"]
        if not path.is_file():
            raise DocsError(f"{block.where}: snippet {m['path']!r} is not in the checkout")
        return path.read_text().rstrip("\n")

    return "\n".join(include(line) for line in block.code.splitlines()) + "\n"


def check_yaml(block: Block, work: Path) -> str:
    text = expand_snippets(block)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DocsError(f"{block.where}: not valid YAML: {err}") from err
    if isinstance(data, dict) and data and set(data) <= RECIPE_KEYS:
        recipe = work / ".docs-recipe.yaml"
        recipe.write_text(text)
        return check_command(Command(block, block.line, ["lightning-mtp", "fit", "--config", str(recipe)]))
    if isinstance(data, dict) and {"name", "weights"} <= set(data):  # a zoo entry
        from lightning_mtp.zoo import ZooEntry

        try:
            ZooEntry.from_dict(data)
        except ValueError as err:
            raise DocsError(f"{block.where}: not a valid zoo entry: {err}") from err
        return "zoo entry"
    return "parsed"


# ---------------------------------------------------------------------------------------------- a page, in order
def run_page(blocks: list[Block], work: Path) -> list[str]:
    """Check a page's blocks in document order (its python blocks share one namespace); return what was done."""
    page = types.ModuleType("docs_page")  # a real module: dataclasses and pickling look classes up by module
    sys.modules[page.__name__] = page
    torch.manual_seed(0)
    done = []
    try:
        for block in blocks:
            if block.opt_out is not None or block.lang == "text":
                continue
            if block.lang == "python":
                what = run_python(block, page.__dict__)
            elif block.lang == "bash":
                what = run_bash(block, work)
            elif block.lang == "yaml":
                what = check_yaml(block, work)
            else:
                raise DocsError(f"{block.where}: code blocks of kind {block.lang!r} are not checked")
            done.append(f"{block.where} ({block.lang}): {what}")
    finally:
        del sys.modules[page.__name__]
    return done


CHECKED_PAGES = sorted({b.page for b in ALL_BLOCKS if b.opt_out is None and b.lang != "text"})


@pytest.mark.parametrize("page", CHECKED_PAGES, ids=_ids(CHECKED_PAGES))
def test_page_code_blocks(page, scratch):
    done = run_page(parse_blocks(page), scratch)
    print("\n".join(done))


# ---------------------------------------------------------------------------------------------- every block
def test_every_block_is_of_a_checked_kind_and_opt_outs_are_rare():
    assert ALL_BLOCKS, "no code blocks found under docs/"
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"code blocks of a kind the docs tests do not check: {unknown}; use {sorted(LANGUAGES)}"
    opt_outs = [b for b in ALL_BLOCKS if b.opt_out is not None]
    assert all(b.opt_out for b in opt_outs), "an opt-out needs a reason: <!-- not-tested: REASON -->"
    assert all(b.lang != "text" for b in opt_outs), "text blocks are not run anyway: drop the marker"
    listing = "\n".join(f"  {b.where}: {b.opt_out}" for b in opt_outs)
    print(f"\n{len(opt_outs)} docs code block(s) opted out of the docs tests:\n{listing}")
    assert len(opt_outs) <= MAX_OPT_OUTS, f"{len(opt_outs)} opt-outs (at most {MAX_OPT_OUTS}):\n{listing}"
    dangling = [f"{_rel(p)}:{n}" for p in PAGES for n in dangling_opt_outs(p)]
    assert not dangling, f"opt-out markers not followed by a code block: {dangling}"
    checked = {(b.page, b.lang) for b in ALL_BLOCKS if b.opt_out is None and b.lang != "text"}
    assert {lang for _, lang in checked} == {"python", "bash", "yaml"}


# ---------------------------------------------------------------------------------------------- the checks bite
BROKEN_PAGE = """# A page with mistakes

```python
x = 1
```

Some text.

```python
y = x + 1
raise RuntimeError("boom")
```
"""


def test_a_failing_python_block_names_the_page_and_line(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text(BROKEN_PAGE)
    blocks = parse_blocks(page)
    assert [b.line for b in blocks] == [3, 9]
    with pytest.raises(DocsError, match=r"broken\.md:11: RuntimeError: boom"):
        run_page(blocks, tmp_path)
    page.write_text("```python\nundefined_name\n```\n")
    with pytest.raises(DocsError, match=r"broken\.md:2: NameError"):
        run_page(parse_blocks(page), tmp_path)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("lightning-mtp fit --config recipes/tiny-math/fast_mtp.yaml --trainer.max_stepz 3", "max_stepz"),
        ("lightning-mtp fit --config recipes/tiny-math/fast_mtp.yaml --model.method.num_stepz 3", "num_stepz"),
        ("lightning-mtp validate --config recipes/tiny-math/no-such-recipe.yaml", "not in the checkout"),
        ("lightning-mtp bench --model tiny-math-fastmtp --nn 3", "unrecognized arguments: --nn"),
        ("lightning-mtp distill --model tiny-math-base --out x", "required: --data"),
        ("lightning-mtp push runs/x", "required: --repo-id"),
        ("lightning-mtp zoo info tiny-math-fastmpt", "did you mean"),
        ("lightning-mtp generate --model tiny-math-fastmtp --prompt hi --max-new-tokens 0", "max-new-tokens"),
        ("lightning-mtp frobnicate", "do not know"),
        ("make no-such-target", "no target"),
        ("python -c 'print(('", "does not compile"),
        ("python benchmarks/no_such_script.py", "not in the checkout"),
        ("for x in 1 2; do\n  vllm serve $x\ndone", "command not found"),
        ("echo nothing to check", "no command"),
    ],
)
def test_a_bad_bash_command_fails_and_names_the_line(command, message, tmp_path, scratch):
    page = tmp_path / "broken.md"
    page.write_text(f"# Bad\n\n```bash\n{command}\n```\n")
    with pytest.raises(DocsError, match=rf"broken\.md:\d+.*{re.escape(message)}"):
        run_page(parse_blocks(page), scratch)


def test_bash_blocks_expand_like_a_shell_and_lines_are_the_pages(tmp_path, scratch):
    page = tmp_path / "loops.md"
    page.write_text('# Loops\n\n```bash\nfor beta in 1.0 0.0; do\n  .venv/bin/lightning-mtp fit --config \\\n'
                    '    recipes/tiny-math/mtp_d.yaml --model.method.beta $beta  # a comment\ndone\n'
                    'make test\n```\n')
    commands = record_commands(parse_blocks(page)[0], scratch)
    assert [c.argv[-1] for c in commands[:2]] == ["1.0", "0.0"] and commands[2].argv == ["make", "test"]
    assert [c.line for c in commands] == [5, 5, 8]
    assert [check_command(c) for c in commands] == ["parsed (--print_config)"] * 2 + ["make target exists"]


def test_yaml_recipes_are_checked_and_opt_outs_are_seen(tmp_path, scratch):
    page = tmp_path / "y.md"
    page.write_text("```yaml\nmodel:\n  method: {name: fast_mtp, num_stepz: 2}\n```\n\n<!-- not-tested: needs a GPU -->\n"
                    "```bash\nvllm serve x\n```\n<!-- not-tested: nothing follows -->\n")
    yaml_block, gpu_block = parse_blocks(page)
    with pytest.raises(DocsError, match=r"y\.md:1.*num_stepz"):
        check_yaml(yaml_block, scratch)
    assert gpu_block.opt_out == "needs a GPU" and yaml_block.opt_out is None
    assert dangling_opt_outs(page) == [10]


def test_parse_only_does_not_run_the_command():
    # the model does not exist: running bench would fail, parsing its arguments does not
    code, _, err = _cli(["bench", "--model", "no-such-model", "--n", "50", "--json", "bench.json"], parse_only=True)
    assert code == 0, err
    code, _, err = _cli(["bench", "--model", "no-such-model", "--n", "50"])
    assert code == 2 and "no-such-model" in err
