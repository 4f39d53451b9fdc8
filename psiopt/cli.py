"""The ``psiopt`` command line: ``psiopt bench`` runs the benchmarks.

Examples
--------
``psiopt bench`` runs the default CPU suite into ``./bench-out``;
``psiopt bench --quick --out /tmp/b`` a shrunken one in well under a minute;
``psiopt bench --list`` lists the suites and methods;
``psiopt bench --suite gpu --device cuda --data-dir ~/data/cifar-10-batches-py`` runs
ResNet-18 / VGG-16-BN on CIFAR-10; ``psiopt bench --suite gpu --synthetic`` only times
the optimizer steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "bench_main", "build_parser", "BenchUsageError"]


class BenchUsageError(Exception):
    """A command-line problem found before anything runs (exit status 2)."""


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="cpu", help="which suite to run (default: cpu; see --list)")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: the suite's: cpu, or cuda for the gpu suite)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2, run by every task; the first tunes the learning rates "
        "(default: the suite's, 0,1,2,3,4 for cpu, where the language model runs 0-19; --quick: 0)",
    )
    parser.add_argument("--out", default="bench-out", help="output directory (default: ./bench-out)")
    parser.add_argument("--quick", action="store_true", help="a shrunken suite that runs in well under a minute")
    parser.add_argument("--list", action="store_true", help="list the suites and methods, then exit")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 directory (python-pickle layout) for --suite gpu")
    parser.add_argument(
        "--synthetic", action="store_true", help="gpu suite: only the step-time part, on random data (no --data-dir)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    """The ``psiopt`` parser with its ``bench`` subcommand."""
    parser = argparse.ArgumentParser(prog="psiopt", description="psiopt: optimization on the PSI manifold")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="convergence-rate, init-scale and step-time benchmarks",
        description="Run a benchmark suite: a table on stdout, results.json, report.md and PNG plots in --out.",
    )
    _add_bench_arguments(bench)
    return parser


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise BenchUsageError(f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}") from None
    if not seeds:
        raise BenchUsageError("--seeds needs at least one seed, e.g. --seeds 0")
    if len(set(seeds)) != len(seeds):
        raise BenchUsageError(f"--seeds has repeated values: {text!r}")
    return seeds


def _resolve_device(requested: str | None, default: str) -> str:
    import torch

    name = requested or default
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BenchUsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchUsageError(f"--device {name!r}: psiopt bench runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "with" if torch.version.cuda else "without"
            hint = "--device cpu" if requested else "--device cpu (the gpu suite defaults to cuda)"
            raise BenchUsageError(
                f"CUDA device requested ({name}) but torch.cuda.is_available() is False (this torch "
                f"{torch.__version__} is built {build} CUDA); use {hint}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchUsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return str(device)


def _check_out_dir(path: Path) -> Path:
    """Create ``path`` and prove it is writable, before any benchmark runs."""
    if path.exists() and not path.is_dir():
        raise BenchUsageError(f"output path {path} exists and is not a directory; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise BenchUsageError(
            f"output directory {path} is not writable ({exc.strerror or exc}); choose another --out"
        ) from None
    return path


def _list_text() -> str:
    from .bench.methods import METHODS
    from .bench.rayleigh import FULL_BATCH_METHODS
    from .bench.suites import SUITES

    lines = ["suites:"]
    lines += [f"  {name:<15} {text}" for name, text in SUITES.items()]
    lines.append("methods (minibatch):")
    for name, m in METHODS.items():
        reason = m.unavailable_reason()
        lines.append(f"  {name:<15} {m.describe()}" + (f"  [unavailable: {reason}]" if reason else ""))
    lines.append("methods (full batch):")
    for name, m in FULL_BATCH_METHODS.items():
        reason = m.unavailable_reason()
        lines.append(f"  {name:<15} {m.summary}" + (f"  [unavailable: {reason}]" if reason else ""))
    return "\n".join(lines) + "\n"


def _run_bench(args: argparse.Namespace) -> int:
    from .bench.data import DataError, check_cifar10_dir
    from .bench.suites import SUITES, make_suite, with_seeds

    if args.list:
        sys.stdout.write(_list_text())
        return 0
    if args.suite not in SUITES:
        raise BenchUsageError(f"unknown suite {args.suite!r}; valid suites: {', '.join(SUITES)}")
    if args.synthetic and args.suite != "gpu":
        raise BenchUsageError("--synthetic applies to --suite gpu (step time without data)")
    suite = make_suite(args.suite, quick=args.quick, synthetic=args.synthetic)
    if args.seeds is not None:
        suite = with_seeds(suite, _parse_seeds(args.seeds))
    device = _resolve_device(args.device, suite.default_device)
    data_dir = None
    if suite.needs_data_dir:
        if args.data_dir is None:
            raise BenchUsageError(
                "--suite gpu needs --data-dir DIR (CIFAR-10 in the python-pickle layout: data_batch_1..5, "
                "test_batch, batches.meta), or --synthetic for step time only"
            )
        try:
            data_dir = check_cifar10_dir(args.data_dir)
        except DataError as exc:
            raise BenchUsageError(str(exc)) from None
    elif args.data_dir is not None:
        raise BenchUsageError(f"--data-dir is only used by --suite gpu (without --synthetic), not {args.suite!r}")
    out_dir = _check_out_dir(Path(args.out))

    from .bench.report import json_ready, render_table
    from .bench.runner import BenchConfig, run_benchmark

    progress = not args.no_progress and sys.stderr.isatty()
    config = BenchConfig(suite, device, out_dir, data_dir, args.quick, args.synthetic, progress)
    try:
        results = run_benchmark(config)
    except DataError as exc:
        sys.stderr.write(f"psiopt bench: error: {exc}\n(partial results in {out_dir / 'results.json'})\n")
        return 2
    sys.stdout.write(render_table(json_ready(results)))
    sys.stdout.write(
        f"\nwall time {results.wall_time_s:.1f} s; results: {out_dir / 'results.json'}, "
        f"report: {out_dir / 'report.md'}, {len(results.plots)} plot(s)\n"
    )
    if results.interrupted:
        sys.stderr.write(f"psiopt bench: interrupted; the finished runs are in {out_dir / 'results.json'}\n")
        return 130
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``psiopt bench [options]`` (also ``python -m psiopt.bench [options]``)."""
    parser = argparse.ArgumentParser(
        prog="python -m psiopt.bench", description="Run a psiopt benchmark suite (same options as psiopt bench)."
    )
    _add_bench_arguments(parser)
    args = parser.parse_args(argv)
    return _dispatch(parser, args)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return _run_bench(args)
    except BenchUsageError as exc:
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``psiopt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _dispatch(parser, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
