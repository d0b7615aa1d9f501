"""Checkpoints under hostile conditions.

- resume: N steps straight vs. k steps, checkpoint (deepcopy or torch.save → torch.load(weights_only=True)),
  a model and optimizer rebuilt from scratch (other initial weights, other generator seed), load, the
  remaining N − k steps: parameters and optimizer state bit-identical (docs/optimizer.md, *Checkpoints*);
- corrupted states: one leaf of a good state deleted / retyped / reshaped / made non-finite: the load
  raises ConfigError and leaves everything bit-identical, or loads and the next step keeps the step
  invariant with finite state (a non-finite value never enters a checkpoint or an EMA);
- whole states that do not belong: None, {}, a string, a state of another approximator, dtype or model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from curvlib.errors import ConfigError

from .conftest import (
    APPROXIMATORS,
    CLEAR,
    CURVATURES,
    FAILURE,
    OK,
    _walk,
    backward,
    classify_exception,
    diff,
    expect_clear_error_or_ok,
    fingerprint,
    finite_state,
    loss_module,
    make_config,
    make_opt,
    record_one,
    roundtrip,
    run_situations,
    step_outcome,
    tiny_batch,
    tiny_model,
    worst,
    _short,
)


# --------------------------------------------------------------------------- resume


@st.composite
def resume_cases(draw):
    approx = draw(st.sampled_from(APPROXIMATORS))
    T1 = draw(st.sampled_from([1, 2, 3]))
    coarse = draw(st.sampled_from([None, None, "nicolaides", "residual", "spectral", "krylov", "taylor"]))
    n = draw(st.integers(3, 6))
    return dict(
        approx=approx,
        damping="tikhonov" if approx == "ekfac" else draw(st.sampled_from(["heuristic", "tikhonov", "levenberg_marquardt"])),
        curvature=draw(st.sampled_from(CURVATURES)),
        coarse=coarse,
        coarse_mode=draw(st.sampled_from(["multiplicative", "additive", "previous"])) if coarse else "multiplicative",
        T1=T1,
        T2=T1 * draw(st.sampled_from([1, 2])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        fallback=draw(st.sampled_from(["sgd", "adam"])),
        variant=draw(st.sampled_from(["mlp", "ln", "custom"])),
        dtype=draw(st.sampled_from(["float64", "float64", "float32"])),
        kl_clip=draw(st.sampled_from([None, 1e-2])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3])),
        loss=draw(st.sampled_from(["ce", "mse"])),
        n=n,
        k=draw(st.integers(1, n - 1)),
        mode=draw(st.sampled_from(["deepcopy", "bytesio"])),
    )


def _build(c, seed):
    model = tiny_model(c["dtype"], seed=seed, variant=c["variant"])
    loss_fn = loss_module(c["loss"])
    cfg = make_config(c["approx"], c["damping"], c["curvature"], c["coarse"], c["T1"], c["T2"], c["coarse_mode"])
    opt = make_opt(model, loss_fn, cfg, seed=seed + 1, momentum=c["momentum"], fallback=c["fallback"],
                   kl_clip=c["kl_clip"], weight_decay=c["weight_decay"])
    return model, loss_fn, opt


def _train(model, loss_fn, opt, c, steps):
    for k in steps:
        X, y = tiny_batch(c["dtype"], c["loss"], seed=k)
        backward(model, loss_fn, X, y, opt)
        opt.step(batch=(X, y))


def _resume(c):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, loss_fn, opt = _build(c, seed=0)
        _train(model, loss_fn, opt, c, range(c["n"]))
        straight = fingerprint(opt, model)

        model, loss_fn, opt = _build(c, seed=0)
        _train(model, loss_fn, opt, c, range(c["k"]))
        ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()}, c["mode"])
        model, loss_fn, opt = _build(c, seed=7)  # other weights, other generator: the load must restore them
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        _train(model, loss_fn, opt, c, range(c["k"], c["n"]))
        resumed = fingerprint(opt, model)
    # the running counts of opt.metrics are not part of the checkpoint (torch.optim's state is)
    differ = diff(straight, resumed, ignore=("counts.",))
    if not differ:
        return OK, ""
    params = [p for p in differ if p.startswith("param ")]
    gap = max((float((straight[p].double() - resumed[p].double()).abs().max()) for p in params
               if p in straight and p in resumed and straight[p].shape == resumed[p].shape), default=0.0)
    return FAILURE, f"resume not bit-identical: {_short(differ)} (max parameter gap {gap:.3g})"


def test_resume_is_bit_identical_across_configurations():
    def body(c):
        situation = (f"{c['approx']}/{c['damping']}/{c['curvature']} coarse={c['coarse']}({c['coarse_mode']}) "
                     f"T1={c['T1']} T2={c['T2']} momentum={c['momentum']} fallback={c['fallback']} "
                     f"model={c['variant']} {c['dtype']} kl_clip={c['kl_clip']} wd={c['weight_decay']} "
                     f"loss={c['loss']} N={c['n']} k={c['k']} via {c['mode']}")
        try:
            o, d = _resume(c)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            o, d = classify_exception(exc)
            if o == CLEAR:  # a valid configuration must train and resume: an error is a failure here
                o, d = FAILURE, f"valid configuration raised {d}"
        return situation, o, d

    run_situations("checkpoint-resume", resume_cases(), body, max_examples=40)


# --------------------------------------------------------------------------- corrupted states

CORRUPTIONS = ("delete", "none", "string", "nan", "inf", "wrong_shape", "wrong_dtype", "negative", "huge",
               "bool", "truncate", "tolist")


def _corrupt(state, path_index: int, how: str):
    """Apply ``how`` to the ``path_index``-th leaf of ``state`` (in place); returns the path."""
    leaves = [p for p, _ in _walk(state, "")]
    path = leaves[path_index % len(leaves)]
    # walk to the parent container
    parts: list = []
    import re

    for tok in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(tok[1:-1]) if tok.startswith("[") else tok)
    parent = state
    for p in parts[:-1]:
        parent = parent[p if not isinstance(parent, dict) or p in parent else _key(parent, p)]
    last = parts[-1]
    if isinstance(parent, dict) and last not in parent:
        last = _key(parent, last)
    if isinstance(parent, tuple):
        return path + " (in a tuple: left alone)"
    leaf = parent[last]
    if how == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            del parent[last]
    elif how == "none":
        parent[last] = None
    elif how == "string":
        parent[last] = "garbage"
    elif how in ("nan", "inf"):
        v = float(how)
        parent[last] = torch.full_like(leaf, v) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else v
    elif how == "wrong_shape":
        parent[last] = torch.cat([leaf.reshape(-1), leaf.reshape(-1)[:1]]) if isinstance(leaf, torch.Tensor) and leaf.numel() else torch.zeros(3, 2)
    elif how == "wrong_dtype":
        parent[last] = leaf.to(torch.float16) if isinstance(leaf, torch.Tensor) else float(leaf) if isinstance(leaf, int) else 1
    elif how == "negative":
        parent[last] = -leaf if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else -1
    elif how == "huge":
        parent[last] = leaf * 1e300 if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else 10**30
    elif how == "bool":
        parent[last] = True
    elif how == "truncate":
        if isinstance(parent, list) and len(parent) > 0:
            parent.pop()
        elif isinstance(leaf, torch.Tensor) and leaf.ndim and leaf.shape[0] > 1:
            parent[last] = leaf[:-1]
        else:
            parent[last] = []
    elif how == "tolist":
        parent[last] = leaf.tolist() if isinstance(leaf, torch.Tensor) else [leaf]
    return path


def _key(d: dict, tok: str):
    for k in d:
        if str(k) == tok:
            return k
    return tok


def _trained(approx, coarse, momentum, fallback, steps, seed):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model("float64", seed=seed, variant="custom")
        loss_fn = loss_module("ce")
        damping = "tikhonov" if approx == "ekfac" else "levenberg_marquardt"
        opt = make_opt(model, loss_fn, make_config(approx, damping, "fisher", coarse, T1=1, T2=2), seed=seed,
                       momentum=momentum, fallback=fallback)
        for k in range(steps):
            X, y = tiny_batch("float64", "ce", seed=k + 10 * seed)
            backward(model, loss_fn, X, y, opt)
            opt.step(batch=(X, y))
    return model, loss_fn, opt


@st.composite
def corruption_cases(draw):
    return dict(
        approx=draw(st.sampled_from(["kfac", "kpsvd", "kfac_corrected", "ekfac"])),
        coarse=draw(st.sampled_from([None, "residual"])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        fallback=draw(st.sampled_from(["sgd", "adam"])),
        how=draw(st.sampled_from(CORRUPTIONS)),
        index=draw(st.integers(0, 10**6)),
        mode=draw(st.sampled_from(["deepcopy", "bytesio"])),
    )


def _load_then_step(opt, model, loss_fn, state):
    """Load ``state``; ConfigError + bit-identical, or loaded + finite + a good next step."""
    before = fingerprint(opt, model)
    o, d, _ = expect_clear_error_or_ok(lambda: opt.load_state_dict(state), want=ConfigError)
    if o == FAILURE:
        changed = diff(before, fingerprint(opt, model))
        return FAILURE, d + (f" -- and the optimizer changed: {_short(changed)}" if changed else "")
    if o == CLEAR:
        changed = diff(before, fingerprint(opt, model))
        if changed:
            return FAILURE, f"{d} raised, but the load was half-applied: changed {_short(changed)}"
        return CLEAR, d
    bad = finite_state(opt, model)
    if bad:
        return FAILURE, f"load accepted a non-finite state: {_short(bad)}"
    X, y = tiny_batch("float64", "ce", seed=99)
    backward(model, loss_fn, X, y, opt)
    so, sd = step_outcome(opt, model, lambda: opt.step(batch=(X, y)))
    if so == FAILURE:
        return FAILURE, f"loaded, then the next {sd}"
    return worst([(o, d), (so, sd)])


def test_corrupted_checkpoints_load_atomically_or_keep_the_step_invariant():
    def body(c):
        model, loss_fn, opt = _trained(c["approx"], c["coarse"], c["momentum"], c["fallback"], steps=2, seed=0)
        _, _, source = _trained(c["approx"], c["coarse"], c["momentum"], c["fallback"], steps=3, seed=1)
        state = roundtrip(source.state_dict(), c["mode"])
        path = _corrupt(state, c["index"], c["how"])
        situation = (f"{c['how']} at {path} ({c['approx']} coarse={c['coarse']} momentum={c['momentum']} "
                     f"fallback={c['fallback']} via {c['mode']})")
        o, d = _load_then_step(opt, model, loss_fn, state)
        return situation, o, d

    run_situations("checkpoint-corrupt", corruption_cases(), body, max_examples=50)


# --------------------------------------------------------------------------- states that do not belong


def _other(kind):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "kpsvd":
            return _trained("kpsvd", None, 0.9, "sgd", 2, 3)[2].state_dict()
        if kind == "float32":
            model = tiny_model("float32", seed=0, variant="custom")
        elif kind == "no_custom":
            model = tiny_model("float64", seed=0, variant="mlp")
        elif kind == "layernorm":
            model = tiny_model("float64", seed=0, variant="ln")
        else:
            raise AssertionError(kind)
        loss_fn = loss_module("ce")
        opt = make_opt(model, loss_fn, make_config("kfac", "levenberg_marquardt", "fisher", T1=1, T2=2),
                       momentum=0.9)
        X, y = tiny_batch(next(p.dtype for p in model.parameters()), "ce")
        backward(model, loss_fn, X, y, opt)
        opt.step(batch=(X, y))
        return opt.state_dict()


FOREIGN = {
    "None": lambda: None,
    "empty dict": lambda: {},
    "a string": lambda: "checkpoint.pt",
    "a list": lambda: [1, 2, 3],
    "torch state without preconditioner": lambda: {"state": {}, "param_groups": []},
    "preconditioner is a string": lambda: {"state": {}, "param_groups": [], "preconditioner": "x"},
    "state of a kpsvd optimizer": lambda: _other("kpsvd"),
    "state of a float32 model": lambda: _other("float32"),
    "state of a model without the custom module": lambda: _other("no_custom"),
    "state of a model with a LayerNorm": lambda: _other("layernorm"),
}


@pytest.mark.parametrize("what", list(FOREIGN))
def test_foreign_states_are_refused_atomically(what):
    model, loss_fn, opt = _trained("kfac", None, 0.9, "sgd", steps=2, seed=0)
    o, d = _load_then_step(opt, model, loss_fn, FOREIGN[what]())
    record_one("checkpoint-foreign", what, o, d)
