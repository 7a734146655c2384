"""The model zoo: every entry validates, the seeds' releases resolve to the right method and config, shipped
variants load offline, user entries register, bad entries name their file and field, and the MiMo native
MTP layer converts onto our FastMTP head (tested on a tiny lookalike built here)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_backbone
from helpers import TOKENIZER_DIR, save_tiny_math_shaped_model
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from lightning_mtp import MTPModule, cli, convert, zoo, zoo_index
from lightning_mtp.methods import METHODS

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Question: Tom has 5 apples. He buys 3 more apples. How many apples does Tom have now?\nAnswer:"


@pytest.fixture(autouse=True)
def _isolated_zoo(monkeypatch):
    """Each test sees the shipped entries only, and its registrations vanish with it."""
    monkeypatch.delenv("LIGHTNING_MTP_ZOO", raising=False)
    monkeypatch.setattr(zoo_index, "_registered", {})  # the registrations live in the index


# ---------------------------------------------------------------- every entry


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "zoo").glob("*.yaml")))
def test_every_zoo_entry_validates(name):
    entry = zoo.info(name)
    assert Path(entry.origin).parent == REPO / "zoo" and Path(entry.origin).stem == name
    if "recipe" in entry.source:
        assert (REPO / entry.source["recipe"]).is_file(), entry.source["recipe"]
    zoo.validate(name)


SEEDS = [
    ("qwen3-4b-mtp", "jwkirchenbauer/Qwen3-4B-Inst-2507-MTP", "full_model",
     {"name": "mask_token", "mask_token_id": 151669, "tau": 0.9, "k_max": 16}),
    ("llama-3.1-8b-magpie-mtp", "jwkirchenbauer/L3-1-8B-Magpie-MTP", "full_model",
     {"name": "mask_token", "mask_token_id": 128259, "tau": 0.9, "k_max": 16}),
    ("mimo-7b-fastmtp", "TencentBAC/FastMTP", "native_mtp", {"name": "fast_mtp", "num_steps": 3}),
]


@pytest.mark.parametrize(("name", "repo", "fmt", "method"), SEEDS)
def test_seed_releases_resolve_to_their_repo_method_and_config(name, repo, fmt, method):
    entry = zoo.info(name)
    assert entry.base_model["repo_id"] == repo and entry.weights["format"] == fmt
    assert {k: entry.method[k] for k in method} == method
    config = entry.method_config()  # through the method registry; no weights fetched
    assert type(config) is METHODS[method["name"]]
    assert {k: getattr(config, k) for k in method if k != "name"} == {k: v for k, v in method.items() if k != "name"}


def test_native_entry_names_a_known_layout_and_serving_flags():
    entry = zoo.info("mimo-7b-fastmtp")
    assert entry.weights["layout"] in convert.NATIVE_LAYOUTS
    snippet = convert.serving_snippet("mimo", "TencentBAC/FastMTP", 3)
    assert '"method": "mtp", "num_speculative_tokens": 3' in snippet
    assert "--speculative-algorithm EAGLE" in snippet and "--speculative-num-draft-tokens 4" in snippet


# ---------------------------------------------------------------- shipped variants


def test_shipped_variant_loads_offline_instantly_and_decodes_losslessly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be asked of a Hub
    start = time.perf_counter()
    module = zoo.load("tiny-math-fastmtp")
    assert time.perf_counter() - start < 20
    assert module.method_config.name == "fast_mtp" and module.num_draft_tokens == 3
    assert module.backbone_ref == "tiny-math-base"
    assert module.decoding_defaults == zoo.info("tiny-math-fastmtp").decoding
    ids = module.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = module.generate(ids, max_new_tokens=24)
    assert torch.equal(out.sequences, module.backbone.generate(ids, do_sample=False, max_new_tokens=24))
    assert out.stats.tokens_per_forward > 1.5  # the shipped head is trained: it drafts well
    same = MTPModule.from_pretrained("tiny-math-fastmtp")  # a zoo name is a from_pretrained source too
    assert torch.equal(same.generate(ids, max_new_tokens=24).sequences, out.sequences)


TINY_WORLD = sorted(p.stem for p in (REPO / "zoo").glob("tiny-world-*.yaml"))


@pytest.mark.parametrize("name", TINY_WORLD)
def test_every_tiny_world_entry_decodes_its_domains_losslessly(name):
    """Two held-out prompts of each domain, 16 tokens each: the entry's own decoding equals HF greedy on its backbone
    (tiny-world-base for heads; the model itself for the base and the draft model)."""
    module = zoo.load(name)
    base = module.backbone
    for domain in ("code", "prose", "math"):
        lines = (REPO / "benchmarks/prompts/tiny-world" / f"{domain}.jsonl").read_text().splitlines()[:2]
        for prompt in (json.loads(line)["prompt"] for line in lines):
            ids = module.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = module.generate(ids, max_new_tokens=16).sequences
            assert torch.equal(out, base.generate(ids, do_sample=False, max_new_tokens=16)), (name, domain)


def test_zoo_base_entry_is_a_backbone_name_and_loads_as_plain_model():
    base = zoo.load("tiny-math-base")
    assert base.method is None and base.backbone_ref == "tiny-math-base"
    assert zoo.weights_path("tiny-math-base") == REPO / "zoo" / "tiny-math-base"


def test_method_overrides_and_unknown_options():
    assert zoo.load("tiny-math-fastmtp", num_steps=2).num_draft_tokens == 2
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_stepz'\] for zoo entry 'tiny-math-fastmtp'; "
                                         r"method options are \['beta', 'draft_vocab_size', 'head_layer', 'num_steps', "):
        zoo.load("tiny-math-fastmtp", num_stepz=2)


def test_unknown_zoo_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"'tiny-math-fastmpt' is not a zoo entry; did you mean \['tiny-math-fastmtp'"):
        zoo.load("tiny-math-fastmpt")
    with pytest.raises(ValueError, match=r"did you mean the zoo entr.*'tiny-math-fastmtp'"):
        MTPModule.from_pretrained("tiny-math-fastmpt")


# ---------------------------------------------------------------- user entries


def _tiny_artefact(tmp_path: Path) -> Path:
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "fast_mtp", "num_steps": 2})
    with torch.no_grad():
        for p in module.method.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return module.save_pretrained(tmp_path / "heads")


def _entry(**changes) -> dict:
    data = {
        "name": "my-heads", "description": "test heads", "base_model": {"path": "base"},
        "method": {"name": "fast_mtp", "num_steps": 2}, "weights": {"format": "artifact", "path": "heads"},
        "license": "apache-2.0", "source": {"notes": "made in a test"},
    }
    data.update(changes)
    return data


def test_register_a_user_entry_from_a_file_then_load_it(tmp_path):
    art = _tiny_artefact(tmp_path)
    (tmp_path / "my-heads.yaml").write_text(yaml.safe_dump(_entry()))
    entry = zoo.register(tmp_path / "my-heads.yaml")
    assert "my-heads" in zoo.list() and zoo.validate("my-heads") is entry
    module = zoo.load("my-heads")
    reference = MTPModule.from_pretrained(art)
    ids = reference.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    assert torch.equal(module.generate(ids, max_new_tokens=8).sequences, reference.generate(ids, max_new_tokens=8).sequences)
    with pytest.raises(ValueError, match=r"zoo entry 'my-heads' already exists .*replace=True"):
        zoo.register(tmp_path / "my-heads.yaml")
    zoo.register(tmp_path / "my-heads.yaml", replace=True)


def test_zoo_directories_from_the_environment(tmp_path, monkeypatch):
    _tiny_artefact(tmp_path)
    (tmp_path / "my-heads.yaml").write_text(yaml.safe_dump(_entry()))
    assert "my-heads" not in zoo.names()
    monkeypatch.setenv("LIGHTNING_MTP_ZOO", str(tmp_path))
    assert "my-heads" in zoo.names() and "tiny-math-base" in zoo.names()
    assert zoo.weights_path("my-heads") == tmp_path / "heads"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"license": None}, r"missing required field 'license'"),
        ({"weights": {"format": 3, "path": "heads"}}, r"field 'weights.format' must be a string, got int 3"),
        ({"weights": {"format": "checkpoint", "path": "heads"}}, r"field 'weights.format' must be one of \['artifact'"),
        ({"weights": {"format": "artifact"}}, r"field 'weights' of format 'artifact' needs exactly one of 'path'"),
        ({"base_model": {"path": "base", "repo_id": "a/b"}}, r"field 'base_model' needs exactly one of"),
        ({"base_model": {"repo_id": "bad name/x y"}}, r"field 'base_model.repo_id': invalid Hub repo id 'bad name/x y'"),
        ({"decoding": {"num_draft_tokens": "three"}}, r"field 'decoding.num_draft_tokens' must be an integer"),
        ({"metrics": {"values": {"tau": 3.0}}}, r"field 'metrics' needs 'command'"),
        ({"colour": "blue"}, r"unknown field 'colour'; valid fields are \["),
        ({"name": "other-name"}, r"field 'name' is 'other-name' but the file is named 'my-heads.yaml'"),
        ({"method": {"num_steps": 2}}, r"field 'method.name' must be a method name"),
    ],
)
def test_invalid_zoo_yaml_names_the_file_and_the_field(tmp_path, changes, message):
    data = _entry(**changes)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "my-heads.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        zoo.register(path)


def test_zoo_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML"):
        zoo.register(path)


def test_unknown_method_in_an_entry_is_named(tmp_path):
    _tiny_artefact(tmp_path)
    path = tmp_path / "my-heads.yaml"
    path.write_text(yaml.safe_dump(_entry(method={"name": "fast_mpt"})))
    zoo.register(path)  # the structure is fine...
    with pytest.raises(ValueError, match=rf"{path}: field 'method': unknown method 'fast_mpt'"):
        zoo.validate("my-heads")  # ...the method is not


def test_heads_for_a_different_base_model_are_refused(tmp_path):
    _tiny_artefact(tmp_path)
    make_backbone("llama").save_pretrained(tmp_path / "other")  # vocab 64, hidden 32
    path = tmp_path / "my-heads.yaml"
    path.write_text(yaml.safe_dump(_entry(base_model={"path": "other"})))
    zoo.register(path)
    with pytest.raises(ValueError, match=r"trained on vocab/hidden \(617, 32\), but base .*other gives \(64, 32\)"):
        zoo.validate("my-heads")
    with pytest.raises(ValueError, match=r"was trained on a base with vocab 617 and hidden size 32"):
        zoo.load("my-heads")


def test_corrupt_safetensors_in_a_zoo_artefact(tmp_path):
    art = _tiny_artefact(tmp_path)
    (art / "mtp_method.safetensors").write_bytes(b"\x00" * 64)
    zoo.register(_entry(base_model={"path": str(tmp_path / "base")}, weights={"format": "artifact", "path": str(art)}))
    with pytest.raises(ValueError, match=r"cannot read .*mtp_method.safetensors"):
        zoo.load("my-heads")


# ---------------------------------------------------------------- CLI


def test_cli_zoo_list_and_info(capsys):
    cli.main(["zoo", "list"])
    out = capsys.readouterr().out
    for name in zoo.names():
        assert name in out
    assert "native_mtp" in out and "artifact: tiny-math-fastmtp" in out
    cli.main(["zoo", "info", "qwen3-4b-mtp"])
    info = capsys.readouterr().out
    assert yaml.safe_load(info)["method"]["mask_token_id"] == 151669
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["zoo", "info", "qwen3-4b-mpt"])
    assert exit_info.value.code == 2
    assert "did you mean ['qwen3-4b-mtp']" in capsys.readouterr().err


# ---------------------------------------------------------------- MiMo native MTP layer


def save_mimo_lookalike(path: Path, seed: int = 0) -> tuple[Qwen2ForCausalLM, dict[str, torch.Tensor]]:
    """A tiny model in MiMo's released layout: a Qwen2 backbone plus ``model.mtp_layers.0.*`` (16 tensors), in two
    safetensors shards with an index, ``model_type: mimo`` and the remote-code ``auto_map`` MiMo ships with."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    H, inner, q, kv = 32, 64, 4 * 8, 2 * 8
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=H, intermediate_size=inner, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return 1 + w(H, scale=0.1)

    mtp = {
        "token_layernorm.weight": norm(), "hidden_layernorm.weight": norm(), "input_proj.weight": w(H, 2 * H),
        "input_layernorm.weight": norm(), "post_attention_layernorm.weight": norm(),
        "self_attn.q_proj.weight": w(q, H), "self_attn.q_proj.bias": w(q), "self_attn.k_proj.weight": w(kv, H),
        "self_attn.k_proj.bias": w(kv), "self_attn.v_proj.weight": w(kv, H), "self_attn.v_proj.bias": w(kv),
        "self_attn.o_proj.weight": w(H, q), "mlp.gate_proj.weight": w(inner, H), "mlp.up_proj.weight": w(inner, H),
        "mlp.down_proj.weight": w(H, inner), "final_layernorm.weight": norm(),
    }
    path.mkdir(parents=True, exist_ok=True)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    backbone = {k: v.contiguous() for k, v in model.state_dict().items()}
    native = {f"model.mtp_layers.0.{k}": v for k, v in mtp.items()}
    save_file(backbone, str(path / shards[0]), metadata={"format": "pt"})
    save_file(native, str(path / shards[1]), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(backbone, shards[0]), **dict.fromkeys(native, shards[1])}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = config.to_dict()
    raw.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1,
               auto_map={"AutoConfig": "configuration_mimo.MiMoConfig",
                         "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"})
    (path / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(path)
    return model, mtp


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimo") / "MiMo-tiny"
    model, mtp = save_mimo_lookalike(path)
    return path, model, mtp


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_every_native_key_is_mapped_and_none_left_over(mimo):
    path, _, mtp = mimo
    assert convert.detect_native_layout(path) == "mimo"
    layers = convert.read_native_mtp_tensors(path)
    assert sorted(layers) == [0] and set(layers[0]) == set(mtp)
    module = convert.load_native_mtp(path)
    assert set(convert.from_native(layers[0])) == set(module.method.state_dict())
    assert all(torch.equal(v, mtp[k]) for k, v in convert.to_native(convert.from_native(layers[0])).items())


def test_mimo_backbone_loads_as_qwen2_without_remote_code(mimo):
    path, model, _ = mimo
    module = convert.load_native_mtp(path, method={"name": "fast_mtp", "num_steps": 3})
    assert type(module.backbone).__name__ == "Qwen2ForCausalLM" and module.tokenizer is not None
    ids = torch.tensor([[5, 17, 40, 33, 21, 8]])
    with torch.no_grad():
        torch.testing.assert_close(module.backbone(ids).logits, model(ids).logits)


def test_converted_head_equals_mimos_mtp_layer_at_the_first_draft_token(mimo):
    """MiMo's MTP forward written out from its released modelling code (hidden first in the concatenation)."""
    path, model, mtp = mimo
    module = convert.load_native_mtp(path)
    cfg, eps = model.config, model.config.rms_norm_eps
    layer = type(model.model.layers[0])(cfg, layer_idx=0).eval()
    layer.load_state_dict({k: v for k, v in mtp.items()
                           if k.split(".")[0] in {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}})
    torch.manual_seed(0)
    B, T = 1, 5
    hidden = torch.randn(B, T, cfg.hidden_size)  # (B, T, H) backbone states
    next_ids = torch.randint(4, cfg.vocab_size, (B, T))  # (B, T) the token after each position
    pos = torch.arange(T)[None]  # (1, T)
    with torch.no_grad():
        emb = model.model.embed_tokens(next_ids)
        x = torch.cat([_rms(hidden, mtp["hidden_layernorm.weight"], eps), _rms(emb, mtp["token_layernorm.weight"], eps)], -1)
        x = x @ mtp["input_proj.weight"].T  # (B, T, 2H) -> (B, T, H)
        causal = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)[None, None]  # (1, 1, T, T)
        x = layer(x, attention_mask=causal, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        x = x[0] if isinstance(x, tuple) else x
        want = model.lm_head(_rms(x, mtp["final_layernorm.weight"], eps))  # (B, T, V)
        head = module.method
        got = head.logits(module.parts, head.block(module.parts, hidden, next_ids, pos))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_converted_mimo_decodes_losslessly(mimo):
    path, model, _ = mimo
    module = convert.load_native_mtp(path, method={"name": "fast_mtp", "num_steps": 3})
    for prompt in ([5, 17, 40, 33, 21, 8], [9, 9, 12]):
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=16)
        assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=16))


def test_native_entry_loads_through_the_zoo_and_from_pretrained(mimo, tmp_path):
    path, model, _ = mimo
    zoo.register({"name": "mimo-tiny", "description": "lookalike", "base_model": {"path": str(path)},
                  "method": {"name": "fast_mtp", "num_steps": 2}, "weights": {"format": "native_mtp", "layout": "mimo"},
                  "license": "mit", "source": {"notes": "test"}})
    module = zoo.load("mimo-tiny")
    assert module.num_draft_tokens == 2 and module.backbone_ref == "mimo-tiny"
    direct = MTPModule.from_pretrained(path)  # a native-MTP directory converts on load too (MiMo's one step)
    assert direct.num_draft_tokens == 1
    for k, v in direct.method.state_dict().items():
        assert torch.equal(v, module.method.state_dict()[k])
    # heads saved from a converted module load back onto the same native base
    saved = module.save_pretrained(tmp_path / "heads")
    assert json.loads((saved / "mtp_config.json").read_text())["base_model"]["model_type"] == "qwen2"
    again = MTPModule.from_pretrained(saved, backbone=None)
    ids = torch.tensor([[5, 17, 40, 33]])
    assert torch.equal(again.generate(ids, max_new_tokens=10).sequences, model.generate(ids, do_sample=False, max_new_tokens=10))


def test_export_native_round_trips_and_gets_serving_flags(mimo, tmp_path):
    path, _, _ = mimo
    module = convert.load_native_mtp(path, method={"name": "fast_mtp", "num_steps": 3})
    out = convert.export_native(module, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mimo" and config["architectures"] == ["MiMoForCausalLM"]
    assert "auto_map" not in config
    back = MTPModule.from_pretrained(out)
    assert back.num_draft_tokens == 3
    for k, v in module.method.state_dict().items():
        assert torch.equal(v, back.method.state_dict()[k]), k
    from lightning_mtp.hub import model_card

    card = str(model_card(out, repo_id="me/mimo-tiny"))
    assert "vllm serve me/mimo-tiny --speculative-config" in card and "--speculative-num-steps 3" in card


def test_export_command_writes_a_trained_artefact_in_a_serving_format(mimo, tmp_path, capsys):
    main = cli.main
    path, _, _ = mimo
    art = convert.load_native_mtp(path, method={"name": "fast_mtp", "num_steps": 2}).save_pretrained(tmp_path / "art")
    main(["export", str(art), "--format", "mimo", "--out", str(tmp_path / "served")])
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "served"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["num_nextn_predict_layers"] == 1
    back, trained = MTPModule.from_pretrained(out), MTPModule.from_pretrained(art)
    for k, v in trained.method.state_dict().items():
        assert torch.equal(v, back.method.state_dict()[k]), k
    with pytest.raises(SystemExit) as exc:
        main(["export", str(art), "--format", "eagle9", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'eagle9'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"unknown export format 'eagle9'; choose one of \['mimo', 'deepseek_v3', 'qwen3_next', 'speculators', 'parallel_draft', 'hf'\]"):
        convert.export(trained, "eagle9", tmp_path / "x")


def test_native_keys_without_a_home_are_named(mimo, tmp_path):
    path, _, _ = mimo
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    save_file({"model.mtp_layers.0.eh_gate.weight": torch.ones(4)}, str(bad / "extra.safetensors"))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mtp_layers.0.eh_gate.weight"] = "extra.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"native mimo MTP key 'eh_gate.weight' has no place in our MTP head"):
        convert.load_native_mtp(bad)


def test_missing_native_tensor_is_named(mimo, tmp_path):
    path, _, mtp = mimo
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = "model-00002-of-00002.safetensors"
    save_file({f"model.mtp_layers.0.{k}": v for k, v in mtp.items() if k != "mlp.down_proj.weight"}, str(bad / shard))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.mtp_layers.0.mlp.down_proj.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lack tensors for \['block.layer.mlp.down_proj.weight'\]"):
        convert.load_native_mtp(bad)


def test_shipped_weights_stay_within_the_repo_budget():
    """Everything under zoo/ is cloned by every user and CI run: all shipped weights together stay <= 60 MB."""
    weights = [p for p in (REPO / "zoo").rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and not [p for p in weights if p.suffix != ".safetensors"]  # safetensors only
    total = sum(p.stat().st_size for p in weights)
    assert total <= 60 * 2**20, f"shipped weights take {total / 2**20:.1f} MB: " + ", ".join(
        f"{p.relative_to(REPO)} {p.stat().st_size / 2**20:.1f} MB" for p in sorted(weights))
