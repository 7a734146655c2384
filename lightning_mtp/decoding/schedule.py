"""How many drafts each decode step verifies: :class:`DraftSchedule`.

``constant`` always drafts the chain length asked for. ``adaptive`` (the default of ``MTPModule.generate``) follows
how the drafts fare, as HF assisted generation's ``heuristic`` schedule and EAGLE-2's confidence-guided drafting
do, and may stop drafting altogether: where a step keeps every draft the chain doubles (up to the length asked
for); where it keeps none it becomes one shorter than the chain just drafted, down to no drafts at all. With no
drafts a step costs what a plain step costs, so a drafter whose drafts miss cannot make decoding slower than NTP by more than its probes: after
``wait`` plain steps one draft is tried again; a probe that misses doubles ``wait`` (up to ``MAX_WAIT``), one that
lands resets it. The rule reads only acceptance, never timings, so a given prompt always decodes with the same
schedule, and it never changes which tokens are emitted: greedy output stays the backbone's own.
"""

from __future__ import annotations

from lightning_mtp.errors import UserInputError

__all__ = ["DRAFT_SCHEDULES", "MAX_WAIT", "DraftSchedule"]

DRAFT_SCHEDULES = ("adaptive", "constant")
MAX_WAIT = 32
"""The longest run of plain steps between two probes of an adaptive schedule whose drafts keep missing."""


class DraftSchedule:
    """The chain length of the next step (:attr:`length`), updated from each step's acceptance (:meth:`update`)."""

    def __init__(self, kind: str, longest: int) -> None:
        if kind not in DRAFT_SCHEDULES:
            raise UserInputError(f"unknown draft_schedule {kind!r}; choose one of {list(DRAFT_SCHEDULES)}")
        self.kind, self.longest = kind, longest
        self.length = longest  # drafts the next step verifies (0: a plain step, drafting paused)
        self.wait = 1  # plain steps of a pause before the probe
        self.idle = 0  # plain steps taken in this pause
        self.probing = False  # the next step is a probe: one draft after a pause

    def update(self, drafted: list[int], accepted: list[int]) -> None:
        """Record a step: per row, the drafts it verified and the drafts it kept."""
        if self.kind == "constant" or self.longest == 0:  # nothing to adapt (0: plain decoding)
            return
        if self.length == 0:  # a plain step of a pause
            self.idle += 1
            if self.idle >= self.wait:
                self.length, self.probing = 1, True
            return
        verified = [(d, a) for d, a in zip(drafted, accepted, strict=True) if d > 0]
        if not verified:  # the token budget left no room for drafts: nothing learnt
            return
        if all(a == 0 for _, a in verified):
            # one shorter than the longest chain drafted: a drafter that ends its own chains (at EOS, or by a
            # confidence threshold under a long num_draft_tokens) shrinks from where it really was
            self.length = min(self.length, max(d for d, _ in verified)) - 1
            if self.length == 0:  # a pause starts; a probe that missed makes it longer
                self.wait = min(MAX_WAIT, 2 * self.wait) if self.probing else 1
                self.idle = 0
        else:
            self.wait = 1
            if all(a == d for d, a in verified):  # doubling: a long chain grows back fast after a miss
                self.length = min(self.longest, 2 * max(self.length, 1))
        self.probing = False

    @property
    def feeds_drafter_next(self) -> bool:
        """Whether the drafter drafts after the next step (so that step's forward must carry the tokens a
        drafter asks to ride along): always while drafting, and on the last plain step of a pause."""
        return self.length > 0 or (self.longest > 0 and self.idle + 1 >= self.wait)
