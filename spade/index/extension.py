"""Loading the optional compiled kernels (setup.py's extensions), called through ctypes."""
from __future__ import annotations

import ctypes
import importlib.util


def built(module: str) -> bool:
    """Whether the install built the extension ``module`` (its library file is there)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and bool(spec.origin)


def load(module: str) -> ctypes.CDLL | None:
    """The shared library of the built extension ``module`` (e.g. ``spade.index._nearest``), or None where it was not
    built (no C compiler at install) or cannot be loaded here."""
    if not built(module):
        return None
    try:
        return ctypes.CDLL(importlib.util.find_spec(module).origin)
    except OSError:
        return None
