"""The coarse basis R₀ᵀ = diag(V_1 … V_S) of (4.23) and the partition of the parameter
vector it is block-diagonal over.

Notation (thesis §4.2): p parameters, a partition of ``range(p)`` into S groups (the
layers by default, (4.9)), N_g columns for group g and N = Σ_g N_g (4.24).  The coarse
basis is block-diagonal over the groups:

    R₀ᵀ = diag(V_1, …, V_S) ``[p, N]``,   V_g ``[p_g, N_g]``                      (4.23)

so R₀ᵀβ puts V_g β_g on the rows of group g and R₀x stacks V_gᵀ x[g].  Nothing here
forms R₀ᵀ except :meth:`CoarseBasis.dense` (tests, and the product-only curvature path
of :func:`curvlib.coarse.coarse_operator.exact_coarse_operator`).

The flat vector is curvlib's (DESIGN.md §1): the concatenation over layers of vec(W̄_i),
columns stacked, ``F.layers[i].slice`` giving layer i's rows.  Within a layer the weight
W occupies the first (a_dim − 1)·g_dim rows and the bias (when present) the last g_dim
rows, so one group per parameter tensor (seed 004's "canonical partition") is two
contiguous slices per layer (:meth:`Partition.parameter_tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from curvlib.errors import DTypeDeviceError, ShapeError

__all__ = [
    "CoarseBasis",
    "Partition",
]

#: One group of rows: a ``slice`` (contiguous rows) or a 1-D integer index tensor.
Group = slice | torch.Tensor


# --------------------------------------------------------------------------- partition
class Partition:
    """Disjoint groups of rows of the flat parameter vector ``[p]``.

    Each group is a ``slice`` (contiguous rows, the fast path) or a 1-D integer tensor of
    row indices (any grouping; the order of the indices is the row order of V_g).

    Args:
        groups: the groups, in the order of the coarse basis blocks.
        p: the length of the flat vector.
        names: optional labels (e.g. layer names), one per group.
        cover: require the groups to cover every row (a partition, the default); with
            ``False`` rows outside every group are allowed (R₀ᵀ is zero there).

    Raises:
        ShapeError: a group is empty, out of range, overlaps another, or (with
            ``cover``) some row is in no group.
    """

    def __init__(self, groups: Sequence[Group | Sequence[int]], p: int, *, names: Sequence[str] | None = None,
                 cover: bool = True) -> None:
        self.p = int(p)
        norm: list[Group] = []
        for k, g in enumerate(groups):
            if isinstance(g, slice):
                start, stop, step = g.indices(self.p)
                if step != 1:
                    norm.append(torch.arange(start, stop, step, dtype=torch.long))
                else:
                    if (g.stop is not None and g.stop > self.p) or (g.start is not None and g.start < 0):
                        raise ShapeError(f"Partition: group {k} = {g} is outside the vector [0, {self.p})")
                    norm.append(slice(start, stop))
            else:
                idx = torch.as_tensor(g).detach().to("cpu")
                if idx.ndim != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point():
                    raise ShapeError(f"Partition: group {k} must be a slice or a 1-D integer index tensor, "
                                     f"got {idx.dtype} {list(idx.shape)}")
                norm.append(idx.to(torch.long))
        self.groups: list[Group] = norm
        self.sizes: list[int] = [(g.stop - g.start) if isinstance(g, slice) else int(g.numel()) for g in norm]
        if names is not None and len(names) != len(norm):
            raise ShapeError(f"Partition: {len(names)} names for {len(norm)} groups")
        self.names: list[str] = list(names) if names is not None else [f"group{k}" for k in range(len(norm))]
        self._check(cover)
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _check(self, cover: bool) -> None:
        if not self.groups:
            raise ShapeError("Partition: expected at least one group, got none")
        count = torch.zeros(self.p, dtype=torch.int32)
        for k, (g, n) in enumerate(zip(self.groups, self.sizes)):
            if n == 0:
                raise ShapeError(f"Partition: group {k} ({self.names[k]}) is empty")
            if isinstance(g, slice):
                count[g] += 1
            else:
                if int(g.min()) < 0 or int(g.max()) >= self.p:
                    raise ShapeError(f"Partition: group {k} ({self.names[k]}) has indices outside [0, {self.p})")
                count.index_add_(0, g, torch.ones_like(g, dtype=torch.int32))
        if bool((count > 1).any()):
            row = int((count > 1).nonzero()[0])
            raise ShapeError(f"Partition: groups overlap (row {row} belongs to {int(count[row])} groups)")
        if cover and bool((count == 0).any()):
            missing = int((count == 0).sum())
            raise ShapeError(f"Partition: {missing} of {self.p} rows are in no group (pass cover=False to allow it)")

    # -- builders ----------------------------------------------------------------------
    @classmethod
    def layers(cls, curvature: Any) -> Partition:
        """One group per layer block, ``F.layers[i].slice`` (4.9): the default."""
        return cls([L.slice for L in curvature.layers], curvature.shape[0], names=[L.name for L in curvature.layers])

    @classmethod
    def parameter_tensors(cls, curvature: Any) -> Partition:
        """One group per parameter tensor of each layer block (weight, bias; γ, β; a group's
        rows of a sliced weight), seed 004's canonical partition.

        Which rows of a block's vec(W̄) hold which parameter is read from the block's
        adapter (each piece mapped through ``params_to_vector``); in vec([W, b]) the weight
        is the first (a_dim − 1)·g_dim rows and the bias the last g_dim.
        """
        groups: list[Group] = []
        names = []
        for L in curvature.layers:
            ad = L.adapter
            own = {id(q): n for n, q in ad.module.named_parameters(recurse=False)}
            pieces = ad.pieces(ad.params())
            marks = ad.params_to_vector([torch.full(q.shape, float(k), dtype=torch.float64) for k, q in enumerate(pieces)])
            for k, p in enumerate(ad.params()):
                rows = (marks == k).nonzero().squeeze(1) + L.slice.start
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                groups.append(slice(lo, hi) if hi - lo == rows.numel() else rows)
                names.append(f"{L.name}.{own.get(id(p), 'param')}")
        return cls(groups, curvature.shape[0], names=names)

    @classmethod
    def singletons(cls, p: int) -> Partition:
        """Every row its own group (with identity columns the coarse space is all of R^p)."""
        return cls([slice(k, k + 1) for k in range(p)], p)

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"Partition(groups={len(self.groups)}, p={self.p}, sizes={self.sizes[:8]}{'…' if len(self) > 8 else ''})"

    def index(self, g: int, device: torch.device) -> torch.Tensor:
        """Group g's rows as an index tensor ``[p_g]`` on ``device``."""
        key = (g, torch.device(device))
        if key not in self._index_cache:
            grp = self.groups[g]
            idx = torch.arange(grp.start, grp.stop) if isinstance(grp, slice) else grp
            self._index_cache[key] = idx.to(device)
        return self._index_cache[key]

    def take(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """x[group g]: ``[p]`` -> ``[p_g]``, ``[p, k]`` -> ``[p_g, k]``."""
        grp = self.groups[g]
        if isinstance(grp, slice):
            return x[grp]
        return x.index_select(0, self.index(g, x.device))

    def put(self, out: torch.Tensor, g: int, values: torch.Tensor) -> None:
        """out[group g] = values (in place); ``out [p, ...]``, ``values [p_g, ...]``."""
        grp = self.groups[g]
        if isinstance(grp, slice):
            out[grp] = values
        else:
            out.index_copy_(0, self.index(g, out.device), values)

    def is_layer_partition(self, layer_slices: Sequence[slice]) -> list[int] | None:
        """If every group is exactly one layer slice, the layer index of each group; else None."""
        lookup = {(s.start, s.stop): i for i, s in enumerate(layer_slices)}
        out = []
        for g in self.groups:
            if not isinstance(g, slice) or (g.start, g.stop) not in lookup:
                return None
            out.append(lookup[(g.start, g.stop)])
        return out

    def nests(self, blocks: Sequence[slice]) -> bool:
        """True when each of ``blocks`` (contiguous row ranges) lies inside one group,
        i.e. a block-diagonal operator with these blocks never couples two groups."""
        owner = torch.full((self.p,), -1, dtype=torch.long)
        for k, g in enumerate(self.groups):
            owner[g] = k
        for b in blocks:
            o = owner[b]
            if o.numel() and (bool((o != o[0]).any()) or int(o[0]) < 0):
                return False
        return True

    def layer_pieces(self, g: int, layer_slices: Sequence[slice]) -> list[tuple[int, Group, Group]]:
        """Where group g meets each layer: ``(layer i, rows of V_g, rows of layer i)``."""
        grp = self.groups[g]
        out: list[tuple[int, Group, Group]] = []
        for i, s in enumerate(layer_slices):
            if isinstance(grp, slice):
                lo, hi = max(grp.start, s.start), min(grp.stop, s.stop)
                if lo < hi:
                    out.append((i, slice(lo - grp.start, hi - grp.start), slice(lo - s.start, hi - s.start)))
            else:
                mask = (grp >= s.start) & (grp < s.stop)
                if bool(mask.any()):
                    pos = mask.nonzero().squeeze(1)
                    out.append((i, pos, grp[mask] - s.start))
        return out


# --------------------------------------------------------------------------- basis
class CoarseBasis:
    """A block-diagonal coarse basis R₀ᵀ = diag(V_1, …, V_S) ``[p, N]`` (4.23).

    Args:
        groups: a :class:`Partition`, or a list of groups (slices / index tensors) with ``p``.
        columns: V_g ``[p_g, N_g]`` for each group (``[p_g]`` means one column); N_g = 0
            is allowed (a group that contributes nothing).
        p: the length of the flat vector when ``groups`` is a list.
        meta: free-form notes from the coarse space (e.g. where eigenvectors came from).

    Attributes:
        partition, columns, sizes (N_g), offsets (first column of each group in β), N, meta.
    """

    def __init__(self, groups: Partition | Sequence[Group], columns: Sequence[torch.Tensor], *, p: int | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        if isinstance(groups, Partition):
            part = groups
        else:
            if p is None:
                raise ShapeError("CoarseBasis: pass p (the length of the flat vector) with a list of groups")
            part = Partition(groups, p, cover=False)
        if len(columns) != len(part):
            raise ShapeError(f"CoarseBasis: {len(columns)} column blocks for {len(part)} groups")
        cols = []
        ref = columns[0]
        for k, V in enumerate(columns):
            if V.ndim == 1:
                V = V.unsqueeze(1)
            if V.ndim != 2 or V.shape[0] != part.sizes[k]:
                raise ShapeError(f"CoarseBasis: V_{k} must be [p_g, N_g] = [{part.sizes[k]}, N_g], got {list(V.shape)}")
            if V.dtype != ref.dtype or V.device != ref.device:
                raise DTypeDeviceError(f"CoarseBasis: V_{k} is {V.dtype} on {V.device}, V_0 is {ref.dtype} on {ref.device}")
            cols.append(V)
        self.partition = part
        self.columns: tuple[torch.Tensor, ...] = tuple(cols)
        self.sizes: list[int] = [V.shape[1] for V in cols]
        self.offsets: list[int] = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.N: int = self.offsets[-1]
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def p(self) -> int:
        return self.partition.p

    @property
    def dtype(self) -> torch.dtype:
        return self.columns[0].dtype

    @property
    def device(self) -> torch.device:
        return self.columns[0].device

    def __repr__(self) -> str:
        return f"CoarseBasis(N={self.N}, groups={len(self.columns)}, p={self.p}, dtype={self.dtype})"

    def _columns_of(self, x: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, bool]:
        if x.dtype != self.dtype or x.device != self.device:
            raise DTypeDeviceError(f"CoarseBasis.{what}: basis is {self.dtype} on {self.device}, got {x.dtype} on {x.device}")
        if x.ndim == 1 and x.shape[0] == n:
            return x.unsqueeze(1), True
        if x.ndim == 2 and x.shape[0] == n:
            return x, False
        raise ShapeError(f"CoarseBasis.{what}: expected [{n}] or [{n}, k], got {list(x.shape)}")

    def prolong(self, beta: torch.Tensor) -> torch.Tensor:
        """R₀ᵀβ: ``[N]`` -> ``[p]`` or ``[N, k]`` -> ``[p, k]`` (V_g β_g on group g's rows)."""
        B, squeeze = self._columns_of(beta, self.N, "prolong")
        out = B.new_zeros(self.p, B.shape[1])
        for g, V in enumerate(self.columns):
            if V.shape[1]:
                self.partition.put(out, g, V @ B[self.offsets[g] : self.offsets[g + 1]])
        return out.squeeze(1) if squeeze else out

    def restrict(self, x: torch.Tensor) -> torch.Tensor:
        """R₀x: ``[p]`` -> ``[N]`` or ``[p, k]`` -> ``[N, k]`` (V_gᵀ x[g] stacked)."""
        X, squeeze = self._columns_of(x, self.p, "restrict")
        parts = [V.T @ self.partition.take(X, g) for g, V in enumerate(self.columns)]
        out = torch.cat(parts, 0) if parts else X.new_zeros(0, X.shape[1])
        return out.squeeze(1) if squeeze else out

    def dense(self) -> torch.Tensor:
        """R₀ᵀ as a dense ``[p, N]`` matrix."""
        return self.prolong(torch.eye(self.N, dtype=self.dtype, device=self.device))

    def gram(self) -> torch.Tensor:
        """R₀R₀ᵀ ``[N, N]``: block-diagonal, blocks V_gᵀV_g (the groups are disjoint)."""
        out = torch.zeros(self.N, self.N, dtype=self.dtype, device=self.device)
        for g, V in enumerate(self.columns):
            o0, o1 = self.offsets[g], self.offsets[g + 1]
            out[o0:o1, o0:o1] = V.T @ V
        return out

    def column_norms(self) -> torch.Tensor:
        """‖column‖₂ of every column of R₀ᵀ, ``[N]``."""
        parts = [torch.linalg.vector_norm(V, dim=0) for V in self.columns]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    def select(self, keep: torch.Tensor) -> CoarseBasis:
        """The basis made of the columns where ``keep [N]`` (bool) is true."""
        keep = keep.to(device=self.device, dtype=torch.bool)
        cols = [V[:, keep[self.offsets[g] : self.offsets[g + 1]]] for g, V in enumerate(self.columns)]
        return CoarseBasis(self.partition, cols, meta=self.meta)

    def layer_block(self, layer_slice: slice, layer_slices: Sequence[slice]) -> tuple[torch.Tensor, torch.Tensor]:
        """R₀ᵀ restricted to one layer's rows, keeping only the columns that touch it.

        Returns:
            ``(B [p_i, n_i], cols [n_i])``: the rows of layer ``layer_slice`` of the columns
            ``cols`` of R₀ᵀ (every other column is zero on that layer).
        """
        i = list(layer_slices).index(layer_slice)
        p_i = layer_slice.stop - layer_slice.start
        blocks, cols = [], []
        for g, V in enumerate(self.columns):
            if not V.shape[1]:
                continue
            for li, pos, rows in self.partition.layer_pieces(g, layer_slices):
                if li != i:
                    continue
                B = V.new_zeros(p_i, V.shape[1])
                if isinstance(rows, slice):
                    B[rows] = V[pos]
                else:
                    B.index_copy_(0, rows.to(V.device), V.index_select(0, torch.as_tensor(pos, device=V.device)))
                blocks.append(B)
                cols.append(torch.arange(self.offsets[g], self.offsets[g + 1]))
        if not blocks:
            return torch.zeros(p_i, 0, dtype=self.dtype, device=self.device), torch.zeros(0, dtype=torch.long)
        # several groups may share a layer (a finer partition): their columns sit side by side
        return torch.cat(blocks, 1), torch.cat(cols)
