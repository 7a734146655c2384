"""What a taken-apart backbone is: :class:`BackboneParts`, the handles draft heads share with a causal LM.

A leaf of the package (torch only), so that the method registry can name it; :func:`~lightning_mtp.backbone.backbone_parts`
finds the handles in a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["BackboneParts"]


@dataclass
class BackboneParts:
    """Handles into a causal LM: what draft heads share with it."""

    base: nn.Module  # the decoder stack (LlamaModel, GPT2Model, ...): input_ids -> last hidden state
    embed_tokens: nn.Embedding
    lm_head: nn.Linear
    layers: nn.ModuleList | None  # None where they cannot be found: only methods without heads work then
    rotary_emb: nn.Module | None
    config: object  # the text config the decoder layers are built from
    final_norm: nn.Module | None = None  # its output is the final hidden state (what hidden_states[-1] holds)

    @property
    def hidden_size(self) -> int:
        return getattr(self.config, "hidden_size", None) or self.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]
