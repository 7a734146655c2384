"""torchmetrics for draft acceptance: per-position acceptance (AR), cumulative acceptance (CAR) and tau."""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["AcceptanceRate"]


class AcceptanceRate(Metric):
    """Teacher-forced acceptance of a K-token draft chain.

    ``update(correct)`` takes a (K, N) bool tensor: ``correct[j, n]`` says draft position j+1 at sample
    position n equals the backbone's greedy token there. AR_j is the fraction of samples whose position j
    is right given positions 1..j-1 were; CAR_j the fraction where positions 1..j all were. The estimated
    tokens per backbone forward of chain decoding is ``tau = 1 + sum_j CAR_j``.
    """

    full_state_update = False

    def __init__(self, num_positions: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_positions = num_positions
        self.add_state("cumulative", default=torch.zeros(num_positions, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        if correct.dim() != 2 or correct.shape[0] != self.num_positions:
            raise ValueError(f"expected a ({self.num_positions}, N) tensor, got shape {tuple(correct.shape)}")
        chain = correct.bool().long().cumprod(dim=0)  # (K, N): 1 while every earlier position was right
        self.cumulative += chain.sum(dim=1)
        self.total += correct.shape[1]

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1).float()
        car = self.cumulative.float() / total  # (K,)
        prev = torch.cat([total.new_ones(1) * total, self.cumulative[:-1].float()])  # (K,) count reaching j
        ar = self.cumulative.float() / prev.clamp(min=1)
        return {"acceptance": ar, "cumulative_acceptance": car, "tau": 1 + car.sum()}
