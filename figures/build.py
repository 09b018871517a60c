#!/usr/bin/env python
"""Rebuild the README's gallery: every suite's --quick run, its figures copied here as PNG.

    python figures/build.py                  # every suite with figures, into runs/gallery/SUITE (resumes)
    python figures/build.py clipping ou      # only these suites

It is the same as `rlhf-bounds run SUITE --quick --out runs/gallery/SUITE` for each suite, then a
copy of each `runs/gallery/SUITE/figures/*.png` into this folder. Nothing here is edited by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    from rlhf_bounds import cli, store, suites

    unknown = [a for a in argv if a not in suites.SUITES]
    if unknown:
        print(f"figures/build.py: unknown suite {unknown[0]!r}: must be one of {', '.join(suites.SUITES)}",
              file=sys.stderr)
        return 2
    for name, s in suites.SUITES.items():
        if not s.figures or (argv and name not in argv):
            continue
        out = Path("runs") / "gallery" / name
        code = cli.main(["run", name, "--quick", "--out", str(out), "--no-progress"])
        if code:
            return code
        for fig in s.figures:
            shutil.copy2(store.figures_folder(out) / f"{fig.name}.png", HERE / f"{fig.name}.png")
            print(f"figures/{fig.name}.png: {fig.caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
