"""Mask-token MTP: packed training layout, teacher, ConfAdapt rule and KV-cache hygiene, lossless decoding through
the shared decoder (single and batched, several architectures), the released full-model format, artefact round
trips (full fine-tuning and LoRA), and bad input."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from conftest import EOS, VOCAB, greedy_batch, make_backbone, train_method, training_prompts
from helpers import TOKENIZER_DIR, save_tiny_math_shaped_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_mtp import MaskToken, MTPModule
from lightning_mtp.data.datamodule import TinyMathDataModule
from lightning_mtp.decoding.conf_adapt import conf_adapt_generate, confident_prefix_length
from lightning_mtp.methods.mask_token import additive_mask, packed_layout, real_attention

PROMPTS = [[5], [8, 60, 48], [4, 32, 56, 9], list(range(20, 31)), list(range(40, 57))]
MAX_NEW = 24
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int = MAX_NEW) -> torch.Tensor:
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)


def train_mask_token(model, steps: int = 40, lr: float = 3e-3, **method) -> MTPModule:
    """An MTPModule whose backbone learned to fill masks for ``steps`` AdamW steps on its own greedy output."""
    options = {"k_max": 4, "num_speculative_tokens": 3, "regions_per_sequence": 8, **method}
    return train_method(model, {"name": "mask_token", **options}, steps=steps, lr=lr)


@pytest.fixture(scope="module")
def trained():
    """Factory: ``trained("llama")`` -> a mask-token MTPModule trained briefly (built once per architecture)."""
    cache = {}

    def get(arch: str) -> MTPModule:
        if arch not in cache:
            overrides = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1} if arch == "qwen3-swa" else {}
            cache[arch] = train_mask_token(make_backbone(arch.removesuffix("-swa"), **overrides))
        return cache[arch]

    return get


# ---------------------------------------------------------------- the packed training layout


def test_packed_layout_of_two_regions_matches_a_hand_built_mask():
    # row 0: 5 real tokens, regions anchored at 1 and 3; row 1: 4 real tokens + 1 padding, anchors at 0 and 2
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    allowed, positions = real_attention(attention_mask, None, torch.zeros(2, 5, dtype=torch.long))
    layout, pos = packed_layout(allowed, positions, torch.tensor([[1, 3], [0, 2]]), k=3)
    #            real tokens    region 0   region 1
    expected_0 = [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                  [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # anchor 1 (repeated): sees token 0 and itself
                  [1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # <MTP>
                  [1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],  # <MTP>
                  [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0],  # anchor 3 (repeated): tokens 0-2, never region 0
                  [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
                  [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]]
    expected_1 = [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # padding is never a key
                  [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # anchor 0: nothing before it
                  [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert layout.long().tolist() == [expected_0, expected_1]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 1, 2, 3, 3, 4, 5], [0, 1, 2, 3, 4, 0, 1, 2, 2, 3, 4]]
    mask = additive_mask(layout, torch.float32)
    assert mask.shape == (2, 1, 11, 11)
    assert torch.equal(mask[:, 0] == 0, layout) and (mask[:, 0][~layout] == torch.finfo(torch.float32).min).all()


def test_packed_layout_keeps_packed_documents_apart():
    # two documents packed in one row (positions restart at 3): a region anchored in the second sees only it
    T = 6
    doc = torch.tensor([0, 0, 0, 1, 1, 1])
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    float_mask = additive_mask(allowed[None], torch.float32)  # (1, 1, T, T), the datamodule's packed format
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    real, positions = real_attention(float_mask, position_ids, torch.zeros(1, T, dtype=torch.long))
    layout, pos = packed_layout(real, positions, torch.tensor([[4]]), k=2)
    assert layout[0, 6, :T].long().tolist() == [0, 0, 0, 1, 0, 0] and layout[0, 7, :T].long().tolist() == [0, 0, 0, 1, 0, 0]
    assert pos[0, T:].tolist() == [1, 2]


@pytest.mark.parametrize(("arch", "attn"), [("llama", "eager"), ("llama", "sdpa"), ("qwen3", "sdpa"), ("gpt2", "eager")])
def test_packed_student_forward_equals_separate_forwards(arch, attn):
    model = make_backbone(arch, attn_implementation=attn)
    mask_id, k = VOCAB - 1, 4
    torch.manual_seed(1)
    input_ids = torch.randint(4, VOCAB - 1, (2, 9))
    anchors = torch.tensor([[2, 6, 8], [0, 5, 3]])
    allowed, positions = real_attention(None, None, input_ids)
    layout, pos = packed_layout(allowed, positions, anchors, k)
    regions = torch.cat([input_ids.gather(1, anchors)[:, :, None], torch.full((2, 3, k - 1), mask_id)], dim=2)
    packed_ids = torch.cat([input_ids, regions.reshape(2, -1)], dim=1)
    with torch.no_grad():
        packed = model(packed_ids, attention_mask=additive_mask(layout, torch.float32), position_ids=pos).logits
        real_alone = model(input_ids).logits
        torch.testing.assert_close(packed[:, :9], real_alone, atol=1e-4, rtol=1e-4)  # real tokens never see a region
        for b in range(2):
            for r, a in enumerate(anchors[b].tolist()):
                alone = torch.cat([input_ids[b, : a + 1], torch.full((k - 1,), mask_id)])[None]
                want = model(alone).logits[0, -k:]  # the prefix's last token, then each mask
                torch.testing.assert_close(packed[b, 9 + r * k : 9 + (r + 1) * k], want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- training and the teacher


@pytest.mark.parametrize("ntp_weight", [0.0, 1.0])
def test_training_step_logs_agreement_and_trains_the_backbone(ntp_weight):
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "mask_token", "k_max": 5, "ntp_weight": ntp_weight})
    assert module.trains_backbone_weights  # full fine-tuning by default, as the paper
    batch = greedy_batch(model, training_prompts(4), 10)
    module.train()
    loss, logs = module.method.training_loss(module.context, batch)
    loss.backward()
    assert all(p.grad is not None for p in module.backbone.parameters() if p.requires_grad)
    assert 2 <= float(logs["k"]) <= 5 and 0 <= float(logs["agreement"]) <= 1
    assert ("ntp_loss" in logs) == (ntp_weight > 0)
    if ntp_weight:
        assert float(logs["ntp_agreement"]) == 1.0  # before any step the student is the teacher
    module.eval()
    _, logs = module.method.training_loss(module.context, batch)
    assert logs["draft_correct"].shape[0] == 3 and logs["draft_correct"].dtype == torch.bool  # (K, N)
    assert {f"agree_{j}" for j in range(5)} <= set(logs)


@pytest.mark.parametrize("loss", ["hard", "soft"])
def test_self_distillation_raises_teacher_agreement(loss):
    model = make_backbone("qwen3")
    before = MTPModule(copy.deepcopy(model), method={"name": "mask_token", "k_max": 4}).eval()
    batch = greedy_batch(model, training_prompts(), 24)
    _, logs_before = before.method.training_loss(before.context, batch)
    after = train_mask_token(model, steps=30, loss=loss, entropy_weight=0.01 if loss == "soft" else 0.0)
    _, logs_after = after.method.training_loss(after.context, batch)
    assert float(logs_after["agree_1"]) > float(logs_before["agree_1"]) + 0.2


def test_full_fine_tuning_teacher_is_a_frozen_copy_outside_the_state_dict(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "mask_token", "k_max": 4}, learning_rate=1e-2)
    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    dm = TinyMathDataModule(num_train=16, num_val=8, batch_size=8)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    for key in ("val/AR_1", "val/tau_estimate", "val/agree_1", "train/loss"):
        assert key in trainer.callback_metrics, key
    assert not any("teacher" in k for k in module.state_dict())  # checkpoints never carry it
    teacher = module.method._teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in initial.items())  # still the initial model ...
    assert any(not torch.equal(module.backbone.state_dict()[k], v) for k, v in initial.items())  # ... the student moved
    # a resumed run keeps the initial model as teacher: the copy is taken before a checkpoint's weights land
    fresh = MTPModule(str(base), method={"name": "mask_token", "k_max": 4})
    fresh_initial = {k: v.clone() for k, v in fresh.backbone.state_dict().items()}
    fresh.load_state_dict(module.state_dict())
    assert all(torch.equal(fresh.method._teacher.state_dict()[k], v) for k, v in fresh_initial.items())
    assert all(torch.equal(fresh.backbone.state_dict()[k], v) for k, v in module.backbone.state_dict().items())


def test_teacher_read_again_from_the_reference_is_the_initial_model(tmp_path):
    # what a sharded (FSDP) run uses: the initial weights read again, with the student's mask row prepared
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "mask_token", "k_max": 4}, learning_rate=1e-2)
    initial = copy.deepcopy(module.backbone)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p))  # the student moved on
    teacher = module.method.load_teacher(module.context)
    assert teacher.get_input_embeddings().weight.shape[0] == module.parts.vocab_size  # the <MTP> row is there
    ids = torch.tensor([[5, 17, 40, 33, 21, 8]])
    with torch.no_grad():  # the new row's mean initialisation is random: compare the base vocabulary
        torch.testing.assert_close(teacher(ids).logits[..., :-1], initial(ids).logits[..., :-1])
    nameless = MTPModule(make_backbone("llama"), method="mask_token")
    nameless.backbone_ref = ""
    with pytest.raises(ValueError, match="cannot be read again"):
        nameless.method.load_teacher(nameless.context)


def test_lora_teacher_is_the_base_model_with_the_adapter_disabled():
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "mask_token", "k_max": 4}, lora=LORA)
    reference = copy.deepcopy(module.base_model)  # before training: the adapter changes nothing yet
    mask_id = module.method_config.mask_token_id
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable)  # base weights stay frozen
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.tensor([[5, 17, 40, mask_id, mask_id, 8]])
    mask = additive_mask(torch.ones(1, 6, 6, dtype=torch.bool).tril(), torch.float32)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        teacher = module.method.teacher_logits(module.context, ids, mask, pos, first=0)
        student = module.backbone(ids).logits
        base_logits = reference(ids).logits
    assert torch.equal(teacher, base_logits)
    assert not torch.allclose(student, base_logits)  # the adapter (and the mask row) do change the student
    assert module.method._teacher is None  # no second copy was made


# ---------------------------------------------------------------- ConfAdapt, static k and the KV cache


def test_confadapt_keeps_the_leading_confident_run_and_always_the_first_token():
    logits = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    conf = torch.softmax(logits, -1).max(-1).values  # 0.33, 0.96, 0.91, 0.99, 0.33
    assert confident_prefix_length(conf, 0.9) == 1  # an unsure first token stops the run, but is kept
    assert confident_prefix_length(conf[1:], 0.9) == 3
    assert confident_prefix_length(conf[1:], float(conf[2])) == 3  # the threshold is inclusive
    assert confident_prefix_length(conf[1:], float(conf[2]) + 1e-6) == 1
    assert confident_prefix_length(conf[1:], 1.0) == 1
    assert confident_prefix_length(conf, None) == 5  # static k keeps everything


def uncached_reference(model, ids: torch.Tensor, mask_id: int, k: int, tau: float | None, max_new: int) -> list[int]:
    """ConfAdapt / static k with full forwards and no cache: what the cached decoder must reproduce."""
    seq, out = ids[0].tolist(), []
    with torch.no_grad():
        out.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        while out[-1] != EOS and len(out) < max_new:
            logits = model(torch.tensor([seq + out + [mask_id] * (k - 1)])).logits[0, -k:]
            probs = torch.softmax(logits, -1)
            tokens = probs.argmax(-1).tolist()
            n = confident_prefix_length(probs.max(-1).values, tau)
            for t in tokens[:n]:
                out.append(t)
                if t == EOS or len(out) == max_new:
                    break
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_mask_cache_entries_never_leak_into_later_steps(arch, trained):
    module = trained(arch)
    model, mask_id = module.backbone, module.method_config.mask_token_id
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        greedy = hf_greedy(model, ids)
        assert torch.equal(module.generate(ids, decoding="static", k=1, max_new_tokens=MAX_NEW).sequences, greedy)
        for tau, k in ((1.0, 4), (0.5, 4), (None, 3)):
            mode = {"decoding": "confadapt", "tau": tau} if tau is not None else {"decoding": "static"}
            out = module.generate(ids, max_new_tokens=MAX_NEW, k=k, **mode)
            assert out.sequences[0, len(prompt) :].tolist() == uncached_reference(model, ids, mask_id, k, tau, MAX_NEW)
    static = module.generate(torch.tensor([PROMPTS[2]]), decoding="static", k=3, max_new_tokens=MAX_NEW).stats
    assert static.tokens_per_forward > 2.5 and static.acceptance_per_position == [1.0, 1.0]


def test_confadapt_on_a_trained_model_keeps_several_tokens_per_forward(trained):
    module = trained("qwen3")
    taus = [module.generate(ids, decoding="confadapt", tau=0.6, max_new_tokens=MAX_NEW).stats.tokens_per_forward
            for ids in training_prompts()[:4]]
    # 40 training steps leave the masks confident on some prompts only: several tokens per forward there, and more
    # than one on average (an untrained model keeps exactly one)
    assert max(taus) >= 2 and sum(taus) / len(taus) > 1.3, taus


# ---------------------------------------------------------------- lossless decoding through the shared decoder


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "mistral", "qwen3-swa"])
def test_lossless_mode_equals_hf_greedy(arch, trained):
    module = trained(arch)
    model = module.backbone
    taus = []
    for ids in [torch.tensor([p]) for p in PROMPTS] + training_prompts()[:4]:
        out = module.generate(ids, decoding="speculative", max_new_tokens=MAX_NEW)
        assert torch.equal(out.sequences, hf_greedy(model, ids)), ids
        taus.append(out.stats.tokens_per_forward)
    assert max(taus) > 1.5, taus  # drafts were accepted: the masks' drafts and their cache crops ran


def masks_per_forward(module: MTPModule, ids: torch.Tensor, **generate) -> tuple[list[int], torch.Tensor]:
    """How many mask tokens each backbone forward of ``module.generate`` carried, and the sequences."""
    mask_id, counts = module.method_config.mask_token_id, []

    def count(_, args, kwargs):
        if kwargs.get("use_cache", True):  # the decode loop's forwards, not a cache-free check beside it
            counts.append(int((kwargs.get("input_ids", args[0] if args else None) == mask_id).sum()))

    hook = module.backbone.register_forward_pre_hook(count, with_kwargs=True)
    try:
        sequences = module.generate(ids, max_new_tokens=MAX_NEW, **generate).sequences
    finally:
        hook.remove()
    return counts, sequences


def test_adaptive_chains_ride_along_only_the_masks_the_next_chain_can_use():
    module = MTPModule(make_backbone("llama"), method={"name": "mask_token", "k_max": 8, "num_speculative_tokens": 6})
    ids = torch.tensor([PROMPTS[3]])  # untrained masks: their drafts miss, the adaptive chain shortens
    module.generate(ids, max_new_tokens=2)  # the first call's own forwards (probing the backbone's cache) aside
    constant, out_constant = masks_per_forward(module, ids, draft_schedule="constant")
    adaptive, out_adaptive = masks_per_forward(module, ids, draft_schedule="adaptive")
    greedy = hf_greedy(module.backbone, ids)
    assert torch.equal(out_constant, greedy) and torch.equal(out_adaptive, greedy)
    assert set(constant) == {6}  # every forward carries K masks
    assert adaptive[0] == 6 and max(adaptive[-8:]) <= 2  # once chains shrank: at most twice the next chain's length
    assert 0 in adaptive  # and none in the plain steps of a pause


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    return (torch.tensor([[pad] * (n - len(p)) + p for p in prompts]),
            torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts]))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "mistral"])
def test_batched_lossless_rows_equal_each_row_alone(arch, trained):
    module = trained(arch)
    prompts = [p[0].tolist() for p in training_prompts()[:3]] + PROMPTS[1:4]
    ids, mask = left_padded(prompts)
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    short = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, draft_confidence_threshold=0.6)
    for i, prompt in enumerate(prompts):
        alone = hf_greedy(module.backbone, torch.tensor([prompt]))[0, len(prompt) :].tolist()
        assert out.sequences[i, ids.shape[1] :].tolist()[: len(alone)] == alone, prompt
        assert short.sequences[i, ids.shape[1] :].tolist()[: len(alone)] == alone, prompt
    assert out.stats.draft_steps > 0 and sum(out.stats.accepted) > 0
    assert sum(short.stats.reached) < sum(out.stats.reached)  # chains ended before unconfident masks


def test_lossless_sampling_with_top_k_1_is_greedy(trained):
    module = trained("llama")
    g = torch.Generator().manual_seed(0)
    for ids in training_prompts()[:3]:
        out = module.generate(ids, do_sample=True, top_k=1, generator=g, max_new_tokens=MAX_NEW)
        assert torch.equal(out.sequences, hf_greedy(module.backbone, ids))


def test_bench_entries_name_method_and_mode():
    module = MTPModule(make_backbone("llama"), method={"name": "mask_token", "tau": 0.8})
    names = [name for name, _ in module.method.bench_entries()]
    assert names == ["mask_token/confadapt@0.8", "mask_token/lossless"]
    sweep = dict(module.method.bench_entries(sweep=True))
    assert sweep["mask_token/static@3"] == {"decoding": "static", "k": 3}
    assert sweep["mask_token/confadapt@0.95"] == {"decoding": "confadapt", "tau": 0.95}
    assert len(sweep) == 2 + 6 + 5


# ---------------------------------------------------------------- the released format and artefacts


def save_release_lookalike(path, padded: int = 23):
    """A tiny Qwen3 whose embedding matrix has padded rows beyond its tokenizer (as Qwen3-4B-Inst-2507-MTP, whose
    <MTP> is id 151669), saved as a plain Hugging Face model directory with its tokenizer."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = AutoConfig.for_model(
        "qwen3", vocab_size=len(tok) + padded, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, len(tok)


def test_released_full_model_with_a_mask_id_decodes_without_adding_tokens(tmp_path):
    reference, n_tok = save_release_lookalike(tmp_path / "release")
    mask_id = n_tok + 20
    module = MTPModule(backbone=str(tmp_path / "release"), method={"name": "mask_token", "mask_token_id": mask_id})
    assert len(module.tokenizer) == n_tok and module.parts.vocab_size == n_tok + 23  # nothing added or resized
    ids = module.tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(module.backbone(ids).logits, reference(ids).logits)
    assert torch.equal(module.generate(ids, decoding="speculative", max_new_tokens=16).sequences,
                       hf_greedy(reference, ids, 16))
    out = module.generate(ids, decoding="confadapt", max_new_tokens=16)
    assert out.sequences.shape[1] > ids.shape[1]
    # with no id given, the first padded row is chosen and nothing is added either
    chosen = MTPModule(backbone=str(tmp_path / "release"), method="mask_token")
    assert chosen.method_config.mask_token_id == n_tok and len(chosen.tokenizer) == n_tok


def test_full_fine_tuning_artefact_round_trips_the_added_token(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")  # tiny-math vocabulary, no spare embedding row
    module = MTPModule(str(base), method={"name": "mask_token", "k_max": 4})
    n_tok = len(AutoTokenizer.from_pretrained(base))
    assert module.method_config.mask_token_id == n_tok and len(module.tokenizer) == n_tok + 1
    assert module.tokenizer.convert_ids_to_tokens(n_tok) == "<MTP>" and module.parts.vocab_size == n_tok + 1
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = module.save_pretrained(tmp_path / "art")
    config = json.loads((out / "mtp_config.json").read_text())
    assert config["weights"] == "full" and config["method"]["mask_token_id"] == n_tok
    loaded = MTPModule.from_pretrained(out)
    assert loaded.method_config.mask_token_id == n_tok and len(loaded.tokenizer) == n_tok + 1
    ids = torch.tensor([[5, 17, 40, n_tok, n_tok, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(ids).logits, module.backbone(ids).logits)
    prompt = module.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    for mode in ({"decoding": "confadapt"}, {"decoding": "speculative"}):
        assert torch.equal(loaded.generate(prompt, max_new_tokens=12, **mode).sequences,
                           module.generate(prompt, max_new_tokens=12, **mode).sequences)


def test_an_added_mask_row_is_the_exact_mean_of_the_old_rows(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base", tie_word_embeddings=False)
    plain = AutoModelForCausalLM.from_pretrained(base)
    module = MTPModule(str(base), method={"name": "mask_token", "k_max": 4})
    mask_id = module.method_config.mask_token_id
    for old, new in ((plain.get_input_embeddings(), module.backbone.get_input_embeddings()),
                     (plain.get_output_embeddings(), module.backbone.get_output_embeddings())):
        assert new.weight.shape[0] == mask_id + 1 == old.weight.shape[0] + 1
        assert torch.equal(new.weight[:mask_id], old.weight)
        assert torch.equal(new.weight[mask_id], old.weight.float().mean(0).to(old.weight.dtype))  # rebuilt alike on load


def lora_module_with_a_trained_adapter(tmp_path) -> tuple[MTPModule, int]:
    """A LoRA mask-token module on a tiny-math-shaped base whose adapter and mask row moved off their init."""
    base = save_tiny_math_shaped_model(tmp_path / "base")
    module = MTPModule(str(base), method={"name": "mask_token", "k_max": 4}, lora=LORA)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return module, module.method_config.mask_token_id


def test_lora_artefact_round_trips_the_adapter_and_the_mask_row(tmp_path):
    module, mask_id = lora_module_with_a_trained_adapter(tmp_path)
    out = module.save_pretrained(tmp_path / "art")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        whole = [k for k in f.keys() if mask_id + 1 in f.get_slice(k).get_shape()]
    assert whole == []  # the LoRA matrices and the mask's input row only, no resized embedding matrix
    loaded = MTPModule.from_pretrained(out)
    assert loaded.method_config.mask_token_id == mask_id
    ids = torch.tensor([[5, 17, 40, mask_id, mask_id, 8]])  # the trained mask row matters here
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(ids).logits, module.backbone(ids).logits)
    prompt = module.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    assert torch.equal(loaded.generate(prompt, decoding="confadapt", max_new_tokens=12).sequences,
                       module.generate(prompt, decoding="confadapt", max_new_tokens=12).sequences)


def test_merged_lora_decodes_as_the_adapter_does_and_saves_as_a_full_model(tmp_path):
    module, mask_id = lora_module_with_a_trained_adapter(tmp_path)
    art = module.save_pretrained(tmp_path / "art", dtype=torch.bfloat16)
    with safe_open(art / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the adapter is stored in bf16 too
    ids = torch.tensor([[5, 17, 40, mask_id, mask_id, 8]])
    prompt = module.tokenizer("Question: Ann has 4 pens.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = module.backbone(ids).logits
    expected = {mode: module.generate(prompt, decoding=mode, max_new_tokens=12).sequences
                for mode in ("confadapt", "speculative")}
    assert module.merge_lora() is module and module.lora is None
    assert not any("lora_" in n or "trainable_tokens" in n for n, _ in module.backbone.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(module.backbone(ids).logits, before, rtol=1e-4, atol=1e-4)
    for mode, sequences in expected.items():
        assert torch.equal(module.generate(prompt, decoding=mode, max_new_tokens=12).sequences, sequences), mode
    out = module.save_pretrained(tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter").exists()
    assert json.loads((out / "mtp_config.json").read_text())["lora"] is None
    loaded = MTPModule.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(ids).logits, module.backbone(ids).logits)


def test_backbone_without_tokenizer_gets_a_new_row():
    model = make_backbone("gpt2")
    module = MTPModule(model, method="mask_token")
    assert module.method_config.mask_token_id == VOCAB and module.parts.vocab_size == VOCAB + 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "match"),
    [({"k_max": 1}, r"k_max must be an integer >= 2 .* got 1"),
     ({"k_min": 5, "k_max": 4}, r"k_min must be an integer in \[2, k_max=4\], got 5"),
     ({"tau": 0.0}, r"tau must be a number in \(0, 1\], got 0.0"),
     ({"tau": 1.5}, r"tau must be a number in \(0, 1\], got 1.5"),
     ({"loss": "mse"}, r"loss must be one of \['hard', 'soft'\], got 'mse'"),
     ({"num_speculative_tokens": 16}, r"num_speculative_tokens must be an integer in \[1, k_max - 1 = 15\], got 16"),
     ({"decoding": "beam"}, r"decoding must be one of \['confadapt', 'static', 'speculative'\], got 'beam'"),
     ({"mask_token_id": -3}, r"mask_token_id must be a token id >= 0 or None, got -3"),
     ({"ntp_weight": -1.0}, r"ntp_weight must be a number >= 0, got -1.0"),
     ({"teacher": "ema"}, r"teacher must be one of \['auto', 'copy'\], got 'ema'"),
     ({"teacher_dtype": "int8"}, r"teacher_dtype must be a floating torch dtype name .* got 'int8'")],
)
def test_bad_config_values_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        MaskToken(**options)


def test_mask_id_outside_the_vocabulary_or_an_ordinary_token_is_refused(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    with pytest.raises(ValueError, match=r"mask_token_id 999 is outside the vocabulary: the backbone has 617 "
                                         r"embedding rows \(valid ids 0..616, or 617 to add a '<MTP>' row"):
        MTPModule(str(base), method={"name": "mask_token", "mask_token_id": 999})
    with pytest.raises(ValueError, match=r"mask_token_id 40 is the ordinary token '.*' of the tokenizer"):
        MTPModule(str(base), method={"name": "mask_token", "mask_token_id": 40})


def test_tokenizer_with_a_clashing_special_token_is_refused(tmp_path):
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_tokens(["<MTP>"], special_tokens=True)
    model = make_backbone("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match=rf"the tokenizer already has a token '<MTP>' \(id {len(tok) - 1}\): pass "
                                         rf"mask_token_id={len(tok) - 1}"):
        MaskToken().prepare_backbone(model, tok)


def test_lossy_modes_refuse_batches_and_unknown_options(trained):
    module = trained("llama")
    ids, mask = left_padded(PROMPTS[:2])
    with pytest.raises(ValueError, match="decodes one sequence at a time"):
        module.generate(ids, attention_mask=mask, decoding="confadapt")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tau'\] for mask_token decoding 'static'"):
        module.generate(ids[:1], decoding="static", k=2, tau=0.5)
    with pytest.raises(ValueError, match="'static' needs k"):
        module.generate(ids[:1], decoding="static")
    with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\], got 2"):
        module.generate(ids[:1], decoding="confadapt", tau=2)
    with pytest.raises(ValueError, match="one sequence at a time"):
        conf_adapt_generate(module.backbone, ids, mask_token_id=VOCAB, k=2, tau=0.9)
