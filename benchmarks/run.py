#!/usr/bin/env python
"""Benchmarks of the rlhf-bounds engine: W1 `train-eval`, W2 `ou-chains`, W3 `scale` (benchmarks/README.md).

    python benchmarks/run.py --workload W1 --json w1.json              # N = 4096, R1 and R2 in the same run
    python benchmarks/run.py --workload W1 --problems 512 --repeats 2   # a quick check
    python benchmarks/run.py --workload W1-all --json w1all.json       # every bound, beside W1, same run
    python benchmarks/run.py --workload W2 --problems 32 --json w2.json
    python benchmarks/run.py --workload W3 --problems 20000 --json w3.json
    python benchmarks/run.py --workload profile --json profile.json     # stage breakdown of simulate
    python benchmarks/run.py --workload scaling --json scaling.json     # 1, 2, 4 forced host devices
    python benchmarks/run.py --workload sgd-step --json sgd_step.json   # one training step by part and chunk

Each workload prints one line (problems/s with the spread of the repeats, ratios to
R1 and R2, fractions of the roofline limits, compile seconds, peak RSS) and writes
JSON. README.md beside this file says what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import W1, peak_rss_mb  # noqa: E402


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


from rlhf_bounds import store  # noqa: E402
from rlhf_bounds.store import json_default  # noqa: E402  (NumPy scalars, arrays and paths to JSON)


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, default=json_default)
    log(f"wrote {path}")


# ================================================================================================
# The engine at W1 shape
# ================================================================================================
class EngineW1:
    """Times the engine's compiled chunk kernel (``engine.compile_chunk``) over N problems, end to end to host arrays."""

    def __init__(self, chunk: int | None, seed: int = 0, kernel=None, bounds: str = "b1"):
        import jax
        import rlhf_bounds as rb
        from rlhf_bounds import engine
        from rlhf_bounds.simulate import KERNEL
        self.jax, self.rb, self.engine = jax, rb, engine
        self.kernel = KERNEL if kernel is None else kernel
        self.spec = common.w1_spec(W1).replace(bounds=bounds).validate()
        self.chunk = chunk or engine.default_chunk_size(self.spec)
        self.problems_key, self.shared_key = engine.problem_keys(seed)
        self.compiled = None
        self.compile_s = None

    def _idx(self, lo: int, count: int):
        # padding lanes repeat the first problem and are dropped (as engine.run does)
        return self.jax.numpy.asarray(self.engine.chunk_indices(lo, count, self.chunk))

    def _call(self, idx):
        return self.compiled(self.spec, self.problems_key, self.shared_key, idx)

    def compile(self) -> float:
        """Compile through ``engine.compile_chunk``, the call ``rlhf_bounds.run`` makes (same threefry
        mode, same finishing blocks, one device), so the benchmark times what users run."""
        from jax.sharding import Mesh
        mesh = Mesh(np.array(self.jax.devices()[:1]), ("problems",))
        t0 = time.perf_counter()
        self.compiled = self.engine.compile_chunk(self.spec, self.problems_key, self.shared_key,
                                                  self._idx(0, self.chunk), mesh, self.kernel)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def run(self, problems: int) -> dict[str, np.ndarray]:
        """All ``problems`` problems, chunk by chunk, results brought to the host (like rb.run without out)."""
        cols: dict[str, list] = {}
        for lo in range(0, problems, self.chunk):
            count = min(self.chunk, problems - lo)
            res = self.jax.device_get(self._call(self._idx(lo, count)))
            for k, v in res.items():
                if np.ndim(v) == 1:
                    cols.setdefault(k, []).append(np.asarray(v)[:count])
        return {k: np.concatenate(v) for k, v in cols.items()}


class EngineCoreW1(EngineW1):
    """The engine's W1 pipeline minus the bound catalogue (``SimulateKernel(catalogue=False)``), same chunking."""

    def __init__(self, chunk: int | None, seed: int = 0):
        from rlhf_bounds.simulate import SimulateKernel
        super().__init__(chunk, seed, kernel=SimulateKernel(catalogue=False))


class R2W1:
    def __init__(self, chunk: int, seed: int = 12345):
        import jax
        import r2_plain_jax
        self.jax = jax
        self.kernel = r2_plain_jax.make_kernel(W1)
        self.root = jax.random.key(seed)
        self.chunk = chunk
        self.compiled = None

    def compile(self) -> float:
        t0 = time.perf_counter()
        self.compiled = self.kernel.lower(self.root, self.jax.numpy.arange(self.chunk, dtype=np.int32)).compile()
        return time.perf_counter() - t0

    def run(self, problems: int) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {}
        for lo in range(0, problems, self.chunk):
            count = min(self.chunk, problems - lo)
            idx = np.arange(lo, lo + self.chunk, dtype=np.int32)
            idx[count:] = lo
            res = self.jax.device_get(self.compiled(self.root, self.jax.numpy.asarray(idx)))
            for k, v in res.items():
                if np.ndim(v) == 1:
                    cols.setdefault(k, []).append(np.asarray(v)[:count])
        return {k: np.concatenate(v) for k, v in cols.items()}


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def workload_w1(args) -> dict:
    import jax
    import r1_numpy
    import roofline

    N = args.problems or 4096
    n1 = min(args.r1_problems, N) if args.r1_problems else min(256, N)
    n2 = min(args.r2_problems, N) if args.r2_problems else min(1024, N)
    R = args.repeats
    log(f"W1: engine N={N}, R2 N={n2}, R1 N={n1}, repeats={R}")

    eng = EngineW1(args.chunk, seed=args.seed)
    log(f"engine: compiling chunk kernel (chunk={eng.chunk}) ...")
    compile_s = eng.compile()
    log(f"engine: compiled in {compile_s:.1f}s; warm-up chunk ...")
    eng.run(min(eng.chunk, N))
    rss_before = peak_rss_mb()
    eng_t, r1_t, r2_t = [], [], []
    with common.Timer() as tm:
        eng_cols = eng.run(N)
    eng_t.append(tm)
    engine_peak_rss = peak_rss_mb()
    log(f"engine repeat 1: {N / tm.wall:.1f} problems/s (cpu share {tm.cpu / tm.wall:.2f}, load {tm.load:.1f}, "
        f"peak RSS {engine_peak_rss:.0f} MB)")

    r2 = R2W1(args.r2_chunk or eng.chunk)
    log(f"R2: compiling (chunk={r2.chunk}) ...")
    r2_compile_s = r2.compile()
    r2.run(min(r2.chunk, n2))
    log(f"R2: compiled in {r2_compile_s:.1f}s; R1 warm-up ...")
    r1_numpy.simulate(W1, 4, seed=args.seed + 99, block=4)
    core = None
    if args.core_problems:
        nc = min(args.core_problems, N)
        core = EngineCoreW1(eng.chunk, seed=args.seed)
        log("engine core (no catalogue): compiling ...")
        core_compile_s = core.compile()
        core.run(min(core.chunk, nc))
    core_t, core_cols = [], None

    r1_cols = r2_cols = None
    for r in range(R):
        if r > 0:
            with common.Timer() as tm:
                eng_cols = eng.run(N)
            eng_t.append(tm)
        with common.Timer() as tm:
            r2_cols = r2.run(n2)
        r2_t.append(tm)
        if core is not None:
            with common.Timer() as tm:
                core_cols = core.run(nc)
            core_t.append(tm)
        with common.Timer() as tm:
            r1_cols = r1_numpy.simulate(W1, n1, seed=args.seed + 1000, block=args.r1_block)
        r1_t.append(tm)
        log(f"repeat {r + 1}/{R}: engine {N / eng_t[-1].wall:.1f}/s, R2 {n2 / r2_t[-1].wall:.1f}/s, "
            f"R1 {n1 / r1_t[-1].wall:.1f}/s (load {tm.load:.1f})")

    summ = lambda n, ts: common.rate_summary(n, [t.wall for t in ts], [t.cpu for t in ts], [t.load for t in ts])
    eng_rate, r1_rate, r2_rate = summ(N, eng_t), summ(n1, r1_t), summ(n2, r2_t)

    # agreement in distribution (B1 terms from each implementation's columns, same formula, float64)
    eng_b1 = {k: float(np.mean(eng_cols[k])) for k in ("b1_sampling", "b1_reward_shift", "b1_clipping", "b1_total")
              if k in eng_cols}
    e = common.with_b1(W1, eng_cols)
    check_r1 = common.agreement("engine", e, "R1", common.with_b1(W1, r1_cols))
    check_r2 = common.agreement("engine", e, "R2", common.with_b1(W1, r2_cols))

    log("roofline: measuring matmul rate and bandwidth ...")
    counts = roofline.w1_counts(W1)
    limits = roofline.measure(W1, eng.chunk, quick=args.quick)
    frac = roofline.fractions(eng_rate["problems_per_s"], counts, limits)
    frac_r1 = roofline.fractions(r1_rate["problems_per_s"], counts, limits)
    frac_r2 = roofline.fractions(r2_rate["problems_per_s"], counts, limits)

    ratio_r1 = eng_rate["problems_per_s"] / r1_rate["problems_per_s"]
    ratio_r2 = eng_rate["problems_per_s"] / r2_rate["problems_per_s"]
    cpu_ratio_r1 = r1_rate["cpu_ms_per_problem"] / eng_rate["cpu_ms_per_problem"]
    cpu_ratio_r2 = r2_rate["cpu_ms_per_problem"] / eng_rate["cpu_ms_per_problem"]
    load = [t.load for t in eng_t + r1_t + r2_t]
    line = (f"W1 train-eval: {_fmt_rate(eng_rate['problems_per_s'])} problems/s "
            f"(median of {R}, spread {eng_rate['spread_pct']:.1f}%, N={N}, chunk {eng.chunk}) | "
            f"×R1 {ratio_r1:.2f} (R1 numpy {_fmt_rate(r1_rate['problems_per_s'])}/s on {n1} problems, scaled) | "
            f"×R2 {ratio_r2:.2f} (R2 plain-jax {_fmt_rate(r2_rate['problems_per_s'])}/s on {n2}, scaled) | "
            f"roofline: compute {100 * frac['compute']:.2f}% of {frac['compute_limit_problems_per_s']:,.0f}/s, "
            f"memory {100 * frac['memory']:.2f}% of {frac['memory_limit_problems_per_s']:,.0f}/s | "
            f"compile {compile_s:.1f} s | peak RSS {engine_peak_rss:,.0f} MB")
    print(line)
    print(f"  CPU time per problem: engine {eng_rate['cpu_ms_per_problem']:.1f} ms "
          f"(cpu share {eng_rate['cpu_share']:.2f}), R2 {r2_rate['cpu_ms_per_problem']:.1f} ms, "
          f"R1 {r1_rate['cpu_ms_per_problem']:.1f} ms -> CPU-time ratios ×R1 {cpu_ratio_r1:.2f}, ×R2 {cpu_ratio_r2:.2f}; "
          f"load average during the run {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    print("  " + common.agreement_line(check_r1))
    print("  " + common.agreement_line(check_r2))
    core_out = None
    if core is not None:
        core_rate = summ(nc, core_t)
        check_core = common.agreement("core", common.with_b1(W1, core_cols), "R1", common.with_b1(W1, r1_cols))
        core_out = {**core_rate, "compile_s": core_compile_s, "scaled_from_problems": nc,
                    "ratio_r1": core_rate["problems_per_s"] / r1_rate["problems_per_s"],
                    "ratio_r2": core_rate["problems_per_s"] / r2_rate["problems_per_s"],
                    "roofline_fraction": roofline.fractions(core_rate["problems_per_s"], counts, limits),
                    "agreement_vs_r1": check_core}
        print(f"  engine without the bound catalogue (same engine functions, {nc} problems, scaled): "
              f"{_fmt_rate(core_rate['problems_per_s'])} problems/s (spread {core_rate['spread_pct']:.1f}%), "
              f"×R1 {core_out['ratio_r1']:.2f}, ×R2 {core_out['ratio_r2']:.2f}, compile {core_compile_s:.1f} s, "
              f"cpu {core_rate['cpu_ms_per_problem']:.1f} ms/problem")
        print("  " + common.agreement_line(check_core))
    return {
        "engine_core_no_catalogue": core_out,
        "workload": "W1", "line": line,
        "problems_per_s": eng_rate["problems_per_s"], "problems_per_s_spread_pct": eng_rate["spread_pct"],
        "engine": {**eng_rate, "chunk": eng.chunk, "compile_s": compile_s, "problems_key_seed": args.seed,
                   "own_b1_column_means": eng_b1},
        "ratio_r1": ratio_r1, "ratio_r2": ratio_r2, "cpu_time_ratio_r1": cpu_ratio_r1,
        "cpu_time_ratio_r2": cpu_ratio_r2, "loadavg_range": [min(load), max(load)],
        "r1": {**r1_rate, "scaled_from_problems": n1, "block": args.r1_block, "roofline_fraction": frac_r1},
        "r2": {**r2_rate, "scaled_from_problems": n2, "chunk": r2.chunk, "compile_s": r2_compile_s,
               "roofline_fraction": frac_r2},
        "roofline_fraction": frac, "counts_per_problem": counts, "limits": limits,
        "compile_s": compile_s, "peak_rss_mb": engine_peak_rss, "peak_rss_mb_before_timed_run": rss_before,
        "peak_rss_mb_process_end": peak_rss_mb(),
        "agreement": {"engine_vs_r1": check_r1, "engine_vs_r2": check_r2},
        "shape": W1.__dict__, "spec": eng.spec.to_dict(), "machine": common.machine(),
    }


# ================================================================================================
# W1-all: W1 with every bound, beside W1 in the same run
# ================================================================================================
def workload_w1_all(args) -> dict:
    """W1 with ``bounds='all'`` (what a user's default run computes) and W1 itself (``bounds='b1'``),
    interleaved repeat by repeat in one process, and the catalogue's profile by part."""
    import profile_stages
    from rlhf_bounds.report import coverage_rows
    from rlhf_bounds.results import Results

    N = args.problems or 2048
    R = args.repeats
    w1 = EngineW1(args.chunk, seed=args.seed)
    every = EngineW1(args.chunk, seed=args.seed, bounds="all")
    compile_s = {}
    for name, eng in (("W1", w1), ("W1-all", every)):
        log(f"{name}: compiling chunk kernel (chunk={eng.chunk}, bounds={eng.spec.bounds!r}) ...")
        compile_s[name] = eng.compile()
        log(f"{name}: compiled in {compile_s[name]:.1f}s; warm-up chunk ...")
        eng.run(min(eng.chunk, N))
    times = {"W1": [], "W1-all": []}
    cols = {}
    for r in range(R):
        order = (("W1", w1), ("W1-all", every)) if r % 2 == 0 else (("W1-all", every), ("W1", w1))
        for name, eng in order:
            with common.Timer() as tm:
                cols[name] = eng.run(N)
            times[name].append(tm)
        log(f"repeat {r + 1}/{R}: W1 {N / times['W1'][-1].wall:.1f}/s, W1-all {N / times['W1-all'][-1].wall:.1f}/s "
            f"(load {tm.load:.1f})")
    summ = lambda ts: common.rate_summary(N, [t.wall for t in ts], [t.cpu for t in ts], [t.load for t in ts])
    rate = {name: summ(ts) for name, ts in times.items()}
    # the ratio of each repeat's pair (same load), and the ratio of the medians
    pairs = [b.wall / a.wall for a, b in zip(times["W1-all"], times["W1"])]
    ratio = rate["W1-all"]["problems_per_s"] / rate["W1"]["problems_per_s"]
    cpu_ratio = rate["W1"]["cpu_ms_per_problem"] / rate["W1-all"]["cpu_ms_per_problem"]
    # every bound against its actual value on the timed problems (not a coverage study: N problems, one seed)
    res = Results({**cols["W1-all"], "status": cols["W1-all"]["status"]}, {"spec": every.spec.to_dict()})
    coverage = {r_["check"]: {k: r_[k] for k in ("violations", "n", "rate", "cp_lower", "delta", "verdict")
                              if k in r_} for r_ in coverage_rows(res)}
    log(f"catalogue profile on {args.profile_problems} problems ...")
    prof = profile_stages.catalogue_profile(args.profile_problems, repeats=R, seed=args.seed)
    load = [t.load for ts in times.values() for t in ts]
    line = (f"W1-all (every bound): {_fmt_rate(rate['W1-all']['problems_per_s'])} problems/s, "
            f"W1 (bounds='b1') {_fmt_rate(rate['W1']['problems_per_s'])} problems/s in the same run "
            f"(median of {R}, N={N}, chunk {w1.chunk}) | ratio_w1 {ratio:.3f} "
            f"(per repeat {', '.join(f'{x:.3f}' for x in pairs)}; CPU time {cpu_ratio:.3f}) | "
            f"compile {compile_s['W1-all']:.1f} s (W1 {compile_s['W1']:.1f} s) | peak RSS {peak_rss_mb():,.0f} MB")
    print(line)
    print(f"  CPU time per problem: W1-all {rate['W1-all']['cpu_ms_per_problem']:.2f} ms, "
          f"W1 {rate['W1']['cpu_ms_per_problem']:.2f} ms; load average {min(load):.1f}-{max(load):.1f} "
          f"on {os.cpu_count()} cores; CPU {common.machine()['cpu']}")
    print("  bounds on the timed problems: " + ", ".join(
        f"{k} {v['violations']}/{v['n']}" for k, v in coverage.items()))
    for text in profile_stages.catalogue_lines(prof):
        print("  " + text)
    return {"workload": "W1-all", "line": line, "problems": N, "chunk": w1.chunk,
            "problems_per_s": rate["W1-all"]["problems_per_s"], "w1_problems_per_s": rate["W1"]["problems_per_s"],
            "ratio_w1": ratio, "ratio_w1_per_repeat": pairs, "cpu_time_ratio_w1": cpu_ratio,
            "w1_all": {**rate["W1-all"], "compile_s": compile_s["W1-all"], "spec": every.spec.to_dict()},
            "w1": {**rate["W1"], "compile_s": compile_s["W1"], "spec": w1.spec.to_dict()},
            "violations_on_timed_problems": coverage, "catalogue_profile": prof,
            "ratio_r1": None, "ratio_r2": None, "roofline_fraction": None, "compile_s": compile_s["W1-all"],
            "peak_rss_mb": peak_rss_mb(), "loadavg_range": [min(load), max(load)], "machine": common.machine()}


# ================================================================================================
# W2: OU chains
# ================================================================================================
def workload_w2(args) -> dict:
    """W2 through the engine kernel (``ou_chains.OUChainKernel`` via ``engine.compile_chunk``) and the plain
    ``jit(vmap(vmap(chain)))`` reference on the same problems, interleaved repeat by repeat."""
    import dataclasses
    import jax
    import roofline
    import w2_ou_chains as w2
    from jax.sharding import Mesh
    from rlhf_bounds import engine

    s = dataclasses.replace(w2.W2, chains=args.chains or w2.W2.chains, T=args.steps or w2.W2.T)
    P = args.problems or 256
    spec = w2.w2_spec(s)
    kernel = w2.engine_kernel(s)
    chunk = min(args.chunk or engine.default_chunk_size(spec), P)
    plain_chunk = min(args.plain_chunk or 8, P)
    problems_key, shared_key = engine.problem_keys(args.seed)
    mesh = Mesh(np.array(jax.devices()[:1]), ("problems",))
    idx = lambda lo, count, c: jax.numpy.asarray(engine.chunk_indices(lo, count, c))
    log(f"W2: {P} problems × {s.chains} chains, T={s.T}, b={s.b}, engine chunk {chunk}, plain chunk {plain_chunk}")

    t0 = time.perf_counter()
    eng = engine.compile_chunk(spec, problems_key, shared_key, idx(0, chunk, chunk), mesh, kernel)
    compile_engine = time.perf_counter() - t0
    plain_fn = w2.make_plain(s)
    t0 = time.perf_counter()
    # the reference as written compiles with XLA's defaults; --plain-xla-options gives it the engine kernel's options
    engine_options = engine.kernel_compiler_options(kernel)
    plain_options = engine_options if args.plain_xla_options else {}
    plain = plain_fn.lower(problems_key, shared_key, idx(0, plain_chunk, plain_chunk)).compile(
        compiler_options=plain_options or None)
    compile_plain = time.perf_counter() - t0

    def memory(compiled):
        try:
            m = compiled.memory_analysis()
            return {"temp_mb": m.temp_size_in_bytes / 2**20, "argument_mb": m.argument_size_in_bytes / 2**20,
                    "output_mb": m.output_size_in_bytes / 2**20}
        except Exception:  # not every backend reports it
            return None

    def run_all(call, c):
        cols: dict[str, list] = {}
        for lo in range(0, P, c):
            count = min(c, P - lo)
            res = jax.device_get(call(idx(lo, count, c)))
            for k, v in res.items():
                if np.ndim(v) == 1:
                    cols.setdefault(k, []).append(np.asarray(v)[:count])
        return {k: np.concatenate(v) for k, v in cols.items()}

    run_engine = lambda: run_all(lambda i: eng(spec, problems_key, shared_key, i), chunk)
    run_plain = lambda: run_all(lambda i: plain(problems_key, shared_key, i), plain_chunk)
    jax.block_until_ready(eng(spec, problems_key, shared_key, idx(0, chunk, chunk)))      # warm-up
    jax.block_until_ready(plain(problems_key, shared_key, idx(0, plain_chunk, plain_chunk)))
    rates = {"engine": [], "plain": []}
    cpu = {"engine": [], "plain": []}
    loads, cols = [], {}
    for r in range(args.repeats):
        for name, fn in (("engine", run_engine), ("plain", run_plain)):
            with common.Timer() as tm:
                cols[name] = fn()
            rates[name].append(P / tm.wall)
            cpu[name].append(tm.cpu)
            loads.append(tm.load)
            log(f"repeat {r + 1}/{args.repeats} {name}: {P / tm.wall:.2f} problems/s (cpu share {tm.cpu / tm.wall:.2f}, "
                f"load {tm.load:.1f})")
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [e / p for e, p in zip(rates["engine"], rates["plain"])]
    ratio = statistics.median(ratios)
    # CPU seconds per problem, plain over engine: the ratio a loaded machine distorts least
    ratio_cpu = statistics.median(p / e for e, p in zip(cpu["engine"], cpu["plain"]))
    spread = 100 * (max(rates["engine"]) - min(rates["engine"])) / med["engine"]

    counts = w2.flops_per_chain_step(s)
    limits = roofline.measure(W1, 256, quick=args.quick)
    chain_steps = med["engine"] * s.chains * s.T
    frac = {"compute": chain_steps * counts["flops"] / (limits["peak_gflops"] * 1e9),
            "memory": chain_steps * counts["bytes"] / (limits["peak_gbs"] * 1e9),
            "flops_per_chain_step": counts["flops"], "bytes_per_chain_step": counts["bytes"]}
    summary = {name: {k: {"median": float(np.median(v)), "p5": float(np.percentile(v, 5)),
                          "p95": float(np.percentile(v, 95))} for k, v in c.items()} for name, c in cols.items()}
    agree = {k: float(np.max(np.abs(cols["engine"][k] - cols["plain"][k]) / np.maximum(np.abs(cols["plain"][k]), 1e-30)))
             for k in ("chain_sigma_disc_trace", "chain_h_min_eig")}
    e_err, p_err = summary["engine"]["chain_rel_err_disc"]["median"], summary["plain"]["chain_rel_err_disc"]["median"]
    mem = {"engine": memory(eng), "plain": memory(plain)}
    plain_name = "jit(vmap(vmap(chain)))" + (" with the engine's XLA options" if plain_options else "")
    line = (f"W2 ou-chains: engine {_fmt_rate(med['engine'])} problems/s, plain {plain_name} "
            f"{_fmt_rate(med['plain'])} problems/s, ratio {ratio:.2f}× ({ratio_cpu:.2f}× in CPU time; median of {args.repeats} paired repeats, "
            f"engine spread {spread:.1f}%; {P} problems × {s.chains} chains, T={s.T}) | roofline: compute "
            f"{100 * frac['compute']:.2f}%, memory {100 * frac['memory']:.2f}% | compile {compile_engine:.1f} s engine, "
            f"{compile_plain:.1f} s plain | peak RSS {peak_rss_mb():,.0f} MB | OU rel. Frobenius error vs discrete, "
            f"median: engine {e_err:.3f}, plain {p_err:.3f}")
    print(line)
    return {"workload": "W2", "line": line, "problems_per_s": med["engine"], "plain_problems_per_s": med["plain"],
            "ratio_plain": ratio, "ratio_plain_repeats": ratios, "ratio_plain_cpu": ratio_cpu, "problems_per_s_repeats": rates,
            "engine_spread_pct": spread, "cpu_s": cpu, "loadavg_1min": loads,
            "chains_problems_per_s": med["engine"] * s.chains, "problems": P, "chains": s.chains,
            "chunk": chunk, "plain_chunk": plain_chunk, "kernel": kernel.name,
            "ratio_r1": None, "ratio_r2": None, "roofline_fraction": frac, "limits": limits,
            "compile_s": compile_engine, "compile_plain_s": compile_plain, "memory": mem,
            "engine_xla_options": engine_options, "plain_xla_options": plain_options,
            "peak_rss_mb": peak_rss_mb(), "ou_summary": summary, "setup_agreement": agree,
            "shape": s.__dict__, "machine": common.machine()}


# ================================================================================================
# W3: scale
# ================================================================================================
def workload_w3(args) -> dict:
    import rlhf_bounds as rb

    N = args.problems or 1_000_000
    spec = common.w1_spec(W1)
    from rlhf_bounds import engine
    chunk = args.chunk or engine.default_chunk_size(spec)
    folder = Path(args.out) if args.out else Path(tempfile.gettempdir()) / f"rlhf-bounds-W3-{N}"
    n_chunks = -(-N // chunk)
    log(f"W3: {N} problems in {n_chunks} chunks of {chunk} into {folder} (overwrite={not args.resume})")

    samples = []  # (seconds, rss MB, chunks on disk)

    def sampler(stop):
        t0 = time.perf_counter()
        while not stop.wait(1.0):
            try:
                done = len(store.chunk_files(folder))
            except OSError:
                done = 0
            samples.append((time.perf_counter() - t0, common.current_rss_mb(), done, os.getloadavg()[0]))

    import threading
    stop = threading.Event()
    th = threading.Thread(target=sampler, args=(stop,), daemon=True)
    rss_start = common.current_rss_mb()
    th.start()
    with common.Timer() as tm:
        res = rb.run(spec, N, out=folder, chunk_size=chunk, overwrite=not args.resume, progress=True, label="W3")
    wall = tm.wall
    stop.set()
    th.join()
    peak = peak_rss_mb()
    rec = res.record
    timings = rec.get("timings", {})
    compile_s = float(timings.get("compile_s") or 0.0)
    chunk_s = timings.get("chunk_s") or []
    rate_e2e = N / max(wall - compile_s, 1e-9)
    rate_kernel = timings.get("problems_per_s")

    # RSS while chunks were being simulated: first quarter vs last quarter of the chunk phase
    phase = [(t, m, c) for t, m, c, _ in samples if 0 < c < n_chunks]
    growth = None
    if len(phase) >= 8:
        q = len(phase) // 4
        first, last = max(m for _, m, _ in phase[:q]), max(m for _, m, _ in phase[-q:])
        cs = np.array([c for _, _, c in phase], float)
        ms = np.array([m for _, m, _ in phase], float)
        slope = float(np.polyfit(cs, ms, 1)[0]) if np.ptp(cs) > 0 else 0.0
        growth = {"rss_first_quarter_max_mb": first, "rss_last_quarter_max_mb": last,
                  "slope_mb_per_chunk": slope, "slope_mb_per_1M_problems": slope * 1e6 / chunk}
    results_bytes = res.nbytes  # without loading the columns of a lazily loaded run
    lazy = res.lazy
    disk_bytes = sum(p.stat().st_size for p in store.chunk_files(folder).values())

    w1_rate, w1_source = None, None
    if args.w1_json and Path(args.w1_json).exists():
        w1_rate = json.loads(Path(args.w1_json).read_text())["problems_per_s"]
        w1_source = args.w1_json
    elif args.w1_problems:
        log(f"W1 rate for comparison: engine on {args.w1_problems} problems, same chunk (compiles again) ...")
        eng = EngineW1(chunk, seed=args.seed)
        eng.compile()
        eng.run(min(chunk, args.w1_problems))
        ts = []
        for _ in range(2):
            t1 = time.perf_counter()
            eng.run(args.w1_problems)
            ts.append(time.perf_counter() - t1)
        w1_rate = statistics.median(args.w1_problems / t for t in ts)
        w1_source = f"measured in this run on {args.w1_problems} problems"
    ratio_w1 = rate_e2e / w1_rate if w1_rate else None
    line = (f"W3 scale: {_fmt_rate(rate_e2e)} problems/s end to end ({N} problems, {n_chunks} chunks of {chunk}, "
            f"writes and the return of the results included; kernel+transfer only {_fmt_rate(rate_kernel or float('nan'))}/s)"
            + (f" = {100 * ratio_w1:.0f}% of W1's {_fmt_rate(w1_rate)}/s" if ratio_w1 else "")
            + f" | compile {compile_s:.1f} s | peak RSS {peak:,.0f} MB"
            + (f" (during chunks: first quarter {growth['rss_first_quarter_max_mb']:,.0f} MB, last quarter "
               f"{growth['rss_last_quarter_max_mb']:,.0f} MB, slope {growth['slope_mb_per_1M_problems']:,.0f} MB "
               f"per 1M problems)" if growth else "")
            + f" | results {results_bytes / 1e6:,.1f} MB in memory when all loaded ("
            + ("returned lazily: columns are read when used" if lazy else "loaded") + f"), {disk_bytes / 1e6:,.1f} MB on disk")
    print(line)
    return {"workload": "W3", "line": line, "problems": N, "chunk": chunk, "folder": str(folder),
            "spec": spec.to_dict(),
            "problems_per_s": rate_e2e, "problems_per_s_kernel": rate_kernel, "wall_s": wall, "cpu_s": tm.cpu,
            "loadavg_1min_range": [min((x[3] for x in samples), default=None), max((x[3] for x in samples), default=None)],
            "ratio_w1": ratio_w1, "w1_problems_per_s": w1_rate, "w1_source": w1_source,
            "ratio_r1": None, "ratio_r2": None, "roofline_fraction": None,
            "compile_s": compile_s, "peak_rss_mb": peak, "rss_start_mb": rss_start, "rss_growth": growth,
            "rss_samples": samples[:: max(1, len(samples) // 400)], "results_bytes_in_memory": results_bytes,
            "results_bytes_on_disk": disk_bytes, "results_lazy": lazy, "results_bytes_per_problem": results_bytes / N,
            "chunk_s_median": float(np.median(chunk_s)) if chunk_s else None,
            "machine": common.machine()}


# ================================================================================================
# The README's performance table, rebuilt from a workload's results
# ================================================================================================
README_BEGIN = "<!-- performance-table: begin (rebuilt by benchmarks/run.py --readme README.md) -->"
README_END = "<!-- performance-table: end -->"
README_HEADER = ("| workload | engine | R1 NumPy | R2 plain JAX | ×R1 | ×R2 | ×W1 | compile | peak RSS | measured on |",
                 "|---|---|---|---|---|---|---|---|---|---|")


def _machine_cell(out: dict) -> str:
    """The machine a row was measured on: CPU model, cores, backend, JAX; the load beside it; date and sources."""
    m = out["machine"]
    load = out.get("loadavg_range") or out.get("loadavg_1min_range") or []
    load = [x for x in load if x is not None]
    head = m.get("git_head")
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('backend', '?')}, JAX {m.get('jax', '?')}"
            + (f"; 1-min load {min(load):.1f}–{max(load):.1f}" if load else "")
            + f"; {time.strftime('%Y-%m-%d')}, engine sources {m.get('engine_src_sha256', '?')}"
            + (f" (on {head})" if head else ""))


def readme_rows(out: dict) -> dict[str, str]:
    """The table rows a workload's results give, keyed by workload (W1, W1-all, W3)."""
    w, m = out["workload"], _machine_cell(out)
    mb = lambda x: f"{x:,.0f} MB"
    if w == "W1":
        e = out["engine"]
        return {"W1": f"| W1 ({e['problems']:,} problems, median of {len(e['seconds'])}) | "
                      f"{_fmt_rate(out['problems_per_s'])} problems/s | {_fmt_rate(out['r1']['problems_per_s'])}/s | "
                      f"{_fmt_rate(out['r2']['problems_per_s'])}/s | {out['ratio_r1']:.2f} | {out['ratio_r2']:.2f} | | "
                      f"{out['compile_s']:.1f} s | {mb(out['peak_rss_mb'])} | {m} |"}
    if w == "W1-all":
        return {"W1-all": f"| W1-all (every bound, `bounds='all'`; {out['problems']:,} problems, median of "
                          f"{len(out['ratio_w1_per_repeat'])}) | {_fmt_rate(out['problems_per_s'])} problems/s "
                          f"(W1 in the same run: {_fmt_rate(out['w1_problems_per_s'])}/s) | | | | | "
                          f"{out['ratio_w1']:.2f} | {out['compile_s']:.1f} s | {mb(out['peak_rss_mb'])} | {m} |"}
    if w == "W3":
        ratio = f"{out['ratio_w1']:.2f}" if out.get("ratio_w1") else ""
        return {"W3": f"| W3 (`--workload W3`: {out['problems']:,} problems, one command) | "
                      f"{_fmt_rate(out['problems_per_s'])} problems/s end to end | | | | | {ratio} | "
                      f"{out['compile_s']:.1f} s | {mb(out['peak_rss_mb'])} | {m} |"}
    return {}


def update_readme(path: str | os.PathLike, rows: dict[str, str]) -> None:
    """Rewrite the table between README_BEGIN and README_END in ``path``: the rows of ``rows`` replace those
    of the same workload, other rows stay, in the order W1, W1-all, W3, then the rest."""
    path = Path(path)
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no performance table markers ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    block, tail = rest.split(README_END, 1)
    old = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].split(" ")[0] not in ("workload", "---"):
            old[cells[0].split(" ")[0]] = line.strip()
    merged = {**old, **rows}
    order = [k for k in ("W1", "W1-all", "W3") if k in merged] + [k for k in merged if k not in ("W1", "W1-all", "W3")]
    table = "\n".join(README_HEADER + tuple(merged[k] for k in order))
    path.write_text(head + README_BEGIN + "\n" + table + "\n" + README_END + tail)
    log(f"rebuilt the performance table in {path} (rows {', '.join(rows)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=["W1", "W1-all", "W2", "W3", "profile", "scaling", "sgd-step",
                                                          "stability"])
    ap.add_argument("--problems", type=int, help="problems (W1 4096, W2 256, W3 1,000,000 by default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--chunk", type=int, help="problems per compiled call (default: the engine's)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smaller roofline probes")
    ap.add_argument("--readme", help="rebuild this README's performance table with this workload's row "
                                     "(W1, W1-all, W3), naming the machine")
    g1 = ap.add_argument_group("W1")
    g1.add_argument("--r1-problems", type=int, help="problems R1 runs (default min(256, N)); its rate is per problem")
    g1.add_argument("--r1-block", type=int, default=64, help="problems R1 vectorises at once")
    g1.add_argument("--r2-problems", type=int, help="problems R2 runs (default min(1024, N))")
    g1.add_argument("--r2-chunk", type=int, help="R2's chunk (default: the engine's)")
    g1.add_argument("--core-problems", type=int, default=1024,
                    help="also time the engine's pipeline without the bound catalogue on this many problems (0: skip)")
    ga = ap.add_argument_group("W1-all")
    ga.add_argument("--profile-problems", type=int, default=64,
                    help="W1 problems the catalogue profile runs on (default 64)")
    g2 = ap.add_argument_group("W2")
    g2.add_argument("--chains", type=int)
    g2.add_argument("--steps", type=int)
    g2.add_argument("--plain-chunk", type=int, help="problems per call of W2's plain reference (default 8)")
    g2.add_argument("--plain-xla-options", action="store_true",
                    help="compile the plain reference with the engine kernel's XLA options too (default: XLA's defaults)")
    g3 = ap.add_argument_group("W3")
    g3.add_argument("--out", help="W3 run folder (default: a folder in the temp dir)")
    g3.add_argument("--resume", action="store_true", help="resume the folder instead of overwriting it")
    g3.add_argument("--w1-json", help="take W1's rate from this JSON instead of measuring it")
    g3.add_argument("--w1-problems", type=int, default=1024, help="problems for the in-run W1 rate (0: skip)")
    gp = ap.add_argument_group("profile")
    gp.add_argument("--variants", action="store_true", help="also time alternative SGD kernels and chunk sizes")
    gs = ap.add_argument_group("scaling")
    gs.add_argument("--devices", help="comma-separated forced host device counts (default 1,2,4)")
    gs.add_argument("--timeout", type=int, default=900, help="seconds before a device count is reported as hung")
    gt = ap.add_argument_group("sgd-step")
    gt.add_argument("--chunks", help="comma-separated chunk widths (default 32,64,128,256)")
    args = ap.parse_args(argv)

    if args.workload == "W1":
        out = workload_w1(args)
    elif args.workload == "W1-all":
        out = workload_w1_all(args)
    elif args.workload == "W2":
        out = workload_w2(args)
    elif args.workload == "W3":
        out = workload_w3(args)
    elif args.workload == "scaling":
        import scaling
        out = scaling.workload_scaling(args)
    elif args.workload == "sgd-step":
        import sgd_step
        out = sgd_step.workload_sgd_step(args)
    elif args.workload == "stability":
        import stability
        out = stability.workload_stability(args)
    else:
        import profile_stages
        out = profile_stages.main(args)
    out["command"] = " ".join([os.path.basename(sys.executable), "benchmarks/run.py"] + (argv or sys.argv[1:]))
    write_json(args.json, out)
    if args.readme:
        rows = readme_rows(out)
        if not rows:
            raise SystemExit(f"--readme: workload {args.workload} has no row in the performance table")
        update_readme(args.readme, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
