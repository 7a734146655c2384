"""The speculators export (``lightning-mtp export --format speculators``), checked by the speculators package itself.

speculators pins its own transformers, so it runs in an environment of its own, made here on first use under
``~/.cache/lightning-mtp/envs`` (pinned versions; torch and the rest come from this environment through a ``.pth``
file): the exported directory loads with ``MTPDraftModel.from_pretrained`` with no missing or unexpected tensors,
and its teacher-forced forward gives our head's draft logits at every step, to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_backbone
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from lightning_mtp import MTPModule
from lightning_mtp.backbone import LastHiddenState, LayerOutputs, causal_mask
from lightning_mtp.convert import export
from lightning_mtp.methods.base import future_tokens
from lightning_mtp.native import SPECULATORS_VERSION

PINS = [f"speculators=={SPECULATORS_VERSION}", "transformers==5.19.0", "hs-connectors==0.9.0", "loguru==0.7.3"]
WITH_DEPS = ["openai==3.63.0", "pydantic-settings==2.16.3"]  # their own dependencies do not pin transformers
CHECK = Path(__file__).parent / "speculators_check.py"


def _env_python() -> Path:
    """The speculators environment's Python, made once (atomically: parallel workers may race to make it)."""
    env = Path.home() / ".cache" / "lightning-mtp" / "envs" / f"speculators-{SPECULATORS_VERSION}"
    python = env / "bin" / "python"
    if not python.exists():
        tmp = env.with_name(f"{env.name}.tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        _link_site_packages(tmp)
        pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", *PINS], check=True)
        subprocess.run([*pip, *WITH_DEPS], check=True)
        try:
            tmp.rename(env)
        except OSError:  # another worker made it first
            shutil.rmtree(tmp, ignore_errors=True)
    _link_site_packages(env)  # this checkout's environment (torch, safetensors, ...) after the env's own packages
    return python


def _link_site_packages(env: Path) -> None:
    own = next((env / "lib").glob("python*/site-packages"))
    (own / "lightning_mtp_deps.pth").write_text(site.getsitepackages()[0] + "\n")


@pytest.fixture(scope="module")
def speculators_python() -> Path:
    return _env_python()


def _trained_like(module: MTPModule) -> MTPModule:
    """Every head weight moved off its initial value (norms included), so that each tensor's place is checked."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.method.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _our_logits(module: MTPModule, ids: torch.Tensor, hidden: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Our head's teacher-forced logits per step (B, T, V), as FastMTP computes them in training."""
    head, parts = module.method, module.parts
    T = ids.shape[1]
    out, h = [], hidden
    with torch.no_grad():
        for k in range(1, steps + 1):
            block_out = head.block(parts, h, future_tokens(ids, k, 0), torch.arange(T)[None])
            out.append(head.logits(parts, block_out).float())
            h = head.recur(block_out)
    return out


def _mtp_d_first_head_logits(module: MTPModule, ids: torch.Tensor, hidden: torch.Tensor, steps: int
                             ) -> list[torch.Tensor]:
    """MTP-D's first head's teacher-forced logits (B, T, V): what its one-token speculators draft must give."""
    head, parts = module.method.heads[0], module.parts
    with torch.no_grad():
        out = head(parts, hidden, future_tokens(ids, 1, 0), torch.arange(ids.shape[1])[None])
        return [module.method.logits(parts, head, out).float()]


@pytest.mark.parametrize(("method", "steps", "reference"), [
    ({"name": "fast_mtp", "num_steps": 3, "recurse_on_normed": True}, 3, _our_logits),
    ({"name": "mtp_d", "num_heads": 3}, 1, _mtp_d_first_head_logits),
], ids=["fast_mtp", "mtp_d"])
def test_a_head_loads_in_speculators_with_equal_draft_logits(tmp_path, speculators_python, method, steps, reference):
    module = _trained_like(MTPModule(make_backbone("qwen3"), method=method).eval())
    verifier = tmp_path / "verifier"
    module.base_model.save_pretrained(verifier)
    out = export(module, "speculators", tmp_path / "draft", verifier=str(verifier))
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(verifier.resolve())

    ids = torch.randint(4, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LastHiddenState(module.parts) as grab:
        hidden = grab.get(module.backbone(ids, **grab.kwargs))  # (1, T, H) the verifier's final hidden state
    save_file({"input_ids": ids, "hidden": hidden.contiguous()}, str(tmp_path / "in.safetensors"))
    run = subprocess.run([str(speculators_python), str(CHECK), str(out), str(tmp_path / "in.safetensors"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["unexpected"] == []
    assert set(report["missing"]) <= {"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight"}
    assert report["steps"] == steps
    theirs = load_file(str(tmp_path / "out.safetensors"))
    ours = reference(module, ids, hidden, steps)
    assert len(theirs) == steps
    for s in range(steps):
        step = theirs[f"step{s}"]  # (1, valid, V): the positions where every step has a token to read
        torch.testing.assert_close(step, ours[s][:, : step.shape[1]], rtol=1e-4, atol=1e-4)
        if steps > 1:
            assert not torch.allclose(step, ours[(s + 1) % steps][:, : step.shape[1]])  # the steps do differ


def _eagle3_logits(module: MTPModule, ids: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Our draft model's logits per unrolled step (1, T, V'), tokens teacher-forced, each step on its own outputs,
    each query seeing the committed positions up to its own and its own position's earlier steps."""
    method, parts, T = module.method, module.parts, ids.shape[1]
    base = causal_mask(T, T, torch.float32, ids.device)
    own = torch.full((T, T), torch.finfo(torch.float32).min).fill_diagonal_(0)[None, None]
    state, cache, out = method.enter(features), DynamicCache(), []
    with torch.no_grad():
        for j in range(steps):
            state = method.block(parts, state, future_tokens(ids, 1 + j, 0), torch.arange(T)[None] + j, cache,
                                 torch.cat([base, *([own] * j)], dim=-1))
            out.append(method.logits(parts, state).float())
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_an_eagle3_draft_loads_in_speculators_with_equal_draft_logits(tmp_path, speculators_python, arch):
    """speculators' Eagle3DraftModel, unrolled as it trains, gives our draft model's logits at every step: the same
    fused features, layer, attention pattern, norms and draft vocabulary (d2t / t2d)."""
    module = MTPModule(make_backbone(arch, num_hidden_layers=4),
                       method={"name": "eagle3", "ttt_steps": 3, "draft_vocab_size": 40}).eval()
    module.method.prepare(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2)))  # a scattered subset
    module = _trained_like(module)
    verifier = tmp_path / "verifier"
    module.base_model.save_pretrained(verifier)
    out = export(module, "speculators", tmp_path / "draft", verifier=str(verifier))
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]
    assert config["draft_vocab_size"] == 40

    ids = torch.randint(4, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LayerOutputs(module.parts, module.method.hidden_layers) as grab:
        features = grab.get(module.backbone(ids))  # (1, T, 3H)
    # speculators' layout: position i holds the features of i and the token after it
    save_file({"input_ids": ids[:, 1:].contiguous(), "hidden": features[:, :-1].contiguous(),
               "ttt_steps": torch.tensor(3)}, str(tmp_path / "in.safetensors"))
    run = subprocess.run([str(speculators_python), str(CHECK), str(out), str(tmp_path / "in.safetensors"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["unexpected"] == []
    assert set(report["missing"]) <= {"embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"}
    assert report["steps"] == 3
    theirs, ours = load_file(str(tmp_path / "out.safetensors")), _eagle3_logits(module, ids, features, 3)
    T = ids.shape[1]
    for j in range(3):  # step j's tokens run out j positions before the end
        torch.testing.assert_close(theirs[f"step{j}"][:, : T - 1 - j], ours[j][:, : T - 1 - j], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(theirs["step1"][:, :8], theirs["step0"][:, :8])  # the steps do differ


@pytest.mark.parametrize(("method", "arch", "match"), [
    ({"name": "mask_token"}, "qwen3", "needs a fast_mtp, mtp_d or eagle3 module, got 'mask_token'"),
    ({"name": "fast_mtp"}, "llama", r"builds MTP layers for \['qwen3', .*\] only, this backbone is 'llama'"),
    ({"name": "fast_mtp", "num_steps": 3}, "qwen3", "trained with recurse_on_normed=False"),
    ({"name": "fast_mtp", "draft_vocab_size": 32}, "qwen3", "vocabulary compression"),
])
def test_heads_the_format_cannot_carry_are_refused_before_anything_is_written(tmp_path, method, arch, match):
    module = MTPModule(make_backbone(arch), method=method)
    with pytest.raises(ValueError, match=match):
        export(module, "speculators", tmp_path / "draft", verifier=str(tmp_path))
    assert not (tmp_path / "draft").exists()


def test_a_verifier_vllm_cannot_load_is_refused(tmp_path):
    module = MTPModule(make_backbone("qwen3"), method={"name": "fast_mtp", "num_steps": 1})
    with pytest.raises(ValueError, match="neither a Hub id nor a directory; name the base model"):
        export(module, "speculators", tmp_path / "draft")
    assert not (tmp_path / "draft").exists()


def test_mtp_d_exports_its_first_head_as_a_one_token_draft(tmp_path):
    module = MTPModule(make_backbone("qwen3"), method={"name": "mtp_d", "num_heads": 3})
    out = export(module, "speculators", tmp_path / "draft", verifier=str(tmp_path))
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 1
    tensors = load_file(str(out / "model.safetensors"))
    first = {k.removeprefix("heads.0."): v for k, v in module.method.state_dict().items() if k.startswith("heads.0.")}
    assert torch.equal(tensors["mtp_layers.0.input_proj.weight"], first["proj.weight"])
    assert torch.equal(tensors["mtp_layers.0.token_layernorm.weight"], first["enorm.weight"])
    assert len(tensors) == len(first)


def test_the_export_command_writes_a_speculators_draft_of_a_saved_artefact(tmp_path, capsys):
    from lightning_mtp import cli

    verifier = tmp_path / "verifier"
    make_backbone("qwen3").save_pretrained(verifier)
    module = MTPModule(str(verifier), method={"name": "fast_mtp", "num_steps": 2, "recurse_on_normed": True})
    art = module.save_pretrained(tmp_path / "art")
    cli.main(["export", str(art), "--format", "speculators", "--out", str(tmp_path / "draft")])
    out = Path(capsys.readouterr().out.strip())
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "mtp"
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(verifier.resolve())  # the trained-on base
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["mtp_layers.0.final_layernorm.weight"], module.method.block.final_norm.weight)


def test_model_cards_say_which_heads_export_to_speculators(tmp_path):
    from lightning_mtp.hub import model_card

    for arch, exports in (("qwen3", True), ("llama", False)):
        base = tmp_path / arch
        make_backbone(arch).save_pretrained(base)
        art = MTPModule(str(base), method={"name": "fast_mtp", "num_steps": 1}).save_pretrained(tmp_path / f"{arch}-art")
        assert ("--format speculators" in str(model_card(art, repo_id="me/x"))) is exports, arch


def test_the_card_of_a_speculators_export_says_how_vllm_serves_it(tmp_path):
    from lightning_mtp.hub import model_card

    module = MTPModule(make_backbone("qwen3"), method={"name": "fast_mtp", "num_steps": 1})
    out = export(module, "speculators", tmp_path / "draft", verifier=str(tmp_path))
    card = str(model_card(out, repo_id="me/qwen3-mtp-draft"))
    assert "vllm serve me/qwen3-mtp-draft\n" in card and "tests/test_export_speculators.py" in card
