"""Errors and warnings raised by curvlib.

Every exception descends from :class:`CurvlibError` *and* from the matching
built-in exception, so ``except ValueError`` keeps working for callers that do
not know about curvlib (STYLE.md, rule 6).  Messages state what was expected
and what came.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "DistributedError",
    "CurvlibError",
    "ShapeError",
    "DTypeDeviceError",
    "ConfigError",
    "UnknownKindError",
    "PluginError",
    "PluginLoadError",
    "PluginCollisionError",
    "PluginOutputError",
    "UnsupportedLayerError",
    "UnsupportedLossError",
    "NotPSDError",
    "NumericalError",
    "NumericalWarning",
    "PerformanceWarning",
    "PluginWarning",
]


class CurvlibError(Exception):
    """Root of every error raised by curvlib."""


class ShapeError(CurvlibError, ValueError):
    """A tensor or operator has a shape other than the one required."""


class DTypeDeviceError(CurvlibError, TypeError):
    """Operands live on different devices or have different dtypes."""


class ConfigError(CurvlibError, ValueError):
    """A configuration is invalid (wraps pydantic's ``ValidationError`` text)."""


class UnknownKindError(ConfigError, KeyError):
    """A ``kind`` is not registered in the family it was looked up in."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(CurvlibError, RuntimeError):
    """A plugin misbehaves (bad hook, bad registration)."""


class PluginLoadError(PluginError, ImportError):
    """A plugin's entry point could not be imported or registered."""


class PluginCollisionError(PluginError, ValueError):
    """Two plugins registered the same kind in the same family."""


class PluginOutputError(PluginError):
    """A kind returned something its family's contract forbids (a wrong type, shape, dtype or
    device; non-finite, asymmetric or indefinite factors); the message names the family, the
    kind, its distribution, the layer, and what was expected and what came."""


class UnsupportedLayerError(CurvlibError, TypeError):
    """A module type has no layer adapter."""


class UnsupportedLossError(CurvlibError, ValueError):
    """A loss function or output shape is not supported by a curvature kind."""


class NotPSDError(CurvlibError, ValueError):
    """A matrix that must be positive (semi-)definite is not."""


class DistributedError(CurvlibError, RuntimeError):
    """The processes of a ``torch.distributed`` group disagree (layer layout, configuration, world
    size at resume), or a model is wrapped for data parallelism without a process group."""


class NumericalError(CurvlibError, ArithmeticError):
    """A computation produced non-finite values or failed to converge where it must."""


class NumericalWarning(UserWarning):
    """A numerical fallback was taken (float64 retry, clamped eigenvalues, kept factors)."""


class PerformanceWarning(UserWarning):
    """An operation forms something large (a dense p × p matrix, say)."""


class PluginWarning(UserWarning):
    """A plugin problem that does not stop the work (a kind that another plugin also registers)."""


# ---------------------------------------------------------------------------- where warnings point

_CURVLIB_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_WRAPPERS = ("torch", "pluggy")  # packages whose frames sit between the user's call and curvlib


def _internal(filename: str) -> bool:
    if filename.startswith(_CURVLIB_DIR) or os.path.basename(filename) == "contextlib.py":
        return True
    for name in _WRAPPERS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path and filename.startswith(os.path.dirname(os.path.abspath(path)) + os.sep):
            return True
    return False


def warn(message: str, category: type[Warning] = NumericalWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame of the call stack
    outside curvlib (and outside the torch / pluggy / contextlib wrappers around it, such as
    ``torch.no_grad`` on an optimizer's step), whatever the depth of the call inside curvlib."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
