"""Built-in MTP methods. Each is one file; importing it registers it."""

from lightning_mtp.methods.base import METHODS, Drafter, MethodConfig, MTPMethod, register_method, resolve_method
from lightning_mtp.methods.eagle3 import Eagle3
from lightning_mtp.methods.fast_mtp import FastMTP
from lightning_mtp.methods.mask_token import MaskToken
from lightning_mtp.methods.medusa import Medusa
from lightning_mtp.methods.mtp_d import MTPD, extend_heads

__all__ = ["METHODS", "Drafter", "Eagle3", "FastMTP", "MaskToken", "Medusa", "MTPD", "MTPMethod", "MethodConfig", "extend_heads", "register_method", "resolve_method"]
