"""Discovery of a model's layer blocks and the flat curvlib vector over them.

:func:`find_layers` walks ``model.named_modules()`` and creates the registered adapters of
every module (:mod:`curvlib.capture.adapters`); it then groups adapters whose parameters
overlap — **tied weights**, e.g. an embedding and an output layer sharing one matrix —
into one layer block:

* the block's matrix W̄ is that of its *primary* adapter, the one whose parameters contain
  every other adapter's (an output layer with its bias contains a tied embedding's weight);
* every other adapter is placed inside it: its own matrix is a sub-block of W̄, or the
  transpose of one (an embedding's W̄ is weightᵀ, an output layer's [weight, bias]) —
  found by mapping unique parameter ids through both adapters (no assumption on layouts);
  its uses are padded with zeros to W̄'s sides and marked transposed when they enter W̄
  transposed (:class:`~curvlib.curvatures.statistics.Use`).

A module called several times in one forward simply has several uses.  Disjoint slices of
one parameter (the groups of a grouped convolution) are separate blocks.  A parameter of
an adapted layer that is also registered by a module without an adapter would have an
incomplete curvature and raises :class:`UnsupportedLayerError`.

The flat curvlib vector is the concatenation over blocks of vec(W̄_i).  Lists of tensors
shaped like the model's parameters — ``F.params()``: the unique parameters of the blocks
in block order, each once (a tied weight once) — map to and from it through each block's
adapter (:func:`blocks_params_to_vector`, :func:`blocks_vector_to_params`).

Excluded parameters (no adapter, an unsupported configuration, never called, …) are
collected with their reasons and announced once by :func:`warn_excluded`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvlib.capture.adapters.base import BatchCouplingWarning, ExcludedParametersWarning, LayerAdapter
from curvlib.errors import ConfigError, ShapeError, UnsupportedLayerError, warn
from curvlib.linalg.operator import VectorLayout
from curvlib.linalg.rows import Rows

__all__ = [
    "BlockCandidate",
    "BlocksLayout",
    "LayerBlock",
    "OnLayers",
    "Placement",
    "batch_coupled_modules",
    "blocks_params",
    "blocks_params_to_vector",
    "blocks_vector_to_params",
    "current_uncovered",
    "find_layers",
    "leave_out",
    "leaving_out",
    "uncovered_parameters",
    "unwrap_model",
    "warn_batch_coupling",
    "warn_excluded",
]

_SEQUENCE_CONTAINERS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


# --------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class Placement:
    """Where an adapter's own matrix M ``[g_s, a_s]`` sits in its block's W̄ ``[g_dim, a_dim]``.

    Attributes:
        transposed: W̄[row0 : row0 + a_s, col0 : col0 + g_s] = Mᵀ (else W̄[row0 : row0 + g_s,
            col0 : col0 + a_s] = M).
        row0, col0: the offsets in W̄.
    """

    transposed: bool = False
    row0: int = 0
    col0: int = 0

    def place(self, rows: Rows, g: torch.Tensor, g_dim: int, a_dim: int) -> tuple[Rows, torch.Tensor]:
        """A use's (rows ``[m, T, a_s]``, g ``[m, c, T, g_s]``) padded to the block's sides.

        Untransposed: rows to width a_dim, g to g_dim; transposed: the use's rows run along
        W̄'s rows (width g_dim) and its columns along W̄'s columns (width a_dim)."""
        width_rows, width_g = (g_dim, a_dim) if self.transposed else (a_dim, g_dim)
        off_rows, off_g = (self.row0, self.col0) if self.transposed else (self.col0, self.row0)
        rows = rows.pad(off_rows, width_rows - off_rows - rows.dim)
        if off_g or g.shape[-1] != width_g:
            g = torch.nn.functional.pad(g, (off_g, width_g - off_g - g.shape[-1]))
        return rows, g


@dataclass(frozen=True)
class BlockCandidate:
    """A layer block before capture: its name, layer kind, adapters (primary first) and their placements."""

    name: str
    kind: str
    adapters: tuple[LayerAdapter, ...]
    placements: tuple[Placement, ...]

    @property
    def adapter(self) -> LayerAdapter:
        return self.adapters[0]


@dataclass(frozen=True)
class LayerBlock:
    """One layer block of a curvature operator.

    Attributes:
        name: the block's name (the module's qualified name; ``"<module>:group<j>"`` for a
            group of a grouped convolution).
        module: the primary module.
        adapter: its :class:`LayerAdapter` (the parameters <-> vec(W̄) mapping).
        kind: the layer plugin kind (``"linear"``, ``"conv2d"``, ``"embedding"``, …).
        a_dim: columns of W̄ (d_in+1 with a bias).
        g_dim: rows of W̄ (d_out / c_out).
        p_i: number of parameters, a_dim·g_dim.
        slice: the block's rows in the flat curvlib vector ``[p]``.
        param_shapes: shapes of the block's pieces of its parameters (weight, and bias when present).
        adapters: every adapter of the block (tied weights), primary first.
        placements: where each adapter's matrix sits in W̄.
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
    adapters: tuple[LayerAdapter, ...] = ()
    placements: tuple[Placement, ...] = ()

    @property
    def has_bias(self) -> bool:
        return self.adapter.has_bias

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        return self.adapter.spatial_shape

    @property
    def kernel_size(self) -> tuple[int, ...] | None:
        return self.adapter.kernel_size

    @classmethod
    def build(cls, candidates: Iterable[BlockCandidate]) -> list[LayerBlock]:
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
                    param_shapes=tuple(ad.piece_shapes()),
                    adapters=c.adapters,
                    placements=c.placements,
                )
            )
            start += p
        return blocks


# --------------------------------------------------------------------------- flat vector <-> parameters


def blocks_params(layers: Sequence[LayerBlock]) -> list[torch.Tensor]:
    """The unique parameters of ``layers`` in block order (a tied or sliced parameter once):
    the order of list-shaped vectors in the flat curvlib layout."""
    out, seen = [], set()
    for L in layers:
        for p in L.adapter.params():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def blocks_params_to_vector(layers: Sequence[LayerBlock], tensors: Sequence[torch.Tensor], who: str) -> torch.Tensor:
    """Tensors shaped like :func:`blocks_params` -> the flat curvlib vector ``[p]``
    (vec of each block's W̄, columns stacked, block after block).

    Raises:
        ShapeError: ``tensors`` are not shaped like the parameters (``who`` names the caller).
    """
    params = blocks_params(layers)
    shapes = [p.shape for p in params]
    if len(tensors) != len(shapes) or any(tuple(getattr(t, "shape", ())) != tuple(s) for t, s in zip(tensors, shapes)):
        raise ShapeError(
            f"{who}: expected tensors shaped like the parameters {[list(s) for s in shapes]}, "
            f"got {[list(getattr(t, 'shape', ())) for t in tensors]}"
        )
    index = {id(p): k for k, p in enumerate(params)}
    parts = []
    for L in layers:
        full = [tensors[index[id(p)]] for p in L.adapter.params()]
        parts.append(L.adapter.params_to_vector(L.adapter.pieces(full)))
    return torch.cat(parts)


def blocks_vector_to_params(layers: Sequence[LayerBlock], v: torch.Tensor, p: int, who: str) -> list[torch.Tensor]:
    """The flat curvlib vector ``[p]`` -> tensors shaped like :func:`blocks_params`.

    Raises:
        ShapeError: ``v`` is not ``[p]`` (``who`` names the caller).
    """
    if v.shape != (p,):
        raise ShapeError(f"{who}: expected a vector [{p}], got {list(v.shape)}")
    params = blocks_params(layers)
    index = {id(q): k for k, q in enumerate(params)}
    out: list[torch.Tensor | None] = [None] * len(params)
    for L in layers:
        pieces = L.adapter.vector_to_params(v[L.slice])
        for q, sl, piece in zip(L.adapter.params(), L.adapter.param_slices(), pieces):
            k = index[id(q)]
            if sl is None:
                out[k] = piece
                continue
            if out[k] is None:
                out[k] = torch.zeros(q.shape, dtype=v.dtype, device=v.device)
            out[k][sl] = piece
    return out  # type: ignore[return-value]


class BlocksLayout(VectorLayout):
    """The list form of the flat curvlib vector of ``layers``: one tensor per unique adapted
    parameter (:func:`blocks_params`), the layout every operator over a model carries."""

    def __init__(self, layers: Sequence[LayerBlock]) -> None:
        self.layers = list(layers)
        self.p = self.layers[-1].slice.stop if self.layers else 0

    def params(self) -> list[torch.Tensor]:
        """The parameters of the list form, each once (:func:`blocks_params`)."""
        return blocks_params(self.layers)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(q.shape) for q in self.params()]

    def to_vector(self, tensors: Sequence[torch.Tensor], caller: str) -> torch.Tensor:
        return blocks_params_to_vector(self.layers, tensors, caller)

    def to_tensors(self, v: torch.Tensor, caller: str) -> list[torch.Tensor]:
        return blocks_vector_to_params(self.layers, v, self.p, caller)


class OnLayers:
    """Mixin of the operators over the flat curvlib vector of ``self.layers`` (a curvature
    operator, one over a data set, the preconditioner): ``p``, ``shape``, ``dtype``/``device``
    (``self._dtype``/``self._device``, set by the subclass), the parameters and the list form.
    Placed before :class:`~curvlib.linalg.LinearOperator` among the bases."""

    layers: list[LayerBlock]
    _dtype: torch.dtype
    _device: torch.device

    @property
    def p(self) -> int:
        """Length of the flat curvlib vector."""
        return self.layers[-1].slice.stop

    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    @property
    def layout(self) -> BlocksLayout:
        """The list form of vectors: tensors shaped like :meth:`params`."""
        return BlocksLayout(self.layers)

    def params(self) -> list[torch.Tensor]:
        """The adapted parameters, each once (weight, then bias, layer by layer): the order of
        list-shaped vectors accepted and returned by the products."""
        return blocks_params(self.layers)

    def params_to_vector(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like :meth:`params` -> the flat curvlib vector ``[p]`` (vec of W̄ = [W, b],
        columns stacked, layer after layer)."""
        return blocks_params_to_vector(self.layers, tensors, type(self).__name__)

    def vector_to_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        """The flat curvlib vector ``[p]`` -> tensors shaped like :meth:`params`."""
        return blocks_vector_to_params(self.layers, v, self.p, type(self).__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose layers curvlib captures, under torch's wrappers.

    ``torch.compile`` returns an ``OptimizedModule`` around ``_orig_mod`` (compiled graphs do
    not run the capture hooks), ``DistributedDataParallel`` / ``DataParallel`` hold the model
    as ``module`` (their forward would synchronise replicas on capture passes); curvlib runs
    its own forward and backward passes on the wrapped module, which shares the parameters.
    Wrappers may be nested.
    """
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------- discovery


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


def batch_dims(model: nn.Module) -> dict[str, int]:
    """The batch axis of each module's input where it is not 0: every module inside a torch
    transformer container built with ``batch_first=False`` sees ``[T, m, …]`` (axis 1),
    except ``nn.MultiheadAttention`` and its ``out_proj``, whose adapter works batch-first."""
    dims: dict[str, int] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, _SEQUENCE_CONTAINERS):
            continue
        batch_first = getattr(mod, "batch_first", None)
        if batch_first is None:
            attn = next((m for m in mod.modules() if isinstance(m, nn.MultiheadAttention)), None)
            batch_first = True if attn is None else bool(attn.batch_first)
        if not batch_first:
            for sub, _ in mod.named_modules(prefix=name):
                dims[sub] = 1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for sub, _ in mod.named_modules(prefix=name):
                dims.pop(sub, None)
    return dims


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _ranges(ad: LayerAdapter) -> list[tuple[int, int, int]]:
    """(parameter id, first row, end row) of each parameter piece of an adapter."""
    out = []
    for p, sl in zip(ad.params(), ad.param_slices()):
        n = p.shape[0] if p.ndim else 1
        lo, hi, _ = (0, n, 1) if sl is None else sl.indices(n)
        out.append((id(p), lo, hi))
    return out


def _covers(primary: LayerAdapter, other: LayerAdapter) -> bool:
    mine = _ranges(primary)
    return all(any(pid == q and lo >= a and hi <= b for q, a, b in mine) for pid, lo, hi in _ranges(other))


def _placement(primary: LayerAdapter, other: LayerAdapter) -> Placement:
    """Where ``other``'s matrix sits in ``primary``'s, from unique parameter ids."""
    ids: dict[int, torch.Tensor] = {}
    offset = 0
    for p in [*primary.params(), *other.params()]:
        if id(p) not in ids:
            ids[id(p)] = torch.arange(offset, offset + p.numel(), dtype=torch.float64).reshape(p.shape)
            offset += p.numel()
    I_p = primary.params_to_matrix(primary.pieces([ids[id(p)] for p in primary.params()]))
    I_s = other.params_to_matrix(other.pieces([ids[id(p)] for p in other.params()]))
    hits = (I_p == I_s[0, 0]).nonzero()
    if hits.shape[0] == 1:
        r0, c0 = (int(v) for v in hits[0])
        g_s, a_s = I_s.shape
        if torch.equal(I_p[r0 : r0 + g_s, c0 : c0 + a_s], I_s):
            return Placement(False, r0, c0)
        if torch.equal(I_p[r0 : r0 + a_s, c0 : c0 + g_s], I_s.T):
            return Placement(True, r0, c0)
    raise UnsupportedLayerError(
        f"{other._label()} shares parameters with {primary._label()}, but its layer matrix is neither a sub-block of "
        "the other's nor the transpose of one; curvlib cannot relate their curvature"
    )


def find_layers(model: nn.Module, registry: Any) -> tuple[list[BlockCandidate], dict[str, str]]:
    """Walk ``model.named_modules()``, create the adapters of every module a layer plugin
    handles and group tied ones into blocks (module docstring).

    Args:
        model: any ``nn.Module``.
        registry: a :class:`curvlib.plugins.Registry`; its ``layers`` family supplies the
            adapters (each spec's ``metadata["module_types"]``, factories with ``create``).

    Returns:
        ``(candidates, excluded)``: the blocks in the order of their primary module, and
        ``{qualified parameter name: reason}`` for trainable parameters left out.  No
        warning is emitted here (the caller warns once, after capture, see :func:`warn_excluded`).

    Raises:
        UnsupportedLayerError: no module of the model has an adapter; or parameters are
            shared in a way curvlib cannot relate (see the module docstring).
    """
    specs = list(registry.layers)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, mod))
    dims = batch_dims(model)

    made: list[tuple[LayerAdapter, str]] = []
    excluded: dict[str, str] = {}
    claimed: set[int] = set()
    found_any = False
    for mod_name, mod in model.named_modules():
        spec = _adapter_spec_for(mod, specs)
        if spec is None:
            continue
        found_any = True
        own = dict(mod.named_parameters(recurse=False))
        try:
            adapters = spec.factory.create(mod, name=mod_name, batch_dim=dims.get(mod_name, 0))
            left_out = spec.factory.excluded_parameters(mod, name=mod_name)
        except UnsupportedLayerError as exc:
            for pname, p in own.items():
                if p.requires_grad:
                    excluded[_qual(mod_name, pname)] = str(exc)
                    claimed.add(id(p))
            continue
        for pname, why in left_out.items():
            excluded[_qual(mod_name, pname)] = why
            claimed.add(id(own[pname]))
        made += [(ad, spec.kind) for ad in adapters]

    # tied parameters: union the adapters whose parameter pieces overlap
    parent = list(range(len(made)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for i, (ad, _) in enumerate(made):
        for pid, lo, hi in _ranges(ad):
            for j, a, b in pieces.get(pid, []):
                if lo < b and a < hi:
                    parent[root(i)] = root(j)
            pieces.setdefault(pid, []).append((i, lo, hi))
    groups: dict[int, list[int]] = {}
    for i in range(len(made)):
        groups.setdefault(root(i), []).append(i)

    candidates = []
    users: dict[int, set[int]] = {}
    for ad, _ in made:
        for p in ad.params():
            users.setdefault(id(p), set()).add(id(ad.module))
    for members in sorted(groups.values(), key=min):
        ads = [made[i][0] for i in members]
        primary = next((a for a in ads if all(_covers(a, b) for b in ads)), None)
        if primary is None:
            raise UnsupportedLayerError(
                f"layers {[a.block_name for a in ads]} share parameters but none of them uses all of the shared "
                "parameters; curvlib needs one layer whose matrix contains the others'"
            )
        others = [a for a in ads if a is not primary]
        kind = made[members[ads.index(primary)]][1]
        candidates.append(
            BlockCandidate(primary.block_name, kind, (primary, *others), (Placement(), *[_placement(primary, o) for o in others]))
        )
        for a in ads:
            for p in a.params():
                claimed.add(id(p))
                strangers = sorted({n for n, o in owners.get(id(p), []) if id(o) not in users[id(p)]})
                if strangers:
                    raise UnsupportedLayerError(
                        f"a parameter of {a._label()} is also registered by module(s) {strangers}, which have no "
                        "(supported) layer adapter; their use of it would be missing from the curvature"
                    )

    unclaimed = {pname: p for pname, p in model.named_parameters() if p.requires_grad and id(p) not in claimed}
    for pname, p in unclaimed.items():
        owner = owners.get(id(p), [("", None)])[0][1]
        excluded[pname] = f"no layer adapter for {type(owner).__name__}" if owner is not None else "no layer adapter"
    if _UNCOVERED.get() == "per_sample":
        made_more = _per_sample_adapters(unclaimed, registry, owners, excluded, dims)
        found_any = found_any or bool(made_more)
        candidates += [BlockCandidate(ad.block_name, "parameter", (ad,), (Placement(),)) for ad in made_more]

    if not found_any:
        known = sorted({t.__name__ for s in specs for t in s.metadata.get("module_types", ())})
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no trainable module with a layer adapter; supported module types: {known}"
        )
    return candidates, excluded


#: What :func:`uncovered_parameters` set: ``"fallback"`` or ``"per_sample"``.
_UNCOVERED: contextvars.ContextVar[str] = contextvars.ContextVar("curvlib_uncovered", default="fallback")

UNCOVERED_MODES = ("fallback", "per_sample")


@contextlib.contextmanager
def uncovered_parameters(mode: str) -> Iterator[None]:
    """Within the block, what discovery (:func:`find_layers`) does with a trainable parameter
    that no layer adapter covers: ``"fallback"`` (the default) excludes it — the optimizer
    updates it with its first-order fallback; ``"per_sample"`` gives it a block of the
    ``parameter`` layer kind (:mod:`curvlib.capture.adapters.parameter`: per-sample gradients
    by recomputing its module one sample at a time), so every trainable parameter is covered.

    Example::

        with uncovered_parameters("per_sample"):
            F = curvlib.curvature("ggn", model, loss_fn, batch=(X, y))

    A data-set operator keeps the mode it was built under.  The preconditioner's
    ``uncovered`` config field sets it for its own captures.

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in UNCOVERED_MODES:
        raise ConfigError(f"uncovered_parameters: expected one of {list(UNCOVERED_MODES)}, got {mode!r}")
    token = _UNCOVERED.set(mode)
    try:
        yield
    finally:
        _UNCOVERED.reset(token)


def current_uncovered() -> str:
    """The mode :func:`uncovered_parameters` set (``"fallback"`` outside any block)."""
    return _UNCOVERED.get()


def _per_sample_adapters(unclaimed: dict[str, torch.Tensor], registry: Any, owners: dict[int, list[tuple[str, nn.Module]]],
                         excluded: dict[str, str], dims: dict[str, int]) -> list[LayerAdapter]:
    """The ``parameter`` adapters of the parameters no adapter claimed (``unclaimed``: qualified
    name -> parameter), each removed from ``excluded``; a parameter registered by several modules
    stays excluded with the reason."""
    factory = registry.layers.get("parameter").factory
    made = []
    for qual, p in unclaimed.items():
        regs = owners[id(p)]
        if len({id(mod) for _, mod in regs}) > 1:
            excluded[qual] = (f"registered by several modules {sorted({n for n, _ in regs})}; per-sample capture needs "
                              "the one module that uses it")
            continue
        mod_name, mod = regs[0]
        pname = next(n for n, q in mod.named_parameters(recurse=False) if q is p)
        made.append(factory.create_for(mod, pname, name=mod_name, batch_dim=dims.get(mod_name, 0)))
        del excluded[qual]
    return made


#: What :func:`leaving_out` set: ``candidate -> reason`` (``None``: the candidate is kept).
_LEAVE_OUT: contextvars.ContextVar[Callable[[BlockCandidate], str | None] | None] = contextvars.ContextVar(
    "curvlib_leave_out", default=None)


@contextlib.contextmanager
def leaving_out(reason: Callable[[BlockCandidate], str | None] | None) -> Iterator[None]:
    """Within the block, curvlib's captures (:func:`~curvlib.curvatures.kinds.hooked_pass`)
    leave out the layer blocks for which ``reason(candidate)`` is a string: they are not
    hooked, and their parameters are listed as excluded with that reason (a preconditioner's
    ``fallback`` rules, :class:`~curvlib.precond.config.LayerRule`)."""
    token = _LEAVE_OUT.set(reason)
    try:
        yield
    finally:
        _LEAVE_OUT.reset(token)


def leave_out(model: nn.Module, candidates: list[BlockCandidate],
              excluded: dict[str, str]) -> list[BlockCandidate]:
    """The candidates :func:`leaving_out` keeps; the others' trainable parameters are added to
    ``excluded`` with the reason."""
    reason = _LEAVE_OUT.get()
    if reason is None:
        return candidates
    names = {id(q): n for n, q in model.named_parameters()}
    kept = []
    for c in candidates:
        why = reason(c)
        if why is None:
            kept.append(c)
            continue
        for ad in c.adapters:
            for q in ad.params():
                if q.requires_grad and id(q) in names:
                    excluded[names[id(q)]] = why
    return kept


def warn_excluded(excluded: dict[str, str]) -> None:
    """Emit one :class:`ExcludedParametersWarning` listing every excluded parameter and why."""
    if not excluded:
        return
    lines = "\n".join(f"  {name}: {why}" for name, why in excluded.items())
    warn(
        f"{len(excluded)} trainable parameter(s) are left out of the curvature (no curvature block; "
        f"curvlib.optim.NaturalGradient updates them with its first-order fallback):\n{lines}",
        ExcludedParametersWarning,
    )


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Names of the modules that couple the samples of a batch: BatchNorm in training mode."""
    return [n for n, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training]


def warn_batch_coupling(model: nn.Module) -> None:
    """Warn (:class:`BatchCouplingWarning`) if a BatchNorm module of ``model`` is in training mode."""
    coupled = batch_coupled_modules(model)
    if coupled:
        warn(
            f"BatchNorm module(s) {coupled} are in training mode: batch statistics couple the samples, so the "
            "captured per-sample gradients are not those of independent samples (and the forward updates their "
            "running statistics); call model.eval() for exact per-sample curvature",
            BatchCouplingWarning,
        )
