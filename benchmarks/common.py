"""Shared pieces of the benchmarks: the W1 shape, the machine, timing, memory, B1 terms, agreement checks."""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class W1Shape:
    """W1 `train-eval` (benchmarks/README.md): one problem's static shape and its traced constants."""

    d: int = 16
    A: int = 8
    n: int = 256          # training prompts (and the fresh sample for Ĵ)
    K: int = 4            # rollouts per prompt
    b: int = 32           # SGD minibatch
    T: int = 500          # SGD steps
    n_pref: int = 512     # preference pairs
    newton: int = 8       # Newton steps of the BT fit
    M: int = 2048         # evaluation prompts
    record_every: int = 50
    # traced values (the engine's Spec defaults unless W1 says otherwise)
    beta: float = 0.5
    tau: float = 1.0
    D: float = 1.0        # ‖θ*‖
    C: float = 1.0        # ‖φ‖
    lr: float = 1.0
    ridge: float = 1.0
    mix_eps: float = 0.1
    shift: float = 0.0
    delta: float = 0.05

    @property
    def checkpoints(self) -> int:
        return self.T // self.record_every


W1 = W1Shape()


def w1_spec(shape: W1Shape = W1):
    """The engine's Spec for W1."""
    import rlhf_bounds as rb
    return rb.Spec(d=shape.d, actions=shape.A, prompts=shape.n, rollouts=shape.K, batch=shape.b, steps=shape.T,
                   pref_pairs=shape.n_pref, newton_steps=shape.newton, eval_prompts=shape.M, learner="SGD",
                   estimator="rloo", train_log_ratio="clipped", tau=shape.tau, reward_model="mle",
                   record_every=shape.record_every, beta=shape.beta, reward_norm=shape.D, feature_bound=shape.C,
                   lr=shape.lr, ridge=shape.ridge, mix_eps=shape.mix_eps, shift=shape.shift, delta=shape.delta,
                   bounds="b1")  # W1 computes the B1 terms (benchmarks/README.md), not the PAC-Bayes posteriors


# ---- the machine ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """The engine's own machine record, plus XLA flags and which engine sources were timed."""
    from rlhf_bounds.engine import machine_info
    info = machine_info()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info.update(engine_source())
    return info


def engine_source() -> dict[str, Any]:
    """Which engine was timed: git HEAD (read only) and a hash of src/rlhf_bounds/*.py as they are on disk."""
    import hashlib
    import subprocess
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted((root / "src" / "rlhf_bounds").glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    out = {"engine_src_sha256": h.hexdigest()[:16]}
    try:
        out["git_head"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["src_modified_files"] = len(dirty.splitlines()) if dirty else 0
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---- memory -----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class RssSampler:
    """Samples the current RSS every ``every`` seconds in a thread: (seconds since start, MB) pairs."""

    def __init__(self, every: float = 1.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, current_rss_mb()))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._t0, current_rss_mb()))


# ---- timing -----------------------------------------------------------------------------------
def time_repeats(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (which must block until its results are ready)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall and CPU seconds of a block, and the 1-minute load average at its end (others' work shows there)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.c0
        self.load = os.getloadavg()[0]


def rate_summary(problems: int, seconds: list[float], cpu: list[float] | None = None,
                 load: list[float] | None = None) -> dict[str, Any]:
    """Median rate and spread over repeats; with ``cpu``, CPU-seconds per problem (less sensitive to other
    processes on the machine than wall time) and the CPU share used (cpu/wall, ≤ cores)."""
    rates = sorted(problems / s for s in seconds)
    med = statistics.median(rates)
    out = {"problems_per_s": med, "problems_per_s_min": rates[0], "problems_per_s_max": rates[-1],
           "spread_pct": 100.0 * (rates[-1] - rates[0]) / med if med else float("nan"),
           "seconds": seconds, "problems": problems}
    if cpu:
        out["cpu_s"] = cpu
        out["cpu_ms_per_problem"] = 1e3 * statistics.median(c / problems for c in cpu)
        out["cpu_share"] = statistics.median(c / s for c, s in zip(cpu, seconds))
    if load:
        out["loadavg_1min"] = load
    return out


# ---- B1 (docs/theory.md §4–§9), float64 from per-problem columns -----------------------------------------
def b1_terms(shape: W1Shape, reward_range, chi2, l2_train, tail_excess) -> dict[str, np.ndarray]:
    """B1's three terms: W_τ α, √(1+χ²)√L², β E(|ℓ|−τ)_+, with W_τ = range(r̂) + 2βτ."""
    reward_range = np.asarray(reward_range, np.float64)
    n, K, delta = shape.n, shape.K, shape.delta
    alpha = math.sqrt(math.log(4 / delta) / (2 * n)) + math.sqrt(math.log(4 / delta) / (2 * n * K))
    w_tau = reward_range + 2 * shape.beta * shape.tau
    sampling = w_tau * alpha
    shift = np.sqrt(1.0 + np.maximum(np.asarray(chi2, np.float64), 0.0)) * np.sqrt(
        np.maximum(np.asarray(l2_train, np.float64), 0.0))
    clip = shape.beta * np.asarray(tail_excess, np.float64)
    return {"b1_sampling": sampling, "b1_reward_shift": shift, "b1_clipping": clip,
            "b1_total": sampling + shift + clip}


#: Per-problem columns every implementation reports (engine names).
CHECK_COLUMNS = ("J_star", "J_hat", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping",
                 "kl", "chi2", "l2_train", "tail_excess", "reward_error", "b1_sampling", "b1_reward_shift",
                 "b1_clipping", "b1_total")


def with_b1(shape: W1Shape, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cols = dict(cols)
    cols.update(b1_terms(shape, cols["reward_range"], cols["chi2"], cols["l2_train"], cols["tail_excess"]))
    return cols


def agreement(name_a: str, a: dict[str, np.ndarray], name_b: str, b: dict[str, np.ndarray],
              columns=CHECK_COLUMNS, z: float = 4.0) -> dict[str, Any]:
    """Compare column means of two independent samples of problems: |Δ| ≤ z·√(se_a² + se_b²)."""
    rows, ok = {}, True
    for c in columns:
        if c not in a or c not in b:
            continue
        xa = np.asarray(a[c], np.float64)
        xb = np.asarray(b[c], np.float64)
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
        ma, mb = xa.mean(), xb.mean()
        sa, sb = xa.std(ddof=1) / math.sqrt(len(xa)), xb.std(ddof=1) / math.sqrt(len(xb))
        se = math.sqrt(sa * sa + sb * sb)
        diff = ma - mb
        zval = abs(diff) / se if se > 0 else (0.0 if diff == 0 else math.inf)
        passed = zval <= z
        ok &= passed
        rows[c] = {f"mean_{name_a}": ma, f"mean_{name_b}": mb, f"se_{name_a}": sa, f"se_{name_b}": sb,
                   "diff": diff, "z": zval, "pass": bool(passed)}
    return {"between": [name_a, name_b], "n": [int(len(next(iter(a.values())))), int(len(next(iter(b.values()))))],
            "z_max_allowed": z, "pass": bool(ok), "columns": rows}


def agreement_line(check: dict[str, Any]) -> str:
    a, b = check["between"]
    worst = max(check["columns"].items(), key=lambda kv: kv[1]["z"])
    js = check["columns"].get("J_star")
    gt = check["columns"].get("gap_total")
    parts = [f"agreement {a}(n={check['n'][0]}) vs {b}(n={check['n'][1]}): {'PASS' if check['pass'] else 'FAIL'}"]
    if js:
        parts.append(f"J* {js[f'mean_{a}']:.4f} vs {js[f'mean_{b}']:.4f} (z={js['z']:.2f})")
    if gt:
        parts.append(f"gap {gt[f'mean_{a}']:.4f} vs {gt[f'mean_{b}']:.4f} (z={gt['z']:.2f})")
    parts.append(f"worst {worst[0]} z={worst[1]['z']:.2f} over {len(check['columns'])} columns")
    return "; ".join(parts)
