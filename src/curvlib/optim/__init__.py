"""The ``optim`` layer (DESIGN.md §2): ``torch.optim`` optimizers built on curvlib preconditioners.

- :class:`NaturalGradient`: the T1/T2 schedule, EMA, L2 weight decay, momentum on the
  preconditioned direction, KL clipping (appendix 3.E), Levenberg–Marquardt damping, SGD or
  Adam fallback for parameters without a layer adapter.  See ``docs/optimizer.md``.
"""

from curvlib.optim.natural_gradient import NaturalGradient

__all__ = ["NaturalGradient"]
