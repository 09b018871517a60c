"""The ``rlhf-bounds`` command line.

``rlhf-bounds run`` runs a suite (default: the decomposition study), shows a
progress bar, prints a summary table and saves the results to a folder that
``rlhf_bounds.load`` reads back. ``rlhf-bounds report PATH`` prints the table
of saved results. User mistakes get one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from .spec import FIELDS, Spec, SpecError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"rlhf-bounds: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _number(kind):
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if kind is int:
            if not math.isfinite(value) or not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            return int(value)
        return value
    parse.__name__ = kind.__name__
    return parse


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem spec (applied to every regime of the suite)")
    for f in fields(Spec):
        m = f.metadata
        kind = int if f.type in ("int", int) else float if f.type in ("float", float) else str
        sym = f" ({m['symbol']})" if m["symbol"] else ""
        from .spec import _range_text
        help_text = f"{m['help']}{sym}; default {f.default}; allowed {_range_text(m)}"
        dest = f.name
        if m["choices"]:
            g.add_argument(m["cli"], dest=dest, default=None, metavar="|".join(m["choices"]), help=help_text)
        else:
            g.add_argument(m["cli"], dest=dest, type=_number(kind), default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from .suites import DEFAULT_PROBLEMS, SUITES

    parser = _Parser(prog="rlhf-bounds", description="Monte Carlo verification of RLHF generalisation bounds.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a suite of simulated RLHF problems and print the summary",
                       description="Run a suite: every regime simulates --problems independent problems, "
                                   "measures the exact gap and its terms, and saves per-problem results.")
    r.add_argument("--suite", default="decomposition", metavar="|".join(SUITES),
                   help="which study to run (default decomposition: one regime per gap term; "
                        "single: one spec from the options)")
    r.add_argument("--problems", type=_number(int), default=DEFAULT_PROBLEMS,
                   help=f"problems per regime (default {DEFAULT_PROBLEMS}; allowed ≥ 1)")
    r.add_argument("--seed", type=_number(int), default=0, help="PRNG seed (default 0; allowed [0, 2^32))")
    r.add_argument("--out", default=None,
                   help="output folder (default runs/SUITE-seedSEED); rerunning into it resumes")
    r.add_argument("--chunk-size", type=_number(int), default=None,
                   help="problems per compiled call (default: sized for memory; results do not depend on it)")
    r.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    r.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    _add_spec_options(r)

    rep = sub.add_parser("report", help="print the summary table of saved results")
    rep.add_argument("path", help="a run or study folder written by 'rlhf-bounds run'")
    return parser


def _spec_overrides(args) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def cmd_run(args) -> int:
    from . import report
    from .engine import machine_info
    from .suites import run_study, suite

    regimes = suite(args.suite, **_spec_overrides(args))  # validates every field before compiling
    out = Path(args.out) if args.out else Path("runs") / f"{args.suite}-seed{args.seed}"
    info = machine_info()
    print(f"rlhf-bounds run: suite {args.suite}, {len(regimes)} regime(s) × {args.problems} problems, "
          f"seed {args.seed}, on {info['backend']} ({len(info['devices'])} device(s), {info['cpu']})")
    t0 = time.perf_counter()
    results = run_study(regimes, args.problems, seed=args.seed, out=out, chunk_size=args.chunk_size,
                        progress=not args.no_progress, overwrite=args.overwrite, suite_name=args.suite)
    elapsed = time.perf_counter() - t0
    print()
    print(report.summarise(results))
    print()
    print(f"{sum(len(r) for _, r in results.items())} problems in {elapsed:.1f} s; results in {out}/ "
          f"(load with rlhf_bounds.load({str(out)!r}))")
    return 0


def cmd_report(args) -> int:
    from . import report
    from .results import load

    print(report.summarise(load(args.path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .engine import RunError
    from .results import LoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_report(args)
    except (SpecError, RunError, LoadError) as err:
        sys.stderr.write(f"rlhf-bounds: error: {err}\n")
        return EXIT_USAGE
    except OSError as err:
        sys.stderr.write(f"rlhf-bounds: error: {err.filename or ''}: {err.strerror or err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nrlhf-bounds: interrupted; finished chunks are saved, run the same command to resume\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
