"""Cost of one W1 training step by part and by chunk width: where the training loop's time goes.

    python benchmarks/run.py --workload sgd-step [--chunks 32,64,128,256] --json sgd_step.json

Each part is a ``lax.scan`` over W1's T = 500 minibatches (b = 32 of n = 256 prompts, A = 8,
d = 16, problem axis last as in ``learners.train_policies``), timed after compilation (minimum of
``--repeats`` interleaved runs), and reported in µs per step and per problem-step:

* ``gather``: the minibatch rows Φ[idx] alone;
* ``contract+softmax``: π_w on the minibatch (``learners.contract``, log-softmax);
* ``spread``: Σ_{m,a} c_{m,a} φ_{m,a} with fixed coefficients (``learners.spread``);
* ``contract+spread``: both, with c = π_w (the two passes over the minibatch features);
* ``train_policies``: the engine's whole loop (rollouts, RLOO, clipped log-ratio, the 10
  checkpoint gradients), per step, as one loop of exactly the chunk's width (``lanes=None``;
  the engine runs it in blocks of ``learners.lane_block`` lanes).

The features are random unit rows; the values computed do not matter here, only the shapes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def workload_sgd_step(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import common
    from rlhf_bounds import learners as L

    spec = common.w1_spec(common.W1).validate()
    n, A, d, b, T, K = spec.prompts, spec.actions, spec.d, spec.batch, spec.steps, spec.rollouts
    chunks = [int(x) for x in (args.chunks or "32,64,128,256").split(",")]
    idx = L.minibatch_indices(spec, jax.random.key(1))
    rng = np.random.default_rng(args.seed)

    def loop(body):
        def run(phi, w0):
            return jax.lax.scan(lambda w, i: (body(w, phi, i), None), w0, idx)[0]
        return jax.jit(run)

    tiny = 1e-9  # keep each part's result live without changing the shapes
    parts = {
        "gather": lambda w, phi, i: w + tiny * phi[i][0, 0],
        "contract+softmax": lambda w, phi, i: w + tiny * jnp.sum(jnp.exp(L.log_softmax(L.contract(phi[i], w))),
                                                                 axis=(0, 1))[None],
        "spread": lambda w, phi, i: w + tiny * L.spread(jnp.full((b, A, w.shape[1]), 0.1, w.dtype) + w[0], phi[i]),
        "contract+spread": lambda w, phi, i: w + tiny * L.spread(jnp.exp(L.log_softmax(L.contract(phi[i], w))),
                                                                  phi[i]),
    }
    rows = []
    for P in chunks:
        phi = rng.normal(size=(n, A, d, P)).astype(np.float32)
        phi /= np.linalg.norm(phi, axis=2, keepdims=True)
        phi = jnp.asarray(phi)
        w0 = jnp.zeros((d, P), jnp.float32)
        fns = {name: loop(body) for name, body in parts.items()}
        args_of = {name: (phi, w0) for name in parts}
        data = L.TrainData(jnp.moveaxis(phi, -1, 0), jnp.asarray(rng.normal(size=(P, n, A)).astype(np.float32)),
                           jnp.asarray(rng.uniform(size=(P, n, K)).astype(np.float32)))
        # one loop of exactly P lanes (lanes=None): what a lane block of that width costs (learners.lane_block)
        fns["train_policies"] = jax.jit(lambda data, w_ref: L.train_policies(spec, data, w_ref, idx, lanes=None).w_last)
        args_of["train_policies"] = (data, jnp.zeros((P, d), jnp.float32))
        for name, f in fns.items():
            jax.block_until_ready(f(*args_of[name]))  # compile
        times = {name: [] for name in fns}
        for r in range(args.repeats):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[name](*args_of[name]))
                times[name].append(time.perf_counter() - t0)
        row = {"chunk": P}
        for name, ts in times.items():
            us = 1e6 * min(ts) / T
            row[name] = {"us_per_step": us, "us_per_problem_step": us / P}
        rows.append(row)
    names = list(parts) + ["train_policies"]
    lines = ["sgd-step (µs per step | per problem-step, min of %d):" % args.repeats]
    lines.append("  chunk " + "".join(f"{n:>27s}" for n in names))
    for row in rows:
        lines.append(f"  {row['chunk']:5d} " + "".join(
            f"{row[n]['us_per_step']:14.0f} | {row[n]['us_per_problem_step']:8.2f}" + "  " for n in names))
    line = "\n".join(lines)
    print(line)
    return {"workload": "sgd-step", "line": line, "rows": rows, "problems_per_s": None, "ratio_r1": None,
            "ratio_r2": None, "roofline_fraction": None, "compile_s": None, "peak_rss_mb": common.peak_rss_mb(),
            "machine": common.machine()}
