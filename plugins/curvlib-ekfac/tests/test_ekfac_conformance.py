"""EKFAC passes curvlib's conformance kit for approximators (curvlib.testing.conformance)."""

from __future__ import annotations

from ekfac_support import require_installed, xfail_without_plugin_block_serialization

require_installed()

from curvlib.testing.conformance import ApproximatorConformance  # noqa: E402


class TestEKFACConformance(ApproximatorConformance):
    kind = "ekfac"
    registry_kind_installed = True  # found through this distribution's entry point
    distribution = "curvlib-ekfac"
    psd = True  # S ≥ 0 in an orthonormal basis
    exact_on_rank_one = True  # one pair: F = (ā ⊗ g)(ā ⊗ g)ᵀ is diagonal in KFAC's eigenbasis
    bad_options = ({"max_chunk_entries": 0}, {"ema": "high"})

    def test_state_dict_round_trip_is_exact(self):
        xfail_without_plugin_block_serialization()
        super().test_state_dict_round_trip_is_exact()
