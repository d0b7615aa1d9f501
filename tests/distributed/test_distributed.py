"""curvlib under torch.distributed: two gloo processes on CPU (DESIGN.md §9, docs/distributed.md).

The replicas must never diverge: after 10 steps the parameters are bit-identical on both
ranks, equal (float64) to one process training on the concatenated batches, and a resume
from a checkpoint saved on rank 0 continues bit-identically on both ranks.  For the Monte
Carlo Fisher (each rank draws its own targets) rank identity, resume and progress are asserted.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from curvlib import NaturalGradient, PreconditionerConfig
from curvlib.distributed import owners, resolve_process_group
from curvlib.errors import ConfigError
from curvlib.testing.distributed import fit_run, hostile_run, make_model, replica_run, spawn
from curvlib.precond.preconditioner import _first_difference

H = {"kind": "heuristic", "value": 1e-2}
TIGHT = {"power_tol": 1e-13, "max_iters": 500}  # the SVD fits converged, so that shards and one process agree

CASES = [
    {"model": model, "config": {"curvature": curvature, "approximator": approximator, "damping": H,
                                "coarse_space": coarse}}
    for model in ("mlp", "cnn")
    for curvature in ("ggn", "empirical_fisher")
    for approximator, coarse in (("kfac", None), ({"kind": "kpsvd", **TIGHT}, None), ("kfac", "residual"))
] + [  # the Monte Carlo Fisher: each rank draws its own targets, so no one-process reference
    {"model": "mlp", "config": {"curvature": "fisher", "damping": H}, "reference": False},
    {"model": "cnn", "config": {"curvature": {"kind": "fisher", "mc_samples": 2}, "approximator": "kpsvd",
                                "damping": H, "coarse_space": "residual"}, "reference": False},
    {"model": "cnn", "config": {"curvature": "fisher", "damping": H}, "reference": False, "capture": True},
    # a composed preconditioner: its own approximator, damping and schedule for the convolution,
    # the coarse space over the linear layer only
    {"model": "cnn", "config": {"curvature": "ggn", "damping": H, "coarse_space": "residual", "rules": [
        {"types": ["Conv2d"], "approximator": {"kind": "kpsvd", **TIGHT}, "damping": {"kind": "tikhonov", "value": 1e-2},
         "update_every": 2, "invert_every": 2, "coarse": False}]}},
]
#: the inversion modes, the other SVD kinds and dampings (Tikhonov's exact two-term solve: PCG
#: stops at its tolerance, which rounding moves), a schedule, a model without DDP (slow marker)
EXTRA = [
    {"model": "mlp", "config": {"curvature": "ggn", "damping": H, "distributed_inversion": "direction"}},
    {"model": "cnn", "config": {"curvature": "ggn", "damping": {"kind": "tikhonov", "value": 1e-2},
                                "distributed_inversion": "replicated"}},
    {"model": "mlp", "config": {"curvature": "ggn", "approximator": {"kind": "kfac_corrected", **TIGHT},
                                "damping": {"kind": "tikhonov", "value": 1e-2, "method": "exact"}, "update_every": 2,
                                "invert_every": 4}, "kl_clip": 1e-2},
    {"model": "mlp", "config": {"curvature": "ggn", "approximator": {"kind": "lanczos", **TIGHT},
                                "damping": {"kind": "levenberg_marquardt", "value": 1e-2}}},
    {"model": "mlp", "config": {"curvature": "empirical_fisher", "approximator": {"kind": "deflation", **TIGHT},
                                "damping": {"kind": "tikhonov", "value": 1e-2, "method": "exact"}}, "kl_clip": 1e-2,
     # the first layer's σ₂ and σ₃ are close (151 power iterations to a relative residual of 1e-13):
     # the converged vectors are good to residual/gap, and the two runs' rounding moves them by ~1e-12
     "atol": 1e-10},
    {"model": "mlp", "config": {"curvature": "ggn", "damping": H}, "ddp": False},
    {"model": "mlp", "config": {"curvature": "ggn", "damping": H, "coarse_space": "nicolaides",
                                "coarse_mode": "additive"}, "capture": True},
    {"model": "mlp", "config": {"curvature": "ggn", "damping": H, "distributed_inversion": "direction",
                                "rules": [{"match": "2", "damping": {"kind": "tikhonov", "value": 1e-2},
                                           "update_every": 2, "invert_every": 4}]}},
]


def _name(case: dict) -> str:
    cfg = case["config"]
    parts = [case["model"], str(cfg["curvature"] if isinstance(cfg["curvature"], str) else cfg["curvature"]["kind"]),
             str(cfg.get("approximator", "kfac") if isinstance(cfg.get("approximator", "kfac"), str)
                 else cfg["approximator"]["kind"])]
    parts += [f"+{cfg['coarse_space']}"] if cfg.get("coarse_space") else []
    parts += [cfg.get("distributed_inversion", "")] + ["no-ddp"] * (not case.get("ddp", True))
    parts += ["capture"] * bool(case.get("capture")) + [cfg["damping"]["kind"]] + ["rules"] * bool(cfg.get("rules"))
    return "-".join(p for p in parts if p)


def _run(cases: list[dict]) -> list[tuple[dict, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        rank0, rank1 = spawn(replica_run, 2, cases, tmp)
    return list(zip(rank0, rank1))


@pytest.fixture(scope="module")
def runs() -> list[tuple[dict, dict]]:
    return _run(CASES)


@pytest.fixture(scope="module")
def extra_runs() -> list[tuple[dict, dict]]:
    return _run(EXTRA)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("c", range(len(CASES)), ids=[_name(c) for c in CASES])
def test_replicas_never_diverge_and_match_one_process(runs, c):
    _check(CASES[c], *runs[c])


@pytest.mark.slow
@pytest.mark.parametrize("c", range(len(EXTRA)), ids=[_name(c) for c in EXTRA])
def test_more_configurations_never_diverge(extra_runs, c):
    _check(EXTRA[c], *extra_runs[c])


def _check(case: dict, r0: dict, r1: dict) -> None:
    assert _equal(r0["final"], r1["final"]), "the ranks' parameters differ after 10 steps"
    assert _equal(r0["final"], r0["resumed"]) and _equal(r1["final"], r1["resumed"]), \
        "a resume from rank 0's checkpoint does not continue identically"
    start = list(make_model(case["model"]).parameters())
    assert not _equal(r0["final"], [p.detach() for p in start]), "nothing was trained"
    if "reference" in r0:  # one process on the concatenated batches, from the same start
        for p, q in zip(r0["final"], r0["reference"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=case.get("atol", 1e-12))
    assert r0["loss_after"] < 0.9 * r0["loss_before"], "training made no progress"
    comm = r0["comm"]
    assert comm["statistics"] > 0 and comm["control"] > 0
    mode = case["config"].get("distributed_inversion", "broadcast")
    assert (comm["inverses"] > 0) == (mode != "replicated")
    assert (comm["directions"] > 0) == (mode == "direction" or not case.get("ddp", True))


def test_unequal_shards_are_weighted_by_their_samples():
    """Shards of 5 and 11 samples: the factors and the KPSVD fit equal those of the 16 together."""
    kinds = ["kfac", {"kind": "kpsvd", **TIGHT, "solver_space": "direct"}]
    r0, r1 = spawn(fit_run, 2, [5, 11], kinds)
    for name in ("kfac", "kpsvd"):
        for shard0, shard1, whole in zip(r0["shard"][name], r1["shard"][name], r0["whole"][name]):
            for (A, G), (A1, G1), (Aw, Gw) in zip(shard0, shard1, whole):
                assert torch.equal(A, A1) and torch.equal(G, G1)
                torch.testing.assert_close(A, Aw, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(G, Gw, rtol=1e-12, atol=1e-14)


HOSTILE = {
    "config": "DistributedError: the ranks of the process group disagree .* rank 1 has 'configuration damping = "
              r'\{"kind": "heuristic", "value": 0.02\}\' where rank 0 has .*0.01',
    "layers": r"DistributedError: the ranks of the process group disagree .* rank 1 has \"parameter '0.weight' "
              r"\[17, 8\]\" where rank 0 has \"parameter '0.weight' \[16, 8\]\"",
    "exact_block": "ConfigError: approximator 'exact_block' does not declare that it fits sharded statistics",
    "block_natural_gradient": "ConfigError: preconditioner='block_natural_gradient' .* use preconditioner='kronecker'",
    "destroyed": "DistributedError: the model is wrapped in DistributedDataParallel but no torch.distributed "
                 "process group is initialised",  # last: it ends the group
}


@pytest.fixture(scope="module")
def hostile() -> list[list]:
    return spawn(hostile_run, 2, ["checkpoint", *HOSTILE])


@pytest.mark.parametrize("what", list(HOSTILE))
def test_misuse_gives_the_same_clear_error_on_every_rank(hostile, what):
    import re

    k = 1 + list(HOSTILE).index(what)
    errors = [hostile[0][k], hostile[1][k]]
    assert errors[0] == errors[1]
    assert re.match(HOSTILE[what], errors[0]), errors[0]


def test_a_checkpoint_of_two_processes_does_not_load_into_one(hostile):
    state = hostile[0][0]
    opt = NaturalGradient(make_model("mlp"), nn.CrossEntropyLoss(), {"curvature": "ggn", "damping": H}, lr=0.1)
    with pytest.raises(ConfigError, match="saved by 2 processes, this preconditioner runs in 1"):
        opt.load_state_dict(state)


# --------------------------------------------------------------------------- without processes
def test_owners_balance_the_inversion_cost():
    costs = [1000.0, 10.0, 500.0, 400.0, 90.0]
    got = owners(costs, 2)
    load = [sum(c for c, r in zip(costs, got) if r == k) for k in range(2)]
    assert got[0] != got[2] and max(load) == 1000.0  # the largest alone; the rest (1000) together
    assert owners(costs, 2) == got and owners(costs, 1) == [0] * 5 and sorted(set(owners(costs, 8))) == [0, 1, 2, 3, 4]


def test_one_process_without_a_group():
    model = make_model("mlp")
    assert resolve_process_group(model) is None and resolve_process_group(model, None) is None
    with pytest.raises(ConfigError, match="process_group: expected 'auto', None or a torch.distributed ProcessGroup"):
        resolve_process_group(model, "world")
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"curvature": "ggn"}, lr=0.1)
    assert opt.preconditioner.shard is None and opt.preconditioner.state_dict()["world_size"] == 1


def test_the_direction_mode_refuses_a_coarse_space():
    with pytest.raises(ConfigError, match="distributed_inversion='direction' keeps each layer's inverse on one rank"):
        PreconditionerConfig(coarse_space="residual", distributed_inversion="direction")


def test_a_state_saved_before_distributed_training_still_loads():
    X, y = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    model, loss_fn = make_model("mlp"), nn.CrossEntropyLoss()
    opt = NaturalGradient(model, loss_fn, {"curvature": "ggn"}, lr=0.1)
    loss_fn(model(X), y).backward()
    opt.step(batch=(X, y))
    state = opt.preconditioner.state_dict()
    group, = state["groups"]  # version 3 had the one group's entries at the top level
    v3 = {k: v for k, v in state.items() if k != "groups"} | {"version": 3, "inverted_damping": group["inverted_damping"]}
    v3 |= {k: group[k] for k in ("approximation", "inverted_approximation", "inverted_is_latest")}
    old = {k: v for k, v in v3.items() if k not in ("world_size", "stream_seed")} | {"version": 2}
    opt.preconditioner.load_state_dict(old)
    assert _first_difference(opt.preconditioner.state_dict(), state) is None


def test_the_documented_script_runs_under_torchrun(tmp_path):
    """docs/distributed.md's training script, as written, on two processes (torchrun --standalone)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
    script, = re.findall(r"```py\n(.*?)```", page.read_text(), flags=re.S)
    path = tmp_path / "train_ddp.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torch 2.13's gloo workers under torchrun sometimes abort at interpreter exit, after the
    # script has finished ("terminate called without an active exception"): measured with a
    # plain DDP + torch.optim.SGD script, no curvlib, in 2 of 12 runs.  Such a run still did
    # all its work (the replicas were compared before the exit); a run is repeated only then.
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert "identical replicas" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_bench_nproc_reports_times_bytes_and_identical_replicas(tmp_path, capsys):
    from curvlib.cli import main

    out = tmp_path / "run"
    code = main(["bench", "--nproc", "2", "--small", "--steps", "4", "--batch-size", "16", "--methods", "sgd", "kfac",
                 "--update-every", "2", "--invert-every", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert {p.name for p in out.iterdir()} == {"distributed.json", "distributed.md", "distributed.png"}
    import json

    summary = json.loads((out / "distributed.json").read_text())["summary"]["methods"]
    assert set(summary) == {"sgd", "kfac"} and all(m["identical_replicas"] for m in summary.values())
    kfac = summary["kfac"]
    assert set(kfac["kinds"]) == {"refresh+invert", "plain"} and kfac["bytes_per_refresh"] > 0
    assert kfac["ddp_gradient_bytes_per_step"] == summary["sgd"]["ddp_gradient_bytes_per_step"] > 0
    assert "| kfac | 2/2 |" in printed and "identical" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--nproc", "1"], "--nproc: expected at least 2 processes, got 1"),
    (["--nproc", "2", "--lr", "0.1"], "it does not take --lr"),
    (["--nproc", "2", "--problem", "digits_mlp", "mnist_cnn"], "--nproc takes one --problem, got 2"),
    (["--nproc", "2", "--methods", "nope"], "nope"),
])
def test_bench_nproc_refuses_what_it_cannot_do(argv, message, capsys):
    from curvlib.cli import main

    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
