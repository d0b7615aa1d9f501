"""The conformance kit: pytest mixins a plugin author subclasses to inherit curvlib's checks.

One mixin per plugin family.  A test class names the kind (and its options) and inherits
every check; curvlib's own built-ins pass the same kit (``tests/conformance/``)::

    from curvlib.testing.conformance import ApproximatorConformance

    class TestEKFAC(ApproximatorConformance):
        kind = "ekfac"
        options = {}                     # options of the kind, validated by its pydantic model
        psd = True                       # the fitted blocks are positive semi-definite
        registry_kind_installed = True   # the kind must come from an installed entry point

==========================  ===========================================================
mixin                       what it checks
==========================  ===========================================================
ApproximatorConformance     fits on random Linear and conv ``LayerStatistics``: products
                            equal ``to_dense()``; symmetric (PSD with ``psd = True``); the
                            ``tikhonov`` damped inverse equals a dense solve; dtype/device
                            kept (float32, float64, cuda); ``LayerFit.state_dict`` round
                            trip exact; refresh from ``previous``; non-finite statistics
DampingConformance          the inverse equals a dense solve of :meth:`dense_reference`
                            (the author's formula); dtype/device; non-finite factors never
                            give NaN (previous kept with a NumericalWarning, or NumericalError)
CoarseSpaceConformance      columns finite, shapes match the partition; two-level error
                            never above the first level's (4.21) on small dense problems
CurvatureConformance        products equal ``to_dense()`` equal :meth:`dense_reference`;
                            symmetric/PSD; statistics define the diagonal blocks
LayerAdapterConformance     parameters ↔ W̄ ↔ vec round trip (against an independent
                            mapping for built-in types); uses carry the batch and the
                            block's dims; the captured statistics reproduce per-sample
                            gradients from ``torch.func``; float32 kept
OperatorConformance         any ``LinearOperator`` against an independent dense reference:
                            vector / matrix / list operands, adjoint products, the lazy
                            algebra, ``to_dense``/``to_scipy``, shape and dtype errors
                            (a subclass implements ``make_operator()``; no kind)
==========================  ===========================================================

Every mixin of a plugin family also checks that the kind is registered (through an
installed entry point with ``registry_kind_installed = True``) and that its options model
rejects unknown fields and the values listed in ``bad_options``.

Where the kind comes from: :meth:`make_registry` returns ``curvlib.plugins.load_registry()``
(curvlib's built-ins and every installed plugin).  Before the distribution is installed,
override it to register the plugin module into a fresh :class:`~curvlib.plugins.Registry`::

    def make_registry(self):
        registry = Registry()
        registry.register(my_plugin_module, name="my_plugin")
        return registry

Random inputs are drawn with hypothesis (:mod:`curvlib.testing.strategies`), at most
``max_examples`` per check, under the hypothesis profile loaded by the test session
(curvlib's ``conftest.py`` loads a deterministic one; a plugin's can call
:func:`curvlib.testing.strategies.load_profile`).  Ground truth is dense float64
(:mod:`curvlib.testing.references`, ``torch.linalg``); tolerances come from the dtype
(:func:`curvlib.testing.compare.default_tolerances`).  The ``cuda`` variants carry the
``cuda`` marker (register it in your pytest configuration) and skip without a device.

A check can be run outside pytest too: ``TestEKFAC().test_fit_products_match_to_dense("linear")``.

One module per family, on a base they share:

===========================  ==========================================================
module                       holds
===========================  ==========================================================
``approximators``            :class:`ApproximatorConformance`
``dampings``                 :class:`DampingConformance` (and the blocks it inverts)
``coarse``                   :class:`CoarseSpaceConformance`
``curvatures``               :class:`CurvatureConformance`
``adapters``                 :class:`LayerAdapterConformance`
``operators``                :class:`OperatorConformance` (any operator, not a plugin kind)
``_kind``                    the base of every mixin: kind, options, registration checks
``_common``                  :data:`DEVICES`, failure messages, seeded random inputs
===========================  ==========================================================
"""

from curvlib.testing.conformance._common import DEVICES
from curvlib.testing.conformance.adapters import LayerAdapterConformance
from curvlib.testing.conformance.approximators import ApproximatorConformance
from curvlib.testing.conformance.coarse import CoarseSpaceConformance
from curvlib.testing.conformance.curvatures import CurvatureConformance
from curvlib.testing.conformance.dampings import DampingConformance
from curvlib.testing.conformance.operators import OperatorConformance

__all__ = [
    "ApproximatorConformance",
    "CoarseSpaceConformance",
    "CurvatureConformance",
    "DEVICES",
    "DampingConformance",
    "LayerAdapterConformance",
    "OperatorConformance",
]
