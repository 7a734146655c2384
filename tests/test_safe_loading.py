"""Safe loading everywhere: an audit of the package source that fails when an unsafe load appears, and checkpoints
carrying code that are refused without running it."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from helpers import REPO, save_tiny_math_shaped_model

PACKAGE = REPO / "lightning_mtp"

# importlib with a computed name, where the name never comes from user input: cli.py imports the command modules
# named in its own COMMANDS table, hub.py the HTTP stack of huggingface_hub ("httpx2" / "httpx")
IMPORTLIB_ALLOWED = {"cli.py", "hub.py"}
UNSAFE_MODULES = {"dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("yaml", "load"),
                ("yaml", "unsafe_load"), ("yaml", "full_load"), ("os", "system"), ("os", "popen")}


def audit(source: str, filename: str) -> list[str]:
    """What in ``source`` breaks the safe-loading rules (see the test below), as 'file:line: why' strings."""
    problems = []

    def bad(node: ast.AST, why: str) -> None:
        problems.append(f"{filename}:{node.lineno}: {why}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    bad(node, f"imports {name}, which deserialises arbitrary objects")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for arg, default in zip(args, defaults, strict=True):
                if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                    bad(node, f"{node.name}(trust_remote_code=...) must default to False")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in {"eval", "exec", "compile", "__import__"}:
            bad(node, f"calls {name}(): configs and inputs are never executed")
        if (owner, name) in UNSAFE_CALLS:
            bad(node, f"calls {owner}.{name}()")
        if owner == "torch" and name == "load":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                bad(node, "torch.load without weights_only=True")
        if name == "import_module" and filename not in IMPORTLIB_ALLOWED:
            bad(node, "importlib.import_module outside the allowed files: names from configs are not imported")
        value = keywords.get("trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            bad(node, "passes trust_remote_code=True: only the user may ask for remote code")
        if isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is True:
            bad(node, "loads with allow_pickle=True")
        if isinstance(keywords.get("shell"), ast.Constant) and keywords["shell"].value is True:
            bad(node, "runs a shell command")
    return problems


def test_package_source_loads_only_safely():
    """torch.load only with weights_only=True; no pickle/dill/marshal loads, no eval/exec, no yaml.load;
    trust_remote_code never forced on and False by default; importlib only where the names are constants.
    Weights otherwise come from safetensors (artefacts, zoo, Hub downloads: see lightning_mtp.hub.fetch)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += audit(path.read_text(), path.name)
    assert not problems, "\n".join(problems)


def test_the_audit_catches_each_unsafe_pattern():
    source = """
import dill
import pickle, yaml, torch, importlib, numpy as np, os, subprocess
def load(path, trust_remote_code=True):
    torch.load(path)
    torch.load(path, weights_only=False)
    pickle.loads(b"")
    yaml.load("a: 1")
    eval("1 + 1")
    exec("x = 1")
    importlib.import_module(path)
    AutoModel.from_pretrained(path, trust_remote_code=True)
    np.load(path, allow_pickle=True)
    os.system("ls")
    subprocess.run("ls", shell=True)
    torch.load(path, weights_only=True)
    yaml.safe_load("a: 1")
"""
    found = audit(source, "example.py")
    expected = ["imports dill", "must default to False", "torch.load without weights_only=True", "calls pickle.loads",
                "calls yaml.load", "calls eval", "calls exec", "importlib.import_module outside",
                "passes trust_remote_code=True", "allow_pickle=True", "calls os.system", "runs a shell command"]
    for what in expected:
        assert any(what in p for p in found), (what, found)
    assert sum("torch.load without" in p for p in found) == 2  # the weights_only=True call is fine
    assert len(found) == len(expected) + 1


# ---------------------------------------------------------------------------------------------- hostile checkpoints
class _Payload:
    """Unpickling this creates ``marker``: code that would run if a checkpoint were loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.fixture
def hostile_ckpt(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "pytorch-lightning_version": "2.6.6", "x": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_resuming_from_a_checkpoint_that_carries_code_is_refused_in_one_line(hostile_ckpt, tmp_path, monkeypatch):
    path, marker = hostile_ckpt
    base = save_tiny_math_shaped_model(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["fit", "--config", str(REPO / "recipes/tiny-math/fast_mtp.yaml"), "--model.backbone",
                         str(base), "--data.init_args.num_train", "8", "--data.init_args.self_distill", "null",
                         "--trainer.max_steps", "1", "--ckpt_path", str(path)])
    assert code == 2 and "Weights only load failed" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_loading_a_checkpoint_that_carries_code_from_python_is_refused(hostile_ckpt):
    from lightning_mtp import MTPModule

    path, marker = hostile_ckpt
    with pytest.raises(Exception, match="Weights only load failed"):
        MTPModule.load_from_checkpoint(path, weights_only=True)
    assert not marker.exists()
