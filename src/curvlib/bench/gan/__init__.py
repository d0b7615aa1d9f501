"""The ``mnist_gan`` problem of ``curvlib bench``: WGAN-GP with SGDA, Adam and KFAC1/2/3
(thesis §5.3.2), judged by FID on MNIST-classifier features.

* :mod:`~curvlib.bench.gan.players` — the generator and critic, their objectives, the
  per-player optimizers and the five settings;
* :mod:`~curvlib.bench.gan.fid` — the feature classifier and the Fréchet distance;
* :mod:`~curvlib.bench.gan.run` — the training loop, the results folder and the plots.
"""

from curvlib.bench.gan.fid import FEATURES, FIDScorer, frechet_distance
from curvlib.bench.gan.players import METHODS, PlayerSpec
from curvlib.bench.gan.run import GanSpec, format_gan_summary, run_gan_bench

__all__ = ["FEATURES", "FIDScorer", "GanSpec", "METHODS", "PlayerSpec", "format_gan_summary", "frechet_distance",
           "run_gan_bench"]
