"""Beam's check for an IPython session, made without importing IPython.

Beam asks whether it runs inside IPython each time a transform is applied (`Pipeline.apply` →
``alter_label_if_ipython``) and when a pipeline runs, by importing IPython and calling its ``get_ipython``. Where
IPython is installed but not in use (a `spade` command, a worker, a test), the first pipeline of a process imports
it with prompt_toolkit, jedi and the rest: Beam's first check took 0.17 s in a fresh process here (IPython 8.12), the
first from a cold disk cache longer; a whole cold `spade fit` on metal_plate was 3.45-4.05 s without the import and
3.53-4.02 s with it (four fresh processes each, alternating: the gain is inside this machine's noise). An IPython
shell or kernel has always imported IPython before it runs anyone's code, so a process without ``IPython`` in
`sys.modules` is not in one: the answer is the same, without the import. Beam is pinned exactly (setup.py);
`install` patches the three places that hold Beam's function and leaves a Beam without them as it is.
"""
from __future__ import annotations

import sys
from typing import Callable

_MODULES = ("apache_beam.utils.interactive_utils", "apache_beam.pipeline", "apache_beam.runners.direct.direct_runner")
_NAME = "is_in_ipython"


def _probe(beams: Callable[[], bool]) -> Callable[[], bool]:
    def is_in_ipython() -> bool:
        """Beam's answer where IPython is already imported; otherwise False (not an IPython session)."""
        return "IPython" in sys.modules and beams()

    is_in_ipython.beams = beams  # type: ignore[attr-defined]
    return is_in_ipython


def install() -> bool:
    """Make Beam's IPython checks skip the import outside IPython (idempotent); False where this Beam has none."""
    import importlib

    patched = False
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, _NAME, None)
        if current is None:
            continue
        if not hasattr(current, "beams"):
            setattr(module, _NAME, _probe(current))
        patched = True
    return patched
