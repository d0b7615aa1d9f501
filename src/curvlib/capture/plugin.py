"""curvlib's built-in capture plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml).

Layer kinds: ``linear`` (``nn.Linear``), ``conv2d`` (``nn.Conv2d``) and
``conv_transpose2d`` (``nn.ConvTranspose2d``).  Each factory is a
:class:`curvlib.capture.adapters.LayerAdapter` subclass called as
``factory(module, name=qualified_name)``; ``module_types`` metadata says which modules it
handles.
"""

from __future__ import annotations

from curvlib.capture.adapters import Conv2dAdapter, ConvTranspose2dAdapter, LinearAdapter
from curvlib.plugins import hookimpl


@hookimpl
def curvlib_register_layers(registry):
    for kind, adapter in (
        ("linear", LinearAdapter),
        ("conv2d", Conv2dAdapter),
        ("conv_transpose2d", ConvTranspose2dAdapter),
    ):
        registry.add(kind, adapter, module_types=adapter.module_types)
