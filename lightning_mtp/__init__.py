"""lightning-mtp: teach any Hugging Face causal LM to emit several tokens per forward pass."""

__version__ = "0.1.0"

from lightning_mtp import zoo  # noqa: E402
from lightning_mtp.methods import METHODS, FastMTP, MethodConfig, register_method  # noqa: E402
from lightning_mtp.module import MTPModule  # noqa: E402

__all__ = ["METHODS", "FastMTP", "MTPModule", "MethodConfig", "register_method", "zoo", "__version__"]
