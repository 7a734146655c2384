"""What one verify forward of the shipped tiny-world base costs by the number of tokens it verifies, with the tree
mask and without: the ceiling of token trees on this CPU (a tree of n nodes verifies 1 + n tokens).

    .venv/bin/python benchmarks/tree_verify_cost.py   # 1 thread, a 60-token prompt in the cache, median of 30
"""

from __future__ import annotations

import statistics
import time

import torch

from lightning_mtp import zoo
from lightning_mtp.backbone import cached_forward
from lightning_mtp.decoding.speculative import new_cache
from lightning_mtp.decoding.tree import DraftTree, tree_attention

SIZES = (1, 2, 4, 9, 17, 25, 33)


def median_ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    backbone = zoo.load("tiny-world-base").backbone
    prompt = torch.randint(0, backbone.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0))
    cache = new_cache(backbone)
    cached_forward(backbone, prompt, cache, None, 1)
    print("| tokens verified | chain forward ms | tree forward ms (4D mask) |\n|---|---|---|")
    for q in SIZES:
        step = torch.randint(0, backbone.config.vocab_size, (1, q))

        def chain(step=step, q=q):
            cached_forward(backbone, step, cache, None, None, start=60)
            cache.crop(-q)

        if q == 1:  # one token: nothing to verify, the plain step
            print(f"| 1 | {median_ms(chain):.1f} | - |")
            continue
        parents = [-1] + [i // 2 - 1 if i > 1 else -1 for i in range(1, q - 1)]  # a binary tree of q - 1 nodes
        mask, pos = tree_attention(DraftTree(step[0, 1:], parents, 1), 60, 0, backbone.dtype, backbone.device)

        def treed(step=step, q=q, mask=mask, pos=pos):
            cached_forward(backbone, step, cache, None, None, mask, pos)
            cache.crop(-q)

        print(f"| {q} | {median_ms(chain):.1f} | {median_ms(treed):.1f} |")


if __name__ == "__main__":
    main()
