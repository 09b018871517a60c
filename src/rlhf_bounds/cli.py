"""The ``rlhf-bounds`` command line.

``rlhf-bounds run [SUITE]`` runs a suite (default: decomposition), shows a
progress bar, prints a summary table and saves the results, ``summary.md`` and
the suite's figures to a folder that ``rlhf_bounds.load`` reads back.
``rlhf-bounds list`` describes the suites; ``rlhf-bounds report DIR`` rebuilds
a folder's summary and figures from its saved results; ``rlhf-bounds export
DIR --csv`` writes one tidy table.

User mistakes get one line on stderr naming the option, the value and the
allowed range, and exit code 2, with no traceback. ``run`` checks every spec
field of every regime, the run options and the output folder (writable, and
not holding a different run or study) before anything is compiled or written.
An interrupted run exits with code 130; the same command resumes it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np

from . import report, store, suites
from ._version import __version__
from .engine import check_run_options, machine_info
from .results import PartialResultsWarning, load
from .spec import FIELDS, Spec, SpecError, _range_text
from .store import LoadError, RunError
from .suites import DEFAULT_SUITE, PROFILES, SUITES

EXIT_USAGE = 2
EXIT_PARTIAL = 3
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
    parser.add_argument("--version", action="version", version=f"rlhf-bounds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="list the suites: claim, profiles, sizes and estimated times here",
                   description="List every suite with its claim and, per profile (--quick, default, --full), "
                               "its regimes, problems and an estimate of the time on this machine.")

    r = sub.add_parser("run", help="run a suite (default: decomposition), print its summary, save results and figures",
                       description="Run a suite: every regime simulates its problems, measures the exact gap and "
                                   "its terms beside every bound, saves per-problem results, and writes summary.md "
                                   "and the suite's figures into the output folder. Rerunning the same command "
                                   "resumes where it stopped.")
    r.add_argument("suite", nargs="?", default=None, metavar="SUITE",
                   help=f"the suite to run: {', '.join(SUITES)} (default {DEFAULT_SUITE}; 'rlhf-bounds list' "
                        "describes them)")
    r.add_argument("--suite", dest="suite_option", default=None, metavar="SUITE", help=argparse.SUPPRESS)
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="the suite's quick profile (minutes on a laptop)")
    size.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="the suite's full profile (the scale a paper needs)")
    r.add_argument("--problems", type=_number(int, "a whole number ≥ 1"), default=None,
                   help="problems per regime (default: the suite's profile; allowed ≥ 1)")
    r.add_argument("--seed", type=_number(int, "a whole number in [0, 2^32)"), default=0,
                   help="PRNG seed (default 0; allowed [0, 2^32))")
    r.add_argument("--out", default=None,
                   help="output folder (default runs/SUITE[-PROFILE]-seedSEED[-what differs from the default]); "
                        "rerunning the same command into it resumes")
    r.add_argument("--set", dest="set_fields", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a spec field in every regime (repeatable), e.g. --set beta=0.1")
    r.add_argument("--force-set", action="store_true",
                   help="allow --set (and spec options) to change a field that defines a regime")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="rerun exactly the study configured in FILE (a config.json that a run wrote)")
    r.add_argument("--chunk-size", type=_number(int, "a whole number ≥ 1"), default=None,
                   help="problems per compiled call (default: sized for memory; resuming needs the same value)")
    r.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    r.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    _add_spec_options(r)

    rep = sub.add_parser("report", help="rebuild summary.md and the figures of saved results, and print the summary",
                         description="Rebuild a study folder's summary.md and every figure from its saved results "
                                     "(nothing is recomputed), and print the summary tables.")
    rep.add_argument("path", help="a study or run folder written by 'rlhf-bounds run' or rlhf_bounds.run")
    rep.add_argument("--partial", action="store_true",
                     help="report an unfinished study or run (otherwise refused with exit code 3)")

    ex = sub.add_parser("export", help="write one tidy table of saved results (CSV)",
                        description="Write every regime's per-problem columns as one table, with the regime and "
                                    "its swept fields as columns.")
    ex.add_argument("path", help="a study or run folder")
    ex.add_argument("--csv", nargs="?", const="", default=None, metavar="FILE",
                    help="write CSV to FILE (default PATH/results.csv; '-' for standard output)")
    return parser


def _spec_overrides(args) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def _default_out(suite_name: str, profile: str, seed: int, overrides: dict, problems: int | None,
                 config: str | None) -> Path:
    """runs/SUITE[-PROFILE]-seedSEED[-field=value...]: a fresh folder for every distinct study."""
    parts = [suite_name] + ([profile] if profile != "default" else []) + [f"seed{seed}"]
    extra = [f"{k}={v}" for k, v in sorted(overrides.items())]
    if problems is not None:
        extra.append(f"problems={problems}")
    if config is not None:
        extra.append("config-" + hashlib.sha256(Path(config).read_bytes()).hexdigest()[:8])
    name = "-".join(parts + extra)
    if len(name) > 100:
        name = "-".join(parts) + "-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return Path("runs") / name


def cmd_list(args) -> int:
    for s in SUITES.values():
        print(f"{s.name}: {s.claim}")
        for profile in PROFILES:
            regimes = s.regimes(profile)
            total = sum(r.problems for r in regimes)
            flag = {"quick": "--quick", "default": "(default)", "full": "--full"}[profile]
            print(f"    {flag:10s} {len(regimes)} regimes, {total:,} problems, about "
                  f"{_duration(suites.estimate_seconds(regimes, s.kernel))}")
    print(f"\nEstimates: {suites.estimate_basis()}")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_run(args) -> int:
    # Everything is checked before anything is compiled or written: every spec field of every regime,
    # the run options, then the output folder.
    if args.suite and args.suite_option and args.suite != args.suite_option:
        raise SpecError(f"two suites named: {args.suite!r} and --suite {args.suite_option!r}")
    overrides = {**_spec_overrides(args), **suites.parse_set(args.set_fields)}
    profile = args.profile or "default"
    if args.config is not None:
        config = store.read_config(args.config)
        name = config.get("suite", DEFAULT_SUITE)
        if args.suite or args.suite_option or overrides or args.problems or args.profile:
            raise SpecError("--config reruns a configuration exactly: give no suite, --set, spec option, "
                            "--problems, --quick or --full with it (edit the file instead)")
        regimes = suites.regimes_from_config(config)
        profile = config.get("profile") or "default"
        suites.get(name)
    else:
        name = args.suite or args.suite_option or DEFAULT_SUITE
        regimes = suites.suite_regimes(name, profile, overrides, force=args.force_set, problems=args.problems)
    check_run_options(args.problems or 1, args.seed, args.chunk_size)
    if args.out is not None and not args.out.strip():
        raise SpecError("out='' is not a folder name")
    out = Path(args.out) if args.out else _default_out(name, profile, args.seed, overrides, args.problems,
                                                       args.config)
    kernel = suites.get(name).kernel
    suites.check_study(regimes, seed=args.seed, out=out, chunk_size=args.chunk_size, overwrite=args.overwrite,
                       suite_name=name, profile=profile, kernel=kernel)

    info = machine_info()
    total = sum(r.problems for r in regimes)
    print(f"rlhf-bounds run: suite {name} ({profile}), {len(regimes)} regime(s), {total:,} problems, seed {args.seed}, "
          f"on {info['backend']} ({len(info['devices'])} device(s), {info['cpu']}); about "
          f"{_duration(suites.estimate_seconds(regimes, kernel))}", flush=True)
    if overrides:
        print("overrides (every regime): " + ", ".join(f"{k}={v}" for k, v in overrides.items()), flush=True)
    t0 = time.perf_counter()
    results = suites.run_suite(name, profile, seed=args.seed, out=out, chunk_size=args.chunk_size,
                               progress=not args.no_progress, overwrite=args.overwrite, regimes=regimes)
    elapsed = time.perf_counter() - t0
    print()
    print(report.suite_text(results))
    print()
    computed = sum(r.record.get("computed_problems", 0) for r in results.regimes.values())
    print(f"{total:,} problems ({computed:,} computed now) in {elapsed:.1f} s; results, summary.md and figures in "
          f"{out}/ (load with rlhf_bounds.load({str(out)!r}))")
    return 0


def cmd_report(args) -> int:
    results = load_quietly(args.path)
    if not results.complete:
        missing = "; ".join(results.missing) if isinstance(results.missing, list) else results.missing
        line = (f"{args.path} holds partial results ({missing}); finish them by rerunning the command that made "
                "them")
        if not args.partial:
            raise PartialError(line + ", or pass --partial to report what is there")
        sys.stderr.write(f"rlhf-bounds: warning: {line}\n")
    if hasattr(results, "regimes") and results.path is not None:
        path = report.write_report(results)
        sys.stderr.write(f"rlhf-bounds: wrote {path} and the figures in {store.figures_folder(results.path)}/\n")
        print(report.suite_text(results))
    else:
        print(report.summarise(results))
    return 0


def cmd_export(args) -> int:
    results = load_quietly(args.path)
    table = results.table() if hasattr(results, "regimes") else {"regime": None, **dict(results.columns)}
    if table.get("regime") is None:
        table["regime"] = np.full(len(results), "run", dtype=object)
    if args.csv is None:
        raise SpecError("export needs a format: --csv [FILE]")
    target = Path(args.path) / "results.csv" if args.csv == "" else args.csv
    rows = len(next(iter(table.values())))
    if target == "-":
        _write_csv(sys.stdout, table)
    else:
        with open(target, "w", newline="") as fh:
            _write_csv(fh, table)
        sys.stderr.write(f"rlhf-bounds: wrote {rows} rows × {len(table)} columns to {target}\n")
    return 0


def _write_csv(fh, table: dict) -> None:
    writer = csv.writer(fh)
    names = list(table)
    writer.writerow(names)
    cols = [table[k] for k in names]
    for i in range(len(cols[0])):
        writer.writerow([_csv_cell(c[i]) for c in cols])


def _csv_cell(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return "" if v is None else v


def load_quietly(path):
    """:func:`rlhf_bounds.load` without its partial-results warning (the command line says it itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialResultsWarning)
        return load(path)


class PartialError(RuntimeError):
    """Partial results asked for without --partial."""


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
        return {"run": cmd_run, "report": cmd_report, "list": cmd_list, "export": cmd_export}[args.command](args)
    except (SpecError, RunError, LoadError) as err:
        sys.stderr.write(f"rlhf-bounds: error: {err}\n")
        return EXIT_USAGE
    except PartialError as err:
        sys.stderr.write(f"rlhf-bounds: error: {err}\n")
        return EXIT_PARTIAL
    except BrokenPipeError:  # the reader went away (rlhf-bounds report ... | head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"rlhf-bounds: error: {where}{err.strerror or err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        message = "\nrlhf-bounds: interrupted; finished chunks are saved, run the same command to resume\n"
        if argv is None:  # the program itself: leave now, before XLA's threads meet the teardown (_interrupt.py)
            from ._interrupt import exit_now
            exit_now(EXIT_INTERRUPTED, message)
        sys.stderr.write(message)  # called as a function (tests): return the code
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
