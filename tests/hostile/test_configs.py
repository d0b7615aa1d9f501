"""Random configurations: each is either valid and trains two steps of a tiny model with finite
results (the step invariant), or is refused with a ConfigError naming one of the fields that were
made hostile — never anything else (no raw TypeError/ValueError/RuntimeError, no hang).

Covered: ``PreconditionerConfig`` mappings (kinds known, unknown or of the wrong type; options known
to the kind or not, with values of the wrong type or range: True, 2.0, "2", None, nan, inf, −1, 0,
10**18, 10**30, 1e300, [], {}), ``NaturalGradient``'s own keyword arguments, and
``PreconditionerConfig.from_file`` on hostile files.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

from curvlib.errors import ConfigError
from curvlib.plugins import load_registry
from curvlib.precond import PreconditionerConfig

from .conftest import (
    CLEAR,
    FAILURE,
    OK,
    backward,
    expect_clear_error_or_ok,
    loss_module,
    make_opt,
    record_one,
    run_situations,
    step_outcome,
    tiny_batch,
    tiny_model,
    worst,
)

_REG = load_registry()
FAMILY = {"curvature": "curvatures", "approximator": "approximators", "damping": "dampings",
          "coarse_space": "coarse_spaces"}
KINDS = {field: list(_REG.family(fam).kinds()) for field, fam in FAMILY.items()}
OPTIONS = {
    (field, kind): sorted(_REG.family(fam).get(kind).options.model_fields)
    for field, fam in FAMILY.items() for kind in KINDS[field]
    if _REG.family(fam).get(kind).options is not None
}
HOSTILE = [True, False, 2.0, "2", None, math.nan, math.inf, -math.inf, -1, 0, 0.0, 1, 3, 64, 10**18, 10**30,
           1e300, 1e-300, -1e-300, 0.5, [], {}, "kernel", "expand", "heuristic", "nicolaides", "input"]
BAD_KINDS = ["kfca", "", "KFAC", " kfac", 3, None, True, ["kfac"], {"kind": "kfac"}]
BASE = {
    "curvature": {"kind": "ggn"},
    "approximator": {"kind": "kfac"},
    "damping": {"kind": "tikhonov", "value": 1e-2},
    "update_every": 1,
    "invert_every": 1,
    "ema": 0.95,
}
TOP_SCALARS = ("update_every", "invert_every", "ema", "coarse_mode", "preconditioner")


@st.composite
def hostile_configs(draw):
    """A valid configuration of random kinds, then one or two hostile edits."""
    cfg: dict = {
        "curvature": {"kind": draw(st.sampled_from(["ggn", "fisher", "empirical_fisher"]))},
        "approximator": {"kind": draw(st.sampled_from(KINDS["approximator"]))},
        "damping": {"kind": draw(st.sampled_from(KINDS["damping"])), "value": 1e-2},
        "update_every": 1,
        "invert_every": 1,
    }
    if cfg["approximator"]["kind"] in ("ekfac", "exact_block") and cfg["damping"]["kind"] == "heuristic":
        cfg["damping"]["kind"] = "tikhonov"  # the π-split needs Kronecker factors (a documented ConfigError)
    if draw(st.booleans()):
        cfg["coarse_space"] = {"kind": draw(st.sampled_from(["nicolaides", "residual", "spectral", "krylov", "taylor"]))}
    named: set[str] = set()
    notes = []
    for _ in range(draw(st.integers(1, 2))):
        what = draw(st.sampled_from(["option", "option", "option", "option", "kind", "top", "unknown_field"]))
        if what == "kind":
            field = draw(st.sampled_from(list(FAMILY)))
            kind = draw(st.sampled_from(KINDS[field] + BAD_KINDS))
            if field == "coarse_space" and kind is None:
                cfg[field] = None
            else:
                cfg[field] = {"kind": kind}
                if field == "damping":
                    cfg[field]["value"] = 1e-2
            named |= {field, "kind"} | set(FAMILY)  # a kind may clash with another field's kind (cross-field rule)
            notes.append(f"{field}.kind={kind!r}")
        elif what == "option":
            field = draw(st.sampled_from([f for f in FAMILY if isinstance(cfg.get(f), dict)]))
            kind = cfg[field].get("kind")
            known = OPTIONS.get((field, kind), []) if isinstance(kind, str) else []
            name = draw(st.sampled_from(known + ["rnak"])) if known else draw(st.sampled_from(["rnak", "ema"]))
            value = draw(st.sampled_from(HOSTILE))
            cfg[field][name] = value
            named |= {field, name}
            notes.append(f"{field}.{name}={value!r}")
        elif what == "top":
            name = draw(st.sampled_from(TOP_SCALARS))
            value = draw(st.sampled_from(HOSTILE + ["multiplicative", "additive", "previous", "kronecker",
                                                    "block_natural_gradient", "exact_natural_gradient"]))
            cfg[name] = value
            named.add(name)
            notes.append(f"{name}={value!r}")
        else:
            name = draw(st.sampled_from(["updateevery", "lr", "kind", "Curvature"]))
            cfg[name] = draw(st.sampled_from(HOSTILE))
            named.add(name)
            notes.append(f"{name}={cfg[name]!r}")
    kinds = "/".join(str(cfg[f].get("kind")) if isinstance(cfg.get(f), dict) else str(cfg.get(f))
                     for f in ("approximator", "damping", "curvature", "coarse_space"))
    return cfg, sorted(named), f"[{kinds}] " + "; ".join(notes)


def _train_two_steps(cfg):
    model = tiny_model("float64", seed=0)
    loss_fn = loss_module("ce")
    o, d, opt = expect_clear_error_or_ok(lambda: make_opt(model, loss_fn, cfg), seconds=5.0)
    if opt is None:
        return o, d, "construction"
    results = []
    for k in range(2):
        X, y = tiny_batch("float64", "ce", seed=k)
        backward(model, loss_fn, X, y, opt)
        results.append(step_outcome(opt, model, lambda: opt.step(batch=(X, y)), seconds=4.0))
        if results[-1][0] != OK:
            break
    o, d = worst(results)
    return o, d, "training"


def test_random_configs_train_or_raise_a_config_error_naming_the_field():
    def body(example):
        cfg, named, notes = example
        o, d, phase = _train_two_steps(cfg)
        if o == CLEAR:
            # a ConfigError naming a field that was made hostile (at construction or at the first step)
            if "ConfigError" not in d and "UnknownKindError" not in d:
                o, d = FAILURE, f"{phase}: a validated config then raised {d} (expected a ConfigError at construction)"
            elif not any(n in d for n in named):
                o, d = FAILURE, f"{phase}: {d} -- names none of {named}"
        return f"config {notes}", o, d

    run_situations("config-random", hostile_configs(), body, max_examples=60)


# --------------------------------------------------------------------------- NaturalGradient's own arguments

KWARGS = {
    "lr": [0.1, True, "0.1", None, math.nan, math.inf, -1.0, 0.0, 1e300, torch.tensor(math.nan), torch.tensor([0.1, 0.2])],
    "momentum": [0.9, True, "0.9", None, math.nan, 1.0, -0.1, 2, torch.tensor(2.0)],
    "weight_decay": [1e-3, None, math.nan, -1.0, math.inf, "0", torch.tensor(math.inf)],
    "kl_clip": [1e-2, 0.0, -1.0, math.nan, math.inf, "0.01", True],
    "fallback": ["sgd", "adam", "SGD", "lbfgs", None, 3, ""],
    "adam_betas": [(0.9, 0.999), (0.9,), (math.nan, 0.9), "ab", None, (0.9, 1.0), (1.5, 0.9), 0.9, (0.9, 0.999, 0.1)],
    "adam_eps": [1e-8, 0.0, -1e-8, math.nan, None, "1e-8"],
    "generator": [None, "seed", 3, torch.Generator()],
    "callback": [None, 3, "print", lambda m: None],
    "params": [None, [], [{"params": []}], "weights", [torch.zeros(3)], [{"params": [], "lr": math.nan}]],
    "config": [None, "no/such/file.yaml", 3, ["kfac"], {"approximator": "kfac"}, {"kind": "kfac"}],
}


def _kw_cases():
    out = []
    for name, values in KWARGS.items():
        for i, v in enumerate(values):
            out.append((name, i, v))
    return out


@pytest.mark.parametrize("name, i, value", _kw_cases(), ids=[f"{n}-{i}" for n, i, _ in _kw_cases()])
def test_optimizer_arguments_are_validated(name, i, value):
    model = tiny_model("float64", seed=0)
    loss_fn = loss_module("ce")
    kw = {"lr": 0.1, "fallback": "adam"} if name in ("adam_betas", "adam_eps") else {"lr": 0.1}
    kw[name] = value
    if name in ("adam_betas", "adam_eps"):
        model = tiny_model("float64", seed=0, variant="custom")  # the Adam fallback is used
    config = kw.pop("config", {"curvature": "ggn"})
    names = {"config": ["config", "PreconditionerConfig", "file"], "params": ["params", "param_groups", "parameter"],
             "adam_betas": ["adam_betas"], "generator": ["generator"]}.get(name, [name])
    o, d, opt = expect_clear_error_or_ok(lambda: make_opt(model, loss_fn, config, **kw), names=names)
    if opt is not None:
        results = []
        for k in range(2):
            X, y = tiny_batch("float64", "ce", seed=k)
            backward(model, loss_fn, X, y, opt)
            results.append(step_outcome(opt, model, lambda: opt.step(batch=(X, y))))
        o, d = worst(results)
        if o == CLEAR and not any(n in d for n in names):
            o, d = FAILURE, f"accepted {name}={value!r}, then at a step: {d}"
    record_one("optimizer-arguments", f"NaturalGradient({name}={value!r})", o, d)


# --------------------------------------------------------------------------- configuration files

FILES = {
    "nonexistent": None,
    "a directory": "DIR",
    "binary garbage .yaml": b"\xff\xfe\x00\x81garbage\x00",
    "binary garbage .json": b"\x89PNG\r\n\x1a\n\x00\x00",
    "invalid yaml": b"curvature: {kind: fisher\napproximator: [",
    "yaml list": b"- kfac\n- tikhonov\n",
    "yaml scalar": b"kfac\n",
    "empty file": b"",
    "json NaN ema": b'{"ema": NaN}',
    "json unknown kind": b'{"approximator": {"kind": "kfca"}}',
    "yaml tab indentation": b"curvature:\n\tkind: fisher\n",
    "yaml with python tag": b"curvature: !!python/object/apply:os.system ['true']\n",
    "huge update_every": b"update_every: 100000000000000000000000000000\n",
    ".txt extension": b"update_every: 2\n",
}


@pytest.mark.parametrize("what", list(FILES))
def test_config_files_load_or_raise_a_config_error(what, tmp_path):
    content = FILES[what]
    suffix = ".json" if "json" in what else ".txt" if ".txt" in what else ".yaml"
    path = tmp_path / f"precond{suffix}"
    if content == "DIR":
        path = tmp_path / "adir.yaml"
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    o, d, cfg = expect_clear_error_or_ok(lambda: PreconditionerConfig.from_file(path), want=ConfigError)
    if cfg is not None:
        o2, d2, _ = _train_two_steps(cfg)
        o, d = worst([(o, d), (o2, d2)])
    record_one("config-file", f"from_file({what})", o, d)


# --------------------------------------------------------------------------- extreme values of the right type

EXTREME = {
    "mc_samples=10**18": {"curvature": {"kind": "fisher", "mc_samples": 10**18}},
    "mc_samples=2**40": {"curvature": {"kind": "fisher", "mc_samples": 2**40}},
    "kpsvd power_tol=0, max_iters=10**18": {"approximator": {"kind": "kpsvd", "power_tol": 0.0, "max_iters": 10**18}},
    "deflation rank=10**6": {"approximator": {"kind": "deflation", "rank": 10**6}},
    "lanczos krylov_dim=10**9": {"approximator": {"kind": "lanczos", "krylov_dim": 10**9}},
    "tikhonov pcg_tol=0, pcg_max_iters=10**18": {"approximator": {"kind": "kfac_corrected"},
                                                 "damping": {"kind": "tikhonov", "value": 1e-2, "pcg_tol": 0.0,
                                                             "pcg_max_iters": 10**18}},
    "tikhonov dense_max=0": {"damping": {"kind": "tikhonov", "value": 1e-2, "dense_max": 0}},
    "damping value=1e300": {"damping": {"kind": "heuristic", "value": 1e300}},
    "damping value=1e-300": {"damping": {"kind": "tikhonov", "value": 1e-300, "method": "exact"}},
    "damping value=0": {"damping": {"kind": "heuristic", "value": 0.0}},
    "LM interval=10**18, omega=1e-300": {"damping": {"kind": "levenberg_marquardt", "value": 1e-2,
                                                     "interval": 10**18, "omega": 1e-300}},
    "LM rho_low > rho_high": {"damping": {"kind": "levenberg_marquardt", "value": 1e-2, "rho_low": 0.9, "rho_high": 0.1}},
    "LM floor > ceiling": {"damping": {"kind": "levenberg_marquardt", "value": 1e-2, "floor": 10.0, "ceiling": 1.0}},
    "taylor order=64": {"coarse_space": {"kind": "taylor", "order": 64}},
    "krylov iterations=64": {"coarse_space": {"kind": "krylov", "iterations": 64}},
    "ema=0 (no memory)": {"ema": 0.0},
    "ema=1 (never updates)": {"ema": 1.0},
    "update_every=10**18": {"update_every": 10**18, "invert_every": 10**18},
    "band_radius=10**18": {"approximator": {"kind": "kpsvd", "band_radius": 10**18}},
    "ekfac max_chunk_entries=1": {"approximator": {"kind": "ekfac", "max_chunk_entries": 1},
                                  "damping": {"kind": "tikhonov", "value": 1e-2}},
}


@pytest.mark.parametrize("what", list(EXTREME))
def test_extreme_option_values_train_or_raise_a_config_error(what):
    cfg = {"curvature": {"kind": "ggn"}, "damping": {"kind": "tikhonov", "value": 1e-2}}
    cfg.update(EXTREME[what])
    names = sorted({k for part in EXTREME[what].values() if isinstance(part, dict) for k in part}
                   | set(EXTREME[what]))
    o, d, phase = _train_two_steps(cfg)
    if o == CLEAR and ("ConfigError" not in d or not any(n in d for n in names)):
        o, d = FAILURE, f"{phase}: {d} (expected a ConfigError naming one of {names})"
    record_one("config-extreme", what, o, d)
