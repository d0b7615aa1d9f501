"""The strict, frozen pydantic base model every configuration derives from.

DESIGN.md §5: one strict frozen model per algorithm, ``extra="forbid"``;
cross-field rules live in model validators whose messages name the fields.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from curvlib.errors import ConfigError

__all__ = ["StrictModel", "NoOptions", "positive_damping", "validate_options"]


class StrictModel(BaseModel):
    """Base of every options model: unknown fields are rejected, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


class NoOptions(StrictModel):
    """Options model of a kind that takes no options."""


def validate_options(model: type[BaseModel], data: dict[str, Any], *, where: str) -> BaseModel:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` naming ``where``.

    ``where`` is a human-readable location such as ``"approximator 'kpsvd'"``.
    """
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid options for {where}:\n" + "\n".join(lines)) from exc


def positive_damping(damping: Any, who: str) -> float:
    """λ of a damped operator (F + λI) as a float, checked finite and > 0.

    Raises:
        ConfigError: not a number, not finite, or ≤ 0 (``who`` names the caller).
    """
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: damping must be a number > 0, got {damping!r}") from None
    if not (math.isfinite(lam) and lam > 0):
        raise ConfigError(f"{who}: damping λ must be finite and > 0, got {damping!r}")
    return lam
