"""The ``curvlib`` command line.

* ``curvlib plugins list`` — every plugin family with its kinds and their distributions;
* ``curvlib bench`` — train methods on benchmark problems and report curves, plots and a
  summary table (docs/bench.md);
* ``curvlib explain CONFIG --model MODULE:FACTORY`` — which rule of a composed preconditioner
  configuration each layer of a model matches, and what it costs (docs/composition.md).

Exit codes: 0 success; 2 a usage or configuration problem (a bad option, config file,
method, problem or ``--out``; one line ``curvlib: error: ...`` on stderr, no traceback);
130 interrupted (Ctrl-C; ``curvlib bench`` keeps the finished runs and their summary).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvlib.bench import report
from curvlib.bench.job import BenchInterrupted, run_bench
from curvlib.bench.methods import available_methods, resolve_method
from curvlib.bench.progress import make_progress
from curvlib.bench.problems import PROBLEMS, default_methods_of
from curvlib.bench.settings import DEFAULT_METHODS, DEFAULT_PROBLEMS, PROTOCOLS, BenchConfig, load_config_file, with_protocol
from curvlib.errors import ConfigError, CurvlibError
from curvlib.plugins import load_registry

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "main"]

#: exit code of a usage or configuration error (argparse's own code for a bad option)
EXIT_USAGE = 2
#: exit code after Ctrl-C (128 + SIGINT, what shells report)
EXIT_INTERRUPTED = 130


def _plugins_list(args: argparse.Namespace) -> int:
    registry = load_registry(external=False if args.no_external else None)
    out = sys.stdout
    for family in registry.families():
        out.write(f"{family.name} ({len(family)})\n")
        if not len(family):
            out.write("  (none)\n")
        for spec in family:
            dist = f"{spec.distribution} {registry.distribution_version(spec.distribution)}"
            out.write(f"  {spec.kind:<22} {dist:<28} {spec.description}\n")
    if registry.failures:
        out.write(f"failed plugins ({len(registry.failures)})\n")
        for failure in registry.failures:
            out.write(f"  {failure}\n")
    return 0


# --------------------------------------------------------------------------- bench

_BENCH_SCALARS = {
    # option dest -> BenchConfig key
    "path": "path", "steps": "steps", "epochs": "epochs", "batch_size": "batch_size",
    "damping_kind": "damping_kind", "weight_decay": "weight_decay",
    "kl_clip": "kl_clip", "update_every": "update_every", "invert_every": "invert_every", "ema": "ema",
    "mc_samples": "mc_samples", "seed": "seed", "seeds": "seeds", "small": "small", "out": "out", "name": "name",
    "target_loss": "target_loss", "target_margin": "target_margin", "eval_every": "eval_every",
    "patience": "patience", "eval_train_limit": "eval_train_limit", "progress": "progress",
    "warmup_steps": "warmup_steps", "threads": "threads", "background_inversion": "background_inversion",
}


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _per_method(values: list[str] | None, option: str) -> tuple[float | None, dict[str, float]]:
    """``--lr 0.1`` (every method) and ``--lr kfac=0.3`` (one method), repeatable (also
    ``--damping`` and ``--momentum``)."""
    everyone: float | None = None
    per: dict[str, float] = {}
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            x = float(number)
        except ValueError:
            raise CurvlibError(f"{option} expects VALUE or METHOD=VALUE, got {value!r}") from None
        if sep:
            per[name.strip()] = x
        else:
            everyone = x
    return everyone, per


def _names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [n for v in values for n in v.replace(",", " ").split() if n]


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~curvlib.bench.settings.BenchConfig` of ``curvlib bench`` options:
    the ``--config`` file first, every option given on the command line on top."""
    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    protocol = getattr(args, "protocol", None)
    problems = _names(args.problems)
    if problems is not None:
        data["problems"] = problems
    for dest, key in _BENCH_SCALARS.items():
        value = getattr(args, dest)
        if value is not None:
            data[key] = value
    if args.steps is not None:
        data.pop("epochs", None)
    if args.epochs is not None:
        data.pop("steps", None)
    methods = _names(args.methods)
    if methods is not None:
        from_file = {}
        for entry in data.get("methods", []) or []:
            if isinstance(entry, dict) and "name" in entry:
                from_file[entry["name"]] = entry
        data["methods"] = [dict(from_file.get(n, {"name": n})) for n in methods]
    for option, key in (("--lr", "lr"), ("--damping", "damping"), ("--momentum", "momentum")):
        everyone, per = _per_method(getattr(args, key), option)
        if everyone is not None:
            data[key] = everyone
        if per:
            run = data.get("methods")
            if run is None:  # each problem's own list: the union, in order
                run = []
                for prob in data.get("problems") or DEFAULT_PROBLEMS:
                    own = default_methods_of(prob) or DEFAULT_METHODS
                    run += [n for n in own if n not in run]
            entries = [e if isinstance(e, dict) else {"name": e} for e in run]
            names = [e["name"] for e in entries]
            for name, x in per.items():
                if name not in names:
                    raise CurvlibError(f"{option} {name}={x:g}: {name!r} is not among the methods run "
                                       f"({', '.join(names)})")
                entries[names.index(name)] = {**entries[names.index(name)], key: x}
            data["methods"] = entries
    if args.grid or any(getattr(args, k) is not None for k in ("grid_lr", "grid_damping", "grid_steps", "grid_kl_clip",
                                                             "grid_cache", "grid_shard")):
        grid = data.get("grid")
        grid = {} if grid in (None, True, False) else dict(grid)
        if args.grid_lr is not None:
            grid["lr"] = args.grid_lr
        if args.grid_damping is not None:
            grid["damping"] = args.grid_damping
        if args.grid_steps is not None:
            grid["steps"] = args.grid_steps
        if args.grid_kl_clip is not None:
            grid["kl_clip"] = args.grid_kl_clip
        if args.grid_cache is not None:
            grid["cache"] = args.grid_cache
        if args.grid_shard is not None:
            grid["shard"] = args.grid_shard
        data["grid"] = grid
    if args.no_plots:
        data["plots"] = False
    if args.tensorboard is not None:
        data["tensorboard"] = args.tensorboard
    if protocol is not None:
        user_steps = "steps" in data
        data = with_protocol(protocol, data)
        if data.get("epochs") is not None and not user_steps:  # the user's run length wins over the protocol's
            data.pop("steps")
    return BenchConfig.from_mapping(data, where=f"curvlib bench{' --config ' + args.config if args.config else ''}")


def _list_methods(registry: Any) -> None:
    out = sys.stdout
    out.write("methods (also <approximator>_reduce for KFAC-reduce weight sharing, <approximator>_tikhonov and "
              "<approximator>+<coarse space>):\n")
    for name in _available(registry):
        out.write(f"  {name:<24} {resolve_method(name, registry).description}\n")


def _available(registry: Any) -> list[str]:
    return available_methods(registry)


def _list_problems() -> None:
    for name, builder in PROBLEMS.items():
        doc = (inspect.getdoc(builder) or "").split("\n")[0]
        sys.stdout.write(f"  {name:<24} {doc}\n")
    sys.stdout.write(f"  {'mnist_gan':<24} WGAN-GP (DCGAN generator, conv critic) on MNIST: sgda adam kfac1 kfac2 "
                     "kfac3, FID on MNIST-classifier features (docs/gan.md)\n")


def _print_summary(summary: dict[str, Any], progress_mode: str) -> None:
    use_rich = progress_mode == "rich" or (progress_mode == "auto" and sys.stdout.isatty())
    if use_rich:
        try:
            # rich is optional (the bench extra): without it the table is plain text
            from rich.console import Console
        except ImportError:
            use_rich = False
    console = Console() if use_rich else None
    if console is not None and console.width >= 110:  # narrower: rich would cut the numbers
        for table in report.rich_summary(summary):
            console.print(table)
    else:
        sys.stdout.write(report.format_summary(summary) + "\n")


def _bench(args: argparse.Namespace) -> int:
    registry = load_registry()
    if args.list_methods:
        _list_methods(registry)
        return 0
    if args.list_problems:
        _list_problems()
        return 0
    if args.problems and "mnist_gan" in args.problems:
        return _bench_gan(args)
    if args.nproc is not None:
        return _bench_distributed(args)
    if args.distributed_inversion is not None:
        raise ConfigError("--distributed-inversion applies to the data-parallel measurement: give --nproc N")
    config = bench_config_from_args(args)
    try:
        result = run_bench(config, registry=registry)
    except BenchInterrupted as exc:
        sys.stdout.flush()
        sys.stderr.write(f"\ncurvlib bench: interrupted after {exc.finished} of {exc.total} runs; "
                         f"results so far in {exc.out}\n")
        return EXIT_INTERRUPTED
    if config.grid is not None and config.grid.shard is not None:
        sys.stdout.write(f"\ngrid shard {config.grid.shard} done; its points are in {config.grid.cache}: run the same "
                         "command without --grid-shard to choose and train\n")
        return 0
    sys.stdout.write("\n")
    _print_summary(result.summary, config.progress)
    sys.stdout.write(f"\nresults: {result.out}\n")
    return 0


#: options of the regular bench that ``--nproc`` does not use (it measures steps, not training curves)
_NPROC_IGNORES = ("protocol", "grid_shard", "seeds", "epochs", "eval_every", "eval_train_limit", "warmup_steps", "patience", "lr", "damping",
                  "damping_kind", "momentum", "weight_decay", "kl_clip", "ema", "mc_samples", "background_inversion",
                  "grid", "grid_lr",
                  "grid_damping", "grid_steps", "grid_kl_clip", "grid_cache", "target_loss", "target_margin",
                  "tensorboard", "config")


def _bench_distributed(args: argparse.Namespace) -> int:
    from curvlib.bench.distributed import DistributedBenchSpec, format_table, run_distributed_bench
    from curvlib.bench.job import default_out

    used = [f"--{k.replace('_', '-')}" for k in _NPROC_IGNORES if getattr(args, k, None) not in (None, False, [])]
    if used:
        raise ConfigError(f"--nproc measures the step cost of data-parallel training; it does not take {', '.join(used)}")
    if args.problems is not None and len(args.problems) != 1:
        raise ConfigError(f"--nproc takes one --problem, got {len(args.problems)}")
    fields = {"nproc": args.nproc, "small": bool(args.small), "path": args.path, "threads": args.threads or 1,
              "seed": args.seed or 0, "update_every": args.update_every, "invert_every": args.invert_every,
              "inversion": args.distributed_inversion}
    for key, value in (("problem", args.problems[0] if args.problems else None),
                       ("methods", tuple(args.methods) if args.methods else None), ("steps", args.steps),
                       ("batch_size", args.batch_size)):
        if value is not None:
            fields[key] = value
    spec = DistributedBenchSpec(**fields)
    out = Path(args.out) if args.out else default_out(args.name or f"distributed-{args.nproc}")
    sys.stdout.write(f"curvlib bench --nproc {spec.nproc}: {', '.join(spec.methods)} on {spec.problem}, global batch "
                     f"{spec.batch_size}, {spec.steps} steps\n")
    sys.stdout.flush()
    summary = run_distributed_bench(spec, out, plots=not args.no_plots)
    sys.stdout.write("\n" + format_table(summary) + f"\n\nresults: {out}\n")
    bad = [m for m, v in summary["methods"].items() if not v["identical_replicas"]]
    if bad:
        sys.stderr.write(f"curvlib bench: the replicas of {', '.join(bad)} differ at the end\n")
        return 1
    return 0


#: the options ``mnist_gan`` takes (its own training loop: two players, FID; docs/gan.md)
_GAN_TAKES = ("problems", "methods", "path", "small", "epochs", "batch_size", "seed", "seeds", "threads", "out", "name",
              "progress", "no_plots", "func", "command", "list_methods", "list_problems")


def _bench_gan(args: argparse.Namespace) -> int:
    from curvlib.bench.gan import GanSpec, format_gan_summary, run_gan_bench
    from curvlib.bench.job import default_out

    if len(args.problems) != 1:
        raise ConfigError(f"mnist_gan trains two players with its own loop: run it alone, not with {args.problems}")
    used = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in _GAN_TAKES and v not in (None, False, [])]
    if used:
        raise ConfigError(f"mnist_gan does not take {', '.join(used)} (its options: --methods, --epochs, --batch-size, "
                          "--seed, --seeds, --small, --path, --threads, --out, --name, --progress, --no-plots; docs/gan.md)")
    fields = {"small": bool(args.small), "path": args.path, "threads": args.threads}
    for key, value in (("methods", tuple(args.methods) if args.methods else None), ("epochs", args.epochs),
                       ("batch_size", args.batch_size), ("seed", args.seed), ("seeds", args.seeds)):
        if value is not None:
            fields[key] = value
    spec = GanSpec(**fields)
    out = Path(args.out) if args.out else default_out(args.name)
    sys.stdout.write(f"curvlib bench mnist_gan: {', '.join(spec.methods)}, {spec.epochs} epochs, batch {spec.batch_size}, "
                     f"{spec.seeds} seed(s)\n")
    sys.stdout.flush()
    with make_progress(args.progress or "auto") as progress:
        summary = run_gan_bench(spec, out, progress=progress, plots=not args.no_plots)
    sys.stdout.write("\n" + format_gan_summary(summary) + f"\n\nresults: {out}\n")
    return 0


def _add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="train methods on benchmark problems; write curves, plots and a summary",
        description="Train each method on each problem from the same seeded start; record the training "
        "and test losses and the training time; write one JSON per run, PNG plots and summary.json "
        "under --out; print a summary table (time to reach a target loss, ratio to Adam). "
        "Defaults: the small MNIST auto-encoder, sgd adam kfac kpsvd deflation lanczos kfac_corrected. "
        "See docs/bench.md.",
    )
    what = bench.add_argument_group("what to run")
    what.add_argument("--problem", "--problems", dest="problems", nargs="+", metavar="NAME",
                      help="problem name(s) (see --list-problems); default mnist_autoencoder")
    what.add_argument("--methods", "--method", dest="methods", nargs="+", metavar="METHOD",
                      help="method name(s) (see --list-methods): sgd, adam, kfac, kfac_tikhonov, any registered "
                      "approximator kind, <approximator>+<coarse space>, block_ng, exact_ng")
    what.add_argument("--path", help="data files for the problems (e.g. a folder of MNIST idx files)")
    size = what.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_const", const=True, default=None,
                      help="shrunk hidden widths and training sets (the default)")
    size.add_argument("--full", dest="small", action="store_const", const=False,
                      help="the thesis's full architectures and data")
    what.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (command-line options win)")
    what.add_argument("--protocol", choices=tuple(PROTOCOLS),
                      help="the thesis's training protocol under the other options: T1 = T2 = 100, EMA 0.95, 1000 steps, "
                      "3 seeds, early stopping, a grid search per method (thesis: reduced grid for 2 cores; "
                      "thesis-full: the whole §3.3.2 grid); see docs/reproduction.md")
    what.add_argument("--list-methods", action="store_true", help="list the valid method names and exit")
    what.add_argument("--list-problems", action="store_true", help="list the problems and exit")
    what.add_argument("--nproc", type=int, metavar="N",
                      help="measure data-parallel training instead: N local processes (torch.distributed, gloo), "
                      "each with its shard of every global batch, against one process on the whole batch; step "
                      "times per kind, bytes per refresh, replica check (docs/distributed.md). Default problem: "
                      "the full-size MNIST auto-encoder, batch 512, 40 steps; methods sgd kfac kpsvd kfac+residual")
    what.add_argument("--distributed-inversion", choices=("broadcast", "direction", "replicated"),
                      help="with --nproc: how the ranks share the inversions (docs/distributed.md; default broadcast)")

    length = bench.add_argument_group("run length and data")
    steps = length.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps per run (default 200)")
    steps.add_argument("--epochs", type=int, help="passes over the training set per run")
    length.add_argument("--batch-size", type=int, help="batch size (default: the problem's)")
    length.add_argument("--seed", type=int, help="seed of weights, batch order, Monte Carlo draws, data split (default 0)")
    length.add_argument("--seeds", type=int, metavar="N",
                        help="runs per method, seeds --seed … --seed+N-1 (same data split): medians in the summary, "
                        "median curves with the seeds' range in the plots (default 1)")
    length.add_argument("--eval-every", type=int, metavar="STEPS",
                        help="steps between evaluations of the training/test loss (default: one epoch)")
    length.add_argument("--eval-train-limit", type=int, metavar="N",
                        help="evaluate the training loss on the first N training inputs (default 10000)")
    length.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (torch.set_num_threads; default: torch's own choice)")
    length.add_argument("--warmup-steps", type=int, metavar="N",
                        help="untimed SGD steps on a throwaway model before each problem's runs (default 20)")
    length.add_argument("--patience", type=int, metavar="EVALS",
                        help="early stopping: stop after this many evaluations without improvement (thesis §4.3: 10 epochs)")

    hyper = bench.add_argument_group("hyperparameters")
    hyper.add_argument("--lr", action="append", metavar="[METHOD=]VALUE",
                       help="learning rate, for every method or METHOD=VALUE for one (repeatable)")
    hyper.add_argument("--damping", action="append", metavar="[METHOD=]VALUE",
                       help="damping lambda of the natural-gradient methods (repeatable like --lr)")
    hyper.add_argument("--damping-kind", help="damping kind for every natural-gradient method (heuristic, tikhonov, ...)")
    hyper.add_argument("--momentum", action="append", metavar="[METHOD=]VALUE",
                       help="momentum (default 0.9 for sgd, 0 for natural gradient; repeatable like --lr)")
    hyper.add_argument("--weight-decay", type=float, help="L2 weight decay (thesis §4.3: 1e-3)")
    hyper.add_argument("--kl-clip", type=float, help="KL clipping constant c of the natural-gradient methods (appendix 3.E; default 1e-3; 0: off)")
    hyper.add_argument("--update-every", type=int, metavar="T1", help="steps between curvature refreshes")
    hyper.add_argument("--invert-every", type=int, metavar="T2", help="steps between inversions")
    hyper.add_argument("--ema", type=float, help="moving-average decay gamma of the curvature (thesis: 0.95)")
    hyper.add_argument("--mc-samples", type=int, help="Monte Carlo targets per input for the true Fisher")
    hyper.add_argument("--background-inversion", action="store_true", default=None,
                       help="natural gradient: invert in a worker thread (a side CUDA stream on a GPU) while training "
                       "goes on; each inverse serves from the step after its inversion step (docs/optimizer.md)")
    hyper.add_argument("--grid", action="store_true",
                       help="grid-search lr (and damping) per method before the main run (thesis §3.3.2 grid)")
    hyper.add_argument("--grid-lr", type=_float_list, metavar="LIST", help="learning rates of the grid, comma-separated")
    hyper.add_argument("--grid-damping", type=_float_list, metavar="LIST", help="dampings of the grid, comma-separated")
    hyper.add_argument("--grid-steps", type=int, help="steps of each grid trial (default: a quarter of --steps)")
    hyper.add_argument("--grid-kl-clip", type=_float_list, metavar="LIST",
                       help="KL clipping constants c of the grid (natural gradient; thesis §3.3.2: 1e-2,1e-3)")
    hyper.add_argument("--grid-shard", metavar="I/N",
                       help="train only shard I of N of every grid into --grid-cache and stop (no main runs): N jobs "
                       "on one cache train the grid in parallel, then a run without --grid-shard chooses")
    hyper.add_argument("--grid-cache", metavar="DIR",
                       help="folder of finished grid points, reused by any grid that needs them (default: "
                       "grid/cache in --out)")

    output = bench.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="results directory (default results/bench/<name>)")
    output.add_argument("--name", help="name of the run (default: a UTC timestamp)")
    output.add_argument("--target-loss", type=float,
                        help="training loss for time-to-target (default: Adam's best final loss x 1.05)")
    output.add_argument("--target-margin", type=float, help="margin over Adam's final loss (default 0.05)")
    output.add_argument("--progress", choices=("auto", "rich", "plain", "none"),
                        help="progress display (default auto: rich on a terminal, plain lines otherwise)")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--tensorboard", metavar="DIR",
                        help="also write TensorBoard scalars (losses, optimizer metrics) to DIR (needs tensorboard)")
    bench.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="inspect installed plugins")
    psub = plugins.add_subparsers(dest="plugins_command", required=True)
    plist = psub.add_parser("list", help="every family with its kinds and the distribution providing each")
    plist.add_argument("--no-external", action="store_true", help="load only curvlib's own plugins")
    plist.set_defaults(func=_plugins_list)
    _add_bench_parser(sub)
    explain = sub.add_parser("explain", help="which rule each layer of a model matches, and what it costs")
    explain.add_argument("config", help="a PreconditionerConfig file (YAML or JSON)")
    explain.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                         help="an importable callable returning the nn.Module, e.g. mypkg.models:make_net")
    explain.set_defaults(func=_explain)
    return parser


def _explain(args: argparse.Namespace) -> int:
    import importlib

    from torch import nn

    from curvlib.precond import build_preconditioner

    module_name, _, attr = args.model.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model: expected MODULE:FACTORY (e.g. mypkg.models:make_net), got {args.model!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like python -m: the current directory's modules
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--model: cannot import {args.model!r} ({type(exc).__name__}: {exc})") from None
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model: {args.model!r} gave a {type(model).__name__}, expected an nn.Module")
    pre = build_preconditioner(model, nn.MSELoss(), args.config, process_group=None)
    print(pre.describe())
    return 0


def _one_line(message: str) -> str:
    """A possibly multi-line error message on one line (problems separated by ``; ``)."""
    out = ""
    for part in (p.strip() for p in message.splitlines()):
        if part:
            out += part if not out else (" " if out.endswith(":") else "; ") + part
    return out


def _os_error(exc: OSError) -> str:
    where = " ".join(repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{exc.strerror or exc}{': ' + where if where else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvlib`` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CurvlibError as exc:
        sys.stderr.write(f"curvlib: error: {_one_line(str(exc))}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(f"curvlib: error: {_one_line(_os_error(exc))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\ncurvlib: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
