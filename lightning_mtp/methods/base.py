"""The method interface: :class:`MTPMethod` and the label arithmetic methods share.

The registry (:class:`MethodConfig`, :func:`register_method`) lives in :mod:`lightning_mtp.methods.registry` and
the drafter interface in :mod:`lightning_mtp.decoding.drafter`; both are re-exported here. A method is one file holding a config dataclass registered with :func:`register_method` and the
``nn.Module`` it builds. The module trains through :meth:`MTPMethod.loss` and drafts through the
:class:`Drafter` it returns from :meth:`MTPMethod.drafter`; the shared lossless decoder verifies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_mtp.backbone import BackboneParts, hidden_grab
from lightning_mtp.decoding.drafter import AppendedOutputs, DraftChain, Drafter
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.registry import METHODS, MethodConfig, register_method, resolve_method

__all__ = ["METHODS", "AppendedOutputs", "Drafter", "DraftChain", "MTPMethod", "MethodConfig", "MethodContext", "future_labels", "future_tokens", "main_head_metrics", "register_method", "resolve_method"]


def future_tokens(ids: torch.Tensor, offset: int, fill: float) -> torch.Tensor:
    """``out[:, i] = ids[:, i + offset]``, and ``fill`` where ``i + offset`` runs past the end.

    The one place that says which token lies k positions ahead: a head at position i that is fed the
    token ``future_tokens(ids, k)`` predicts ``future_tokens(labels, k + 1)``, and the main head's logits for
    that same token are ``future_tokens(logits, k)``. ``ids`` is (B, T) or (B, T, ...).
    """
    T = ids.shape[1]
    out = ids.new_full(ids.shape, fill)  # (B, T, ...)
    if offset < T:
        out[:, : T - offset] = ids[:, offset:]
    return out


def future_labels(labels: torch.Tensor, offset: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, i] = labels[:, i + offset]``, or -100 past the end and, with packed documents (``position_ids``
    restarting per document), wherever position ``i + offset`` lies in another document than ``i``."""
    out = future_tokens(labels, offset, -100)  # (B, T)
    if position_ids is not None:
        same_doc = future_tokens(position_ids, offset, -1) == position_ids + offset  # (B, T)
        out = out.masked_fill(~same_doc, -100)
    return out


def main_head_metrics(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """The backbone's own next-token cross-entropy and accuracy on ``labels`` (logged as ``main_ce`` and
    ``main_acc`` during validation, so joint training's effect on the main head shows)."""
    with torch.no_grad():
        target = future_labels(labels, 1, position_ids)  # (B, T) the token each position predicts
        valid = target != -100
        if not valid.any():
            return {}
        flat = logits[valid].float()  # (N, V)
        return {
            "main_ce": torch.nn.functional.cross_entropy(flat, target[valid]),
            "main_acc": (flat.argmax(-1) == target[valid]).float().mean(),
        }


class MethodContext:
    """What a method sees of the model it is attached to, and all it may use.

    The owning :class:`~lightning_mtp.module.MTPModule` builds one and hands it to :meth:`MTPMethod.attach`,
    :meth:`MTPMethod.training_loss` and :meth:`MTPMethod.generate`, instead of itself: the backbone and its parts,
    whether the backbone trains, and the LoRA handle. The values are live (merging the adapter replaces
    ``backbone`` and ``parts``; ``training`` follows train/eval), so a method reads them when it needs them rather
    than keeping copies.
    """

    def __init__(self, owner: nn.Module) -> None:
        self._owner = owner  # the MTPModule: read through the properties below, never handed to the method

    @property
    def backbone(self) -> nn.Module:
        """The causal LM, wrapped by PEFT when a LoRA adapter trains."""
        return self._owner.backbone

    @property
    def parts(self) -> BackboneParts:
        """Handles into the backbone (embeddings, lm_head, layers, config)."""
        return self._owner.parts

    @property
    def lora(self) -> dict | None:
        """The LoRA configuration (PEFT ``LoraConfig`` arguments), None without an adapter."""
        return self._owner.lora

    @property
    def backbone_ref(self) -> str:
        """How the backbone was named (directory, zoo name, Hub id); "" for a model object."""
        return self._owner.backbone_ref

    @property
    def training(self) -> bool:
        """Train or eval mode of the owning module."""
        return self._owner.training

    @property
    def base_model(self) -> PreTrainedModel:
        """The backbone without its LoRA wrapper."""
        return self._owner.base_model

    @property
    def backbone_trains(self) -> bool:
        """Whether any backbone weight (its own, or its LoRA adapter's) has ``requires_grad``."""
        return any(p.requires_grad for p in self.backbone.parameters())

    @property
    def is_sharded(self) -> bool:
        """Whether a sharding strategy (FSDP, FSDP2, DeepSpeed) may have split the weights across processes."""
        return self._owner.is_sharded

    def on_load_state_dict(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` before a state dict (a checkpoint's weights) is loaded into the model."""
        self._owner.register_load_state_dict_pre_hook(lambda *args, **kwargs: hook())


class MTPMethod(nn.Module):
    """A trainable multi-token-prediction method attached to a backbone.

    What a method overrides:

    - :meth:`loss` (most methods): the loss from one backbone forward's final hidden states. The default
      :meth:`training_loss` runs that forward (with gradients only when the backbone trains).
    - :meth:`training_loss` (methods that drive the backbone themselves, e.g. with mask tokens or a teacher).
    - :meth:`drafter`: what proposes drafts for the shared lossless decoder.
    - :meth:`generate` and :attr:`decodings` (optional): extra decoding modes of the method's own, e.g. a
      lossy one; ``"speculative"`` (lossless, through :meth:`drafter`) is always available.
    - :meth:`bench_entries`: the decoders ``lightning-mtp bench`` runs for this method.
    """

    config: MethodConfig
    needs_token_counts: bool = False
    hidden_layers: tuple[int, ...] | None = None
    """The backbone hidden states :meth:`loss` reads: None for the final one (after the final norm), or decoder-layer
    ids whose outputs are joined (:class:`~lightning_mtp.backbone.LayerOutputs`; EAGLE-3's low, mid and high features).
    Its drafter sets :attr:`Drafter.hidden_layers` alike, so decoding reads the same states."""
    decodings: tuple[str, ...] = ("speculative",)
    """Decoding modes :meth:`MTPModule.generate` accepts for this method (``decoding=...``)."""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def attach(self, context: MethodContext) -> None:
        """Called once the owning MTPModule is built (default: nothing); e.g. to set up a teacher."""

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters a saved artefact stores (default: all of the method's state)."""
        return self.state_dict()

    def training_loss(self, context: MethodContext, batch: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of the model ``context`` describes.

        The batch holds ``input_ids`` and ``labels`` (B, T), and optionally ``attention_mask`` (a (B, T)
        padding mask, or an additive float (B, 1, T, T) mask such as the block-diagonal one of packed
        documents) and ``position_ids`` (B, T). Runs the backbone once (with gradients only when some
        backbone weight trains), hands its final hidden states to :meth:`loss`, and adds the backbone's own
        next-token loss when it trains.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        trains_backbone = context.training and context.backbone_trains
        with torch.set_grad_enabled(trains_backbone), hidden_grab(context.parts, self.hidden_layers) as grab:
            out = context.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels if trains_backbone else None,
                **grab.kwargs,
            )
            hidden = grab.get(out)  # (B, T, H) the final hidden state (after the final norm), or the layers' outputs
        loss, logs = self.loss(
            context.parts, input_ids, labels, hidden, out.logits,
            attention_mask=attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None,
            position_ids=position_ids,
        )
        if trains_backbone and out.loss is not None:
            logs["ntp_loss"] = out.loss.detach()
            loss = loss + out.loss
        if not context.training:  # the main head's own quality, to see whether joint training hurt it
            logs.update(main_head_metrics(out.logits, labels, position_ids))
        return loss, logs

    def loss(
        self,
        parts: BackboneParts,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, T), -100 where no loss
        hidden: torch.Tensor,  # (B, T, H) the backbone's final hidden states
        backbone_logits: torch.Tensor,  # (B, T, V) the main head's logits (with gradient when the backbone trains)
        *,
        attention_mask: torch.Tensor | None = None,  # (B, 1, T, T) additive, only for non-causal layouts (packing)
        position_ids: torch.Tensor | None = None,  # (B, T), None means 0..T-1
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the training loss and, under ``"draft_correct"``, a (K, N) bool tensor of teacher-forced
        matches with the backbone's greedy token ``backbone_logits.argmax(-1)`` (for acceptance metrics), plus
        anything else to log. Detach ``backbone_logits`` before using them as a teacher.

        Heads with attention must use ``attention_mask`` and ``position_ids`` when given, so that packed
        documents stay isolated as they are in the backbone. Labels are -100 wherever no loss belongs
        (prompts, padding, and the first token of each packed document).
        """
        raise NotImplementedError

    def drafter(self, parts: BackboneParts) -> Drafter:
        raise NotImplementedError

    def generate(self, context: MethodContext, input_ids: torch.Tensor, *, decoding: str, **options: Any):
        """Decode with one of the method's own modes (any of :attr:`decodings` but ``"speculative"``)."""
        raise UserInputError(f"method {self.config.name!r} has no decoding {decoding!r}; choose one of {list(self.decodings)}")

    def bench_entries(self, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """``(entry name, generate options)`` for each decoder ``lightning-mtp bench`` runs for this method.

        Names start with the method's registered name (``mask_token/confadapt@0.9``); the default is its
        lossless speculative decoding. ``sweep`` (``lightning-mtp bench --sweep``) asks for the method's
        speed/accuracy curve too, e.g. several thresholds or draft lengths.
        """
        return [(self.config.name, {"decoding": "speculative"})]

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        """Hook run before training with the training data's token counts, if :attr:`needs_token_counts`."""
