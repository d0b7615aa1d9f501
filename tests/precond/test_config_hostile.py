"""Configurations under hostile input: strict types (no coercion of ``True``, ``2.0`` or ``"2"``),
deep immutability, and the one reader of configuration files (duplicate keys, binary files,
directories, syntax errors, YAML 1.2 floats)."""

from __future__ import annotations

import copy
import json
import pickle

import pydantic
import pytest
from torch import nn

from curvlib.bench.settings import BenchConfig, GridSettings, MethodConfig, load_config_file
from curvlib.config import FrozenDict, StrictModel, freeze, load_config_mapping, thaw
from curvlib.errors import ConfigError
from curvlib.plugins import FAMILIES, load_registry
from curvlib.precond import PreconditionerConfig, build_preconditioner
from curvlib.precond.config import resolve_config


@pytest.fixture(scope="module")
def registry():
    return load_registry()  # with the installed example plugins, whose options models count too


def _mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


# -- strict types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("update_every", "2"), ("update_every", True), ("update_every", 2.0), ("invert_every", "2"),
     ("ema", "0.9"), ("ema", True), ("coarse_mode", 1), ("preconditioner", b"kronecker")],
)
def test_config_fields_are_not_coerced(field, value):
    data = {"update_every": 2, "invert_every": 2, field: value}
    with pytest.raises(ConfigError) as info:
        PreconditionerConfig(**data)
    assert str(info.value).count("\n") >= 1 and f"{field}:" in str(info.value)
    assert repr(value) in str(info.value)


def test_a_float_field_takes_an_int():
    assert PreconditionerConfig(ema=1).ema == 1.0 and isinstance(PreconditionerConfig(ema=0).ema, float)


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"approximator": {"kind": "deflation", "rank": True}}, "approximator.rank"),
        ({"approximator": {"kind": "deflation", "rank": 2.0}}, "approximator.rank"),
        ({"approximator": {"kind": "lanczos", "rank": "2"}}, "approximator.rank"),
        ({"approximator": {"kind": "kpsvd", "warm_start": 1}}, "approximator.warm_start"),
        ({"approximator": {"kind": "kpsvd", "warm_start": "false"}}, "approximator.warm_start"),
        ({"approximator": {"kind": "kfac", "ema": "0.9"}}, "approximator.ema"),
        ({"approximator": {"kind": "kpsvd", "power_tol": True}}, "approximator.power_tol"),
        ({"damping": {"kind": "tikhonov", "value": "1e-3"}}, "damping.value"),
        ({"damping": {"kind": "heuristic", "value": True}}, "damping.value"),
        ({"curvature": {"kind": "fisher", "mc_samples": True}}, "curvature.mc_samples"),
        ({"coarse_space": {"kind": "krylov", "iterations": 1.0}}, "coarse_space.iterations"),
        ({"coarse_space": {"kind": "spectral", "source": 0}}, "coarse_space.source"),
    ],
)
def test_kind_options_are_not_coerced(registry, config, path):
    with pytest.raises(ConfigError) as info:
        resolve_config(PreconditionerConfig(**config), registry)
    assert path in str(info.value)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        build_preconditioner(_mlp(), nn.CrossEntropyLoss(), config, registry=registry)


def test_registry_resolve_is_strict_too(registry):
    with pytest.raises(ConfigError, match="rank"):
        registry.approximators.resolve({"kind": "deflation", "rank": True})
    _, options = registry.approximators.resolve({"kind": "deflation", "rank": 3, "power_tol": 1})
    assert options.rank == 3 and options.power_tol == 1.0


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (BenchConfig, {"steps": True}, "steps"),
        (BenchConfig, {"steps": 10.0}, "steps"),
        (BenchConfig, {"seed": "0"}, "seed"),
        (BenchConfig, {"small": "yes"}, "small"),
        (BenchConfig, {"ema": "0.9"}, "ema"),
        (BenchConfig, {"problems": "digits_autoencoder"}, "problems"),
        (BenchConfig, {"methods": [{"name": "sgd", "lr": "0.1"}]}, "methods.0.lr"),
        (BenchConfig, {"grid": {"lr": [0.1, True]}}, "grid.lr.1"),
        (MethodConfig, {"name": "kfac", "update_every": "2"}, "update_every"),
        (GridSettings, {"steps": 2.5}, "steps"),
    ],
)
def test_bench_settings_are_not_coerced(model, data, field):
    with pytest.raises(ConfigError) as info:
        BenchConfig.from_mapping(data) if model is BenchConfig else model(**data)
    assert field in str(info.value)


def test_bench_settings_take_lists_for_tuples_and_ints_for_floats():
    cfg = BenchConfig.from_mapping({"problems": ["digits_autoencoder"], "methods": ["sgd", {"name": "adam", "lr": 1}],
                                    "grid": {"lr": [1, 0.5]}, "target_margin": 0})
    assert cfg.problems == ("digits_autoencoder",) and cfg.methods[1].lr == 1.0
    assert cfg.grid.lr == (1.0, 0.5) and cfg.target_margin == 0.0


def _sample(annotation):
    return {float: 0.5, int: 1, str: "x", bool: True}.get(annotation, 0.5)


def test_every_registered_options_model_round_trips_through_json(registry):
    """Each kind's options, dumped to JSON (what a config file holds) and read back, validate
    again under strict types: tuples arrive as lists, floats with no fraction as ints."""
    checked = 0
    for family in FAMILIES:
        for spec in registry.family(family):
            fields = spec.options.model_fields
            data = {n: _sample(f.annotation) for n, f in fields.items() if f.is_required()}
            options = spec.options.model_validate(data)
            dumped = json.loads(json.dumps(options.model_dump(mode="json")))
            assert spec.options.model_validate(dumped) == options, (family, spec.kind, dumped)
            checked += 1
            if issubclass(spec.options, StrictModel):
                assert spec.options.model_config.get("strict") is True
    assert checked >= 20


# -- deep immutability --------------------------------------------------------------------------


def _nested():
    return PreconditionerConfig(
        approximator={"kind": "deflation", "rank": 3, "band_radius": None},
        damping={"kind": "levenberg_marquardt", "value": 1e-2, "inner_options": {"pcg_tol": 1e-9}},
        coarse_space={"kind": "krylov", "iterations": 2},
        curvature={"kind": "fisher", "mc_samples": 2},
    )


def test_config_mappings_cannot_be_mutated_in_place():
    cfg = _nested()
    before = cfg.to_dict()
    with pytest.raises(TypeError):
        cfg.approximator["rank"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        del cfg.curvature["mc_samples"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cfg.damping["inner_options"]["pcg_tol"] = 1.0  # nested mappings too
    with pytest.raises(TypeError):
        cfg.coarse_space["kind"] = "residual"  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.approximator.update(rank=0)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cfg.approximator._data["rank"] = 0  # type: ignore[attr-defined]  # not even the private view
    with pytest.raises(pydantic.ValidationError):
        cfg.approximator = {"kind": "kfac"}  # type: ignore[misc]
    assert cfg.to_dict() == before and cfg.approximator["rank"] == 3


def test_config_copies_its_inputs_and_lists_become_tuples():
    source = {"kind": "kpsvd", "extra": {"values": [1, 2]}}
    cfg = PreconditionerConfig(approximator=source)
    source["kind"] = "kfac"
    source["extra"]["values"].append(3)
    assert cfg.approximator["kind"] == "kpsvd" and cfg.approximator["extra"]["values"] == (1, 2)
    assert isinstance(cfg.approximator, FrozenDict) and isinstance(cfg.approximator["extra"], FrozenDict)


def test_frozen_configs_round_trip_compare_hash_copy_and_build(tmp_path, registry):
    yaml = pytest.importorskip("yaml")
    cfg = _nested()
    plain = cfg.to_dict()
    assert type(plain["damping"]) is dict and type(plain["damping"]["inner_options"]) is dict
    plain["approximator"]["rank"] = 99  # a copy: the config is unchanged
    assert cfg.approximator["rank"] == 3
    assert PreconditionerConfig(**json.loads(cfg.model_dump_json())) == cfg
    assert PreconditionerConfig.coerce(cfg.model_dump()) == cfg and PreconditionerConfig.coerce(cfg) is cfg
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict()))
    assert PreconditionerConfig.from_file(f) == cfg
    assert cfg.approximator == {"kind": "deflation", "rank": 3, "band_radius": None}
    assert {"kind": "fisher", "mc_samples": 2} == cfg.curvature
    assert hash(cfg) == hash(PreconditionerConfig(**cfg.to_dict()))
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    # consumers get plain, validated options
    resolved = resolve_config(cfg, registry)
    assert resolved.damping.options.inner_options == {"pcg_tol": 1e-9}
    pre = build_preconditioner(_mlp(), nn.CrossEntropyLoss(), cfg, registry=registry)
    assert pre is not None


def test_bench_method_options_are_frozen():
    entry = MethodConfig(name="kpsvd", approximator_options={"max_iters": 3, "band_radius": [1]})
    with pytest.raises(TypeError):
        entry.approximator_options["max_iters"] = 1  # type: ignore[index]
    overrides = entry.overrides()
    assert overrides["approximator_options"] == {"max_iters": 3, "band_radius": [1]}
    assert type(overrides["approximator_options"]) is dict
    overrides["approximator_options"]["max_iters"] = 7
    assert entry.approximator_options["max_iters"] == 3
    cfg = BenchConfig.from_mapping({"methods": [entry.model_dump()]})
    assert cfg.methods[0] == entry


def test_freeze_and_thaw_are_inverse():
    value = {"a": [1, {"b": (2, 3)}], "c": {"d": None}}
    frozen = freeze(value)
    assert isinstance(frozen, FrozenDict) and frozen["a"] == (1, FrozenDict({"b": (2, 3)}))
    assert thaw(frozen) == {"a": [1, {"b": [2, 3]}], "c": {"d": None}}
    assert frozen == value and (frozen | {"e": 1})["e"] == 1


# -- the one reader of configuration files ------------------------------------------------------

READERS = {
    "PreconditionerConfig.from_file": PreconditionerConfig.from_file,
    "bench load_config_file": load_config_file,
}


@pytest.fixture(params=sorted(READERS))
def read(request):
    return READERS[request.param]


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("dup.yaml", "update_every: 2\nema: 0.5\nupdate_every: 3\n", ["duplicate key 'update_every'", "line 3", "line 1"]),
        ("nested.yaml", "approximator:\n  kind: kfac\n  kind: kpsvd\n", ["duplicate key 'kind'", "line 3"]),
        ("dup.json", '{"ema": 0.5, "approximator": {"kind": "kfac", "kind": "kpsvd"}}', ["duplicate key 'kind'"]),
        ("binary.yaml", b"\x00\x01\x02\xff\xfe\xfd", ["binary.yaml", "UTF-8"]),
        ("nul.json", b'{"ema": 0.5}\x00', ["nul.json", "NUL"]),
        ("syntax.yaml", "ema: 0.5\napproximator: {kind: kfac\n", ["syntax.yaml", "could not parse", "line 3"]),
        ("syntax.json", '{"ema": 0.5\n"x": 1}', ["syntax.json", "could not parse", "line 2"]),
        ("scalar.yaml", "42\n", ["scalar.yaml", "mapping", "int"]),
        ("list.json", "[1, 2]", ["list.json", "mapping", "list"]),
        ("int_keys.yaml", "1: 2\nema: 0.5\n", ["int_keys.yaml", "must be strings", "[1]"]),
    ],
)
def test_bad_files_raise_config_error_naming_the_file(tmp_path, read, name, content, needles):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        read(f)
    msg = str(info.value)
    assert name in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_paths_and_directories(tmp_path, read):
    with pytest.raises(ConfigError, match=r"existing file.*missing\.yaml.*no such file"):
        read(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"existing file.*directory"):
        read(tmp_path)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ema: 5e-1\ndamping: {kind: tikhonov, value: 1e-3}\napproximator: {kind: kpsvd, power_tol: 1E-8}\n"
                 "curvature: {kind: fisher, mc_samples: 2}\n")
    cfg = PreconditionerConfig.from_file(f)
    assert cfg.ema == 0.5 and cfg.damping["value"] == 1e-3 and cfg.approximator["power_tol"] == 1e-8
    assert load_config_mapping(f)["damping"]["value"] == 1e-3
    # what YAML 1.1 already read stays as it was: ints, dotted floats, strings, booleans
    g = tmp_path / "d.yaml"
    g.write_text("a: 12\nb: 1.5\nc: .5\nd: -2e3\ne: 1_000\nf: e5\ng: 1e\nh: true\ni: .inf\n")
    data = load_config_mapping(g)
    assert data == {"a": 12, "b": 1.5, "c": 0.5, "d": -2000.0, "e": 1000, "f": "e5", "g": "1e", "h": True,
                    "i": float("inf")}
    assert type(data["a"]) is int and type(data["d"]) is float


def test_empty_file_is_an_empty_mapping_and_merge_keys_are_not_duplicates(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_mapping(empty) == {} and PreconditionerConfig.from_file(empty) == PreconditionerConfig()
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {kind: kfac, ema: 0.5}\napproximator:\n  <<: *b\n  ema: 0.9\n")
    assert load_config_mapping(merged)["approximator"] == {"kind": "kfac", "ema": 0.9}


def test_coerce_refuses_non_string_field_names():
    with pytest.raises(ConfigError, match=r"field names must be strings.*\[3\]"):
        PreconditionerConfig.coerce({3: "x"})


def test_invalid_values_name_the_field_and_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('update_every: "2"\ninvert_every: 2\n')
    with pytest.raises(ConfigError, match=r"update_every.*'2'[\s\S]*c\.yaml"):
        PreconditionerConfig.from_file(f)


def test_defaults_are_frozen_and_not_shared_state():
    with pytest.raises(TypeError):
        PreconditionerConfig().approximator["kind"] = "kpsvd"  # type: ignore[index]
    assert PreconditionerConfig().approximator == {"kind": "kfac"}


def test_nested_free_form_options_are_frozen_too():
    from curvlib.bench.methods import Hyperparameters
    from curvlib.damping.levenberg_marquardt import LevenbergMarquardtOptions

    lm = LevenbergMarquardtOptions(value=1e-2, inner="tikhonov", inner_options={})
    hp = Hyperparameters(lr=0.1, approximator_options={"rank": 2}, coarse_options={"k": [1, 2]}, optimizer_options={})
    for mapping in (lm.inner_options, hp.approximator_options, hp.coarse_options, hp.optimizer_options):
        with pytest.raises(TypeError):
            mapping["value"] = 3
    assert hp.approximator_options == {"rank": 2} and hp.coarse_options["k"] == (1, 2)
    assert hp.model_dump()["coarse_options"] == {"k": [1, 2]}  # plain containers out


def test_numpy_scalars_count_as_the_python_number_of_their_kind():
    np = pytest.importorskip("numpy")
    cfg = PreconditionerConfig(update_every=np.int64(2), invert_every=np.int32(4), ema=np.float64(0.9))
    assert (cfg.update_every, cfg.invert_every, cfg.ema) == (2, 4, 0.9) and type(cfg.update_every) is int
    with pytest.raises(ConfigError, match="update_every"):
        PreconditionerConfig(update_every=np.float64(2.0), invert_every=2)  # still strict across kinds
    with pytest.raises(ConfigError, match="update_every"):
        PreconditionerConfig(update_every=np.bool_(True))
