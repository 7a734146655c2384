"""Property tests of the lossless decoder (hypothesis): for random tiny backbones, prompts and draft proposals,
including adversarial ones that are always right or always wrong, greedy speculative output equals the backbone's
own greedy output, alone and in left-padded batches, and the decode statistics are consistent."""

from __future__ import annotations

import functools

import torch
from conftest import EOS, VOCAB, make_backbone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_mtp.decoding.speculative import speculative_generate
from lightning_mtp.methods.base import Drafter

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
POLICIES = ("right", "wrong", "random", "corrupted")


@functools.cache
def backbone(arch: str, seed: int):
    return make_backbone(arch, seed=seed)


class StubDrafter(Drafter):
    """Proposes ``k`` tokens per row by ``policy``: the backbone's own greedy continuation (``right``), that plus one
    (``wrong``: never the argmax), tokens from ``table`` (``random``), or the right ones with the positions ``flips``
    marks replaced by wrong ones (``corrupted``). Tracks each row's committed tokens the way the decoder reports
    them (``next_ids`` where ``valid``), and follows rows leaving the batch (:meth:`select`)."""

    def __init__(self, model, input_ids, attention_mask, policy: str, table: list[int], flips: list[bool]) -> None:
        self.model, self.policy, self.table, self.flips = model, policy, table, flips
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        self.seqs = [row[mask][:1].tolist() for row, mask in zip(input_ids, real, strict=True)]  # first real token
        self.calls = 0
        self.proposed = 0

    def select(self, rows: torch.Tensor) -> None:
        self.seqs = [self.seqs[i] for i in rows.tolist()]

    @torch.no_grad()
    def greedy(self, seq: list[int], k: int) -> list[int]:
        ids = torch.tensor([seq])
        for _ in range(k):
            ids = torch.cat([ids, self.model(ids).logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, -k:].tolist()

    def draft(self, hidden, next_ids, k, probs_fn=None, generator=None, valid=None, appended=None):
        rows = []
        for i, seq in enumerate(self.seqs):
            cols = next_ids[i] if valid is None else next_ids[i][valid[i]]
            seq.extend(cols.tolist())
            if self.policy == "random":
                row = [self.table[(self.calls * k + j) % len(self.table)] for j in range(k)]
            else:
                row = self.greedy(seq, k)
                if self.policy == "wrong":
                    row = [(t + 1) % VOCAB for t in row]
                elif self.policy == "corrupted":
                    flips = [self.flips[(self.calls * k + j) % len(self.flips)] for j in range(k)]
                    row = [(t + 1) % VOCAB if f else t for t, f in zip(row, flips, strict=True)]
            rows.append(row)
        self.calls += 1
        self.proposed += len(rows) * k
        return torch.tensor(rows, dtype=torch.long), None  # (B, k)


def hf_greedy_row(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The backbone's own greedy continuation of one prompt, cut after EOS."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)[0, len(prompt):]
    new = out.tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def check_stats(stats, proposed: int, k: int) -> None:
    assert stats.tokens_per_forward >= 1.0
    assert len(stats.accepted) == len(stats.reached) == k
    assert all(0 <= a <= r <= stats.draft_steps for a, r in zip(stats.accepted, stats.reached, strict=True))
    assert all(stats.reached[j + 1] <= stats.accepted[j] for j in range(k - 1))  # position j+1 needs j accepted
    assert sum(stats.accepted) <= proposed and stats.draft_steps <= proposed  # a step drafts 1..k (budget)
    assert stats.new_tokens <= stats.sequences + (stats.row_forwards - stats.sequences) * (k + 1)


prompts = st.lists(st.integers(4, VOCAB - 1), min_size=1, max_size=10)
common = dict(
    arch=st.sampled_from(["llama", "qwen3", "gpt2", "mistral"]),
    seed=st.integers(0, 3),
    k=st.integers(1, 4),
    max_new_tokens=st.integers(1, 14),
    policy=st.sampled_from(POLICIES),
    table=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    flips=st.lists(st.booleans(), min_size=1, max_size=8),
)


@SETTINGS
@given(prompt=prompts, **common)
def test_greedy_speculative_equals_the_backbone_for_any_drafts(prompt, arch, seed, k, max_new_tokens, policy, table,
                                                               flips):
    model = backbone(arch, seed)
    ids = torch.tensor([prompt])
    drafter = StubDrafter(model, ids, None, policy, table, flips)
    out = speculative_generate(model, ids, drafter=drafter, num_draft_tokens=k, max_new_tokens=max_new_tokens)
    expected = hf_greedy_row(model, prompt, max_new_tokens)
    assert out.sequences[0].tolist() == prompt + expected
    stats = out.stats
    assert stats.new_tokens == len(expected) and stats.sequences == 1
    check_stats(stats, drafter.proposed, k)
    if policy == "wrong":  # nothing accepted: one token per forward, like plain NTP
        assert stats.accepted == [0] * k and stats.backbone_forwards == stats.new_tokens
    if policy == "right":  # every verified draft accepted (near the budget a step verifies fewer than k)
        assert stats.accepted == stats.reached and stats.accepted[0] == stats.draft_steps


@SETTINGS
@given(batch=st.lists(prompts, min_size=2, max_size=3), **common)
def test_left_padded_batches_decode_each_row_as_alone(batch, arch, seed, k, max_new_tokens, policy, table, flips):
    if arch == "mistral":  # sliding-window layers decode batches row by row (MTPModule.generate); tested elsewhere
        arch = "llama"
    model = backbone(arch, seed)
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # (B, width) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    drafter = StubDrafter(model, ids, mask, policy, table, flips)
    out = speculative_generate(model, ids, drafter=drafter, num_draft_tokens=k, max_new_tokens=max_new_tokens,
                               attention_mask=mask)
    rows = out.sequences[:, width:].tolist()
    for prompt, row in zip(batch, rows, strict=True):
        expected = hf_greedy_row(model, prompt, max_new_tokens)
        assert row[: len(expected)] == expected
        assert all(t == 0 or t == EOS for t in row[len(expected):])  # only padding after a row's end
    assert out.stats.sequences == len(batch)
    assert out.stats.new_tokens == sum(len(hf_greedy_row(model, p, max_new_tokens)) for p in batch)
    check_stats(out.stats, drafter.proposed, k)
    if policy == "wrong":
        assert out.stats.accepted == [0] * k
