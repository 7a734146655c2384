"""Tree drafting: the tree mask and positions, growing static and dynamic trees, the walk, the cache after a tree
step, losslessness for every tree-drafting method, the multi-candidate sampler's distribution, and the refusals."""

from __future__ import annotations

import pytest
import torch
from arch_sweep import build
from conftest import VOCAB, make_backbone
from test_decoding import PROMPTS, assert_frequencies_match, check_sampling_matches_the_backbone

from lightning_mtp import MTPModule
from lightning_mtp.backbone import cached_forward
from lightning_mtp.decoding.drafter import Drafter
from lightning_mtp.decoding.sampling import make_probs_fn
from lightning_mtp.decoding.speculative import new_cache, speculative_generate, tree_problem
from lightning_mtp.decoding.tree import DraftTree, TreeShape, grow_tree, keep_slots, tree_attention, walk_tree
from lightning_mtp.errors import UserInputError

TREE_ARCHS = ["llama", "qwen3", "mistral", "gpt2"]  # mistral: a sliding window (8) the decodes pass
SHAPES = [{"kind": "static"}, {"kind": "dynamic", "depth": 4, "top_k": 3, "total_tokens": 12}]
METHODS = [{"name": "fast_mtp"}, {"name": "mtp_d"}, {"name": "mask_token", "mask_token_id": 3}, {"name": "medusa"},
           {"name": "eagle3"}]
MAX_NEW = 20


# ---------------------------------------------------------------- the tree's mask, positions and growth


def test_tree_mask_and_positions_by_hand():
    # root -> n0 -> n1 (the main chain), root -> n2 -> n3; one appended token after the main chain
    tree = DraftTree(torch.tensor([10, 11, 12, 13]), [-1, 0, -1, 2], chain=2)
    mask, pos = tree_attention(tree, past=3, appended=1, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 6, 9) and (mask[0, 0, :, :3] == 0).all()  # the cache is seen by all
    allowed = mask[0, 0, :, 3:] == 0
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0],  # n0
        [1, 1, 1, 0, 0, 0],  # n1
        [1, 0, 0, 1, 0, 0],  # n2: the root and itself, not n0 / n1
        [1, 0, 0, 1, 1, 0],  # n3
        [1, 1, 1, 0, 0, 1],  # the appended token: the root and the main chain
    ], dtype=torch.bool)
    assert torch.equal(allowed, want)
    assert pos.tolist() == [[3, 4, 5, 4, 5, 6]]


ROOT = torch.tensor([0.5, 0.3, 0.2, 1e-9, 1e-9]).log()  # tokens 0, 1, 2 likely at depth 1
CHILD = torch.tensor([1e-9, 1e-9, 1e-9, 0.1, 0.9]).log()  # after any node: 4, then 3


def expand_fixed(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
    return CHILD.expand(len(nodes), -1)


def test_a_dynamic_tree_keeps_the_best_nodes_by_cumulative_probability():
    tree = grow_tree(ROOT, expand_fixed, TreeShape("dynamic", depth=2, top_k=2, total_tokens=3))
    # proposed: 0 (.5), 1 (.3), 0->4 (.45), 0->3 (.05), 1->4 (.27), 1->3 (.03): the three best are 0, 0->4, 1
    assert tree.tokens.tolist() == [0, 4, 1] and tree.parents == [-1, 0, -1] and tree.chain == 2


def test_a_static_tree_follows_its_choice_list():
    tree = grow_tree(ROOT, expand_fixed, TreeShape("static", choices=((0,), (1,), (0, 0), (1, 1))))
    assert tree.tokens.tolist() == [0, 4, 1, 3] and tree.parents == [-1, 0, -1, 2] and tree.chain == 2


def test_nothing_grows_after_a_stop_token():
    calls = []

    def expand(tree, nodes):
        calls.append([tree.tokens[n].item() for n in nodes])
        return CHILD.expand(len(nodes), -1)

    tree = grow_tree(ROOT, expand, TreeShape("dynamic", depth=3, top_k=2, total_tokens=20), torch.tensor([0]))
    assert all(0 not in c for c in calls) and 0 not in [tree.tokens[n].item() for n in range(len(tree))
                                                        if tree.parents[n] >= 0 and tree.tokens[tree.parents[n]] == 0]


def test_the_greedy_walk_descends_where_the_backbone_agrees():
    tree = DraftTree(torch.tensor([1, 2, 3, 4]), [-1, 0, -1, 2], chain=2)  # root -> 1 -> 2; root -> 3 -> 4
    logits = torch.full((5, 8), -5.0)
    logits[0, 3] = logits[3, 4] = logits[4, 7] = 5.0  # the backbone: 3 after the root, 4 after 3, 7 after 4
    assert walk_tree(tree, logits, None, None) == ([2, 3], 7)


@pytest.mark.parametrize("bad, match", [
    ({"kind": "beam"}, "unknown tree kind 'beam'; choose one of"),
    ({"kind": "dynamic", "total_tokens": 0}, "tree total_tokens must be an integer >= 1, got 0"),
    ({"kind": "static", "choices": [[0, 1]]}, r"needs its parent \[0\] listed too"),
    ({"kind": "dynamic", "width": 3}, r"unknown tree option\(s\) \['width'\]"),
    (42, "tree must be a mapping"),
    ("wide", "unknown tree kind .wide."),
])
def test_a_bad_tree_shape_is_one_clear_error(bad, match):
    with pytest.raises(UserInputError, match=match):
        TreeShape.parse(bad)


def test_a_shape_round_trips_through_the_decoding_config():
    for shape in (TreeShape(), TreeShape("static"), TreeShape("dynamic", 3, 2, 7)):
        assert TreeShape.parse(shape.as_dict()) == shape


# ---------------------------------------------------------------- the cache and the probe


@pytest.mark.parametrize("arch", TREE_ARCHS)
def test_the_cache_after_a_tree_step_equals_a_forward_over_the_kept_path(arch):
    model = make_backbone(arch)
    assert tree_problem(model) is None
    prompt = torch.tensor([[5, 6, 7, 8]])
    tree = DraftTree(torch.tensor([20, 21, 22, 23, 24]), [-1, 0, -1, 2, 3], chain=2)
    cache = new_cache(model)
    cached_forward(model, prompt, cache, None, 1)
    mask, pos = tree_attention(tree, 4, 0, model.dtype, model.device)
    with torch.no_grad():
        cached_forward(model, torch.tensor([[9, 20, 21, 22, 23, 24]]), cache, None, None, mask, pos)
        keep_slots(cache, [0, 3, 4, 5], 6)  # root 9, then nodes 2, 3, 4
        after, _ = cached_forward(model, torch.tensor([[30]]), cache, None, 1, start=8)
        want = model(torch.tensor([[5, 6, 7, 8, 9, 22, 23, 24, 30]])).logits[0, -1]
    torch.testing.assert_close(after[0, -1], want, rtol=1e-4, atol=1e-4)


def test_a_backbone_with_both_full_and_sliding_layers_decodes_trees_losslessly():
    """Qwen3 with its second layer sliding (window 8): the tree mask goes to each layer type as a mapping."""
    model = make_backbone("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert sorted(set(model.config.layer_types)) == ["full_attention", "sliding_attention"]
    assert tree_problem(model) is None
    module = MTPModule(model, method="fast_mtp")
    for prompt in PROMPTS[3:]:  # longer than the window
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=MAX_NEW, tree=SHAPES[1])
        assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)), prompt


def test_a_recurrent_backbone_is_refused_by_what_the_probe_found():
    model = build("qwen3_next")  # linear-attention layers between the full ones
    module = MTPModule(model, method={"name": "mask_token", "mask_token_id": 3})
    with pytest.raises(UserInputError, match="cannot verify a token tree: its cache layers .* keep a running state"):
        module.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, tree={"kind": "static"})


class ChainOnly(Drafter):
    def draft(self, hidden, next_ids, k, probs_fn=None, generator=None, valid=None, appended=None):
        return next_ids[:, -1:].expand(-1, k), None


def test_a_chain_only_drafter_is_refused_by_name():
    with pytest.raises(UserInputError, match="ChainOnly drafts chains only"):
        speculative_generate(make_backbone("llama"), torch.tensor([[5, 6, 7]]), ChainOnly(), num_draft_tokens=2,
                             max_new_tokens=4, tree=TreeShape("static"))


# ---------------------------------------------------------------- acceptance and losslessness


class SideBranchOracle(Drafter):
    """A tree whose main chain is always wrong and whose side branch holds the backbone's greedy continuation,
    ``good`` nodes deep: every step must accept exactly that branch."""

    drafts_trees = True

    def __init__(self, model, input_ids: torch.Tensor, good: int) -> None:
        self.model, self.good, self.seq = model, good, input_ids[:, :1]

    @torch.no_grad()
    def draft_tree(self, hidden, next_ids, k, shape, probs_fn=None, generator=None, valid=None, appended=None):
        self.seq = torch.cat([self.seq, next_ids], dim=1)
        seq = self.seq
        for _ in range(k):
            seq = torch.cat([seq, self.model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        greedy = seq[0, -k:]
        good = min(self.good, k)
        wrong = (greedy + 1) % VOCAB  # (k,) the main chain, never the backbone's token
        tokens = torch.cat([wrong, greedy[:good]])
        parents = [-1, *range(k - 1), -1, *range(k, k + good - 1)]
        return DraftTree(tokens, parents, chain=k)


def test_a_tree_holding_the_greedy_path_on_a_side_branch_accepts_exactly_that_path():
    model = make_backbone("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    out = speculative_generate(model, ids, SideBranchOracle(model, ids, good=2), num_draft_tokens=3,
                               max_new_tokens=MAX_NEW, tree=TreeShape("static"))
    assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW))
    s = out.stats
    full = s.draft_steps - 1  # the last step's tree may be cut by the token budget
    assert s.accepted[0] >= full and s.accepted[1] >= full and s.accepted[2] == 0
    assert s.tokens_per_forward > 2.5  # three tokens a forward, but for the budget's cut


@pytest.mark.parametrize("arch", TREE_ARCHS)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s["kind"])
def test_tree_decoding_is_lossless(arch, method, shape):
    model = make_backbone(arch)
    module = MTPModule(model, method=method)
    for prompt in PROMPTS[1:4]:
        ids = torch.tensor([prompt])
        out = module.generate(ids, max_new_tokens=MAX_NEW, tree=shape)
        assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)), prompt


def test_a_batch_with_trees_decodes_each_row_as_alone():
    model = make_backbone("llama")
    module = MTPModule(model, method="fast_mtp")
    prompts = PROMPTS[1:4]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = module.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, tree=SHAPES[1])
    for row, p in enumerate(prompts):
        alone = module.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, tree=SHAPES[1]).sequences[0, len(p):]
        assert out.sequences[row, width : width + len(alone)].tolist() == alone.tolist()


# ---------------------------------------------------------------- sampling


def test_the_point_proposal_walk_samples_the_backbone_distribution():
    p = torch.tensor([0.1, 0.35, 0.05, 0.3, 0.2])
    tree = DraftTree(torch.tensor([1, 3]), [-1, -1], chain=1)  # two candidates at the root
    logits = p.log().expand(3, -1)
    probs_fn = make_probs_fn(1.0, 1.0, 0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5, dtype=torch.long)
    for _ in range(10_000):
        path, nxt = walk_tree(tree, logits, probs_fn, g)
        counts[tree.tokens[path[0]] if path else nxt] += 1
    assert_frequencies_match(counts, p)


def test_tree_sampling_matches_the_backbone_distribution():
    check_sampling_matches_the_backbone(tree={"kind": "dynamic", "depth": 2, "top_k": 2, "total_tokens": 4})


def test_the_command_line_spelling_of_a_shape():
    assert TreeShape.parse("dynamic:depth=4,top_k=2,total_tokens=9") == TreeShape("dynamic", 4, 2, 9)
    assert TreeShape.parse("static") == TreeShape("static")
    with pytest.raises(UserInputError, match="tree option 'depth=four' must read name=integer"):
        TreeShape.parse("dynamic:depth=four")


def test_an_artefact_decodes_with_the_tree_its_decoding_config_names(tmp_path):
    model = make_backbone("llama")
    module = MTPModule(model, method="fast_mtp")
    module.decoding_defaults = {"decoding": "speculative", "tree": {"kind": "dynamic", "depth": 2, "top_k": 2,
                                                                    "total_tokens": 4}}
    ids = torch.tensor([PROMPTS[2]])
    out = module.generate(ids, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW))
    assert len(out.stats.reached) == 2  # two levels: the tree's depth, not the method's K (3)
