"""Native MTP layouts beyond MiMo (tests/test_zoo.py has MiMo's): DeepSeek-V3 (``model.layers.{L+i}.*``, one layer per
head, its own copies of the embedding and output head) and Qwen3-Next (``mtp.*``, zero-centred norms). Each is read
from a checkpoint written the way the released ones are (the decoder layer's tensors named by transformers'
own save_pretrained: per-expert MoE weights), checked against the layer transformers itself loads from the same
tensors, and round-tripped: import -> train -> stitch -> our loader reads it back with the same greedy output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import EOS, train_steps
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_mtp import MTPModule, convert

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
               tie_word_embeddings=False)
CONFIGS = {
    # layer 0 dense, layer 1 and the MTP layer (index 2) MoE, as DeepSeek-V3's first_k_dense_replace does
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    # a linear-attention layer, then a full-attention MoE layer (the class of Qwen3-Next's MTP layer)
    "qwen3_next": dict(_COMMON, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, linear_num_key_heads=2,
                       linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                       layer_types=["linear_attention", "full_attention"]),
}
PROMPTS = ([5, 17, 40, 33, 21, 8], [9, 9, 12])


def _model(arch: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(arch, **{**CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def _checkpoint_layer(arch: str, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer ``index`` of a one-layer-deeper model as transformers saves it (the checkpoint layout)."""
    deeper = _model(arch, seed=7, num_hidden_layers=3,
                    **({"layer_types": CONFIGS[arch]["layer_types"] + ["full_attention"]} if arch == "qwen3_next" else {}))
    tmp = Path(tempfile.mkdtemp())
    deeper.save_pretrained(tmp)
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in load_file(str(tmp / "model.safetensors")).items() if k.startswith(prefix)}


def save_native_lookalike(path: Path, arch: str) -> tuple:
    """A tiny checkpoint in ``arch``'s released native-MTP layout: the backbone as transformers saves it plus one MTP
    layer (random projection and norms, a decoder layer in the checkpoint layout) in a shard of its own."""
    model = _model(arch)
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    H = model.config.hidden_size

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    if arch == "deepseek_v3":
        mtp = {"enorm.weight": 1 + w(H, scale=0.1), "hnorm.weight": 1 + w(H, scale=0.1), "eh_proj.weight": w(H, 2 * H),
               "shared_head.norm.weight": 1 + w(H, scale=0.1), **_checkpoint_layer(arch, 2),
               "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
               "shared_head.head.weight": model.lm_head.weight.detach().clone()}
        native = {f"model.layers.2.{k}": v for k, v in mtp.items()}
        count = {"num_nextn_predict_layers": 1}
    else:  # zero-centred norms: the weights are offsets from one
        mtp = {"pre_fc_norm_embedding.weight": w(H, scale=0.1), "pre_fc_norm_hidden.weight": w(H, scale=0.1),
               "fc.weight": w(H, 2 * H), "norm.weight": w(H, scale=0.1),
               **{f"layers.0.{k}": v for k, v in _checkpoint_layer(arch, 2).items()}}
        native = {f"mtp.{k}": v for k, v in mtp.items()}
        count = {"mtp_num_hidden_layers": 1}
    save_file(native, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    backbone = load_file(str(path / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(backbone, "model.safetensors"),
                                            **dict.fromkeys(native, "mtp.safetensors")}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **count}))
    return model, mtp


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def native(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / f"{arch}-tiny"
    model, mtp = save_native_lookalike(path, arch)
    return arch, path, model, mtp


def _reference_layer(arch: str, path: Path, mtp: dict, tmp: Path):
    """The MTP layer's decoder layer and norm class as transformers loads them: the native tensors placed as layer
    2 of a three-layer model, read by its own from_pretrained (its own fusion of the per-expert MoE weights)."""
    layer = {k.removeprefix("layers.0."): v for k, v in mtp.items()
             if k.split(".")[0] in {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp", "layers"}}
    deeper = _model(arch, seed=9, num_hidden_layers=3,
                    **({"layer_types": CONFIGS[arch]["layer_types"] + ["full_attention"]} if arch == "qwen3_next" else {}))
    deeper.save_pretrained(tmp)
    state = load_file(str(tmp / "model.safetensors"))
    state.update({f"model.layers.2.{k}": v for k, v in layer.items()})
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    return loaded.model.layers[2], type(loaded.model.norm)


def test_layout_detected_and_every_key_mapped(native):
    arch, path, _, mtp = native
    assert convert.detect_native_layout(path) == arch
    layers = convert.read_native_mtp_tensors(path, arch)
    assert sorted(layers) == [0] and set(layers[0]) == set(mtp)
    module = convert.load_native_mtp(path)
    shared = {k for k, _ in convert.NATIVE_LAYOUTS[arch].shared}
    # every native tensor but the backbone copies lands in the head, and the head's tensors write back unchanged
    back = convert.to_native(module.method.state_dict(), arch, model=module.base_model)
    assert set(back) == set(mtp) - shared
    assert all(torch.equal(v, mtp[k]) for k, v in back.items())


def test_plain_model_of_the_architecture_is_not_native(tmp_path):
    """A DeepSeek-V3 / Qwen3-Next model saved by transformers, config count set but no MTP weights, loads as a plain
    model."""
    for arch, count in (("deepseek_v3", "num_nextn_predict_layers"), ("qwen3_next", "mtp_num_hidden_layers")):
        _model(arch).save_pretrained(tmp_path / arch)
        config = json.loads((tmp_path / arch / "config.json").read_text())
        (tmp_path / arch / "config.json").write_text(json.dumps({**config, count: 1}))
        assert convert.detect_native_layout(tmp_path / arch) is None


def test_converted_head_equals_the_native_layer(native, tmp_path):
    arch, path, model, mtp = native
    module = convert.load_native_mtp(path)
    layer, norm_cls = _reference_layer(arch, path, mtp, tmp_path)
    H, eps = model.config.hidden_size, model.config.rms_norm_eps
    names = {"deepseek_v3": ("enorm", "hnorm", "eh_proj", "shared_head.norm"),
             "qwen3_next": ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")}[arch]
    norms = []
    for name in (names[0], names[1], names[3]):
        norm = norm_cls(H, eps=eps)
        norm.load_state_dict({"weight": mtp[f"{name}.weight"]})
        norms.append(norm)
    torch.manual_seed(0)
    T = 5
    hidden = torch.randn(1, T, H)  # (1, T, H) backbone states
    next_ids = torch.randint(4, VOCAB, (1, T))  # (1, T) the token after each position
    pos = torch.arange(T)[None]
    with torch.no_grad():
        x = torch.cat([norms[0](model.model.embed_tokens(next_ids)), norms[1](hidden)], -1) @ mtp[f"{names[2]}.weight"].T
        causal = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)[None, None]  # (1, 1, T, T)
        x = layer(x, attention_mask=causal, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        want = model.lm_head(norms[2](x[0] if isinstance(x, tuple) else x))  # (1, T, V)
        head = module.method
        got = head.logits(module.parts, head.block(module.parts, hidden, next_ids, pos))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _train(module: MTPModule, steps: int = 15) -> MTPModule:
    """A few AdamW steps on the backbone's own greedy continuations."""
    seqs = [module.backbone.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16)[0] for p in PROMPTS]
    T = min(len(s) for s in seqs)
    ids = torch.stack([s[:T] for s in seqs])
    return train_steps(module, {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, steps)


def _greedy(module: MTPModule) -> list[torch.Tensor]:
    return [module.generate(torch.tensor([p]), max_new_tokens=12).sequences for p in PROMPTS]


@pytest.mark.parametrize("method", ["fast_mtp", "mtp_d"])
def test_import_train_stitch_and_read_back(native, method, tmp_path):
    arch, path, model, _ = native
    if method == "mtp_d" and arch != "deepseek_v3":
        pytest.skip("only DeepSeek-V3's layout carries MTP-D's sequential heads (see the error test)")
    spec = {"name": "fast_mtp", "num_steps": 2, "recurse_on_normed": arch == "qwen3_next"} if method == "fast_mtp" \
        else {"name": "mtp_d"}
    module = convert.load_native_mtp(path, method=spec)
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    _train(module)
    assert any(not torch.equal(before[k], v) for k, v in module.method.state_dict().items())  # it trained
    out = convert.export_native(module, tmp_path / "stitched", arch)
    assert convert.detect_native_layout(out) == arch
    back = MTPModule.from_pretrained(out)
    assert back.method_config.name == method and back.num_draft_tokens == module.num_draft_tokens
    for key, value in module.method.state_dict().items():
        assert torch.equal(value, back.method.state_dict()[key]), key
    greedy = _greedy(back)
    assert all(torch.equal(a, b) for a, b in zip(greedy, _greedy(module), strict=True))
    for prompt, seq in zip(PROMPTS, greedy, strict=True):
        assert torch.equal(seq, model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12))


def test_zero_centred_backbone_norms_are_kept_for_heads():
    module = MTPModule(_model("qwen3_next"), method={"name": "fast_mtp"})
    assert type(module.method.block.enorm).__name__ == "Qwen3NextRMSNorm"
    assert not module.method.block.final_norm.weight.any()  # zero-centred: starts at 0, scales by 1 + weight
    dense = MTPModule(_model("deepseek_v3"), method={"name": "fast_mtp"})
    assert type(dense.method.block.enorm) is torch.nn.RMSNorm


# ------------------------------------------------------------------------------------------ bad input


def _refused(module, layout: str, target: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        convert.export_native(module, target, layout)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}*"))  # nothing written, not even half


def test_export_refusals_name_the_mismatch(tmp_path):
    target = tmp_path / "out"
    deepseek, nxt = _model("deepseek_v3"), _model("qwen3_next")
    _refused(MTPModule(nxt, method={"name": "mtp_d", "num_heads": 2}), "qwen3_next", target,
             r"final-normed output, MTP-D heads feed each other their output before the norm; export MTP-D heads to "
             r"'deepseek_v3'")
    _refused(MTPModule(nxt, method={"name": "fast_mtp", "num_steps": 2}), "qwen3_next", target,
             r"trained with recurse_on_normed=False; train with method.recurse_on_normed: true, or set num_steps: 1")
    _refused(MTPModule(deepseek, method={"name": "fast_mtp", "num_steps": 1}), "qwen3_next", target,
             r"needs a 'qwen3_next' backbone, this one is 'deepseek_v3'")
    _refused(MTPModule(deepseek, method={"name": "fast_mtp", "num_steps": 1}), "deepseek_v3", target,
             r"not shaped like the MTP layer the engines build .* train with method.head_layer: 2")
    _refused(MTPModule(deepseek, method=None), "deepseek_v3", target, r"needs a fast_mtp or mtp_d module, got None")
    lora = MTPModule(deepseek, method={"name": "fast_mtp", "head_layer": 2}, lora={"r": 2, "target_modules": ["o_proj"]})
    _refused(lora, "deepseek_v3", target, r"has a LoRA adapter; call module.merge_lora\(\)")
    _refused(MTPModule(nxt, method={"name": "fast_mtp", "num_steps": 1}), "gpt9", target,
             r"unknown native MTP layout 'gpt9'; known layouts are \['deepseek_v3', 'mimo', 'qwen3_next'\]")


def test_native_layer_whose_embedding_copy_differs_is_refused(native, tmp_path):
    arch, path, _, mtp = native
    if arch != "deepseek_v3":
        pytest.skip("only DeepSeek-V3's layers store copies of the embedding")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    state = load_file(str(bad / "mtp.safetensors"))
    state["model.layers.2.embed_tokens.weight"] = state["model.layers.2.embed_tokens.weight"] + 1
    save_file(state, str(bad / "mtp.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"embed_tokens.weight differs from the backbone's embed_tokens"):
        convert.load_native_mtp(bad)
