"""Layer adapters: the one place where a module's ``weight``/``bias`` meet the layer matrix W̄.

DESIGN.md §1.  A layer's parameter matrix is W̄ = [W, b] ∈ R^{g_dim × a_dim} with
a_dim = d_in + 1 (d_in without a trainable bias), ā = [a; 1], and the curvlib parameter
vector of the layer is vec(W̄) = W̄ᵀ.reshape(-1) (``vec`` stacks columns, Def. 3.2).  The
per-sample gradient of one position t is g_t ā_tᵀ, and of the layer DW̄ = Σ_t g_t ā_tᵀ
(3.27); for a Linear layer there is a single position.

What each adapter maps (``weight`` is the module's tensor, shapes with named dims):

=====================  ==============================  ===========================================
module                 W (columns of W̄ before b)       ā_t (one row of :meth:`activations`)
=====================  ==============================  ===========================================
``nn.Linear``          ``weight`` ``[d_out, d_in]``      the input row ``[d_in]``
``nn.Conv2d``          ``weight.reshape(c_out, -1)``     the unfolded input patch ``[c_in·k_h·k_w]``
                       ``[c_out, c_in·k_h·k_w]``         (torch's ``unfold`` order (c_in, k_h, k_w))
``nn.ConvTranspose2d`` ``weight.transpose(0, 1)``        the patch of the zero-inserted input with
                       ``.reshape(c_out, -1)``           its kernel axes reversed (see below)
=====================  ==============================  ===========================================

Only trainable parameters enter W̄: a bias with ``requires_grad=False`` is a constant and
the layer is treated as bias-free (ā without the trailing 1).

ConvTranspose2d (thesis §5.2.2, Relationship 1).  A transposed convolution with stride
e, padding τ, dilation δ and output padding π equals a stride-1 convolution, of dilation
δ, on the *fractionally strided* input A' (e − 1 zeros inserted between rows and columns),
padded by δ(k−1) − τ on the top/left and δ(k−1) − τ + π on the bottom/right (a negative
amount crops), with the kernel rotated by π (the operator R) and input/output channel
axes swapped (torch stores the weight as ``[c_in, c_out, k_h, k_w]``).  Instead of
rotating the kernel we reverse the kernel axes of each unfolded patch (R applied to the
activations, which is the same linear map transposed), so that W̄'s column
(i, k_y, k_x) holds ``weight[i, :, k_y, k_x]`` — W = ``weight.transpose(0, 1).reshape(c_out,
-1)``, a plain channel swap with no kernel flip.  A reshape without that transpose would
mix input and output channels (DESIGN.md §10).

Discovery (:func:`find_layers`): every module of ``model.named_modules()`` whose type has a
registered adapter becomes a layer, in registration order (which is also the order of the
flat curvlib vector).  Trainable parameters of any other module (BatchNorm, LayerNorm,
Embedding, …) are *excluded* from the curvature with an :class:`ExcludedParametersWarning`
naming each one; parameters with ``requires_grad=False`` are skipped silently.  A parameter
shared by two modules (weight tying) raises, and a module called twice in one forward
raises at capture time (:mod:`curvlib.capture.hooks`).
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from curvlib.errors import ShapeError, UnsupportedLayerError

__all__ = [
    "BatchCouplingWarning",
    "Conv2dAdapter",
    "ConvTranspose2dAdapter",
    "ExcludedParametersWarning",
    "LayerAdapter",
    "LayerBlock",
    "LayerCandidate",
    "LinearAdapter",
    "blocks_params",
    "blocks_params_to_vector",
    "blocks_vector_to_params",
    "find_layers",
    "warn_excluded",
]


class ExcludedParametersWarning(UserWarning):
    """Trainable parameters were left out of the curvature (no adapter, never called, …).

    The message lists each excluded parameter by its qualified name and the reason; the
    names are also recorded in the operator's ``excluded`` attribute.
    """


class BatchCouplingWarning(UserWarning):
    """A module couples the samples of a batch (BatchNorm in training mode), so per-sample
    gradients, and hence the Fisher/GGN statistics, are not those of independent samples."""


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


class LayerAdapter(abc.ABC):
    """Maps one module to its layer matrix W̄ ``[g_dim, a_dim]`` and its per-sample statistics.

    An adapter is created for one module (by the registry's ``layers`` family, see
    :func:`find_layers`) and lives as long as the curvature operator built from it; conv
    adapters learn their output ``spatial_shape`` from the captured forward.

    Attributes:
        module: the adapted module.
        name: its qualified name in the model (``""`` if unknown).
        spatial_shape: ``(H_out, W_out)`` for conv layers once a forward was captured,
            ``None`` for Linear (or before capture).
    """

    #: module types this adapter handles (also registered as plugin metadata)
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, module: nn.Module, *, name: str = "") -> None:
        self.module = module
        self.name = name
        self.spatial_shape: tuple[int, int] | None = None
        self._check_module()

    # -- description -------------------------------------------------------------------
    def _label(self) -> str:
        return f"{type(self.module).__name__} layer {self.name!r}" if self.name else type(self.module).__name__

    def _check_module(self) -> None:
        """Raise :class:`UnsupportedLayerError` for configurations the adapter cannot map."""
        if getattr(self.module, "weight", None) is None:
            raise UnsupportedLayerError(f"{self._label()}: expected a 'weight' parameter, got none")

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def has_bias(self) -> bool:
        """Whether W̄ has the bias column (the module has a bias that requires grad)."""
        b = getattr(self.module, "bias", None)
        return b is not None and b.requires_grad

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """Number of columns of W (d_in, or c_in·k_h·k_w for conv)."""

    @property
    @abc.abstractmethod
    def g_dim(self) -> int:
        """Number of rows of W̄ (d_out, or c_out for conv)."""

    @property
    def a_dim(self) -> int:
        """Number of columns of W̄: ``in_features + 1`` with a bias, else ``in_features``."""
        return self.in_features + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """p_i = a_dim · g_dim."""
        return self.a_dim * self.g_dim

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        """``(k_h, k_w)`` for conv layers, ``None`` for Linear."""
        return None

    def params(self) -> list[torch.Tensor]:
        """The parameters W̄ is built from, in order: ``[weight]`` or ``[weight, bias]``."""
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    # -- weight <-> W ------------------------------------------------------------------
    @abc.abstractmethod
    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (module layout) -> W ``[g_dim, in_features]``."""

    @abc.abstractmethod
    def _matrix_to_weight(self, W: torch.Tensor) -> torch.Tensor:
        """W ``[g_dim, in_features]`` -> a tensor shaped like ``weight``."""

    def params_to_matrix(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like :meth:`params` -> W̄ = [W, b] ``[g_dim, a_dim]``."""
        expected = [p.shape for p in self.params()]
        got = [tuple(t.shape) for t in tensors]
        if len(tensors) != len(expected) or any(tuple(e) != g for e, g in zip(expected, got)):
            raise ShapeError(
                f"{self._label()}: expected tensors of shapes {[list(e) for e in expected]}, got {[list(g) for g in got]}"
            )
        W = self._weight_to_matrix(tensors[0])
        if self.has_bias:
            W = torch.cat([W, tensors[1].reshape(-1, 1)], dim=1)
        return W

    def matrix_to_params(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        """W̄ ``[g_dim, a_dim]`` -> ``[weight]`` or ``[weight, bias]`` shaped like the parameters."""
        if tuple(Wbar.shape) != (self.g_dim, self.a_dim):
            raise ShapeError(f"{self._label()}: expected W̄ of shape [{self.g_dim}, {self.a_dim}], got {list(Wbar.shape)}")
        out = [self._matrix_to_weight(Wbar[:, : self.in_features])]
        if self.has_bias:
            out.append(Wbar[:, -1].reshape(self.module.bias.shape))
        return out

    def to_matrix(self) -> torch.Tensor:
        """The current W̄ ``[g_dim, a_dim]`` built from the module's weight (and bias)."""
        return self.params_to_matrix([p.detach() for p in self.params()])

    def params_to_vector(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like :meth:`params` -> vec(W̄) ``[p_i]`` (columns stacked)."""
        return self.params_to_matrix(tensors).T.reshape(-1)

    def vector_to_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        """vec(W̄) ``[p_i]`` -> tensors shaped like :meth:`params`."""
        if v.shape != (self.num_params,):
            raise ShapeError(f"{self._label()}: expected a vector [{self.num_params}], got {list(v.shape)}")
        return self.matrix_to_params(v.reshape(self.a_dim, self.g_dim).T)

    # -- statistics --------------------------------------------------------------------
    def _append_one(self, a: torch.Tensor) -> torch.Tensor:
        """a ``[..., in_features]`` -> ā ``[..., a_dim]`` (trailing 1 when the layer has a bias)."""
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    @abc.abstractmethod
    def activations(self, input: torch.Tensor, *, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The module's input -> ā: Linear ``[m, a_dim]``; conv ``[m, T, a_dim]`` with T = H_out·W_out
        positions in row-major order (t = row·W_out + col).

        ``output_shape`` is the shape of the module's output in the same call (conv adapters
        use it to record ``spatial_shape`` and, for ConvTranspose2d, to honour a call-time
        ``output_size``).
        """

    @abc.abstractmethod
    def pre_activation_grads(self, grad_output: torch.Tensor) -> torch.Tensor:
        """∂(·)/∂s with the module's output layout -> g: Linear ``[m, g_dim]``; conv ``[m, T, g_dim]``."""


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: W̄ = [weight, bias] ``[d_out, d_in+1]``, ā = [input; 1].

    Inputs must be ``[m, d_in]`` (inputs with extra leading dimensions raise
    :class:`ShapeError`).
    """

    module_types = (nn.Linear,)

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def g_dim(self) -> int:
        return int(self.module.weight.shape[0])

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _matrix_to_weight(self, W: torch.Tensor) -> torch.Tensor:
        return W

    def activations(self, input: torch.Tensor, *, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """input ``[m, d_in]`` -> ā ``[m, a_dim]``."""
        if input.ndim != 2 or input.shape[1] != self.in_features:
            raise ShapeError(
                f"{self._label()}: expected an input [m, {self.in_features}], got {list(input.shape)} "
                "(inputs with extra leading dimensions are not supported)"
            )
        return self._append_one(input)

    def pre_activation_grads(self, grad_output: torch.Tensor) -> torch.Tensor:
        """grad_output ``[m, d_out]`` -> g ``[m, d_out]``."""
        if grad_output.ndim != 2 or grad_output.shape[1] != self.g_dim:
            raise ShapeError(f"{self._label()}: expected an output gradient [m, {self.g_dim}], got {list(grad_output.shape)}")
        return grad_output


class _ConvAdapterBase(LayerAdapter):
    """Shared parts of the 2-D convolution adapters (groups = 1 only)."""

    def _check_module(self) -> None:
        super()._check_module()
        if self.module.groups != 1:
            raise UnsupportedLayerError(
                f"{self._label()}: only groups=1 is supported, got groups={self.module.groups}"
            )

    @property
    def kernel_size(self) -> tuple[int, int]:
        return _pair(self.module.kernel_size)

    @property
    def g_dim(self) -> int:
        return int(self.module.out_channels)

    @property
    def in_features(self) -> int:
        kh, kw = self.kernel_size
        return int(self.module.in_channels) * kh * kw

    def _check_input(self, input: torch.Tensor) -> None:
        if input.ndim != 4 or input.shape[1] != self.module.in_channels:
            raise ShapeError(
                f"{self._label()}: expected a batched input [m, {self.module.in_channels}, H, W], got {list(input.shape)}"
            )

    def _patches_to_activations(self, patches: torch.Tensor) -> torch.Tensor:
        """unfold output ``[m, in_features, T]`` -> ā ``[m, T, a_dim]``."""
        return self._append_one(patches.transpose(1, 2))

    def pre_activation_grads(self, grad_output: torch.Tensor) -> torch.Tensor:
        """grad_output ``[m, c_out, H_out, W_out]`` -> g ``[m, T, c_out]`` (t = row·W_out + col)."""
        if grad_output.ndim != 4 or grad_output.shape[1] != self.g_dim:
            raise ShapeError(
                f"{self._label()}: expected an output gradient [m, {self.g_dim}, H_out, W_out], got {list(grad_output.shape)}"
            )
        return grad_output.flatten(2).transpose(1, 2)


class Conv2dAdapter(_ConvAdapterBase):
    """``nn.Conv2d`` (any stride, dilation, padding incl. ``"same"``/``"valid"``, any
    ``padding_mode``; groups = 1): W = ``weight.reshape(c_out, c_in·k_h·k_w)``, ā_t the
    unfolded input patch of position t (torch's ``unfold`` order (c_in, k_h, k_w)) and a 1."""

    module_types = (nn.Conv2d,)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _matrix_to_weight(self, W: torch.Tensor) -> torch.Tensor:
        return W.reshape(self.module.weight.shape)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` — as torch computes it, asymmetric for ``"same"``."""
        mod = self.module
        if isinstance(mod.padding, str):
            if mod.padding == "valid":
                return (0, 0, 0, 0)
            (dh, dw), (kh, kw) = _pair(mod.dilation), self.kernel_size
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        ph, pw = _pair(mod.padding)
        return (pw, pw, ph, ph)

    def activations(self, input: torch.Tensor, *, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """input ``[m, c_in, H, W]`` -> ā ``[m, T, a_dim]``."""
        self._check_input(input)
        mod = self.module
        pad = self._explicit_padding()
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(input, pad, mode=mode) if any(pad) else input
        patches = F.unfold(x, self.kernel_size, dilation=_pair(mod.dilation), padding=0, stride=_pair(mod.stride))
        (dh, dw), (sh, sw), (kh, kw) = _pair(mod.dilation), _pair(mod.stride), self.kernel_size
        H_out = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
        W_out = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        if output_shape is not None and tuple(output_shape[-2:]) != (H_out, W_out):
            raise ShapeError(
                f"{self._label()}: unfolded patches give an output of {H_out}×{W_out}, the module produced "
                f"{list(output_shape)} (unsupported forward override?)"
            )
        self.spatial_shape = (H_out, W_out)
        return self._patches_to_activations(patches)


class ConvTranspose2dAdapter(_ConvAdapterBase):
    """``nn.ConvTranspose2d`` (stride, padding, output_padding — also a call-time
    ``output_size`` —, dilation; groups = 1) through the reformulation of §5.2.2 with
    the kernel rotation applied to the patches: W = ``weight.transpose(0, 1).reshape(c_out,
    c_in·k_h·k_w)`` (the weight is ``[c_in, c_out, k_h, k_w]``), ā_t the kernel-reversed patch
    of the zero-inserted, padded input (see the module docstring)."""

    module_types = (nn.ConvTranspose2d,)

    def _check_module(self) -> None:
        super()._check_module()
        if self.module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{self._label()}: only padding_mode='zeros' is supported, got {self.module.padding_mode!r}")

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        # weight [c_in, c_out, k_h, k_w] -> [c_out, c_in, k_h, k_w] -> [c_out, c_in·k_h·k_w]
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)

    def _matrix_to_weight(self, W: torch.Tensor) -> torch.Tensor:
        c_in, c_out, kh, kw = self.module.weight.shape
        return W.reshape(c_out, c_in, kh, kw).transpose(0, 1)

    def activations(self, input: torch.Tensor, *, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """input ``[m, c_in, H, W]`` -> ā ``[m, T, a_dim]`` with T = H_out·W_out."""
        self._check_input(input)
        mod = self.module
        m, c_in, H, W = input.shape
        (sh, sw), (dh, dw), (kh, kw) = _pair(mod.stride), _pair(mod.dilation), self.kernel_size
        ph, pw = _pair(mod.padding)
        base_h = (H - 1) * sh - 2 * ph + dh * (kh - 1) + 1
        base_w = (W - 1) * sw - 2 * pw + dw * (kw - 1) + 1
        if output_shape is not None:
            H_out, W_out = int(output_shape[-2]), int(output_shape[-1])
        else:
            oph, opw = _pair(mod.output_padding)
            H_out, W_out = base_h + oph, base_w + opw
        oph, opw = H_out - base_h, W_out - base_w  # effective output padding
        # fractionally strided input A': (e - 1) zeros between rows and between columns
        z = input.new_zeros(m, c_in, (H - 1) * sh + 1, (W - 1) * sw + 1)
        z[:, :, ::sh, ::sw] = input
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        z = F.pad(z, (left, left + opw, top, top + oph))  # negative amounts crop
        patches = F.unfold(z, (kh, kw), dilation=(dh, dw), padding=0, stride=1)
        if patches.shape[2] != H_out * W_out:
            raise ShapeError(
                f"{self._label()}: unfolded patches give {patches.shape[2]} positions, the module produced "
                f"{H_out}×{W_out}"
            )
        # the rotation R of §5.2.2, put on the patches: reverse both kernel axes
        patches = patches.reshape(m, c_in, kh, kw, -1).flip(2, 3).reshape(m, c_in * kh * kw, -1)
        self.spatial_shape = (H_out, W_out)
        return self._patches_to_activations(patches)


# -- discovery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCandidate:
    """A module with an adapter, before capture: its qualified name, layer kind and adapter."""

    name: str
    kind: str
    adapter: LayerAdapter


@dataclass(frozen=True)
class LayerBlock:
    """One layer block of a curvature operator.

    Attributes:
        name: qualified module name in the model.
        module: the module.
        adapter: its :class:`LayerAdapter` (the weight/bias <-> vec(W̄) mapping).
        kind: the layer plugin kind (``"linear"``, ``"conv2d"``, ``"conv_transpose2d"``, …).
        a_dim: columns of W̄ (d_in+1 with a bias).
        g_dim: rows of W̄ (d_out / c_out).
        p_i: number of parameters, a_dim·g_dim.
        slice: the block's rows in the flat curvlib vector ``[p]``.
        param_shapes: shapes of ``adapter.params()`` (weight, and bias when present).
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    kind: str
    a_dim: int
    g_dim: int
    p_i: int
    slice: slice
    param_shapes: tuple[torch.Size, ...]

    @property
    def has_bias(self) -> bool:
        return self.adapter.has_bias

    @property
    def spatial_shape(self) -> tuple[int, int] | None:
        return self.adapter.spatial_shape

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        return self.adapter.kernel_size

    @classmethod
    def build(cls, candidates: Iterable[LayerCandidate]) -> list[LayerBlock]:
        """Lay the candidates out one after the other in the flat vector."""
        blocks, start = [], 0
        for c in candidates:
            ad = c.adapter
            p = ad.num_params
            blocks.append(
                cls(
                    name=c.name,
                    module=ad.module,
                    adapter=ad,
                    kind=c.kind,
                    a_dim=ad.a_dim,
                    g_dim=ad.g_dim,
                    p_i=p,
                    slice=slice(start, start + p),
                    param_shapes=tuple(t.shape for t in ad.params()),
                )
            )
            start += p
        return blocks


# --------------------------------------------------------------------------- flat vector <-> parameters


def blocks_params(layers: Sequence[LayerBlock]) -> list[torch.Tensor]:
    """The parameters of ``layers`` (weight, then bias when present, layer by layer): the
    order of list-shaped vectors in the flat curvlib layout."""
    return [t for L in layers for t in L.adapter.params()]


def blocks_params_to_vector(layers: Sequence[LayerBlock], tensors: Sequence[torch.Tensor], who: str) -> torch.Tensor:
    """Tensors shaped like :func:`blocks_params` -> the flat curvlib vector ``[p]``
    (vec of W̄ = [W, b], columns stacked, layer after layer).

    Raises:
        ShapeError: ``tensors`` are not shaped like the parameters (``who`` names the caller).
    """
    shapes = [t.shape for L in layers for t in L.adapter.params()]
    if len(tensors) != len(shapes) or any(tuple(t.shape) != tuple(s) for t, s in zip(tensors, shapes)):
        raise ShapeError(
            f"{who}: expected tensors shaped like the parameters {[list(s) for s in shapes]}, "
            f"got {[list(getattr(t, 'shape', ())) for t in tensors]}"
        )
    out, k = [], 0
    for L in layers:
        n = len(L.adapter.params())
        out.append(L.adapter.params_to_vector(list(tensors[k : k + n])))
        k += n
    return torch.cat(out)


def blocks_vector_to_params(layers: Sequence[LayerBlock], v: torch.Tensor, p: int, who: str) -> list[torch.Tensor]:
    """The flat curvlib vector ``[p]`` -> tensors shaped like :func:`blocks_params`.

    Raises:
        ShapeError: ``v`` is not ``[p]`` (``who`` names the caller).
    """
    if v.shape != (p,):
        raise ShapeError(f"{who}: expected a vector [{p}], got {list(v.shape)}")
    return [t for L in layers for t in L.adapter.vector_to_params(v[L.slice])]


def _adapter_spec_for(module: nn.Module, specs: Sequence[Any]) -> Any | None:
    """The layer spec whose ``module_types`` match ``module`` most specifically (MRO distance)."""
    mro = type(module).__mro__
    best, best_rank = None, None
    for spec in specs:
        for t in spec.metadata.get("module_types", ()):
            if isinstance(module, t):
                rank = mro.index(t) if t in mro else len(mro)
                if best_rank is None or rank < best_rank:
                    best, best_rank = spec, rank
    return best


def find_layers(model: nn.Module, registry: Any) -> tuple[list[LayerCandidate], dict[str, str]]:
    """Walk ``model.named_modules()`` and create an adapter for each module a layer plugin handles.

    Args:
        model: any ``nn.Module`` (not necessarily ``nn.Sequential``).
        registry: a :class:`curvlib.plugins.Registry`; its ``layers`` family supplies the
            adapters (each spec's ``metadata["module_types"]``).

    Returns:
        ``(candidates, excluded)``: the adapted layers in registration order, and
        ``{qualified parameter name: reason}`` for trainable parameters left out.  No warning
        is emitted here (the caller warns once, after capture, see :func:`warn_excluded`).

    Raises:
        UnsupportedLayerError: a parameter of an adapted layer is shared with another
            module (weight tying), or an adapter rejects its module (e.g. groups ≠ 1), or
            no module of the model has an adapter.
    """
    specs = list(registry.layers)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, mod))

    candidates: list[LayerCandidate] = []
    excluded: dict[str, str] = {}
    claimed: set[int] = set()
    for mod_name, mod in model.named_modules():
        spec = _adapter_spec_for(mod, specs)
        if spec is None:
            continue
        weight = getattr(mod, "weight", None)
        bias = getattr(mod, "bias", None)
        if weight is None or not weight.requires_grad:
            if bias is not None and bias.requires_grad:
                excluded[_qual(mod_name, "bias")] = (
                    f"bias of {type(mod).__name__} {mod_name!r} whose weight is frozen (a bias-only block is not supported)"
                )
                claimed.add(id(bias))
            continue
        adapter = spec.factory(mod, name=mod_name)
        for p in adapter.params():
            others = sorted({n for n, o in owners.get(id(p), []) if o is not mod})
            if others:
                raise UnsupportedLayerError(
                    f"a parameter of {type(mod).__name__} layer {mod_name!r} is shared with module(s) "
                    f"{others} (weight tying); curvlib needs each adapted parameter owned by one module"
                )
            claimed.add(id(p))
        candidates.append(LayerCandidate(mod_name, spec.kind, adapter))

    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in claimed:
            owner = owners.get(id(p), [("", None)])[0][1]
            excluded[pname] = f"no layer adapter for {type(owner).__name__}" if owner is not None else "no layer adapter"

    if not candidates:
        known = sorted({t.__name__ for s in specs for t in s.metadata.get("module_types", ())})
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no trainable module with a layer adapter; supported module types: {known}"
        )
    return candidates, excluded


def warn_excluded(excluded: dict[str, str], *, stacklevel: int = 3) -> None:
    """Emit one :class:`ExcludedParametersWarning` listing every excluded parameter and why."""
    if not excluded:
        return
    lines = "\n".join(f"  {name}: {why}" for name, why in excluded.items())
    warnings.warn(
        f"{len(excluded)} trainable parameter(s) are excluded from the curvature (held fixed):\n{lines}",
        ExcludedParametersWarning,
        stacklevel=stacklevel,
    )


def warn_batch_coupling(model: nn.Module, *, stacklevel: int = 3) -> None:
    """Warn (:class:`BatchCouplingWarning`) if a BatchNorm module of ``model`` is in training mode."""
    coupled = [n for n, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training]
    if coupled:
        warnings.warn(
            f"BatchNorm module(s) {coupled} are in training mode: batch statistics couple the samples, so the "
            "captured per-sample gradients are not those of independent samples (and the forward updates their "
            "running statistics); call model.eval() for exact per-sample curvature",
            BatchCouplingWarning,
            stacklevel=stacklevel,
        )


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
