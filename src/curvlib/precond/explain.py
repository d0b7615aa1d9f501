"""What a composed preconditioner does to each layer: :meth:`Preconditioner.describe` and
``curvlib explain`` (docs/composition.md).

One row per layer block of the model (fallback layers included): the rule it matched, the
approximator, damping and T1/T2 it gets, its factor sizes, the memory of its fitted factors and
the FLOPs of one product with its fitted block:

- a Kronecker sum of r terms (A_k ``[d_a, d_a]``, B_k ``[d_g, d_g]``): r·(d_a² + d_g²) entries
  and Σ_k 2·d_a·d_g·(d_a + d_g) FLOPs (B_k X A_kᵀ per term) — what the π-split inverse of a
  single term costs too; an inverse applied in the factors' eigenbasis costs twice that;
- a block that carries its inverse factors (``singd``): K, C and their momenta,
  2·(d_a² + d_g²) entries, and 2·d_a·d_g·(d_a + d_g) FLOPs (P_G X P_A);
- any other block (``exact_block``): p_i² entries and 2·p_i² FLOPs.

Before the first refresh the number of terms is the most the approximator declares (its
:meth:`~curvlib.approximators.BlockApproximator.declared_blocks`; marked ``≤`` when it may fit
fewer, e.g. ``kfac``'s one term, two for a norm layer); after it, the fitted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from curvlib.capture.layout import find_layers, leave_out
from curvlib.linalg import InverseFactored

__all__ = ["LayerPlan", "format_plan", "layer_plan"]


@dataclass(frozen=True)
class LayerPlan:
    """One row of :func:`layer_plan`.

    Attributes:
        name: the layer block's qualified name; module: its module class name.
        rule: ``"rules[i]"`` or ``"default"``.
        approximator, damping: the kinds (with λ) it gets; ``"fallback"`` when left to the
            fallback optimizer.
        update_every, invert_every: its T1 and T2.
        a_dim, g_dim, p_i: d_a, d_g and the parameter count.
        terms: Kronecker terms (``None`` for an exact block or a fallback layer).
        entries: stored entries of the fitted block (memory = entries × the dtype's size).
        flops: FLOPs of one product with the fitted block.
        bound: not fitted yet, and the approximator may fit fewer terms than ``terms``: the
            numbers are upper bounds.
    """

    name: str
    module: str
    rule: str
    approximator: str
    damping: str
    update_every: int | None
    invert_every: int | None
    a_dim: int
    g_dim: int
    p_i: int
    terms: int | None
    entries: int
    flops: int
    bound: bool = False


def _kind(rk: Any) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in rk.data.items() if k not in ("ema", "interval"))
    return f"{rk.kind}({opts})" if opts else rk.kind


def layer_plan(pre: Any) -> list[LayerPlan]:
    """The rows of :meth:`Preconditioner.describe` (module docstring)."""
    with pre._discovery():
        candidates, _ = find_layers(pre.model, pre.registry)
        kept = {c.name for c in leave_out(pre.model, list(candidates), {})}
    fits = {}
    for g in pre.groups:
        if g.approximation is not None:
            fits.update(zip(g.approximation.names, g.approximation.fits))
    rows = []
    for c in candidates:
        ad = c.adapter
        index = pre._rule_index(c.name, ad.module, ad.num_params)
        rule = pre.resolved.groups[index]
        d_a, d_g, p = ad.a_dim, ad.g_dim, ad.num_params
        if rule.fallback or c.name not in kept:
            rows.append(LayerPlan(c.name, type(ad.module).__name__, rule.label, "fallback", "—", None, None,
                                  d_a, d_g, p, None, 0, 0))
            continue
        terms: int | None
        bound = False
        if c.name in fits:
            block = fits[c.name].block
            terms = len(block.terms) if hasattr(block, "terms") else None
            inverse_factored = isinstance(block, InverseFactored)
        else:
            declared = rule.approximator.spec.factory(rule.approximator.options).declared_blocks()
            terms = None if declared is None or declared.terms is None else (declared.terms[1] or declared.terms[0])
            bound = terms is not None and declared.terms[0] != terms
            inverse_factored = declared is not None and InverseFactored in declared.capabilities
        if inverse_factored:  # K, C and their momenta; applied as P_G X P_A
            entries, flops = 2 * (d_a * d_a + d_g * d_g), 2 * d_a * d_g * (d_a + d_g)
        elif terms is None:
            entries, flops = p * p, 2 * p * p
        else:
            entries, flops = terms * (d_a * d_a + d_g * d_g), terms * 2 * d_a * d_g * (d_a + d_g)
        damping = pre._dampings[index]
        rows.append(LayerPlan(c.name, type(ad.module).__name__, rule.label, _kind(rule.approximator),
                              f"{damping.kind}(λ={damping.value:g})", rule.update_every, rule.invert_every,
                              d_a, d_g, p, terms, entries, flops, bound))
    return rows


def _size(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def format_plan(rows: Sequence[LayerPlan], element_size: int) -> str:
    """The rows as a text table, with totals (memory in bytes of ``element_size`` per entry)."""
    head = ("layer", "module", "rule", "approximator", "damping", "T1/T2", "d_a×d_g", "params", "terms", "memory",
            "FLOPs/apply")
    table = [head]
    for r in rows:
        sched = "—" if r.update_every is None else f"{r.update_every}/{r.invert_every}"
        terms = "—" if r.terms is None else f"≤{r.terms}" if r.bound else str(r.terms)
        table.append((r.name, r.module, r.rule, r.approximator, r.damping, sched, f"{r.a_dim}×{r.g_dim}",
                      _size(r.p_i), terms, ("≤" if r.bound else "") + _size(r.entries * element_size) + "B"
                      if r.entries else "—", ("≤" if r.bound else "") + _size(r.flops) if r.flops else "—"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total_mem = sum(r.entries for r in rows) * element_size
    total_flops = sum(r.flops for r in rows)
    fallback = sum(r.p_i for r in rows if r.approximator == "fallback")
    lines.append(f"total: {len(rows)} layer blocks, {_size(total_mem)}B of fitted factors, {_size(total_flops)} FLOPs per "
                 f"application" + (f", {_size(fallback)} parameters left to the fallback optimizer" if fallback else ""))
    return "\n".join(lines)
