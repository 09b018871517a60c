"""The figure style: one place for colours, sizes and how figures are saved.

Every figure of every suite is drawn through this module, so that they read as
one set: a colour-blind-safe palette (Okabe & Ito 2008), font sizes readable at a
single column's width (3.4 in), labelled axes with symbols, intervals wherever an
estimate is drawn, and each figure saved as PNG (for the README and a quick look)
and PDF (for papers) under a name that says its claim.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is ever needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["PALETTE", "VERDICT_COLOURS", "COLUMN_WIDTH", "style", "figure", "colour", "save", "interval_bars",
           "quartiles"]

#: Okabe-Ito, the colour-blind-safe qualitative palette (its yellow last: faint as a line on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
#: Verdict → colour, the same in every figure and table.
VERDICT_COLOURS = {"holds": "#009E73", "not enough problems": "#F0E442", "vacuous": "#BBBBBB",
                   "refuted": "#D55E00", "fails (misuse)": "#CC79A7", "holds (misuse)": "#56B4E9"}
#: A single column of a two-column paper, in inches.
COLUMN_WIDTH = 3.4

_STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5, "lines.linewidth": 1.2,
    "lines.markersize": 3.5, "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
    "pdf.fonttype": 42, "svg.hashsalt": "rlhf-bounds", "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def style():
    """A context in which figures are drawn in the house style (fonts, grid, palette, layout)."""
    return plt.rc_context(_STYLE)


def colour(i: int) -> str:
    """The i-th colour of the palette (cycling)."""
    return PALETTE[i % len(PALETTE)]


def figure(ncols: int = 1, nrows: int = 1, *, width: float = COLUMN_WIDTH, aspect: float = 0.75,
           sharex: bool = False, sharey: bool = False):
    """A new (fig, axes) in the house style: ``width`` inches wide, each panel ``aspect`` high/wide.

    Draw inside :func:`style` (the report does) so that every text element takes the house sizes.
    """
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, width * aspect * nrows / ncols),
                                 sharex=sharex, sharey=sharey, squeeze=False, layout="constrained")
    return fig, (axes[0, 0] if axes.size == 1 else axes)


def interval_bars(ax, x, lo, hi, *, color, label=None, marker="o", centre=None, capsize=2.0):
    """Estimates at ``centre`` (default the midpoint) with their intervals [lo, hi] as error bars."""
    x, lo, hi = (np.asarray(v, float) for v in (x, lo, hi))
    mid = (lo + hi) / 2 if centre is None else np.asarray(centre, float)
    err = np.vstack([np.maximum(mid - lo, 0), np.maximum(hi - mid, 0)])
    return ax.errorbar(x, mid, yerr=err, fmt=marker, color=color, label=label, capsize=capsize,
                       elinewidth=0.8, markersize=3.5)


def quartiles(values) -> np.ndarray:
    """The lower quartile, median and upper quartile of ``values`` (NumPy's linear interpolation), for
    :func:`interval_bars`' interquartile bars."""
    return np.quantile(np.asarray(values, float), [0.25, 0.5, 0.75])


def save(fig, folder: str | os.PathLike, name: str) -> list[Path]:
    """Save ``fig`` as ``folder/name.png`` and ``folder/name.pdf`` (no creation date, so a rebuild
    gives the same files) and close it. Returns the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    with style():
        fig.savefig(paths[0], metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Creator": None, "Producer": None, "CreationDate": None})
    plt.close(fig)
    return paths
