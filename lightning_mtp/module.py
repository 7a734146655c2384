"""MTPModule: a LightningModule that wraps any causal LM with a pluggable multi-token-prediction method."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

import lightning_mtp.methods  # noqa: F401  (registers the built-in methods)
import lightning_mtp.upload as upload
from lightning_mtp.artifacts import load_artifact, save_artifact
from lightning_mtp.backbone import BackboneParts, backbone_parts, load_backbone, pad_token_id
from lightning_mtp.callbacks import ExactResume
from lightning_mtp.checkpoint import (
    IDENTITY_KEY,
    check_identity,
    install_on_wrapper,
    install_trained_state_dict,
    run_identity,
)
from lightning_mtp.decoding.speculative import (
    GenerateOutput,
    check_generate_inputs,
    needs_row_by_row,
    speculative_generate,
)
from lightning_mtp.decoding.tree import TreeShape
from lightning_mtp.errors import UserInputError
from lightning_mtp.methods.base import MethodConfig, MethodContext, MTPMethod, resolve_method
from lightning_mtp.metrics import AcceptanceRate

__all__ = ["MTPModule"]

class MTPModule(L.LightningModule):
    """A backbone plus an MTP method, trainable with plain Lightning and decodable losslessly.

    Args:
        backbone: a local model directory, a shipped zoo name (``tiny-math-base``), a Hub id, or a loaded
            ``PreTrainedModel``.
        method: a registered method name (``"fast_mtp"``), a mapping ``{"name": ..., **options}``, a method
            config instance (``FastMTP(num_steps=3)``), or None for plain next-token training of the backbone.
        lora: PEFT ``LoraConfig`` keyword arguments (e.g. ``{"r": 8, "target_modules": "all-linear"}``) to
            train a LoRA adapter on the backbone; None trains no adapter.
        freeze_backbone: keep the backbone's own weights fixed? Default: frozen when a method is given (only
            the method's parameters train) unless the method trains the backbone itself (mask_token), trained
            when ``method`` is None.
        from_scratch: build the backbone with random weights from the directory's ``config.json``
            (used to train the tiny-math base and draft models).
        config_overrides: fields of the backbone's config to change before building or loading it, e.g.
            ``{"num_hidden_layers": 2}``.
        dtype: dtype the backbone is loaded in (``"auto"`` keeps the checkpoint's).
        attn_implementation: transformers attention kernel (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``);
            None lets transformers choose.
        trust_remote_code: passed to transformers; off unless you ask for it.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: fraction of the total steps spent warming the learning rate up linearly.
        min_lr_ratio: the cosine schedule decays to ``learning_rate * min_lr_ratio``.
    """

    def __init__(
        self,
        backbone: str | PreTrainedModel = "tiny-math-base",
        method: str | dict | MethodConfig | None = "fast_mtp",
        lora: dict | None = None,
        freeze_backbone: bool | None = None,
        from_scratch: bool = False,
        config_overrides: dict | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.method_config = resolve_method(method)  # validates before any loading
        if not learning_rate > 0:  # NaN too
            raise UserInputError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0 <= warmup_ratio < 1:
            raise UserInputError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if isinstance(backbone, PreTrainedModel):
            model, self.tokenizer = backbone, None
            self.backbone_ref = getattr(backbone, "name_or_path", "") or ""
        else:
            model, self.tokenizer = load_backbone(
                backbone, dtype=dtype, from_scratch=from_scratch, trust_remote_code=trust_remote_code,
                config_overrides=config_overrides, attn_implementation=attn_implementation,
            )
            self.backbone_ref = backbone
        self.save_hyperparameters(
            {
                "backbone": self.backbone_ref,
                "method": None if self.method_config is None else self.method_config.to_dict(),
                "lora": lora,
                "freeze_backbone": freeze_backbone,
                "learning_rate": learning_rate,
                "weight_decay": weight_decay,
                "betas": list(betas),
                "warmup_ratio": warmup_ratio,
                "min_lr_ratio": min_lr_ratio,
            }
        )
        if freeze_backbone is None:  # plain NTP trains the backbone; methods say whether they do by default
            freeze_backbone = self.method_config is not None and not self.method_config.trains_backbone_by_default
        self.freeze_backbone = freeze_backbone
        self.lora = lora
        if self.method_config is not None:
            self.method_config.prepare_backbone(model, self.tokenizer)  # e.g. add a token, before LoRA wraps it
        if lora is not None:
            model = get_peft_model(model, LoraConfig(**lora))
        self.backbone = model
        if self.freeze_backbone:
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(lora is not None and "lora_" in name)
        self.parts: BackboneParts = backbone_parts(self.base_model)
        self.method: MTPMethod | None = None if self.method_config is None else self.method_config.build(self.parts)
        self.context = MethodContext(self)  # what the method sees of this module
        if self.method is not None:
            self.method.attach(self.context)
        k = 0 if self.method_config is None else self.method_config.num_draft_tokens
        self.val_acceptance = AcceptanceRate(max(k, 1))
        self.decoding_defaults: dict[str, Any] = {}
        """What :meth:`generate` uses for arguments the caller leaves out (``decoding``, ``num_draft_tokens`` and
        the default mode's options); loaded artefacts and zoo entries fill it from their decoding config."""
        self.base_revision: str | None = None
        """The commit of the base model this module was loaded at, when known (recorded in saved artefacts)."""
        install_trained_state_dict(self)  # state_dict() and so checkpoints hold only what trains

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> PreTrainedModel:
        """The backbone without its LoRA wrapper (the same model when there is no adapter)."""
        return self.backbone.get_base_model() if self.lora is not None else self.backbone

    @property
    def is_sharded(self) -> bool:
        """True when a sharding strategy (FSDP, FSDP2, DeepSpeed) trains this module: its weights may be split
        across processes, so a copy of them is not the model."""
        trainer = self._trainer  # .trainer raises when none is attached
        if trainer is not None and isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)):
            return True
        try:  # optional: a torch build without distributed support has neither
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.tensor import DTensor
        except ImportError:
            return False
        return any(isinstance(m, FullyShardedDataParallel) for m in self.modules()) or any(
            isinstance(p, DTensor) for p in self.parameters())

    @property
    def num_draft_tokens(self) -> int:
        return 0 if self.method_config is None else self.method_config.num_draft_tokens

    # ------------------------------------------------------------------ training
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        if self.method is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=batch.get("position_ids"), labels=labels)
            loss = out.loss
            if stage == "val":
                pred, tgt = out.logits[:, :-1].argmax(-1), labels[:, 1:]
                valid = tgt != -100
                self.log("val/token_accuracy", (pred[valid] == tgt[valid]).float().mean(), prog_bar=True)
        else:
            loss, logs = self.method.training_loss(self.context, batch)
            correct = logs.pop("draft_correct", None)  # (K, N) teacher-forced draft matches, if the method has them
            if stage == "val" and correct is not None:
                self.val_acceptance.update(correct)
            for key, value in logs.items():
                self.log(f"{stage}/{key}", value)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=input_ids.shape[0])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.method is None:
            return
        result = self.val_acceptance.compute()
        for j, (ar, car) in enumerate(zip(result["acceptance"], result["cumulative_acceptance"], strict=True), start=1):
            self.log(f"val/AR_{j}", ar)
            self.log(f"val/CAR_{j}", car)
        self.log("val/tau_estimate", result["tau"], prog_bar=True)
        self.val_acceptance.reset()

    def on_fit_start(self) -> None:
        install_on_wrapper(self, self.trainer.strategy.model)  # FSDP checkpoints hold only what trains too
        if self.method is not None and self.method.needs_token_counts:
            dm = self.trainer.datamodule
            counts = dm.token_counts(self.parts.vocab_size) if dm is not None and hasattr(dm, "token_counts") else None
            self.method.prepare(counts)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise UserInputError("nothing to train: the backbone is frozen and the method has no parameters")
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * hp.warmup_ratio)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints (see lightning_mtp.checkpoint)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the base model, method and LoRA set-up, so a resume into a different module is refused."""
        checkpoint[IDENTITY_KEY] = run_identity(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base model, method or LoRA set-up before any weight is loaded."""
        check_identity(self, checkpoint)

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`~lightning_mtp.callbacks.ExactResume`: checkpoints carry the random state, so resumes are exact."""
        return [ExactResume()]

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_draft_tokens: int | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        decoding: str | None = None,
        attention_mask: torch.Tensor | None = None,
        draft_confidence_threshold: float | None = None,
        draft_schedule: str | None = None,
        tree: TreeShape | dict | None = None,
        **options: Any,
    ):
        """Decode ``input_ids`` (B, n); returns ``GenerateOutput(sequences, stats)`` like HF generate.

        Rows of different lengths come left-padded with ``attention_mask`` (1 = token, 0 = padding), as from
        a tokenizer with ``padding_side="left"``; each row is decoded as it would be alone.

        Arguments left out come from :attr:`decoding_defaults` (a loaded artefact's decoding config), else
        ``decoding="speculative"``, which is lossless: the method drafts ``num_draft_tokens`` tokens
        (its configured K when None) and the backbone verifies them, so greedy output equals
        ``backbone.generate(do_sample=False)`` token for token and sampled output has the backbone's own
        distribution. ``num_draft_tokens=0`` decodes plain NTP through the same machinery (the fair
        baseline). A chain ends early after EOS, and before a position where the method's most likely token
        has less than ``draft_confidence_threshold`` probability (default 0: never), which lets a long
        ``num_draft_tokens`` pay where the method is sure and cost little where it is not. Methods may offer
        modes of their own (see ``self.method.decodings``), which take their own ``options``.
        ``draft_schedule``: ``"adaptive"`` (the default) shortens chains, down to none, while drafts miss, so a
        method whose drafts do not fit the prompt costs about what plain decoding costs; ``"constant"`` drafts
        ``num_draft_tokens`` every step (see :mod:`lightning_mtp.decoding.schedule`).
        ``tree`` (a :class:`~lightning_mtp.decoding.tree.TreeShape` or its mapping, e.g. ``{"kind": "dynamic",
        "depth": 5, "top_k": 4, "total_tokens": 24}``): the method drafts token trees, each verified in one forward,
        as deep as the shape (or ``num_draft_tokens`` when given); still lossless. Rows of a batch decode one at a
        time; every step drafts (``draft_schedule`` applies to chains).
        """
        check_generate_inputs(self.backbone, input_ids, max_new_tokens)
        defaults = dict(self.decoding_defaults)
        default_mode = defaults.pop("decoding", "speculative")
        default_k = defaults.pop("num_draft_tokens", None)
        default_threshold = defaults.pop("draft_confidence_threshold", 0.0)
        default_schedule = defaults.pop("draft_schedule", "adaptive")
        default_tree = defaults.pop("tree", None)
        if decoding is None:
            decoding, options = default_mode, {**(defaults if default_mode != "speculative" else {}), **options}
        explicit_k = num_draft_tokens is not None  # a tree is as deep as its shape unless K is passed
        if draft_confidence_threshold is not None and decoding != "speculative":
            raise UserInputError(f"draft_confidence_threshold applies to speculative decoding, not {decoding!r}")
        if draft_confidence_threshold is None:
            draft_confidence_threshold = default_threshold
        if draft_schedule is not None and decoding != "speculative":
            raise UserInputError(f"draft_schedule applies to speculative decoding, not {decoding!r}")
        if draft_schedule is None:
            draft_schedule = default_schedule
        if tree is not None and decoding != "speculative":
            raise UserInputError(f"tree applies to speculative decoding, not {decoding!r}")
        shape = TreeShape.parse(tree if tree is not None else (default_tree if decoding == "speculative" else None))
        offered = ("speculative",) if self.method is None else self.method.decodings
        if decoding not in offered:
            raise UserInputError(f"unknown decoding {decoding!r}; this model offers {list(offered)}")
        if decoding == "speculative" and options:
            raise UserInputError(f"unknown generate option(s) {sorted(options)} for speculative decoding")
        if explicit_k:
            k = num_draft_tokens
        else:
            k = shape.depth if shape else (default_k if default_k is not None else self.num_draft_tokens)
        if k < 0:
            raise UserInputError(f"num_draft_tokens must be >= 0, got {k}")
        modes = {mod: mod.training for mod in self.modules()}  # restore each one: a blanket .train() would
        self.eval()  # switch on dropout in a backbone that was in eval mode
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        try:
            if decoding != "speculative":
                return self.method.generate(self.context, input_ids.to(self.device), decoding=decoding,
                                            max_new_tokens=max_new_tokens, streamer=streamer, **sampling, **options)
            def decode(ids: torch.Tensor, mask: torch.Tensor | None):
                drafter = self.method.drafter(self.parts) if (self.method is not None and k > 0) else None
                return speculative_generate(
                    self.backbone,
                    ids.to(self.device),
                    drafter=drafter,
                    parts=self.parts,
                    num_draft_tokens=k if drafter is not None else 0,
                    max_new_tokens=max_new_tokens,
                    streamer=streamer,
                    attention_mask=mask,
                    draft_confidence_threshold=draft_confidence_threshold,
                    draft_schedule=draft_schedule,
                    tree=shape if drafter is not None else None,
                    **sampling,
                )

            by_row = shape is not None or needs_row_by_row(self.base_model)  # trees verify one sequence at a time
            if input_ids.dim() == 2 and input_ids.shape[0] > 1 and by_row:
                return _row_by_row(decode, input_ids, attention_mask, pad_token_id(self.backbone))
            return decode(input_ids, attention_mask)
        finally:
            for mod, mode in modes.items():
                mod.training = mode

    def merge_lora(self) -> MTPModule:
        """Fold the LoRA adapter into the backbone's weights (PEFT's ``merge_and_unload``), for decoding.

        A LoRA backbone pays the adapter's extra calls on every forward (and PEFT re-assembles the embedding
        matrix when tokens train, as mask_token's ``<MTP>`` row does); merged, a forward costs what the base's
        does, and the outputs are the same up to floating-point rounding. The module then holds a fine-tuned
        backbone whose own weights carry the adaptation: ``save_pretrained`` writes them whole. Without LoRA
        this does nothing. Returns the module.
        """
        if self.lora is None:
            return self
        base = self.base_model
        out = base.get_output_embeddings()
        trains_tokens = any("trainable_tokens_delta" in name for name, _ in self.backbone.named_parameters())
        tied = out is not None and any(out.weight is p for p in base.get_input_embeddings().parameters())
        if trains_tokens and tied:
            # PEFT's trainable tokens change only the input rows: the output layer keeps the base rows. Merging them
            # into a tied matrix would change the output rows too, so the output layer gets its own copy first.
            out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
            for config in (base.config, getattr(base.config, "text_config", None)):
                if config is not None and hasattr(config, "tie_word_embeddings"):
                    config.tie_word_embeddings = False
        self.backbone = self.backbone.merge_and_unload()
        self.lora = None
        self.freeze_backbone = False  # the backbone's own weights now hold what was trained
        self.parts = backbone_parts(self.backbone)
        return self

    # ------------------------------------------------------------------ artefacts
    @property
    def trains_backbone_weights(self) -> bool:
        """True when the backbone's own weights train (not frozen, no LoRA): artefacts then hold them whole."""
        return not self.freeze_backbone and self.lora is None

    def save_pretrained(
        self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None, metrics: dict | None = None
    ) -> Path:
        """Save only what was trained, atomically; see :mod:`lightning_mtp.artifacts` for the format."""
        return save_artifact(self, save_directory, dtype=dtype, metrics=metrics)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, backbone: str | PreTrainedModel | None = None, **kwargs: Any
    ) -> MTPModule:
        """Load an artefact written by :meth:`save_pretrained`, or a plain Hugging Face model directory (NTP).

        ``backbone`` overrides the base model the artefact names (e.g. a local copy of it); ``kwargs`` go to
        the constructor.
        """
        return load_artifact(cls, directory, backbone=backbone, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None, **kwargs: Any):
        """Save this module's artefact and upload it (with a model card) to ``repo_id`` as one commit.

        The token comes from the usual ``huggingface_hub`` sources when None and is never printed; ``kwargs``
        go to :func:`lightning_mtp.hub.push_to_hub` (``endpoint``, ``base_model``, ``metrics``, ...).
        """
        return upload.push_to_hub(self, repo_id, private=private, token=token, **kwargs)


def _row_by_row(decode, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int):
    """Decode each row of a left-padded batch on its own and put the results back in HF's batch layout."""
    outs, stats = [], None
    for row in range(input_ids.shape[0]):
        ids = input_ids[row : row + 1]
        if attention_mask is not None:
            ids = ids[:, attention_mask[row].bool()]  # drop the left padding
        out = decode(ids, None)
        outs.append(out.sequences[0, ids.shape[1] :])
        stats = out.stats if stats is None else stats.merge(out.stats)
    longest = max(len(o) for o in outs)
    tail = torch.full((len(outs), longest), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, o in enumerate(outs):
        tail[row, : len(o)] = o
    return GenerateOutput(sequences=torch.cat([input_ids, tail.to(input_ids.device)], dim=1), stats=stats)
