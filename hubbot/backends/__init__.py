"""Format backends: one module per format behind ``base.Backend``."""

from .base import Backend, Built, Naming, NativeType, Runtime, formats, get_backend

__all__ = ["Backend", "Built", "NativeType", "Naming", "Runtime", "formats", "get_backend"]
