"""Seeded models: building an architecture and drawing its weights from a ``torch.Generator``.

:class:`ModelFactory` builds the module on the ``meta`` device, materializes it on the CPU
(keeping tied weights tied) and initializes it with :func:`init_module`, which draws
PyTorch's default distributions from the generator: building a model never touches the
global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from curvlib.errors import ConfigError

__all__ = ["ModelFactory", "init_module"]


def init_module(module: nn.Module, generator: torch.Generator, *, embedding_std: float = 1.0) -> nn.Module:
    """(Re-)initialize every parameter and buffer of ``module`` in place from ``generator``.

    The distributions are PyTorch's defaults, drawn from ``generator``:

    * Linear, Conv2d and ConvTranspose2d: weight and bias U(−b, b), ``b = 1/√fan_in`` with
      ``fan_in = weight.shape[1] · prod(kernel)`` (for a transposed convolution, whose
      weight is ``[c_in, c_out, k, k]``, this is PyTorch's own count too);
    * Embedding: N(0, ``embedding_std``²) — PyTorch's N(0, 1) by default; a model whose
      output head shares the embedding (tied weights) wants a smaller scale (``char_lm``
      uses ``1/√d``); the padding row, if any, is zero;
    * MultiheadAttention: Glorot-uniform input projections, zero input-projection bias, the
      output projection as a Linear layer but with a zero bias;
    * batch and layer norms: :meth:`reset_parameters` (weight 1, bias 0, running mean 0,
      running variance 1).

    A parameter shared by several modules (tied weights) is drawn once, by the first module
    that holds it in ``module.named_modules()`` order. A module of any other kind that owns
    parameters or buffers raises :class:`~curvlib.errors.ConfigError`.
    """
    done: set[int] = set()  # ids of the parameters already drawn (tied weights: once)

    def fresh(*params: torch.Tensor | None) -> list[torch.Tensor]:
        todo = [q for q in params if q is not None and id(q) not in done]
        done.update(id(q) for q in todo)
        return todo

    with torch.no_grad():
        for name, sub in module.named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = sub.weight.shape[1] * math.prod(sub.weight.shape[2:])
                bound = 1.0 / math.sqrt(fan_in)
                for q in fresh(sub.weight, sub.bias):
                    nn.init.uniform_(q, -bound, bound, generator=generator)
            elif isinstance(sub, nn.Embedding):
                for q in fresh(sub.weight):
                    nn.init.normal_(q, 0.0, embedding_std, generator=generator)
                    if sub.padding_idx is not None:
                        q[sub.padding_idx].zero_()
            elif isinstance(sub, nn.MultiheadAttention):
                projections = [sub.in_proj_weight] if sub.in_proj_weight is not None else \
                    [sub.q_proj_weight, sub.k_proj_weight, sub.v_proj_weight]
                for q in fresh(*projections):
                    nn.init.xavier_uniform_(q, generator=generator)
                for q in fresh(sub.bias_k, sub.bias_v):
                    nn.init.xavier_normal_(q, generator=generator)
                bound = 1.0 / math.sqrt(sub.out_proj.weight.shape[1])
                for q in fresh(sub.out_proj.weight):
                    nn.init.uniform_(q, -bound, bound, generator=generator)
                for q in fresh(sub.in_proj_bias, sub.out_proj.bias):
                    q.zero_()
            elif isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                fresh(*sub.parameters(recurse=False))
                sub.reset_parameters()
            elif any(id(q) not in done for q in sub.parameters(recurse=False)) \
                    or any(True for _ in sub.buffers(recurse=False)):
                raise ConfigError(f"init_module: no initialization rule for {name or 'the root'} "
                                  f"({type(sub).__name__})")
    return module


def _shared_parameters(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The places ``(owner, attribute)`` of each parameter held by more than one module."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False):
            places.setdefault(id(param), [])
            if all(owner is not sub for owner, _ in places[id(param)]):
                places[id(param)].append((sub, attr))
    return [where for where in places.values() if len(where) > 1]


@dataclass(frozen=True)
class ModelFactory:
    """Builds fresh, seeded copies of one architecture: ``factory(seed) -> nn.Module``.

    Attributes:
        build: a function returning the (uninitialized) module; it is called on the
            ``meta`` device, then materialized on the CPU and initialized by ``init``.
            Parameters it shares between modules (tied weights) stay shared.
        init: ``init(module, generator)`` draws every parameter; default :func:`init_module`.
    """

    build: Callable[[], nn.Module]
    init: Callable[[nn.Module, torch.Generator], nn.Module] = init_module

    def __call__(
        self,
        seed: int | torch.Generator = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """A new model with weights drawn from ``seed`` (an int, or a CPU ``torch.Generator``).

        The weights are drawn in float32 on the CPU and then cast and moved, so the same
        seed gives the same model (up to rounding) for every ``dtype`` and ``device``.
        """
        if isinstance(seed, torch.Generator):
            if seed.device.type != "cpu":
                raise ConfigError(f"model_fn: the generator must live on the CPU, got {seed.device}")
            generator = seed
        else:
            generator = torch.Generator().manual_seed(int(seed))
        with torch.device("meta"):
            module = self.build()
        tied = _shared_parameters(module)
        module = module.to_empty(device="cpu").to(torch.float32)
        for places in tied:  # to_empty gives every holder of a tied parameter its own copy: re-tie
            first_owner, first_attr = places[0]
            for owner, attr in places[1:]:
                setattr(owner, attr, getattr(first_owner, first_attr))
        self.init(module, generator)
        return module.to(device=device, dtype=dtype)
