"""The strict, frozen pydantic base model every configuration derives from, and the one
reader of configuration files.

DESIGN.md §5: one strict frozen model per algorithm, ``extra="forbid"``;
cross-field rules live in model validators whose messages name the fields.

* :class:`StrictModel` — strict types (an ``int`` field takes an ``int`` — not ``True``,
  ``2.0`` or ``"2"``; a ``float`` field takes an ``int`` or a ``float`` but not a ``bool``
  or a string; a ``bool`` field takes only ``True``/``False``; a string field only a
  string), unknown fields rejected, instances immutable.  A ``tuple`` field also takes a
  list (what a JSON or YAML file holds); its items stay strict.
* :class:`FrozenDict` / :func:`freeze` / :func:`thaw` — the read-only mappings that
  configuration fields holding free-form options store (``dict`` → :class:`FrozenDict`,
  ``list`` → ``tuple``, recursively), so a frozen model is frozen all the way down.
* :func:`load_config_mapping` — a YAML or JSON file as a plain mapping, with duplicate
  keys, unreadable, non-UTF-8 and non-mapping files reported as :class:`ConfigError`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, model_validator
from pydantic_core import core_schema
from typing_extensions import Self

from curvlib.errors import ConfigError

__all__ = [
    "FrozenDict",
    "NoOptions",
    "StrictModel",
    "format_validation_error",
    "freeze",
    "load_config_mapping",
    "positive_damping",
    "thaw",
    "validate_options",
]


# --------------------------------------------------------------------------- frozen values


class FrozenDict(Mapping[Any, Any]):
    """A read-only, hashable mapping: what a config field of free-form options holds.

    Built by :func:`freeze` (nested dicts become ``FrozenDict``, lists become tuples);
    ``dict(d)`` or :func:`thaw` give a plain, mutable copy.  Item assignment and deletion
    raise ``TypeError`` like any immutable mapping.  Compares equal to a ``dict`` with the
    same items (lists and tuples compare alike).  As a pydantic field type it accepts any
    mapping and serialises (``model_dump``, JSON) as a plain dict.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[Any, Any] | None = None, /) -> None:
        items = {} if data is None else data
        # a read-only view of a private copy: not even ``_data`` can be written through
        object.__setattr__(self, "_data", types.MappingProxyType({k: freeze(v) for k, v in dict(items).items()}))
        object.__setattr__(self, "_hash", None)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return thaw(self) == thaw(other)

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(frozenset(self._data.items())))
        return self._hash  # type: ignore[return-value]

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"'FrozenDict' object is read-only (setting attribute {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (thaw(self),))

    def __or__(self, other: Mapping[Any, Any]) -> dict[Any, Any]:
        """``frozen | {...}``: a plain dict with ``other``'s items on top."""
        return {**thaw(self), **thaw(other)}

    def __ror__(self, other: Mapping[Any, Any]) -> dict[Any, Any]:
        return {**thaw(other), **thaw(self)}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # any mapping (strict=False on this one schema: a FrozenDict or a mappingproxy is a
        # mapping like a dict); the values are free-form options, validated by the kind's
        # own model later.
        return core_schema.no_info_after_validator_function(
            cls,
            core_schema.dict_schema(strict=False),
            serialization=core_schema.plain_serializer_function_ser_schema(thaw, when_used="always"),
        )


def freeze(value: Any) -> Any:
    """``value`` made read-only, recursively: mappings → :class:`FrozenDict`, lists and
    tuples → tuples, sets → frozensets; anything else is returned as is."""
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain, mutable copy of a :func:`freeze`-d value: mappings → dicts, tuples and
    lists → lists, recursively (what JSON and YAML writers take)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------- models


#: set while a StrictModel is being validated, so that nested models leave the error
#: reporting to the outermost construction
_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("curvlib_config_validating", default=False)


class StrictModel(BaseModel):
    """Base of every options model: strict types, unknown fields rejected, instances immutable.

    Constructing one with invalid values raises :class:`ConfigError`, one line per problem,
    each naming its field (:func:`format_validation_error`).

    Strict means no coercion between types: ``int`` fields reject ``True``, ``2.0`` and
    ``"2"``; ``float`` fields accept ``int`` but reject ``bool`` and strings; ``bool`` fields
    reject ``1`` and ``"yes"``; ``str``/``Literal`` fields reject non-strings.  Tuple fields
    also accept a list (a JSON/YAML array), item types staying strict; a NumPy scalar counts
    as the Python number of its own kind (``np.int64(2)`` as ``2``, ``np.float64`` as a float).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    def __init__(self, /, **data: Any) -> None:
        if _VALIDATING.get():
            # inside another model's validation (or model_validate): let pydantic collect
            # the errors with their full paths; the outermost call reports them
            super().__init__(**data)
            return
        token = _VALIDATING.set(True)
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"invalid {type(self).__name__}:\n" + format_validation_error(exc)) from exc
        finally:
            _VALIDATING.reset(token)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """pydantic's ``model_validate``: raises ``pydantic.ValidationError`` (for callers such
        as :func:`validate_options` that format the errors with their own context)."""
        token = _VALIDATING.set(True)
        try:
            return super().model_validate(obj, *args, **kwargs)
        finally:
            _VALIDATING.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        # Strict mode would refuse a list for a tuple field, but a list is what JSON, YAML
        # and keyword arguments naturally give: convert only the fields declared as tuples.
        # Likewise a NumPy scalar (a grid from np.arange / np.logspace) is taken as the
        # Python number of its own kind: np.int64 as int, np.float64 as float, np.bool_ as bool.
        if not isinstance(data, Mapping):
            return data
        if any(_numpy_scalar(v) for v in data.values()):
            data = {k: v.item() if _numpy_scalar(v) else v for k, v in data.items()}
        fields = _tuple_fields(cls)
        if not fields or not any(isinstance(data.get(f), list) for f in fields):
            return data
        return {k: tuple(v) if k in fields and isinstance(v, list) else v for k, v in data.items()}


def _numpy_scalar(value: Any) -> bool:
    """A NumPy scalar (without importing NumPy): its ``.item()`` is the Python number."""
    return type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0


@functools.lru_cache(maxsize=None)
def _tuple_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` whose type is a tuple (or an optional tuple)."""
    names = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = getattr(annotation, "__args__", ()) if _is_union(annotation) else (annotation,)
        if any(getattr(a, "__origin__", a) is tuple for a in args):
            names.add(name)
            if info.validation_alias is None and info.alias:
                names.add(info.alias)
    return frozenset(names)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


class NoOptions(StrictModel):
    """Options model of a kind that takes no options."""


def format_validation_error(exc: pydantic.ValidationError, prefix: str = "") -> str:
    """pydantic's errors as lines ``<prefix>.<field>: <why> (got <value>)`` (list items as
    ``rules[0].max_params``); a cross-field
    rule (a model validator) gives its own message, which names the fields itself."""
    lines = []
    for err in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).removeprefix(".")
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and err.get("type") == "value_error":
            lines.append(f"{prefix}: {msg}" if prefix else msg)
            continue
        path = ".".join(p for p in (prefix, loc) if p) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and err.get("type") != "missing" else ""
        lines.append(f"{path}: {msg}{got}")
    return "\n".join(lines)


def validate_options(model: type[BaseModel], data: Mapping[str, Any], *, where: str) -> BaseModel:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` naming ``where``.

    ``where`` is a human-readable location such as ``"approximator 'kpsvd'"``.
    """
    try:
        return model.model_validate(thaw(data))
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg} (got {err.get('input')!r})")
        raise ConfigError(f"invalid options for {where}:\n" + "\n".join(lines)) from exc


def positive_damping(damping: Any, who: str) -> float:
    """λ of a damped operator (F + λI) as a float, checked finite and > 0.

    Raises:
        ConfigError: not a number, not finite, or ≤ 0 (``who`` names the caller).
    """
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: damping must be a number > 0, got {damping!r}") from None
    if not (math.isfinite(lam) and lam > 0):
        raise ConfigError(f"{who}: damping λ must be finite and > 0, got {damping!r}")
    return lam


# --------------------------------------------------------------------------- files

#: YAML 1.2's float: unlike PyYAML's YAML 1.1 rule it needs no dot, so ``1e-3`` is a float.
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int | None, first_line: int | None = None) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    import yaml  # optional (the bench/test extras): only a YAML file needs it

    class Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2 floats (``1e-3``) and duplicate keys refused."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # ``<<: *base`` overrides on purpose
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue  # an unhashable key: SafeLoader reports it itself
                    line = key_node.start_mark.line + 1
                    if first is not None:
                        raise _DuplicateKey(key, line, first)
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    resolvers = {}
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
        kept = [(tag, rx) for tag, rx in entries if tag != "tag:yaml.org,2002:float"]
        if first in "-+0123456789.":
            kept.insert(0, ("tag:yaml.org,2002:float", _YAML_FLOAT))
        resolvers[first] = kept
    for first in "-+0123456789.":
        resolvers.setdefault(first, [("tag:yaml.org,2002:float", _YAML_FLOAT)])
    Loader.yaml_implicit_resolvers = resolvers
    return Loader


def _json_pairs(file: Path, who: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{who}: duplicate key {key!r} in {str(file)!r}")
            out[key] = value
        return out

    return hook


def load_config_mapping(path: str | os.PathLike[str], *, who: str = "config file") -> dict[str, Any]:
    """Read a configuration file: one mapping, as plain dicts and lists.

    ``.json`` files are parsed as JSON, any other suffix as YAML (needs PyYAML; YAML 1.2
    floats, so ``1e-3`` is a float and not the string PyYAML's YAML 1.1 rules make of it).
    An empty file (or a bare ``null``) is an empty mapping.  ``who`` starts every message.

    Raises:
        ConfigError: the path does not exist or is not a regular file; it cannot be read;
            it is not UTF-8 text (a binary file); it does not parse (the message gives
            the line and column); a key appears twice in one mapping (the key, the file
            and, for YAML, both lines); its top level is not a mapping with string keys.
    """
    file = Path(path)
    name = repr(str(file))
    if not file.exists():
        raise ConfigError(f"{who}: expected an existing file, got {name} (no such file)")
    if not file.is_file():
        kind = "a directory" if file.is_dir() else "not a regular file"
        raise ConfigError(f"{who}: expected an existing file, got {name} ({kind})")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{who}: could not read {name}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{who}: {name} is not UTF-8 text (a binary file?): byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{who}: {name} is not a text file (it contains NUL bytes, at offset {text.index(chr(0))})")
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs(file, who)) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{who}: could not parse {name} as JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
    else:
        data = _load_yaml(text, file, who)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{who}: expected {name} to hold a mapping of options, got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{who}: the option names in {name} must be strings, got {bad!r}")
    return data


def _load_yaml(text: str, file: Path, who: str) -> Any:
    name = repr(str(file))
    try:
        loader = _yaml_loader()
    except ImportError as exc:
        raise ConfigError(f"{who}: reading {name} as YAML needs PyYAML (pip install pyyaml), or use a .json file") from exc
    import yaml

    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{who}: duplicate key {exc.key!r} in {name} at line {exc.line} (first at line {exc.first_line})"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        why = f"{context}: {problem}" if context else problem
        raise ConfigError(f"{who}: could not parse {name} as YAML: {why}{where}") from None
