"""A third party's optimizer (the ``optimizers`` plugin family) is a ``curvlib bench``
method by name (curvlib.bench.methods/job)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import Field

from curvlib.bench.job import run_bench
from curvlib.bench.methods import available_methods, resolve_method
from curvlib.bench.settings import BenchConfig
from curvlib.config import StrictModel
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import hookimpl
from curvlib.plugins.registry import Registry



class ThrowawayOptions(StrictModel):
    momentum: float = Field(0.5, ge=0, lt=1)


class ThrowawaySGD(torch.optim.SGD):
    """torch.optim.SGD whose step records the batches it is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = 0
        self.steps = 0

    def step(self, closure=None, *, batch=None):
        self.steps += 1
        self.batches += batch is not None
        return super().step(closure)


BUILT: list[ThrowawaySGD] = []


class ThrowawayBuilder:
    """test-only SGD"""

    def __init__(self, options: ThrowawayOptions) -> None:
        self.options = options

    def build(self, model, loss_fn, *, lr, generator, registry):
        assert isinstance(generator, torch.Generator) and registry is not None
        opt = ThrowawaySGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=self.options.momentum)
        BUILT.append(opt)
        return opt


class ThrowawayPlugin:
    @hookimpl
    def curvlib_register_optimizers(self, registry):
        registry.add("throwaway_sgd", ThrowawayBuilder, options=ThrowawayOptions, needs_batch=True,
                     default_lr=0.05, description="test-only SGD")
        registry.add("throwaway_plain", ThrowawayBuilder, options=ThrowawayOptions)


@pytest.fixture
def reg():
    r = Registry()
    r.register(ThrowawayPlugin(), name="throwaway_opt", distribution="throwaway-dist")
    return r


def test_an_optimizer_kind_resolves_with_its_metadata(reg):
    assert [s.kind for s in reg.optimizers] == ["throwaway_plain", "throwaway_sgd"]
    names = available_methods(reg)
    assert names[:2] == ["sgd", "adam"] and {"throwaway_sgd", "throwaway_plain"} <= set(names)
    method = resolve_method("throwaway_sgd", reg)
    assert (method.family, method.optimizer, method.needs_batch) == ("optimizer", "throwaway_sgd", True)
    assert method.default_hyperparameters().lr == 0.05
    assert method.default_hyperparameters(lr=0.2).lr == 0.2
    plain = resolve_method("throwaway_plain", reg)
    assert not plain.needs_batch and plain.default_hyperparameters().lr > 0
    with pytest.raises(UnknownKindError, match="optimizers: throwaway_plain, throwaway_sgd"):
        resolve_method("nope", reg)
    with pytest.raises(UnknownKindError, match="throwaway_sgd"):
        resolve_method("nope", reg)


@pytest.mark.parametrize("name, needs_batch", [("throwaway_sgd", True), ("throwaway_plain", False)])
def test_an_optimizer_kind_is_selectable_in_the_runner_and_trains(reg, tmp_path, name, needs_batch):
    BUILT.clear()
    config = BenchConfig.from_mapping({
        "problems": ["digits_autoencoder"], "small": True,
        "methods": ["sgd", {"name": name, "optimizer_options": {"momentum": 0.9}}],
        "steps": 5, "progress": "none", "plots": False, "warmup_steps": 0,
    })
    result = run_bench(config, registry=reg, out=tmp_path)
    records = {r.method: r for r in result.records}
    assert set(records) == {"sgd", name}
    record = records[name]
    assert record.status == "ok" and record.steps_done == 5
    losses = [x for x in record.train_loss if x is not None]
    assert losses and all(math.isfinite(x) for x in losses)
    assert record.optimizer.endswith("ThrowawaySGD") and record.preconditioner_config is None
    assert record.hyperparameters["lr"] == (0.05 if needs_batch else record.hyperparameters["lr"])
    (opt,) = BUILT
    assert opt.steps == 5 and opt.batches == (5 if needs_batch else 0)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert json.loads((tmp_path / "runs" / f"digits_autoencoder__{name}.json").read_text())["method"] == name


def test_invalid_optimizer_options_are_a_config_error(reg, tmp_path):
    config = BenchConfig.from_mapping({
        "problems": ["digits_autoencoder"], "small": True,
        "methods": [{"name": "throwaway_sgd", "optimizer_options": {"momentum": 2.0}}],
        "steps": 2, "progress": "none", "plots": False, "warmup_steps": 0,
    })
    with pytest.raises(ConfigError, match="throwaway_sgd"):
        run_bench(config, registry=reg, out=tmp_path)
