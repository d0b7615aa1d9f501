"""Any trainable parameter no layer adapter covers, by per-sample gradients: the ``parameter`` layer kind.

Architecture-free capture (thesis §6.2; Ren & Goldfarb's TNT): a parameter θ of any shape
owned by any module — a learnable scale, a positional embedding held as an ``nn.Parameter``,
a custom bilinear form, a parameter of the model itself — gets its own layer block.  Its
matrix is θ with the first axis as rows and the others as columns,

    W̄ = θ.reshape(d_0, d_1·…·d_k) ``[g_dim, a_dim]``   (a scalar or a vector: one column),

and its per-sample gradient D_n = ∂(r_nᵀ f_n)/∂W̄ is represented exactly through the T = a_dim
one-hot positions ā_t = e_t with columns g_t = D_n[:, t], so that Σ_t g_t ā_tᵀ = D_n (3.27).
Every curvature product, exact block and approximator is then exact for this layout — KFAC
sees A ∝ I (it keeps the row covariance Σ_n D_n D_nᵀ only), TNT its two mode covariances,
KPSVD the best Kronecker product of the block.

D_n comes from the module itself: at each back-propagated column, the module's recorded
call is recomputed one sample at a time with θ as the only variable
(``torch.func.vmap`` of ``torch.func.vjp`` over ``torch.func.functional_call``) and the
column's gradient at the module's output pulled back to θ.  The recomputed outputs must
equal the recorded ones; they do not when the module couples the samples (batch
statistics) or draws random numbers (dropout in training mode), and then the capture
raises :class:`~curvlib.errors.UnsupportedLayerError` naming the parameter — never silently
wrong statistics.  A tensor argument of the call is split into samples when it has the
batch's m entries on the batch axis and passed whole otherwise.

Cost per back-propagated column: one vmapped forward and backward of the owning module
(the whole model for a parameter of the model itself); memory O(m·c·p_i) for the
per-sample gradients, as for any block.  Opt-in: discovery creates these blocks only
under :func:`curvlib.capture.layout.uncovered_parameters` ``("per_sample")``
(``PreconditionerConfig(uncovered="per_sample")``); by default such parameters are left to
the optimizer's first-order fallback.  The owning module must return one tensor, and the
parameter must be registered by one module only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlib.capture.adapters.base import LayerAdapter, UseCapture
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows, OneHotRows

__all__ = ["ParameterAdapter"]


class ParameterAdapter(LayerAdapter):
    """W̄ = θ.reshape(d_0, −1) of one parameter θ of any module; D_n by recomputing the module per sample.

    Created by discovery (:func:`~curvlib.capture.layout.find_layers`) through :meth:`create_for`,
    never matched by module type.
    """

    module_types = ()

    def __init__(self, module: nn.Module, *, param_name: str = "", name: str = "", batch_dim: int = 0) -> None:
        self.param_name = param_name
        super().__init__(module, name=name, batch_dim=batch_dim)

    @classmethod
    def create(cls, module: nn.Module, *, name: str = "", batch_dim: int = 0) -> list[LayerAdapter]:
        """One adapter per trainable parameter registered by ``module`` itself (``name``: the module's)."""
        return [cls.create_for(module, pname, name=name, batch_dim=batch_dim)
                for pname, p in module.named_parameters(recurse=False) if p.requires_grad]

    @classmethod
    def create_for(cls, module: nn.Module, param_name: str, *, name: str = "", batch_dim: int = 0) -> ParameterAdapter:
        """The adapter of ``module``'s own parameter ``param_name`` (``name``: the module's qualified name)."""
        return cls(module, param_name=param_name, name=name, batch_dim=batch_dim)

    def _check_module(self) -> None:
        p = dict(self.module.named_parameters(recurse=False)).get(self.param_name)
        if p is None:
            raise UnsupportedLayerError(f"{type(self.module).__name__} has no parameter {self.param_name!r} of its own")
        if not p.requires_grad:
            raise UnsupportedLayerError(f"{self._label()}: the parameter is frozen (requires_grad=False)")
        if not p.dtype.is_floating_point:
            raise UnsupportedLayerError(f"{self._label()}: expected a floating-point parameter, got {p.dtype}")

    # -- description ---------------------------------------------------------------------------
    @property
    def block_name(self) -> str:
        """The parameter's qualified name (``"<module>.<parameter>"``)."""
        return f"{self.name}.{self.param_name}" if self.name else self.param_name

    def _label(self) -> str:
        return f"parameter {self.block_name!r} of {type(self.module).__name__}"

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def a_dim(self) -> int:
        return math.prod(self.parameter.shape[1:])

    @property
    def g_dim(self) -> int:
        shape = self.parameter.shape
        return int(shape[0]) if shape else 1

    # -- parameters <-> W̄ ----------------------------------------------------------------------
    def params(self) -> list[torch.Tensor]:
        return [self.parameter]

    def _to_matrix(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        return pieces[0].reshape(self.g_dim, self.a_dim)

    def _from_matrix(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        return [Wbar.reshape(self.parameter.shape)]

    # -- capture -------------------------------------------------------------------------------
    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """One use: T = a_dim one-hot positions; the columns recompute the call per sample."""
        if not isinstance(output, torch.Tensor):
            raise UnsupportedLayerError(f"{self._label()}: expected {type(self.module).__name__} to return one tensor")
        out = self._batch_first(output.detach(), "output")
        m = out.shape[0]
        bd = self.batch_dim
        # the call's tensors, copied (a later in-place change of an input cannot alter them);
        # split into samples when they carry the batch on the batch axis
        values = [*args, *kwargs.values()]
        slots = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        tensors = [values[i].detach().clone() for i in slots]
        dims = [bd if t.ndim > bd and t.shape[bd] == m else None for t in tensors]
        n_args, keys = len(args), list(kwargs)
        theta = self.parameter.detach()
        module, pname = self.module, self.param_name

        def call(p: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:  # one sample -> its output (no batch axis)
            full = list(values)
            for i, x, d in zip(slots, xs, dims):
                full[i] = x if d is None else x.unsqueeze(d)
            y = torch.func.functional_call(module, {pname: p}, tuple(full[:n_args]),
                                           dict(zip(keys, full[n_args:])), strict=False)
            if not isinstance(y, torch.Tensor) or y.ndim <= bd or y.shape[bd] != 1:
                raise ShapeError(f"expected one sample's output with its batch axis {bd}, got "
                                 f"{list(getattr(y, 'shape', ()))}")
            return y.squeeze(bd)

        def one(gy: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, pull = torch.func.vjp(lambda p: call(p, *xs), theta)
            return y, pull(gy)[0]

        checked = [False]
        label = self._label()

        def columns(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            gy = self._batch_first(grads[0], "output gradient")
            try:
                with torch.no_grad():
                    ys, D = torch.func.vmap(one, in_dims=(0, *dims))(gy, *tensors)
            except Exception as exc:
                raise UnsupportedLayerError(
                    f"{label}: recomputing {type(module).__name__} one sample at a time (torch.func.vmap) for the "
                    f"per-sample gradients failed: {type(exc).__name__}: {exc}"
                ) from exc
            if not checked[0]:
                _check_recomputed(ys, out, label, type(module).__name__)
                checked[0] = True
            return D.reshape(m, self.g_dim, self.a_dim).transpose(1, 2)  # g_t = D_n[:, t]  [m, T, g_dim]

        if self.a_dim == 1:
            rows, geometry = DenseRows(out.new_ones(m, 1, 1, dtype=theta.dtype)), Geometry.none()
        else:
            index = torch.arange(self.a_dim, device=out.device).expand(m, self.a_dim)
            rows, geometry = OneHotRows(index, self.a_dim, dtype=theta.dtype), Geometry.of_positions((self.a_dim,))
        return [UseCapture(rows, (output,), geometry, columns, bd)]


def _check_recomputed(ys: torch.Tensor, recorded: torch.Tensor, label: str, module: str) -> None:
    """The per-sample recomputation must reproduce the recorded output (to √eps of its size)."""
    if ys.shape == recorded.shape:
        tol = math.sqrt(torch.finfo(recorded.dtype).eps) * max(1.0, float(recorded.abs().max()))
        finite = torch.isfinite(recorded)  # a non-finite output is the approximator's business
        if bool(((ys - recorded).abs()[finite] <= tol).all()):
            return
    raise UnsupportedLayerError(
        f"{label}: {module} recomputed one sample at a time does not reproduce its recorded output, so its per-sample "
        "gradients would be wrong.  The module couples the samples (batch statistics: call model.eval()), draws "
        "random numbers (dropout in training mode), or takes a tensor argument that is not split by sample"
    )
