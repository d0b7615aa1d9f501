"""curvlib's built-in capture plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml).

Each factory is a :class:`curvlib.capture.adapters.LayerAdapter` subclass; discovery calls
``factory.create(module, name=..., batch_dim=...)`` for every module of the registered
``module_types`` (the most specific type wins).

==========================  ==================================================
layer kind                  module types
==========================  ==================================================
``linear``                  ``nn.Linear`` (on ``[m, *positions, d_in]``)
``conv1d/2d/3d``            ``nn.Conv1d/2d/3d`` (any groups)
``conv_transpose1d/2d/3d``  ``nn.ConvTranspose1d/2d/3d`` (any groups)
``embedding``               ``nn.Embedding``
``layer_norm``              ``nn.LayerNorm``
``rms_norm``                ``nn.RMSNorm``
``group_norm``              ``nn.GroupNorm``
``batch_norm``              ``nn.BatchNorm1d/2d/3d`` (any ``_BatchNorm``)
``multihead_attention``     ``nn.MultiheadAttention`` (its input projection)
``parameter``               none by type: any parameter no other kind covers, under
                            ``uncovered_parameters("per_sample")``
==========================  ==================================================
"""

from __future__ import annotations

from torch import nn

from curvlib.capture.adapters import (
    BatchNormAdapter,
    ConvAdapter,
    ConvTransposeAdapter,
    EmbeddingAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    LinearAdapter,
    MultiheadAttentionAdapter,
    ParameterAdapter,
    RMSNormAdapter,
)
from curvlib.plugins import hookimpl

BUILTIN_LAYERS = (
    ("linear", LinearAdapter, (nn.Linear,)),
    ("conv1d", ConvAdapter, (nn.Conv1d,)),
    ("conv2d", ConvAdapter, (nn.Conv2d,)),
    ("conv3d", ConvAdapter, (nn.Conv3d,)),
    ("conv_transpose1d", ConvTransposeAdapter, (nn.ConvTranspose1d,)),
    ("conv_transpose2d", ConvTransposeAdapter, (nn.ConvTranspose2d,)),
    ("conv_transpose3d", ConvTransposeAdapter, (nn.ConvTranspose3d,)),
    ("embedding", EmbeddingAdapter, (nn.Embedding,)),
    ("layer_norm", LayerNormAdapter, (nn.LayerNorm,)),
    ("rms_norm", RMSNormAdapter, (nn.RMSNorm,)),
    ("group_norm", GroupNormAdapter, (nn.GroupNorm,)),
    ("batch_norm", BatchNormAdapter, (nn.modules.batchnorm._BatchNorm,)),
    ("multihead_attention", MultiheadAttentionAdapter, (nn.MultiheadAttention,)),
    ("parameter", ParameterAdapter, ()),
)


@hookimpl
def curvlib_register_layers(registry):
    for kind, adapter, module_types in BUILTIN_LAYERS:
        registry.add(kind, adapter, module_types=module_types)
