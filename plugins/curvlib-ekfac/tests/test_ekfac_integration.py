"""EKFAC inside curvlib as a user selects it by name: ``curvlib.approximate`` on real networks,
``damped_inverse``, ``PreconditionerConfig(approximator={"kind": "ekfac"})`` with the
``NaturalGradient`` optimizer, and ``curvlib bench --methods ekfac``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from ekfac_support import require_installed, xfail_without_plugin_block_serialization
from torch import nn

require_installed()

import curvlib  # noqa: E402
from curvlib.plugins import load_registry  # noqa: E402
from curvlib.testing import assert_close  # noqa: E402
from curvlib.testing import references as ref  # noqa: E402
from curvlib.testing.strategies import build_cnn, build_conv_autoencoder, build_mlp  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and the bench sets its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(arch: str, m: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    if arch == "mlp":
        model = build_mlp([4, 5, 3], seed=seed)
        X, y = torch.randn(m, 4, generator=g, dtype=F64), torch.randint(0, 3, (m,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    if arch == "cnn":
        model = build_cnn(2, 3, 4, 3, seed=seed)
        X, y = torch.randn(m, 2, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (m,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    model = build_conv_autoencoder(2, 4, seed=seed)
    X = torch.rand(m, 1, 4, 4, generator=g, dtype=F64)
    return model, nn.MSELoss(), X, X.reshape(m, -1)


def test_the_installed_registry_has_ekfac_from_its_distribution():
    spec = load_registry().approximators.get("ekfac")
    assert spec.distribution == "curvlib-ekfac" and spec.plugin == "ekfac"
    assert spec.metadata["default_damping"] == "tikhonov"
    assert "ekfac" not in load_registry(external=False).approximators


@pytest.mark.parametrize("arch", ["mlp", "cnn", "conv_autoencoder"])
def test_approximate_and_damped_inverse_on_a_network(arch):
    """Each layer block of the curvature gets its EKFAC fit (the diagonal of the dense block in
    the basis of its KFAC factors); the tikhonov inverse is the block-diagonal dense solve."""
    model, loss_fn, X, y = _problem(arch)
    F = curvlib.curvature("ggn", model, loss_fn, (X, y))
    approx = curvlib.approximate(F, "ekfac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvlib.PerformanceWarning)  # to_dense always warns: expected here
        D = F.to_dense()
    for i, L in enumerate(F.layers):
        block = approx[i].block
        U = torch.kron(block.evec_a, block.evec_g)
        assert_close(ref.vec(block.scalings), torch.diagonal(U.T @ D[L.slice, L.slice] @ U))
    lam = 1e-2
    inv = curvlib.damped_inverse(approx, "tikhonov", value=lam)
    dense_inv = torch.zeros(F.p, F.p, dtype=F64)
    for L, block in zip(F.layers, approx.blocks):
        dense_inv[L.slice, L.slice] = torch.linalg.inv(block.to_dense() + lam * torch.eye(L.p_i, dtype=F64))
    u = F.gradient_vector()
    assert_close(inv @ u, dense_inv @ u)


def test_natural_gradient_steps_with_ekfac():
    """A few NaturalGradient steps with ``approximator={"kind": "ekfac"}``: the first step is
    exactly −lr·(F_EKFAC + λI)⁻¹∇L (GGN, T1 = T2 = 1, no EMA), and the loss decreases."""
    xfail_without_plugin_block_serialization()
    from curvlib.optim import NaturalGradient
    from curvlib.precond import PreconditionerConfig

    model, loss_fn, X, y = _problem("mlp", m=16)
    lam, lr = 1e-2, 0.5
    config = PreconditionerConfig(
        curvature={"kind": "ggn"}, approximator={"kind": "ekfac"}, damping={"kind": "tikhonov", "value": lam}, ema=None,
    )
    opt = NaturalGradient(model, loss_fn, config, lr=lr)
    # the expected first step, from the same batch, through the public API
    F = curvlib.curvature("ggn", model, loss_fn, (X, y))
    expected = -lr * (curvlib.damped_inverse(curvlib.approximate(F, "ekfac"), "tikhonov", value=lam) @ F.gradient_vector())
    before = ref.current_vector(F, model)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step(batch=(X, y))
        losses.append(loss.item())
        if len(losses) == 1:
            assert_close(ref.current_vector(F, model) - before, expected)
    assert opt.preconditioner.resolved.approximator.kind == "ekfac"
    assert opt.preconditioner.num_refreshes == 5
    assert losses[-1] < losses[0], losses
    state = opt.state_dict()  # a checkpoint holds the EKFAC fits
    assert state is not None


@pytest.mark.parametrize("damping", [{"kind": "heuristic", "value": 1e-2},
                                     {"kind": "levenberg_marquardt", "value": 1e-2, "inner": "heuristic"}])
def test_ekfac_with_the_pi_split_is_refused_when_the_optimizer_is_built(damping):
    """EKFAC declares its blocks (``EKFACApproximator.blocks``: shift-solvable, no Kronecker
    factors), so ``NaturalGradient`` refuses the π-split before any data is seen, naming both
    kinds with their distributions; ``tikhonov`` builds and steps."""
    from curvlib.errors import ConfigError
    from curvlib.linalg import KroneckerFactored, ShiftSolvable
    from curvlib.optim import NaturalGradient
    from curvlib_ekfac import EKFACApproximator, EKFACBlock

    declared = EKFACApproximator().declared_blocks()
    assert declared.capabilities == (ShiftSolvable,) and declared.terms is None
    assert issubclass(EKFACBlock, ShiftSolvable) and not issubclass(EKFACBlock, KroneckerFactored)
    model, loss_fn, X, y = _problem("mlp", m=8)
    with pytest.raises(ConfigError) as info:
        NaturalGradient(model, loss_fn, {"approximator": "ekfac", "damping": damping}, lr=0.1)
    text = str(info.value)
    assert text.startswith("incompatible kinds:"), text
    assert "approximator kind 'ekfac' (distribution 'curvlib-ekfac'" in text, text
    assert f"damping kind {damping['kind']!r} (distribution 'curvlib'" in text, text
    assert "ShiftSolvable" in text, text

    xfail_without_plugin_block_serialization()
    opt = NaturalGradient(model, loss_fn, {"approximator": "ekfac", "damping": {"kind": "tikhonov", "value": 1e-2}},
                          lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step(batch=(X, y))
        losses.append(loss.item())
    assert opt.preconditioner.num_refreshes == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses


def test_bench_runs_ekfac_by_name(tmp_path, capsys):
    """``curvlib bench --methods ekfac``, with Tikhonov damping (the π-split needs Kronecker factors)."""
    from curvlib.bench.methods import available_methods, resolve_method
    from curvlib.cli import main

    registry = load_registry()
    assert "ekfac" in available_methods(registry)
    method = resolve_method("ekfac", registry)
    assert method.approximator == "ekfac"
    assert resolve_method("ekfac_tikhonov", registry).damping_kind == "tikhonov"
    xfail_without_plugin_block_serialization()
    out = tmp_path / "res"
    # the registration's default_damping="tikhonov" metadata; a bench that ignores it needs the flag
    damping = [] if method.damping_kind == "tikhonov" else ["--damping-kind", "tikhonov"]
    rc = main(["bench", "--problem", "digits_autoencoder", "--small", "--threads", "1", "--warmup-steps", "0",
               "--progress", "none", "--no-plots", "--methods", "sgd", "ekfac", *damping,
               "--steps", "4", "--update-every", "2", "--invert-every", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "runs" / "digits_autoencoder__ekfac.json").read_text())
    assert run["status"] == "ok" and len(run["train_loss"]) == 4
    assert run["preconditioner_config"]["approximator"]["kind"] == "ekfac"
    assert run["preconditioner_config"]["damping"]["kind"] == "tikhonov"
    assert all(x == x for x in run["train_loss"])  # finite (not NaN)
