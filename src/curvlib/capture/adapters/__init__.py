"""Layer adapters: how each module type maps to layer matrices W̄ and captures its uses.

One file per family of modules; :mod:`~curvlib.capture.adapters.base` holds the interface
a new layer type implements (and :mod:`curvlib.capture.plugin` registers the built-ins).

=================================  =====================================  ==============================
module                             W̄                                       ā (rows) / positions
=================================  =====================================  ==============================
``nn.Linear``                      [weight, bias]                          [x; 1] at every leading position
``nn.Conv1d/2d/3d``                [weight.reshape(c_out/G, -1), bias]     unfolded patches on the output grid
``nn.ConvTranspose1d/2d/3d``       [weightᵀ-swapped per group, bias]       kernel-reversed patches (§5.2.2)
``nn.Embedding``                   weightᵀ                                 one-hot tokens on a sequence
``nn.LayerNorm``/``RMSNorm``/      [γ; β] (one column)                     [1]; g = per-sample gradient
``GroupNorm``/``BatchNorm*``
``nn.MultiheadAttention``          [in_proj_weight, in_proj_bias]          [x; 1] per distinct q/k/v input
any module (``parameter`` kind)    θ.reshape(d_0, −1), one parameter θ     one-hot e_t at T = a_dim positions;
                                                                           g = per-sample gradient columns
=================================  =====================================  ==============================
"""

from curvlib.capture.adapters.attention import MultiheadAttentionAdapter
from curvlib.capture.adapters.base import (
    BatchCouplingWarning,
    ExcludedParametersWarning,
    LayerAdapter,
    UseCapture,
)
from curvlib.capture.adapters.conv import (
    Conv2dAdapter,
    ConvAdapter,
    ConvTranspose2dAdapter,
    ConvTransposeAdapter,
    unfold_patches,
)
from curvlib.capture.adapters.embedding import EmbeddingAdapter
from curvlib.capture.adapters.linear import AffineAdapter, LinearAdapter
from curvlib.capture.adapters.norm import (
    BatchNormAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    NormAdapter,
    RMSNormAdapter,
)
from curvlib.capture.adapters.parameter import ParameterAdapter

__all__ = [
    "AffineAdapter",
    "BatchCouplingWarning",
    "BatchNormAdapter",
    "Conv2dAdapter",
    "ConvAdapter",
    "ConvTranspose2dAdapter",
    "ConvTransposeAdapter",
    "EmbeddingAdapter",
    "ExcludedParametersWarning",
    "GroupNormAdapter",
    "LayerAdapter",
    "LayerNormAdapter",
    "LinearAdapter",
    "MultiheadAttentionAdapter",
    "NormAdapter",
    "ParameterAdapter",
    "RMSNormAdapter",
    "UseCapture",
    "unfold_patches",
]
