"""Device-count scaling on one CPU: W1 through ``rlhf_bounds.run`` with 1, 2, 4, ... forced host devices.

    python benchmarks/run.py --workload scaling [--devices 1,2,4] [--problems 1024] [--chunk C] --json s.json

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count=k`` must
be set before JAX starts), which compiles once on a warm-up chunk and then times ``rb.run`` over the
same N problems ``--repeats`` times (wall and CPU seconds, no output folder). The engine's default chunk
for k devices is used unless ``--chunk`` is given (the default caps forced CPU devices at 32 problems
each; ``--chunk`` gives every count the same chunk). The processes also return a few result columns,
so the comparison is like for like: the same problems, the same draws; the parent reports how many
problems agree to 1e-5 with the first device count and checks the means by a paired z-test (another
device count trains fewer problems per device, so float32 round-off can differ in the last bit and
grow over the SGD steps for a few problems). A process that does not finish within
``--timeout`` seconds is reported as hung rather than waited on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
COMPARED = ("J_star", "J_hat", "gap_total", "policy_grad_norm_last", "b1_total", "b3_tau_star")


def child(devices: int, problems: int, repeats: int, chunk: int | None, seed: int, out: str) -> None:
    """One device count (this process was started with that many forced host devices)."""
    sys.path.insert(0, str(HERE))
    import common
    import jax
    import rlhf_bounds as rb
    from rlhf_bounds.engine import cpu_pool_threads, run_devices, run_identity

    assert jax.device_count() == devices, (jax.device_count(), devices)
    spec = common.w1_spec(common.W1)
    identity, _ = run_identity(spec, problems, seed, chunk)
    used_chunk = identity["chunk_size"]
    t0 = time.perf_counter()
    rb.run(spec, used_chunk, seed=seed, chunk_size=used_chunk, progress=False)  # compiles; cached for the rest
    warm_s = time.perf_counter() - t0
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        with common.Timer() as tm:
            res = rb.run(spec, problems, seed=seed, chunk_size=used_chunk, progress=False)
        walls.append(tm.wall)
        cpus.append(tm.cpu)
    summary = common.rate_summary(problems, walls, cpus)
    np.savez(out, **{k: res[k] for k in COMPARED if k in res}, problem=res["problem"])
    print(json.dumps({"devices": devices, "devices_used": len(run_devices()), "pool_threads": cpu_pool_threads(),
                      "chunk": used_chunk, "warmup_compile_s": warm_s, **summary}))


def workload_scaling(args) -> dict[str, Any]:
    import common
    devices = [int(x) for x in (args.devices or "1,2,4").split(",")]
    problems = args.problems or 1024
    rows, cols = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in devices:
            env = dict(os.environ)
            flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count"))
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={k}".strip()
            env["JAX_PLATFORMS"] = "cpu"
            out = str(Path(tmp) / f"dev{k}.npz")
            cmd = [sys.executable, str(Path(__file__)), "--child", str(k), str(problems), str(args.repeats),
                   str(args.chunk or 0), str(args.seed), out]
            sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] scaling: {k} host device(s), {problems} problems\n")
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"devices": k, "error": f"hung: no result within {args.timeout} s"})
                continue
            if proc.returncode != 0:
                rows.append({"devices": k, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            with np.load(out) as z:
                cols[k] = {name: z[name] for name in z.files}
    base = next((r for r in rows if "problems_per_s" in r), None)
    ref = cols.get(base["devices"]) if base else None
    worst, worst_z = 0.0, 0.0
    for r in rows:
        if "problems_per_s" not in r:
            continue
        r["speedup"] = r["problems_per_s"] / base["problems_per_s"]
        c = cols[r["devices"]]
        assert np.array_equal(c["problem"], ref["problem"])
        # relative differences with an absolute floor of 0.1 (tests/test_engine.py: 1e-5 relative, 1e-6 absolute)
        rel = {n: np.abs(c[n].astype(np.float64) - ref[n]) / np.maximum(np.abs(ref[n]), 0.1)
               for n in ref if n != "problem"}
        r["rel_diff_vs_first"] = {n: float(np.max(v)) for n, v in rel.items()}
        r["max_rel_diff_vs_first"] = max(r["rel_diff_vs_first"].values())
        r["problems_within_1e-5"] = int(np.sum(np.all([v <= 1e-5 for v in rel.values()], axis=0)))
        # paired check of the means: |mean(Δ)| ≤ 4·sd(Δ)/√N per column
        z = {}
        for n in rel:
            delta = c[n].astype(np.float64) - ref[n]
            sd = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
            z[n] = 0.0 if sd == 0 else abs(float(np.mean(delta))) / (sd / np.sqrt(len(delta)))
        r["paired_z"] = z
        worst = max(worst, r["max_rel_diff_vs_first"])
        worst_z = max([worst_z, *z.values()])
    same = bool(worst_z <= 4.0)
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"{r['devices']} dev: {r['error']}")
        else:
            parts.append(f"{r['devices']} dev (chunk {r['chunk']}, {r['devices_used']} used, pool "
                         f"{r['pool_threads']}): {r['problems_per_s']:.1f}/s ×{r['speedup']:.2f} "
                         f"CPU share {r['cpu_share']:.2f}, {r['problems_within_1e-5']}/{problems} problems "
                         f"within 1e-5 of {base['devices']} dev")
    line = (f"scaling W1 on forced host devices, {problems} problems: " + "; ".join(parts)
            + f" | same problems, same means across device counts: {'PASS' if same else 'FAIL'} (paired "
            f"z ≤ {worst_z:.2f}; largest difference {worst:.1e}: float32 round-off of another vector width, "
            "grown over the SGD steps)")
    print(line)
    return {"workload": "scaling", "line": line, "problems": problems, "rows": rows, "same_results": same,
            "worst_rel_diff": worst, "worst_paired_z": worst_z, "problems_per_s": base["problems_per_s"] if base else None,
            "ratio_r1": None, "ratio_r2": None, "roofline_fraction": None,
            "compile_s": base.get("warmup_compile_s") if base else None,
            "peak_rss_mb": None, "machine": common.machine()}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    k, n, reps, ch, seed, out = sys.argv[2:8]
    child(int(k), int(n), int(reps), int(ch) or None, int(seed), out)
