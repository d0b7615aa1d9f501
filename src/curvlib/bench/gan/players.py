"""The two players of ``mnist_gan`` and the optimizer settings that pit them against each other.

A DCGAN-style pair for 28×28 digits (thesis §5.1.3, Fig. 5.2, scaled to 2 CPU cores):

- generator: z ``[B, 64]`` → [64, 1, 1] → ConvTranspose2d(64 → 64, 3) → BatchNorm2d → ReLU →
  [64, 3, 3] → ConvTranspose2d(64 → 64, 3, stride 2) → BatchNorm2d → ReLU → [64, 7, 7] →
  ConvTranspose2d(64 → 32, 4, stride 2, pad 1) → BatchNorm2d → ReLU → [32, 14, 14] →
  ConvTranspose2d(32 → 1, 4, stride 2, pad 1) → sigmoid → ``[B, 784]`` in [0, 1];
- critic: ``[B, 784]`` → [1, 28, 28] → Conv2d(1 → 32, 4, stride 2, pad 1) → LeakyReLU(0.2) →
  Conv2d(32 → 64, 4, stride 2, pad 1) → LeakyReLU(0.2) → Conv2d(64 → 128, 3, stride 2, pad 1) →
  LeakyReLU(0.2) → [128, 4, 4] → Linear(2048 → 1).

Every layer's Kronecker factors stay ≤ 2049 × 2049: a transposed convolution's input-side
factor is (c_in·k_h·k_w + 1)², so the usual first layers — Linear(64 → 128·7·7), or a 7 × 7
ConvTranspose2d from 1 × 1 — would give the generator a 6272- or 3137-wide factor, whose
products and inversions would dominate every KFAC step on a CPU.

The critic has no batch normalization, unlike the thesis's: a gradient penalty is a per-sample
constraint (‖∇_x D(x)‖ = 1 at each interpolate), which batch statistics couple across the
batch — Gulrajani et al. (WGAN-GP) drop it from the critic for that reason — and each
sample's empirical-Fisher term needs D(x_b) to depend on x_b alone.

The objectives (Wasserstein loss, thesis (5.28)) as :class:`curvlib.Objective` per-sample terms:

- critic, on the batch of the m fakes followed by the m reals with signs s = (+1…, −1…):
  ℓ_b = 2 s_b D(x_b), whose mean over the 2m samples is mean D(fake) − mean D(real); the
  gradient penalty 10·E(‖∇D(x̂)‖ − 1)² is added to the loss on its own forward pass, so it is
  in the gradient and not in the curvature statistics (docs/gan.md);
- generator: ℓ_b = −D(G(z_b)).

Each player's optimizer is :class:`PlayerSpec`: ``sgd`` (SGDA's plain step), ``adam``, or
``kfac`` (:class:`curvlib.NaturalGradient`, empirical Fisher of its own objective, KFAC,
heuristic damping, KL clipping) — so the thesis's KFAC1/2/3 are three pairs of specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlib.curvatures.objective import Objective
from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient

__all__ = ["LATENT", "METHODS", "PlayerSpec", "critic_objective", "generator_objective", "make_critic",
           "make_generator", "make_optimizer"]

LATENT = 64


def make_generator(latent: int = LATENT, width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (latent, 1, 1)),
        nn.ConvTranspose2d(latent, 2 * width, 3), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, 2 * width, 3, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1), nn.Sigmoid(), nn.Flatten(),
    )


def make_critic(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * width * 4 * 4, 1),
    )


def critic_objective() -> Objective:
    """ℓ_b = 2 s_b D(x_b) (module docstring): the critic's Wasserstein loss as per-sample terms."""
    return Objective(lambda out, sign: 2 * sign * out.squeeze(1), name="critic_wasserstein")


def generator_objective(critic: nn.Module) -> Objective:
    """ℓ_b = −D(G(z_b)): the generator's Wasserstein loss, through the critic."""
    return Objective(lambda images, _: -critic(images).squeeze(1), name="generator_wasserstein")


@dataclass(frozen=True)
class PlayerSpec:
    """One player's optimizer: ``kind`` ``"sgd"``, ``"adam"`` or ``"kfac"`` and its settings."""

    kind: str
    lr: float
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam", "kfac"):
            raise ConfigError(f"player optimizer: expected 'sgd', 'adam' or 'kfac', got {self.kind!r}")

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}(lr={self.lr:g}{', ' + extra if extra else ''})"


#: Adam with the betas of WGAN-GP (Gulrajani et al.); lr from {2e-4, 5e-4, 1e-3, 2e-3} and
#: SGDA's from {5e-3, 2e-2, 5e-2} by the FID after 8 epochs (seed 0)
ADAM = PlayerSpec("adam", 1e-3, {"betas": (0.5, 0.9)})
SGD = PlayerSpec("sgd", 2e-2)
#: KFAC for either player, chosen on the bundled MNIST by a reduced grid (seed 0, 4 epochs, the
#: opponent on Adam): for each player lr ∈ {1e-3, 3e-3, 1e-2, 0.1, 0.3, 1} × λ ∈ {1e-3, 1e-2,
#: 1e-1} × KL clip c ∈ {none, 1e-2, 1e-1}, 6 points each (docs/gan.md); lr 0.1, λ 1e-3,
#: c = 0.1 was best for both
KFAC = PlayerSpec("kfac", 1e-1, {"damping": 1e-3, "kl_clip": 1e-1, "update_every": 5, "invert_every": 20})

#: the thesis's five settings (§5.3.2): (generator, critic)
METHODS: dict[str, tuple[PlayerSpec, PlayerSpec]] = {
    "sgda": (SGD, SGD),
    "adam": (ADAM, ADAM),
    "kfac1": (KFAC, ADAM),
    "kfac2": (KFAC, KFAC),
    "kfac3": (ADAM, KFAC),
}


def make_optimizer(spec: PlayerSpec, model: nn.Module, objective: Objective, *, seed: int) -> torch.optim.Optimizer:
    """The player's optimizer; ``kfac`` preconditions with the empirical Fisher of ``objective``
    over this player's own layers only."""
    o = dict(spec.options)
    if spec.kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=float(o.get("momentum", 0.0)))
    if spec.kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, betas=tuple(o.get("betas", (0.9, 0.999))))
    config = {"curvature": "empirical_fisher", "approximator": "kfac",
              "damping": {"kind": "heuristic", "value": float(o.get("damping", 1e-2))},
              "update_every": int(o.get("update_every", 1)), "invert_every": int(o.get("invert_every", 1)),
              "ema": float(o.get("ema", 0.95))}
    return NaturalGradient(model, objective, config, lr=spec.lr, kl_clip=o.get("kl_clip"),
                           momentum=float(o.get("momentum", 0.0)), fallback="adam",
                           generator=torch.Generator().manual_seed(seed))
