"""Lightning callbacks of lightning-mtp."""

from __future__ import annotations

import lightning as L
import torch

__all__ = ["ExportPretrained"]


class ExportPretrained(L.Callback):
    """At the end of ``fit``, write the trained artefact with ``MTPModule.save_pretrained(dirpath)``.

    Args:
        dirpath: where the artefact goes (replaced atomically if it exists).
        dtype: store floating-point weights in this dtype (e.g. ``bfloat16`` to ship small files); loading
            computes in the dtype the model was trained in.
    """

    def __init__(self, dirpath: str, dtype: str | None = None) -> None:
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'")
        self.dirpath = dirpath
        self.dtype = getattr(torch, dtype) if dtype else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.save_pretrained(self.dirpath, dtype=self.dtype)
