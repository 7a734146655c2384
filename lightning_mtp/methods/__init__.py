"""Built-in MTP methods. Each is one file; importing it registers it."""

from lightning_mtp.methods.base import METHODS, Drafter, MethodConfig, MTPMethod, register_method, resolve_method
from lightning_mtp.methods.fast_mtp import FastMTP

__all__ = ["METHODS", "Drafter", "FastMTP", "MTPMethod", "MethodConfig", "register_method", "resolve_method"]
