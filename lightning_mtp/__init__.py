"""lightning-mtp: teach any Hugging Face causal LM to emit several tokens per forward pass."""

__version__ = "0.1.0"

from lightning_mtp import zoo  # noqa: E402
from lightning_mtp.methods import (  # noqa: E402
    METHODS,
    MTPD,
    FastMTP,
    MaskToken,
    MethodConfig,
    extend_heads,
    register_method,
)
from lightning_mtp.module import MTPModule  # noqa: E402

__all__ = [
    "METHODS",
    "MTPD",
    "FastMTP",
    "MaskToken",
    "MTPModule",
    "MethodConfig",
    "extend_heads",
    "register_method",
    "zoo",
    "__version__",
]
