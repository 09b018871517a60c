"""``single``: one regime, the spec exactly as the options give it (for a custom run)."""

from __future__ import annotations

from ..report import TERMS, markdown_table, summary_rows
from ..spec import Spec
from ._checks import coverage_verdicts, identity_verdicts
from ._framework import Regime, Suite

PROBLEMS = {"quick": 256, "default": 1024, "full": 16384}


def grid(profile: str) -> list[Regime]:
    return [Regime("single", Spec(), PROBLEMS[profile])]


def headline(study) -> str:
    return markdown_table(summary_rows(study, TERMS), [
        ("regime", "regime", ""), ("term", "term", ""), ("mean", "mean", "+.4f"), ("se", "se", ".4f"),
        ("p5", "p5", "+.4f"), ("p95", "p95", "+.4f"), ("n_ok", "ok", "d"), ("n_flagged", "flagged", "d")])


SUITE = Suite(
    name="single",
    claim="One spec, exactly as given: its gap terms beside every bound of the catalogue.",
    grid=grid,
    checks=(identity_verdicts, coverage_verdicts),
    headline=headline,
)
