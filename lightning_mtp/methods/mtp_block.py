"""The DeepSeek-V3-style MTP module that FastMTP (and MTP-D) heads are made of.

``h_out = layer(proj([enorm(embed(t)); hnorm(h)]))``, with logits ``lm_head(final_norm(h_out))``. The
decoder layer is an instance of the backbone's own decoder-layer class, built from its config, and the
embedding and output head are the backbone's (shared, frozen). The concatenation puts the embedding
first, as DeepSeek-V3's released MTP weights do, so its ``eh_proj`` maps onto ``proj`` as is; MiMo puts the
hidden state first, and :mod:`lightning_mtp.convert` swaps the two halves of its projection. The norms are
``nn.RMSNorm``, or the backbone's own class where it is zero-centred (scales by ``1 + weight``, as Qwen3-Next's),
so native MTP layers' norm weights map onto them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_mtp.backbone import BackboneParts, build_decoder_layer, build_head_norm, call_decoder_layer
from lightning_mtp.errors import UserInputError

__all__ = ["MTPBlock"]


class MTPBlock(nn.Module):
    def __init__(self, parts: BackboneParts, layer_index: int | None = None) -> None:
        super().__init__()
        H = parts.hidden_size
        E = parts.embed_tokens.weight.shape[1]
        if E != H:  # the head joins an embedding and a hidden state of the same width
            raise UserInputError(f"the backbone's embeddings have {E} dimensions but its hidden states {H} (factorised "
                                 "embeddings); heads cannot be built on it, use a method without heads, e.g. mask_token")
        eps = float(getattr(parts.config, "rms_norm_eps", None) or getattr(parts.config, "layer_norm_epsilon", 1e-6))
        dtype = parts.lm_head.weight.dtype
        self.enorm = build_head_norm(parts, eps, dtype)
        self.hnorm = build_head_norm(parts, eps, dtype)
        self.proj = nn.Linear(2 * H, H, bias=False, dtype=dtype)
        layer, self.layer_type = build_decoder_layer(parts, layer_index)
        self.layer = layer.to(dtype)
        self.final_norm = build_head_norm(parts, eps, dtype)

    def forward(
        self,
        parts: BackboneParts,
        hidden: torch.Tensor,  # (B, T, H) previous depth's hidden state at each position
        token_ids: torch.Tensor,  # (B, T) the token whose embedding joins it (one position ahead of hidden)
        position_ids: torch.Tensor,  # (B, T)
        cache=None,
        attention_mask: torch.Tensor | None = None,  # (B, 1, T, kv) additive, e.g. for packed documents
    ) -> torch.Tensor:  # (B, T, H), before the final norm
        emb = parts.embed_tokens(token_ids)  # (B, T, H)
        x = self.proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))  # (B, T, 2H) -> (B, T, H)
        return call_decoder_layer(self.layer, parts, x, position_ids, cache, attention_mask, self.layer_type)
