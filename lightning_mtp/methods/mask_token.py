"""Mask-token MTP by on-policy self-distillation (Kirchenbauer et al., arXiv 2602.06019).

No new module: the backbone learns to fill ``k - 1`` ``<MTP>`` mask tokens placed after a prefix with the
next ``k`` tokens (the logits at the prefix's last token and at each mask give the k predictions).

The mask token is one embedding row: an unused padded row when the embedding matrix has rows beyond the
tokenizer (as Qwen3 does), else a new special token ``<MTP>`` with the embeddings resized (mean init). The id
is written back into the config, so it is saved with the model and reused on load.

Training (the paper's default; every choice configurable):

1. k is drawn uniformly from ``[k_min, k_max]`` per step (paper: [2, 16]; a static k = 16 was worse).
2. Regions: ``regions_per_sequence`` anchor positions per sequence, drawn uniformly among the response
   positions (those whose next token carries a label). Region r is ``[x_a, <MTP> x (k - 1)]`` where ``x_a`` is
   the anchor token; regions are appended after the sequence's real tokens. Attention (see
   :func:`packed_layout`): real tokens attend as they would alone (they never see a region); a region sees
   the real tokens strictly before its anchor and, causally, its own slots only. Position ids: a region
   continues its anchor's (slot 0 at the anchor's position, masks after it); real tokens keep theirs. Where
   the regions sit in the packed tensor is immaterial (attention and positions are explicit); repeating the
   anchor inside its region puts all k prediction rows of every region at the same trailing indices, so only
   those logits are computed (``logits_to_keep``), whatever the vocabulary size. The repeated anchor has the
   real anchor's token, position and view, hence the same outputs: the packed forward equals one forward
   per region (tested). Masks are additive float 4D masks (a bool mask is wrong with eager attention).
3. Student forward on the packed sequence; rollout y' = argmax of the k rows of each region.
4. Teacher forward on the same layout with the masks replaced by the student's tokens
   (``[x_a, y'_1 .. y'_{k-1}]``): ordinary next-token logits at the same k rows.
5. Loss per prediction row: ``loss="hard"`` (paper default) CE(student, argmax teacher); ``"soft"``: forward
   KL(teacher || student); plus ``entropy_weight`` x the student's entropy (> 0 sharpens its confidence,
   which ConfAdapt reads). Rows after the teacher's first end-of-sequence token carry no loss. No
   ground-truth term. Optional (not in the paper): ``ntp_weight`` x the same loss on every response token's
   own next-token prediction, which keeps the fine-tuned model's greedy decoding that of the initial model.

Teacher: with full fine-tuning, a frozen copy of the initial model, held outside the module's
``state_dict`` (checkpoints do not carry it) and moved to the student's device on first use; it is taken at
the first training step, or just before a checkpoint's weights are loaded (so a resumed run keeps the
initial model as its teacher); under a sharding strategy (FSDP, DeepSpeed) it is read again from the
backbone's name or directory instead, since a copy of sharded weights is not the model. With LoRA, the
same model with the adapter disabled: no second copy (PEFT's ``disable_adapter`` gives the base model's
logits exactly); the mask's input row trains as PEFT trainable tokens (``trainable_token_indices``), saved in
the adapter.

Decoding (:attr:`MaskTokenMTP.decodings`):

- ``"confadapt"`` (lossy): each forward feeds the newly accepted tokens plus ``k_max - 1`` masks and keeps
  the longest leading run of predictions whose top-1 probability is >= tau (at least one).
- ``"static"`` (lossy): always keep k predictions (k - 1 masks per forward).
- ``"speculative"`` (lossless, batched): the shared decoder verifies mask-token drafts. The drafter asks
  for K masks appended to every verify forward (``[token, d_1 .. d_K, <MTP> x K]``); when a row accepted
  every draft, the masks' logits are its next K drafts, otherwise its next step verifies no draft but
  carries the masks again. No second forward per step. Greedy output equals ``backbone.generate``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_mtp.backbone import BackboneParts, eos_ids, forward_params, load_backbone
from lightning_mtp.decoding.conf_adapt import conf_adapt_generate
from lightning_mtp.decoding.drafter import chain_over_positions
from lightning_mtp.decoding.tree import DraftTree, TreeShape, tree_over_positions
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import (
    AppendedOutputs,
    Drafter,
    MethodConfig,
    MethodContext,
    MTPMethod,
    future_labels,
    register_method,
)

__all__ = ["MaskToken", "MaskTokenDrafter", "MaskTokenMTP", "packed_layout", "real_attention"]

LOSSES = ("hard", "soft")
TEACHERS = ("auto", "copy")
DECODINGS = ("confadapt", "static", "speculative")
SWEEP_TAUS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SWEEP_STATIC_K = (1, 2, 3, 4, 5)


@register_method("mask_token")
@dataclass
class MaskToken(MethodConfig):
    """Mask-token MTP: the backbone fills ``<MTP>`` mask tokens with the next tokens (on-policy self-distillation)."""

    trains_backbone_by_default = True  # full fine-tuning, as the paper; lora={...} trains an adapter instead
    summary = ("mask-token multi-token prediction by on-policy self-distillation "
               "(Kirchenbauer et al., arXiv 2602.06019)")
    even_loss_options = {"k_min": 4, "k_max": 4, "regions_per_sequence": 32}  # one k, every position a region

    k_max: int = 16
    """Largest k (predictions from one prefix: its last token plus k - 1 masks); ConfAdapt's predictions per forward."""
    k_min: int = 2
    """Smallest k; each training step draws k uniformly from [k_min, k_max] (k_min = k_max trains a static k)."""
    mask_token_id: int | None = None
    """Embedding row of the mask token; None picks one when the backbone is prepared (an unused padded row,
    else a new ``mask_token``) and records it here."""
    mask_token: str = "<MTP>"
    """Text of the special token added to the tokenizer when the embedding matrix has no unused row."""
    tau: float = 0.9
    """ConfAdapt threshold: keep the leading predictions whose top-1 probability is >= tau, in (0, 1]."""
    loss: str = "hard"
    """``hard``: CE against the teacher's argmax (paper default); ``soft``: KL(teacher || student)."""
    entropy_weight: float = 0.0
    """Weight of the student's entropy added to the loss (>= 0; positive values sharpen its confidence)."""
    ntp_weight: float = 0.0
    """Weight of the same teacher loss on every response token's own next-token prediction (>= 0; 0 = the
    paper): keeps the student's plain decoding, which verifies the lossless mode, that of the initial model."""
    regions_per_sequence: int = 5
    """Mask regions packed into each training sequence (paper: 5), at random response positions."""
    teacher: str = "auto"
    """``auto``: a frozen copy of the initial model for full fine-tuning, the adapter-disabled model with
    LoRA (no second copy); ``copy``: always a frozen copy."""
    teacher_dtype: str | None = None
    """Store the frozen teacher copy in this dtype (e.g. ``bfloat16`` halves it next to fp32 mixed-precision
    weights); None keeps the backbone's."""
    num_speculative_tokens: int = 3
    """K of the lossless ``speculative`` mode: masks appended to each verify forward, hence drafts per step."""
    decoding: str = "confadapt"
    """Default decoding recorded with the model: ``confadapt``, ``static`` or ``speculative`` (lossless)."""

    @property
    def num_draft_tokens(self) -> int:
        return self.num_speculative_tokens

    def validate(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.k_max) or self.k_max < 2:
            raise UserInputError(f"mask_token k_max must be an integer >= 2 (k is drawn from [k_min, k_max]), "
                                 f"got {self.k_max!r}")
        if not is_int(self.k_min) or not 2 <= self.k_min <= self.k_max:
            raise UserInputError(f"mask_token k_min must be an integer in [2, k_max={self.k_max}], got {self.k_min!r}")
        if self.mask_token_id is not None and (not is_int(self.mask_token_id) or self.mask_token_id < 0):
            raise UserInputError(f"mask_token mask_token_id must be a token id >= 0 or None, got {self.mask_token_id!r}")
        if not isinstance(self.mask_token, str) or not self.mask_token.strip():
            raise UserInputError(f"mask_token mask_token must be a non-empty string, got {self.mask_token!r}")
        _check_tau(self.tau)
        if self.loss not in LOSSES:
            raise UserInputError(f"mask_token loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.entropy_weight, (int, float)) or not self.entropy_weight >= 0:
            raise UserInputError(f"mask_token entropy_weight must be a number >= 0, got {self.entropy_weight!r}")
        if not isinstance(self.ntp_weight, (int, float)) or not self.ntp_weight >= 0:
            raise UserInputError(f"mask_token ntp_weight must be a number >= 0, got {self.ntp_weight!r}")
        if not is_int(self.regions_per_sequence) or self.regions_per_sequence < 1:
            raise UserInputError(f"mask_token regions_per_sequence must be an integer >= 1, got {self.regions_per_sequence!r}")
        if self.teacher not in TEACHERS:
            raise UserInputError(f"mask_token teacher must be one of {list(TEACHERS)}, got {self.teacher!r}")
        if self.teacher_dtype is not None and not (
                isinstance(self.teacher_dtype, str) and isinstance(getattr(torch, self.teacher_dtype, None), torch.dtype)
                and getattr(torch, self.teacher_dtype).is_floating_point):
            raise UserInputError(f"mask_token teacher_dtype must be a floating torch dtype name such as 'bfloat16', "
                                 f"'float16' or 'float32', or None; got {self.teacher_dtype!r}")
        if not is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= self.k_max - 1:
            raise UserInputError(f"mask_token num_speculative_tokens must be an integer in [1, k_max - 1 = {self.k_max - 1}], "
                                 f"got {self.num_speculative_tokens!r}")
        if self.decoding not in DECODINGS:
            raise UserInputError(f"mask_token decoding must be one of {list(DECODINGS)}, got {self.decoding!r}")

    def vocab_size_after_prepare(self, vocab_size: int) -> int:
        return vocab_size if self.mask_token_id is None else max(vocab_size, self.mask_token_id + 1)

    def prepare_backbone(self, model, tokenizer) -> None:
        """Choose (or check) the mask token's embedding row; add ``<MTP>`` and resize when there is no free row.

        A given ``mask_token_id`` must be an embedding row that is not an ordinary token of the tokenizer (an
        unused padded row or an added token), or exactly one past the last row: then the row is added again
        (as when loading an adapter trained on a backbone that needed the new row).
        """
        rows = model.get_input_embeddings().weight.shape[0]
        n_tok = len(tokenizer) if tokenizer is not None else None
        existing = tokenizer.get_vocab().get(self.mask_token) if tokenizer is not None else None
        mask_id = self.mask_token_id
        if mask_id is None:
            if existing is not None:
                raise UserInputError(
                    f"the tokenizer already has a token {self.mask_token!r} (id {existing}): pass "
                    f"mask_token_id={existing} to use it as the mask token, or choose another mask_token text"
                )
            if n_tok is not None and rows > n_tok:
                self.mask_token_id = n_tok  # the first unused padded row (Qwen3-4B-Inst-2507-MTP used 151669)
            else:
                self.mask_token_id = self._add_row(model, tokenizer, rows)
            return
        if existing is not None and existing != mask_id:
            raise UserInputError(f"mask_token_id is {mask_id} but the tokenizer has {self.mask_token!r} at id {existing}; "
                                 f"pass mask_token_id={existing}")
        if mask_id < rows:
            if tokenizer is not None and mask_id < n_tok and existing != mask_id \
                    and mask_id not in tokenizer.added_tokens_decoder:
                word = tokenizer.convert_ids_to_tokens(mask_id)
                raise UserInputError(f"mask_token_id {mask_id} is the ordinary token {word!r} of the tokenizer; use an "
                                     f"unused embedding row (>= {n_tok}, < {rows}), an added special token, or None")
            return
        if mask_id == rows and (n_tok is None or n_tok == rows):
            self._add_row(model, tokenizer, rows)
            return
        raise UserInputError(f"mask_token_id {mask_id} is outside the vocabulary: the backbone has {rows} embedding rows "
                             f"(valid ids 0..{rows - 1}, or {rows} to add a {self.mask_token!r} row; None chooses)")

    def _add_row(self, model, tokenizer, rows: int) -> int:
        """Add the mask token as a new embedding row ``rows``, and to the tokenizer if any.

        The new input (and untied output) row is the mean of the old rows, set exactly: ``mean_resizing`` would
        sample around the mean, and a LoRA artefact does not carry the resized matrices (only the trained input
        row), so loading must rebuild the same row.
        """
        if tokenizer is not None:
            tokenizer.add_tokens([self.mask_token], special_tokens=True)
            new_id = tokenizer.convert_tokens_to_ids(self.mask_token)
            if new_id != rows:
                raise UserInputError(f"adding {self.mask_token!r} to the tokenizer gave id {new_id}, but the new embedding "
                                     f"row is {rows}; the tokenizer ({len(tokenizer)} tokens) and the embeddings disagree")
        model.resize_token_embeddings(rows + 1, mean_resizing=False)
        with torch.no_grad():
            for layer in {id(m.weight): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                          if m is not None}.values():  # a tied output layer is the input matrix: set once
                layer.weight[rows] = layer.weight[:rows].float().mean(0).to(layer.weight.dtype)
        return rows

    def build(self, parts: BackboneParts) -> MaskTokenMTP:
        return MaskTokenMTP(self, parts)


def _check_tau(tau: Any) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise UserInputError(f"mask_token tau must be a number in (0, 1], got {tau!r}")


# ---------------------------------------------------------------------------------------------- packed layout


def real_attention(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, input_ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What each real token sees, (B, T, T) bool, and its position id (B, T), from a training batch.

    ``attention_mask`` is a (B, T) 0/1 right-padding mask, an additive float (B, 1, T, T) mask (packed
    documents, 0 where allowed), or None (all tokens real, causal).
    """
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask[:, 0] == 0  # (B, T, T)
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        allowed = causal.expand(B, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]  # keys that are padding are never seen
    if position_ids is None:
        position_ids = torch.arange(T, device=device).expand(B, T)
    return allowed, position_ids


def packed_layout(allowed: torch.Tensor, positions: torch.Tensor, anchors: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B, L, L) bool and position ids (B, L) of a sequence with R regions of width k appended.

    ``allowed`` (B, T, T): what each real token sees; ``positions`` (B, T) their position ids; ``anchors``
    (B, R) the index of each region's anchor token. ``L = T + R * k``; region r occupies columns
    ``T + r * k .. T + (r + 1) * k - 1`` and holds ``[anchor, <MTP> x (k - 1)]``. Real rows keep ``allowed``
    and never see a region; the slots of region r see what the anchor sees except the anchor itself (their
    own slot 0 stands in for it) and, causally, their own region's slots. Positions of region r:
    ``positions[anchor] + 0 .. k - 1``.
    """
    B, T, _ = allowed.shape
    R = anchors.shape[1]
    L = T + R * k
    device = allowed.device
    out = torch.zeros(B, L, L, dtype=torch.bool, device=device)
    out[:, :T, :T] = allowed
    prefix = allowed.gather(1, anchors[:, :, None].expand(B, R, T)).clone()  # (B, R, T) what each anchor sees
    prefix.scatter_(2, anchors[:, :, None], False)  # ... but its own real copy: slot 0 replaces it
    out[:, T:, :T] = prefix[:, :, None, :].expand(B, R, k, T).reshape(B, R * k, T)
    own = torch.ones(k, k, dtype=torch.bool, device=device).tril()  # (k, k) causal inside a region
    out[:, T:, T:] = torch.block_diag(*[own] * R)  # (R k, R k): no region sees another
    region_pos = positions.gather(1, anchors)[:, :, None] + torch.arange(k, device=device)  # (B, R, k)
    return out, torch.cat([positions, region_pos.reshape(B, R * k)], dim=1)  # (B, L, L), (B, L)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> additive float (B, 1, L, L): 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _logits_at(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, first: int
               ) -> torch.Tensor:
    """Logits (B, L - first, V) of ``model`` at columns ``first..L-1`` only (what the regions predict)."""
    L = ids.shape[1]
    kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": False}
    if "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = L - first  # the regions sit at the end
    logits = model(input_ids=ids, **kwargs).logits
    return logits[:, -(L - first):]


# ---------------------------------------------------------------------------------------------- the method


class MaskTokenMTP(MTPMethod):
    """Trains the backbone itself (or its LoRA adapter) to fill mask tokens; decodes with ConfAdapt, static k
    or lossless verification. Holds no parameters of its own."""

    decodings = ("confadapt", "static", "speculative")

    def __init__(self, config: MaskToken, parts: BackboneParts) -> None:
        super().__init__(config)
        if config.mask_token_id is None:
            raise UserInputError("mask_token: the mask token id is chosen by prepare_backbone; build the method "
                             "through MTPModule (or call MaskToken.prepare_backbone first)")
        if config.mask_token_id >= parts.vocab_size:
            raise UserInputError(f"mask_token_id {config.mask_token_id} is outside the backbone's vocabulary "
                             f"({parts.vocab_size} rows)")
        object.__setattr__(self, "_teacher", None)  # not a submodule: never in state_dict or checkpoints
        self._eos: set[int] = set()

    # ------------------------------------------------------------------ set-up
    def attach(self, context: MethodContext) -> None:
        self._eos = eos_ids(context.base_model)
        if context.lora is not None:
            _train_row_in_adapter(context.backbone, self.config.mask_token_id)
        # a checkpoint's weights replace the initial ones: take the teacher copy before they do
        context.on_load_state_dict(lambda: self._snapshot_teacher(context))

    def _teacher_kind(self, context: MethodContext) -> str:
        if self.config.teacher == "copy":
            return "copy"
        if context.lora is not None:
            return "adapter"
        return "copy" if context.backbone_trains else "self"

    def _snapshot_teacher(self, context: MethodContext) -> None:
        if self._teacher is None and self._teacher_kind(context) == "copy":
            if context.is_sharded:  # FSDP already split the weights: read the initial model again
                teacher = self.load_teacher(context)
            else:
                teacher = copy.deepcopy(context.backbone)  # a PeftModel copy runs with its adapter disabled
            teacher.eval().requires_grad_(False)
            if self.config.teacher_dtype is not None:
                teacher.to(getattr(torch, self.config.teacher_dtype))
            object.__setattr__(self, "_teacher", teacher)

    def load_teacher(self, context: MethodContext):
        """The initial model read again from the module's backbone reference, with its mask row prepared.

        Used when the backbone's weights are already sharded (FSDP wraps the module before the first step):
        each process then holds its own unsharded frozen teacher.
        """
        ref = context.backbone_ref
        if not ref:
            raise UserInputError("mask_token: the backbone is sharded and was given as a model object, so its initial "
                             "weights cannot be read again for the teacher; pass the backbone by name or directory, "
                             "or train with LoRA (teacher = the adapter-disabled model)")
        dtype = next(p for p in context.backbone.parameters() if p.is_floating_point()).dtype
        teacher, tokenizer = load_backbone(ref, dtype=dtype)
        self.config.prepare_backbone(teacher, tokenizer)  # the id is set: this only re-adds a row the student got
        return teacher

    def teacher_logits(self, context: MethodContext, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, first: int
                       ) -> torch.Tensor:
        """The teacher's logits (B, L - first, V), without gradients (see the module docstring for who it is)."""
        kind = self._teacher_kind(context)
        with torch.no_grad():
            if kind == "self":
                return _logits_at(context.backbone, ids, mask, positions, first)
            if kind == "adapter":
                with context.backbone.disable_adapter():
                    return _logits_at(context.backbone, ids, mask, positions, first)
            self._snapshot_teacher(context)
            teacher = self._teacher
            device = ids.device
            if next(teacher.parameters()).device != device:
                teacher.to(device)  # lazily: the module's .to() does not reach it
            if hasattr(teacher, "disable_adapter"):
                with teacher.disable_adapter():
                    return _logits_at(teacher, ids, mask, positions, first)
            return _logits_at(teacher, ids, mask, positions, first)

    # ------------------------------------------------------------------ training
    def training_loss(self, context: MethodContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pack regions, roll the student out, label with the teacher, and score (see the module docstring).

        In eval mode (validation) k is ``k_max`` and anchors come from a fixed seed, so validation numbers
        compare across evaluations; ``draft_correct`` then holds the teacher agreement of mask positions
        1..num_speculative_tokens, and ``agree_j`` logs it for every position j (0 = the next token itself).
        """
        cfg: MaskToken = self.config
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        B, T = input_ids.shape
        training = context.training
        generator = None if training else torch.Generator(device=input_ids.device).manual_seed(0)
        k = int(torch.randint(cfg.k_min, cfg.k_max + 1, (1,))) if training else cfg.k_max
        can_anchor, anchors, region_ok = _draw_anchors(labels, position_ids, min(cfg.regions_per_sequence, T), generator)
        R = anchors.shape[1]

        allowed, positions = real_attention(attention_mask, position_ids, input_ids)
        layout, packed_pos = packed_layout(allowed, positions, anchors, k)  # (B, L, L), (B, L)
        mask = additive_mask(layout, context.parts.embed_tokens.weight.dtype)  # (B, 1, L, L)
        anchor_ids = input_ids.gather(1, anchors)  # (B, R)
        masks = anchor_ids.new_full((B, R, k - 1), cfg.mask_token_id)
        first = 0 if cfg.ntp_weight > 0 else T  # the real tokens' logits only feed the optional NTP term
        with torch.set_grad_enabled(training and context.backbone_trains):
            student_all = _logits_at(context.backbone, _with_regions(input_ids, anchor_ids, masks), mask, packed_pos,
                                     first)
        student = student_all[:, -R * k :].float().view(B, R, k, -1)  # (B, R, k, V)
        rollout = student.detach().argmax(-1)  # (B, R, k): y'_1 .. y'_k

        teacher_ids = _with_regions(input_ids, anchor_ids, rollout[:, :, : k - 1])  # (B, L)
        teacher_all = self.teacher_logits(context, teacher_ids, mask, packed_pos, first)
        teacher = teacher_all[:, -R * k :].float().view(B, R, k, -1)  # (B, R, k, V)
        target = teacher.argmax(-1)  # (B, R, k)
        weight = self._scored(region_ok, target)  # (B, R, k)

        loss, logs = self._region_loss(student, teacher, weight, training)
        if cfg.ntp_weight > 0:  # every response token's next-token prediction, against the teacher's
            loss = loss + cfg.ntp_weight * _ntp_term(student_all[:, :T], teacher_all[:, :T], can_anchor, cfg.loss, logs)
        logs.update(_agreement_logs(rollout == target, weight, training, cfg.num_speculative_tokens))
        return loss, logs

    def _region_loss(self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, training: bool
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation loss of the region positions (student and teacher logits (B, R, k, V)) where ``weight``
        (B, R, k) scores, plus the entropy term when it has a weight (always logged in validation)."""
        cfg: MaskToken = self.config
        w = weight.float()
        denom = w.sum().clamp(min=1.0)
        log_p = F.log_softmax(student, dim=-1)  # (B, R, k, V)
        loss = (_distill(log_p, teacher, cfg.loss) * w).sum() / denom
        logs: dict[str, torch.Tensor] = {cfg.loss + "_loss": loss.detach()}
        if cfg.entropy_weight > 0 or not training:
            entropy = (-(log_p.exp() * log_p).sum(-1) * w).sum() / denom
            if cfg.entropy_weight > 0:
                loss = loss + cfg.entropy_weight * entropy
            logs["entropy"] = entropy.detach()
        return loss, logs

    def _scored(self, region_ok: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, R, k) bool: the region positions that score, i.e. real regions up to the teacher's first EOS."""
        weight = region_ok[:, :, None].expand(target.shape).clone()  # (B, R, k)
        if self._eos:
            is_eos = torch.zeros_like(target, dtype=torch.bool)
            for e in self._eos:
                is_eos |= target == e
            after_eos = (is_eos.long().cumsum(2) - is_eos.long()) > 0  # a row after the teacher's first EOS
            weight &= ~after_eos
        return weight

    # ------------------------------------------------------------------ decoding
    def drafter(self, parts: BackboneParts) -> MaskTokenDrafter:
        return MaskTokenDrafter(self.config.mask_token_id)

    def generate(self, context: MethodContext, input_ids: torch.Tensor, *, decoding: str, **options: Any):
        """ConfAdapt (``tau``, ``k``: predictions per forward, default ``k_max``) or static k (``k``), one
        sequence at a time; both are lossy. ``"speculative"`` (lossless) goes through the shared decoder."""
        cfg: MaskToken = self.config
        if decoding not in ("confadapt", "static"):
            raise UserInputError(f"method 'mask_token' has no decoding {decoding!r}; choose one of {list(self.decodings)}")
        own = {"confadapt": ("tau", "k"), "static": ("k",)}[decoding]
        common = ("max_new_tokens", "streamer", "do_sample", "temperature", "top_p", "top_k", "generator")
        unknown = sorted(set(options) - set(own) - set(common))
        if unknown:
            raise UserInputError(f"unknown option(s) {unknown} for mask_token decoding {decoding!r}; its options are {list(own)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise UserInputError(
                f"mask_token decoding {decoding!r} is lossy and decodes one sequence at a time, got input_ids of "
                f"shape {tuple(input_ids.shape)}; decode the rows one by one, or use decoding='speculative' "
                "(lossless, batched)"
            )
        k = options.pop("k", None)
        if decoding == "confadapt":
            tau = options.pop("tau", None)
            tau = cfg.tau if tau is None else tau
            _check_tau(tau)
            k = cfg.k_max if k is None else k
        else:
            tau = None
            if k is None:
                raise UserInputError("mask_token decoding 'static' needs k (tokens kept per forward, 1 = plain greedy)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserInputError(f"mask_token k (predictions per forward) must be an integer >= 1, got {k!r}")
        return conf_adapt_generate(context.backbone, input_ids, mask_token_id=cfg.mask_token_id, k=k, tau=tau,
                                   **options)

    def bench_entries(self, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """ConfAdapt at the configured tau and the lossless mode; ``sweep`` adds ConfAdapt over tau and static k."""
        tau = self.config.tau
        entries = [(f"mask_token/confadapt@{tau:g}", {"decoding": "confadapt", "tau": tau}),
                   ("mask_token/lossless", {"decoding": "speculative"})]
        if sweep:
            entries += [(f"mask_token/confadapt@{t:g}", {"decoding": "confadapt", "tau": t})
                        for t in SWEEP_TAUS if t != tau]
            entries += [(f"mask_token/static@{k}", {"decoding": "static", "k": k}) for k in SWEEP_STATIC_K]
        return entries


def _draw_anchors(labels: torch.Tensor, position_ids: torch.Tensor | None, R: int, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R anchors per row among the response positions (the next token carries a label), uniformly without
    replacement: ``(can_anchor (B, T), anchors (B, R), region_ok (B, R))``; a row with fewer response positions
    than R gets regions that score nothing (``region_ok`` False)."""
    can_anchor = future_labels(labels, 1, position_ids) != -100  # (B, T)
    scores = torch.rand(labels.shape, device=labels.device, generator=generator).masked_fill(~can_anchor, -1.0)
    anchors = scores.topk(R, dim=1).indices  # (B, R)
    return can_anchor, anchors, can_anchor.gather(1, anchors)


def _with_regions(input_ids: torch.Tensor, anchor_ids: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """The packed sequence (B, T + R * k): the real tokens, then each region [anchor token, its k - 1 ``tail``
    tokens] (``anchor_ids`` (B, R), ``tail`` (B, R, k - 1): the masks for the student, its rollout for the teacher)."""
    regions = torch.cat([anchor_ids[:, :, None], tail], dim=2)  # (B, R, k)
    return torch.cat([input_ids, regions.reshape(input_ids.shape[0], -1)], dim=1)


def _distill(log_p: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row loss (...,) of student log-probabilities (..., V) against teacher logits (..., V)."""
    if loss == "hard":
        return -log_p.gather(-1, teacher.argmax(-1, keepdim=True))[..., 0]  # CE against the teacher's argmax
    log_q = F.log_softmax(teacher, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(teacher || student)



def _ntp_term(student: torch.Tensor, teacher: torch.Tensor, scored: torch.Tensor, loss: str,
              logs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token term over the real tokens (B, T, V) where ``scored`` (B, T); logs it and its agreement."""
    w_ntp = scored.float()  # (B, T)
    ntp_log_p = F.log_softmax(student.float(), dim=-1)  # (B, T, V)
    teacher_ntp = teacher.float()
    ntp = (_distill(ntp_log_p, teacher_ntp, loss) * w_ntp).sum() / w_ntp.sum().clamp(min=1.0)
    logs["ntp_loss"] = ntp.detach()
    same = ntp_log_p.detach().argmax(-1) == teacher_ntp.argmax(-1)
    logs["ntp_agreement"] = (same.float() * w_ntp).sum() / w_ntp.sum().clamp(min=1.0)
    return ntp


def _agreement_logs(agree: torch.Tensor, weight: torch.Tensor, training: bool, K: int) -> dict[str, torch.Tensor]:
    """Student/teacher agreement (B, R, k) over the scored positions ``weight``: overall, and in validation per
    position j and as ``draft_correct`` (K, N) for the acceptance metrics."""
    w = weight.float()
    k = agree.shape[2]
    logs = {"agreement": (agree.float() * w).sum() / w.sum().clamp(min=1.0)}
    if training:
        logs["k"] = torch.tensor(float(k))
        return logs
    for j in range(k):
        wj = w[:, :, j]
        logs[f"agree_{j}"] = (agree[:, :, j].float() * wj).sum() / wj.sum().clamp(min=1.0)
    chain = weight[:, :, : K + 1].all(-1)  # (B, R) regions scored at every draft position
    logs["draft_correct"] = agree[:, :, 1 : K + 1][chain].T  # (K, N): mask j against the teacher
    return logs

def _train_row_in_adapter(peft_model, mask_id: int) -> None:
    """Make the mask row trainable in the LoRA adapter as PEFT trainable tokens (saved with the adapter)."""
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import set_additional_trainable_modules

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    given = config.trainable_token_indices
    if given is not None:
        indices = given if isinstance(given, list) else [i for ids in given.values() for i in ids]
        if mask_id not in indices:
            raise UserInputError(f"lora trainable_token_indices {given} leaves out the mask token {mask_id}; add it, "
                             "or leave trainable_token_indices out (mask_token then trains the mask row itself)")
        return
    config.trainable_token_indices = [mask_id]
    # The mask token is only ever an input: train its input row alone, also where the output head shares the
    # embedding matrix (no tied output adapter, whose alias key PEFT cannot load back when it saves resized
    # embeddings).
    model_config = {**BaseTuner.get_model_config(peft_model), "tie_word_embeddings": False}
    set_additional_trainable_modules(model=peft_model.base_model.model, peft_config=config, model_config=model_config,
                                     adapter_name=name)


class MaskTokenDrafter(Drafter):
    """Drafts from the K mask tokens the shared decoder appends to every verify forward.

    Where a row accepted every draft it verified, the masks sat right after its committed sequence: their
    predictions are its next drafts. Elsewhere the row gets no draft this time (its next forward verifies
    nothing but carries fresh masks, whose predictions then continue the sequence).
    """

    drafts_trees = True

    def __init__(self, mask_token_id: int) -> None:
        self.mask_token_id = mask_token_id

    def draft_tree(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, shape: TreeShape,
                   probs_fn=None, generator=None, valid=None, appended=None) -> DraftTree:
        """A tree over the masks' predictions: mask j's top tokens are the candidates at depth j + 1 whatever
        their parent (the masks predict each position from the committed sequence alone). Empty where the masks did
        not follow the committed sequence (the path left the main chain they rode along)."""
        if appended is None:
            raise UserInputError("MaskTokenDrafter drafts from the mask tokens a decoder appends (Drafter.appended_tokens); "
                                 "use it with lightning_mtp.decoding.speculative_generate")
        if not bool(appended.complete.all()):
            return DraftTree.empty(next_ids.device)
        return tree_over_positions(appended.logits[0, :k], shape, self.stop_ids)  # mask j: the token j after the next

    def appended_tokens(self, k: int) -> torch.Tensor:
        return torch.full((k,), self.mask_token_id, dtype=torch.long)

    def draft(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        k: int,
        probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
        appended: AppendedOutputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if appended is None:
            raise UserInputError("MaskTokenDrafter drafts from the mask tokens a decoder appends (Drafter.appended_tokens); "
                             "use it with lightning_mtp.decoding.speculative_generate")
        # (B, k, V): mask j predicts the token j after the next one
        drafts, probs = chain_over_positions(self, appended.logits[:, :k], probs_fn, generator)
        complete = appended.complete  # (B,)
        if bool(complete.all()):
            return drafts, probs
        if drafts.shape[0] == 1:  # nothing usable: no drafts this step
            return drafts[:, :0], (probs[:, :0] if probs is not None else None)
        return drafts.masked_fill(~complete[:, None], -1), probs

    def select(self, rows: torch.Tensor) -> None:
        """Nothing to do: the drafter keeps no per-row state."""
