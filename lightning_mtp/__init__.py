"""lightning-mtp: teach any Hugging Face causal LM to emit several tokens per forward pass."""

from lightning_mtp import zoo
from lightning_mtp.methods import (
    METHODS,
    MTPD,
    Eagle3,
    FastMTP,
    MaskToken,
    Medusa,
    MethodConfig,
    extend_heads,
    register_method,
)
from lightning_mtp.module import MTPModule
from lightning_mtp.version import __version__

__all__ = [
    "METHODS",
    "MTPD",
    "Eagle3",
    "FastMTP",
    "MaskToken",
    "Medusa",
    "MTPModule",
    "MethodConfig",
    "extend_heads",
    "register_method",
    "zoo",
    "__version__",
]
