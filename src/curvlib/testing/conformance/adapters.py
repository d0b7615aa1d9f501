"""Conformance checks of a layer adapter (family ``layers``): parameters ↔ W̄ ↔ vec round
trips, the uses it records, the captured statistics against per-sample gradients from
``torch.func``, and float32."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlib.capture.hooks import backpropagate_columns, capture_forward
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.testing import references as ref
from curvlib.testing.compare import assert_close
from curvlib.testing.conformance._common import _expect, _random
from curvlib.testing.conformance._kind import _KindConformance


class LayerAdapterConformance(_KindConformance):
    """Checks of a layer adapter (family ``layers``).

    The subclass implements :meth:`make_modules` (modules of the adapted type, float64,
    covering its options: bias or not, strides, paddings, groups, …) and, for module types
    with inputs other than ``[m, in_features]`` / ``[m, in_channels, *spatial]``,
    :meth:`make_input`; :meth:`output` picks the tensor output of modules that return a
    tuple.  Every check runs the adapters through curvlib's own capture machinery
    (:func:`~curvlib.capture.hooks.capture_forward`), as a curvature operator does.
    """

    family: ClassVar[str] = "layers"
    batch_size: ClassVar[int] = 3
    spatial: ClassVar[int] = 5

    def make_modules(self) -> Sequence[nn.Module]:
        """Modules the adapter handles (float64)."""
        raise NotImplementedError(f"{type(self).__name__}: implement make_modules() returning modules of the adapted type")

    def make_input(self, module: nn.Module, m: int, generator: torch.Generator) -> Any:
        """A batch of m inputs for ``module`` in its dtype (a tensor, or a tuple of arguments)."""
        dtype = next(module.parameters()).dtype
        if hasattr(module, "in_features"):
            return torch.randn(m, module.in_features, generator=generator, dtype=torch.float64).to(dtype)
        if hasattr(module, "in_channels"):
            nd = len(module.kernel_size)
            return torch.randn(m, module.in_channels, *([self.spatial] * nd), generator=generator,
                               dtype=torch.float64).to(dtype)
        raise NotImplementedError(f"{type(self).__name__}: implement make_input(module, m, generator) for {type(module).__name__}")

    def output(self, module: nn.Module, X: Any) -> torch.Tensor:
        """The module's tensor output for input ``X`` (the first element of a tuple output)."""
        out = module(*X) if isinstance(X, tuple) else module(X)
        return out[0] if isinstance(out, tuple) else out

    def reference_matrix(self, module: nn.Module, adapter: Any, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """W̄ written out independently (:mod:`~curvlib.testing.references`) for the built-in
        module types; ``None`` for other types (then only the round trip and the gradient
        checks apply).  ``tensors`` are shaped like ``adapter.params()``."""
        known = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention, *ref._NORMS)
        if not isinstance(module, known):
            return None
        block = SimpleNamespace(module=module, name="layer" + adapter.block_name[len(adapter.name):], has_bias=adapter.has_bias)
        names = {id(p): n for n, p in module.named_parameters(recurse=False)}
        named = {f"layer.{names[id(p)]}": t.unsqueeze(0) for p, t in zip(adapter.params(), tensors)}
        return ref._block_matrix(block, named)[0]

    def adapters(self, module: nn.Module) -> list[Any]:
        """The adapters the registry creates for ``module`` (several for a grouped convolution)."""
        made = self.spec().factory.create(module, name="layer")
        _expect(bool(made), f"expected {self.kind!r} to create at least one adapter for {module}")
        return made

    def _modules(self, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
        mods = [copy.deepcopy(mod).to(dtype) for mod in self.make_modules()]
        _expect(bool(mods), f"{type(self).__name__}.make_modules() returned no module")
        return mods

    def _capture(self, mod: nn.Module, adapters: Sequence[Any], X: Any) -> tuple[Any, torch.Tensor]:
        with capture_forward(adapters, batch_size=self.batch_size) as record:
            out = self.output(mod, X)
        return record, out

    def test_module_types_are_registered(self) -> None:
        """The kind declares ``module_types`` metadata, and every module of :meth:`make_modules` is one."""
        types = tuple(self.spec().metadata.get("module_types", ()))
        _expect(bool(types), f"expected layer kind {self.kind!r} registered with module_types=(...) metadata, got none")
        for mod in self._modules():
            _expect(isinstance(mod, types), f"expected {type(mod).__name__} to be one of the declared module_types {types}")

    def test_weight_bias_matrix_vector_round_trip(self) -> None:
        """pieces -> W̄ ``[g_dim, a_dim]`` -> pieces and pieces -> vec(W̄) ``[p_i]`` -> pieces are
        exact; vec stacks W̄'s columns; W̄ equals the independent reference where one exists."""
        for k, mod in enumerate(self._modules()):
            for ad in self.adapters(mod):
                where = f"{self.kind} on {mod} ({ad.block_name})"
                full = [_random(p.shape, 10 * k + j, p) for j, p in enumerate(ad.params())]
                tensors = ad.pieces(full)
                W = ad.params_to_matrix(tensors)
                _expect(tuple(W.shape) == (ad.g_dim, ad.a_dim),
                        f"{where}: expected W̄ of shape [g_dim, a_dim] = {[ad.g_dim, ad.a_dim]}, got {list(W.shape)}")
                _expect(ad.num_params == ad.a_dim * ad.g_dim == sum(t.numel() for t in tensors),
                        f"{where}: expected num_params = a_dim·g_dim = the parameter count of the block's pieces")
                back = ad.matrix_to_params(W)
                _expect(len(back) == len(tensors) and all(torch.equal(a, b) for a, b in zip(back, tensors)),
                        f"{where}: expected matrix_to_params(params_to_matrix(pieces)) == pieces exactly")
                v = ad.params_to_vector(tensors)
                _expect(torch.equal(v, ref.vec(W)), f"{where}: expected params_to_vector == vec(W̄) (columns stacked)")
                _expect(all(torch.equal(a, b) for a, b in zip(ad.vector_to_params(v), tensors)),
                        f"{where}: expected vector_to_params(params_to_vector(pieces)) == pieces exactly")
                expected = self.reference_matrix(mod, ad, full)
                if expected is not None:
                    _expect(torch.equal(W, expected), f"{where}: expected W̄ as DESIGN.md §1 maps it (references._block_matrix)")

    def test_uses_have_the_batch_and_the_block_dims(self) -> None:
        """Every call gives uses with rows ``[m, T, a_dim]`` on T = geometry.T positions."""
        for k, mod in enumerate(self._modules()):
            ads = self.adapters(mod)
            X = self.make_input(mod, self.batch_size, torch.Generator().manual_seed(k))
            with torch.no_grad():
                record, _ = self._capture(mod, ads, X)
            for ad, uses in zip(ads, record.uses):
                _expect(bool(uses), f"{self.kind} on {mod}: expected {ad.block_name!r} to record at least one use")
                for u in uses:
                    m, T, d = u.rows.shape
                    _expect((m, d) == (self.batch_size, ad.a_dim) and T == u.geometry.T,
                            f"{self.kind} on {mod}: expected rows [m={self.batch_size}, T={u.geometry.T}, a_dim={ad.a_dim}], "
                            f"got {[m, T, d]}")

    def test_statistics_reproduce_per_sample_gradients(self) -> None:
        """D_b = Σ_u Σ_t g_{b,t} ā_{b,t}ᵀ from the captured uses equals the per-sample gradient
        ∇_{W̄} ℓ_b from ``torch.func`` (vmap of grad), ℓ_b = Σ r_b ⊙ tanh(s_b)."""
        for k, mod in enumerate(self._modules()):
            ads = self.adapters(mod)
            m = self.batch_size
            X = self.make_input(mod, m, torch.Generator().manual_seed(k))
            record, s = self._capture(mod, ads, X)
            f = torch.tanh(s)
            R = _random(f.shape, 100 + k, f)
            gs = backpropagate_columns(f, record.uses, 1, lambda j: R)
            frozen = {n: p.detach() for n, p in mod.named_parameters()}
            buffers = dict(mod.named_buffers())
            trainable = [n for n, p in mod.named_parameters() if p.requires_grad]
            args = X if isinstance(X, tuple) else (X,)

            def ell(params, *xr):
                *xs, r = xr
                out = functional_call(mod, {**frozen, **params, **buffers}, tuple(x.unsqueeze(0) for x in xs))
                out = out[0] if isinstance(out, tuple) else out
                return (r.unsqueeze(0) * torch.tanh(out)).sum()

            per_sample = vmap(grad(ell), in_dims=(None, *([0] * (len(args) + 1))))({n: frozen[n] for n in trainable}, *args, R)
            names = {id(p): n for n, p in mod.named_parameters()}
            for ad, uses, g in zip(ads, record.uses, gs):
                stats = LayerStatistics(uses=[Use(u.rows, gu, u.geometry) for u, gu in zip(uses, g)], scale=1.0)
                expected = torch.stack(
                    [ad.params_to_matrix(ad.pieces([per_sample[names[id(p)]][b] for p in ad.params()])) for b in range(m)]
                )
                assert_close(stats.pair_gradients().detach(), expected.detach(),
                             msg=f"{self.kind} on {mod} ({ad.block_name}): expected Σ_t g_t ā_tᵀ == the per-sample "
                                 "gradient from torch.func")

    def test_float32_module_keeps_its_dtype(self) -> None:
        """A float32 module gives float32 rows and W̄."""
        for k, mod in enumerate(self._modules(torch.float32)):
            ads = self.adapters(mod)
            X = self.make_input(mod, self.batch_size, torch.Generator().manual_seed(k))
            with torch.no_grad():
                record, _ = self._capture(mod, ads, X)
            for ad, uses in zip(ads, record.uses):
                dtypes = {u.rows.dtype for u in uses} | {ad.to_matrix().dtype}
                _expect(dtypes == {torch.float32},
                        f"{self.kind}: expected float32 rows and W̄ for a float32 module, got {sorted(map(str, dtypes))}")

