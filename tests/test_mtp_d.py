"""MTP-D: heads, loss (CE + stop-gradient distillation), looped extension, drafting, decoding and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, VOCAB, greedy_batch, make_backbone, train_method, training_prompts
from helpers import save_tiny_math_shaped_model

from lightning_mtp import MTPD, MTPModule, extend_heads
from lightning_mtp.decoding.tree import TreeShape
from lightning_mtp.methods.mtp_d import distillation_kl

PROMPTS = [[5], [8, 60, 48], [4, 32, 56, 9], list(range(20, 31))]
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained_mtpd():
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = train_method(make_backbone(arch), {"name": "mtp_d", "num_heads": 4}, steps=40)
        return cache[arch]

    return get


def hf_greedy(model, ids, n=MAX_NEW):
    return model.generate(ids, do_sample=False, max_new_tokens=n)


# ---------------------------------------------------------------- config


def test_config_defaults_follow_the_paper():
    cfg = MTPD()
    assert cfg.num_heads == cfg.num_draft_tokens == 4
    assert cfg.per_head("beta") == [1.0] * 4 and cfg.per_head("alpha") == [1.0] * 4
    module = MTPModule(make_backbone("llama"), method="mtp_d")
    assert module.method.top_n == VOCAB  # the paper's 10,000, capped at this tiny vocabulary
    assert len({id(h) for h in module.method.heads}) == 4  # four modules, not one shared four times
    assert MTPD(beta=[0.0, 0.5, 1.0, 1.0]).per_head("beta") == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_heads": 0}, r"num_heads \(K\) must be an integer >= 1, got 0"),
        ({"num_heads": 2.5}, r"num_heads \(K\) must be an integer >= 1, got 2.5"),
        ({"beta": -1.0}, r"beta must be >= 0"),
        ({"alpha": [1.0, 1.0]}, r"alpha has 2 values for 4 heads"),
        ({"top_n": 0}, r"top_n must be an integer >= 1 or None, got 0"),
        ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        ({"kl_direction": "sideways"}, r"kl_direction must be 'forward' or 'reverse', got 'sideways'"),
        ({"frozen_heads": 4}, r"frozen_heads must be in \[0, num_heads=4\), got 4"),
    ],
)
def test_bad_config_values_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        MTPD(**options)


def test_top_n_larger_than_the_vocabulary():
    with pytest.raises(ValueError, match=r"mtp_d top_n 100 exceeds the backbone's vocabulary \(64\)"):
        MTPModule(make_backbone("llama"), method={"name": "mtp_d", "top_n": 100})


# ---------------------------------------------------------------- loss


def test_distillation_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g)
    assert distillation_kl(teacher, teacher, 20).abs() < 1e-6
    full = distillation_kl(student, teacher, 20)
    assert full > 0
    # top-N: only the teacher's N largest logits count, renormalised: the same as slicing them out by hand
    idx = teacher.topk(4, dim=-1).indices
    by_hand = distillation_kl(student.gather(-1, idx), teacher.gather(-1, idx), 4)
    torch.testing.assert_close(distillation_kl(student, teacher, 4), by_hand)
    assert distillation_kl(student, teacher, 4, direction="reverse") != distillation_kl(student, teacher, 4)
    # temperature**2 scaling: a hot KL is scaled back up
    hot = distillation_kl(student, teacher, 20, temperature=2.0)
    plain = distillation_kl(student / 2, teacher / 2, 20)
    torch.testing.assert_close(hot, 4 * plain)


def test_the_main_head_gets_no_gradient_from_distillation():
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "mtp_d", "alpha": 0.0, "beta": 1.0})
    batch = greedy_batch(model, training_prompts(4), 8)
    with torch.no_grad():
        hidden = model(batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    logits = model(batch["input_ids"]).logits.detach().requires_grad_(True)  # stands for the main head's output
    loss, logs = module.method.loss(module.parts, batch["input_ids"], batch["labels"], hidden, logits)
    assert loss > 0 and "kl_1" in logs and "ce_1" in logs
    (grad,) = torch.autograd.grad(loss, logits, allow_unused=True)
    assert grad is None  # stop-gradient: the teacher's logits are detached
    head_grads = torch.autograd.grad(loss, list(module.method.heads[0].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in head_grads)  # ...while the student learns


def test_beta_zero_is_plain_multi_head_mtp():
    model = make_backbone("qwen3")
    batch = greedy_batch(model, training_prompts(4), 8)
    plain = MTPModule(model, method={"name": "mtp_d", "beta": 0.0})
    distilled = MTPModule(model, method={"name": "mtp_d", "beta": 1.0})
    distilled.method.load_state_dict(plain.method.state_dict())
    plain.train(), distilled.train()
    loss_plain, logs_plain = plain.method.training_loss(plain.context, batch)
    loss_kd, logs_kd = distilled.method.training_loss(distilled.context, batch)
    assert not any(key.startswith("kl_") for key in logs_plain)
    ce = sum(logs_plain[f"ce_{k}"] for k in range(1, 5))
    torch.testing.assert_close(loss_plain, ce)
    torch.testing.assert_close(loss_kd, ce + sum(logs_kd[f"kl_{k}"] for k in range(1, 5)))


def test_joint_training_trains_the_backbone_and_tracks_the_main_head():
    model = make_backbone("llama")
    module = MTPModule(model, method="mtp_d", freeze_backbone=False)
    batch = greedy_batch(model, training_prompts(4), 8)
    module.train()
    loss, logs = module.method.training_loss(module.context, batch)
    assert "ntp_loss" in logs  # the backbone's own CE joins the loss
    loss.backward()
    assert all(p.grad is not None for p in module.backbone.parameters() if p.requires_grad)
    module.eval()
    _, logs = module.method.training_loss(module.context, batch)
    assert {"main_ce", "main_acc"} <= set(logs)


# ---------------------------------------------------------------- drafting


def head_logits_after(module, seq: torch.Tensor, after: list[int]) -> torch.Tensor:
    """Head ``len(after) - 1``'s logits (V,) at the last position of ``seq`` when the tokens after it are ``after``
    (the next token, then drafts), from heads run teacher-forced over the whole sequence: what a head computes in
    training. The cached drafter must reproduce it exactly."""
    parts, method = module.parts, module.method
    T = seq.shape[1]
    ext = seq[0].tolist() + after + [0] * VOCAB
    with torch.no_grad():
        h = module.backbone(seq, output_hidden_states=True).hidden_states[-1]  # (1, T, H)
        for j, head in enumerate(method.heads[: len(after)]):
            ids = torch.tensor([ext[j + 1 : j + 1 + T]])  # token i + j + 1 at each position i
            h = head(parts, h, ids, torch.arange(T)[None])
    return method.logits(parts, head, h)[0, -1]


def reference_drafts(module, seq: torch.Tensor, nxt: int) -> list[int]:
    """The heads' greedy chain after ``seq`` and its next token ``nxt``, each head fed the drafts before it."""
    after = [nxt]
    for _ in module.method.heads:
        after.append(int(head_logits_after(module, seq, after).argmax()))
    return after[1:]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("num_heads", [4, 7])
def test_drafter_reproduces_teacher_forced_heads_over_many_steps(arch, num_heads):
    model = make_backbone(arch)
    module = MTPModule(model, method={"name": "mtp_d", "num_heads": num_heads}).eval()
    g = torch.Generator().manual_seed(1)
    for prompt_len in (1, 2, 6):  # a 1-token prompt: the later heads have nothing committed at first
        seq = torch.randint(4, VOCAB, (1, prompt_len), generator=g)
        drafter = module.method.drafter(module.parts)
        new, hidden_from = seq, 0
        for _ in range(6):  # every step commits 1..K+1 tokens, as verify steps do
            nxt = int(torch.randint(4, VOCAB, (1,), generator=g))
            with torch.no_grad():
                hidden = model(seq, output_hidden_states=True).hidden_states[-1][:, hidden_from:]
            next_ids = torch.cat([new[:, 1:], torch.tensor([[nxt]])], dim=1)  # the token after each new position
            with torch.no_grad():
                drafts, _ = drafter.draft(hidden, next_ids, num_heads)
            assert drafts[0].tolist() == reference_drafts(module, seq, nxt)
            n = int(torch.randint(1, num_heads + 2, (1,), generator=g))
            new = torch.cat([torch.tensor([[nxt]]), torch.randint(4, VOCAB, (1, n - 1), generator=g)], dim=1)
            hidden_from = seq.shape[1]
            seq = torch.cat([seq, new], dim=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heads_past_a_short_chain_wait_and_catch_up_exactly(arch):
    """Chains of changing length (an adaptive schedule's): the heads a chain does not reach do not run, and when a
    longer chain needs them they catch up on every position they missed, drafting what teacher forcing gives."""
    model = make_backbone(arch)
    module = MTPModule(model, method={"name": "mtp_d", "num_heads": 4}).eval()
    calls = [0] * 4
    for j, head in enumerate(module.method.heads):
        head.register_forward_hook(lambda *args, j=j: calls.__setitem__(j, calls[j] + 1))
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(4, VOCAB, (1, 3), generator=g)
    drafter = module.method.drafter(module.parts)
    new, hidden_from = seq, 0
    for k in (1, 1, 2, 1, 4, 1, 1, 1, 3, 4):
        nxt = int(torch.randint(4, VOCAB, (1,), generator=g))
        with torch.no_grad():
            hidden = model(seq, output_hidden_states=True).hidden_states[-1][:, hidden_from:]
            next_ids = torch.cat([new[:, 1:], torch.tensor([[nxt]])], dim=1)
            expected = reference_drafts(module, seq, nxt)[:k]  # runs the heads too: counted before the draft
            before = list(calls)
            drafts, _ = drafter.draft(hidden, next_ids, k)
        assert drafts[0].tolist() == expected
        assert [c - b for c, b in zip(calls, before, strict=True)] == [1] * k + [0] * (4 - k)  # one call per head used
        n = int(torch.randint(1, 3, (1,), generator=g))
        new = torch.cat([torch.tensor([[nxt]]), torch.randint(4, VOCAB, (1, n - 1), generator=g)], dim=1)
        hidden_from = seq.shape[1]
        seq = torch.cat([seq, new], dim=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tree_node_proposes_what_the_heads_give_over_its_own_path(arch):
    """Every node's children (best first) are the top tokens of head d run over that node's own path, as teacher
    forcing gives them, step after step, with chain steps in between sharing the heads' caches."""
    model = make_backbone(arch)
    module = MTPModule(model, method={"name": "mtp_d", "num_heads": 4}).eval()
    g = torch.Generator().manual_seed(2)
    for prompt_len in (1, 6):  # a 1-token prompt: the later heads have nothing committed at first
        seq = torch.randint(4, VOCAB, (1, prompt_len), generator=g)
        drafter = module.method.drafter(module.parts)
        new, hidden_from = seq, 0
        for step in range(4):
            nxt = int(torch.randint(4, VOCAB, (1,), generator=g))
            with torch.no_grad():
                hidden = model(seq, output_hidden_states=True).hidden_states[-1][:, hidden_from:]
                next_ids = torch.cat([new[:, 1:], torch.tensor([[nxt]])], dim=1)
                if step == 2:  # a chain step between tree steps
                    assert drafter.draft(hidden, next_ids, 2)[0][0].tolist() == reference_drafts(module, seq, nxt)[:2]
                else:
                    tree = drafter.draft_tree(hidden, next_ids, 4, TreeShape("static"))
                    assert tree.depth == 4
                    for node, children in tree.children().items():
                        path, parent = [], node
                        while parent >= 0:
                            path.insert(0, int(tree.tokens[parent]))
                            parent = tree.parents[parent]
                        best = head_logits_after(module, seq, [nxt, *path]).topk(len(children)).indices.tolist()
                        assert tree.tokens[children].tolist() == best, (node, path)
            n = int(torch.randint(1, 4, (1,), generator=g))
            new = torch.cat([torch.tensor([[nxt]]), torch.randint(4, VOCAB, (1, n - 1), generator=g)], dim=1)
            hidden_from = seq.shape[1]
            seq = torch.cat([seq, new], dim=1)


def test_batched_drafter_matches_each_row_alone():
    """Left padding at the prefill, then rows committing different numbers of tokens (holes in the caches)."""
    model = make_backbone("llama")
    module = MTPModule(model, method={"name": "mtp_d", "num_heads": 4}).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(4, VOCAB, (1, n), generator=g) for n in (1, 3, 6)]
    B, width = len(seqs), max(s.shape[1] for s in seqs)
    drafter = module.method.drafter(module.parts)
    # prefill: left-padded rows, hidden states of the real tokens only
    hidden = torch.zeros(B, width, module.parts.hidden_size)
    next_ids = torch.zeros(B, width, dtype=torch.long)
    valid = torch.zeros(B, width, dtype=torch.bool)
    nxts = [int(torch.randint(4, VOCAB, (1,), generator=g)) for _ in seqs]
    with torch.no_grad():
        for b, s in enumerate(seqs):
            n = s.shape[1]
            hidden[b, width - n :] = model(s, output_hidden_states=True).hidden_states[-1][0]
            next_ids[b, width - n :] = torch.cat([s[0, 1:], torch.tensor([nxts[b]])])
            valid[b, width - n :] = True
        drafts, _ = drafter.draft(hidden, next_ids, 4, valid=valid)
    for b, s in enumerate(seqs):
        assert drafts[b].tolist() == reference_drafts(module, s, nxts[b]), b
    for _ in range(5):  # verify steps: each row commits its own number of tokens (columns past it are garbage)
        counts = [int(torch.randint(1, 6, (1,), generator=g)) for _ in seqs]
        width = max(counts)
        hidden = torch.randn(B, width, module.parts.hidden_size)  # garbage where not valid
        next_ids = torch.randint(4, VOCAB, (B, width), generator=g)
        valid = torch.arange(width)[None] < torch.tensor(counts)[:, None]
        new_nxts = []
        with torch.no_grad():
            for b, s in enumerate(seqs):
                chunk = torch.cat([torch.tensor([[nxts[b]]]), torch.randint(4, VOCAB, (1, counts[b] - 1), generator=g)], 1)
                new_nxts.append(int(torch.randint(4, VOCAB, (1,), generator=g)))
                full = torch.cat([s, chunk], dim=1)
                hidden[b, : counts[b]] = model(full, output_hidden_states=True).hidden_states[-1][0, s.shape[1] :]
                next_ids[b, : counts[b]] = torch.cat([chunk[0, 1:], torch.tensor([new_nxts[b]])])
                seqs[b] = full
            drafts, _ = drafter.draft(hidden, next_ids, 4, valid=valid)
        nxts = new_nxts
        for b, s in enumerate(seqs):
            assert drafts[b].tolist() == reference_drafts(module, s, nxts[b]), b
    drafter.select(torch.tensor([0, 2]))  # a row finishes: the others go on unchanged
    assert all(c.layers[0].keys.shape[0] == 2 for c in drafter.caches)


# ---------------------------------------------------------------- lossless decoding


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_with_random_and_trained_heads(arch, trained_mtpd):
    random_heads = MTPModule(make_backbone(arch), method="mtp_d")
    trained = trained_mtpd(arch)
    for module in (random_heads, trained):
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            assert module.generate(ids, max_new_tokens=MAX_NEW).sequences.tolist() == hf_greedy(module.backbone, ids).tolist()
    taus = [trained.generate(p, max_new_tokens=MAX_NEW).stats.tokens_per_forward for p in training_prompts()[:6]]
    assert sum(taus) / len(taus) > 1.5, taus  # the trained heads' drafts are accepted


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_trained_heads_decode_trees_losslessly_and_accept_more_than_chains(arch, trained_mtpd):
    module = trained_mtpd(arch)
    tree = {"kind": "dynamic", "depth": 4, "top_k": 3, "total_tokens": 12}
    chain_tau, tree_tau = [], []
    for ids in [torch.tensor([p]) for p in PROMPTS] + training_prompts()[:4]:
        out = module.generate(ids, max_new_tokens=MAX_NEW, tree=tree)
        assert out.sequences.tolist() == hf_greedy(module.backbone, ids).tolist()
        tree_tau.append(out.stats.tokens_per_forward)
        chain_tau.append(module.generate(ids, max_new_tokens=MAX_NEW).stats.tokens_per_forward)
    assert sum(tree_tau) > sum(chain_tau), (tree_tau, chain_tau)


def test_batched_greedy_equals_each_row_alone(trained_mtpd):
    module = trained_mtpd("qwen3")
    prompts = [p[0].tolist() for p in training_prompts()[:3]] + PROMPTS
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    # rows' chains ending at different heads (unconfident positions, EOS): -1 tails in the batch
    short = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, draft_confidence_threshold=0.3)
    for row, prompt in enumerate(prompts):
        alone = hf_greedy(module.backbone, torch.tensor([prompt]))[0, len(prompt) :].tolist()
        assert out.sequences[row, n:].tolist()[: len(alone)] == alone, prompt
        assert short.sequences[row, n:].tolist()[: len(alone)] == alone, prompt
    assert out.stats.tokens_per_forward > 1.3
    assert 0 < sum(short.stats.reached) < sum(out.stats.reached)
    # the heads' confidence predicts acceptance: the drafts still verified are accepted more often
    assert short.stats.acceptance_per_position[0] > out.stats.acceptance_per_position[0]


def test_more_drafts_than_heads_is_refused():
    module = MTPModule(make_backbone("llama"), method={"name": "mtp_d", "num_heads": 2})
    with pytest.raises(ValueError, match=r"mtp_d has 2 heads, so it drafts at most 2 tokens per step; got num_draft_tokens=3"):
        module.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=8, num_draft_tokens=3)


# ---------------------------------------------------------------- looped extension


def test_extension_copies_heads_and_trains_only_the_new_ones(trained_mtpd):
    four = trained_mtpd("llama")
    eight = extend_heads(four, 8)
    assert eight.num_draft_tokens == 8 and eight.method_config.frozen_heads == 4
    for i, head in enumerate(eight.method.heads):  # head 4 + i starts as a copy of head i
        for a, b in zip(head.state_dict().values(), four.method.heads[i % 4].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    trainable = {n for n, p in eight.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("method.heads.4.", "method.heads.5.", "method.heads.6.", "method.heads.7."))
                             for n in trainable)
    before = {k: v.clone() for k, v in eight.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in eight.parameters() if p.requires_grad], lr=1e-2)
    eight.train()
    eight.training_step(greedy_batch(eight.backbone, training_prompts(4), 12), 0).backward()
    optimizer.step()
    after = eight.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("method.heads.") and int(k.split(".")[2]) >= 4 for k in changed)
    for prompt in PROMPTS:  # the training-free loop decodes losslessly too
        ids = torch.tensor([prompt])
        assert eight.generate(ids, max_new_tokens=MAX_NEW).sequences.tolist() == hf_greedy(eight.backbone, ids).tolist()


def saved_four_heads(tmp_path):
    """A tiny-math-shaped base, a 4-head mtp_d module whose heads moved off their init, and its saved artefact."""
    base = save_tiny_math_shaped_model(tmp_path / "base")
    four = MTPModule(str(base), method="mtp_d")
    with torch.no_grad():
        for p in four.method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return base, four, four.save_pretrained(tmp_path / "mtpd4")


def test_recipe_style_extension_from_a_saved_artefact(tmp_path):
    base, four, art = saved_four_heads(tmp_path)
    eight = MTPModule(str(base), method={"name": "mtp_d", "num_heads": 8, "frozen_heads": 4, "init_from": str(art)})
    expected = extend_heads(four, 8)
    for a, b in zip(eight.method.state_dict().values(), expected.method.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved = eight.save_pretrained(tmp_path / "mtpd8")
    assert json.loads((saved / "mtp_config.json").read_text())["method"]["init_from"] is None  # the heads are saved
    loaded = MTPModule.from_pretrained(saved)
    for a, b in zip(eight.method.state_dict().values(), loaded.method.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_extensions(tmp_path, trained_mtpd):
    with pytest.raises(ValueError, match=r"the model has 4 heads; extend to more than that, got 3"):
        extend_heads(trained_mtpd("llama"), 3)
    fast = MTPModule(make_backbone("llama"), method="fast_mtp")
    with pytest.raises(ValueError, match=r"extend_heads needs an mtp_d model, got method 'fast_mtp'"):
        extend_heads(fast, 8)
    base = save_tiny_math_shaped_model(tmp_path / "base")
    art = MTPModule(str(base), method="mtp_d").save_pretrained(tmp_path / "mtpd")
    with pytest.raises(ValueError, match=r"init_from .* was trained on a base with vocab \d+ and hidden size 32, but this "
                                         r"backbone has vocab 64 and hidden size 32"):
        MTPModule(make_backbone("llama"), method={"name": "mtp_d", "init_from": str(art)})
    fast_art = MTPModule(str(base), method="fast_mtp").save_pretrained(tmp_path / "fast")
    with pytest.raises(ValueError, match=r"holds method 'fast_mtp', not 'mtp_d'"):
        MTPModule(str(base), method={"name": "mtp_d", "init_from": str(fast_art)})


def test_heads_for_a_different_hidden_size_are_refused(tmp_path):
    base = save_tiny_math_shaped_model(tmp_path / "base")
    art = MTPModule(str(base), method="mtp_d").save_pretrained(tmp_path / "mtpd")
    other = make_backbone("llama", hidden_size=48, vocab_size=len(MTPModule(str(base), method=None).tokenizer))
    with pytest.raises(ValueError, match=r"trained on a base with vocab \d+ and hidden size 32, but the backbone"):
        MTPModule.from_pretrained(art, backbone=other)


def test_a_looped_extension_of_a_zoo_entry_stores_only_its_trained_heads(tmp_path, monkeypatch):
    """init_from a zoo name: the frozen heads are that entry's, read again on load and checked by checksum."""
    from lightning_mtp import zoo, zoo_index

    base, four, art = saved_four_heads(tmp_path)
    monkeypatch.setattr(zoo_index, "_registered", {})  # the registrations live in the index
    zoo.register({"name": "my-mtpd4", "description": "test", "base_model": {"path": str(base)},
                  "method": {"name": "mtp_d"}, "weights": {"format": "artifact", "path": str(art)},
                  "license": "apache-2.0", "source": {"notes": "test"}})
    eight = MTPModule(str(base), method={"name": "mtp_d", "num_heads": 8, "frozen_heads": 4, "init_from": "my-mtpd4"})
    with torch.no_grad():  # stands in for training the new heads
        for p in eight.method.heads[4:].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = eight.save_pretrained(tmp_path / "mtpd8")
    config = json.loads((saved / "mtp_config.json").read_text())["method"]
    assert config["init_from"] == "my-mtpd4" and len(config["init_from_sha256"]) == 64
    from safetensors import safe_open

    with safe_open(saved / "mtp_method.safetensors", "pt") as f:
        assert {int(k.split(".")[1]) for k in f.keys()} == {4, 5, 6, 7}
    loaded = MTPModule.from_pretrained(saved)
    for (name, a), b in zip(eight.method.state_dict().items(), loaded.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([PROMPTS[2]])
    assert loaded.generate(ids, max_new_tokens=MAX_NEW).sequences.tolist() == hf_greedy(loaded.backbone, ids).tolist()

    with torch.no_grad():  # the entry's heads change: the saved model no longer holds its frozen heads
        for p in four.method.parameters():
            p.add_(1.0)
    four.save_pretrained(art)
    with pytest.raises(ValueError, match=r"init_from 'my-mtpd4': its head weights changed since this model was saved"):
        MTPModule.from_pretrained(saved)

    by_path = MTPModule(str(base), method={"name": "mtp_d", "num_heads": 8, "frozen_heads": 4, "init_from": str(art)})
    saved = by_path.save_pretrained(tmp_path / "by-path")  # a directory is not portable: every head is stored
    assert json.loads((saved / "mtp_config.json").read_text())["method"]["init_from"] is None
    with safe_open(saved / "mtp_method.safetensors", "pt") as f:
        assert {int(k.split(".")[1]) for k in f.keys()} == set(range(8))
