#!/usr/bin/env python
"""Speed benchmarks of monai-cft, one section per part of the pipeline.

    python scripts/benchmark.py --only data --num-cases 100 --workers 2 [--write-docs docs/benchmarks.md]
    python scripts/benchmark.py --only scpr training inference quickstart [--write-docs docs/benchmarks.md]

Sections: ``data`` (phantom generation and sCPR preparation, cases/s), ``scpr`` (straightening
throughput of ``StraightenCPR`` against a SciPy ``map_coordinates`` reference sampling the same
points), ``training`` (DSCM and CFT iterations: images/s, peak memory, parameters), ``inference``
(counterfactual latency per image), ``quickstart`` (stage times of ``python -m monai_cft.pipeline``) and
``distributed`` (DSCM training throughput with 1 and 2 torchrun processes).
GPU rows run only where CUDA is available (bfloat16 autocast for the networks); elsewhere they say
"not measured: no GPU in this session". ``--tiny`` runs every section at toy sizes as a smoke test
(its numbers mean nothing and cannot be written to the docs).

Each section prints a markdown table; with ``--write-docs`` its table (and the machine it ran on)
replaces the section's heading block in the given markdown file, leaving the other sections alone.
The sections live in ``scripts/benchmarks/`` (``harness.py`` holds the shared helpers, one module per
section); this file is only the command line. Add a section by writing a module with
``def bench_<name>(args) -> str`` (returning markdown) and an argument adder, and registering both in
``SECTIONS`` with its heading.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import data, distributed, harness, inference, quickstart, scpr, training  # noqa: E402

__all__ = ["SECTIONS", "build_parser", "main", "data", "distributed", "harness", "inference", "quickstart", "scpr", "training"]

#: section name -> (markdown heading, benchmark function, argument adder)
SECTIONS: dict[str, tuple[str, Callable[[argparse.Namespace], str], Callable[[argparse.ArgumentParser], None]]] = {
    "data": ("Data generation and preparation", data.bench_data, data.add_arguments),
    "scpr": ("sCPR straightening", scpr.bench_scpr, scpr.add_arguments),
    "training": ("Training throughput", training.bench_training, training.add_arguments),
    "inference": ("Counterfactual inference latency", inference.bench_inference, inference.add_arguments),
    "quickstart": ("Quickstart pipeline", quickstart.bench_quickstart, quickstart.add_arguments),
    "distributed": ("Data-parallel training (torchrun)", distributed.bench_distributed, distributed.add_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options plus every section's own group."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=None,
                        help="sections to run (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes where a section uses them")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="torch intra-op thread counts of the CPU measurements (default: 1 2)")
    parser.add_argument("--repeat-budget", type=float, default=5.0, metavar="S",
                        help="repeat a timed call until the repeats took this many seconds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms (data, scpr)")
    parser.add_argument("--section-budget", type=float, default=240.0, metavar="S",
                        help="wall seconds a section (training, inference) may take; configurations predicted "
                        "not to fit are skipped (default 240)")
    parser.add_argument("--config-cap", type=float, default=90.0, metavar="S",
                        help="skip a configuration predicted to take longer than this (training, inference; "
                        "default 90)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: toy sizes and one repeat (numbers meaningless; not with --write-docs)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active"], default=None,
                        help="set OMP_WAIT_POLICY before torch starts (how idle OpenMP threads wait; on a shared "
                        "machine spinning threads can slow multi-threaded torch down many times); the sections' "
                        "headings then name it, so both variants can stand in the docs")
    parser.add_argument("--write-docs", default=None, metavar="MD", help="update this markdown file's sections")
    for _, _, add in SECTIONS.values():
        add(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.tiny and args.write_docs:
        parser.error("--tiny measures toy sizes; its numbers must not be written to the docs (drop --write-docs).")
    if min(args.threads) < 1:
        parser.error(f"--threads must be positive, got {args.threads}.")
    if args.omp_wait_policy:
        policy = args.omp_wait_policy.upper()
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != policy:
            parser.error("--omp-wait-policy must be set before torch is imported (run the script in a fresh process).")
        os.environ["OMP_WAIT_POLICY"] = policy
    for name in args.only or list(SECTIONS):
        heading, fn, _ = SECTIONS[name]
        if args.omp_wait_policy:
            heading = f"{heading} (OMP_WAIT_POLICY={args.omp_wait_policy.upper()})"
        body = fn(args)
        print(f"## {heading}\n\n{body}\n")
        if args.write_docs:
            harness.update_markdown_section(Path(args.write_docs), heading, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
