"""Replace-one retraining (the stability study's kernel) against a plain ``jit(vmap(...))`` of the same algorithm.

    python benchmarks/run.py --workload stability [--problems 1000] [--steps 500] --json stability.json

W1's shape (d 16, A 8, n 256, M 2048), [A]'s GA (exact over responses, exact KL, the oracle reward, η = 1/L_F)
for T steps on S and on R = 8 samples S^(r) with one prompt replaced, then the empirical stability
max_r max_x |f_{w_S}(x) − f_{w_S^(r)}(x)| over the evaluation set. Both paths draw the same problems
(``simulate.prepare``, the same replacement prompts and evaluation sets) and evaluate them the same way;
they differ in how the P·(1 + R) trainings run:

* ``engine``: ``stability.replace_one_fits``, the learner's own ``step`` in ``learners.train_policies``'s
  problem-last lane blocks (the path the ``stability`` suite runs);
* ``plain``: ``jit(vmap(vmap(ga)))`` over problems and samples, ``ga`` a ``lax.scan`` of
  w ← w + η·``learners.full_gradient`` (the per-prompt reference gradient, vmapped over prompts).

Reported: problems × replacements per second for each (median of ``--repeats`` timed runs after
compilation, the two interleaved), their ratio, the largest difference of the two stability estimates.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

R = 8


def _setup(problems: int, steps: int | None, seed: int):
    import jax
    import jax.numpy as jnp

    import common
    from rlhf_bounds import engine, stability as S
    from rlhf_bounds import learners as L
    from rlhf_bounds.policy import objective
    from rlhf_bounds.simulate import prepare
    from rlhf_bounds.world import draw_prompts, true_reward

    spec = common.w1_spec(common.W1).replace(learner="GA", reward_model="oracle", train_log_ratio="exact",
                                             tau=float("inf"), record_every=steps or common.W1.T,
                                             steps=steps or common.W1.T)
    lf = S.smoothness_bound(reward_norm=spec.reward_norm, feature_bound=spec.feature_bound, beta=spec.beta)
    spec = spec.replace(lr=1.0 / lf)
    pk, sk = engine.problem_keys(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(pk, i))(jnp.arange(problems))
    idx = S.replaced_indices(spec, jax.random.fold_in(sk, 7), R)
    gidx = jnp.zeros((spec.steps, 1), jnp.int32)

    def draw(keys):
        prep = jax.vmap(lambda k: prepare(spec, k))(keys)

        def extra(world, kf, ke):
            pr = draw_prompts(spec, world, jax.random.fold_in(kf, 1), R)
            new = L.TrainData(pr.phi, true_reward(spec, world, pr), jnp.zeros((R, spec.rollouts), jnp.float32))
            ev = draw_prompts(spec, world, ke, spec.eval_prompts)
            return new, ev.phi, true_reward(spec, world, ev)

        new, ev_phi, ev_r = jax.vmap(extra)(prep.world, prep.keys.fresh, prep.keys.eval)
        return prep.data, prep.world.w_ref, new, ev_phi, ev_r

    def stability(w, w_ref, ev_phi, ev_r):        # w [1 + R, d] of one problem
        f = jax.vmap(lambda v: jax.vmap(objective, in_axes=(None, None, 0, 0, None))(v, w_ref, ev_phi, ev_r,
                                                                                      spec.beta))(w)
        return S.empirical_stability(f[0], f[1:])

    def engine_path(data, w_ref, new, ev_phi, ev_r):
        fit = S.replace_one_fits(spec, data, new, idx, w_ref, gidx)
        return jax.lax.map(lambda a: stability(*a), (fit.w_last, w_ref, ev_phi, ev_r), batch_size=16)

    def ga(data, w_ref):
        def body(w, _):
            return w + spec.lr * L.full_gradient(w, w_ref, data, spec.beta, jnp.inf), None
        return jax.lax.scan(body, w_ref, None, length=spec.steps)[0]

    def plain_path(data, w_ref, new, ev_phi, ev_r):
        both = jax.vmap(S.replace_one, in_axes=(0, 0, None))(data, new, idx)
        w = jax.vmap(lambda d_, w0: jax.vmap(ga, in_axes=(0, None))(d_, w0))(both, w_ref)
        return jax.lax.map(lambda a: stability(*a), (w, w_ref, ev_phi, ev_r), batch_size=16)

    return spec, keys, jax.jit(draw), jax.jit(engine_path), jax.jit(plain_path)


def workload_stability(args) -> dict[str, Any]:
    import jax

    import common
    problems = args.problems or 1000
    spec, keys, draw, engine_path, plain_path = _setup(problems, args.steps, args.seed)
    inputs = jax.block_until_ready(draw(keys))
    out, compile_s = {}, {}
    for name, fn in (("engine", engine_path), ("plain", plain_path)):
        t0 = time.perf_counter()
        out[name] = np.asarray(jax.block_until_ready(fn(*inputs)))
        compile_s[name] = time.perf_counter() - t0     # compile and the first run
    times = {"engine": [], "plain": []}
    for _ in range(args.repeats):
        for name, fn in (("engine", engine_path), ("plain", plain_path)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - t0)
    rate = {k: problems * R / float(np.median(v)) for k, v in times.items()}
    diff = float(np.max(np.abs(out["engine"] - out["plain"])))
    line = (f"stability (W1 shape, GA T={spec.steps}, {problems} problems × {R} replaced prompts): engine "
            f"{rate['engine']:.1f} problem-replacements/s, plain jit(vmap) {rate['plain']:.1f}/s, "
            f"×{rate['engine'] / rate['plain']:.2f}; largest |Δ stability| {diff:.1e}; first call "
            f"{compile_s['engine']:.1f} s / {compile_s['plain']:.1f} s")
    print(line)
    return {"workload": "stability", "line": line, "problems": problems, "replacements": R, "steps": spec.steps,
            "rate_engine": rate["engine"], "rate_plain": rate["plain"], "speedup": rate["engine"] / rate["plain"],
            "times": times, "first_call_s": compile_s, "max_abs_diff": diff, "machine": common.machine(),
            "peak_rss_mb": common.peak_rss_mb()}
