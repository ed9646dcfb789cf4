"""Beam's inspection of DoFn method signatures, kept per function.

Beam reads the signature of every method of every DoFn (about 30 each, most of them inherited from `beam.DoFn`)
several times per transform: when a ParDo is made and validated, when the graph is turned into the runner's, and when
each bundle processor is built (`apache_beam.transforms.userstate.get_dofn_specs` through
`core.get_function_args_defaults`). Each read runs `inspect.signature` anew: about 16,000 of them in a one-image
scoring run, 0.13 of its 0.46 s (benchmarks/run_overhead.py). A bound method's signature depends on its function
alone (binding drops the first parameter, whatever the object), so it is kept per function, weakly (functions made
for one pipeline do not accumulate); every other callable is inspected as before. Beam is pinned exactly
(setup.py); `install` leaves a Beam without ``core.get_signature`` as it is.
"""
from __future__ import annotations

import inspect
import types
import weakref
from typing import Any, Callable

import apache_beam.transforms.core as _core

_BEAMS: Callable[[Any], inspect.Signature] | None = getattr(_core, "get_signature", None)
_KEPT: "weakref.WeakKeyDictionary[Any, inspect.Signature]" = weakref.WeakKeyDictionary()


def kept_signature(func: Any) -> inspect.Signature:
    """Beam's `get_signature` of ``func``, kept per function for bound methods."""
    if not isinstance(func, types.MethodType):
        return _BEAMS(func)
    try:
        return _KEPT[func.__func__]
    except (KeyError, TypeError):  # TypeError: a function that takes no weak reference, read each time
        pass
    signature = _BEAMS(func)
    try:
        _KEPT[func.__func__] = signature
    except TypeError:
        pass
    return signature


def install() -> bool:
    """Make Beam read DoFn signatures through `kept_signature` (idempotent); False where this Beam has no such hook."""
    if _BEAMS is None:
        return False
    _core.get_signature = kept_signature
    return True
