"""Lossless speculative decoding: greedy parity with HF generate, EOS and budget cuts, KV-cache rollback,
rejection sampling, decode statistics, and the offset/acceptance helpers they rely on."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, EOS, VOCAB, make_backbone, training_prompts
from transformers import DynamicCache

from lightning_mtp import FastMTP, MTPModule
from lightning_mtp.backbone import cache_kwarg
from lightning_mtp.decoding.sampling import make_probs_fn, rejection_accept
from lightning_mtp.decoding.speculative import speculative_generate
from lightning_mtp.methods.base import DraftChain, Drafter, future_labels, future_tokens
from lightning_mtp.metrics import AcceptanceRate

# prompts of several lengths, some longer than mistral's sliding window (8)
PROMPTS = [[5], [8, 60, 48], [4, 32, 56, 9], [7, 11, 13, 17, 19, 23], list(range(20, 31)), list(range(40, 57))]
MAX_NEW = 24


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)


class OracleDrafter(Drafter):
    """Drafts the backbone's own greedy continuation, from full uncached forwards over the committed sequence.

    ``wrong=True`` shifts every draft by one id, so no draft is ever the backbone's argmax.
    """

    def __init__(self, model, input_ids: torch.Tensor, wrong: bool = False) -> None:
        self.model, self.wrong = model, wrong
        self.seq = input_ids[:, :1]  # the decoder hands over the token after each committed position

    @torch.no_grad()
    def draft(self, hidden, next_ids, k, probs_fn=None, generator=None, valid=None):
        self.seq = torch.cat([self.seq, next_ids], dim=1)  # (1, committed + 1)
        seq = self.seq
        for _ in range(k):
            nxt = self.model(seq).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([seq, nxt], dim=1)
        drafts = seq[:, -k:]  # (1, k)
        return ((drafts + 1) % VOCAB if self.wrong else drafts), None


def oracle_generate(model, ids, k, max_new_tokens, wrong=False):
    drafter = OracleDrafter(model, ids, wrong=wrong)
    return speculative_generate(model, ids, drafter=drafter, num_draft_tokens=k, max_new_tokens=max_new_tokens)


def check_stats(out, prompt_len: int) -> None:
    s = out.stats
    assert s.new_tokens == out.sequences.shape[1] - prompt_len
    assert s.tokens_per_forward >= 1
    assert all(a <= r for a, r in zip(s.accepted, s.reached, strict=True))
    assert all(r <= s.draft_steps for r in s.reached)
    # reaching position j + 1 needs draft j accepted
    assert all(s.reached[j + 1] <= s.accepted[j] for j in range(len(s.reached) - 1))
    # each verify forward emits its accepted drafts plus one token (fewer only at the final EOS/budget cut)
    assert s.new_tokens <= 1 + (s.backbone_forwards - 1) + sum(s.accepted)


# ---------------------------------------------------------------- greedy parity with HF generate


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_with_random_head(arch, tiny_backbone):
    model = tiny_backbone(arch)
    module = MTPModule(model, method="fast_mtp")
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=MAX_NEW)
        assert out.sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist(), prompt
        check_stats(out, ids.shape[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_with_trained_head(arch, trained_fast_mtp):
    module = trained_fast_mtp(arch)
    model = module.backbone
    for prompt in PROMPTS:  # unseen in training: mostly rejected drafts
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=MAX_NEW)
        assert out.sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist(), prompt
        check_stats(out, ids.shape[1])
    taus = []
    for ids in training_prompts()[:6]:  # seen in training: mostly accepted drafts
        out = module.generate(ids, max_new_tokens=MAX_NEW)
        assert out.sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist(), ids
        check_stats(out, ids.shape[1])
        taus.append(out.stats.tokens_per_forward)
    # the head really drafts accepted tokens, so the acceptance paths (and their cache crops) ran
    assert sum(taus) / len(taus) > 1.2, taus


@pytest.mark.parametrize(
    "method",
    [FastMTP(num_steps=1), FastMTP(num_steps=2), FastMTP(num_steps=5), FastMTP(draft_vocab_size=16),
     FastMTP(recurse_on_normed=True)],
    ids=str,
)
def test_greedy_matches_hf_for_any_method_config(method):
    model = make_backbone("mistral")
    module = MTPModule(model, method=method)
    for prompt in PROMPTS[2:]:
        ids = torch.tensor([prompt])
        assert (
            module.generate(ids, max_new_tokens=MAX_NEW).sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist()
        )


def test_greedy_matches_hf_with_mixed_full_and_sliding_layers():
    model = make_backbone("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]  # precondition
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = hf_greedy(model, ids, MAX_NEW)
        assert oracle_generate(model, ids, 3, MAX_NEW).sequences.tolist() == ref.tolist()
        assert (
            MTPModule(model, method="fast_mtp").generate(ids, max_new_tokens=MAX_NEW).sequences.tolist() == ref.tolist()
        )


def test_zero_draft_tokens_is_plain_next_token_decoding(trained_fast_mtp):
    module = trained_fast_mtp("llama")
    ids = torch.tensor([PROMPTS[3]])
    out = module.generate(ids, max_new_tokens=MAX_NEW, num_draft_tokens=0)
    assert out.sequences.tolist() == hf_greedy(module.backbone, ids, MAX_NEW).tolist()
    assert out.stats.backbone_forwards == out.stats.new_tokens
    assert out.stats.draft_steps == 0 and out.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 3])
def test_perfect_drafter_emits_k_plus_one_tokens_per_forward(arch, k):
    model = make_backbone(arch)
    budget = 25  # 1 (prefill) + a multiple of both 2 and 4
    full_runs = 0
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = oracle_generate(model, ids, k, budget)
        assert out.sequences.tolist() == hf_greedy(model, ids, budget).tolist()
        n = out.stats.new_tokens
        # every verify forward keeps all k drafts plus its own token, until EOS or the budget cuts the run
        assert out.stats.backbone_forwards == 1 + math.ceil((n - 1) / (k + 1))
        assert out.stats.accepted == out.stats.reached == [out.stats.draft_steps] * k
        if n == budget:
            assert out.stats.tokens_per_forward == k + 1
            full_runs += 1
    assert full_runs >= 1  # some prompt ran the whole budget without EOS


@pytest.mark.parametrize("arch", ARCHS)
def test_always_wrong_drafter_is_lossless_at_one_token_per_forward(arch):
    model = make_backbone(arch)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = oracle_generate(model, ids, 3, MAX_NEW, wrong=True)
        assert out.sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist()
        assert out.stats.tokens_per_forward == 1.0
        assert out.stats.accepted == [0, 0, 0]
        assert out.stats.backbone_forwards == out.stats.new_tokens


def trusted_reference(model, prompt: list[int], k: int, max_new: int) -> list[int]:
    """What trusting OracleDrafter(wrong=True) must emit, from full forwards: the backbone's token, then the k
    drafts as drafted (each one id off the greedy continuation), again and again, cut at EOS and the budget."""
    seq, out = list(prompt), []

    def greedy_next(tokens):
        return int(model(torch.tensor([tokens])).logits[0, -1].argmax())

    with torch.no_grad():
        while True:
            out.append(greedy_next(seq + out))
            if out[-1] == EOS or len(out) == max_new:
                return out
            cont = []
            for _ in range(k):
                cont.append(greedy_next(seq + out + cont))
            for t in cont:
                out.append((t + 1) % VOCAB)
                if out[-1] == EOS or len(out) == max_new:
                    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_trusted_drafts_are_kept_unverified(arch):
    """``trust_drafts`` (ConfAdapt's mode) keeps every draft, even ones the backbone would never pick."""
    model = make_backbone(arch)
    for prompt in PROMPTS[:4]:
        ids = torch.tensor([prompt])
        drafter = OracleDrafter(model, ids, wrong=True)
        out = speculative_generate(model, ids, drafter=drafter, num_draft_tokens=3, max_new_tokens=MAX_NEW,
                                   trust_drafts=True)
        expected = trusted_reference(model, prompt, 3, MAX_NEW)
        assert out.sequences[0, len(prompt):].tolist() == expected
        assert expected != hf_greedy(model, ids, MAX_NEW)[0, len(prompt):].tolist()  # the wrong drafts are in it
        assert out.stats.accepted == out.stats.reached == [out.stats.draft_steps] * 3  # every draft kept
        # tokens come in blocks [own token, d, d, d], one forward each: every forward drafts after it, except the
        # last when its own token ended the sequence
        ended_on_own_token = len(expected) % 4 == 1
        assert out.stats.backbone_forwards == out.stats.draft_steps + ended_on_own_token


# ---------------------------------------------------------------- where a chain ends: EOS, confidence, budget


def test_draft_chain_ends_rows_after_eos_and_before_unconfident_positions():
    drafter = Drafter()
    drafter.stop_ids, drafter.min_confidence = torch.tensor([EOS]), 0.5
    chain = DraftChain(drafter, 3, torch.device("cpu"))
    sure, unsure = torch.full((3, VOCAB), 0.9), torch.full((3, VOCAB), 0.1)
    assert chain.add(torch.tensor([EOS, 5, 6]), sure)  # row 0 drafted EOS: its chain ends after it
    assert chain.add(torch.tensor([7, 8, 9]), torch.stack([sure[0], sure[1], unsure[2]]))  # row 2 ends before 9
    assert not chain.add(torch.tensor([7, EOS, 9]), sure)  # row 1's EOS ends the last open chain
    assert chain.result()[0].t().tolist() == [[EOS, 5, 6], [-1, 8, -1], [-1, EOS, -1]]
    assert chain.result()[1] is None  # greedy: no probabilities kept
    alone = DraftChain(drafter, 1, torch.device("cpu"))
    assert not alone.add(torch.tensor([4]), unsure[:1])  # no row takes the draft: no column at all
    assert alone.result()[0].shape == (1, 0)
    free = DraftChain(Drafter(), 2, torch.device("cpu"), sampling=True)  # no rules: every draft passes through
    assert free.add(torch.tensor([3, EOS]), unsure[:2]) and free.add(torch.tensor([4, 4]), sure[:2])
    drafts, probs = free.result()
    assert drafts.tolist() == [[3, 4], [EOS, 4]] and probs.shape == (2, 2, VOCAB)


def _always_eos_logits(*args):
    h = args[-1]  # (..., H)
    return torch.nn.functional.one_hot(torch.full(h.shape[:-1], EOS), VOCAB).float()


@pytest.mark.parametrize("method", ["fast_mtp", "mtp_d"])
def test_drafters_stop_their_chain_after_eos(method, monkeypatch):
    module = MTPModule(make_backbone("llama"), method=method)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    hidden = torch.randn(1, 5, module.parts.hidden_size)
    monkeypatch.setattr(module.method, "logits", _always_eos_logits)
    k = 3
    drafter = module.method.drafter(module.parts)
    assert drafter.draft(hidden, ids, k)[0].tolist() == [[EOS] * k]  # no stop ids: the whole chain
    drafter = module.method.drafter(module.parts)
    drafter.stop_ids = torch.tensor([EOS])
    assert drafter.draft(hidden, ids, k)[0].tolist() == [[EOS]]


class RecordingOracle(OracleDrafter):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []

    def draft(self, hidden, next_ids, k, *args, **kwargs):
        self.asked.append(k)
        return super().draft(hidden, next_ids, k, *args, **kwargs)


@pytest.mark.parametrize("max_new_tokens, asked", [(1, []), (2, []), (3, [1]), (5, [3]), (14, [8, 3])])
def test_drafters_are_never_asked_for_more_than_the_budget_can_use(max_new_tokens, asked):
    model = make_backbone("llama")
    ids = torch.tensor([[7, 11, 13, 17, 19, 23]])
    ref = hf_greedy(model, ids, max_new_tokens)
    assert EOS not in ref[0].tolist()  # precondition: the budget ends the run
    drafter = RecordingOracle(model, ids)
    out = speculative_generate(model, ids, drafter=drafter, num_draft_tokens=8, max_new_tokens=max_new_tokens)
    assert out.sequences.tolist() == ref.tolist()
    assert drafter.asked == asked  # the prefill leaves max_new_tokens - 1; each verify keeps one token back


@pytest.mark.parametrize("arch", ARCHS)
def test_long_chains_with_a_confidence_threshold_stay_lossless(arch, trained_fast_mtp):
    module = trained_fast_mtp(arch)  # trained for K = 3; drafts 16 recursively
    model = module.backbone
    reached = {}
    for threshold in (0.0, 0.5, 1.0):
        total = 0
        for ids in [torch.tensor([p]) for p in PROMPTS] + training_prompts()[:4]:
            out = module.generate(ids, max_new_tokens=MAX_NEW, num_draft_tokens=16, draft_confidence_threshold=threshold)
            assert out.sequences.tolist() == hf_greedy(model, ids, MAX_NEW).tolist(), (threshold, ids)
            check_stats(out, ids.shape[1])
            total += sum(out.stats.reached)
        reached[threshold] = total
    # a higher threshold ends chains earlier; at 1.0 hardly any draft is confident enough to be verified
    assert reached[0.0] > reached[0.5] >= reached[1.0]
    assert reached[1.0] < reached[0.0] / 4, reached


# ---------------------------------------------------------------- batches of prompts of different lengths


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask  # (B, n), (B, n)


def new_tokens_per_row(sequences: torch.Tensor, prompt_width: int, eos: int = EOS) -> list[list[int]]:
    """Each row's generated tokens, cut after its EOS (what follows is padding)."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_each_row_decoded_alone(arch, trained_fast_mtp):
    module = trained_fast_mtp(arch)
    model = module.backbone
    # training prompts (long accepted runs) mixed with unseen ones (rejections), different lengths, EOS early in some
    prompts = [p[0].tolist() for p in training_prompts()[:3]] + PROMPTS[1:5]
    ids, mask = left_padded(prompts)
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    assert out.sequences[:, : ids.shape[1]].tolist() == ids.tolist()
    got = new_tokens_per_row(out.sequences, ids.shape[1])
    lengths = set()
    for prompt, row in zip(prompts, got, strict=True):
        alone = hf_greedy(model, torch.tensor([prompt]), MAX_NEW)[0, len(prompt) :].tolist()
        assert row == alone, prompt
        lengths.add(len(row))
    assert len(lengths) > 1  # rows finished at different times
    s = out.stats
    assert s.sequences == len(prompts) and s.new_tokens == sum(len(r) for r in got)
    assert all(a <= r for a, r in zip(s.accepted, s.reached, strict=True))
    assert s.tokens_per_forward > 1.2  # drafts were accepted, unevenly across rows, so the cache had holes
    assert 0 < s.accepted[0] < s.reached[0]
    # long chains that end per row (EOS, unconfident positions): -1 tails of different lengths in the batch
    short = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, num_draft_tokens=12,
                            draft_confidence_threshold=0.6)
    assert new_tokens_per_row(short.sequences, ids.shape[1]) == got
    assert 0 < sum(short.stats.reached)


def test_batched_decoding_matches_batched_hf_generate_layout():
    model = make_backbone("llama")
    module = MTPModule(model, method="fast_mtp")
    ids, mask = left_padded(PROMPTS[:4])
    ours = module.generate(ids, attention_mask=mask, max_new_tokens=10, num_draft_tokens=0).sequences
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert ours.tolist() == hf.tolist()


def test_batched_sampling_is_reproducible_and_each_row_is_a_valid_sample(trained_fast_mtp):
    module = trained_fast_mtp("qwen3")
    ids, mask = left_padded(PROMPTS[2:6])
    runs = [module.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=5,
                            generator=torch.Generator().manual_seed(3)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():  # every emitted token is inside the backbone's top-5 at its position
        for row, prompt in zip(new_tokens_per_row(runs[0], ids.shape[1]), PROMPTS[2:6], strict=True):
            seq = torch.tensor([prompt + row])
            logits = module.backbone(seq).logits[0, len(prompt) - 1 : -1]  # (len(row), V)
            top5 = logits.topk(5, dim=-1).indices
            assert all(t in top for t, top in zip(row, top5.tolist(), strict=True))


def test_sliding_window_batches_decode_row_by_row():
    model = make_backbone("mistral")  # sliding-window cache layers cannot carry the masked holes of a batch
    ids, mask = left_padded(PROMPTS[3:6])
    with pytest.raises(ValueError, match=r"MistralForCausalLM has sliding-window or recurrent cache layers"):
        speculative_generate(model, ids, attention_mask=mask, max_new_tokens=4)
    out = MTPModule(model, method="fast_mtp").generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    for prompt, row in zip(PROMPTS[3:6], new_tokens_per_row(out.sequences, ids.shape[1]), strict=True):
        assert row == hf_greedy(model, torch.tensor([prompt]), MAX_NEW)[0, len(prompt) :].tolist()
    assert out.stats.sequences == 3 and out.stats.backbone_forwards == out.stats.row_forwards


def test_bad_padding_is_refused():
    module = MTPModule(make_backbone("llama"), method="fast_mtp")
    ids, mask = left_padded(PROMPTS[1:3])
    with pytest.raises(ValueError, match=r"padding must be on the left"):
        module.generate(ids, attention_mask=mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 4\), got \(2, 3\)"):
        module.generate(ids, attention_mask=mask[:, 1:], max_new_tokens=4)


# ---------------------------------------------------------------- EOS and the token budget


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_eos_inside_an_accepted_draft_run_stops_like_hf(arch):
    model = make_backbone(arch)
    ids = torch.tensor([[8, 60, 48]])
    ref = hf_greedy(model, ids, MAX_NEW)
    new = ref[0, ids.shape[1] :].tolist()
    # precondition: greedy decoding emits EOS as its 3rd token, i.e. as draft 2 of the first K=3 chain
    assert new == new[:2] + [EOS] and EOS not in new[:2]
    out = oracle_generate(model, ids, 3, MAX_NEW)
    assert out.sequences.tolist() == ref.tolist()
    # the backbone accepted all three drafts (EOS and one past it) and its own token; the run was cut at EOS
    assert out.stats.backbone_forwards == 2
    assert out.stats.accepted == [1, 1, 1]
    assert out.stats.new_tokens == 3


def test_eos_as_the_first_token_stops_after_the_prefill():
    model = make_backbone("qwen3")
    ids = torch.tensor([[23, (23 * 7) % 60 + 4, (23 * 13) % 60 + 4]])
    ref = hf_greedy(model, ids, MAX_NEW)
    assert ref[0, ids.shape[1] :].tolist() == [EOS]  # precondition
    out = MTPModule(model, method="fast_mtp").generate(ids, max_new_tokens=MAX_NEW)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats.backbone_forwards == 1 and out.stats.new_tokens == 1


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4, 5, 7, 9, 13])
def test_max_new_tokens_is_exact(max_new_tokens, trained_fast_mtp):
    module = trained_fast_mtp("llama")  # K = 3
    model = module.backbone
    ids = torch.tensor([[7, 11, 13, 17, 19, 23]])
    ref = hf_greedy(model, ids, max_new_tokens)
    assert ref.shape[1] == ids.shape[1] + max_new_tokens and EOS not in ref[0].tolist()  # precondition
    for out in (module.generate(ids, max_new_tokens=max_new_tokens), oracle_generate(model, ids, 3, max_new_tokens)):
        assert out.sequences.tolist() == ref.tolist()
        assert out.stats.new_tokens == max_new_tokens


# ---------------------------------------------------------------- KV cache rollback


def library_cache(model) -> DynamicCache:
    """The cache speculative_generate builds: sliding-window layers record their past so they can roll back."""
    cache = DynamicCache(config=model.config)
    if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        cache.activate_past_recording()
    return cache


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cache_crop_after_verify_matches_a_full_forward(arch, tiny_backbone):
    model = tiny_backbone(arch)
    K = 3
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(4, VOCAB, (1, 10), generator=g)  # longer than mistral's window of 8
    cache = library_cache(model)
    with torch.no_grad():
        model(seq, **{cache_kwarg(model): cache}, use_cache=True)
        for rejected in [1, 0, 3, 2, 0, 0, 1, 3, 2, 1]:  # 0: every draft accepted, no crop
            step = torch.randint(4, VOCAB, (1, K + 1), generator=g)  # (1, K + 1) token + K drafts
            cached = model(step, **{cache_kwarg(model): cache}, use_cache=True).logits[0]  # (K + 1, V)
            full = model(torch.cat([seq, step], dim=1)).logits[0, -(K + 1) :]  # (K + 1, V)
            torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
            if rejected:
                cache.crop(-rejected)
            seq = torch.cat([seq, step[:, : K + 1 - rejected]], dim=1)
            assert cache.get_seq_length() == seq.shape[1]
    assert seq.shape[1] > 3 * 8  # the window was passed many times over


# ---------------------------------------------------------------- rejection sampling


def assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor, z: float = 3.09) -> None:
    """Pearson chi-square goodness of fit of ``counts`` to ``probs`` at the 0.1% level (z = 3.09).

    Cells expecting fewer than 5 counts are pooled; the critical value is Wilson-Hilferty's approximation.
    """
    n = counts.sum().item()
    observed, expected = counts.double(), probs.double() * n
    small = expected < 5
    if small.any() and expected[small].sum() > 0:
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    else:
        assert observed[small].sum() == 0, "a token of probability 0 was emitted"
        observed, expected = observed[~small], expected[~small]
    stat = ((observed - expected) ** 2 / expected).sum().item()
    df = len(expected) - 1
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat <= critical, (
        f"chi2 {stat:.1f} > {critical:.1f} (df {df}): counts {counts.tolist()} vs probs {probs.tolist()}"
    )


P1 = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
Q1 = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1])
P2 = torch.tensor([0.25, 0.05, 0.4, 0.1, 0.2])
Q2 = torch.tensor([0.05, 0.5, 0.1, 0.05, 0.3])
P3 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])


def test_rejection_sampling_reproduces_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draft_probs = torch.stack([Q1, Q2])  # (K=2, V)
    target = torch.stack([P1, P2, P3])  # (K + 1, V)
    first = torch.zeros(5, dtype=torch.long)
    second = torch.zeros(5, dtype=torch.long)  # given the first draft was kept, the next emitted token
    bonus = torch.zeros(5, dtype=torch.long)  # given both drafts were kept, the backbone's own third token
    outcomes = torch.zeros(3, dtype=torch.long)
    drafts = torch.multinomial(draft_probs, n, replacement=True, generator=g).T  # (n, K) drafts ~ q
    for d in drafts:
        m, nxt = rejection_accept(d, draft_probs, target, g)
        emitted = d[:m].tolist() + [nxt]
        outcomes[m] += 1
        first[emitted[0]] += 1
        if m >= 1:
            second[emitted[1]] += 1
        if m == 2:
            bonus[emitted[2]] += 1
    assert_frequencies_match(first, P1)
    assert_frequencies_match(second, P2)
    assert_frequencies_match(bonus, P3)
    # draft 1 is kept with probability sum_v min(p_1(v), q_1(v)) = 0.55
    assert_frequencies_match(torch.stack([outcomes[0], outcomes[1:].sum()]), torch.tensor([0.45, 0.55]))


def test_rejection_accepts_everything_when_the_drafter_is_the_target():
    g = torch.Generator().manual_seed(0)
    q = torch.stack([Q1, Q2])
    for _ in range(200):
        d = torch.multinomial(q, 1, generator=g)[:, 0]
        m, nxt = rejection_accept(d, q, torch.stack([Q1, Q2, P3]), g)
        assert m == 2


def test_rejection_never_emits_a_token_the_target_rules_out():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.5, 0.0])
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    for d in [0, 3]:
        for _ in range(50):
            m, nxt = rejection_accept(torch.tensor([d]), q, torch.stack([p, p]), g)
            assert m == 0 and nxt in (1, 2)


def exact_two_token_distribution(model, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(V, V) p(t1) * p(t2 | t1) of the backbone alone, by enumerating t1 with full forwards."""
    probs_fn = make_probs_fn(temperature, 1.0, 0)
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = probs_fn(model(ids).logits[0, -1])  # (V,)
        ext = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], dim=1)  # (V, n + 1)
        p2 = probs_fn(model(ext).logits[:, -1])  # (V, V)
    return p1[:, None] * p2


def check_sampling_matches_the_backbone(**options) -> None:
    """Decode two tokens 1000 times with ``options`` (and a random FastMTP head, K = 2, whose drafts are often
    rejected): the pairs' frequencies must fit the backbone's own two-token distribution, with both the accept and
    the reject paths taken."""
    V, temperature, n = 6, 1.3, 1000
    model = make_backbone("llama", seed=2, vocab_size=V)
    model.config.eos_token_id = model.generation_config.eos_token_id = None  # every run emits two tokens
    module = MTPModule(model, method=FastMTP(num_steps=2))
    ids = torch.tensor([[4, 5, 4]])
    counts = torch.zeros(V, V, dtype=torch.long)
    accepted = reached = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        out = module.generate(ids, max_new_tokens=3, do_sample=True, temperature=temperature, generator=g, **options)
        t1, t2 = out.sequences[0, 3:5].tolist()
        counts[t1, t2] += 1
        accepted, reached = accepted + out.stats.accepted[0], reached + out.stats.reached[0]
    assert 0.1 * reached < accepted < 0.9 * reached  # both the accept and the reject paths ran
    assert_frequencies_match(counts.flatten(), exact_two_token_distribution(model, ids, temperature).flatten())


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_sampling_with_drafts_matches_the_backbone_distribution(threshold):
    check_sampling_matches_the_backbone(draft_confidence_threshold=threshold)


def test_sampling_is_reproducible_with_a_seeded_generator():
    module = MTPModule(make_backbone("llama"), method="fast_mtp")
    ids = torch.tensor([[5, 6, 7, 8]])
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        out = module.generate(ids, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(0))
        runs.append(out.sequences.tolist())
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- helpers and metrics


def test_future_tokens_shifts_left_and_fills_past_the_end():
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    assert future_tokens(ids, 0, -1).tolist() == ids.tolist()
    assert future_tokens(ids, 1, -1).tolist() == [[11, 12, 13, -1], [21, 22, 23, -1]]
    assert future_tokens(ids, 3, -100).tolist() == [[13, -100, -100, -100], [23, -100, -100, -100]]
    assert future_tokens(ids, 4, 0).tolist() == [[0] * 4] * 2
    assert future_tokens(ids, 9, 0).tolist() == [[0] * 4] * 2
    assert future_tokens(ids, 1, -1).tolist() == [[11, 12, 13, -1], [21, 22, 23, -1]]  # input not modified
    assert ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23]]


def test_future_labels_never_cross_a_packed_document_boundary():
    labels = torch.tensor([[-100, 11, 12, 13, -100, 21, 22]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])  # two documents: 4 tokens, then 3
    assert future_labels(labels, 1).tolist() == [[11, 12, 13, -100, 21, 22, -100]]
    assert future_labels(labels, 1, position_ids).tolist() == [[11, 12, 13, -100, 21, 22, -100]]
    assert future_labels(labels, 2, position_ids).tolist() == [[12, 13, -100, -100, 22, -100, -100]]
    assert future_labels(labels, 2).tolist() == [[12, 13, -100, 21, 22, -100, -100]]  # unpacked: 21 is 2 ahead


def test_acceptance_rate_metric_by_hand():
    metric = AcceptanceRate(3)
    # columns are samples; rows are draft positions 1..3
    correct = torch.tensor(
        [
            [1, 1, 1, 1, 0, 1],
            [1, 1, 0, 1, 1, 0],
            [1, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    # chains: position 1 right in 5/6; 1-2 right in 3/6 (samples 0, 1, 3); 1-3 right in 2/6 (samples 0, 3)
    metric.update(correct[:, :3])
    metric.update(correct[:, 3:])  # accumulates across updates
    result = metric.compute()
    torch.testing.assert_close(result["cumulative_acceptance"], torch.tensor([5 / 6, 3 / 6, 2 / 6]))
    torch.testing.assert_close(result["acceptance"], torch.tensor([5 / 6, 3 / 5, 2 / 3]))
    torch.testing.assert_close(result["tau"], torch.tensor(1 + 5 / 6 + 3 / 6 + 2 / 6))
    metric.reset()
    metric.update(torch.zeros(3, 4, dtype=torch.bool))
    assert metric.compute()["tau"].item() == 1.0
    with pytest.raises(ValueError, match=r"expected a \(3, N\) tensor, got shape \(2, 4\)"):
        metric.update(torch.zeros(2, 4, dtype=torch.bool))
