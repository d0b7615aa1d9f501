"""``background_inversion``: the inversion of step k runs in a worker thread and is installed at
the next step — the directions equal those of the in-place schedule with every inversion one
step later, bit for bit; checkpoints, errors, rules and the optimizer keep their contracts.

The reference is a second preconditioner with the same configuration and
``background_inversion=False``, fed the same batches: its inverse after the update of step k is
the one the background preconditioner must apply from step k + 1 on."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from torch import nn

from curvlib.damping import HeuristicDamping
from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient
from curvlib.precond import PreconditionerConfig, build_preconditioner

DT = torch.float64


def _mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def _pair(registry, **cfg):
    """The same model and configuration, in place and in the background."""
    model = _mlp()
    out = []
    for bg in (False, True):
        config = {"update_every": 1, "invert_every": 3, "damping": {"kind": "heuristic", "value": 0.05}, **cfg,
                  "background_inversion": bg}
        out.append(build_preconditioner(model, nn.CrossEntropyLoss(), config, registry=registry,
                                        generator=torch.Generator().manual_seed(5)))
    return out


def _direction(pre, seed=9):
    g = torch.Generator().manual_seed(seed)
    return pre.apply(torch.randn(pre.p, generator=g, dtype=DT))


@pytest.mark.parametrize("cfg", [
    {},
    {"update_every": 2, "invert_every": 4},
    {"damping": {"kind": "tikhonov", "value": 0.05}, "approximator": {"kind": "kpsvd"}},
    {"rules": [{"match": "0", "invert_every": 6, "update_every": 2}]},
])
def test_directions_are_the_in_place_ones_with_each_inversion_one_step_later(registry, cfg):
    sync, bg = _pair(registry, **cfg)
    history = {}
    for k, batch in enumerate(_batches(13)):
        info_sync = sync.update(batch)
        info_bg = bg.update(batch)
        assert info_bg.inverted == info_sync.inverted
        # the first inversion has nothing to fall back on: made in place
        assert info_bg.background == (info_sync.inverted and k > 0)
        history[k] = _direction(sync)
        expected = history[k - 1] if info_bg.background else history[k]
        assert torch.equal(_direction(bg), expected), k
        if info_bg.background:
            assert bg.last_inversion_step < k and bg.wait_inversion()
            assert bg.last_inversion_step == k and bg.num_inversions == sync.num_inversions
            assert torch.equal(_direction(bg), history[k])  # installed: now the step-k inverse
            assert bg.last_inversion.condition_numbers == sync.last_inversion.condition_numbers
    assert not bg.wait_inversion()  # nothing running


def test_the_optimizer_applies_the_new_inverse_from_the_next_step(registry):
    """NaturalGradient waits at the start of each step: the direction of step k + 1 already uses
    the inverse started at step k, whether or not step k + 1 refreshes."""
    for T1, T2 in ((1, 2), (2, 4)):
        model = _mlp()
        loss_fn = nn.CrossEntropyLoss()
        opt = NaturalGradient(model, loss_fn, {"update_every": T1, "invert_every": T2, "background_inversion": True},
                              lr=1e-2, registry=registry, generator=torch.Generator().manual_seed(2))
        for k, (X, y) in enumerate(_batches(2 * T2 + 1)):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step(batch=(X, y))
            pre = opt.preconditioner
            started = k > 0 and k % T2 == 0
            assert opt.last_update.background == started
            # the inverse of the latest inversion step before this one is the one in use
            assert pre.last_inversion_step == (k - T2 if started else k - k % T2), (T1, T2, k)


def test_a_checkpoint_taken_while_an_inversion_runs_resumes_bit_identically(registry):
    _, bg = _pair(registry)
    batches = _batches(9)
    for batch in batches[:4]:  # the update of step 3 starts an inversion
        bg.update(batch)
    assert bg._background is not None
    state = copy.deepcopy(bg.state_dict())  # waits for it and installs it
    assert bg._background is None and bg.last_inversion_step == 3
    _, resumed = _pair(registry)
    resumed.load_state_dict(state)
    for batch in batches[4:]:
        for pre in (bg, resumed):
            pre.update(batch)
        bg_state, resumed_state = bg.state_dict(), resumed.state_dict()
        assert torch.equal(_direction(bg), _direction(resumed))
    assert bg_state["num_inversions"] == resumed_state["num_inversions"] == 3


def test_an_adapting_damping_is_frozen_for_the_worker_and_the_live_one_is_kept(registry):
    sync, bg = _pair(registry, damping={"kind": "levenberg_marquardt", "value": 0.05})
    batches = _batches(4)
    for batch in batches:
        sync.update(batch)
        bg.update(batch)
    assert bg._background is not None
    live = bg.damping
    live.update(0.1)  # the optimizer adapts λ while the inversion runs: the worker saw the old λ
    bg.wait_inversion()
    assert bg.inverse.damping is live and all(d is live for d in bg.inverse.block_dampings)
    assert bg._groups[0].inverted_damping_state == sync._groups[0].inverted_damping_state
    assert torch.equal(_direction(bg), _direction(sync))


def test_an_error_of_the_worker_is_raised_at_the_next_step_and_the_old_inverse_kept(registry, monkeypatch):
    _, bg = _pair(registry)
    batches = _batches(5)
    for batch in batches[:3]:
        bg.update(batch)
    before = _direction(bg)
    threads = []

    def broken(self, blocks, previous):
        threads.append(threading.current_thread().name)
        raise ConfigError("a damping plugin failed")

    monkeypatch.setattr(HeuristicDamping, "invert_many", broken)
    bg.update(batches[3])  # starts the inversion (it fails in the worker)
    with pytest.raises(ConfigError, match="a damping plugin failed"):
        bg.update(batches[4])
    assert threads and threads[0].startswith("curvlib-inversion")
    assert bg.last_inversion_step == 0 and torch.equal(_direction(bg), before)
    monkeypatch.undo()
    bg.update(batches[4])  # goes on: the next inversion is due at step 6
    assert bg.step == 5


def test_a_rolled_back_update_drops_its_inversion(registry):
    _, bg = _pair(registry)
    batches = _batches(4)
    for batch in batches[:3]:
        bg.update(batch)
    with pytest.raises(RuntimeError, match="undo"):
        with bg.transaction():
            bg.update(batches[3])
            assert bg._background is not None
            raise RuntimeError("undo")
    assert bg._background is None and bg.step == 3 and not bg.wait_inversion()


def test_background_inversion_is_refused_where_it_cannot_apply(registry):
    for cfg in ({"coarse_space": {"kind": "nicolaides"}}, {"preconditioner": "block_natural_gradient"}):
        with pytest.raises(Exception, match="background_inversion"):
            PreconditionerConfig.coerce({**cfg, "background_inversion": True})
    with pytest.raises(Exception, match="background_inversion"):
        PreconditionerConfig.coerce({"background_inversion": "yes"})


def test_training_with_background_inversion_descends(registry):
    """The bench's small problem shape: both schedules train, and end close to each other."""
    results = {}
    for bg in (False, True):
        model = _mlp(3)
        loss_fn = nn.CrossEntropyLoss()
        opt = NaturalGradient(model, loss_fn, {"update_every": 1, "invert_every": 5, "background_inversion": bg},
                              lr=0.3, kl_clip=1e-2, registry=registry, generator=torch.Generator().manual_seed(2))
        X, y = _batches(1, seed=4)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = float(loss_fn(model(X), y))
            for _ in range(30):
                opt.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                opt.step(batch=(X, y))
        results[bg] = (start, float(loss_fn(model(X), y)))
    for start, end in results.values():
        assert end < 0.3 * start, results
    assert abs(results[True][1] - results[False][1]) < 0.2 * results[False][0], results


@pytest.mark.cuda
def test_on_cuda_the_inversion_runs_on_a_side_stream_and_equals_the_in_place_one(registry):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _mlp().cuda()
    pres = [build_preconditioner(model, nn.CrossEntropyLoss(), {"update_every": 1, "invert_every": 2,
                                                               "background_inversion": bg},
                                 registry=registry, generator=torch.Generator(device="cuda").manual_seed(5))
            for bg in (False, True)]
    streams = []
    original = HeuristicDamping.invert_many

    def spy(self, blocks, previous):
        streams.append(torch.cuda.current_stream())
        return original(self, blocks, previous)

    HeuristicDamping.invert_many = spy
    try:
        for k, (X, y) in enumerate(_batches(5)):
            for pre in pres:
                pre.update((X.cuda(), y.cuda()))
            if pres[1]._background is not None:
                pres[1].wait_inversion()
                g = torch.randn(pres[0].p, dtype=DT, device="cuda")
                d_sync, d_bg = pres[0].apply(g), pres[1].apply(g)
                assert d_bg.device.type == "cuda"
                assert torch.allclose(d_sync, d_bg, rtol=1e-12, atol=0), k
    finally:
        HeuristicDamping.invert_many = original
    side = [s for s in streams if s != torch.cuda.default_stream()]
    assert side and all(s == pres[1]._side_stream for s in side)


def test_a_process_that_exits_while_an_inversion_runs_exits_cleanly():
    """The worker is not a daemon: the interpreter waits for it (a thread killed inside a torch
    call at exit aborts the process: 'terminate called without an active exception')."""
    script = textwrap.dedent("""
        import torch
        from torch import nn
        from curvlib.precond import build_preconditioner
        model = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 300))
        pre = build_preconditioner(model, nn.MSELoss(), {"invert_every": 1, "background_inversion": True})
        for _ in range(2):
            X = torch.randn(64, 300)
            pre.update((X, X))
        assert pre._background is not None
        print("leaving")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "leaving" in done.stdout, done.stderr
    assert "terminate" not in done.stderr
