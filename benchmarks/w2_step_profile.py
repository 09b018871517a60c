#!/usr/bin/env python
"""Where W2's time goes: the OU kernel's chain loop for one block, by XLA operation.

    python benchmarks/w2_step_profile.py                    # one block: 8 problems × 64 chains, T = 400
    python benchmarks/w2_step_profile.py --steps 2000 --json w2_step.json
    python benchmarks/w2_step_profile.py --default-xla      # the same loop with XLA's default options

Runs ``ou_chains.run_chains`` (what ``OUChainKernel`` runs per block of ``problem_block`` problems,
with W2's shape from ``w2_ou_chains.W2``) once compiled, then once under ``jax.profiler`` with
XLA:CPU's per-operation trace events on (``--xla_cpu_enable_xprof_traceme``, set here before JAX
starts), and prints each compiled operation's time per chain step with its output shape and the JAX
operation it came from. The per-step figure does not depend on T (the loop is the same every step);
the burn-in and the batch phase are two copies of the same step body, reported separately.
Each operation's time is its wall time per call (an operation XLA splits across the intra-op pool
counts once); "share" is its part of all the operations' time (they run one after another, so that
sum is about the loop's wall time, a little more under the profiler).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
import w2_ou_chains as w2  # noqa: E402

SKIP = ("$", "Thunk", "Slinky", "Pjit", "Common", "end:", "while", "ProfilerSession")


def op_table(hlo: str) -> dict[str, tuple[str, str]]:
    """Operation name → (output shape, the JAX op_name of its metadata), from the compiled HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out.setdefault(m.group(1), (m.group(2), op.group(1).split("/")[-1] if op else ""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="chain steps T (default 400; W2 runs 2000)")
    ap.add_argument("--problems", type=int, help="problems in the block (default: the kernel's problem_block, 8)")
    ap.add_argument("--top", type=int, default=14, help="operations to print")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--default-xla", action="store_true",
                    help="compile with XLA's default options, not the kernel's (YNNPACK's fusions on)")
    args = ap.parse_args(argv)

    from rlhf_bounds import engine
    from rlhf_bounds import ou_chains as oc
    from rlhf_bounds.simulate import prepare

    s = dataclasses.replace(w2.W2, T=args.steps)
    spec = w2.w2_spec(s)
    kernel = w2.engine_kernel(s)
    burn, _ = kernel.check(spec)
    Q = args.problems or kernel.problem_block
    problems_key, shared_key = engine.problem_keys(0)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(problems_key, jnp.arange(Q))
    prep = jax.vmap(lambda k: prepare(spec, k))(keys)
    w_s = prep.world.w_ref + prep.theta_hat / spec.beta      # the chains' centre: any point serves for timing
    idx = oc.chain_indices(spec, s.chains, shared_key)
    loop = jax.jit(lambda data, w_ref, centre: oc.run_chains(spec, data, w_ref, centre, idx, burn, kernel.batches))
    args_ = (prep.data, prep.world.w_ref, w_s)
    # compiled as the engine compiles the kernel: with its XLA options
    options = {} if args.default_xla else engine.kernel_compiler_options(kernel)
    compiled = loop.lower(*args_).compile(compiler_options=options or None)
    ops = op_table(compiled.as_text())
    jax.block_until_ready(compiled(*args_))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args_))
    wall = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        jax.block_until_ready(compiled(*args_))
        jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        if not files:
            raise SystemExit("w2_step_profile: jax.profiler wrote no trace (is the profiler available here?)")
        events = json.load(gzip.open(files[0]))["traceEvents"]
    total = collections.defaultdict(float)
    calls = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(SKIP):
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    T = spec.steps
    traced = sum(total.values())
    rows = []
    for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
        shape, op = ops.get(name, ("", ""))
        rows.append({"op": name, "us_per_call": us / calls[name], "calls_per_step": calls[name] / T,
                     "share": us / traced, "shape": shape, "jax_op": op})
    lanes = s.chains * Q
    print(f"W2 chain loop, one block: {Q} problems × {s.chains} chains = {lanes} lanes, T={T}: "
          f"{wall / T * 1e3:.3f} ms per step ({wall / T / lanes * 1e9:.0f} ns per chain step), "
          f"{common.machine().get('cpu', '')}; XLA options {options or 'default'}")
    print(f"{'µs/call':>9} {'calls/step':>10} {'share':>8}  operation (output shape; JAX op)")
    for r in rows[:args.top]:
        print(f"{r['us_per_call']:9.1f} {r['calls_per_step']:10.2f} {100 * r['share']:7.1f}%  "
              f"{r['op']} ({r['shape']}; {r['jax_op']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": "w2-step", "ms_per_step": wall / T * 1e3, "lanes": lanes,
                                               "steps": T, "ops": rows, "xla_options": options,
                                               "machine": common.machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
