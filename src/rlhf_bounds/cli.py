"""The ``rlhf-bounds`` command line.

``rlhf-bounds run`` runs a suite (default: the decomposition study), shows a
progress bar, prints a summary table and saves the results to a folder that
``rlhf_bounds.load`` reads back. ``rlhf-bounds report PATH`` prints the table
of saved results.

User mistakes get one line on stderr naming the option, the value and the
allowed range, and exit code 2, with no traceback. ``run`` checks every spec
field of every regime, the run options and the output folder (writable, and
not holding a different run or study) before anything is compiled or written.
An interrupted run exits with code 130; the same command resumes it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from . import report, suites
from .engine import check_run_options, machine_info
from .results import load
from .spec import FIELDS, Spec, SpecError, _range_text
from .store import LoadError, RunError
from .suites import DEFAULT_PROBLEMS, SUITES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"rlhf-bounds: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _number(kind, allowed: str):
    """An argparse type: a number of ``kind`` (int or float); bad text is reported with the ``allowed`` range."""
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: must be {allowed}") from None
        if kind is int:
            if not math.isfinite(value) or not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: must be {allowed}")
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
        allowed = _range_text(m)
        help_text = f"{m['help']}{sym}; default {f.default}; allowed {allowed}"
        if m["choices"]:
            g.add_argument(m["cli"], dest=f.name, default=None, metavar="|".join(m["choices"]), help=help_text)
        else:
            whole = "a whole number " if kind is int else ""
            g.add_argument(m["cli"], dest=f.name, type=_number(kind, f"{whole}in {allowed}"), default=None,
                           help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf-bounds", description="Monte Carlo verification of RLHF generalisation bounds.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a suite of simulated RLHF problems and print the summary",
                       description="Run a suite: every regime simulates --problems independent problems, "
                                   "measures the exact gap and its terms, and saves per-problem results.")
    r.add_argument("--suite", default="decomposition", metavar="|".join(SUITES),
                   help="which study to run (default decomposition: one regime per gap term; "
                        "single: one spec from the options)")
    r.add_argument("--problems", type=_number(int, "a whole number ≥ 1"), default=DEFAULT_PROBLEMS,
                   help=f"problems per regime (default {DEFAULT_PROBLEMS}; allowed ≥ 1)")
    r.add_argument("--seed", type=_number(int, "a whole number in [0, 2^32)"), default=0,
                   help="PRNG seed (default 0; allowed [0, 2^32))")
    r.add_argument("--out", default=None,
                   help="output folder (default runs/SUITE-seedSEED); rerunning the same command into it resumes")
    r.add_argument("--chunk-size", type=_number(int, "a whole number ≥ 1"), default=None,
                   help="problems per compiled call (default: sized for memory; results do not depend on it, "
                        "but resuming needs the same value)")
    r.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    r.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    _add_spec_options(r)

    rep = sub.add_parser("report", help="print the summary table of saved results")
    rep.add_argument("path", help="a run or study folder written by 'rlhf-bounds run'")
    return parser


def _spec_overrides(args) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def cmd_run(args) -> int:
    # Everything is checked before anything is compiled or written: every spec field of every regime,
    # the run options, then the output folder.
    regimes = suites.suite(args.suite, **_spec_overrides(args))
    check_run_options(args.problems, args.seed, args.chunk_size)
    if args.out is not None and not args.out.strip():
        raise SpecError("out='' is not a folder name")
    out = Path(args.out) if args.out else Path("runs") / f"{args.suite}-seed{args.seed}"
    suites.check_study(regimes, args.problems, seed=args.seed, out=out, chunk_size=args.chunk_size,
                       overwrite=args.overwrite, suite_name=args.suite)

    info = machine_info()
    print(f"rlhf-bounds run: suite {args.suite}, {len(regimes)} regime(s) × {args.problems} problems, "
          f"seed {args.seed}, on {info['backend']} ({len(info['devices'])} device(s), {info['cpu']})", flush=True)
    t0 = time.perf_counter()
    results = suites.run_study(regimes, args.problems, seed=args.seed, out=out, chunk_size=args.chunk_size,
                        progress=not args.no_progress, overwrite=args.overwrite, suite_name=args.suite)
    elapsed = time.perf_counter() - t0
    print()
    print(report.summarise(results))
    print()
    print(f"{sum(len(r) for _, r in results.items())} problems in {elapsed:.1f} s; results in {out}/ "
          f"(load with rlhf_bounds.load({str(out)!r}))")
    return 0


def cmd_report(args) -> int:
    print(report.summarise(load(args.path)))
    return 0


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--shift -1e-3`` → ``--shift=-1e-3``: argparse takes "-1e-3" or "-inf" for an option, not a value."""
    out = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if (tok.startswith("--") and "=" not in tok and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and _is_float(argv[i + 1])):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_report(args)
    except (SpecError, RunError, LoadError) as err:
        sys.stderr.write(f"rlhf-bounds: error: {err}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (rlhf-bounds report ... | head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"rlhf-bounds: error: {where}{err.strerror or err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nrlhf-bounds: interrupted; finished chunks are saved, run the same command to resume\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
