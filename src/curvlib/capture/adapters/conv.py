"""Convolutions of any dimension (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``), grouped and depthwise.

A convolution is a Linear map applied at every position of its output grid (KFC, §3.4.1):
ā_t is the unfolded input patch of position t (channels, then kernel offsets, as torch's
``weight.reshape(c_out, -1)`` orders them) with a trailing 1, and W̄ = [W, b].  Positions
are the N-D output grid, row-major; its geometry carries the kernel size (the default band
radius of the SVD methods, §3.4.3).

=============================  ===========================================  ================================
module                         W (per group j)                              ā_t
=============================  ===========================================  ================================
``ConvNd``                     ``weight[j·c_out/G:…].reshape(c_out/G, -1)``  patch of input channels of group j
``ConvTransposeNd``            ``weight[j·c_in/G:…].transpose(0, 1)``        kernel-reversed patch of the
                               ``.reshape(c_out/G, -1)``                      zero-inserted, padded input
=============================  ===========================================  ================================

**Groups** (``groups = G > 1``, depthwise when G = c_in): the layer is block-diagonal over
its groups — group j maps input channels [j·c_in/G, (j+1)·c_in/G) to output channels
[j·c_out/G, (j+1)·c_out/G) with its own slice of the weight and bias — so each group is its
own layer block (named ``"<module>:group<j>"``), a Kronecker block per group; the blocks of
one module share the module's forward hook and its unfolded input.

**Transposed convolutions** (thesis §5.2.2, Relationship 1).  A transposed convolution
with stride e, padding τ, dilation δ and output padding π equals a stride-1 convolution,
of dilation δ, on the *fractionally strided* input (e − 1 zeros inserted along every
spatial axis), padded by δ(k−1) − τ before and δ(k−1) − τ + π after (a negative amount
crops), with the kernel rotated by π and the channel axes swapped (torch stores the
weight as ``[c_in, c_out/G, *kernel]``).  Instead of rotating the kernel we reverse the
kernel axes of each unfolded patch (the rotation applied to the activations, the same
linear map transposed), so W̄'s column (i, k_1, …, k_N) holds ``weight[i, :, k_1, …, k_N]``:
a plain channel swap with no kernel flip (a reshape without the transpose would mix
input and output channels, DESIGN.md §10).  A call-time ``output_size`` is honoured
through the output's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlib.capture.adapters.base import LayerAdapter, UseCapture, pair
from curvlib.capture.adapters.linear import AffineAdapter
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry

__all__ = ["ConvAdapter", "ConvTransposeAdapter", "Conv2dAdapter", "ConvTranspose2dAdapter", "unfold_patches"]


def unfold_patches(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """Patches of an (already padded) input: ``x [m, C, *S]`` -> ``[m, T, C·prod(kernel)]``.

    Column order (c, k_1, …, k_N), as ``weight.reshape(c_out, -1)``; positions row-major over
    the output grid.  2-D uses ``F.unfold``; other dimensions take strided windows along
    each spatial axis (``Tensor.unfold``), one copy at the end.
    """
    m, C = x.shape[:2]
    N = len(kernel)
    if N == 2:
        return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # window axis appended last
    x = x[(Ellipsis, *[slice(None, None, d) for d in dilation])]  # [m, C, *O, *kernel]
    perm = [0, *range(2, 2 + N), 1, *range(2 + N, 2 + 2 * N)]
    T = math.prod(x.shape[2 : 2 + N])
    return x.permute(perm).reshape(m, T, C * math.prod(kernel))


class _ConvBase(AffineAdapter):
    """Shared parts of the convolution adapters: groups, the N-D geometry, output gradients."""

    def __init__(self, module: nn.Module, *, name: str = "", batch_dim: int = 0, group: int = 0) -> None:
        self.group = int(group)
        super().__init__(module, name=name, batch_dim=batch_dim)

    @classmethod
    def create(cls, module: nn.Module, *, name: str = "", batch_dim: int = 0) -> list[LayerAdapter]:
        if not cls._trainable(module):
            return []
        return [cls(module, name=name, batch_dim=batch_dim, group=j) for j in range(int(module.groups))]

    def _check_module(self) -> None:
        super()._check_module()
        if self.batch_dim != 0:
            raise UnsupportedLayerError(f"{self._label()}: convolutions take the samples on axis 0, not {self.batch_dim}")

    @property
    def block_name(self) -> str:
        return self.name if self.groups == 1 else f"{self.name}:group{self.group}"

    @property
    def groups(self) -> int:
        return int(self.module.groups)

    @property
    def ndim(self) -> int:
        return len(self.module.kernel_size)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.module.kernel_size)

    @property
    def g_dim(self) -> int:
        return int(self.module.out_channels) // self.groups

    @property
    def in_channels_per_group(self) -> int:
        return int(self.module.in_channels) // self.groups

    @property
    def in_features(self) -> int:
        return self.in_channels_per_group * math.prod(self.kernel_size)

    def _out_slice(self) -> slice:
        return slice(self.group * self.g_dim, (self.group + 1) * self.g_dim)

    def _in_slice(self) -> slice:
        c = self.in_channels_per_group
        return slice(self.group * c, (self.group + 1) * c)

    def param_slices(self) -> list[slice | None]:
        if self.groups == 1:
            return [None] * len(self.params())
        return [self._weight_slice()] + ([self._out_slice()] if self.has_bias else [])

    def _weight_slice(self) -> slice:
        raise NotImplementedError

    def _check_input(self, x: Any) -> torch.Tensor:
        N = self.ndim
        if not isinstance(x, torch.Tensor) or x.ndim != N + 2 or x.shape[1] != int(self.module.in_channels):
            raise ShapeError(
                f"{self._label()}: expected a batched input [m, {int(self.module.in_channels)}, {N} spatial axes], got "
                f"{list(getattr(x, 'shape', ()))}"
            )
        return x.detach()[:, self._in_slice()]

    def _use(self, patches: torch.Tensor, output: torch.Tensor, out_spatial: tuple[int, ...]) -> list[UseCapture]:
        m, T = patches.shape[:2]
        if T != math.prod(out_spatial):
            raise ShapeError(
                f"{self._label()}: unfolded patches give {T} positions, the module produced {list(out_spatial)} "
                "(unsupported forward override?)"
            )
        self._spatial_shape = tuple(out_spatial)
        rows = self._rows(patches)
        out_sl, d_g = self._out_slice(), self.g_dim

        def columns(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            gy = grads[0][:, out_sl]  # [m, c_out/G, *O]
            return gy.reshape(m, d_g, T).transpose(1, 2)

        return [UseCapture(rows, (output,), Geometry.grid(tuple(out_spatial), self.kernel_size), columns)]


class ConvAdapter(_ConvBase):
    """``nn.Conv1d/2d/3d`` (any stride, dilation, padding incl. ``"same"``/``"valid"``, any
    ``padding_mode``, any ``groups``): W = ``weight.reshape(c_out/G, -1)`` per group, ā_t the
    unfolded input patch of position t and a 1 (module docstring)."""

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def _weight_slice(self) -> slice:
        return self._out_slice()

    def _explicit_padding(self) -> list[int]:
        """F.pad's list (last axis first, ``[before, after]`` each) as torch computes the padding
        (asymmetric for ``"same"``)."""
        mod, N = self.module, self.ndim
        dil, k = pair(mod.dilation, N), self.kernel_size
        if isinstance(mod.padding, str):
            if mod.padding == "valid":
                return [0] * (2 * N)
            pads = []
            for i in reversed(range(N)):
                total = dil[i] * (k[i] - 1)
                pads += [total // 2, total - total // 2]
            return pads
        p = pair(mod.padding, N)
        return [v for i in reversed(range(N)) for v in (p[i], p[i])]

    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """input ``[m, c_in, *S]`` -> one use on the output grid: ā ``[m, T, a_dim]``."""
        x = self._check_input(args[0] if args else kwargs.get("input"))
        mod, N = self.module, self.ndim
        pad = self._explicit_padding()
        if any(pad):
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, pad, mode=mode)
        patches = unfold_patches(x, self.kernel_size, pair(mod.dilation, N), pair(mod.stride, N))
        return self._use(patches, output, tuple(output.shape[2:]))


class ConvTransposeAdapter(_ConvBase):
    """``nn.ConvTranspose1d/2d/3d`` (stride, padding, output_padding — also a call-time
    ``output_size`` —, dilation, groups) through the reformulation of §5.2.2 with the kernel
    rotation applied to the patches: W = ``weight[group].transpose(0, 1).reshape(c_out/G, -1)``
    (the weight is ``[c_in, c_out/G, *kernel]``), ā_t the kernel-reversed patch of the
    zero-inserted, padded input (module docstring)."""

    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def _check_module(self) -> None:
        super()._check_module()
        if self.module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{self._label()}: only padding_mode='zeros' is supported, got {self.module.padding_mode!r}")

    def _weight_slice(self) -> slice:
        return self._in_slice()

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        # weight [c_in/G, c_out/G, *k] -> [c_out/G, c_in/G, *k] -> [c_out/G, c_in/G·prod(k)]
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)

    def _matrix_to_weight(self, W: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        c_in_g, c_out_g, *k = shape
        return W.reshape(c_out_g, c_in_g, *k).transpose(0, 1)

    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """input ``[m, c_in, *S]`` -> one use on the output grid: ā ``[m, T, a_dim]``."""
        x = self._check_input(args[0] if args else kwargs.get("input"))
        mod, N = self.module, self.ndim
        stride, dil, k = pair(mod.stride, N), pair(mod.dilation, N), self.kernel_size
        padding = pair(mod.padding, N)
        m, c = x.shape[:2]
        S = x.shape[2:]
        out_spatial = tuple(int(s) for s in output.shape[2:])
        # fractionally strided input: (e − 1) zeros between neighbours along every axis
        z = x.new_zeros(m, c, *[(s - 1) * e + 1 for s, e in zip(S, stride)])
        z[(slice(None), slice(None), *[slice(None, None, e) for e in stride])] = x
        pad = []
        for i in reversed(range(N)):
            base = (S[i] - 1) * stride[i] - 2 * padding[i] + dil[i] * (k[i] - 1) + 1
            before = dil[i] * (k[i] - 1) - padding[i]
            pad += [before, before + out_spatial[i] - base]  # effective output padding after
        z = F.pad(z, pad)  # negative amounts crop
        patches = unfold_patches(z, k, dil, (1,) * N)
        # the rotation R of §5.2.2, put on the patches: reverse every kernel axis
        patches = patches.reshape(m, -1, c, *k).flip(list(range(3, 3 + N))).reshape(m, -1, c * math.prod(k))
        return self._use(patches, output, out_spatial)


#: the 2-D names of curvlib ≤ 0.1 (the classes handle every dimension)
Conv2dAdapter = ConvAdapter
ConvTranspose2dAdapter = ConvTransposeAdapter
