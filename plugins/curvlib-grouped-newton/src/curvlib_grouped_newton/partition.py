"""The partition of the parameters into S groups (seed 004 §4.1), over curvlib's flat vector.

A group is a set of rows of the flat curvlib vector ``[p]`` (layers concatenated, each
vec(W̄_i) column-major; see :mod:`curvlib.curvatures.operator`), so any grouping fits
in a :class:`curvlib.coarse.Partition`.  The ways to ask for one (:func:`resolve_partition`):

============================  ==========================================================
``groups=``                   groups
============================  ==========================================================
``None`` / ``"tensors"``      one per parameter tensor (weight, bias): seed 004's canonical
                              partition, :meth:`Partition.parameter_tensors`
``"layers"``                  one per layer ([W, b] together), :meth:`Partition.layers`
``"trivial"``                 one group: Cauchy's steepest descent (appendix C)
``"singletons"``              every scalar its own group: Newton's method (appendix C)
list of lists of tensors      user groups: each inner list names parameter tensors (e.g.
                              all weights of a chunk of layers, appendix G); every adapted
                              parameter must be in exactly one group
a :class:`Partition`          used as is (its ``p`` must match)
a callable                    ``groups(curvature) -> Partition``
============================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from curvlib.coarse import Partition
from curvlib.errors import ConfigError, ShapeError

__all__ = ["GroupsSpec", "NAMED_PARTITIONS", "resolve_partition", "tensor_rows"]

GroupsSpec = Union[None, str, Partition, Sequence[Sequence[torch.Tensor]], Callable[[Any], Partition]]

#: The partitions that have a name.
NAMED_PARTITIONS: tuple[str, ...] = ("tensors", "layers", "trivial", "singletons")


def tensor_rows(curvature: Any) -> list[tuple[torch.Tensor, slice, str]]:
    """``(parameter, its rows of the flat vector, its name)`` for every adapted parameter,
    in the order of ``curvature.params()``."""
    part = Partition.parameter_tensors(curvature)
    params = curvature.params()
    if len(params) != len(part):  # both walk the layers, weight then bias
        raise ShapeError(f"grouped Newton: {len(params)} adapted parameters but {len(part)} parameter-tensor groups")
    out = []
    for p, rows, name in zip(params, part.groups, part.names):
        if not isinstance(rows, slice) or rows.stop - rows.start != p.numel():
            raise ShapeError(f"grouped Newton: parameter {name} has {p.numel()} entries, its rows are {rows}")
        out.append((p, rows, name))
    return out


def _user_groups(groups: Sequence[Sequence[torch.Tensor]], curvature: Any) -> Partition:
    rows = tensor_rows(curvature)
    where = {id(p): (r, name) for p, r, name in rows}
    seen: dict[int, int] = {}
    out, names = [], []
    for k, group in enumerate(groups):
        if isinstance(group, torch.Tensor):
            raise ConfigError(f"groups[{k}]: expected a list of parameter tensors, got a single tensor "
                              "(wrap it: [[tensor], ...])")
        members = list(group)
        if not members:
            raise ConfigError(f"groups[{k}] is empty")
        idx, labels = [], []
        for t in members:
            if id(t) not in where:
                raise ConfigError(
                    f"groups[{k}]: a tensor of shape {list(getattr(t, 'shape', []))} is not an adapted parameter of the "
                    f"model (adapted: {', '.join(n for _, _, n in rows)})"
                )
            if id(t) in seen:
                raise ConfigError(f"groups[{k}]: parameter {where[id(t)][1]} is already in groups[{seen[id(t)]}]")
            seen[id(t)] = k
            r, name = where[id(t)]
            idx.append(torch.arange(r.start, r.stop))
            labels.append(name)
        cat = torch.cat(idx)
        contiguous = bool((cat[1:] - cat[:-1] == 1).all()) if cat.numel() > 1 else True
        out.append(slice(int(cat[0]), int(cat[-1]) + 1) if contiguous else cat)
        names.append("+".join(labels))
    missing = [name for p, _, name in rows if id(p) not in seen]
    if missing:
        raise ConfigError(f"groups: every adapted parameter must be in one group; missing {', '.join(missing)}")
    return Partition(out, curvature.p, names=names)


def resolve_partition(groups: GroupsSpec, curvature: Any) -> Partition:
    """The :class:`~curvlib.coarse.Partition` that ``groups`` asks for (module docstring).

    Args:
        groups: see the table of the module docstring.
        curvature: a curvlib curvature operator of the model (layers, ``p``, ``params()``).

    Raises:
        ConfigError: an unknown name, a parameter missing, repeated or foreign.
        ShapeError: a given partition of another length.
    """
    p = int(curvature.p)
    if groups is None or (isinstance(groups, str) and groups == "tensors"):
        return Partition.parameter_tensors(curvature)
    if isinstance(groups, str):
        if groups == "layers":
            return Partition.layers(curvature)
        if groups == "trivial":
            return Partition([slice(0, p)], p, names=["all"])
        if groups == "singletons":
            return Partition.singletons(p)
        raise ConfigError(f"groups: unknown partition {groups!r}; named partitions: {', '.join(NAMED_PARTITIONS)}, "
                          "or a list of lists of parameters, a Partition, or a callable")
    if isinstance(groups, Partition):
        part = groups
    elif callable(groups):
        part = groups(curvature)
        if not isinstance(part, Partition):
            raise ConfigError(f"groups: the callable returned {type(part).__name__}, expected a Partition")
    else:
        part = _user_groups(groups, curvature)
    if part.p != p:
        raise ShapeError(f"groups: the partition covers {part.p} rows, the model has p = {p} adapted parameters")
    return part
