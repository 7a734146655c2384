"""MTP-D: K sequential MTP heads trained with self-distillation, and their looped extension.

Zhao, Xie et al., "Self-Distillation for Multi-Token Prediction", arXiv 2603.23911 (no public code; this is
a library implementation from the paper's description, with the open choices below made configurable).

Heads. Head k (k = 1..K) is a DeepSeek-V3-style :class:`MTPBlock` (the backbone's own decoder-layer class)
with weights of its own. At position i it takes head k-1's state h^{k-1}_i (h^0 = the backbone's final
hidden state) and the embedding of the token k positions ahead, and predicts the token k + 1 ahead through
the backbone's shared, frozen output head.

Loss. ``sum_k alpha_k * CE(head_k, ground truth) + sum_k beta_k * KL_k``. The teacher of head k at position
i is the main head's distribution for the same token (the backbone's logits at position i + k), detached
(stop-gradient: the main head gets no gradient from distillation). Our choices where the paper is silent:

- the KL runs over the teacher's ``top_n`` logits (default: 10,000 as in the paper, or the whole vocabulary
  if smaller), both distributions renormalised over that set, at ``temperature`` (default 1), scaled by
  ``temperature**2`` as in Hinton et al. so its gradient does not shrink with the temperature;
- ``kl_direction="forward"`` is KL(teacher || student) (classic distillation: the student covers the
  teacher's mass); ``"reverse"`` is KL(student || teacher) (mode seeking);
- ``alpha_k = 1`` (the paper's CE weights are unknown) and ``beta_k = 1`` (the paper's value);
  ``beta = 0`` is plain multi-head MTP, the paper's baseline.

Looped extension. :func:`extend_heads` turns a trained K-head model into one with more heads: new head
K + i starts as a copy of head i (cyclically), the backbone and the K trained heads are frozen
(``frozen_heads``), and only the new heads train. Without training it is the paper's training-free loop.
Recipes do the same with ``init_from`` (a trained mtp_d artefact or zoo name) and ``frozen_heads``.

Decoding. The heads draft a chain, head k proposing draft token k, verified by the shared lossless decoder.
Each head keeps its own KV cache over committed positions. Head k at position i needs the token i + k, so
its committed entries lag one position behind head k-1's: after every verify step head k ingests the new
positions it can now see (fed by head k-1's outputs, the first of them carried over from the previous step),
and in the same call runs its k-1 speculative chain rows (positions L-k+2..L, fed the drafts so far),
whose last row proposes draft k. The speculative entries are dropped at the next step. One head call per
head per step, as FastMTP's one call per application. Heads past the chain a step asks for (an adaptive schedule's
short chains) do not run at all: their new inputs wait (``pending``) and are caught up in one call, in order,
at the first step that needs their drafts again. Trees (``generate(tree=...)``): head d proposes the children of every
node at depth d, run over that node's own path (:meth:`MTPDDrafter.draft_tree`), one call per head per step still.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtp.backbone import BackboneParts, slot_mask
from lightning_mtp.decoding.tree import DraftTree, TreeShape, grow_tree
from lightning_mtp.errors import UserInputError
from lightning_mtp.io import read_safetensors
from lightning_mtp.methods.base import (
    DraftChain,
    MethodConfig,
    MethodContext,
    MTPMethod,
    future_labels,
    future_tokens,
    register_method,
)
from lightning_mtp.methods.cached_chain import CachedChainDrafter
from lightning_mtp.methods.mtp_block import MTPBlock
from lightning_mtp.record import METHOD_WEIGHTS, MTP_CONFIG, read_mtp_config
from lightning_mtp.resolve import is_zoo_name, resolve_model_path

__all__ = ["MTPD", "MTPDHeads", "MTPDDrafter", "distillation_kl", "extend_heads"]

PAPER_TOP_N = 10_000


@register_method("mtp_d")
@dataclass
class MTPD(MethodConfig):
    """MTP-D: K sequential heads trained with CE and self-distillation from the main head."""

    summary = "K sequential MTP-D heads trained with self-distillation (Zhao et al., arXiv 2603.23911)"

    num_heads: int = 4
    """K: sequential MTP heads, and draft tokens per decoding step."""
    alpha: float | list[float] = 1.0
    """CE weight of each head (one value for all, or one per head)."""
    beta: float | list[float] = 1.0
    """Distillation (KL) weight of each head; 0 gives plain multi-head MTP."""
    top_n: int | None = None
    """KL over the teacher's top-N logits; None: the paper's 10,000, or the whole vocabulary if smaller."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KL (the KL is scaled by temperature**2)."""
    kl_direction: str = "forward"
    """"forward": KL(teacher || student); "reverse": KL(student || teacher)."""
    frozen_heads: int = 0
    """The first N heads do not train (the looped extension trains only the new heads)."""
    init_from: str | None = None
    """A trained mtp_d artefact directory or zoo name whose heads initialise these, copied cyclically (head
    i <- head i mod K_trained). Used once, when the module is built. Saved artefacts hold the heads themselves,
    except the frozen ones when ``init_from`` is a zoo name: those are read from the zoo entry again on load."""
    init_from_sha256: str | None = None
    """Set when ``init_from`` is read: the SHA-256 of its weights file. Loading an artefact that shares frozen
    heads with a zoo entry refuses an entry whose weights changed since."""
    head_layer: int | None = None
    """The backbone layer index whose structure the head's decoder layer takes (models whose layers differ by
    index, e.g. DeepSeek-V3's dense and MoE layers); None: the first attention layer. Native layouts set it to
    where their MTP layer sits (DeepSeek-V3: ``num_hidden_layers``), so the head has the native layer's shape."""

    @property
    def num_draft_tokens(self) -> int:
        return self.num_heads

    def validate(self) -> None:
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise UserInputError(f"mtp_d num_heads (K) must be an integer >= 1, got {self.num_heads!r}")
        for name in ("alpha", "beta"):
            values = self.per_head(name)
            if any(not isinstance(v, (int, float)) or v < 0 for v in values):
                raise UserInputError(f"mtp_d {name} must be >= 0 (one number or one per head), got {getattr(self, name)!r}")
        if self.top_n is not None and (not isinstance(self.top_n, int) or self.top_n < 1):
            raise UserInputError(f"mtp_d top_n must be an integer >= 1 or None, got {self.top_n!r}")
        if not self.temperature > 0:
            raise UserInputError(f"mtp_d temperature must be > 0, got {self.temperature!r}")
        if self.kl_direction not in ("forward", "reverse"):
            raise UserInputError(f"mtp_d kl_direction must be 'forward' or 'reverse', got {self.kl_direction!r}")
        if not isinstance(self.frozen_heads, int) or not 0 <= self.frozen_heads < self.num_heads:
            raise UserInputError(f"mtp_d frozen_heads must be in [0, num_heads={self.num_heads}), got {self.frozen_heads!r}")
        if self.head_layer is not None and (isinstance(self.head_layer, bool) or not isinstance(self.head_layer, int)
                                            or self.head_layer < 0):
            raise UserInputError(f"mtp_d head_layer must be a layer index >= 0 or None, got {self.head_layer!r}")

    def per_head(self, name: str) -> list[float]:
        """``alpha`` or ``beta`` as one weight per head."""
        value = getattr(self, name)
        if isinstance(value, (list, tuple)):
            if len(value) != self.num_heads:
                raise UserInputError(f"mtp_d {name} has {len(value)} values for {self.num_heads} heads: give one or "
                                     f"{self.num_heads}")
            return list(value)
        return [value] * self.num_heads

    @property
    def shares_frozen_heads(self) -> bool:
        """Whether artefacts store only the trained heads: the frozen ones are copies of a zoo entry's heads
        (``init_from`` names one), read from it again on load and checked against ``init_from_sha256``."""
        if not (self.frozen_heads and self.init_from and self.init_from_sha256) or Path(self.init_from).is_dir():
            return False
        return is_zoo_name(self.init_from)

    def to_dict(self) -> dict:
        if self.shares_frozen_heads:
            return super().to_dict()
        return {**super().to_dict(), "init_from": None, "init_from_sha256": None}  # the saved heads replace them

    def build(self, parts: BackboneParts) -> MTPDHeads:
        return MTPDHeads(self, parts)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, top_n: int, temperature: float = 1.0,
                    direction: str = "forward") -> torch.Tensor:
    """Mean KL between (N, V) logit rows over the teacher's ``top_n`` entries, both renormalised there.

    ``teacher`` must already be detached. Scaled by ``temperature**2``.
    """
    if top_n < teacher.shape[-1]:
        idx = teacher.topk(top_n, dim=-1).indices  # (N, n)
        teacher, student = teacher.gather(-1, idx), student.gather(-1, idx)  # (N, n)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return kl.mean() * temperature**2


class MTPDHeads(MTPMethod):
    def __init__(self, config: MTPD, parts: BackboneParts) -> None:
        super().__init__(config)
        V = parts.vocab_size
        if config.top_n is not None and config.top_n > V:
            raise UserInputError(f"mtp_d top_n {config.top_n} exceeds the backbone's vocabulary ({V}); use at most {V}, "
                                 "or None for min(10000, vocabulary)")
        self.top_n = config.top_n if config.top_n is not None else min(PAPER_TOP_N, V)
        self.heads = nn.ModuleList([MTPBlock(parts, config.head_layer) for _ in range(config.num_heads)])  # K separate modules
        for head in self.heads[: config.frozen_heads]:
            head.requires_grad_(False)

    def attach(self, context: MethodContext) -> None:
        cfg = self.config
        if cfg.init_from:
            state, sha = _read_trained_heads(cfg.init_from, context.parts)
            if cfg.init_from_sha256 is not None and cfg.init_from_sha256 != sha:
                raise UserInputError(f"mtp_d init_from {cfg.init_from!r}: its head weights changed since this model was "
                                     f"saved (sha256 {sha[:12]}..., expected {cfg.init_from_sha256[:12]}...); the frozen "
                                     f"heads 1..{cfg.frozen_heads} are its heads. Restore that version of the entry, or "
                                     "load an artefact that stores every head")
            cfg.init_from_sha256 = sha
            self.copy_heads_from(state)

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """Every head, or only the trained ones when the frozen heads are a zoo entry's (see ``init_from``)."""
        state = self.state_dict()
        if self.config.shares_frozen_heads:
            state = {k: v for k, v in state.items() if int(k.split(".")[1]) >= self.config.frozen_heads}
        return state

    def copy_heads_from(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise head i from head ``i mod K_trained`` of a trained mtp_d state dict (``heads.<k>.*`` keys)."""
        trained = sorted({int(key.split(".")[1]) for key in state if key.startswith("heads.")})
        if not trained or trained != list(range(len(trained))):
            raise UserInputError(f"expected mtp_d head weights 'heads.0.*' .. 'heads.K-1.*', got heads {trained}")
        with torch.no_grad():
            for i, head in enumerate(self.heads):
                source = i % len(trained)
                prefix = f"heads.{source}."
                own = head.state_dict()
                sub = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                if set(sub) != set(own):
                    raise UserInputError(f"trained head {source} does not fit: missing {sorted(set(own) - set(sub))}, "
                                         f"unexpected {sorted(set(sub) - set(own))}")
                head.load_state_dict({k: v.to(own[k].dtype) for k, v in sub.items()})

    def logits(self, parts: BackboneParts, head: MTPBlock, out: torch.Tensor) -> torch.Tensor:
        """(..., H) head output -> (..., V) logits through the shared output head."""
        return parts.lm_head(head.final_norm(out))

    def loss(self, parts, input_ids, labels, hidden, backbone_logits, *, attention_mask=None, position_ids=None):
        cfg = self.config
        B, T = input_ids.shape
        positions = position_ids if position_ids is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        teacher_all = backbone_logits.detach()  # (B, T, V) stop-gradient: the main head is the teacher
        backbone_pred = teacher_all.argmax(-1)  # (B, T)
        chain_valid = future_labels(labels, cfg.num_heads + 1, position_ids) != -100  # (B, T) every head has a target
        total = hidden.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        correct = []
        h = hidden  # (B, T, H) what head 1 consumes
        for k, (head, a_k, b_k) in enumerate(zip(self.heads, cfg.per_head("alpha"), cfg.per_head("beta"), strict=True),
                                             start=1):
            h = head(parts, h, future_tokens(input_ids, k, 0), positions, attention_mask=attention_mask)  # (B, T, H)
            logits = self.logits(parts, head, h)  # (B, T, V): head k at i predicts token i + k + 1
            target = future_labels(labels, k + 1, position_ids)  # (B, T)
            valid = target != -100
            if valid.any():
                student = logits[valid].float()  # (N, V)
                ce = F.cross_entropy(student, target[valid])
                logs[f"ce_{k}"] = ce.detach()
                total = total + a_k * ce
                if b_k > 0:
                    teacher = future_tokens(teacher_all, k, 0.0)[valid]  # (N, V) main head's logits for token i + k + 1
                    kl = distillation_kl(student, teacher, self.top_n, cfg.temperature, cfg.kl_direction)
                    logs[f"kl_{k}"] = kl.detach()
                    total = total + b_k * kl
            correct.append((logits.argmax(-1) == future_tokens(backbone_pred, k, -1))[chain_valid])  # (N,)
        logs["draft_correct"] = torch.stack(correct)  # (K, N)
        return total, logs

    def drafter(self, parts: BackboneParts) -> MTPDDrafter:
        return MTPDDrafter(self, parts)


def _read_trained_heads(reference: str, parts: BackboneParts) -> tuple[dict[str, torch.Tensor], str]:
    """The head weights of a trained mtp_d artefact (directory or zoo name), checked against this backbone, and
    the SHA-256 of their file."""
    path = Path(resolve_model_path(reference))
    if not (path / MTP_CONFIG).is_file():
        raise UserInputError(f"mtp_d init_from {reference!r} is not a saved lightning-mtp artefact (no {MTP_CONFIG})")
    config = read_mtp_config(path / MTP_CONFIG)
    method = config.get("method") or {}
    if method.get("name") != "mtp_d":
        raise UserInputError(f"mtp_d init_from {reference!r} holds method {method.get('name')!r}, not 'mtp_d'")
    base = config["base_model"]
    if (base["vocab_size"], base["hidden_size"]) != (parts.vocab_size, parts.hidden_size):
        raise UserInputError(f"mtp_d init_from {reference!r} was trained on a base with vocab {base['vocab_size']} and "
                             f"hidden size {base['hidden_size']}, but this backbone has vocab {parts.vocab_size} and "
                             f"hidden size {parts.hidden_size}")
    weights = path / METHOD_WEIGHTS
    return read_safetensors(weights), hashlib.sha256(weights.read_bytes()).hexdigest()


def extend_heads(module, num_heads: int, *, freeze_trained: bool = True):
    """A new MTPModule with ``num_heads`` mtp_d heads: the trained ones kept, new head K + i copied from head i.

    The backbone is shared with ``module``. With ``freeze_trained`` the old heads do not train (the looped
    extension); decoding the result without training is the paper's training-free loop.
    """
    cfg = module.method_config
    if cfg is None or cfg.name != "mtp_d":
        raise UserInputError(f"extend_heads needs an mtp_d model, got method {None if cfg is None else cfg.name!r}")
    if num_heads <= cfg.num_heads:
        raise UserInputError(f"extend_heads: the model has {cfg.num_heads} heads; extend to more than that, got {num_heads}")
    if module.lora is not None:
        raise UserInputError("extend_heads: merge or drop the LoRA adapter first (the extension freezes the backbone)")
    new_cfg = dataclasses.replace(cfg, num_heads=num_heads, frozen_heads=cfg.num_heads if freeze_trained else 0,
                                  init_from=None, init_from_sha256=None)
    hp = module.hparams
    # the module's own class (MTPModule): methods sit below the module layer and never import it
    extended = type(module)(module.backbone, method=new_cfg, freeze_backbone=True, learning_rate=hp.learning_rate,
                         weight_decay=hp.weight_decay, betas=tuple(hp.betas), warmup_ratio=hp.warmup_ratio,
                         min_lr_ratio=hp.min_lr_ratio)
    extended.tokenizer, extended.backbone_ref = module.tokenizer, module.backbone_ref
    extended.method.copy_heads_from(module.method.state_dict())
    return extended


class _HeadInputs(NamedTuple):
    """A head's committed inputs, column by column: ``h`` (B, n, H) the previous head's outputs (the backbone's
    hidden states for head 0), ``ids`` (B, n) the token after each column's position, ``v`` (B, n) the columns
    this head can use, ``cols`` (B, n) the columns the decoder committed."""

    h: torch.Tensor
    ids: torch.Tensor
    v: torch.Tensor
    cols: torch.Tensor

    @staticmethod
    def join(first: _HeadInputs | None, then: _HeadInputs | None) -> _HeadInputs | None:
        """Two runs of columns, one after the other (either may be None)."""
        if first is None or then is None:
            return then if first is None else first
        return _HeadInputs(*(torch.cat([a, b], dim=1) for a, b in zip(first, then, strict=True)))


class MTPDDrafter(CachedChainDrafter):
    """Chain drafting with K heads, each with its own KV cache (see the module docstring for the schedule).

    Per head j (0-based; head j drafts token j + 1): ``carry[j]`` is its output at its last committed position
    (``carry_valid[j]`` says, per row, whether it has one yet); ``head_caches[j]`` counts its committed cache
    entries and the speculative chain entries dropped at the next call. Everything is kept column-aligned with
    the decoder's ``next_ids``: head j's column c sits one position before head j-1's. ``pending[j]`` holds the
    committed inputs head j has not run on yet (its columns, token ids, usable columns and committed columns), from
    steps whose chain did not reach it. Batches (B > 1) mask the
    entries a row cannot use (slots) and carry per-row positions, as the decoder does for the backbone; at batch
    size 1 the unusable columns are always leading ones and are sliced off instead, so no masks are built.
    """

    def __init__(self, method: MTPDHeads, parts: BackboneParts) -> None:
        K = len(method.heads)
        super().__init__(num_heads=K)
        self.method, self.parts = method, parts
        self.carry: list[torch.Tensor | None] = [None] * K  # (B, 1, H)
        self.carry_valid: list[torch.Tensor | None] = [None] * K  # (B,) bool
        self.pending: list[_HeadInputs | None] = [None] * K

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        for state in (self.carry, self.carry_valid):
            for j, value in enumerate(state):
                if value is not None:
                    state[j] = value[rows]
        self.pending = [None if p is None else _HeadInputs(*(t[rows] for t in p)) for p in self.pending]

    def draft(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        k: int,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        method = self.method
        self._check_k(k)
        B, m = next_ids.shape
        device = next_ids.device
        self.begin(B, device, holes=B > 1)  # from the first batched call on, every head tracks slots
        old_carry, old_valid = list(self.carry), list(self.carry_valid)  # before this call's commits
        chain = DraftChain(self, B, device, sampling=probs_fn is not None)
        wanted = k  # drafts still wanted: k, cut short where every row's chain ended (later heads then wait)
        cols = valid if valid is not None else torch.ones(B, m, dtype=torch.bool, device=device)  # (B, m) committed
        new: _HeadInputs | None = _HeadInputs(hidden, next_ids, cols, cols)  # head 0's: the committed positions
        chain_out = hidden[:, :0]  # (B, rows, H) head j-1's chain outputs, positions L-j+2 .. L
        for j, head in enumerate(method.heads):
            inputs = self._inputs(j, new, old_carry, old_valid)
            if j >= wanted:  # no draft wanted from head j: it and the heads after it catch up when one is
                self.pending[j], new = inputs, None
                continue
            self.pending[j] = None
            rows = self._chain_length(j, wanted, B > 1)
            out, n_in, start = self._run_head(j, inputs.h, inputs.v, inputs.ids, chain.tokens, chain_out, rows,
                                              hidden.dtype)
            new = inputs._replace(h=self._commit_outputs(j, out, n_in, start, inputs.v))
            chain_out = out[:, n_in:]
            # draft token j + 1: head j's output at position L (its last chain row; head 0: its carry)
            h_last = out[:, -1:] if j else self.carry[0]  # (B, 1, H)
            tok, p = chain.pick(method.logits(self.parts, head, h_last)[:, -1], probs_fn, generator)
            if not chain.add(tok, p):
                wanted = len(chain)
        return chain.result()  # (B, k') with k' <= k, -1 after a row's chain ended; (B, k', V) when sampling

    drafts_trees = True

    def draft_tree(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, shape: TreeShape,
                   probs_fn=None, generator=None, valid=None, appended=None) -> DraftTree:
        """A tree whose node at depth d proposes its children through head d, run over that node's own path: the d
        chain rows the chain would run (positions L-d+1 .. L, fed the path's tokens and head d-1's rows for the
        node's parent), every node of a level in one call of its head, each seeing the head's committed entries and
        its own rows (a block-causal mask over the head's cache). Each head serves one level, so a tree costs one
        call per head as a chain does, its rows the level's width times as many."""
        depth = min(k, shape.depth, len(self.method.heads))  # a deeper shape is cut to the heads there are
        self.begin(1, next_ids.device, holes=False)
        self._commit_only(hidden, next_ids, valid, depth)
        rows_of: dict[int, torch.Tensor] = {-1: hidden[:, :0]}  # node -> (1, d, H) head d's chain rows for its path

        def expand(tree: DraftTree, nodes: list[int]) -> torch.Tensor:  # (w, V) the logits after each node
            return self._expand(tree, nodes, rows_of, hidden.dtype)

        root = self.method.logits(self.parts, self.method.heads[0], self.carry[0])[0, -1]  # (V,)
        return grow_tree(root, expand, shape.within(depth), self.stop_ids)

    def _check_k(self, k: int) -> None:
        K = len(self.method.heads)
        if k > K:
            raise UserInputError(f"mtp_d has {K} heads, so it drafts at most {K} tokens per step; got num_draft_tokens={k}")

    def _inputs(self, j: int, new: _HeadInputs | None, old_carry: list, old_valid: list) -> _HeadInputs | None:
        """Head j's committed inputs this call: those it waited on, then the new ones (head j sees head j-1's
        outputs one position later: head j-1's carry before this call, then those outputs)."""
        if j and new is not None:
            new = new._replace(**dict(zip(("h", "v"), self._shift(new.h, new.v, new.cols, old_carry[j - 1],
                                                                 old_valid[j - 1]), strict=True)))
        return _HeadInputs.join(self.pending[j], new)

    def _commit_only(self, hidden: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor | None, heads: int) -> None:
        """Feed the committed positions (batch size 1) to heads 0 .. heads-1, no chain rows; later heads wait."""
        m = next_ids.shape[1]
        cols = valid if valid is not None else torch.ones(1, m, dtype=torch.bool, device=next_ids.device)
        old_carry, old_valid = list(self.carry), list(self.carry_valid)
        new: _HeadInputs | None = _HeadInputs(hidden, next_ids, cols, cols)
        for j in range(len(self.method.heads)):
            inputs = self._inputs(j, new, old_carry, old_valid)
            if j >= heads:
                self.pending[j], new = inputs, None
                continue
            self.pending[j] = None
            out, n_in, start = self._run_head(j, inputs.h, inputs.v, inputs.ids, [], hidden[:, :0], 0, hidden.dtype)
            new = inputs._replace(h=self._commit_outputs(j, out, n_in, start, inputs.v))

    def _expand(self, tree: DraftTree, nodes: list[int], rows_of: dict[int, torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
        """Run head d over the chain rows of ``nodes`` (w, all at depth d): their children's logits (w, V)."""
        d = tree.depths[nodes[0]]
        head, hc = self.method.heads[d], self.head_caches[d]
        device = tree.tokens.device
        rows = min(d, self.head_caches[0].committed)  # positions L-d+1 .. L that exist (L + 1 committed)
        carry = self.carry[d - 1] if self.carry[d - 1] is not None else rows_of[-1].new_zeros(1, 1, rows_of[-1].shape[-1])
        h, ids = [], []
        for node in nodes:
            path, parent = [node], tree.parents[node]
            while parent >= 0:
                path.insert(0, parent)
                parent = tree.parents[parent]
            h.append(torch.cat([carry, rows_of[tree.parents[node]]], dim=1)[:, -rows:])  # (1, rows, H)
            ids.append(tree.tokens[path][-rows:])  # (rows,) drafts L-d+2 .. L+1 (the token each row reads)
        w, past = len(nodes), hc.committed + hc.speculative
        own = torch.block_diag(*[torch.ones(rows, rows, dtype=torch.bool, device=device).tril()] * w)  # (w*rows, w*rows)
        allowed = torch.cat([torch.zeros(w * rows, past, dtype=torch.bool, device=device), own], dim=1)
        allowed[:, :hc.committed] = True  # every row sees the committed entries, not another level's speculative ones
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        pos = (hc.committed + torch.arange(rows, device=device)).repeat(w)[None]  # (1, w*rows)
        out = head(self.parts, torch.cat(h, dim=1), torch.stack(ids).flatten()[None], pos, hc.cache,
                   attention_mask=mask[None, None])  # (1, w*rows, H)
        hc.speculative += w * rows
        for a, node in enumerate(nodes):
            rows_of[node] = out[:, a * rows:(a + 1) * rows]
        return self.method.logits(self.parts, head, out[:, rows - 1::rows])[0]  # (w, V) each node's last row

    @staticmethod
    def _shift(h_full: torch.Tensor, v_full: torch.Tensor, cols: torch.Tensor, carry: torch.Tensor | None,
               carry_ok: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head j's inputs from head j-1's: its old carry first, then its committed outputs, cut to m columns."""
        B, m, H = h_full.shape
        carry = carry if carry is not None else h_full.new_zeros(B, 1, H)
        carry_ok = carry_ok if carry_ok is not None else torch.zeros(B, dtype=torch.bool, device=cols.device)
        h_full = torch.cat([carry, h_full], dim=1)[:, :m]  # (B, m, H)
        v_full = torch.cat([carry_ok[:, None], v_full], dim=1)[:, :m] & cols  # (B, m) within the new columns
        return h_full, v_full

    def _chain_length(self, j: int, wanted: int, batched: bool) -> int:
        """Chain rows head j runs (positions L-j+1 .. L), only while drafts are wanted; at batch size 1 rows at
        negative positions (short prompts) do not exist: L + 1 is head 0's committed count."""
        rows = j if j < wanted else 0
        return rows if batched else min(rows, self.head_caches[0].committed)

    def _run_head(self, j: int, h_full: torch.Tensor, v_full: torch.Tensor, next_ids: torch.Tensor,
                  drafts: list[torch.Tensor], chain_out: torch.Tensor, rows: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, int, int]:
        """Head j over its committed columns and its chain rows: ``(out (B, n_in + rows, H), n_in, start)``."""
        B, m = next_ids.shape
        hc = self.head_caches[j]
        # committed columns: at batch size 1 the unusable columns lead, and are cut off
        start = 0 if B > 1 else (int(v_full[0].long().argmax()) if bool(v_full.any()) else m)
        h_in, ids_in, v_in = h_full[:, start:], next_ids[:, start:], v_full[:, start:]
        n_in = m - start
        if rows:  # fed head j-1's new carry and chain outputs, and drafts 1..j
            carry = self.carry[j - 1] if self.carry[j - 1] is not None else h_full.new_zeros(B, 1, h_full.shape[-1])
            chain_h = torch.cat([carry, chain_out], dim=1)[:, -rows:]  # (B, rows, H)
            chain_ids = torch.stack(drafts[-rows:], dim=1).clamp(min=0)  # (B, rows); an ended chain's -1 is unread
        else:
            chain_h, chain_ids = h_in[:, :0], ids_in[:, :0]
        pos, mask = self._positions(j, v_in, rows, dtype)
        x_h = torch.cat([h_in, chain_h], dim=1)  # (B, n_in + rows, H)
        x_ids = torch.cat([ids_in, chain_ids], dim=1)  # (B, n_in + rows)
        if x_h.shape[1]:
            out = self.method.heads[j](self.parts, x_h, x_ids, pos, hc.cache, attention_mask=mask)  # (B, n_in + rows, H)
        else:  # nothing this head can see yet (a prompt shorter than its lag) and no draft wanted from it
            out = x_h
        hc.committed += n_in
        hc.speculative = x_h.shape[1] - n_in
        return out, n_in, start

    def _positions(self, j: int, v_in: torch.Tensor, rows: int, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, n_in + rows) of head j's inputs, and in a batch the mask of the slots each row sees."""
        hc = self.head_caches[j]
        B, n_in = v_in.shape
        if B == 1:
            return torch.arange(hc.committed, hc.committed + n_in + rows, device=v_in.device).expand(B, -1), None
        pos_in = hc.commit_slots(v_in)  # (B, n_in)
        last = self.head_caches[0].positions - 1  # (B,) L: each row's last committed position
        pos_chain = last[:, None] - j + 1 + torch.arange(rows, device=v_in.device)  # (B, rows)
        chain_ok = pos_chain >= 0
        pos = torch.cat([pos_in, pos_chain.clamp(min=0)], dim=1)  # (B, n_in + rows)
        return pos, slot_mask(torch.cat([hc.slots, chain_ok], dim=1), n_in + rows, dtype)

    def _commit_outputs(self, j: int, out: torch.Tensor, n_in: int, start: int, v_full: torch.Tensor) -> torch.Tensor:
        """Head j's committed outputs, column-aligned again (B, m, H); updates its carry."""
        B, m = v_full.shape
        committed = out[:, :n_in]
        if start:
            committed = torch.cat([committed.new_zeros(B, start, out.shape[-1]), committed], dim=1)  # (B, m, H)
        if bool(v_full.any()):
            last_col = (v_full.long() * torch.arange(m, device=v_full.device)).argmax(1)  # (B,) last usable column
            new = committed[torch.arange(B, device=v_full.device), last_col][:, None]  # (B, 1, H)
            has = v_full.any(1)  # (B,)
            if self.carry[j] is None:
                self.carry[j], self.carry_valid[j] = new, has
            else:
                self.carry[j] = torch.where(has[:, None, None], new, self.carry[j])
                self.carry_valid[j] = has | self.carry_valid[j]
        return committed
