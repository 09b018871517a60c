"""results.py: loading a run folder chunk by chunk, against concatenating the chunk files with NumPy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlhf_bounds import LoadError, Results, Spec
from rlhf_bounds import store


def _write(folder: Path, chunks: list[dict[str, np.ndarray]]) -> None:
    (folder / "chunks").mkdir(parents=True)
    for i, c in enumerate(chunks):
        with open(folder / "chunks" / f"chunk-{i:06d}.npz", "wb") as fh:
            np.savez(fh, **c)
    record = {"spec": Spec().to_dict(), "problems": sum(len(c["problem"]) for c in chunks), "status": "complete"}
    (folder / "record.json").write_text(json.dumps(record))


def _chunk(problems, rng) -> dict[str, np.ndarray]:
    m = len(problems)
    return {"problem": np.asarray(problems, np.int64), "gap_total": rng.normal(size=m).astype(np.float32),
            "status": rng.integers(0, 3, m).astype(np.int32),
            "traj_w": rng.normal(size=(m, 3, 4)).astype(np.float32)}


def test_load_matches_numpy_concatenation_and_sorts_by_problem(tmp_path):
    rng = np.random.default_rng(0)
    # chunks of unequal length, the problem numbers out of order across and within chunks
    chunks = [_chunk([5, 6, 7], rng), _chunk([0, 2, 1, 3], rng), _chunk([4], rng)]
    _write(tmp_path / "run", chunks)
    res = Results.from_folder(tmp_path / "run")
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.argsort(cat["problem"], kind="stable")
    assert len(res) == 8
    np.testing.assert_array_equal(res["problem"], np.arange(8))
    for k, v in cat.items():
        assert res[k].dtype == v.dtype
        np.testing.assert_array_equal(res[k], v[order])
    assert set(res.columns) == {"problem", "gap_total", "status"} and set(res.arrays) == {"traj_w"}


@pytest.mark.parametrize("lazy", [True, False, None])
def test_lazy_load_gives_the_eager_results(tmp_path, monkeypatch, lazy):
    """Lazily loaded columns equal the eagerly loaded ones; only the columns asked for are read."""
    rng = np.random.default_rng(3)
    chunks = [_chunk([4, 5, 6], rng), _chunk([0, 1, 2, 3], rng), _chunk([7], rng)]
    _write(tmp_path / "run", chunks)
    eager = Results.from_folder(tmp_path / "run", lazy=False)
    monkeypatch.setattr(store, "LAZY_BYTES", 1)  # the default (lazy=None) then loads lazily
    res = Results.from_folder(tmp_path / "run", lazy=lazy)
    assert isinstance(res.columns, dict) == (lazy is False) == (not res.lazy)
    assert len(res) == 8 and res.nbytes == eager.nbytes == sum(v.nbytes for v in eager.columns.values()) + \
        eager["traj_w"].nbytes
    assert set(res.columns) == set(eager.columns) and set(res.arrays) == set(eager.arrays)
    if lazy is not False:
        np.testing.assert_array_equal(res["gap_total"], eager["gap_total"])
        assert set(res.columns._loaded) == {"problem", "gap_total"}  # nothing else read yet
        assert "traj_w" in res and "nothing" not in res
    for k in ("problem", "gap_total", "status", "traj_w"):
        np.testing.assert_array_equal(res[k], eager[k])
    np.testing.assert_array_equal(res.ok, eager.ok)


def test_load_refuses_mismatched_chunks(tmp_path):
    rng = np.random.default_rng(1)
    a, b = _chunk([0, 1], rng), _chunk([2, 3], rng)
    del b["gap_total"]
    _write(tmp_path / "cols", [a, b])
    with pytest.raises(LoadError, match="different columns"):
        Results.from_folder(tmp_path / "cols")
    c = _chunk([2, 3], rng)
    c["traj_w"] = c["traj_w"][:, :2]
    _write(tmp_path / "shape", [_chunk([0, 1], rng), c])
    with pytest.raises(LoadError, match=r"chunk-000001\.npz: damaged chunk file \(column traj_w"):
        Results.from_folder(tmp_path / "shape", lazy=False)
    lazy = Results.from_folder(tmp_path / "shape", lazy=True)  # found when the column is read
    with pytest.raises(LoadError, match=r"chunk-000001\.npz: damaged chunk file \(column traj_w"):
        lazy["traj_w"]


def test_load_holds_one_chunk_besides_the_results(tmp_path):
    """Peak memory of a load ≈ the results + one chunk, not twice the results (checked in a fresh process)."""
    rng = np.random.default_rng(2)
    m, chunks = 5_000, 16  # 16 chunks of 5,000 problems with 1.6 KB each: 128 MB of results, 8 MB per chunk
    folder = tmp_path / "big"
    _write(folder, [{"problem": np.arange(i * m, (i + 1) * m), "traj_w": rng.normal(size=(m, 400)).astype(np.float32)}
                    for i in range(chunks)])
    script = textwrap.dedent(f"""
        import resource
        from rlhf_bounds import Results
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = Results.from_folder({str(folder)!r}, lazy=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024, res["traj_w"].nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, results = map(int, out.stdout.split())
    # results 128 MB, one chunk 8 MB: concatenating the chunks (old loader) needed 2× the results.
    assert results == m * chunks * 400 * 4
    assert grew < results + 4 * (results // chunks), (grew, results)


def test_lazy_load_of_a_large_run_reads_only_what_is_used(tmp_path):
    """A run above LAZY_BYTES (lowered to 64 MiB here): loading it and reading one small column costs far
    less memory than its results."""
    rng = np.random.default_rng(4)
    m, chunks = 5_000, 16
    folder = tmp_path / "big"
    _write(folder, [{"problem": np.arange(i * m, (i + 1) * m), "gap_total": rng.normal(size=m).astype(np.float32),
                     "traj_w": rng.normal(size=(m, 400)).astype(np.float32)} for i in range(chunks)])
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        from rlhf_bounds import Results, store
        store.LAZY_BYTES = 64 * 2**20
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = Results.from_folder({str(folder)!r})
        mean = float(np.mean(res["gap_total"]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024, res.nbytes, type(res.columns).__name__, len(res))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, nbytes, kind, n = out.stdout.split()
    assert kind == "_LazyColumns" and int(n) == m * chunks
    assert int(nbytes) == m * chunks * (8 + 4 + 1600) > 64 * 2**20
    # problem numbers (640 KB) and gap_total (320 KB) read, plus one chunk file's member at a time
    assert int(grew) < 32 * 2**20, grew
