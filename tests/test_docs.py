"""The repository stands on its own: its docs point at nothing outside it, and its packaging files say what it is.

No computation here: text files only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A reference to the specification files the repository does not ship (they lived beside it, in ../shared).
OUTSIDE = re.compile(r"\bTHEORY\b|THEORY\.md|PERFORMANCE\.md|shared/spec|\.\./shared")

#: Files left out of the check: this test itself, which must name the patterns it looks for.
NOT_YET: tuple[str, ...] = ("tests/test_docs.py",)


def _documents() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    keep = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if not any(rel == x or (x.endswith("/") and rel.startswith(x)) for x in NOT_YET):
            keep.append(path)
    return keep


def test_docs_and_sources_refer_to_nothing_outside_the_repository():
    docs = _documents()
    assert any(p.name == "theory.md" for p in docs) and any(p.suffix == ".py" for p in docs)
    hits = []
    for path in docs:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_must():
    for text in ("see THEORY.md §6", "(THEORY §8.1)", "PERFORMANCE.md's targets", "`../shared/spec/THEORY.md`",
                 "shared/spec/PERFORMANCE.md"):
        assert OUTSIDE.search(text), text
    for text in ("docs/theory.md §1", "the theory of RLHF", "shared_key", "benchmarks/README.md"):
        assert not OUTSIDE.search(text), text


def test_theory_page_has_the_sections_the_sources_cite():
    """Every ``docs/theory.md §N`` cited in src/ and docs/ exists as a section heading there."""
    theory = (ROOT / "docs" / "theory.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", theory, flags=re.M))
    cited = set()
    for path in [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for ref in re.findall(r"docs/theory\.md (§[\d.–§, ]+)", text):
            cited.update(re.findall(r"§(\d+(?:\.\d+)?)", ref))
    assert cited, "no citations found: the pattern is wrong"
    missing = sorted(c for c in cited if c not in headings)
    assert not missing, f"docs/theory.md has no section {missing}"


def test_license_is_mit_as_the_package_says():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the rlhf-bounds authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_pandas_is_an_extra_of_its_own():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["pandas"] == ["pandas>=2"]
    assert [name for name, deps in extras.items() if any(d.startswith("pandas") for d in deps)] == ["pandas"]


def test_citation_file_parses_and_names_the_two_papers():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert str(cff["version"]) == "0.1.0" and str(cff["date-released"]) == "2026-12-01"
    assert cff["license"] == "MIT" and cff["authors"] == [{"name": "the rlhf-bounds authors"}]
    refs = {r["title"]: r for r in cff["references"]}
    li = refs["Towards a Theoretical Understanding to the Generalization of RLHF"]
    tang = refs["Generalisation of RLHF under Reward Shift and Clipped KL Regularisation"]
    assert [a["family-names"] for a in li["authors"]] == ["Li", "Yi", "Wang", "Cui", "Liu"]
    assert [a["family-names"] for a in tang["authors"]] == ["Tang", "Chen", "He"]
    assert "2601.16403" in li["identifiers"][0]["value"] and "2602.21765" in tang["identifiers"][0]["value"]
    assert li["year"] == tang["year"] == 2026
