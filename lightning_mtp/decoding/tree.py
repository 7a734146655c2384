"""Token trees: what a drafter proposes when it drafts several candidates per position, grown, verified and kept
by the shared decoder (:mod:`~lightning_mtp.decoding.speculative`).

A tree's root is the last committed token; every node is a draft token whose parent is the node (or the root) it
continues. One backbone forward verifies the whole tree: each node attends to the cache, the root and its own
ancestors only (a 4D additive mask) at the position its depth gives it (explicit position ids). The walk keeps the
longest root-to-leaf path the backbone agrees with, and the cache keeps exactly that path's entries.

Shapes (:class:`TreeShape`): ``static`` trees list their nodes as Medusa's choice lists (``[0, 1]`` = the second best
child of the best child of the root); ``dynamic`` trees grow as EAGLE-2's: each depth expands the ``top_k`` nodes with
the highest cumulative draft log-probability, every child they propose joins a pool, and the ``total_tokens`` best of
the pool form the tree. Both grow through one callback of the method (``expand``: the draft logits after each of some
nodes), so every method that drafts position by position drafts trees the same way.

Nodes are stored so that nodes ``0 .. chain - 1`` are the *main chain*: the root's best child, its best child, and so
on. Tokens a drafter asks to ride along a verify forward (mask-token's masks) follow the main chain, so the tree
reads, to them, as the chain they would follow without a tree.

Sampling: the candidates are the drafter's top choices, not samples, so each is verified as a proposal that puts all
its mass on that token (SpecInfer's multi-candidate rejection with point proposals): at a node, child ``c`` is kept
with probability ``p(c)`` under the backbone's (residual) distribution ``p``; a rejected child's token is removed
from ``p`` (renormalised) and the next child is tried; when every child is rejected the token is sampled from what is
left. Each trial is a rejection-sampling step with a valid proposal, so the output keeps the backbone's distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lightning_mtp.decoding.sampling import sample
from lightning_mtp.errors import UserInputError

__all__ = ["DraftTree", "TREE_KINDS", "TreeShape", "grow_tree", "keep_slots", "tree_attention", "tree_masks",
           "tree_over_positions", "walk_tree"]

TREE_KINDS = ("static", "dynamic")

DEFAULT_CHOICES: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0),
)
"""The default static tree: 14 nodes, depth 6, wide near the root (where a miss costs the most)."""


@dataclass(frozen=True)
class TreeShape:
    """How a drafter's tree is shaped (the decoding config's ``tree``: ``{kind: dynamic, depth: 5, ...}``).

    ``dynamic`` (EAGLE-2): ``depth`` levels, the ``top_k`` best nodes expanded per level with ``top_k`` children
    each, the ``total_tokens`` best nodes of all proposed kept. ``static`` (Medusa): ``choices``, each node a path of
    child ranks from the root (default :data:`DEFAULT_CHOICES`); a node's parent must be listed too.
    """

    kind: str = "dynamic"
    depth: int = 5
    top_k: int = 4
    total_tokens: int = 24
    choices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in TREE_KINDS:
            raise UserInputError(f"unknown tree kind {self.kind!r}; choose one of {list(TREE_KINDS)}")
        for name in ("depth", "top_k", "total_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"tree {name} must be an integer >= 1, got {value!r}")
        if self.kind == "static":
            choices = tuple(tuple(c) for c in (self.choices if self.choices is not None else DEFAULT_CHOICES))
            listed = set(choices)
            for c in choices:
                if not c or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in c):
                    raise UserInputError(f"tree choice {list(c)} must be a non-empty list of child ranks >= 0")
                if len(c) > 1 and c[:-1] not in listed:
                    raise UserInputError(f"tree choice {list(c)} needs its parent {list(c[:-1])} listed too")
            object.__setattr__(self, "choices", tuple(sorted(listed, key=lambda c: (len(c), c))))
            object.__setattr__(self, "depth", max(len(c) for c in self.choices))
        elif self.choices is not None:
            raise UserInputError("tree choices belong to a static tree; a dynamic tree takes depth, top_k, total_tokens")

    @classmethod
    def parse(cls, value) -> TreeShape | None:
        """A shape from the decoding config's ``tree`` (a mapping, a shape, or None for chain drafting) or the
        command line's ``--tree`` (``static``, ``dynamic`` or ``dynamic:depth=4,top_k=4,total_tokens=16``)."""
        if value is None or isinstance(value, TreeShape):
            return value
        if isinstance(value, str):
            value = _from_text(value)
        if not isinstance(value, dict):
            raise UserInputError(f"tree must be a mapping like {{kind: dynamic, depth: 5, top_k: 4, total_tokens: 24}}, "
                                 f"got {value!r}")
        unknown = sorted(set(value) - {"kind", "depth", "top_k", "total_tokens", "choices"})
        if unknown:
            raise UserInputError(f"unknown tree option(s) {unknown}; choose from kind, depth, top_k, total_tokens, choices")
        if value.get("choices") is not None:
            value = {**value, "choices": tuple(tuple(c) for c in value["choices"])}
        return cls(**value)

    def as_dict(self) -> dict:
        """The shape as the decoding config stores it (what :meth:`parse` reads back)."""
        if self.kind == "static":
            return {"kind": "static", "choices": [list(c) for c in self.choices]}
        return {"kind": "dynamic", "depth": self.depth, "top_k": self.top_k, "total_tokens": self.total_tokens}

    def within(self, depth: int) -> TreeShape:
        """The shape cut to ``depth`` levels (what a step's token budget can use)."""
        if depth >= self.depth:
            return self
        if self.kind == "static":
            return TreeShape("static", choices=tuple(c for c in self.choices if len(c) <= depth))
        return TreeShape("dynamic", depth, self.top_k, self.total_tokens)

    @property
    def label(self) -> str:
        """A short name for bench rows: ``dynamic-d5k4t24`` or ``static-14`` (nodes)."""
        if self.kind == "static":
            return f"static-{len(self.choices)}"
        return f"dynamic-d{self.depth}k{self.top_k}t{self.total_tokens}"


def _from_text(text: str) -> dict:
    """``kind[:name=int,...]`` -> the mapping :meth:`TreeShape.parse` reads."""
    kind, _, rest = text.partition(":")
    options: dict = {"kind": kind.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, eq, number = item.partition("=")
        if not eq or not number.strip().isdigit():
            raise UserInputError(f"tree option {item!r} must read name=integer, e.g. dynamic:depth=4,top_k=4,total_tokens=16")
        options[name.strip()] = int(number)
    return options


@dataclass
class DraftTree:
    """A token tree (n nodes, parents before children); nodes ``0 .. chain - 1`` are the main chain."""

    tokens: torch.Tensor  # (n,) the draft token of each node
    parents: list[int]  # each node's parent: an earlier node, or -1 for the root
    chain: int  # nodes 0 .. chain - 1 follow the root's best child, its best child, ...

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def empty(cls, device: torch.device) -> DraftTree:
        """No drafts this step."""
        return cls(torch.zeros(0, dtype=torch.long, device=device), [], 0)

    @property
    def depths(self) -> list[int]:
        """Each node's depth (the root's children are at 1)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def children(self) -> dict[int, list[int]]:
        """Each node's children in the order they are tried (-1: the root's), best first."""
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            kids.setdefault(p, []).append(i)
        return kids

    def ancestors(self) -> torch.Tensor:
        """(n, n) bool: ``[i, j]`` when node j is node i or one of its ancestors."""
        n = len(self)
        seen = torch.eye(n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                seen[i] |= seen[p]
        return seen

    def pruned(self, max_depth: int) -> DraftTree:
        """The tree without nodes deeper than ``max_depth`` (a token budget that cannot use them)."""
        if self.depth <= max_depth:
            return self
        keep = [i for i, d in enumerate(self.depths) if d <= max_depth]
        new = {old: j for j, old in enumerate(keep)}
        return DraftTree(self.tokens[keep], [new.get(self.parents[i], -1) for i in keep], min(self.chain, max_depth))


# ---------------------------------------------------------------------------------------------------- growing
Expand = Callable[[DraftTree, list[int]], torch.Tensor]
"""``expand(tree, nodes)``: the drafter's logits (w, V) for the token after each of ``nodes`` (w node indices of
``tree``, the pool grown so far, its nodes in the order they were added)."""


class _Pool:
    """The nodes proposed so far: token, parent, depth and cumulative draft log-probability of each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.scores: list[float] = []

    def add(self, tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float], depth: int) -> list[int]:
        start = len(self.tokens)
        self.tokens += list(tokens)
        self.parents += list(parents)
        self.scores += list(scores)
        self.depths += [depth] * len(tokens)
        return list(range(start, len(self.tokens)))

    def tree(self) -> DraftTree:
        return DraftTree(torch.tensor(self.tokens, dtype=torch.long, device=self.device), list(self.parents), 0)

    def children_of(self, logits: torch.Tensor, nodes: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best children of each node by cumulative log-probability: scores and tokens, (w, k) each."""
        base = torch.tensor([self.scores[i] if i >= 0 else 0.0 for i in nodes], device=logits.device)
        scores = logits.float().log_softmax(-1) + base[:, None]  # (w, V)
        return scores.topk(min(k, scores.shape[-1]), dim=-1)


def grow_tree(root_logits: torch.Tensor, expand: Expand, shape: TreeShape,
              stop_ids: torch.Tensor | None = None) -> DraftTree:
    """Grow a tree of ``shape`` from the drafter's logits for the first draft ``root_logits`` (V,); ``expand`` gives
    the logits after any nodes. Nothing is expanded after a stop token (EOS): nothing after it can be emitted."""
    pool = _Pool(root_logits.device)
    stops = set() if stop_ids is None else set(stop_ids.tolist())
    grow = _grow_static if shape.kind == "static" else _grow_dynamic
    selected = grow(pool, root_logits[None], expand, shape, stops)
    return _ordered(pool, selected)


def tree_over_positions(logits: torch.Tensor, shape: TreeShape, stop_ids: torch.Tensor | None = None) -> DraftTree:
    """A tree from drafts predicted position by position, each from the committed sequence alone (Medusa's heads,
    mask-token's masks): ``logits`` (k, V) row j gives the candidates at depth j + 1 whatever their parent."""

    def expand(tree: DraftTree, nodes: list[int]) -> torch.Tensor:  # a node at depth d: row d's candidates
        depths = tree.depths
        return logits[[depths[n] for n in nodes]]

    return grow_tree(logits[0], expand, shape.within(logits.shape[0]), stop_ids)


def _grow_dynamic(pool: _Pool, root_logits: torch.Tensor, expand: Expand, shape: TreeShape, stops: set) -> list[int]:
    """EAGLE-2: expand the ``top_k`` best nodes of each depth; keep the ``total_tokens`` best of every node proposed."""
    scores, tokens = pool.children_of(root_logits, [-1], shape.top_k)
    frontier = pool.add(tokens[0].tolist(), [-1] * tokens.shape[1], scores[0].tolist(), 1)
    for depth in range(2, shape.depth + 1):
        frontier = [i for i in frontier if pool.tokens[i] not in stops]
        if not frontier:
            break
        scores, tokens = pool.children_of(expand(pool.tree(), frontier), frontier, shape.top_k)  # (w, k) each
        parents = [p for p in frontier for _ in range(tokens.shape[1])]
        added = pool.add(tokens.flatten().tolist(), parents, scores.flatten().tolist(), depth)
        best = scores.flatten().topk(min(shape.top_k, len(added))).indices.tolist()
        frontier = [added[j] for j in best]
    order = sorted(range(len(pool.tokens)), key=lambda i: (-pool.scores[i], pool.depths[i], i))
    return order[: shape.total_tokens]


def _grow_static(pool: _Pool, root_logits: torch.Tensor, expand: Expand, shape: TreeShape, stops: set) -> list[int]:
    """Medusa's choice lists: node ``c`` is the ``c[-1]``-th best child of node ``c[:-1]``."""
    index: dict[tuple[int, ...], int] = {}
    for depth in range(1, shape.depth + 1):
        level = [c for c in shape.choices if len(c) == depth]
        parents = sorted({c[:-1] for c in level if c[:-1] == () or c[:-1] in index})
        parents = [p for p in parents if p == () or pool.tokens[index[p]] not in stops]
        if not parents:
            break
        nodes = [index[p] if p else -1 for p in parents]
        logits = root_logits if depth == 1 else expand(pool.tree(), nodes)
        widest = max(c[-1] for c in level) + 1
        scores, tokens = pool.children_of(logits, nodes, widest)  # (w, r)
        for row, p in enumerate(parents):
            for c in (c for c in level if c[:-1] == p and c[-1] < tokens.shape[1]):
                index[c] = pool.add([int(tokens[row, c[-1]])], [nodes[row]], [float(scores[row, c[-1]])], depth)[0]
    return sorted(index.values())


def _ordered(pool: _Pool, selected: list[int]) -> DraftTree:
    """The selected nodes (closed under parents) as a tree: the main chain first, then the rest by depth, each
    node's children best first."""
    chosen = set()
    for i in sorted(selected):  # parents come first in the pool: drop a node whose parent was not selected
        if pool.parents[i] < 0 or pool.parents[i] in chosen:
            chosen.add(i)
    kids: dict[int, list[int]] = {}
    for i in sorted(chosen, key=lambda i: (-pool.scores[i], i)):
        kids.setdefault(pool.parents[i], []).append(i)
    chain, node = [], -1
    while kids.get(node):
        node = kids[node][0]
        chain.append(node)
    rest = sorted(chosen - set(chain), key=lambda i: (pool.depths[i], -pool.scores[i], i))
    order = chain + rest
    new = {old: j for j, old in enumerate(order)}
    tokens = torch.tensor([pool.tokens[i] for i in order], dtype=torch.long, device=pool.device)
    return DraftTree(tokens, [new.get(pool.parents[i], -1) for i in order], len(chain))


# ---------------------------------------------------------------------------------------------------- verifying
def tree_attention(tree: DraftTree, past: int, appended: int, dtype: torch.dtype, device: torch.device,
                   window: int | None = None, stored: int | None = None):
    """The verify forward's mask and positions for ``[root, nodes, appended tokens]`` after ``past`` positions: an
    additive mask (1, 1, q, kv) and position ids (1, q), q = 1 + n + appended. A node sees the cache, the root and its
    ancestors; an appended token sees the cache, the root, the main chain and the appended ones before it, at the
    positions after the chain's end. With a sliding ``window``, the cache holds its last ``stored`` positions only
    (kv = stored + q) and a token sees no position ``window`` or more before its own (transformers' rule)."""
    n, c = len(tree), tree.chain
    q = 1 + n + appended
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:, 0] = True  # everything follows the root
    allowed[1 : 1 + n, 1 : 1 + n] = tree.ancestors()
    if appended:
        allowed[1 + n :, 1 : 1 + c] = True
        allowed[1 + n :, 1 + n :] = torch.ones(appended, appended, dtype=torch.bool).tril()
    offsets = torch.tensor([0, *tree.depths, *range(c + 1, c + 1 + appended)])  # (q,) positions after past
    held = past if window is None else stored  # cache slots the forward attends to, before the step's own
    seen = torch.cat([torch.ones(q, held, dtype=torch.bool), allowed], dim=1)  # (q, held + q)
    if window is not None:
        key_pos = torch.cat([torch.arange(past - held, past), past + offsets])  # (held + q,)
        seen &= (past + offsets)[:, None] - key_pos[None] < window
    mask = torch.zeros(1, 1, q, held + q, dtype=dtype, device=device)
    mask[0, 0].masked_fill_(~seen.to(device), torch.finfo(dtype).min)
    return mask, (past + offsets)[None].to(device)


def tree_masks(cache: DynamicCache, tree: DraftTree, past: int, appended: int, dtype: torch.dtype,
               device: torch.device):
    """:func:`tree_attention` for the layers of ``cache``: ``(mask, positions)``, the mask one tensor where every
    layer attends alike, else a mapping by layer type (``full_attention``, ``sliding_attention``) as transformers'
    models with both kinds of layers take it."""
    sliding = [layer for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    full, pos = tree_attention(tree, past, appended, dtype, device)
    if not sliding:
        return full, pos
    window = sliding[0].sliding_window
    stored = min(sliding[0].keys.shape[-2] if sliding[0].is_initialized else 0, window - 1)
    windowed, _ = tree_attention(tree, past, appended, dtype, device, window, stored)
    if len(sliding) == len(cache.layers):
        return windowed, pos
    return {"full_attention": full, "sliding_attention": windowed}, pos


def walk_tree(tree: DraftTree, logits: torch.Tensor, probs_fn: Callable[[torch.Tensor], torch.Tensor] | None,
              generator: torch.Generator | None) -> tuple[list[int], int]:
    """The accepted path (node indices, root to leaf) and the backbone's token after it, from the verify forward's
    ``logits`` (1 + n, V) at the root and every node. Greedy: descend to the child equal to the backbone's argmax.
    Sampling: multi-candidate rejection with point proposals (see the module docstring)."""
    kids = tree.children()
    tokens = tree.tokens.tolist()
    path, node = [], -1
    while True:
        row = logits[1 + node]  # the root's logits are row 0, node i's row 1 + i
        children = kids.get(node, [])
        if probs_fn is None:
            target = int(row.argmax())
            nxt = next((c for c in children if tokens[c] == target), None)
            if nxt is None:
                return path, target
        else:
            nxt, target = _sample_child(probs_fn(row[None])[0], children, tokens, generator)
            if nxt is None:
                return path, target
        path.append(nxt)
        node = nxt


def _sample_child(p: torch.Tensor, children: list[int], tokens: list[int],
                  generator: torch.Generator | None) -> tuple[int | None, int]:
    """Try each child in turn as a point proposal under the residual ``p`` (V,): ``(child, -1)`` for the one kept,
    or ``(None, token)`` with the token sampled from what is left when every child is rejected."""
    p = p.float().clone()
    for c in children:
        t = tokens[c]
        total = float(p.sum())
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * total < float(p[t]):
            return c, -1
        p[t] = 0.0
    return None, int(sample((p / p.sum())[None], generator)[0])


def keep_slots(cache: DynamicCache, kept: list[int], q: int) -> None:
    """After a forward of ``q`` tokens, keep of them only those at offsets ``kept`` (ascending; the root 0 and a
    tree's accepted path) in every layer: the path's slots move down in place and the rest is cut off (a view), so
    the committed slots are never copied. A sliding-window layer then trims itself to its window."""
    run = next((j for j, offset in enumerate(kept) if offset != j), len(kept))  # offsets kept where they are
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise TypeError(f"keep_slots needs DynamicLayer or DynamicSlidingWindowLayer layers, got {type(layer).__name__}")
        if not layer.is_initialized or not layer.keys.numel():
            continue
        base = layer.keys.shape[-2] - q  # the layer's slots before the step's own
        if run < len(kept):
            moved = torch.tensor(kept[run:], device=layer.keys.device) + base
            layer.keys[..., base + run : base + len(kept), :] = layer.keys.index_select(-2, moved)
            layer.values[..., base + run : base + len(kept), :] = layer.values.index_select(-2, moved)
        end = base + len(kept)
        start = max(0, end - (layer.sliding_window - 1)) if isinstance(layer, DynamicSlidingWindowLayer) else 0
        layer.keys, layer.values = layer.keys[..., start:end, :], layer.values[..., start:end, :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= q - len(kept)
