"""Draft schedules: the adaptive rule step by step, and the decoder under it (lossless, every committed position
handed to the drafter once, no drafting cost while drafts miss, full chains while they land)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from test_decoding import OracleDrafter

from lightning_mtp import MTPModule
from lightning_mtp.decoding.schedule import MAX_WAIT, DraftSchedule
from lightning_mtp.decoding.speculative import speculative_generate
from lightning_mtp.errors import UserInputError

PROMPT = torch.tensor([[8, 60, 48, 4]])
NEW = 40


def test_constant_schedule_never_moves():
    schedule = DraftSchedule("constant", 3)
    for accepted in ([0], [3], [1], [0]):
        schedule.update([3], accepted)
        assert schedule.length == 3 and schedule.feeds_drafter_next


def test_adaptive_schedule_shrinks_pauses_probes_and_backs_off():
    schedule = DraftSchedule("adaptive", 3)
    lengths = []
    for _ in range(3):  # every draft misses: 3 -> 2 -> 1 -> 0
        schedule.update([schedule.length], [0])
        lengths.append(schedule.length)
    assert lengths == [2, 1, 0]
    waits = []
    for _ in range(8):  # each probe misses: the pause before the next one doubles
        plain = 0
        while schedule.length == 0:
            assert schedule.feeds_drafter_next == (schedule.idle + 1 >= schedule.wait)
            schedule.update([0], [0])
            plain += 1
        waits.append(plain)
        assert schedule.length == 1
        schedule.update([1], [0])  # the probe misses
    assert waits == [min(MAX_WAIT, 2**i) for i in range(8)]
    plain = 0
    while schedule.length == 0:
        schedule.update([0], [0])
        plain += 1
    schedule.update([1], [1])  # a probe lands: the chain grows, the pause is short again
    assert schedule.length == 2 and schedule.wait == 1
    schedule.update([2], [1])  # some kept: stays
    assert schedule.length == 2
    schedule.update([2], [2])
    schedule.update([3], [3])  # never past the length asked for
    assert schedule.length == 3


def test_adaptive_schedule_in_a_batch_moves_on_what_all_rows_did():
    schedule = DraftSchedule("adaptive", 3)
    schedule.update([3, 3], [0, 3])  # one row kept its chain: no shrink
    assert schedule.length == 3
    schedule.update([3, 0], [0, 0])  # the row without drafts says nothing
    assert schedule.length == 2


def test_unknown_schedule_is_refused():
    with pytest.raises(UserInputError, match=r"unknown draft_schedule 'fast'; choose one of \['adaptive', 'constant'\]"):
        DraftSchedule("fast", 3)
    model = make_backbone("llama")
    with pytest.raises(UserInputError, match="unknown draft_schedule"):
        MTPModule(model, method="fast_mtp").generate(PROMPT, max_new_tokens=4, draft_schedule="fast")


def test_the_schedule_comes_from_the_decoding_defaults_of_an_artefact():
    module = MTPModule(make_backbone("llama"), method="fast_mtp")
    module.decoding_defaults = {"draft_schedule": "constant"}
    by_default = module.generate(PROMPT, max_new_tokens=NEW).stats
    constant = module.generate(PROMPT, max_new_tokens=NEW, draft_schedule="constant").stats
    adaptive = module.generate(PROMPT, max_new_tokens=NEW, draft_schedule="adaptive").stats
    assert by_default.draft_steps == constant.draft_steps > adaptive.draft_steps  # random heads: drafts miss
    module.decoding_defaults = {"draft_schedule": "often"}
    with pytest.raises(UserInputError, match="unknown draft_schedule 'often'"):
        module.generate(PROMPT, max_new_tokens=4)


class FlakyOracle(OracleDrafter):
    """The backbone's greedy continuation from its ``good_after``-th call on, wrong drafts before; checks that the
    positions it is handed continue the sequence exactly (none lost or repeated while the schedule paused)."""

    def __init__(self, model, input_ids, good_after: int) -> None:
        super().__init__(model, input_ids)
        self.calls, self.good_after = 0, good_after
        self.lengths: list[int] = []

    def draft(self, hidden, next_ids, k, probs_fn=None, generator=None, valid=None):
        assert hidden.shape[1] == next_ids.shape[1]  # one committed position per column
        self.calls += 1
        self.wrong = self.calls <= self.good_after
        self.lengths.append(k)
        return super().draft(hidden, next_ids, k, probs_fn, generator, valid)


def _decode(arch: str, schedule: str, good_after: int):
    model = make_backbone(arch)
    drafter = FlakyOracle(model, PROMPT, good_after)
    out = speculative_generate(model, PROMPT, drafter=drafter, num_draft_tokens=3, max_new_tokens=NEW,
                               draft_schedule=schedule)
    return model, drafter, out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])  # gpt2 meets EOS after 7 tokens here
def test_adaptive_decoding_is_lossless_and_hands_every_position_over_once(arch):
    model, drafter, out = _decode(arch, "adaptive", good_after=6)
    greedy = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW)
    assert out.sequences.tolist() == greedy.tolist()
    # the drafter saw the prompt and every committed token in order, paused steps included
    seen = drafter.seq[:, 1:]  # (1, m): the token after each position it was handed
    assert seen.tolist() == out.sequences[:, 1 : 1 + seen.shape[1]].tolist()
    # 3 misses shrink the chain to a pause; 3 probes miss (pauses of 1, 2, 4, 8 plain steps); then it grows back
    assert drafter.lengths[:9] == [3, 2, 1, 1, 1, 1, 1, 2, 3]
    assert out.stats.backbone_forwards >= 1 + 9 + 1 + 2 + 4 + 8  # the prefill, the drafting steps, the plain ones


def test_adaptive_drafts_less_than_constant_when_drafts_miss_and_as_much_when_they_land():
    _, adaptive, missing_adaptive = _decode("llama", "adaptive", good_after=10**6)
    _, constant, missing_constant = _decode("llama", "constant", good_after=10**6)
    assert missing_adaptive.sequences.tolist() == missing_constant.sequences.tolist()
    assert sum(adaptive.lengths) * 4 < sum(constant.lengths)  # pauses that double: few drafts while they miss
    assert missing_adaptive.stats.draft_steps * 4 < missing_constant.stats.draft_steps
    _, _, landing_adaptive = _decode("llama", "adaptive", good_after=0)
    _, _, landing_constant = _decode("llama", "constant", good_after=0)
    assert landing_adaptive.stats.tokens_per_forward == landing_constant.stats.tokens_per_forward
    assert landing_adaptive.stats.accepted == landing_constant.stats.accepted


@pytest.mark.parametrize("method", ["fast_mtp", "mtp_d", "mask_token"])
def test_every_method_is_lossless_under_both_schedules_batched(method):
    model = make_backbone("llama")
    module = MTPModule(model, method=method)
    prompts = [[5], [8, 60, 48], list(range(20, 31))]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for schedule in ("adaptive", "constant"):
        out = module.generate(ids, attention_mask=mask, max_new_tokens=NEW, draft_schedule=schedule)
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW)[0, len(prompt):]
            got = out.sequences[row, width:][: len(alone)]
            assert got.tolist() == alone.tolist(), (schedule, row)
